"""Large ID vocabularies: hashed and frequency-capped features (preparation), and the embedding
backends (plain nn.Embedding vs TorchRec's EmbeddingCollection, unsharded and sharded on CPU)."""

import functools
import hashlib
from dataclasses import asdict
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch
from _gloo import free_port, gloo_group
from torch import nn

from ctr.data.batch import TensorStore
from ctr.data.prepare import PrepareSettings, SequenceSpec, Tables, prepare, settings_fingerprint, stable_hash
from ctr.models import CTRModel, MeanPooling, TargetAttention
from ctr.models.embedding import FeatureEmbedding, make_embedding


class FrameSource:
    def __init__(self, tables: Tables, name: str = "frames"):
        self.tables, self.name = tables, name

    def fingerprint(self) -> str:
        return str(self.tables.events.hash_rows().sum())

    def load(self) -> Tables:
        return self.tables


def log(users, items, cats=None) -> Tables:
    """One event per hour, in the given order (the time split follows it)."""
    t0 = datetime(2024, 1, 1)
    n = len(users)
    events = pl.DataFrame({"request_id": list(range(n)), "user_id": users, "item_id": items,
                           "clicked": [i % 2 for i in range(n)],
                           "timestamp": [t0 + timedelta(hours=h) for h in range(n)]})
    ids = sorted(set(items))
    cats = cats or {}
    item_table = pl.DataFrame({"item_id": ids, "cat": [cats.get(i, f"c{i % 3}") for i in ids]})
    return Tables(events=events, items=item_table)


def codes(a, split: str, name: str, kind: str = "sparse") -> np.ndarray:
    return np.load(a.path / split / f"{kind}.{name}.npy")


# ---- hashing ---------------------------------------------------------------------------------
def test_stable_hash_is_pinned():
    # blake2b-8 of str(value), little-endian, mod n: pinned, so that a library or Python upgrade
    # that changed the function (or str of ints) would fail here instead of silently re-bucketing
    assert stable_hash(10, 2**64) == int.from_bytes(hashlib.blake2b(b"10", digest_size=8).digest(), "little")
    assert [stable_hash(v, 1000) for v in (10, "10", "a", 0)] == [PINNED[10], PINNED[10], PINNED["a"], PINNED[0]]


PINNED = {10: 646, "a": 928, 0: 764}


def test_hashed_features_are_stable_in_range_and_hash_unseen_values(tmp_path):
    # users 7, 8 and items 20, 21 occur only in the last events (val/test): unseen in train
    users = [1, 2, 1, 3, 2, 1, 4, 2, 1, 3, 7, 8]
    items = [10, 11, 12, 10, 13, 10, 11, 12, 14, 10, 20, 21]
    n_user, n_item = 5, 64
    s = PrepareSettings(sparse=["user_id", "item_id", "cat"], sequence=SequenceSpec(4, False, ["cat"]),
                        fractions=(0.75, 0.0, 0.25), hash_buckets={"user_id": n_user, "item_id": n_item})
    a = prepare(FrameSource(log(users, items)), s, tmp_path / "one")
    b = prepare(FrameSource(log(users, items)), s, tmp_path / "two")
    assert a.path != b.path and a.fingerprint == b.fingerprint
    assert a.meta["vocab_sizes"]["user_id"] == n_user + 2 and a.meta["vocab_sizes"]["item_id"] == n_item + 2
    assert a.meta["sparse"]["user_id"]["hashed"] == n_user and "hashed" not in a.meta["sparse"]["cat"]
    u = np.concatenate([codes(a, sp, "user_id") for sp in ("train", "test")])
    i = np.concatenate([codes(a, sp, "item_id") for sp in ("train", "test")])
    # every event's code is 2 + hash(value) (events are in log order here), unseen values included
    assert u.tolist() == [2 + stable_hash(x, n_user) for x in users]
    assert i.tolist() == [2 + stable_hash(x, n_item) for x in items]
    assert u.min() >= 2 and u.max() < n_user + 2 and (codes(a, "test", "item_id") != 1).all()
    for sp in ("train", "test"):  # a second prepare (own folder, own run) gives the same codes
        for name in ("user_id", "item_id", "cat"):
            assert np.array_equal(codes(a, sp, name), codes(b, sp, name))
        assert np.array_equal(codes(a, sp, "item_id", "hist"), codes(b, sp, "item_id", "hist"))
    # the history shares the target's encoding: user 1's 4th event (row 8) saw items 10, 12, 10
    hist = codes(a, "train", "item_id", "hist")
    assert hist[8].tolist() == [2 + stable_hash(x, n_item) for x in (10, 12, 10)] + [0]
    assert codes(a, "test", "item_id", "hist")[0].tolist() == [2 + stable_hash(10, n_item), 0, 0, 0]
    # vocab/<name>.parquet documents the train values' buckets, most frequent first
    v = pl.read_parquet(a.path / "vocab" / "user_id.parquet")
    assert v["user_id"].to_list() == [1, 2, 3, 4]  # train counts 4, 3, 1, 1 (tie by value)
    assert v["index"].to_list() == [2 + stable_hash(x, n_user) for x in (1, 2, 3, 4)]
    assert a.meta["sparse"]["user_id"]["oov_share"]["test"] == 0.0  # nothing is OOV when hashed
    # the vocabulary of a feature that is not hashed is unchanged: unseen items of it are OOV
    plain = prepare(FrameSource(log(users, items)), PrepareSettings(
        sparse=["user_id", "item_id"], sequence=None, fractions=(0.75, 0.0, 0.25)), tmp_path / "one")
    assert codes(plain, "test", "item_id").tolist() == [2, 1, 1]


