"""Encoder inputs: image cache, augmentation, item sets, click pairs, task batches, retrieval metrics."""

import io

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from ctr.data.contract import ContractError
from ctr.data.sources.simulator import SimConfig, simulate
from encoders.data import ClickLog, TaskBatches, items_from_table, split_by_group
from encoders.evaluate import SearchQueries, image_text_recall, same_group_queries, search_recall
from encoders.images import BatchAugment, build_image_cache, decode_image


def _png(w, h, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sim():
    return simulate(SimConfig.preset("tiny"))


@pytest.fixture(scope="module")
def sim_items(sim, tmp_path_factory):
    return items_from_table(sim.items, 32, tmp_path_factory.mktemp("img"), source="sim.items")


def test_decode_fits_and_pads_with_border_colour(tmp_path):
    a = decode_image(_png(40, 20), 16)
    assert a.shape == (3, 16, 16) and a.dtype == np.uint8
    assert (a[:, 8, 8] == [200, 30, 30]).all() and (a[:, 0, 0] == [200, 30, 30]).all()
    p = tmp_path / "x.png"
    p.write_bytes(_png(8, 8, (1, 2, 3)))
    assert (decode_image(p, 4)[:, 0, 0] == [1, 2, 3]).all()


def test_image_cache_is_reused_and_broken_images_are_named(tmp_path):
    imgs = [_png(10, 10), _png(12, 8, (0, 0, 255))]
    a = build_image_cache(imgs, 8, tmp_path)
    files = list(tmp_path.glob("images-*.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = build_image_cache(imgs, 8, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(a, b)
    assert build_image_cache(imgs, 6, tmp_path).shape == (2, 3, 6, 6)  # another size: another file
    assert len(list(tmp_path.glob("images-*.npy"))) == 2
    with pytest.raises(ContractError, match=r"items.parquet, column 'image', row 1 .*cannot decode"):
        build_image_cache([imgs[0], b"not an image"], 8, None, source="items.parquet", column="image")
    with pytest.raises(ContractError, match=r"row 0 .*null image"):
        build_image_cache([None], 8, None)


def test_augment_shapes_range_and_determinism():
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    aug = BatchAugment(12)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 12, 12) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, aug(x, torch.Generator().manual_seed(2)))
    # no crop, no flip, no jitter: the identity (up to resampling at the same size)
    ident = BatchAugment(16, scale=(1, 1), ratio=(1, 1), flip=0.0, jitter_p=0.0, grey_p=0.0)
    torch.testing.assert_close(ident(x), x.float() / 255, atol=1e-5, rtol=0)
    flip = BatchAugment(16, scale=(1, 1), ratio=(1, 1), flip=1.0, jitter_p=0.0, grey_p=0.0)
    torch.testing.assert_close(flip(x), x.flip(-1).float() / 255, atol=1e-5, rtol=0)


def test_items_table_errors(sim):
    items = sim.items.head(5)
    with pytest.raises(ContractError, match="image"):
        items_from_table(items.drop("image"), 8, None, source="items.parquet")
    dup = pl.concat([items, items.head(1)])
    with pytest.raises(ContractError, match=r"item_id', rows 0, 5 .*duplicate item id"):
        items_from_table(dup, 8, None, source="items.parquet")
    broken = items.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(b"xx"))
                                .otherwise(pl.col("image")).alias("image"))
    with pytest.raises(ContractError, match=r"items.parquet, column 'image', row 3 "):
        items_from_table(broken, 8, None, source="items.parquet")


def test_split_by_group_keeps_groups_together():
    groups = [f"p{i // 3}" for i in range(300)]
    s = split_by_group(groups, (0.6, 0.2, 0.2))
    for g in set(groups):
        assert len({s[i] for i in range(300) if groups[i] == g}) == 1
    frac = np.mean(s == "train")
    assert 0.4 < frac < 0.8 and set(s) == {"train", "val", "test"}
    assert np.array_equal(s, split_by_group(list(reversed(groups)), (0.6, 0.2, 0.2))[::-1])


def test_click_log_pairs_follow_the_events_and_the_time_split(sim, sim_items):
    log = ClickLog.from_events(sim.events, sim_items)
    ev = sim.events.sort(["timestamp", "request_id", "position"], maintain_order=True)
    n_train = int(ev.height * 0.8)
    train_ev = ev.head(n_train)
    row = {int(i): r for r, i in enumerate(sim_items.item_ids)}
    want = train_ev.filter((pl.col("clicked") == 1) & (pl.col("item_id") != pl.col("query_item_id")))
    got = {(int(q), int(p)) for q, p in log.pairs["train"]}
    assert len(log.pairs["train"]) == want.height
    assert got == {(row[q], row[p]) for q, p in zip(want["query_item_id"], want["item_id"])}
    # shown-but-unclicked items of the same request, never a clicked one
    clicked = set(zip(train_ev.filter(pl.col("clicked") == 1)["request_id"], train_ev.filter(pl.col("clicked") == 1)["item_id"]))
    assert log.shown["train"].shape[0] == want.height
    req = want.sort("request_id")["request_id"][0]
    # the first click's shown items come from its own request and were not clicked there
    ids = sim_items.item_ids
    first = want.with_row_index("k").filter(pl.col("request_id") == req)
    k = int(first["k"][0])
    shown = {int(ids[x]) for x in log.shown["train"][k] if x >= 0}
    expect = set(train_ev.filter((pl.col("request_id") == req) & (pl.col("clicked") == 0))["item_id"].to_list())
    assert shown == expect and not any((req, s) in clicked for s in shown)
    # val/test queries hold each request's clicked items
    q, off, rel = log.queries["test"]
    assert len(off) == len(q) + 1 and off[-1] == len(rel) and len(q) > 0


