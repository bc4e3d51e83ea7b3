"""Model parts: the fused target attention equals DIN's plain formula; masks; Batch handling."""

import functools

import pytest
import torch
from torch import nn

from ctr.data.batch import Batch, TensorStore
from ctr.models import CTRModel, Dice, MeanPooling, TargetAttention
from ctr.models.parts import HistoryTable


def reference_din_scores(att: TargetAttention, q, k, mask):
    """DIN's local activation unit written the plain way: MLP([q, k, q-k, q*k])."""
    x = torch.cat([q[:, None].expand_as(k), k, q[:, None] - k, q[:, None] * k], -1)
    h = att.first_act(att.first(x))
    return att.rest(h).squeeze(-1) * mask


@pytest.mark.parametrize("act", ["prelu", "dice", "relu"])
def test_fused_target_attention_matches_reference(act):
    torch.manual_seed(0)
    att = TargetAttention(8, [16, 4], act=act).eval()
    q, k = torch.randn(5, 8), torch.randn(5, 7, 8)
    mask = torch.arange(7)[None] < torch.tensor([0, 1, 3, 7, 5])[:, None]
    ref = reference_din_scores(att, q, k, mask)
    torch.testing.assert_close(att.scores(q, k, mask), ref, rtol=1e-5, atol=1e-6)
    out = att(q, k, mask)
    torch.testing.assert_close(out, (ref[..., None] * k).sum(1), rtol=1e-5, atol=1e-6)
    assert out[0].abs().sum() == 0  # an empty history pools to zero


@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_packed_attention_equals_the_padded_grid(normalize):
    """pack=True (only the real history items go through the unit) is the same function, with the
    same gradients, as the padded grid (ReLU: no batch statistics, which packing changes)."""
    torch.manual_seed(0)
    grid = TargetAttention(8, [16, 4], act="relu", normalize=normalize, pack=False)
    packed = TargetAttention(8, [16, 4], act="relu", normalize=normalize, pack=True)
    packed.load_state_dict(grid.state_dict())
    q, k = torch.randn(5, 8, requires_grad=True), torch.randn(5, 7, 8, requires_grad=True)
    mask = torch.arange(7)[None] < torch.tensor([0, 1, 3, 7, 5])[:, None]
    bias = torch.randn(5, 7)
    torch.testing.assert_close(packed.scores(q, k, mask, bias), grid.scores(q, k, mask, bias))
    out_grid = grid(q, k, mask)
    pos = mask.reshape(-1).nonzero().squeeze(1)
    out_packed = packed.forward_packed(q, k.reshape(35, 8)[pos], pos, (5, 7))
    torch.testing.assert_close(out_packed, out_grid)
    g_grid = torch.autograd.grad(out_grid.square().sum(), [q, k, grid.first.weight])
    g_packed = torch.autograd.grad(out_packed.square().sum(), [q, k, packed.first.weight])
    for a, b in zip(g_packed, g_grid):
        torch.testing.assert_close(a, b)