def test_null_values_of_a_hashed_feature_are_oov(tmp_path):
    t = log([1, 2, 1, 2], [10, 11, 12, 11])
    t.items = t.items.with_columns(pl.when(pl.col("item_id") == 11).then(None).otherwise(pl.col("cat")).alias("cat"))
    s = PrepareSettings(sparse=["item_id", "cat"], sequence=None, fractions=(1.0, 0.0, 0.0),
                        hash_buckets={"cat": 4})
    a = prepare(FrameSource(t), s, tmp_path)
    cat = codes(a, "train", "cat")
    assert cat[1] == 1 and cat[3] == 1 and cat[0] == 2 + stable_hash(t.items["cat"][0], 4)


# ---- frequency cap ---------------------------------------------------------------------------
def test_max_vocab_keeps_the_k_most_frequent(tmp_path):
    # train item counts: 13 x4, 11 x3, 12 x3, 10 x2, 14 x1; the last two events are test
    items = [13, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 14, 14, 10]
    users = [1, 2, 3] * 5
    t = log(users, items)
    s = PrepareSettings(sparse=["user_id", "item_id"], sequence=None, fractions=(13 / 15, 0.0, 2 / 15),
                        max_vocab={"item_id": 2})
    a = prepare(FrameSource(t), s, tmp_path)
    v = pl.read_parquet(a.path / "vocab" / "item_id.parquet")
    assert v["item_id"].to_list() == [13, 11] and v["index"].to_list() == [2, 3]  # 11 beats 12 on the tie
    assert a.meta["vocab_sizes"] == {"user_id": 5, "item_id": 4}  # users are not capped
    train = codes(a, "train", "item_id")
    assert train.tolist() == [{13: 2, 11: 3}.get(x, 1) for x in items[:13]]
    # a global cap with min_count: min_count drops the singletons first, then the cap applies
    s2 = PrepareSettings(sparse=["user_id", "item_id"], sequence=None, fractions=(13 / 15, 0.0, 2 / 15),
                         max_vocab=3, min_count={"item_id": 3})
    a2 = prepare(FrameSource(t), s2, tmp_path)
    assert pl.read_parquet(a2.path / "vocab" / "item_id.parquet")["item_id"].to_list() == [13, 11, 12]
    assert pl.read_parquet(a2.path / "vocab" / "user_id.parquet")["user_id"].to_list() == [1, 2, 3]
    big = PrepareSettings(sparse=["user_id", "item_id"], sequence=None, fractions=(13 / 15, 0.0, 2 / 15),
                          max_vocab=100)
    assert prepare(FrameSource(t), big, tmp_path).meta["vocab_sizes"]["item_id"] == 5 + 2


def test_new_options_keep_old_fingerprints_and_change_them_when_set():
    base = PrepareSettings(sparse=["user_id", "item_id"])
    old = asdict(base)
    del old["max_vocab"], old["hash_buckets"], old["bad_rows"]  # the settings before these options
    import json

    from ctr.data.prepare import PREPARE_VERSION

    blob = json.dumps({"source": "src", "settings": old, "v": PREPARE_VERSION}, sort_keys=True, default=str)
    assert settings_fingerprint("src", base) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    fps = {settings_fingerprint("src", PrepareSettings(sparse=["user_id", "item_id"], **kw))
           for kw in ({}, {"max_vocab": 10}, {"max_vocab": {"item_id": 10}}, {"hash_buckets": {"item_id": 10}},
                      {"hash_buckets": {"item_id": 11}})}
    assert len(fps) == 5