def test_click_log_errors(sim, sim_items):
    bad = sim.events.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(None)
                                  .otherwise(pl.col("query_item_id")).alias("query_item_id"))
    with pytest.raises(ContractError, match=r"events.parquet, column 'query_item_id', row 7 .*null"):
        ClickLog.from_events(bad, sim_items, source="events.parquet")
    unknown = sim.events.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(10**9)
                                      .otherwise(pl.col("item_id")).alias("item_id"))
    with pytest.raises(ContractError, match=r"column 'item_id', row 2 .*not in the item set"):
        ClickLog.from_events(unknown, sim_items, source="events.parquet")


def test_task_batches_roles_index_the_unique_images(sim, sim_items):
    log = ClickLog.from_events(sim.events, sim_items)
    ds = TaskBatches(sim_items, {"self_supervised": 1.0, "click": 1.0}, 16, clicks=log, n_shown=3,
                     n_category=2, seed=3)
    b = ds[0]
    rows = b["rows"]
    assert len(torch.unique(rows)) == len(rows)  # every image once
    imgs = torch.from_numpy(np.asarray(sim_items.images))
    for role in ("items", "query", "positive", "negatives"):
        assert torch.equal(b["images"][b[role]], imgs[rows[b[role]]])
    assert b["negatives"].shape == (16, 5)
    # category negatives share the positive's category
    cat = torch.from_numpy(sim_items.category)
    pos_cat = cat[rows[b["positive"]]]
    assert torch.equal(cat[rows[b["negatives"][:, 3:]]], pos_cat[:, None].expand(-1, 2))
    # the (query, positive) pairs are training clicks
    pairs = {tuple(p) for p in log.pairs["train"].tolist()}
    assert all((int(q), int(p)) in pairs for q, p in zip(rows[b["query"]], rows[b["positive"]]))
    # deterministic per (seed, epoch, step); a new epoch draws new batches
    assert torch.equal(ds[0]["rows"], rows)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["rows"], rows)
    assert torch.equal(b["keys"][:, 0], rows)


def test_same_product_pairs_are_other_items_of_the_group(sim_items):
    from dataclasses import replace
    n = len(sim_items)
    group = np.arange(n) // 3  # groups of 3, the last ones held out or single
    group[-1] = 10_000  # a group of one: never an anchor or a partner
    split = np.where(group % 5 == 4, "test", "train")
    items = replace(sim_items, group=group.astype(np.int64), split=split)
    ds = TaskBatches(items, {"same_product": 1.0}, 12, seed=1)
    train = set(items.rows("train").tolist())
    seen_partners = set()
    for step in range(len(ds)):
        b = ds[step]
        a, p = b["rows"][b["anchor"]].numpy(), b["rows"][b["partner"]].numpy()
        assert len(a) == 12 and len(set(a.tolist())) == 12
        assert (a != p).all() and (group[a] == group[p]).all()
        assert set(a.tolist()) <= train and set(p.tolist()) <= train
        assert n - 1 not in set(a.tolist()) | set(p.tolist())
        seen_partners |= {(int(x), int(y)) for x, y in zip(a, p)}
    # both other members of a group of three get drawn as partners (over epochs)
    for epoch in range(1, 40):
        ds.set_epoch(epoch)
        for step in range(len(ds)):
            b = ds[step]
            a, p = b["rows"][b["anchor"]].numpy(), b["rows"][b["partner"]].numpy()
            seen_partners |= {(int(x), int(y)) for x, y in zip(a, p)}
    assert {y for x, y in seen_partners if x == 0} == {1, 2}
    single = replace(sim_items, group=np.arange(n, dtype=np.int64))
    with pytest.raises(ValueError, match="two or more training items"):
        TaskBatches(single, {"same_product": 1.0}, 8)


def test_task_batches_need_their_inputs(sim_items):
    with pytest.raises(ValueError, match="click log"):
        TaskBatches(sim_items, {"click": 1.0}, 8)
    with pytest.raises(ValueError, match="title tokens"):
        TaskBatches(sim_items, {"image_text": 1.0}, 8)
    with pytest.raises(ValueError, match="unknown tasks"):
        TaskBatches(sim_items, {"clicks": 1.0}, 8)


