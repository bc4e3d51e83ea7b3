"""Image-aware CTR parts: the aligned frozen table, the modes, attention bias, SimTier, query features,
the debiasing network and its pairs, the position tower, low-impression slices."""

import functools

import numpy as np
import polars as pl
import pytest
import torch

from ctr.data.batch import TensorStore
from ctr.data.contract import ContractError
from ctr.models import CTRModel, TargetAttention
from ctr.models.ctr_model import PositionTower
from ctr.models.visual import (build_visual_arch, debias_pairs, load_item_vectors, pair_cosine_stats,
                               vocab_item_rows)
from encoders.export import write_table


def _meta(art):
    return {**art.meta, "path": str(art.path)}


def _model(art, sim_table, **visual):
    d, fp = sim_table
    vis = functools.partial(build_visual_arch, table=fp, embeddings_dir=str(d), **visual)
    seq = functools.partial(TargetAttention, hidden=[16])
    return CTRModel(_meta(art), embedding_dim=8, sequence=seq, over_hidden=[16], visual=vis)


def _batch(art, split="train", n=64):
    return TensorStore(art.split_dir(split))[torch.arange(n)]


def test_table_is_aligned_to_item_rows(tiny_sim, sim_table):
    d, fp = sim_table
    vec, side = load_item_vectors(fp, d, _meta(tiny_sim))
    items = pl.read_parquet(tiny_sim.path / "items.parquet")
    exported = pl.read_parquet(d / f"item_embeddings-{fp}.parquet")
    by_id = dict(zip(exported["item_id"].to_list(), exported["embedding"].to_numpy()))
    assert vec.shape == (items.height + 1, 16) and torch.all(vec[0] == 0)
    for item_id, row in zip(items["item_id"].to_list()[:20], items["row"].to_list()[:20]):
        assert np.allclose(vec[row].numpy(), by_id[item_id])
    # a path works as well as a fingerprint
    vec2, _ = load_item_vectors(str(d / f"item_embeddings-{fp}.parquet"), None, _meta(tiny_sim))
    assert torch.equal(vec, vec2)


def test_table_errors_name_the_file(tiny_sim, sim_table, tmp_path):
    d, fp = sim_table
    exported = pl.read_parquet(d / f"item_embeddings-{fp}.parquet")
    ids, emb = exported["item_id"].to_numpy(), exported["embedding"].to_numpy()
    write_table(ids[1:], emb[1:], tmp_path, "missingone000000")
    with pytest.raises(ContractError, match=r"item_embeddings-missingone000000.parquet.*1 of 200 items"):
        load_item_vectors("missingone000000", tmp_path, _meta(tiny_sim))
    with pytest.raises(FileNotFoundError, match="no embedding table"):
        load_item_vectors("nosuchtable00000", tmp_path, _meta(tiny_sim))
    # an encoder post-trained on clicks of another split (or another simulation) is refused
    src = {"source": "sim", "preset": "tiny", "seed": 0, "overrides": {}}
    write_table(ids, emb, tmp_path, "othersplit000000",
                {"items": {**src, "click_split": {"fractions": [0.9, 0.05, 0.05], "order": ["timestamp"]}}})
    with pytest.raises(ValueError, match="test clicks may have been"):
        load_item_vectors("othersplit000000", tmp_path, {**_meta(tiny_sim), "source_config": src})
    write_table(ids, emb, tmp_path, "otherseed0000000",
                {"items": {**src, "seed": 1, "click_split": {"fractions": [0.8, 0.1, 0.1],
                                                             "order": ["timestamp", "request_id", "position"]}}})
    with pytest.raises(ValueError, match="clicks come from"):
        load_item_vectors("otherseed0000000", tmp_path, {**_meta(tiny_sim), "source_config": src})


