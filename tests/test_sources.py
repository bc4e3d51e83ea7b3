"""Source adapters: real files in, canonical tables out; bad files get named errors."""

import polars as pl
import pytest

from ctr.data.contract import ContractError
from ctr.data.prepare import PrepareSettings, prepare
from ctr.data.sources.movielens import MovieLens100K
from ctr.data.sources.open_bandit import PRESET, OpenBandit
from ctr.data.sources.parquet import ParquetSource, read_table

from conftest import data_dir


def test_movielens_tables():
    data_dir()
    t = MovieLens100K().load()
    assert t.events.height == 100_000 and t.items.height == 1682 and t.users.height == 943
    assert "rating" not in t.events.columns  # the label's source never becomes a feature
    assert abs(t.events["clicked"].mean() - 0.554) < 0.001
    assert t.items.filter(pl.col("item_id") == 1)["genre"][0] == "Animation"


def test_movielens_bad_file_is_named(tmp_path):
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                            "1\t2\t4\t881250949\n3\tx\t5\t881250950\n")
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    (tmp_path / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
    with pytest.raises(ContractError, match=r"ml-100k.inter, column 'item_id', row 1 .*not a number: 'x'"):
        MovieLens100K(root=str(tmp_path)).load()


def test_open_bandit_all_logs(cache_dir):
    data_dir()
    src = OpenBandit()
    t = src.load()
    assert t.events.height == 60_000
    assert set(t.events["policy"].unique()) == {"bts", "random"}
    assert t.items.height == 80 + 34 + 46
    assert t.events["position"].is_between(1, 3).all()
    assert {"propensity_score", "affinity"} <= set(t.events.columns)
    a = prepare(src, PRESET, cache_dir)
    assert sum(s["rows"] for s in a.meta["splits"].values()) == 60_000
    with pytest.raises(ValueError, match="unknown campaign"):
        OpenBandit(campaigns=["kids"])


def test_open_bandit_random_log_held_out(cache_dir):
    data_dir()
    src = OpenBandit(policies=["bts"], eval_policies=["random"])
    t = src.load()
    assert t.events.height == 30_000 and set(t.events["policy"].unique()) == {"bts"}
    rnd = t.extra_events["test_random"]
    assert rnd.height == 30_000 and set(rnd["policy"].unique()) == {"random"}
    # request ids never collide across the logs
    assert len(set(t.events["request_id"]) & set(rnd["request_id"])) == 0
    settings = PrepareSettings(**{**PRESET.__dict__, "sparse": [f for f in PRESET.sparse if f != "policy"]})
    a = prepare(src, settings, cache_dir)
    sp = a.meta["splits"]
    assert sp["test_random"]["rows"] == 30_000 and sp["train"]["rows"] + sp["val"]["rows"] + sp["test"]["rows"] == 30_000
    assert src.fingerprint() != OpenBandit(policies=["bts"]).fingerprint()
    with pytest.raises(ValueError, match="both trained on and held out"):
        OpenBandit(policies=["bts", "random"], eval_policies=["random"])


def test_parquet_source_round_trip(tmp_path, cache_dir):
    events = pl.DataFrame({"request_id": [1, 2, 3, 4], "user_id": ["a", "a", "b", "b"],
                           "item_id": [1, 2, 1, 3], "clicked": [1, 0, 0, 1],
                           "timestamp": ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]})
    events.write_parquet(tmp_path / "events.parquet")
    pl.DataFrame({"item_id": [1, 2, 3], "brand": ["x", "y", "x"]}).write_parquet(tmp_path / "items.parquet")
    src = ParquetSource(events=str(tmp_path / "events.parquet"), items=str(tmp_path / "items.parquet"))
    a = prepare(src, PrepareSettings(sparse=["user_id", "item_id", "brand"], fractions=(0.5, 0.25, 0.25)), cache_dir)
    assert a.meta["splits"]["train"]["rows"] == 2


def test_not_parquet_is_named(tmp_path):
    bad = tmp_path / "events.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(ContractError, match="events.parquet.*cannot be read"):
        read_table(bad)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_table(tmp_path / "missing-*.parquet")