def _history_tables(dtype=torch.float64):
    """Three sequence features (widths 4, 3, 2) over a [5, 7] history grid with 19 real items, one
    per branch of :meth:`TargetAttention.forward_tables`: 40 rows (more than the packed rows: keys
    gathered, key term and pooling as products), 10 rows (key term as a table, pooling by
    gather), 3 rows shared by target and history (a table of pairs, pooling by histogram).
    Returns the leaf tables, the ``HistoryTable`` features, the query [5, 9], the gathered packed
    keys [19, 9] (``forward_packed``'s input) and the packed positions."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(7)[None] < torch.tensor([0, 1, 6, 7, 5])[:, None]
    names = ("item", "brand", "genre")
    tables = {}
    for name, v, d in (("item", 40, 4), ("brand", 10, 3), ("genre", 3, 2)):
        tables[name] = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    tables["query_item"] = torch.randn(40, 4, generator=g, dtype=dtype).requires_grad_()
    tables["query_brand"] = torch.randn(12, 3, generator=g, dtype=dtype).requires_grad_()
    seq = {n: torch.randint(1, tables[n].shape[0], (5, 7), generator=g) for n in names}
    target = {n: torch.randint(1, tables[n].shape[0], (5,), generator=g) for n in names}
    qt = {"item": tables["query_item"], "brand": tables["query_brand"], "genre": tables["genre"]}
    pos = mask.reshape(-1).nonzero().squeeze(1)
    ids = {n: seq[n].reshape(-1)[pos] for n in names}
    feats = [HistoryTable(tables[n], ids[n], qt[n], target[n]) for n in names]
    query = torch.cat([qt[n][target[n]] for n in names], 1)
    keys = torch.cat([tables[n][ids[n]] for n in names], 1)
    return tables, feats, query, keys, pos


@pytest.mark.parametrize("normalize", ["none", "softmax"])
def test_table_space_attention_equals_packed(normalize):
    """forward_tables (the first layer in table space, pairs and histograms for small tables) is
    forward_packed's function with its gradients, on every branch, Dice's batch statistics included."""
    torch.manual_seed(0)
    packed = TargetAttention(9, [16, 4], act="dice", normalize=normalize).double().train()
    tabled = TargetAttention(9, [16, 4], act="dice", normalize=normalize).double().train()
    tabled.load_state_dict(packed.state_dict())
    assert tabled.takes_tables and not TargetAttention(9, pack=False).takes_tables
    tables, feats, query, keys, pos = _history_tables()
    assert len(pos) == 19
    ref = packed.forward_packed(query, keys, pos, (5, 7))
    out = tabled.forward_tables(query, feats, pos, (5, 7))
    tol = dict(rtol=1e-5, atol=1e-6)  # the unit's raw scores are float32 in both (one rounding of h apart)
    torch.testing.assert_close(out, ref, **tol)
    assert out[0].abs().sum() == 0  # the empty history pools to zero
    leaves = [*tables.values(), *packed.parameters()]
    g_ref = torch.autograd.grad(ref.square().sum(), leaves, allow_unused=True, retain_graph=True)  # shares query
    leaves = [*tables.values(), *tabled.parameters()]
    g_out = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(tabled.first_act.running_mean, packed.first_act.running_mean)
    with pytest.raises(ValueError, match="widths"):
        tabled.forward_tables(query, feats[:2], pos, (5, 7))


@pytest.mark.parametrize("lengths", [[0, 0, 0], [0, 1, 0]], ids=["no-history", "one-item"])
def test_table_space_attention_on_empty_and_single_item_histories(lengths):
    """No history item in the batch (M = 0) pools to zeros; one item (Dice's single-row branch)
    equals the packed path; both have the packed path's gradients."""
    torch.manual_seed(0)
    att = TargetAttention(6, [8, 4], act="dice", normalize="softmax").train()
    items, genres = torch.randn(10, 4, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    pos = mask.reshape(-1).nonzero().squeeze(1)
    q, g = torch.randint(1, 10, (3,)), torch.randint(1, 3, (3,))
    ids, gids = torch.randint(1, 10, (len(pos),)), torch.randint(1, 3, (len(pos),))
    feats = [HistoryTable(items, ids, items, q), HistoryTable(genres, gids, genres, g)]
    query = torch.cat([items[q], genres[g]], 1)
    out = att.forward_tables(query, feats, pos, (3, 5))
    ref = att.forward_packed(query, torch.cat([items[ids], genres[gids]], 1), pos, (3, 5))
    torch.testing.assert_close(out, ref)
    assert (out.abs().sum(1) > 0).tolist() == [n > 0 for n in lengths]
    g_out = torch.autograd.grad(out.square().sum(), (items, genres), retain_graph=True)  # shares query
    g_ref = torch.autograd.grad(ref.square().sum(), (items, genres))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


def test_table_space_attention_under_bf16_is_close():
    torch.manual_seed(0)
    ref = TargetAttention(9, [16, 4], act="dice", normalize="softmax")
    bf = TargetAttention(9, [16, 4], act="dice", normalize="softmax", unit_precision="bf16")
    bf.load_state_dict(ref.state_dict())
    tables, feats, query, _, pos = _history_tables(torch.float32)
    a, b = ref.forward_tables(query, feats, pos, (5, 7)), bf.forward_tables(query, feats, pos, (5, 7))
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, atol=5e-2, rtol=5e-2)
    b.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in tables.values())