@pytest.mark.parametrize("mode", ["sum", "concat", "init", "none"])
def test_every_mode_trains(tiny_sim, sim_table, mode):
    torch.manual_seed(0)
    model = _model(tiny_sim, sim_table, mode=mode, tiers=4, query="query_item_id")
    b = _batch(tiny_sim)
    logits = model(b)
    assert logits.shape == (64,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, b.label).backward()
    assert model.visual.table.grad is None  # frozen
    assert model.visual.query_proj.weight.grad is not None
    if mode in ("sum", "concat"):
        assert model.visual.proj.weight.grad.abs().sum() > 0
    # an item never seen in train has the OOV id but keeps its own vector
    oov = (b.sparse["item_id"] == 1) & (b.refs["item_id"] > 0)
    if oov.any():
        assert model.visual.vectors(b.refs["item_id"][oov]).norm(dim=-1).min() > 0.99


def test_init_mode_starts_the_id_table_from_the_vectors(tiny_sim, sim_table):
    torch.manual_seed(0)
    model = _model(tiny_sim, sim_table, mode="init", attention_bias=False)
    w = model.embedding.tables["item_id"].weight.detach()
    rows = vocab_item_rows(_meta(tiny_sim))
    have = rows > 0
    assert have.sum() > 50 and not have[:2].any()
    # rows of items with equal vectors would be equal; here: the init is a linear map of the vectors
    v = model.visual.table[rows[have]]
    x = torch.linalg.lstsq(torch.cat([v, torch.ones(len(v), 1)], 1), w[have]).solution
    fit = torch.cat([v, torch.ones(len(v), 1)], 1) @ x
    assert torch.allclose(fit, w[have], atol=1e-4)
    assert 0.005 < float(w[have].std()) < 0.02  # the table's own scale (init_std 0.01)
    assert model.visual.proj is None


def test_attention_bias_adds_to_the_scores():
    torch.manual_seed(0)
    att = TargetAttention(4, hidden=[8], act="relu")
    q, k = torch.randn(3, 4), torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    bias = torch.randn(3, 5)
    assert torch.allclose(att.scores(q, k, mask, bias), (att.scores(q, k, mask) + bias) * mask)


@pytest.mark.parametrize("standardize", [False, True])
def test_simtier_and_query_features(tiny_sim, sim_table, standardize):
    model = _model(tiny_sim, sim_table, tiers=5, query="query_item_id", standardize=standardize)
    vis = model.visual
    mu, sd = (vis.sim_stats["mean"], vis.sim_stats["std"]) if standardize else (0.0, 1.0)
    lo, hi = (-3, 3) if standardize else (-1, 1)  # the tiers' range, in the model's scale
    b = _batch(tiny_sim, "test", 128)
    v_t = vis.vectors(b.refs["item_id"])
    v_h = vis.vectors(b.refs["hist.item_id"])
    mask = b.refs["hist.item_id"] > 0
    sim = vis.similarity(v_t, v_h, mask)
    f = vis.features(b, v_t, sim, mask).detach()
    assert f.shape == (128, vis.out_dim) == (128, 5 + 8 + 1)
    tiers = f[:, :5]
    has = b.seq_len > 0
    assert torch.allclose(tiers[has].sum(1), torch.ones(int(has.sum())))
    assert torch.all(tiers[~has] == 0)
    # a row's tiers count its history items' similarities, brute force
    for i in torch.nonzero(has)[:5, 0].tolist():
        s = [(float(v_t[i] @ v_h[i, j]) - mu) / sd for j in range(int(b.seq_len[i]))]
        counts = np.histogram(np.clip(s, lo, hi), bins=5, range=(lo, hi))[0] / len(s)
        assert np.allclose(tiers[i].numpy(), counts, atol=1e-6)
    # the query's cosine to the candidate, on the same scale
    vq = vis.vectors(b.refs["query_item_id"])
    assert torch.allclose(f[:, -1], ((vq * v_t).sum(-1) - mu) / sd, atol=1e-4)
    # and the attention bias
    assert torch.allclose(vis.attention_bias(sim), (sim - mu) / sd, atol=1e-5)