@pytest.mark.parametrize("kw, match", [
    ({"hash_buckets": {"user_id": 0}}, r"hash_buckets\['user_id'\] must be a positive integer"),
    ({"hash_buckets": {"user_id": 2.5}}, r"hash_buckets\['user_id'\] must be a positive integer"),
    ({"hash_buckets": {"nope": 8}}, r"hash_buckets names 'nope'"),
    ({"hash_buckets": [8]}, r"hash_buckets must be"),
    ({"max_vocab": 0}, r"max_vocab must be a positive integer"),
    ({"max_vocab": True}, r"max_vocab must be a positive integer"),
    ({"max_vocab": {"item_id": -3}}, r"max_vocab\['item_id'\] must be a positive integer"),
    ({"max_vocab": {"nope": 3}}, r"max_vocab names 'nope'"),
    ({"max_vocab": {"user_id": 3}, "hash_buckets": {"user_id": 8}}, r"max_vocab names 'user_id', which is hashed"),
    ({"min_count": {"user_id": 3}, "hash_buckets": {"user_id": 8}}, r"min_count names 'user_id', which is hashed"),
])
def test_settings_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        PrepareSettings(sparse=["user_id", "item_id"], sequence=None, **kw)


def test_sequence_features_can_be_hashed_and_hydra_style_values_are_accepted():
    from omegaconf import OmegaConf

    s = PrepareSettings(sparse=["user_id", "item_id", "cat"], sequence=SequenceSpec(side=["cat"]),
                        hash_buckets=OmegaConf.create({"cat": 4}), max_vocab=OmegaConf.create({"item_id": 9}))
    assert s.hash_buckets == {"cat": 4} and type(s.hash_buckets) is dict and s.max_vocab == {"item_id": 9}
    assert PrepareSettings(sparse=["user_id"], hash_buckets=None).hash_buckets == {}


def test_visual_init_refuses_a_hashed_item_id():
    from ctr.models.visual import vocab_item_rows

    with pytest.raises(ValueError, match="item_id is hashed into 64 buckets"):
        vocab_item_rows({"path": "/nonexistent", "settings": {"hash_buckets": {"item_id": 64}}})


# ---- embedding backends ----------------------------------------------------------------------
def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown embedding_backend 'nope'"):
        make_embedding("nope", {"a": 3}, 2)


def test_torchrec_backend_without_torchrec_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchrec", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install --no-deps fbgemm-gpu-cpu==1\.8\.0 torchrec==1\.8\.0"):
        make_embedding("torchrec", {"a": 3}, 2)


def ids_batch(gen: torch.Generator, b: int = 6, l: int = 5) -> dict:
    hist = torch.randint(0, 11, (b, l), generator=gen)
    hist[1] = 0  # an empty history
    hist[2, 3:] = 0
    return {"a": torch.randint(1, 11, (b,), generator=gen), "b": torch.randint(0, 7, (b,), generator=gen),
            "hist.a": hist}


def test_torchrec_backend_equals_plain_forward_and_gradients():
    pytest.importorskip("torchrec")
    from ctr.models.embedding import TorchRecEmbedding

    sizes, aliases = {"a": 11, "b": 7}, {"hist.a": "a"}
    torch.manual_seed(3)
    plain = FeatureEmbedding(sizes, 8, 0.1, aliases)
    torch.manual_seed(3)
    trec = TorchRecEmbedding(sizes, 8, 0.1, aliases)
    for n in sizes:  # the same seed draws the same tables; row 0 (padding) is zero
        assert torch.equal(plain.weight(n), trec.weight(n)) and not plain.weight(n)[0].any()
    torch.manual_seed(4)  # and given the same weights (copied from other draws), the same function
    other = FeatureEmbedding(sizes, 8, 0.5, aliases)
    trec.load_state_dict({f"tables.embeddings.{n}.weight": other.weight(n).detach() for n in sizes})
    plain.load_state_dict(other.state_dict())
    assert [n for n, _ in trec.named_parameters()] == ["tables.embeddings.a.weight", "tables.embeddings.b.weight"]
    ids = ids_batch(torch.Generator().manual_seed(0))
    out_p, out_t = plain.lookup(ids), trec.lookup(ids)
    assert set(out_t) == set(ids) and out_t["hist.a"].shape == (6, 5, 8)
    for n in ids:
        torch.testing.assert_close(out_t[n], out_p[n], rtol=0, atol=0)
        torch.testing.assert_close(trec(n, ids[n]), out_p[n], rtol=0, atol=0)
    assert not out_t["hist.a"][1].any()  # padding embeds to zeros
    w = {n: torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for n, o in out_p.items()}
    sum((o * w[n]).sum() for n, o in out_p.items()).backward()
    sum((o * w[n]).sum() for n, o in out_t.items()).backward()
    for n in sizes:
        assert plain.weight(n).grad.abs().sum() > 0
        torch.testing.assert_close(trec.weight(n).grad, plain.weight(n).grad)
        assert not trec.weight(n).grad[0].any()  # padding gets no gradient
    with pytest.raises(ValueError, match="same batch size"):
        trec.lookup({"a": torch.ones(3, dtype=torch.long), "b": torch.ones(4, dtype=torch.long)})
    with pytest.raises(KeyError, match="no embedding table"):
        trec.lookup({"c": torch.ones(3, dtype=torch.long)})


