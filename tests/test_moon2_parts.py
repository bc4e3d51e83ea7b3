"""MOON2.0's parts against reference code: MoE routing and weighting, filtering score, the
dual-level losses, co-augmentation, triples and the benchmark's retrieval metric."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders.data import ItemSet
from encoders.moon2.augment import (AttributeEnricher, CallableEnricher, consistency_keep, expand_images)
from encoders.moon2.benchmark import linear_probe, retrieval
from encoders.moon2.data import AugViews, TripleBatches
from encoders.moon2.features import Products, TokenSet
from encoders.moon2.fusion import (DualEncoder, MoEFeedForward, MultimodalEncoder, ObjectiveWeights,
                                   equilibrium_weights)
from encoders.moon2.objectives import (MarginSchedule, filter_weights, inter_product_loss, intra_product_loss,
                                       reliability)


# ------------------------------------------------------------------------------------------ MoE


def test_moe_matches_a_per_token_reference():
    torch.manual_seed(0)
    moe = MoEFeedForward(dim=8, hidden=16, experts=4, top_k=2)
    x = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out, routing = moe(x, mask)
    ref = torch.zeros_like(x)
    probs_all, loads = [], torch.zeros(4)
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                continue
            p = F.softmax(moe.router(x[b, t]), -1)
            probs_all.append(p)
            top = torch.topk(p, 2)
            g = top.values / top.values.sum()
            for gi, e in zip(g, top.indices):
                ref[b, t] += gi * moe.experts[int(e)](x[b, t])
                loads[int(e)] += 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[1, 3:].abs().sum() == 0  # padding untouched
    probs = torch.stack(probs_all)
    n = len(probs_all)
    f = loads / (n * 2)
    torch.testing.assert_close(routing.load, f)
    torch.testing.assert_close(routing.probs, probs.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.balance, 4 * (f * probs.mean(0)).sum(), atol=1e-6, rtol=1e-5)
    ent = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(routing.entropy, ent, atol=1e-6, rtol=1e-5)
    # gradients reach the router through the gates and the balance term
    (out.sum() + routing.balance).backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, 16, experts=2, top_k=3)


def test_objective_weights_reference_and_equilibrium():
    torch.manual_seed(0)
    ow = ObjectiveWeights(experts=3, objectives=["a", "b", "c"], temperature=0.5)
    u = torch.softmax(torch.randn(3, 3), -1)
    with torch.no_grad():
        ow.matrix.copy_(torch.randn(3, 3))
    w = ow(u)
    logits = torch.tensor([float(u[o] @ ow.matrix[:, o].detach()) for o in range(3)])
    torch.testing.assert_close(w, 3 * torch.softmax(logits, 0))
    assert abs(float(w.detach().sum()) - 3) < 1e-5
    # the matrix, as the adversary of the robust objective, reaches w ~ O * softmax(L / lam):
    # more weight on the objective with the larger loss
    losses = torch.tensor([1.0, 1.5, 2.2])
    u = torch.eye(3)  # distinct routing per objective, so every weight is reachable
    opt = torch.optim.Adam(ow.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        ow.adversary_loss(ow(u), losses).backward()
        opt.step()
    torch.testing.assert_close(ow(u).detach(), equilibrium_weights(losses, 0.5), atol=2e-3, rtol=2e-3)
    assert int(ow(u).argmax()) == 2


def test_objective_weights_check_shapes():
    ow = ObjectiveWeights(experts=4, objectives=["a", "b"])
    with pytest.raises(ValueError, match="routing must be"):
        ow(torch.ones(4, 2))


def test_multimodal_encoder_modalities_and_mask():
    torch.manual_seed(0)
    enc = MultimodalEncoder(12, 6, image_tokens=4, text_tokens=5, dim=16, heads=2, embed_dim=8, ffn="moe").eval()
    img, txt = torch.randn(2, 4, 12), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for kw in ({"image": img}, {"text": txt, "text_mask": mask}, {"image": img, "text": txt, "text_mask": mask}):
        e, r = enc(**kw)
        assert e.shape == (2, 8) and r is not None
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    # padding tokens do not change the embedding
    txt2 = txt.clone()
    txt2[0, 3:] = 100.0
    torch.testing.assert_close(enc(text=txt, text_mask=mask)[0], enc(text=txt2, text_mask=mask)[0])
    assert MultimodalEncoder(12, 6, ffn="mlp")(image=img)[1] is None
    with pytest.raises(ValueError, match="needs image tokens"):
        enc()


def test_dual_encoder_multimodal_is_the_normalised_sum():
    torch.manual_seed(0)
    enc = DualEncoder(12, 6, embed_dim=8)
    img, txt = torch.randn(3, 4, 12), torch.randn(3, 5, 6)
    i, t, m = enc(image=img)[0], enc(text=txt)[0], enc(image=img, text=txt)[0]
    torch.testing.assert_close(m, F.normalize(i + t, dim=-1))
    torch.testing.assert_close(i, F.normalize(enc.image_head(img.mean(1)), dim=-1))


# ------------------------------------------------------------------------------------------ filtering


def test_reliability_and_filter_weights_against_reference():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(6, 5), dim=-1) for _ in range(3))
    r = reliability(q, p, n, kappa=7.0, margin=0.05)
    for i in range(6):
        ref = 1 / (1 + math.exp(-7.0 * (float(q[i] @ p[i]) - float(q[i] @ n[i]) - 0.05)))
        assert abs(float(r[i]) - ref) < 1e-6
    s = torch.tensor([0.1, 0.59, 0.6, 0.95])
    torch.testing.assert_close(filter_weights(s, 0.6), torch.tensor([0.1 / 0.6, 0.59 / 0.6, 1.0, 1.0]))
    assert (filter_weights(s) > 0).all()  # down-weighted, never dropped
    with pytest.raises(ValueError):
        filter_weights(s, 0.0)


def test_margin_decays():
    m = MarginSchedule(0.2, 0.0, steps=100)
    assert m(0) == pytest.approx(0.2) and m(100) == pytest.approx(0.0) and m(500) == pytest.approx(0.0)
    assert m(25) > m(50) > m(75)
    lin = MarginSchedule(0.2, 0.0, steps=100, kind="linear")
    assert lin(50) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ losses


def _nce_reference(q, c_list, target_idx, masked, scale):
    """-log softmax over the unmasked candidates, one row."""
    logits = torch.tensor([scale * float(q @ c) for c in c_list])
    keep = torch.tensor([not m for m in masked])
    return float(-(logits[target_idx] - torch.logsumexp(logits[keep], 0)))


def test_intra_product_loss_against_reference():
    torch.manual_seed(0)
    b, s = 5, 4.0
    img, txt = F.normalize(torch.randn(b, 8), dim=-1), F.normalize(torch.randn(b, 8), dim=-1)
    group = torch.tensor([0, 1, 1, 2, 3])  # rows 1 and 2: one product (shared title)
    keys = torch.stack([torch.arange(b), group], 1)
    got = intra_product_loss(img, txt, s, keys)
    for i in range(b):
        masked = [j != i and bool(group[j] == group[i]) for j in range(b)]
        i2t = _nce_reference(img[i], list(txt), i, masked, s)
        t2i = _nce_reference(txt[i], list(img), i, masked, s)
        assert abs(float(got[i]) - (i2t + t2i) / 2) < 1e-5


def test_inter_product_loss_against_reference():
    torch.manual_seed(1)
    b, s = 4, 5.0
    q, p, n = (F.normalize(torch.randn(b, 8), dim=-1) for _ in range(3))
    gq = torch.tensor([0, 1, 2, 3])
    rq, rp = torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 2, 13])  # row 2 is its own positive
    rn, gn = torch.tensor([20, 21, 22, 23]), torch.tensor([5, 6, 7, 3])  # row 3's negative: its own product
    got = inter_product_loss(q, p, n, s, torch.stack([rq, gq], 1), torch.stack([rp, gq], 1),
                             torch.stack([rn, gn], 1))
    for i in range(b):
        cands = list(p) + [n[i]]
        masked = [j != i and bool(gq[j] == gq[i]) for j in range(b)] + [bool(gn[i] == gq[i])]
        assert abs(float(got[i]) - _nce_reference(q[i], cands, i, masked, s)) < 1e-5
    # row 3's hard negative belongs to its own product: masked, so its loss is the in-batch one
    assert float(got[3]) == pytest.approx(_nce_reference(q[3], list(p), 3, [False] * b, s), abs=1e-5)


# ------------------------------------------------------------------------------------------ co-augmentation


def test_attribute_and_callable_enrichers():
    attrs = {"colour": ["Black", "Red"], "pattern": ["Solid", "Stripe"], "garment": ["Jersey", "Shoes"]}
    out = AttributeEnricher()(["Tee", "Boot"], attrs)
    assert out == ["Black Solid Jersey. Tee", "Red Stripe Shoes. Boot"]
    with pytest.raises(KeyError, match="size"):
        AttributeEnricher("{title} {size}")(["Tee"], attrs)
    gen = CallableEnricher(lambda ps: [p.upper() for p in ps], prompt="{title}/{colour}", batch_size=1)
    assert gen(["Tee", "Boot"], attrs) == ["TEE/BLACK", "BOOT/RED"]
    with pytest.raises(ValueError, match="one string each"):
        CallableEnricher(lambda ps: ps[:-1], prompt="{title}")(["a", "b"], attrs)


def test_expand_images_is_deterministic_and_content_preserving():
    rng = np.random.default_rng(0)
    imgs = np.zeros((3, 3, 32, 32), np.uint8)
    imgs[:, 0] = 200  # red images with three amounts of blue
    imgs[:, 2] = np.array([0, 60, 120])[:, None, None]
    imgs[:, 1] = rng.integers(0, 30, (3, 32, 32))
    a, b = expand_images(imgs, 2, seed=5), expand_images(imgs, 2, seed=5)
    assert a.shape == (6, 3, 32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, expand_images(imgs, 2, seed=6))
    # colour kept: the mean colour of each view stays close to its source image's (no hue shift)
    src = imgs.reshape(3, 3, -1).mean(-1).repeat(2, 0)
    got = a.reshape(6, 3, -1).mean(-1)
    assert (np.abs(got - src) <= 0.25 * src + 8).all()  # brightness, contrast: +-10 % each
    assert (got[:, 0] > got[:, 1]).all()
    with pytest.raises(ValueError):
        expand_images(imgs.astype(np.float32), 2)


def test_consistency_keep_uses_the_clean_pairs_quantile():
    orig = torch.linspace(0, 1, 101)
    aug = torch.tensor([0.05, 0.1, 0.5, 0.09])
    keep, thr = consistency_keep(aug, orig, quantile=0.1)
    assert thr == pytest.approx(0.1)
    assert keep.tolist() == [False, True, True, False]
    keep, thr = consistency_keep(aug, orig, threshold=0.3)
    assert thr == 0.3 and keep.tolist() == [False, False, True, False]


# ------------------------------------------------------------------------------------------ triples


def _products(n=40, seed=0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n // 2), 2)
    group[-6:] = np.arange(n // 2, n // 2 + 6)  # six singletons
    cat = rng.integers(0, 3, n)
    split = np.where(np.arange(n) < n - 8, "train", "test")
    items = ItemSet(name="t", item_ids=np.arange(n), images=np.zeros((n, 3, 8, 8), np.uint8),
                    titles=[f"t{g}" for g in group], category=cat, group=group, split=split)
    tokens = TokenSet(rng.normal(size=(n, 4, 6)).astype(np.float16), rng.normal(size=(n, 5, 3)).astype(np.float16),
                      np.ones((n, 5), bool))
    return Products(items, {"type": cat.astype(str)}), tokens


def test_triples_positives_negatives_and_epoch_cover():
    prod, tok = _products()
    items = prod.items
    ds = TripleBatches(prod, tok, batch_size=8, seed=0)
    train = set(items.rows("train").tolist())
    seen = []
    for step in range(len(ds)):
        b = ds[step]
        q = b["rows"].numpy()
        p, n = b["p_keys"][:, 0].numpy(), b["n_keys"][:, 0].numpy()
        seen += q.tolist()
        assert set(q) <= train and set(p) <= train and set(n) <= train
        g = items.group
        alone = b["self_positive"].numpy()
        assert (p[alone] == q[alone]).all()
        assert ((p[~alone] != q[~alone]) & (g[p[~alone]] == g[q[~alone]])).all()
        assert (g[n] != g[q]).all()
        torch.testing.assert_close(b["q_image"], torch.from_numpy(tok.image[q].astype(np.float32)))
    assert sorted(seen) == sorted(train)  # one pass over the training items per epoch
    # singletons among the training rows are their own positives
    single = [r for r in train if len(set(np.flatnonzero(items.group == items.group[r])) & train) == 1]
    b = ds[0]
    q = b["rows"].numpy()
    assert all(b["self_positive"].numpy()[i] == (q[i] in single) for i in range(len(q)))


def test_triples_use_only_kept_augmented_views():
    prod, tok = _products()
    rows = prod.items.rows("train")
    v = 2
    rng = np.random.default_rng(1)
    aug = AugViews(rows=rows, n_views=v, image=rng.normal(size=(len(rows) * v, 4, 6)).astype(np.float16),
                   text=rng.normal(size=(len(rows), 5, 3)).astype(np.float16), mask=np.ones((len(rows), 5), bool),
                   texts=["x"] * len(rows))
    aug.keep = np.zeros(len(rows) * v, bool)
    aug.keep[1::2] = True  # only the second view of every row
    ds = TripleBatches(prod, tok, batch_size=16, seed=0, aug=aug, p_aug=1.0)
    b = ds[0]
    q = b["rows"].numpy()
    assert b["augmented"].all()
    slot = aug.slot[q]
    torch.testing.assert_close(b["q_image"], torch.from_numpy(aug.image[slot * v + 1].astype(np.float32)))
    torch.testing.assert_close(b["q_text"], torch.from_numpy(aug.text[slot].astype(np.float32)))
    aug.keep[:] = False
    assert not ds[0]["augmented"].any()


# ------------------------------------------------------------------------------------------ benchmark


def test_retrieval_against_brute_force():
    torch.manual_seed(0)
    n = 30
    group = np.repeat(np.arange(15), 2)
    group[:4] = [100, 101, 102, 103]  # four items alone in their product
    emb = {m: F.normalize(torch.randn(n, 6), dim=-1) for m in ("text", "image", "mm")}
    for mode in ("same", "all"):
        _check_retrieval(emb, group, n, mode)
    with pytest.raises(ValueError):
        retrieval(emb, group, exclude_self="none")


def _check_retrieval(emb, group, n, mode):
    got = retrieval(emb, group, ks=(1, 5), exclude_self=mode)
    for q, c in (("image", "mm"), ("mm", "mm"), ("text", "image")):
        name = {"text": "t", "image": "i", "mm": "mm"}
        for k in (1, 5):
            hits, counted = 0, 0
            for i in range(n):
                drop = q == c or mode == "all"
                sims = [(float(emb[q][i] @ emb[c][j]), j) for j in range(n) if not (drop and j == i)]
                rel = {j for _, j in sims if group[j] == group[i]}
                if not rel:
                    continue
                counted += 1
                top = [j for _, j in sorted(sims, reverse=True)[:k]]
                hits += bool(rel & set(top))
            assert got[f"{name[q]}2{name[c]}/r@{k}"] == pytest.approx(hits / counted)


def test_linear_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, 300)
    x = torch.from_numpy(centres[y] + rng.normal(size=(300, 8))).float()
    labels = np.array(["a", "b", "c"])[y]
    assert linear_probe(x[:200], labels[:200], x[200:], labels[200:]) > 0.95
    # a test label never seen in training is an error
    assert linear_probe(x[:200], labels[:200], x[200:201], np.array(["zzz"])) == 0.0


def test_fusion_shortcut_is_the_linear_heads_when_the_fusion_branch_is_zero():
    torch.manual_seed(0)
    enc = MultimodalEncoder(12, 6, image_tokens=4, text_tokens=5, dim=16, heads=2, embed_dim=8)
    with torch.no_grad():
        enc.out.weight.zero_()
        enc.out.bias.zero_()
    img, txt = torch.randn(2, 4, 12), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t_mean = (txt * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    want = F.normalize(enc.image_skip(img.mean(1)) + enc.text_skip(t_mean), dim=-1)
    torch.testing.assert_close(enc(image=img, text=txt, text_mask=mask)[0], want)
    assert MultimodalEncoder(12, 6, shortcut=False).image_skip is None


def test_fashion_source_names_the_file_and_column_it_lacks(tmp_path):
    import io

    import polars as pl
    from PIL import Image

    from ctr.data.contract import ContractError
    from encoders.moon2.features import fashion_products

    d = tmp_path / "fashion_product_images_small"
    d.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (6, 8), (200, 10, 10)).save(buf, format="JPEG")
    pl.DataFrame({"id": [1, 2], "jpeg": [buf.getvalue()] * 2}).write_parquet(d / "images.parquet")
    full = {"id": ["1", "2"], "gender": ["Men"] * 2, "masterCategory": ["Apparel"] * 2, "subCategory": ["Topwear"] * 2,
            "articleType": ["Tshirts"] * 2, "baseColour": ["Red", None], "season": ["Summer"] * 2, "year": ["2012"] * 2,
            "usage": ["Casual"] * 2, "productDisplayName": ["Red Tee", None]}
    pl.DataFrame({k: v for k, v in full.items() if k != "baseColour"}).write_csv(d / "styles.csv")
    with pytest.raises(ContractError, match="styles.csv.*baseColour"):
        fashion_products(16, str(tmp_path / "cache"), data_dir=str(tmp_path))
    pl.DataFrame(full).write_csv(d / "styles.csv")
    with pytest.warns(UserWarning, match="without productDisplayName"):
        p = fashion_products(16, str(tmp_path / "cache"), data_dir=str(tmp_path), held_out=None)
    assert p.items.titles == ["Red Tee", "Tshirts"] and p.items.meta["titles_filled"] == [2]
    assert p.attrs["colour"].tolist() == ["Red", "unknown"]