def test_pair_cosine_stats_are_those_of_every_pair():
    torch.manual_seed(0)
    v = torch.cat([torch.zeros(1, 16), torch.randn(300, 16) + 0.5])
    v[7] *= 40  # lengths do not matter: cosines
    u = torch.nn.functional.normalize(v[1:].double(), dim=-1)
    c = (u @ u.T)[~torch.eye(300, dtype=torch.bool)]
    mu, sd = pair_cosine_stats(v)
    assert float(mu) == pytest.approx(float(c.mean()), abs=1e-9)
    assert float(sd) == pytest.approx(float(c.std(unbiased=False)), abs=1e-9)
    assert float(mu) > 0.1  # the common offset shows
    with pytest.raises(ValueError, match="at least 2 items"):
        pair_cosine_stats(v[:2])


def test_standardisation_follows_the_debiased_table(tiny_sim, sim_table):
    model = _model(tiny_sim, sim_table, debias={"hidden": [16], "scope": "all"})
    vis = model.visual
    assert vis.sim_stats["follows_debias"]
    frozen = pair_cosine_stats(vis.table)
    tabs = vis.tables()
    assert [float(tabs.mu), float(tabs.sigma)] == pytest.approx([float(x) for x in frozen], abs=1e-5)  # starts at the identity
    with torch.no_grad():  # the network moves the vectors: the scale moves with them
        vis.debias.mlp.net[-1].bias.normal_(0, 0.2)
        tabs = vis.tables()
    t, mu, sd = tabs.items, tabs.mu, tabs.sigma
    assert float(mu) == pytest.approx(float(pair_cosine_stats(t)[0]), abs=1e-5)
    assert abs(float(mu) - float(frozen[0])) > 0.01
    sim = torch.rand(4, 6) * 2 - 1
    assert torch.allclose(vis.attention_bias(sim, tabs), (sim - mu) / sd, atol=1e-5)
    assert tabs.sims is tabs.items  # scope all: the similarities read the adjusted vectors


def test_debias_scope_features_leaves_the_similarities_to_the_encoder(tiny_sim, sim_table):
    model = _model(tiny_sim, sim_table, tiers=4, query="query_item_id", debias={"hidden": [16]})
    vis = model.visual
    b = _batch(tiny_sim, "test", 64)
    before = model.features(b).detach()
    with torch.no_grad():  # the network moves the vectors
        vis.debias.mlp.net[-1].bias.normal_(0, 0.2)
        t = vis.item_table()
    after = model.features(b).detach()
    assert not torch.allclose(vis.vectors(b.refs["item_id"], t), vis.sim_vectors[b.refs["item_id"]])
    # the similarity features (tiers, the query's cosine: the last column) did not move...
    n = vis.out_dim
    assert torch.equal(after[:, -n:-n + 4], before[:, -n:-n + 4]) and torch.equal(after[:, -1], before[:, -1])
    # ...the query's projected vector (from the adjusted vectors) did
    assert not torch.allclose(after[:, -n + 4:-1], before[:, -n + 4:-1])
    tabs = vis.tables()
    assert [float(tabs.mu), float(tabs.sigma)] == [vis.sim_stats["mean"], vis.sim_stats["std"]]
    with pytest.raises(ValueError, match="scope"):
        _model(tiny_sim, sim_table, debias={"scope": "both"})


