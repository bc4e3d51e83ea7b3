"""Bad input through the path users take (files -> ParquetSource -> prepare): every contract
violation is an error naming the file, the column and rows, or, under ``bad_rows="drop"``, a repair
whose counts reach meta.json ("repairs") and the log; damaged files are errors under either policy."""

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctr.data.contract import ContractError
from ctr.data.prepare import PrepareSettings, SequenceSpec, prepare
from ctr.data.sources.parquet import ParquetSource, read_table

N = 30  # events: 15 requests of 2 impressions, 5 users, 6 items
T0 = datetime(2024, 1, 1)


def clean_tables() -> dict[str, pl.DataFrame]:
    i = np.arange(N)
    items = 10 + i % 6
    events = pl.DataFrame({
        "row": i,  # the event's row in the file, kept in the artefact to see which rows survive
        "request_id": i // 2,
        "user_id": 1 + (i // 2) % 5,
        "item_id": items,
        "query_item_id": items,
        "clicked": (i % 3 == 0).astype(np.int64),
        "timestamp": [T0 + timedelta(hours=int(h)) for h in i // 2],
        "position": i % 2 + 1,
        "true_ctr": 0.1 + 0.02 * i,
        "score": 0.5 * i,
    })
    return {
        "events": events,
        "items": pl.DataFrame({"item_id": np.arange(10, 16), "cat": list("abcabc"),
                               "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}),
        "users": pl.DataFrame({"user_id": np.arange(1, 6), "age_group": ["18-24", "25-34", "35-44", "18-24", "45+"]}),
    }


SETTINGS = dict(sparse=["user_id", "item_id", "cat", "age_group", "position"], dense=["price", "score"],
                keep=["row"], item_refs=["item_id", "query_item_id"], sequence=None)


def write(tmp_path: Path, tables: dict[str, pl.DataFrame], fmt: str = "parquet") -> ParquetSource:
    paths = {}
    for name, df in tables.items():
        paths[name] = tmp_path / f"{name}.{fmt}"
        df.write_csv(paths[name]) if fmt == "csv" else df.write_parquet(paths[name])
    return ParquetSource(**{k: str(v) for k, v in paths.items()})


def run(tmp_path: Path, src: ParquetSource, policy: str = "fail", **overrides):
    return prepare(src, PrepareSettings(**{**SETTINGS, **overrides, "bad_rows": policy}), tmp_path / "cache")


def surviving_rows(artefact) -> list[int]:
    return sorted(np.concatenate([np.load(artefact.path / s / "extra.row.npy")
                                  for s in artefact.meta["splits"]]).tolist())


def put(df: pl.DataFrame, column: str, values: dict[int, object], dtype=None) -> pl.DataFrame:
    """``df`` with ``column[row] = value`` for each item of ``values`` (optionally cast first)."""
    col = (df[column].cast(dtype) if dtype is not None else df[column]).to_list()
    for row, v in values.items():
        col[row] = v
    return df.with_columns(pl.Series(column, col, dtype=dtype or df.schema[column], strict=False))


def events_put(column, values, dtype=None):
    return lambda t: {**t, "events": put(t["events"], column, values, dtype)}


def items_put(column, values, dtype=None):
    return lambda t: {**t, "items": put(t["items"], column, values, dtype)}


def unix_seconds(t):
    return {**t, "events": t["events"].with_columns(pl.col("timestamp").dt.epoch("s").cast(pl.Float64))}


def iso_strings(t):
    return {**t, "events": t["events"].with_columns(pl.col("timestamp").dt.to_string("%Y-%m-%d %H:%M:%S"))}


def then(*steps):
    def f(t):
        for step in steps:
            t = step(t)
        return t
    return f


def duplicate_row_3_at_17(t):
    ev = t["events"]
    copy = ev.slice(3, 1).with_columns(pl.lit(17, dtype=ev.schema["row"]).alias("row"))
    return {**t, "events": pl.concat([ev.slice(0, 17), copy, ev.slice(18)])}


def rows_where(expr: pl.Expr) -> set[int]:
    return set(clean_tables()["events"].filter(expr)["row"].to_list())


# the events of an item (user) that is dropped, with it, under "drop"
ITEM_11, ITEM_12, ITEM_13 = (rows_where(pl.col("item_id") == i) for i in (11, 12, 13))
USER_1 = rows_where(pl.col("user_id") == 1)

# (id, change to the clean tables, file, column, first row named, words of the error,
#  repairs under "drop": {file: {"<column>: <reason>": n}}, event rows dropped)
ROW_CASES = [
    ("null event id", events_put("user_id", {3: None}), "events", "user_id", 3, "null id",
     {"events": {"user_id: null id": 1}}, {3}),
    ("null item id in items", items_put("item_id", {2: None}), "items", "item_id", 2, "null id",
     {"items": {"item_id: null id": 1}, "events": {"item_id: not in the items table": len(ITEM_12)}}, ITEM_12),
    ("null user id in users", lambda t: {**t, "users": put(t["users"], "user_id", {0: None})}, "users",
     "user_id", 0, "null id", {"users": {"user_id: null id": 1},
                               "events": {"user_id: not in the users table": len(USER_1)}}, USER_1),
    ("label 2", events_put("clicked", {4: 2}), "events", "clicked", 4, "label must be 0 or 1, got 2",
     {"events": {"clicked: label not 0 or 1": 1}}, {4}),
    ("null label", events_put("clicked", {5: None}), "events", "clicked", 5, "null label",
     {"events": {"clicked: null label": 1}}, {5}),
    ("NaN label", events_put("clicked", {6: float("nan")}, pl.Float64), "events", "clicked", 6,
     "label must be 0 or 1, got nan", {"events": {"clicked: label not 0 or 1": 1}}, {6}),
    ("infinite number", events_put("score", {7: float("inf")}), "events", "score", 7, "non-finite value inf",
     {"events": {"score: non-finite value": 1}}, {7}),
    ("NaN number in items", items_put("price", {1: float("nan")}), "items", "price", 1, "non-finite value nan",
     {"items": {"price: non-finite value": 1}, "events": {"item_id: not in the items table": len(ITEM_11)}},
     ITEM_11),
    ("unparseable timestamp", then(iso_strings, events_put("timestamp", {8: "yesterday"})), "events",
     "timestamp", 8, "unparseable timestamp 'yesterday'", {"events": {"timestamp: unparseable timestamp": 1}}, {8}),
    ("null timestamp", events_put("timestamp", {9: None}), "events", "timestamp", 9, "null timestamp",
     {"events": {"timestamp: null timestamp": 1}}, {9}),
    ("timestamp before 1970", events_put("timestamp", {10: datetime(1969, 7, 20)}), "events", "timestamp", 10,
     "outside (1970-01-01, 2100-01-01)", {"events": {"timestamp: timestamp out of range": 1}}, {10}),
    ("milliseconds read as seconds", then(unix_seconds, events_put("timestamp", {11: 1.7e12})), "events",
     "timestamp", 11, "milliseconds read as seconds", {"events": {"timestamp: timestamp out of range": 1}}, {11}),
    ("NaN unix seconds", then(unix_seconds, events_put("timestamp", {12: float("nan")})), "events",
     "timestamp", 12, "not a finite number", {"events": {"timestamp: timestamp not finite": 1}}, {12}),
    ("duplicate impression", duplicate_row_3_at_17, "events", "request_id", 3,
     "duplicate impression: the later rows repeat the first one's request_id, user_id, item_id, timestamp, position",
     {"events": {"request_id: duplicate impression": 1}}, {17}),
    ("event of an unknown item", events_put("item_id", {14: 99}), "events", "item_id", 14,
     "item_id 99 is not in the items table", {"events": {"item_id: not in the items table": 1}}, {14}),
    ("query of an unknown item", events_put("query_item_id", {15: 98}), "events", "query_item_id", 15,
     "query_item_id 98 is not in the items table", {"events": {"query_item_id: not in the items table": 1}}, {15}),
    ("event of an unknown user", events_put("user_id", {16: 77}), "events", "user_id", 16,
     "user_id 77 is not in the users table", {"events": {"user_id: not in the users table": 1}}, {16}),
    ("null dense feature", items_put("price", {3: None}), "events", "price", 3, "null value in a dense feature",
     {"events": {"price: null dense feature": len(ITEM_13)}}, ITEM_13),
    ("position 0", events_put("position", {18: 0}), "events", "position", 18, "positions must be non-null and >= 1",
     {"events": {"position: position null or < 1": 1}}, {18}),
    ("true_ctr above 1", events_put("true_ctr", {19: 1.5}), "events", "true_ctr", 19, "outside [0, 1]",
     {"events": {"true_ctr: probability outside [0, 1] or missing": 1}}, {19}),
]
IDS = [c[0] for c in ROW_CASES]


@pytest.mark.parametrize("case", ROW_CASES, ids=IDS)
def test_row_violation_fails_naming_file_column_rows(tmp_path, case):
    _, change, file, column, row, words, _, _ = case
    src = write(tmp_path, change(clean_tables()))
    with pytest.raises(ContractError) as e:
        run(tmp_path, src)
    msg = str(e.value)
    assert e.value.source == getattr(src, file) and msg.startswith(getattr(src, file))
    assert e.value.column == column and f"'{column}'" in msg
    assert e.value.rows[0] == row and f" {row}" in msg.split(":")[0]
    assert words in msg and "bad_rows=drop" in msg
    assert not list((tmp_path / "cache").glob(".tmp-*")), "a failed build leaves nothing behind"


@pytest.mark.parametrize("case", ROW_CASES, ids=IDS)
def test_row_violation_dropped_and_counted(tmp_path, case, caplog):
    _, change, _, _, _, _, repairs, dropped = case
    src = write(tmp_path, change(clean_tables()))
    with caplog.at_level(logging.WARNING, logger="ctr.data"):
        a = run(tmp_path, src, "drop")
    expected = {getattr(src, f): counts for f, counts in repairs.items()}
    assert a.meta["repairs"] == expected
    assert json.loads((a.path / "meta.json").read_text())["repairs"] == expected
    assert surviving_rows(a) == sorted(set(range(N)) - dropped)
    assert sum(sp["rows"] for sp in a.meta["splits"].values()) == N - len(dropped)
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "ctr.data")
    for f, counts in expected.items():
        assert f in logged and all(f'"{k}": {n}' in logged for k, n in counts.items())


def test_clean_files_need_no_repair_and_keep_their_fingerprint(tmp_path):
    src = write(tmp_path, clean_tables())
    strict, lenient = run(tmp_path, src), run(tmp_path, src, "drop")
    assert strict.meta["repairs"] == lenient.meta["repairs"] == {}
    assert surviving_rows(strict) == surviving_rows(lenient) == list(range(N))
    # the policy is part of the fingerprint (test_embeddings checks that at its default it is left out)
    assert strict.fingerprint != lenient.fingerprint
    with pytest.raises(ValueError, match="bad_rows"):
        PrepareSettings(sparse=["user_id"], bad_rows="ignore")


def test_csv_rows_are_named_like_parquet_rows(tmp_path):
    t = clean_tables()
    t["events"] = put(iso_strings(t)["events"], "timestamp", {21: "2024-13-45 25:00:00"})
    src = write(tmp_path, t, "csv")
    with pytest.raises(ContractError, match=r"events\.csv, column 'timestamp', row 21 .*unparseable"):
        run(tmp_path, src)
    assert run(tmp_path, src, "drop").meta["repairs"] == {src.events: {"timestamp: unparseable timestamp": 1}}


def test_extra_log_repairs_are_counted_under_its_own_file(tmp_path):
    t = clean_tables()
    src = write(tmp_path, t)
    extra = tmp_path / "random.parquet"
    put(t["events"], "item_id", {0: 99, 1: 99}).write_parquet(extra)
    src.extra_events = {"test_random": str(extra)}
    with pytest.raises(ContractError, match=r"random\.parquet, column 'item_id', rows 0, 1 .*item_id 99"):
        run(tmp_path, src)
    a = run(tmp_path, src, "drop")
    assert a.meta["repairs"] == {str(extra): {"item_id: not in the items table": 2}}
    assert a.meta["splits"]["test_random"]["rows"] == N - 2


def test_shuffled_events_give_the_same_artefact(tmp_path):
    """Row order in the file never matters: ties in ``order`` are broken by the impression key."""
    t = clean_tables()
    shuffled = {**t, "events": t["events"].sample(fraction=1.0, shuffle=True, seed=7)}
    assert shuffled["events"]["row"].to_list() != list(range(N))
    seq = SequenceSpec(max_len=4, side=["cat"], earlier="order")  # "order": sensitive to tie order
    kw = dict(order=["timestamp"], sequence=seq)  # both impressions of a request tie on timestamp
    (tmp_path / "sorted").mkdir(), (tmp_path / "shuffled").mkdir()
    a = run(tmp_path, write(tmp_path / "sorted", t), **kw)
    b = run(tmp_path, write(tmp_path / "shuffled", shuffled), **kw)
    assert a.fingerprint != b.fingerprint  # different files, so different artefacts
    files = sorted(p.relative_to(a.path) for p in a.path.rglob("*") if p.suffix in (".npy", ".parquet"))
    assert files == sorted(p.relative_to(b.path) for p in b.path.rglob("*") if p.suffix in (".npy", ".parquet"))
    assert any(f.name == "hist.item_id.npy" for f in files)
    for f in files:
        if f.suffix == ".npy":
            np.testing.assert_array_equal(np.load(a.path / f), np.load(b.path / f), err_msg=str(f))
        else:
            assert pl.read_parquet(a.path / f).equals(pl.read_parquet(b.path / f)), f


# ---- column- and file-level problems: errors under either policy ------------------------------
def drop_column(name):
    return lambda t: {**t, "events": t["events"].drop(name)}


def cast_column(table, name, dtype):
    return lambda t: {**t, table: t[table].with_columns(pl.col(name).cast(dtype))}


COLUMN_CASES = [
    ("missing column", drop_column("clicked"), "events", "clicked", "missing required column of the events table"),
    ("float ids", cast_column("events", "item_id", pl.Float64), "events", "item_id",
     "ids must be integers or strings, got dtype Float64"),
    ("text labels", cast_column("events", "clicked", pl.Utf8), "events", "clicked",
     "labels must be 0/1 integers or booleans, got dtype String"),
    ("boolean timestamps", lambda t: {**t, "events": t["events"].with_columns(timestamp=pl.col("row") > 3)},
     "events", "timestamp", "timestamps must be datetimes, unix seconds or ISO strings, got dtype Boolean"),
    ("float positions", cast_column("events", "position", pl.Float64), "events", "position",
     "positions must be integers, got dtype Float64"),
    ("ids of another dtype than the items'", cast_column("items", "item_id", pl.Utf8), "events", "item_id",
     "dtype Int64 does not match item_id dtype String"),
    ("duplicate item id", items_put("item_id", {4: 10}), "items", "item_id", "duplicate item_id 10"),
    ("empty table", lambda t: {**t, "events": t["events"].head(0)}, "events", None, "the events table is empty"),
]


@pytest.mark.parametrize("policy", ["fail", "drop"])
@pytest.mark.parametrize("case", COLUMN_CASES, ids=[c[0] for c in COLUMN_CASES])
def test_column_problems_always_fail(tmp_path, case, policy):
    _, change, file, column, words = case
    src = write(tmp_path, change(clean_tables()))
    with pytest.raises(ContractError) as e:
        run(tmp_path, src, policy)
    assert e.value.source == getattr(src, file) and e.value.column == column
    assert words in str(e.value) and (column is None or f"'{column}'" in str(e.value))


def every_label_bad(t):
    return {**t, "events": t["events"].with_columns(clicked=pl.lit(3, dtype=pl.Int64))}


def test_dropping_every_row_is_an_error(tmp_path):
    src = write(tmp_path, every_label_bad(clean_tables()))
    with pytest.raises(ContractError, match=r"events\.parquet: every row is bad: .*'clicked: label not 0 or 1': 30"):
        run(tmp_path, src, "drop")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_parquet(path: Path) -> None:
    path.write_text("request_id,user_id,item_id\n1,2,3\n")


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("policy", ["fail", "drop"])
@pytest.mark.parametrize("damage, words", [
    (_zero_bytes, "the file is empty (0 bytes)"),
    (_truncated, "cannot be read as parquet (is it truncated, or not a parquet file?)"),
    (_not_parquet, "cannot be read as parquet (is it truncated, or not a parquet file?)"),
], ids=["zero bytes", "truncated", "text named .parquet"])
def test_damaged_parquet_files_are_named(tmp_path, damage, words, policy):
    src = write(tmp_path, clean_tables())
    damage(Path(src.items))
    with pytest.raises(ContractError) as e:
        run(tmp_path, src, policy)
    assert str(e.value).startswith(f"{src.items}: ") and words in str(e.value)


@pytest.mark.parametrize("policy", ["fail", "drop"])
@pytest.mark.parametrize("edit, rows, words", [
    (lambda lines: lines[:5] + [lines[5] + ",7"] + lines[6:], [4], "has 11 field(s), the header 10"),
    (lambda lines: lines[:8] + [lines[8].rsplit(",", 2)[0]] + lines[9:] + [""], [7, 30],
     "has 8 field(s), the header 10; 2 such row(s)"),
], ids=["long row", "short row and blank line"])
def test_ragged_csv_rows_are_named(tmp_path, edit, rows, words, policy):
    src = write(tmp_path, clean_tables(), "csv")
    path = Path(src.events)
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(ContractError) as e:
        run(tmp_path, src, policy)
    assert e.value.source == src.events and e.value.rows == rows and "ragged CSV" in str(e.value)
    assert words in str(e.value)


def test_a_late_csv_value_of_the_wrong_type_is_named_by_row(tmp_path):
    """polars infers a CSV column's type from its first 100 rows and names only the column of a
    later value that does not parse; the error names the rows too."""
    lines = ["request_id,user_id,item_id,clicked,timestamp"]
    lines += [f"{i},{i % 5},{i % 7},{i % 2},2024-01-01 00:00:{i % 60:02d}" for i in range(300)]
    lines[251] = "250,0,3,yes,2024-01-01 00:00:10"  # data row 250
    lines[281] = "280,0,3,maybe,2024-01-01 00:00:40"
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ContractError, match=r"events\.csv, column 'clicked', rows 250, 280 .*value 'yes' does "
                                            r"not parse as Int64.*2 such row"):
        read_table(path)