# ---------------------------------------------------------------------------------------------
# retrieval metrics against plain loops


def _naive_recall(emb, q: SearchQueries, k):
    out = []
    for i, qr in enumerate(q.query):
        rel = set(q.relevant[q.offsets[i]:q.offsets[i + 1]].tolist())
        cand = [g for g in q.gallery if g != qr]
        sims = [float(emb[qr] @ emb[g]) for g in cand]
        top = [cand[j] for j in np.argsort(sims)[::-1][:k]]
        out.append(len(rel & set(top)) / len(rel))
    return float(np.mean(out))


def _naive_nll(emb, q: SearchQueries, t=0.05):
    out = []
    for i, qr in enumerate(q.query):
        rel = set(q.relevant[q.offsets[i]:q.offsets[i + 1]].tolist())
        cand = [g for g in q.gallery if g != qr]
        p = np.exp(np.array([float(emb[qr] @ emb[g]) for g in cand]) / t)
        if rel & set(cand):
            out.append(-np.log(sum(p[j] for j, g in enumerate(cand) if g in rel) / p.sum()))
    return float(np.mean(out))


def test_search_recall_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    group = rng.integers(0, 12, 40)
    q = same_group_queries(np.arange(40), group)
    for i, r in enumerate(q.query):  # relevant = the other members of the group
        assert set(q.relevant[q.offsets[i]:q.offsets[i + 1]]) == set(np.flatnonzero(group == group[r])) - {r}
    got = search_recall(emb, q, ks=(1, 5, 10), chunk=7)
    for k in (1, 5, 10):
        assert got[f"recall@{k}"] == pytest.approx(_naive_recall(emb.numpy(), q, k))
    assert got["nll"] == pytest.approx(_naive_nll(emb.numpy(), q), rel=1e-5)
    # a perfect embedding (one point per group) finds every relevant item
    perfect = torch.nn.functional.one_hot(torch.from_numpy(group), 12).float()
    assert search_recall(perfect, q, ks=(10,))["recall@10"] == pytest.approx(1.0)
    # restricted to a subset of rows: the same as evaluating the subset alone
    have = np.zeros(40, bool)
    have[:25] = True
    sub = q.restrict(have)
    assert search_recall(emb, sub, ks=(5,))["recall@5"] == pytest.approx(
        _naive_recall(emb.numpy(), same_group_queries(np.arange(25), group), 5))


def test_image_text_recall_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 6, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(30, 6, generator=g), dim=1)
    titles = [f"t{i % 20}" for i in range(30)]  # 10 titles appear twice
    got = image_text_recall(img, txt, titles, ks=(1, 5))
    s = (img @ txt.T).numpy()
    for k in (1, 5):
        i2t = np.mean([any(titles[j] == titles[i] for j in np.argsort(-s[i])[:k]) for i in range(30)])
        t2i = np.mean([any(titles[j] == titles[i] for j in np.argsort(-s[:, i])[:k]) for i in range(30)])
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i)


def test_missing_image_file_and_broken_hm_photo_are_named(tmp_path):
    from encoders.data import hm_items

    ok = tmp_path / "a.png"
    ok.write_bytes(_png(8, 8))
    table = pl.DataFrame({"item_id": [1, 2], "image_path": [str(ok), str(tmp_path / "gone.png")]})
    with pytest.raises(ContractError, match=r"items.csv, column 'image_path', row 1 .*cannot read image file"):
        items_from_table(table, 8, tmp_path / "cache", source="items.csv")
    # H&M layout: the error names images.parquet's own column and row (not the joined frame's)
    hm = tmp_path / "hm"
    hm.mkdir()
    pl.DataFrame({"article_id": ["0003", "0001", "0002"], "product_code": ["1", "1", "2"],
                  "prod_name": ["a", "b", "c"], "product_type_name": ["t", "t", "u"],
                  "detail_desc": ["x", None, "z"]}).write_csv(hm / "articles.csv")
    pl.DataFrame({"article_id": ["0003", "0001", "0002"],
                  "jpeg": [_png(8, 8), _png(9, 9), b"broken"]}).write_parquet(hm / "images.parquet")
    with pytest.raises(ContractError, match=r"images.parquet, column 'jpeg', row 2 .*cannot decode"):
        hm_items(8, None, data_dir=str(hm))
    pl.DataFrame({"article_id": ["0003", "0001", "0002"],
                  "jpeg": [_png(8, 8), _png(9, 9), _png(5, 5)]}).write_parquet(hm / "images.parquet")
    items = hm_items(8, None, data_dir=str(hm), held_out=(1.0, 0.0, 0.0))
    assert items.item_ids.tolist() == [1, 2, 3] and items.group[0] == items.group[2] != items.group[1]
    assert items.titles[0] == "b, t. "
