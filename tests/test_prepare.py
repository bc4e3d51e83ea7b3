"""Preparation: splits, train-only vocabularies, leak-free behaviour sequences, caching."""

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ctr.data.contract import ContractError
from ctr.data.prepare import PrepareSettings, SequenceSpec, Tables, prepare
from ctr.data.sources.simulator import SimulatorSource, simulate

from conftest import SIM_SETTINGS


class FrameSource:
    """An in-memory source that counts how often it is loaded."""

    def __init__(self, tables: Tables, name: str = "frames"):
        self.tables, self.name, self.loads = tables, name, 0

    def fingerprint(self) -> str:
        return str(self.tables.events.hash_rows().sum())

    def load(self) -> Tables:
        self.loads += 1
        return self.tables


def small_log() -> Tables:
    t0 = datetime(2024, 1, 1)
    ts = [t0 + timedelta(hours=h) for h in (0, 1, 1, 2, 3, 3, 4, 5, 6, 7)]
    events = pl.DataFrame({
        "request_id": list(range(10)),
        "user_id": [1, 1, 1, 2, 1, 2, 2, 3, 1, 3],
        "item_id": [10, 11, 12, 10, 13, 14, 10, 15, 16, 10],
        "clicked": [1, 0, 1, 1, 1, 0, 1, 1, 0, 1],
        "timestamp": ts,
    })
    items = pl.DataFrame({"item_id": [10, 11, 12, 13, 14, 15, 16],
                          "cat": ["a", "b", "a", "c", "b", "d", "e"]})
    return Tables(events=events, items=items)


def test_histories_are_strictly_earlier_and_aligned(tmp_path):
    s = PrepareSettings(sparse=["user_id", "item_id", "cat"], sequence=SequenceSpec(3, False, ["cat"]),
                        fractions=(0.6, 0.2, 0.2))
    a = prepare(FrameSource(small_log()), s, tmp_path)
    vocab = pl.read_parquet(a.path / "vocab" / "item_id.parquet")
    code = dict(zip(vocab["item_id"], vocab["index"]))
    train = np.load(a.path / "train" / "hist.item_id.npy")
    # user 1's events at 0h, 1h, 1h: the two events at 1h see only the one at 0h, not each other
    assert train[0].tolist() == [0, 0, 0]
    assert train[1].tolist() == [code[10], 0, 0] and train[2].tolist() == [code[10], 0, 0]
    # user 1 at 3h (row 4 in time order): the last 3, most recent first; ties in arbitrary-but-fixed order
    assert sorted(train[4][:2].tolist()) == sorted([code[11], code[12]]) and train[4][2] == code[10]
    test = np.load(a.path / "test" / "hist.item_id.npy")
    # the last event (user 3 at 7h) sees its val event (item 15, unseen in train: out of vocabulary)
    assert 15 not in code and test[-1].tolist() == [1, 0, 0]
    cat_vocab = pl.read_parquet(a.path / "vocab" / "cat.parquet")
    cat_code = dict(zip(cat_vocab["cat"], cat_vocab["index"]))
    assert np.load(a.path / "train" / "hist.cat.npy")[1].tolist() == [cat_code["a"], 0, 0]


def test_clicked_only_histories(tmp_path):
    s = PrepareSettings(sparse=["user_id", "item_id"], sequence=SequenceSpec(5, True, []),
                        fractions=(0.6, 0.2, 0.2))
    a = prepare(FrameSource(small_log()), s, tmp_path)
    lens = np.concatenate([np.load(a.path / sp / "hist_len.npy") for sp in ("train", "val", "test")])
    # user 1's clicked events before 6h: 10 (0h), 12 (1h), 13 (3h) -> the event at 6h has 3
    assert lens[8] == 3