def test_debias_pairs_follow_the_rule():
    rng = np.random.default_rng(0)
    n = 60
    v = torch.from_numpy(rng.normal(size=(n + 1, 8)).astype(np.float32))
    v[0] = 0
    imp = rng.integers(0, 100, n)
    group = rng.integers(0, 3, n)
    partner, stats = debias_pairs(v, imp, group, high_quantile=0.8, low_quantile=0.5)
    hi_t, lo_t = np.quantile(imp, 0.8), np.quantile(imp, 0.5)
    vn = torch.nn.functional.normalize(v, dim=-1)
    for r in range(1, n + 1):
        p = int(partner[r])
        if imp[r - 1] >= hi_t and imp[r - 1] > lo_t:
            cands = [c for c in range(1, n + 1) if imp[c - 1] <= lo_t and group[c - 1] == group[r - 1]]
            if not cands:
                assert p == 0
                continue
            best = max(cands, key=lambda c: float(vn[r] @ vn[c]))
            assert p == best
        else:
            assert p == 0
    assert stats["paired"] == int((partner > 0).sum()) > 0


def test_debias_network_learns_to_align_pairs(tiny_sim, sim_table):
    torch.manual_seed(0)
    model = _model(tiny_sim, sim_table, debias={"hidden": [32], "weight": 1.0, "temperature": 0.1})
    vis = model.visual
    assert vis.pair_stats["paired"] > 0
    # starts as the identity (last layer zero)
    rows = torch.arange(1, 11)
    assert torch.allclose(vis.vectors(rows), torch.nn.functional.normalize(vis.table[rows], dim=-1))
    b = _batch(tiny_sim, n=512)
    opt = torch.optim.Adam(vis.debias.parameters(), lr=1e-2)
    first = float(model.aux_loss(b).detach())
    for _ in range(60):
        opt.zero_grad()
        loss = model.aux_loss(b)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    # the vectors come from the adjusted table (once per forward, then looked up): the same vectors
    # and gradients as the definition applied row by row, normalize(debias(v)), row 0 zero
    n = vis.table.shape[0]
    many = torch.randint(0, n, (3, n))
    many[0, :5] = 0
    weights = torch.linspace(-1, 1, vis.table.shape[1])
    grads = []
    for lookup in (lambda r: vis.vectors(r),
                   lambda r: torch.nn.functional.normalize(vis.debias(vis.table[r]), dim=-1) * (r > 0).unsqueeze(-1)):
        vis.debias.zero_grad()
        out = lookup(many)
        (out * weights).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in vis.debias.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and torch.all(grads[0][0][0, :5] == 0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))
    # high-impression items end up closer to their partners than before
    hi = torch.nonzero(vis.partner > 0).squeeze(1)
    before = (torch.nn.functional.normalize(vis.table[hi], dim=-1)
              * torch.nn.functional.normalize(vis.table[vis.partner[hi]], dim=-1)).sum(-1)
    after = (vis.vectors(hi) * vis.vectors(vis.partner[hi])).sum(-1)
    assert after.mean() > before.mean()


def test_position_tower_is_zero_at_the_reference_and_off_at_inference(tiny_sim):
    torch.manual_seed(0)
    seq = functools.partial(TargetAttention, hidden=[16], act="relu")  # no batch statistics
    model = CTRModel(tiny_sim.meta, embedding_dim=8, sequence=seq, over_hidden=[16],
                     position={"feature": "position", "n_positions": 16, "hidden": [4]})
    b = _batch(tiny_sim)
    tower = model.position
    with torch.no_grad():
        tower.embedding.weight.normal_()
    off = tower(b)
    assert torch.all(off[b.extra["position"] == 1] == 0) and off.abs().max() > 0
    model.train()
    with_tower = model(b)
    model.eval()
    no_tower = model(b)
    model.train()
    # dropout is 0: training and inference differ by the tower alone
    assert torch.allclose(with_tower - no_tower, off, atol=1e-5)
    with pytest.raises(ValueError, match="n_positions"):
        PositionTower(n_positions=4)(type(b)(**{**b.__dict__, "extra": {"position": b.extra["position"] * 0 + 9}}))


def test_visual_needs_item_rows(tiny_sim, sim_table):
    meta = {**_meta(tiny_sim), "items": None}
    with pytest.raises(ValueError, match="item_refs"):
        load_item_vectors(sim_table[1], sim_table[0], meta)
