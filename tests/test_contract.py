"""Contract violations stop with an error naming the file, the column and a row."""

from datetime import datetime

import polars as pl
import pytest

from ctr.data.contract import ContractError, check_references, validate


def events(**overrides):
    base = {
        "request_id": [1, 2, 3],
        "user_id": [10, 10, 11],
        "item_id": [5, 6, 5],
        "clicked": [0, 1, 0],
        "timestamp": [datetime(2024, 1, 1, 10), datetime(2024, 1, 1, 11), datetime(2024, 1, 2)],
    }
    base.update(overrides)
    return pl.DataFrame({k: v for k, v in base.items() if v is not None})


def test_valid_events_are_normalised():
    out = validate(events(clicked=[False, True, False], timestamp=[1.7e9, 1.7e9 + 1, 1.7e9 + 2]),
                   "events", "ev.parquet")
    assert out.schema["clicked"] == pl.Int8
    assert out.schema["timestamp"] == pl.Datetime("us")
    assert out["timestamp"][0] == datetime(2023, 11, 14, 22, 13, 20)


def test_iso_strings_parse():
    out = validate(events(timestamp=["2024-01-01 10:00:00", "2024-01-01T11:00:00", "2024-01-02 00:00:00+00:00"]),
                   "events", "ev.csv")
    assert out["timestamp"].to_list()[1] == datetime(2024, 1, 1, 11)


@pytest.mark.parametrize("frame, column, row, words", [
    (events(clicked=None), "clicked", None, "missing required column"),
    (events(user_id=[10, None, 11]), "user_id", 1, "null id"),
    (events(item_id=[5.0, 6.0, 5.0]), "item_id", None, "integers or strings"),
    (events(clicked=[0, 2, 1]), "clicked", 1, "0 or 1"),
    (events(clicked=["no", "yes", "no"]), "clicked", None, "0/1"),
    (events(clicked=[0, None, 1]), "clicked", 1, "null label"),
    (events(timestamp=["2024-01-01", "yesterday", "2024-01-03"]), "timestamp", 1, "unparseable"),
    (events(timestamp=[1.0, float("nan"), 2.0]), "timestamp", 1, "finite"),
    (events(position=[1, 0, 2]), "position", 1, ">= 1"),
    (events(true_ctr=[0.1, 1.5, 0.2]), "true_ctr", 1, "outside [0, 1]"),
    (events(score=[0.1, float("inf"), 0.2]), "score", 1, "non-finite"),
])
def test_violations_name_file_column_row(frame, column, row, words):
    with pytest.raises(ContractError) as e:
        validate(frame, "events", "data/events.parquet")
    msg = str(e.value)
    assert "data/events.parquet" in msg and f"'{column}'" in msg and words in msg
    assert e.value.column == column
    if row is not None:
        assert e.value.rows[0] == row and f"row {row}" in msg


def test_empty_and_duplicate_keys():
    with pytest.raises(ContractError, match="empty"):
        validate(events().head(0), "events", "e.parquet")
    with pytest.raises(ContractError, match="duplicate item_id 5") as e:
        validate(pl.DataFrame({"item_id": [5, 6, 5]}), "items", "items.parquet")
    assert e.value.rows == [0, 2]


def test_references():
    items = pl.DataFrame({"item_id": [5]})
    with pytest.raises(ContractError, match="item_id 6 is not in the items table") as e:
        check_references(events(), items, "item_id", "ev.parquet")
    assert e.value.rows == [1]
    with pytest.raises(ContractError, match="does not match"):
        check_references(events(), pl.DataFrame({"item_id": ["5"]}), "item_id", "ev.parquet")