def test_no_leakage_brute_force(tiny_sim):
    """Every history equals the brute-force list of the user's strictly earlier clicked events."""
    d = simulate(SimulatorSource("tiny", seed=0).config())
    ev = pl.concat([d.events, d.events_random]).sort(["timestamp", "request_id", "position"])
    vocab = pl.read_parquet(tiny_sim.path / "vocab" / "item_id.parquet")
    code = dict(zip(vocab["item_id"], vocab["index"]))
    main = d.events.sort(["timestamp", "request_id", "position"])
    hist = np.concatenate([np.load(tiny_sim.path / s / "hist.item_id.npy") for s in ("train", "val", "test")])
    rng = np.random.default_rng(0)
    users, times = main["user_id"].to_numpy(), main["timestamp"].to_numpy()
    clicked = ev.filter(pl.col("clicked") == 1)
    for r in rng.choice(main.height, 200, replace=False):
        earlier = clicked.filter((pl.col("user_id") == users[r]) & (pl.col("timestamp") < times[r]))
        expected = [code.get(i, 1) for i in earlier["item_id"].to_list()[::-1][:20]]
        got = [x for x in hist[r].tolist() if x != 0]
        # same multiset (events at one timestamp may come in any fixed order), most recent first
        assert sorted(got) == sorted(expected)
        assert len(got) == min(len(expected), 20)


def test_ml100k_split_sizes_and_train_only_vocab(ml100k):
    sp = ml100k.meta["splits"]
    assert (sp["train"]["rows"], sp["val"]["rows"], sp["test"]["rows"]) == (80000, 10000, 10000)
    # vocabularies come from train only: most test users are unseen -> out of vocabulary
    assert ml100k.meta["sparse"]["user_id"]["oov_share"]["train"] == 0.0
    assert ml100k.meta["sparse"]["user_id"]["oov_share"]["test"] > 0.5
    ts = {s: np.load(ml100k.path / s / "timestamp_us.npy") for s in ("train", "val", "test")}
    assert ts["train"].max() <= ts["val"].min() and ts["val"].max() <= ts["test"].min()
    assert (np.load(ml100k.path / "test" / "hist_len.npy") <= 50).all()


def test_user_last_split(tmp_path):
    s = PrepareSettings(sparse=["user_id", "item_id"], split="user_last", user_last_n=1, sequence=None)
    a = prepare(FrameSource(small_log()), s, tmp_path)
    assert {k: v["rows"] for k, v in a.meta["splits"].items()} == {"train": 4, "val": 3, "test": 3}


def test_artefact_is_reused_and_fingerprinted(tmp_path):
    src = FrameSource(small_log())
    s = PrepareSettings(sparse=["user_id", "item_id"], sequence=None)
    a1 = prepare(src, s, tmp_path)
    a2 = prepare(src, s, tmp_path)
    assert src.loads == 1 and a1.path == a2.path
    a3 = prepare(src, PrepareSettings(sparse=["user_id"], sequence=None), tmp_path)
    assert src.loads == 2 and a3.fingerprint != a1.fingerprint
    assert json.loads((a1.path / "meta.json").read_text())["fingerprint"] == a1.fingerprint
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_feature_and_bad_reference(tmp_path):
    t = small_log()
    with pytest.raises(ContractError, match="'colour'.*not found"):
        prepare(FrameSource(t), PrepareSettings(sparse=["colour"], sequence=None), tmp_path)
    bad = Tables(events=t.events, items=t.items.filter(pl.col("item_id") != 13))
    with pytest.raises(ContractError, match="item_id 13 is not in the items table"):
        prepare(FrameSource(bad, "bad"), PrepareSettings(sparse=["item_id"], sequence=None), tmp_path)
    assert not list(tmp_path.glob(".tmp-*")), "a failed build leaves no half-written artefact"


