"""The visual-search traffic simulator: determinism, data contract, and its known click model."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ctr.data.contract import ContractError
from ctr.data.sources import images as img
from ctr.data.sources.catalogues import load_catalogue
from ctr.data.sources.simulator import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    USER_SCHEMA,
    SimConfig,
    SimData,
    load,
    main,
    simulate,
)

FRAMES = ("items", "users", "events", "events_random", "item_truth", "user_truth")


@pytest.fixture(scope="module")
def tiny() -> SimData:
    return simulate(SimConfig.preset("tiny", seed=0))


@pytest.fixture(scope="module")
def mid() -> SimData:
    # More traffic on the tiny catalogue, for statistical checks (still well under a second).
    return simulate(SimConfig.preset("tiny", seed=1, n_requests=6_000, n_random_requests=6_000))


def _binom_se(p: np.ndarray) -> float:
    return float(np.sqrt((p * (1 - p)).sum()) / len(p))


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_identical(tiny):
    again = simulate(SimConfig.preset("tiny", seed=0))
    for name in FRAMES:
        assert getattr(tiny, name).equals(getattr(again, name)), name
    assert tiny.config == again.config


def test_different_seed_differs(tiny):
    other = simulate(SimConfig.preset("tiny", seed=7))
    assert not tiny.events.equals(other.events)
    assert not tiny.items.equals(other.items)
    assert tiny.items["image"].to_list() != other.items["image"].to_list()


# ---------------------------------------------------------------------------------------------
# schema / data contract


def test_schema(tiny):
    cfg = tiny.config
    assert dict(tiny.items.schema) == ITEM_SCHEMA
    assert dict(tiny.users.schema) == USER_SCHEMA
    assert dict(tiny.events.schema) == EVENT_SCHEMA
    assert dict(tiny.events_random.schema) == EVENT_SCHEMA
    assert list(tiny.items.columns) == ["item_id", "category", "title", "image"]
    assert list(tiny.users.columns) == ["user_id", "segment", "age_group"]
    assert list(tiny.events.columns) == [
        "request_id", "user_id", "item_id", "clicked", "timestamp", "position", "query_item_id",
        "true_ctr",
    ]
    truth = tiny.item_truth
    for col in ("item_id", "category_idx", "colour_idx", "pattern_idx"):
        assert truth.schema[col] == pl.Int64
    assert truth.schema["attractiveness"] == pl.Float64
    assert truth.schema["popularity"] == pl.Float64
    assert tiny.items["item_id"].to_list() == list(range(cfg.n_items))
    assert tiny.users["user_id"].to_list() == list(range(cfg.n_users))
    assert truth["item_id"].to_list() == list(range(cfg.n_items))
    assert abs(truth["popularity"].sum() - 1.0) < 1e-9
    assert tiny.items["category"].n_unique() >= 6
    assert set(tiny.items["category"].unique()) <= set(img.CATEGORIES)
    assert tiny.users["segment"].n_unique() == cfg.n_segments


@pytest.mark.parametrize("log", ["events", "events_random"])
def test_event_values(tiny, log):
    cfg = tiny.config
    ev = getattr(tiny, log)
    n_req = cfg.n_requests if log == "events" else cfg.n_random_requests
    assert ev.height == n_req * cfg.k
    assert set(ev["clicked"].unique().to_list()) <= {0, 1}
    assert ev["position"].min() == 1 and ev["position"].max() == cfg.k
    items = set(range(cfg.n_items))
    assert set(ev["item_id"].unique().to_list()) <= items
    assert set(ev["query_item_id"].unique().to_list()) <= items
    assert set(ev["user_id"].unique().to_list()) <= set(range(cfg.n_users))
    p = ev["true_ctr"].to_numpy()
    assert np.all((p > 0) & (p < 1))
    per_req = ev.group_by("request_id").agg(
        pl.len().alias("n"),
        pl.col("position").n_unique().alias("npos"),
        pl.col("item_id").n_unique().alias("nitem"),
        pl.col("user_id").n_unique().alias("nuser"),
        pl.col("timestamp").n_unique().alias("nts"),
        (pl.col("item_id") == pl.col("query_item_id")).sum().alias("self"),
    )
    assert per_req.height == n_req
    assert (per_req["n"] == cfg.k).all() and (per_req["npos"] == cfg.k).all()
    assert (per_req["nitem"] == cfg.k).all()  # candidates distinct within a slate
    assert (per_req["nuser"] == 1).all() and (per_req["nts"] == 1).all()
    assert (per_req["self"] == 0).all()  # the query item itself is never a candidate
    # request ids follow time order
    first = ev.group_by("request_id").agg(pl.col("timestamp").first()).sort("request_id")
    assert first["timestamp"].is_sorted()


def test_random_log_is_later_and_same_users(tiny):
    ev, er = tiny.events, tiny.events_random
    assert er["timestamp"].min() > ev["timestamp"].max()
    assert set(er["request_id"].to_list()).isdisjoint(ev["request_id"].to_list())
    assert set(er["user_id"].unique().to_list()) <= set(ev["user_id"].unique().to_list())
    # every user has a history in the main log
    per_user = ev.group_by("user_id").agg(pl.col("request_id").n_unique().alias("r"))
    assert per_user.height == tiny.config.n_users
    assert per_user["r"].min() >= tiny.config.min_requests_per_user
    assert per_user["r"].mean() >= 15


def test_titles_describe_attributes(tiny):
    t = tiny.items.join(tiny.item_truth, on="item_id")
    for row in t.head(50).iter_rows(named=True):
        words = row["title"]
        assert img.CATEGORIES[row["category_idx"]] in words
        assert img.COLOURS[row["colour_idx"]] in words
        if row["pattern_idx"]:
            assert img.PATTERN_WORDS[row["pattern_idx"]] in words
        assert row["category"] == img.CATEGORIES[row["category_idx"]]


# ---------------------------------------------------------------------------------------------
# the known model


def test_true_ctr_recomputes_from_truth(tiny):
    """true_ctr is exactly the documented click model applied to the ground truth."""
    cfg = tiny.config
    it, ut = tiny.item_truth, tiny.user_truth
    cat, col = it["category_idx"].to_numpy(), it["colour_idx"].to_numpy()
    pat, sh = it["pattern_idx"].to_numpy(), it["shade_idx"].to_numpy()
    attract = it["attractiveness"].to_numpy()
    lpop = np.log(cfg.n_items * it["popularity"].to_numpy())
    tc = np.stack(ut["taste_category"].to_numpy())
    tco = np.stack(ut["taste_colour"].to_numpy())
    tp = np.stack(ut["taste_pattern"].to_numpy())
    cs = img.colour_similarity(cfg.colour_sim_scale)
    for ev in (tiny.events, tiny.events_random):
        u, i = ev["user_id"].to_numpy(), ev["item_id"].to_numpy()
        q, pos = ev["query_item_id"].to_numpy(), ev["position"].to_numpy().astype(float)
        rel = (cfg.rel_w_category * (cat[q] == cat[i]) + cfg.rel_w_colour * cs[col[q], col[i]]
               + cfg.rel_w_pattern * (pat[q] == pat[i]) + cfg.rel_w_shade * (sh[q] == sh[i]))
        z = (cfg.click_bias + cfg.w_rel * rel + cfg.w_taste * (tc[u, cat[i]] + tco[u, col[i]] + tp[u, pat[i]])
             + cfg.w_attr * attract[i] + cfg.w_exposure * lpop[i])
        p = pos ** -cfg.position_eta / (1 + np.exp(-z))
        np.testing.assert_allclose(ev["true_ctr"].to_numpy(), p, rtol=1e-9)


def test_ctr_falls_with_position(mid):
    k = mid.config.k
    for ev in (mid.events, mid.events_random):
        by = ev.group_by("position").agg(pl.col("clicked").mean(), pl.col("true_ctr").mean()).sort("position")
        c = by["clicked"].to_numpy()
        assert c[0] > c[k - 1] * 2
        assert c[: k // 2].mean() > c[k // 2:].mean()
        assert np.all(np.diff(by["true_ctr"].to_numpy()[[0, 2, 4, 6, 9]]) < 0)


def test_logit_position_mode():
    d = simulate(SimConfig.preset("tiny", seed=2, position_bias_mode="logit", n_random_requests=3000))
    by = d.events_random.group_by("position").agg(pl.col("true_ctr").mean()).sort("position")
    t = by["true_ctr"].to_numpy()
    assert t[0] > t[-1]


def test_overall_ctr_realistic(mid):
    ctr = mid.events["clicked"].mean()
    assert 0.03 < ctr < 0.25


def test_random_log_is_calibrated(mid):
    er = mid.events_random
    p, y = er["true_ctr"].to_numpy(), er["clicked"].to_numpy()
    assert abs(y.mean() - p.mean()) < 4 * _binom_se(p)
    # per position, and per true_ctr decile
    ranks = np.argsort(np.argsort(er["true_ctr"].to_numpy(), kind="stable"), kind="stable")
    er = er.with_columns(bucket=pl.Series(ranks * 10 // er.height))
    for key in ("position", "bucket"):
        for part in er.partition_by(key):
            p, y = part["true_ctr"].to_numpy(), part["clicked"].to_numpy()
            assert abs(y.mean() - p.mean()) < 4 * _binom_se(p) + 1e-3, (key, part[key][0])
    ev = mid.events
    assert abs(ev["clicked"].mean() - ev["true_ctr"].mean()) < 4 * _binom_se(ev["true_ctr"].to_numpy())


def test_exposure_policy_is_biased(mid):
    truth = mid.item_truth
    top = set(truth.filter(pl.col("pop_rank") <= mid.config.n_items // 10)["item_id"].to_list())

    def share(ev):
        return ev["item_id"].is_in(list(top)).mean()

    s_prod, s_rand = share(mid.events), share(mid.events_random)
    assert s_rand < 0.2
    # ~3x on this 200-item catalogue (25 items per category); ~5x (54% vs 11%) on `default`
    assert s_prod > 2.5 * s_rand
    # popular items sit higher in the production ranking
    ev = mid.events.join(truth.select("item_id", "pop_rank"), on="item_id")
    r = ev.group_by("position").agg(pl.col("pop_rank").mean()).sort("position")["pop_rank"].to_numpy()
    assert r[0] < r[-1]
    # the random policy shows mostly same-category candidates, the production policy relevant ones
    cat = dict(zip(truth["item_id"].to_list(), truth["category_idx"].to_list()))
    for ev in (mid.events, mid.events_random):
        same = np.mean([cat[a] == cat[b] for a, b in zip(ev["item_id"].to_list(), ev["query_item_id"].to_list())])
        assert same > 0.7


def test_popularity_correlates_with_attractiveness(tiny):
    t = tiny.item_truth
    r = np.corrcoef(t["attractiveness"].to_numpy(), -np.log(t["pop_rank"].to_numpy()))[0, 1]
    assert 0.2 < r < 0.95


# ---------------------------------------------------------------------------------------------
# images


def test_images_decode(tiny):
    s = tiny.config.image_size
    for b in tiny.items["image"].head(20).to_list():
        im = Image.open(io.BytesIO(b))
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (s, s)


def test_image_size_config():
    d = simulate(SimConfig.preset("tiny", n_items=20, n_users=10, n_requests=100, n_random_requests=10,
                                  image_size=32))
    im = img.decode_png(d.items["image"][0])
    assert im.size == (32, 32)


def test_distinct_attributes_distinct_images():
    rng = np.random.default_rng(0)

    def mean_rgb(cat, col, pat):
        return np.asarray(img.render_item(cat, col, pat, rng, size=64), dtype=float).reshape(-1, 3).mean(0)

    red, blue = img.COLOURS.index("red"), img.COLOURS.index("blue")
    m_red, m_blue = mean_rgb(0, red, 0), mean_rgb(0, blue, 0)
    assert m_red[0] - m_red[2] > 30 and m_blue[2] - m_blue[0] > 30
    assert np.abs(m_red - m_blue).max() > 40
    # same attributes, different jitter: close but not pixel-identical
    a = np.asarray(img.render_item(1, red, 1, rng))
    b = np.asarray(img.render_item(1, red, 1, rng))
    assert not np.array_equal(a, b)
    assert np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)).max() < 25
    # category silhouettes differ in shape
    masks = [np.asarray(img.render_item(c, red, 0, np.random.default_rng(1))).sum(-1) < 600
             for c in range(len(img.CATEGORIES))]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).mean() > 0.05


def test_render_speed():
    rng = np.random.default_rng(0)
    n = 300
    t = time.perf_counter()
    img.render_catalogue(rng.integers(0, 8, n), rng.integers(0, 10, n), rng.integers(0, 5, n), None, rng)
    assert n / (time.perf_counter() - t) > 300  # ~2,000/s on one core; loose against noisy CI


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_roundtrip(tmp_path):
    out = tmp_path / "sim"
    main(["--out", str(out), "--preset", "tiny", "--seed", "3", "--n-items", "150", "--quiet"])
    for f in ("items.parquet", "users.parquet", "events.parquet", "events_random.parquet",
              "item_truth.parquet", "sim_config.json"):
        assert (out / f).exists(), f
    back = load(out)
    ref = simulate(SimConfig.preset("tiny", seed=3, n_items=150))
    assert back.config == ref.config
    assert back.config.n_items == 150
    for name in FRAMES:
        assert getattr(back, name).equals(getattr(ref, name)), name
        assert getattr(back, name).schema == getattr(ref, name).schema, name


# ---------------------------------------------------------------------------------------------
# real catalogues (H&M, Fashion Product Images) from $CTR_DATA_DIR

REAL_KW = dict(n_items=150, n_users=60, n_requests=1_500, n_random_requests=500)
REAL_SIZE = {"hm": (192, 288), "fashion": (60, 80)}  # (width, height) of the photos
REAL_CATEGORY = {"hm": "Trousers", "fashion": "Tshirts"}  # the most frequent category


def _real_data_dir() -> Path:
    d = Path(os.environ.get("CTR_DATA_DIR", "/nonexistent"))
    if not (d / "hm_fashion_images_sample").is_dir() or not (d / "fashion_product_images_small").is_dir():
        pytest.skip("$CTR_DATA_DIR/hm_fashion_images_sample (and fashion_product_images_small) absent")
    return d


@pytest.fixture(scope="module", params=["hm", "fashion"])
def real(request) -> SimData:
    _real_data_dir()
    return simulate(SimConfig.preset("tiny", seed=5, catalogue=request.param, **REAL_KW))


def test_real_catalogue_deterministic(real):
    again = simulate(SimConfig.preset("tiny", seed=5, catalogue=real.config.catalogue, **REAL_KW))
    for name in FRAMES:
        assert getattr(real, name).equals(getattr(again, name)), name
    other = simulate(SimConfig.preset("tiny", seed=6, catalogue=real.config.catalogue, **REAL_KW))
    assert real.item_truth["source_id"].to_list() != other.item_truth["source_id"].to_list()


def test_real_catalogue_items(real):
    name, cat = real.config.catalogue, real.catalogue
    assert dict(real.items.schema) == ITEM_SCHEMA
    assert list(real.items.columns) == ["item_id", "category", "title", "image"]
    assert real.items["item_id"].to_list() == list(range(REAL_KW["n_items"]))
    # real photos, untouched: JPEG of the catalogue's size
    for b in real.items["image"].head(10).to_list():
        im = Image.open(io.BytesIO(b))
        assert im.format == "JPEG" and im.size == REAL_SIZE[name]
        assert np.asarray(im.convert("RGB")).std() > 5  # a photo, not a flat fill
    assert real.items["image"].to_list() == cat.images
    # real category names, matching the truth indices; distinct products with real titles
    assert REAL_CATEGORY[name] in set(real.items["category"].to_list())
    t = real.items.join(real.item_truth, on="item_id")
    assert t["category"].to_list() == [cat.categories[j] for j in t["category_idx"].to_list()]
    assert real.item_truth["source_id"].dtype == pl.Utf8
    assert real.item_truth["source_id"].n_unique() == REAL_KW["n_items"]
    if name == "hm":
        assert all(len(s) == 10 for s in real.item_truth["source_id"].to_list())  # zero-padded
    titles = real.items["title"].to_list()
    assert all(titles) and len(set(titles)) > REAL_KW["n_items"] // 2
    # effect tables are sized by the catalogue's levels
    ut = real.user_truth
    assert np.stack(ut["taste_category"].to_numpy()).shape[1] == len(cat.categories)
    assert np.stack(ut["taste_colour"].to_numpy()).shape[1] == len(cat.colours)
    assert np.stack(ut["taste_pattern"].to_numpy()).shape[1] == len(cat.patterns)
    for col, levels in (("category_idx", cat.categories), ("colour_idx", cat.colours),
                        ("pattern_idx", cat.patterns), ("shade_idx", cat.shades)):
        v = real.item_truth[col].to_numpy()
        assert v.min() >= 0 and v.max() < len(levels)


def test_real_catalogue_click_model(real):
    cfg, cat = real.config, real.catalogue
    for log, n_req in (("events", cfg.n_requests), ("events_random", cfg.n_random_requests)):
        ev = getattr(real, log)
        assert dict(ev.schema) == EVENT_SCHEMA
        assert ev.height == n_req * cfg.k
        assert ev["position"].min() == 1 and ev["position"].max() == cfg.k
        p = ev["true_ctr"].to_numpy()
        assert np.all((p > 0) & (p < 1))
        assert (ev["item_id"] != ev["query_item_id"]).all()
    # true_ctr is the documented model on the real attributes and the photo-based colour similarity
    it, ut = real.item_truth, real.user_truth
    c, co, pa, sh = (it[k].to_numpy() for k in ("category_idx", "colour_idx", "pattern_idx", "shade_idx"))
    lpop = np.log(cfg.n_items * it["popularity"].to_numpy())
    tc, tco, tp = (np.stack(ut[k].to_numpy()) for k in ("taste_category", "taste_colour", "taste_pattern"))
    ev = real.events
    u, i, q = ev["user_id"].to_numpy(), ev["item_id"].to_numpy(), ev["query_item_id"].to_numpy()
    rel = (cfg.rel_w_category * (c[q] == c[i]) + cfg.rel_w_colour * cat.csim[co[q], co[i]]
           + cfg.rel_w_pattern * (pa[q] == pa[i]) + cfg.rel_w_shade * (sh[q] == sh[i]))
    z = (cfg.click_bias + cfg.w_rel * rel + cfg.w_taste * (tc[u, c[i]] + tco[u, co[i]] + tp[u, pa[i]])
         + cfg.w_attr * it["attractiveness"].to_numpy()[i] + cfg.w_exposure * lpop[i])
    p = ev["position"].to_numpy().astype(float) ** -cfg.position_eta / (1 + np.exp(-z))
    np.testing.assert_allclose(ev["true_ctr"].to_numpy(), p, rtol=1e-9)
    assert 0.02 < ev["clicked"].mean() < 0.3


def test_load_catalogue_levels_and_colours():
    d = _real_data_dir()
    hm = load_catalogue("hm", 300, np.random.default_rng(0), d)
    again = load_catalogue("hm", 300, np.random.default_rng(0), d)
    assert hm.source_ids == again.source_ids and np.array_equal(hm.csim, again.csim)
    assert len(hm) == 300 and len(hm.categories) == 12 and hm.categories[0] == "Trousers"
    assert len(hm.colours) <= 13 and len(hm.patterns) <= 7 and len(hm.shades) <= 5
    assert {"Black", "White"} <= set(hm.colours) and "Solid" in hm.patterns and "Dark" in hm.shades
    assert hm.csim.shape == (len(hm.colours),) * 2
    assert np.allclose(np.diag(hm.csim), 1) and np.allclose(hm.csim, hm.csim.T)
    assert (hm.csim >= 0).all() and (hm.csim <= 1).all()
    rgb = dict(zip(hm.colours, hm.colour_rgb))
    assert rgb["Black"].mean() + 80 < rgb["White"].mean()  # measured from the photos
    fa = load_catalogue("fashion", 100, np.random.default_rng(0), d / "fashion_product_images_small")
    assert fa.categories[0] == "Tshirts" and "Casual" in fa.patterns and "Summer" in fa.shades
    assert all(isinstance(s, str) and s.isdigit() for s in fa.source_ids)


def test_real_catalogue_errors(tmp_path):
    d = _real_data_dir()
    with pytest.raises(ValueError, match="unknown catalogue"):
        SimConfig.preset("tiny", catalogue="amazon")
    with pytest.raises(ValueError, match="unknown catalogue"):
        load_catalogue("amazon", 10, np.random.default_rng(0), d)
    with pytest.raises(ValueError, match="n_items=100000"):
        load_catalogue("hm", 100_000, np.random.default_rng(0), d)
    with pytest.raises(ValueError, match="n_items=50000"):
        simulate(SimConfig.preset("tiny", catalogue="fashion", n_items=50_000))
    with pytest.raises(FileNotFoundError, match="articles.csv"):
        load_catalogue("hm", 10, np.random.default_rng(0), tmp_path)
    # a missing column is named with its file
    bad = tmp_path / "hm_fashion_images_sample"
    bad.mkdir()
    (bad / "images.parquet").symlink_to(d / "hm_fashion_images_sample" / "images.parquet")
    pl.read_csv(d / "hm_fashion_images_sample" / "articles.csv", infer_schema=False, n_rows=20).drop(
        "colour_group_name").write_csv(bad / "articles.csv")
    with pytest.raises(ContractError, match=r"articles\.csv.*colour_group_name"):
        load_catalogue("hm", 10, np.random.default_rng(0), tmp_path)


def test_cli_real_catalogue(tmp_path):
    _real_data_dir()
    out = tmp_path / "sim"
    main(["--out", str(out), "--preset", "tiny", "--catalogue", "fashion", "--n-items", "120",
          "--n-users", "30", "--n-requests", "300", "--n-random-requests", "50", "--quiet"])
    back = load(out)
    assert back.config.catalogue == "fashion"
    assert back.item_truth["source_id"].dtype == pl.Utf8
    assert Image.open(io.BytesIO(back.items["image"][0])).format == "JPEG"