def _copy_into_torchrec(src: CTRModel, dst: CTRModel) -> None:
    """Load a plain-backend model's state into a TorchRec-backend one (table names differ)."""
    state = {}
    for k, v in src.state_dict().items():
        for part in ("embedding.tables.", "wide.tables."):
            if k.startswith(part):
                k = k.replace(part, part + "embeddings.")
        state[k] = v
    dst.load_state_dict(state)


@pytest.mark.parametrize("share", [True, False])
def test_ctr_model_with_torchrec_backend_trains_like_plain(tiny_sim, share):
    pytest.importorskip("torchrec")
    store = TensorStore(tiny_sim.split_dir("train"))
    batch = store[torch.nonzero(store.seq_len > 0).squeeze(1)[:48]]
    batch.seq_len[0] = 0  # and one empty history
    kw = dict(embedding_dim=8, sequence=functools.partial(TargetAttention, hidden=[16, 8]), over_hidden=[16],
              wide=True, share_history_tables=share)
    torch.manual_seed(0)
    plain = CTRModel(tiny_sim.meta, **kw)
    torch.manual_seed(1)
    trec = CTRModel(tiny_sim.meta, embedding_backend="torchrec", **kw)
    _copy_into_torchrec(plain, trec)
    emb = [n for n, _ in trec.named_parameters() if ".tables." in n]  # the embedding weight-decay group
    assert len(emb) == len(tiny_sim.meta["vocab_sizes"]) * 2 + (0 if share else 2)
    for m in (plain, trec):
        m.train()
    torch.testing.assert_close(trec(batch), plain(batch))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, trec)]
    before = plain(batch).detach()
    for m, opt in zip((plain, trec), opts):  # one training step each
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(m(batch), batch.label).backward()
        opt.step()
    tables = plain.embedding.tables
    item = "item_id" if share else "hist__item_id"
    torch.testing.assert_close(trec.embedding.weight(item), tables[item].weight)
    torch.testing.assert_close(trec.wide.weight("user_id"), plain.wide.tables["user_id"].weight)
    for m in (plain, trec):
        m.eval()
    after = plain(batch)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(trec(batch), after)


def test_ctr_model_dnn_with_torchrec_backend_matches_plain(tiny_sim):
    pytest.importorskip("torchrec")
    batch = TensorStore(tiny_sim.split_dir("val"))[torch.arange(40)]
    torch.manual_seed(0)
    plain = CTRModel(tiny_sim.meta, embedding_dim=4, sequence=MeanPooling, over_hidden=[8]).eval()
    torch.manual_seed(0)  # the same seed gives the same model
    trec = CTRModel(tiny_sim.meta, embedding_dim=4, sequence=MeanPooling, over_hidden=[8],
                    embedding_backend="torchrec").eval()
    torch.testing.assert_close(trec(batch), plain(batch))