def test_item_rows_cover_every_item_and_align_with_histories(tiny_sim):
    items = pl.read_parquet(tiny_sim.path / "items.parquet")
    d = simulate(SimulatorSource("tiny", seed=0).config())
    assert items.height == d.items.height == tiny_sim.meta["items"]["rows"]
    assert items["row"].to_list() == list(range(1, items.height + 1))
    ids = np.r_[0, items["item_id"].to_numpy()]  # row -> item_id (row 0: none)
    vocab = pl.read_parquet(tiny_sim.path / "vocab" / "item_id.parquet")
    code = np.ones(ids.max() + 1, dtype=np.int64)
    code[vocab["item_id"].to_numpy()] = vocab["index"].to_numpy()
    for split in ("train", "test", "test_random"):
        sd = tiny_sim.path / split
        ref, qref = np.load(sd / "ref.item_id.npy"), np.load(sd / "ref.query_item_id.npy")
        assert (ref > 0).all() and (qref > 0).all()
        # the row and the train vocabulary name the same item (unseen items: OOV id 1, row kept)
        assert (code[ids[ref]] == np.load(sd / "sparse.item_id.npy")).all()
        h, hr = np.load(sd / "hist.item_id.npy"), np.load(sd / "histref.item_id.npy")
        assert ((h == 0) == (hr == 0)).all()
        assert (code[ids[hr[hr > 0]]] == h[hr > 0]).all()
    # train impressions and clicks per item add up to the train split
    sp = tiny_sim.meta["splits"]["train"]
    assert items["train_impressions"].sum() == sp["rows"]
    assert items["train_clicks"].sum() == round(sp["ctr"] * sp["rows"])


def test_item_refs_must_name_known_items(tmp_path):
    t = small_log()
    ev = t.events.with_columns(pl.Series("query_item_id", [10, 11, 12, 99, 10, 11, 12, 13, 14, 15]))
    with pytest.raises(ContractError, match=r"query_item_id.*row 3|row 3.*query_item_id"):
        prepare(FrameSource(Tables(events=ev, items=t.items)),
                PrepareSettings(sparse=["item_id"], sequence=None, item_refs=["item_id", "query_item_id"]),
                tmp_path)


def test_extra_eval_split_uses_train_vocab(tiny_sim):
    sp = tiny_sim.meta["splits"]
    assert set(sp) == {"train", "val", "test", "test_random"}
    assert sp["test_random"]["rows"] == SimulatorSource("tiny").config().n_random_requests * 10
    assert np.load(tiny_sim.path / "test_random" / "extra.true_ctr.npy").shape == (sp["test_random"]["rows"],)


def test_order_mode_lets_same_second_events_see_earlier_sorted_ones(tmp_path):
    s = PrepareSettings(sparse=["user_id", "item_id"], sequence=SequenceSpec(3, False, [], earlier="order"),
                        fractions=(0.6, 0.2, 0.2))
    a = prepare(FrameSource(small_log()), s, tmp_path)
    vocab = pl.read_parquet(a.path / "vocab" / "item_id.parquet")
    code = dict(zip(vocab["item_id"], vocab["index"]))
    train = np.load(a.path / "train" / "hist.item_id.npy")
    # user 1 at 1h: item 11 sorts before item 12, so 12's history holds 11 (then 10)
    assert train[1].tolist() == [code[10], 0, 0] and train[2].tolist() == [code[11], code[10], 0]
    with pytest.raises(ValueError, match="earlier"):
        SequenceSpec(earlier="later")


def test_per_feature_min_count(tmp_path):
    s = PrepareSettings(sparse=["user_id", "item_id"], sequence=None, min_count={"item_id": 2},
                        fractions=(0.6, 0.2, 0.2))
    a = prepare(FrameSource(small_log()), s, tmp_path)
    items = pl.read_parquet(a.path / "vocab" / "item_id.parquet")
    users = pl.read_parquet(a.path / "vocab" / "user_id.parquet")
    assert items["item_id"].to_list() == [10]  # the only item seen twice in train
    assert sorted(users["user_id"].to_list()) == [1, 2]  # users keep min_count 1
    train_items = np.load(a.path / "train" / "sparse.item_id.npy")
    assert (train_items == 1).sum() == 4  # rare train items are out of vocabulary in train too


def test_null_dense_feature_names_the_event_row(tmp_path):
    t = small_log()
    t.events = t.events.with_columns(pl.Series("price", [1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]))
    with pytest.raises(ContractError, match=r"'price', row 2 .*null value in a dense feature"):
        prepare(FrameSource(t), PrepareSettings(sparse=["item_id"], dense=["price"], sequence=None), tmp_path)