@pytest.mark.parametrize("pack", [True, False])
def test_bf16_attention_unit_is_close_and_keeps_float32_weights(pack):
    torch.manual_seed(0)
    ref = TargetAttention(8, [16, 4], act="dice", normalize="softmax", pack=pack)
    bf = TargetAttention(8, [16, 4], act="dice", normalize="softmax", pack=pack, unit_precision="bf16")
    bf.load_state_dict(ref.state_dict())
    q, k = torch.randn(6, 8), torch.randn(6, 9, 8)
    mask = torch.arange(9)[None] < torch.tensor([0, 2, 9, 5, 1, 7])[:, None]
    w_ref, w_bf = ref.scores(q, k, mask), bf.scores(q, k, mask)
    assert w_bf.dtype == torch.float32 and not torch.equal(w_bf, w_ref)  # bf16 did run
    torch.testing.assert_close(w_bf, w_ref, atol=2e-2, rtol=0)  # bf16: ~3 significant digits
    bf(q, k, mask).sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in bf.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unit_precision"):
        TargetAttention(8, unit_precision="fp8")


def test_dice_trains_on_a_single_row_and_outer_autocast_reaches_the_unit():
    att = TargetAttention(4, [8], act="dice", pack=True).train()
    q, k = torch.randn(2, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False]])  # one real history item
    out = att(q, k, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert Dice(3).train()(torch.randn(1, 3)).shape == (1, 3)
    # unit_precision "32" leaves an outer autocast (the trainer's bf16-mixed) in force
    seen = []
    hook = att.rest.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        att.eval()(q, torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    hook.remove()
    assert seen == [torch.bfloat16]


def test_packed_ctr_model_equals_padded(tiny_sim):
    """The model's packed path (history embedded only where it is real) gives the padded path's
    logits and parameter gradients."""
    batch = TensorStore(tiny_sim.split_dir("train"))[torch.arange(64)]
    assert (batch.seq_len < batch.seq["item_id"].shape[1]).any()  # some padding to skip
    models = []
    for pack, tables in ((False, False), (True, False), (True, True)):  # padded, packed, table space
        torch.manual_seed(0)
        seq = functools.partial(TargetAttention, hidden=[16, 8], act="relu", pack=pack, tables=tables)
        models.append(CTRModel(tiny_sim.meta, embedding_dim=8, sequence=seq, over_hidden=[16]))
    assert [m._tables for m in models] == [False, False, True]
    ref = models[0]
    ref(batch).sum().backward()
    for m in models[1:]:
        torch.testing.assert_close(m(batch), ref(batch))
        m(batch).sum().backward()
        for (name, pa), pb in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_softmax_attention_ignores_padding():
    torch.manual_seed(0)
    att = TargetAttention(4, [8], act="relu", normalize="softmax")
    q, k = torch.randn(2, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w = att.scores(q, k, mask)
    assert torch.allclose(w[0].sum(), torch.tensor(1.0)) and w[0, 2] == 0 and (w[1] == 0).all()


def test_mean_pooling_is_masked_mean():
    k = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(MeanPooling(4)(None, k, mask), k[0, :2].mean(0, keepdim=True))


def test_dice_running_stats():
    torch.manual_seed(0)
    d = Dice(3)
    x = torch.randn(64, 10, 3) * 2 + 1
    d.train()
    y = d(x)
    p = torch.sigmoid((x - x.mean((0, 1))) / x.reshape(-1, 3).std(0, unbiased=False))
    torch.testing.assert_close(y, p * x, rtol=1e-4, atol=1e-5)  # alpha starts at 0
    d.eval()
    assert torch.isfinite(d(x)).all()
    assert torch.allclose(d.running_mean, 0.1 * x.reshape(-1, 3).mean(0), atol=1e-5)


def test_ctr_model_on_prepared_batch(tiny_sim):
    store = TensorStore(tiny_sim.split_dir("train"))
    batch = store[torch.arange(32)]
    assert isinstance(batch, Batch) and len(batch) == 32
    assert batch.seq["item_id"].shape == (32, 20) and batch.seq_len.shape == (32,)
    for seq in (functools.partial(TargetAttention, hidden=[16, 8]), MeanPooling, None):
        torch.manual_seed(0)
        m = CTRModel(tiny_sim.meta, embedding_dim=8, sequence=seq, over_hidden=[16])
        logits = m(batch)
        assert logits.shape == (32,) and torch.isfinite(logits).all()
        nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    moved = batch.to("cpu")
    assert torch.equal(moved.sparse["item_id"], batch.sparse["item_id"])


def test_prior_bias_starts_at_the_train_ctr(tiny_sim):
    store = TensorStore(tiny_sim.split_dir("train"))
    batch = store[torch.arange(256)]
    torch.manual_seed(0)
    m = CTRModel(tiny_sim.meta, embedding_dim=8, sequence=MeanPooling, over_hidden=[16], prior_bias=True)
    m.eval()
    p = torch.sigmoid(m(batch)).mean().item()
    ctr = tiny_sim.meta["splits"]["train"]["ctr"]
    assert abs(p - ctr) < 0.2 * ctr  # the tiny initial weights move it a little
    m0 = CTRModel(tiny_sim.meta, embedding_dim=8, sequence=MeanPooling, over_hidden=[16]).eval()
    assert abs(torch.sigmoid(m0(batch)).mean().item() - 0.5) < 0.1


def test_id_dropout_trains_the_oov_row(tiny_sim):
    store = TensorStore(tiny_sim.split_dir("train"))
    batch = store[torch.arange(256)]
    m = CTRModel(tiny_sim.meta, embedding_dim=4, sequence=None, over_hidden=[8], id_dropout={"user_id": 1.0})
    m.train()
    m(batch).sum().backward()
    grad = m.embedding.tables["user_id"].weight.grad
    assert grad[1].abs().sum() > 0 and grad[2:].abs().sum() == 0  # every id hidden as OOV
    m.eval()
    with pytest.raises(ValueError, match="unknown sparse features"):
        CTRModel(tiny_sim.meta, id_dropout={"nope": 0.1})


def test_sequence_feature_must_be_a_target_feature(tiny_sim):
    meta = dict(tiny_sim.meta, sparse={k: v for k, v in tiny_sim.meta["sparse"].items() if k != "category"})
    with pytest.raises(ValueError, match="category"):
        CTRModel(meta, sequence=MeanPooling)


def test_memory_mapped_store_equals_in_memory(tiny_sim):
    a = TensorStore(tiny_sim.split_dir("val"), in_memory=True)
    b = TensorStore(tiny_sim.split_dir("val"), in_memory=False)
    idx = torch.tensor([5, 0, 17, 3])
    x, y = a[idx], b[idx]
    assert torch.equal(x.label, y.label) and torch.equal(x.seq["category"], y.seq["category"])
    assert torch.equal(x.extra["true_ctr"], y.extra["true_ctr"]) and len(a) == len(b)


def test_wide_term_and_length_feature(tiny_sim):
    store = TensorStore(tiny_sim.split_dir("train"))
    batch = store[torch.arange(64)]
    torch.manual_seed(0)
    base = CTRModel(tiny_sim.meta, embedding_dim=4, sequence=MeanPooling, over_hidden=[8], wide=True,
                    length_feature=True).eval()
    assert base.over.net[0].in_features == 4 * len(tiny_sim.meta["sparse"]) + 8 + 1
    out = base(batch)
    with torch.no_grad():  # the wide term is added to the logit: one scalar per id
        base.wide.tables["item_id"].weight.add_(1.0)
    torch.testing.assert_close(base(batch), out + 1.0)
    before = base(batch)
    with torch.no_grad():  # the last over-arch input is log1p(history length) / log1p(max_len)
        base.over.net[0].weight[:, -1] = 0
    assert (batch.seq_len > 0).any() and not torch.equal(base(batch), before)


def test_history_tables_can_be_separate(tiny_sim):
    store = TensorStore(tiny_sim.split_dir("train"))
    batch = store[torch.nonzero(store.seq_len > 0).squeeze(1)[:32]]  # events with a history
    m = CTRModel(tiny_sim.meta, embedding_dim=4, sequence=MeanPooling, share_history_tables=False)
    assert {"hist__item_id", "hist__category"} <= set(m.embedding.tables)
    m(batch).sum().backward()
    assert m.embedding.tables["hist__item_id"].weight.grad.abs().sum() > 0
    shared = CTRModel(tiny_sim.meta, embedding_dim=4, sequence=MeanPooling)
    assert not any(n.startswith("hist__") for n in shared.embedding.tables)