def test_config_selects_torchrec_and_hashing_end_to_end(tmp_path):
    """The Hydra path: model.embedding_backend=torchrec, hashed and capped ids, one Lightning step;
    the TorchRec tables are in the optimiser's embedding weight-decay group."""
    pytest.importorskip("torchrec")
    import json
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import open_dict

    from ctr.models.embedding import TorchRecEmbedding
    from ctr.module import CTRModule
    from ctr.runs import compose_config
    from ctr.train import train

    conf = Path(__file__).resolve().parents[1] / "conf"
    cfg = compose_config(conf, ["experiment=sim_din", "trainer.fast_dev_run=true", "logger=csv",
                                "model.embedding_backend=torchrec", "+data.settings.hash_buckets={user_id:64}",
                                "+data.settings.max_vocab={item_id:50}"],
                         run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", embeddings_dir=tmp_path / "emb")
    with open_dict(cfg):
        cfg.data.source.preset = "tiny"
    metrics = train(cfg)
    assert 0 < metrics["val"]["auc"] < 1
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["vocab_sizes"]["user_id"] == 66 and meta["sparse"]["user_id"]["hashed"] == 64
    assert meta["vocab_sizes"]["item_id"] == 52
    model = instantiate(cfg.model, _convert_="all")(meta=meta)
    assert isinstance(model.embedding, TorchRecEmbedding)
    opt = CTRModule(model, embedding_weight_decay=0.5).configure_optimizers()
    emb_group = opt.param_groups[0]
    assert emb_group["weight_decay"] == 0.5
    assert {id(p) for p in emb_group["params"]} == {id(model.embedding.weight(n)) for n in meta["vocab_sizes"]}


# ---- sharded (DistributedModelParallel, gloo, 2 CPU processes) ------------------------------
def _sharded_worker(rank: int, world: int, port: int) -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from ctr.models.embedding import TorchRecEmbedding, shard_embeddings

    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        sizes, aliases, lr = {"a": 11, "b": 7}, {"hist.a": "a"}, 0.1
        for sharding in ("table_wise", "row_wise"):
            torch.manual_seed(3)  # every rank builds the same tables
            plain = FeatureEmbedding(sizes, 4, 0.1, aliases)
            torch.manual_seed(5)  # other draws, replaced by the plain tables' weights
            trec = TorchRecEmbedding(sizes, 4, 0.1, aliases)
            trec.load_state_dict({f"tables.embeddings.{n}.weight": plain.weight(n).detach() for n in sizes})
            model = shard_embeddings(trec, sharding_type=sharding,
                                     fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})
            assert type(model).__name__ == "DistributedModelParallel", type(model)
            shards = {n: model.state_dict()[f"tables.embeddings.{n}.weight"].local_shards() for n in sizes}
            if sharding == "row_wise":  # every rank holds a slice of every table
                assert all(len(s) == 1 and s[0].metadata.shard_sizes[0] < sizes[n] for n, s in shards.items())
            else:  # each table lives on one rank
                assert sum(len(s) for s in shards.values()) == 1
            batches = [ids_batch(torch.Generator().manual_seed(10 + r)) for r in range(world)]
            out = model.module.lookup(batches[rank])
            ref = plain.lookup(batches[rank])
            for n in ref:
                torch.testing.assert_close(out[n], ref[n], rtol=0, atol=0, msg=f"{sharding} rank {rank} {n}")
            w = {n: torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for n, o in ref.items()}
            sum((o * w[n]).sum() for n, o in out.items()).backward()  # the fused SGD step
            for b in batches:  # the plain gradient of every rank's batch
                sum((o * w[n]).sum() for n, o in plain.lookup(b).items()).backward()
            for n in sizes:
                expected = plain.weight(n).detach() - lr * plain.weight(n).grad / world  # mean over ranks
                for s in model.state_dict()[f"tables.embeddings.{n}.weight"].local_shards():
                    rows = slice(s.metadata.shard_offsets[0], s.metadata.shard_offsets[0] + s.metadata.shard_sizes[0])
                    torch.testing.assert_close(s.tensor, expected[rows], msg=f"{sharding} rank {rank} {n} update")
                    moved = plain.weight(n).grad[rows].any(1)  # the rows that some rank looked up
                    assert moved.any() and not torch.isclose(s.tensor[moved], plain.weight(n).detach()[rows][moved]).all()
            del model, out, shards, s  # the sharded modules hold the group: they go before it


def test_sharded_torchrec_tables_equal_plain_on_cpu():
    """Two gloo processes, table- and row-wise sharding (fused kernel, EXACT_SGD): lookups equal
    the plain tables', and the fused update equals -lr x the plain gradient averaged over ranks."""
    pytest.importorskip("torchrec")
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, free_port()), nprocs=2, join=True)


def test_shard_embeddings_without_a_process_group_is_a_no_op():
    pytest.importorskip("torchrec")
    from ctr.models.embedding import TorchRecEmbedding, shard_embeddings

    m = TorchRecEmbedding({"a": 3}, 2)
    assert shard_embeddings(m) is m
