"""Bad image input: every decodable mode becomes RGB, every undecodable image follows the
``bad_images`` policy (fail: an error naming source, column, row, item id and reason; skip: the
item left out, counted, logged)."""

import io
import json
import logging
import struct
import warnings
import zlib

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ctr.data.contract import ContractError
from encoders.data import ClickLog, hm_items, items_from_table
from encoders.images import (BadImage, build_image_cache, decode_image, decode_images, images_fingerprint,
                             open_rgb)

RED, BLUE, WHITE = (220, 20, 20), (20, 20, 220), (255, 255, 255)


def _enc(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(a: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in a[:, y, x])


def _close(got, want, tol=6) -> bool:
    return all(abs(int(g) - int(w)) <= tol for g, w in zip(got, want))


def _bad(data, **kw) -> BadImage:
    with pytest.raises(BadImage) as e:
        decode_image(data, 8, **kw)
    return e.value


# ---------------------------------------------------------------------------------------------
# bad images: the reason each one gets


def test_undecodable_bytes():
    e = _bad(b"this is not an image at all")
    assert e.kind == "unidentified" and "cannot identify its format" in str(e)


def test_missing_path(tmp_path):
    e = _bad(tmp_path / "gone.jpg")
    assert e.kind == "missing_file"
    assert str(e) == f"cannot read image file {tmp_path / 'gone.jpg'}: No such file or directory"


def test_zero_byte_file_and_bytes(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert _bad(p).kind == "empty" and "no data (0 bytes)" in str(_bad(p))
    assert _bad(b"").kind == "empty"


def _png_header(w: int, h: int) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_zero_size_image():
    e = _bad(_png_header(0, 10))
    assert e.kind == "zero_size" and "declares 0x10 pixels" in str(e)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    data = _enc(noise, fmt)
    e = _bad(data[: len(data) // 2])
    assert e.kind == "truncated" and "truncated" in str(e)


def test_unknown_policy_and_bad_limit_are_refused_when_configured():
    from encoders.datamodule import HMItems, SimItems

    with pytest.raises(ValueError, match="bad_images='drop'; choose from"):
        build_image_cache([_enc(Image.new("RGB", (4, 4)))], 4, bad_images="drop")
    with pytest.raises(ValueError, match="bad_images='drop'"):
        SimItems(bad_images="drop")  # at configuration time, before anything is decoded
    with pytest.raises(ValueError, match="max_image_pixels=0 must be a positive integer"):
        HMItems(max_image_pixels=0)


# ---------------------------------------------------------------------------------------------
# decodable images: converted to RGB


def test_greyscale_l_and_1_bit():
    a = decode_image(_enc(Image.new("L", (8, 8), 77)), 8)
    assert a.dtype == np.uint8 and a.shape == (3, 8, 8) and (a == 77).all()
    one = Image.new("1", (8, 8), 0)
    one.paste(1, (0, 0, 8, 4))  # top half white
    b = decode_image(_enc(one), 8)
    assert _rgb(b, 1, 4) == WHITE and _rgb(b, 6, 4) == (0, 0, 0)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _enc(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert _close(_rgb(decode_image(data, 8), 4, 4), (255, 0, 0))


def test_rgba_png_is_composited_onto_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black: white once composited
    im.paste((200, 0, 0, 255), (0, 0, 8, 4))  # opaque red on top
    im.paste((200, 0, 0, 128), (0, 6, 8, 8))  # half-transparent red at the bottom
    a = decode_image(_enc(im), 8)
    assert _rgb(a, 1, 4) == (200, 0, 0)
    assert _rgb(a, 4, 4) == WHITE  # not black: the alpha is not just dropped
    assert _close(_rgb(a, 7, 4), (228, 127, 127), tol=2)  # 200*a + 255*(1-a), a = 128/255


def test_16_bit_png_is_scaled_by_its_bit_depth():
    values = np.array([[0, 257, 1000, 32896, 65535, 65535, 65535, 65535]] * 8, dtype=np.uint16)
    data = _enc(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    a = decode_image(data, 8)
    assert a[0, 0].tolist() == [0, 1, 4, 128, 255, 255, 255, 255]  # round(v * 255 / 65535), not clipped
    assert (a[0] == a[1]).all() and (a[1] == a[2]).all()


def test_16_bit_big_endian_and_32_bit_int_greyscale():
    big = Image.fromarray(np.full((4, 4), 32896, dtype=">u2"))
    assert big.mode == "I;16B" and open_rgb(_enc(big, "TIFF")).getpixel((0, 0)) == (128, 128, 128)
    # a 12-bit PGM: PIL opens it as mode I spread over 0..65535
    pgm = b"P2\n2 1\n4095\n0 2048\n"
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert [open_rgb(pgm).getpixel((x, 0))[0] for x in range(2)] == [0, 128]


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    p.paste(1, (0, 0, 8, 4))  # top half blue, bottom half index 0: transparent
    data = _enc(p, transparency=0)
    a = decode_image(data, 8)
    assert _rgb(a, 1, 4) == BLUE and _rgb(a, 6, 4) == WHITE
    # without transparency index 0 is its palette colour
    assert _rgb(decode_image(_enc(p), 8), 6, 4) == (0, 0, 0)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (16, 8), RED)
    im.paste(BLUE, (8, 0, 16, 8))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red on top
    a = decode_image(_enc(im, "JPEG", quality=95, exif=exif), 16)
    assert _close(_rgb(a, 2, 8), RED, tol=12) and _close(_rgb(a, 13, 8), BLUE, tol=12)
    assert _rgb(a, 8, 0) == _rgb(a, 8, 15)  # portrait now: padded left and right, not top and bottom


@pytest.fixture(scope="module")
def huge_jpeg() -> bytes:
    """14000 x 14000 flat grey (196 MP, over PIL's own hard limit of 2 x 89.5 MP): ~3 MB as JPEG."""
    return _enc(Image.new("L", (14000, 14000), 90), "JPEG", quality=50)


def test_huge_image_within_the_limit_decodes_at_a_reduced_scale(huge_jpeg):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = open_rgb(huge_jpeg, (32, 32))
        a = decode_image(huge_jpeg, 32)
    assert im.size == (1750, 1750)  # the 1/8 DCT scale: never decoded whole
    assert a.shape == (3, 32, 32) and (np.abs(a.astype(int) - 90) <= 1).all()


def test_huge_image_over_the_limit_is_bad(huge_jpeg):
    e = _bad(huge_jpeg, max_pixels=10_000_000)
    assert e.kind == "too_large"
    assert str(e) == "image too large: 14000x14000 = 196,000,000 pixels, over the limit of 10,000,000"


# ---------------------------------------------------------------------------------------------
# the policy, end to end through an item set


def _colour(i: int) -> tuple[int, int, int]:
    return (30 * i, 255 - 30 * i, 100)


def _items() -> pl.DataFrame:
    """Items 100..107: 101 undecodable, 103 null, 104 empty, 106 truncated; the rest distinct colours."""
    good = {i: _enc(Image.new("RGB", (12, 12), _colour(i))) for i in range(8)}
    noise = _enc(Image.effect_noise((32, 32), 60).convert("RGB"))
    images = [good[0], b"GIF89a garbage", good[2], None, b"", good[5], noise[: len(noise) // 2], good[7]]
    return pl.DataFrame({"item_id": list(range(100, 108)), "image": images,
                         "title": [f"title {i}" for i in range(8)],
                         "category": ["a", "b", "a", "c", "b", "c", "a", "b"],
                         "product": ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]},
                        schema_overrides={"image": pl.Binary})


def test_fail_policy_names_source_column_row_item_and_reason():
    with pytest.raises(ContractError) as e:
        items_from_table(_items().with_columns(pl.col("image").fill_null(b"x")), 8, None,
                         source="items.parquet")
    msg = str(e.value)
    assert msg.startswith("items.parquet, column 'image', rows 1, 3, 4, 6 (0-based data rows): item_id 101: "
                          "cannot decode image: PIL cannot identify its format; 4 bad images in all")
    assert e.value.rows == [1, 3, 4, 6] and "bad_images='skip'" in msg
    with pytest.raises(ContractError, match=r"row 3 .*item_id 103: null image"):  # the default policy
        items_from_table(_items(), 8, None, source="items.parquet")


def test_skip_policy_leaves_items_out_aligned_and_counted(tmp_path, caplog):
    table = _items()
    with caplog.at_level(logging.WARNING, logger="encoders.images"):
        items = items_from_table(table, 8, tmp_path, source="items.parquet", group_col="product",
                                 bad_images="skip", held_out=(0.5, 0.25, 0.25))
    kept = [0, 2, 5, 7]
    assert items.item_ids.tolist() == [100 + i for i in kept]
    assert items.titles == [f"title {i}" for i in kept]
    assert [_rgb(items.images[r], 4, 4) for r in range(4)] == [_colour(i) for i in kept]
    assert items.category.tolist() == [0, 0, 2, 1]  # a, a, c, b
    assert len(set(items.group.tolist())) == 4 and len(items.split) == 4  # products p0..p3, one item each
    full = items_from_table(table.filter(pl.col("item_id").is_in([100, 102, 105, 107])), 8, None,
                            source="items.parquet", group_col="product", held_out=(0.5, 0.25, 0.25))
    assert np.array_equal(items.split, full.split) and np.array_equal(items.group, full.group)
    summary = items.image_failures.summary()
    assert summary["skipped"] == 4 and summary["policy"] == "skip"
    assert summary["reasons"] == {"empty": 1, "null": 1, "truncated": 1, "unidentified": 1}
    assert [(x["row"], x["item_id"], x["reason"]) for x in summary["examples"]] == [
        (1, 101, "unidentified"), (3, 103, "null"), (4, 104, "empty"), (6, 106, "truncated")]
    json.dumps(summary)  # what metrics.json records
    assert "4 of 8 images are bad and left out" in caplog.text and "item_id 101" in caplog.text
    # the cache keeps the failures: a second call decodes nothing and reports the same
    (cached,) = tmp_path.glob("images-*.npy")
    assert (tmp_path / f"{cached.stem}.failures.json").exists()
    mtime = cached.stat().st_mtime_ns
    again = items_from_table(table, 8, tmp_path, source="items.parquet", group_col="product",
                             bad_images="skip", held_out=(0.5, 0.25, 0.25))
    assert cached.stat().st_mtime_ns == mtime and again.image_failures.summary() == summary
    assert np.array_equal(again.images, items.images) and again.image_fingerprint == items.image_fingerprint


def test_the_fingerprint_reflects_the_policy_and_the_pixel_limit():
    imgs = [_enc(Image.new("RGB", (4, 4)))]
    fps = {images_fingerprint(imgs, 8), images_fingerprint(imgs, 8, bad_images="skip"),
           images_fingerprint(imgs, 8, max_pixels=1000)}
    assert len(fps) == 3


def test_skip_every_image_is_an_error():
    table = pl.DataFrame({"item_id": [1, 2], "image": [b"x", b""]})
    with pytest.raises(ContractError, match=r"rows 0, 1 .*every image is bad"):
        items_from_table(table, 8, None, source="items.parquet", bad_images="skip")


def test_decode_names_the_source_rows_and_ids_and_takes_no_images():
    good, bad = _enc(Image.new("RGB", (4, 4), RED)), b"not an image"
    with pytest.raises(ContractError, match=r"x.parquet, column 'jpeg', row 7 .*creative_id 12: cannot decode"):
        decode_images([good, bad], 8, source="x.parquet", column="jpeg", ids=[11, 12], id_name="creative_id",
                      rows=[3, 7])
    d = decode_images([good, bad], 8, source="x.parquet", column="jpeg", ids=[11, 12], rows=[3, 7],
                      bad_images="skip")
    assert d.kept.tolist() == [0] and d.failures.rows == [7] and d.failures.item_ids == [12]
    with pytest.raises(ContractError, match=r"row 7 .*every image is bad .*e.g. creative_id 12"):
        decode_images([bad], 8, ids=[12], id_name="creative_id", rows=[7], bad_images="skip")
    empty = decode_images([], 8, bad_images="skip")  # nothing to decode: no failure, no error
    assert len(empty.kept) == 0 and len(empty.failures) == 0


def test_skip_missing_and_too_large_files_by_path(tmp_path):
    ok, big = tmp_path / "ok.png", tmp_path / "big.png"
    ok.write_bytes(_enc(Image.new("RGB", (10, 10), RED)))
    big.write_bytes(_enc(Image.new("RGB", (100, 100), BLUE)))
    table = pl.DataFrame({"item_id": [1, 2, 3], "image_path": [str(ok), str(tmp_path / "gone.png"), str(big)]})
    missing = r"items.csv, column 'image_path', row 1 .*item_id 2: cannot read image file .*gone.png"
    with pytest.raises(ContractError, match=missing):
        items_from_table(table, 8, tmp_path / "cache", source="items.csv")
    items = items_from_table(table, 8, tmp_path / "cache", source="items.csv", bad_images="skip", max_pixels=5000)
    assert items.item_ids.tolist() == [1]
    assert items.image_failures.summary()["reasons"] == {"missing_file": 1, "too_large": 1}
    decoded = decode_images(table["image_path"].to_list(), 8, bad_images="skip", max_pixels=5000)
    assert decoded.kept.tolist() == [0] and decoded.pixels.shape == (1, 3, 8, 8)


def test_skipped_items_leave_the_click_log():
    table = _items()
    items = items_from_table(table, 8, None, source="items.parquet", bad_images="skip")
    # request r: query 100, shown 101 (skipped, clicked), 102 (clicked), 105; request s: query 103 (skipped)
    events = pl.DataFrame({
        "request_id": [1, 1, 1, 2, 2], "query_item_id": [100, 100, 100, 103, 103],
        "item_id": [101, 102, 105, 102, 105], "clicked": [1, 1, 0, 1, 0],
        "timestamp": [0, 0, 0, 1, 1], "position": [0, 1, 2, 0, 1]})
    log = ClickLog.from_events(events, items, fractions=(1.0, 0.0, 0.0))
    row = {int(i): r for r, i in enumerate(items.item_ids)}
    assert log.pairs["train"].tolist() == [[row[100], row[102]]]
    assert log.shown["train"].tolist() == [[row[105]]] and log.dropped_events == 3
    unknown = events.with_columns(pl.lit(999).alias("item_id"))  # not a skipped item: still an error
    with pytest.raises(ContractError, match="not in the item set"):
        ClickLog.from_events(unknown, items)


def test_hm_items_name_the_parquet_rows(tmp_path):
    hm = tmp_path / "hm"
    hm.mkdir()
    pl.DataFrame({"article_id": ["0003", "0001", "0002"], "product_code": ["1", "1", "2"],
                  "prod_name": ["a", "b", "c"], "product_type_name": ["t", "t", "u"],
                  "detail_desc": ["x", "y", "z"]}).write_csv(hm / "articles.csv")
    good = _enc(Image.new("RGB", (8, 8), RED))
    pl.DataFrame({"article_id": ["0003", "0001", "0002"], "jpeg": [b"broken", good, good]}).write_parquet(
        hm / "images.parquet")
    with pytest.raises(ContractError, match=r"images.parquet, column 'jpeg', row 0 .*item_id 3: cannot decode"):
        hm_items(8, None, data_dir=str(hm))
    items = hm_items(8, None, data_dir=str(hm), held_out=(1.0, 0.0, 0.0), bad_images="skip")
    assert items.item_ids.tolist() == [1, 2] and items.meta["n_products"] == 2
    s = items.image_failures.summary()
    assert s["column"] == "jpeg" and s["source"].endswith("images.parquet")
    assert [(x["row"], x["item_id"]) for x in s["examples"]] == [(0, 3)]


def test_real_catalogue_sample_replaces_bad_photos(tmp_path):
    from ctr.data.sources.catalogues import load_catalogue

    d = tmp_path / "hm_fashion_images_sample"
    d.mkdir()
    ids = [f"000{i}" for i in range(5)]
    pl.DataFrame({"article_id": ids, "product_type_name": ["Dress"] * 5, "colour_group_name": ["Red"] * 5,
                  "graphical_appearance_name": ["Solid"] * 5, "perceived_colour_value_name": ["Dark"] * 5,
                  "prod_name": ids, "detail_desc": ["A dress."] * 5}).write_csv(d / "articles.csv")
    photos = [_enc(Image.new("RGB", (16, 24), RED), "JPEG") for _ in ids]
    photos[3] = photos[3][:100]  # truncated
    pl.DataFrame({"article_id": ids, "jpeg": photos}).write_parquet(d / "images.parquet")
    with pytest.raises(ContractError, match=r"images.parquet, column 'jpeg', row 3 .*article_id 0003: "):
        load_catalogue("hm", 5, np.random.default_rng(0), tmp_path)
    seed = next(s for s in range(50) if 3 in np.random.default_rng(s).choice(5, size=4, replace=False))
    cat = load_catalogue("hm", 4, np.random.default_rng(seed), tmp_path, bad_images="skip")
    assert sorted(cat.source_ids) == ["0000", "0001", "0002", "0004"] and len(cat.images) == 4
    assert cat.image_failures["skipped"] == 1 and cat.image_failures["examples"][0]["item_id"] == "0003"
    with pytest.raises(ContractError, match="too few products with a usable photo"):
        load_catalogue("hm", 5, np.random.default_rng(0), tmp_path, bad_images="skip")


# ---------------------------------------------------------------------------------------------
# the policy through its other callers: the simulator's real catalogue, MOON2.0, Creative4U


_SIM_TINY = dict(n_users=4, n_requests=12, n_random_requests=4, k=2, days=1.0, random_days=1.0)


def _hm_folder(root, n: int = 6, bad: int = 3, moon2: bool = False):
    """A tiny H&M catalogue in ``root/hm_fashion_images_sample``: articles 0000..000{n-1}, the
    photo of article ``bad`` truncated (``moon2``: with the attribute columns MOON2.0 reads)."""
    d = root / "hm_fashion_images_sample"
    d.mkdir(parents=True)
    ids = [f"{i:04d}" for i in range(n)]
    cols = {"article_id": ids, "product_code": [str(i // 2) for i in range(n)],
            "product_type_name": ["Dress", "Top"] * (n // 2), "colour_group_name": ["Red", "Blue"] * (n // 2),
            "graphical_appearance_name": ["Solid"] * n, "perceived_colour_value_name": ["Dark"] * n,
            "prod_name": [f"name {i}" for i in ids], "detail_desc": ["A garment."] * n}
    if moon2:
        cols["garment_group_name"] = ["Jersey"] * n
    pl.DataFrame(cols).write_csv(d / "articles.csv")
    photos = [_enc(Image.new("RGB", (16, 24), RED if i % 2 == 0 else BLUE), "JPEG") for i in range(n)]
    photos[bad] = photos[bad][:100]  # truncated
    pl.DataFrame({"article_id": ids, "jpeg": photos}).write_parquet(d / "images.parquet")
    return d


def test_simulator_real_catalogue_follows_the_policy(tmp_path, monkeypatch):
    from ctr.data.sources.simulator import SimConfig, SimulatorSource, simulate

    _hm_folder(tmp_path)
    monkeypatch.setenv("CTR_DATA_DIR", str(tmp_path))
    with pytest.raises(ContractError, match=r"images.parquet, column 'jpeg', row 3 .*article_id 0003: cannot decode"):
        simulate(SimConfig(catalogue="hm", n_items=6, **_SIM_TINY))  # every product drawn: 0003 too
    src = SimulatorSource("tiny", overrides={"catalogue": "hm", "n_items": 6, **_SIM_TINY})
    with pytest.raises(ContractError, match=r"row 3 .*article_id 0003"):  # the CTR stage's source
        src.load()
    # skip: 0003 is replaced by the product not drawn yet; a seed that draws it, so it is counted
    for seed in range(10):
        d = simulate(SimConfig(catalogue="hm", n_items=5, seed=seed, bad_images="skip", **_SIM_TINY))
        assert sorted(d.item_truth["source_id"].to_list()) == ["0000", "0001", "0002", "0004", "0005"]
        if d.catalogue.image_failures:
            break
    f = d.catalogue.image_failures
    assert f["policy"] == "skip" and f["skipped"] == 1 and f["reasons"] == {"truncated": 1}
    assert (f["examples"][0]["row"], f["examples"][0]["item_id"]) == (3, "0003")
    tables = SimulatorSource("tiny", seed=seed, bad_images="skip",
                             overrides={"catalogue": "hm", "n_items": 5, **_SIM_TINY}).load()
    assert tables.items.equals(d.items)
    with pytest.raises(ValueError, match="bad_images='drop'"):
        SimConfig(bad_images="drop")
    with pytest.raises(ValueError, match="max_image_pixels=0"):
        SimConfig(max_image_pixels=0)


def test_simulator_fingerprint_changes_with_the_policy_only(tmp_path, monkeypatch):
    import hashlib

    from ctr.data.sources.simulator import PRESETS, SIM_VERSION, SimConfig, SimulatorSource
    from encoders.images import MAX_PIXELS

    for preset in PRESETS:  # the defaults keep the fingerprints they had before the knobs
        cfg = SimConfig.preset(preset).to_dict()
        for k in ("catalogue", "bad_images", "max_image_pixels"):
            del cfg[k]
        want = hashlib.sha256(json.dumps({"config": cfg, "version": SIM_VERSION}, sort_keys=True,
                                         default=str).encode()).hexdigest()
        assert SimulatorSource(preset).fingerprint() == want
        assert SimulatorSource(preset, bad_images="fail", max_image_pixels=MAX_PIXELS).fingerprint() == want
    _hm_folder(tmp_path)
    monkeypatch.setenv("CTR_DATA_DIR", str(tmp_path))
    real = {"catalogue": "hm", "n_items": 5, **_SIM_TINY}
    fps = {SimulatorSource("tiny", overrides=real).fingerprint(),
           SimulatorSource("tiny", overrides=real, bad_images="skip").fingerprint(),
           SimulatorSource("tiny", overrides={**real, "bad_images": "skip"}).fingerprint(),
           SimulatorSource("tiny", overrides=real, max_image_pixels=10_000).fingerprint()}
    assert len(fps) == 3  # the policy as a field or an override is the same config
    assert SimulatorSource("tiny", bad_images="skip").describe() == SimulatorSource("tiny").describe()


def test_ctr_sim_config_passes_the_policy_to_the_simulator():
    from pathlib import Path

    from hydra.utils import instantiate

    from ctr.runs import compose_config

    conf = Path(__file__).resolve().parents[1] / "conf"
    cfg = compose_config(conf, ["data=sim", "data.source.bad_images=skip", "data.source.max_image_pixels=1000"],
                         cache_dir="/tmp", run_dir="/tmp")
    src = instantiate(cfg.data.source, _convert_="all")
    assert (src.config().bad_images, src.config().max_image_pixels) == ("skip", 1000)
    default = instantiate(compose_config(conf, ["data=sim"], cache_dir="/tmp", run_dir="/tmp").data.source,
                          _convert_="all")
    assert (default.config().bad_images, default.config().max_image_pixels) == ("fail", None)


def _fashion_folder(root, n: int = 5, bad: int = 2):
    """A tiny Fashion Product Images folder: ids 10..10+n-1, photos in reverse id order in the
    parquet, the photo of id ``10 + bad`` undecodable."""
    d = root / "fashion_product_images_small"
    d.mkdir(parents=True)
    ids = list(range(10, 10 + n))
    pl.DataFrame({"id": [str(i) for i in ids], "productDisplayName": [f"item {i}" for i in ids],
                  "baseColour": [f"c{i}" for i in ids], "usage": ["Casual"] * n, "subCategory": ["Topwear"] * n,
                  "articleType": ["Tshirts", "Shirts"] * (n // 2) + ["Tops"] * (n % 2)}).write_csv(d / "styles.csv")
    photos = {i: _enc(Image.new("RGB", (6, 8), _colour(i - 10)), "JPEG") for i in ids}
    photos[10 + bad] = b"not a jpeg"
    rev = ids[::-1]  # parquet row of id i: n - 1 - (i - 10)
    pl.DataFrame({"id": rev, "jpeg": [photos[i] for i in rev]}).write_parquet(d / "images.parquet")
    return d


def test_moon2_sources_follow_the_policy(tmp_path):
    from encoders.moon2.datamodule import Moon2DataModule
    from encoders.moon2.features import fashion_products, hm_products

    _fashion_folder(tmp_path)
    # fail: images.parquet's own column and row (id 12 is parquet row 2 of 5, reversed: row 2)
    with pytest.raises(ContractError, match=r"fashion_product_images_small/images.parquet, column 'jpeg', row 2 "
                                            r".*item_id 12: cannot decode image"):
        fashion_products(8, None, data_dir=str(tmp_path), held_out=None)
    p = fashion_products(8, None, data_dir=str(tmp_path), held_out=None, bad_images="skip")
    assert p.items.item_ids.tolist() == [10, 11, 13, 14] and len(p.items.images) == 4
    assert p.attrs["colour"].tolist() == ["c10", "c11", "c13", "c14"]  # the attributes follow the kept items
    assert p.items.titles == ["item 10", "item 11", "item 13", "item 14"]
    s = p.items.image_failures.summary()
    assert s["skipped"] == 1 and s["column"] == "jpeg" and s["source"].endswith("images.parquet")
    assert [(x["row"], x["item_id"], x["reason"]) for x in s["examples"]] == [(2, 12, "unidentified")]

    _hm_folder(tmp_path / "hmroot", moon2=True)
    hm = str(tmp_path / "hmroot")
    with pytest.raises(ContractError, match=r"images.parquet, column 'jpeg', row 3 .*item_id 3: cannot decode"):
        hm_products(8, None, data_dir=hm, held_out=(1.0, 0.0, 0.0))
    p = hm_products(8, None, data_dir=hm, held_out=(1.0, 0.0, 0.0), bad_images="skip")
    assert p.items.item_ids.tolist() == [0, 1, 2, 4, 5] and p.attrs["colour"].tolist() == ["Red", "Blue", "Red",
                                                                                           "Red", "Blue"]
    assert p.items.image_failures.summary()["examples"][0]["row"] == 3

    # the data module hands its data settings to every source (towers left out: no tokens here)
    dm = Moon2DataModule(None, None, data_dir=str(tmp_path), held_out=(1.0, 0.0, 0.0), bad_images="skip",
                         max_image_pixels=10_000)
    dm._tokens = lambda products: None
    products, _ = dm.load("fashion", None)
    assert products.items.image_failures.summary()["skipped"] == 1
    with pytest.raises(ValueError, match="bad_images='drop'"):
        Moon2DataModule(None, None, bad_images="drop")
    assert json.dumps(products.items.image_failures.summary())


def _creative_folder(root):
    """A data folder from the pairs command (12 products), the image of the first training pair's
    creative A truncated. Returns (folder, its creatives.parquet row, its creative_id)."""
    from ctr.creative.pairs import main as pairs_main

    out = pairs_main(["--out", str(root / "data"), "--n-products", "12", "--seed", "2"])
    creatives = pl.read_parquet(out / "creatives.parquet")
    cid = pl.read_parquet(out / "pairs.parquet").filter(pl.col("split") == "train")["creative_a"][0]
    row = creatives["creative_id"].to_list().index(cid)
    img = creatives["image"][row]
    creatives.with_columns(pl.when(pl.col("creative_id") == cid).then(pl.lit(img[: len(img) // 3]))
                           .otherwise(pl.col("image")).alias("image")).write_parquet(out / "creatives.parquet")
    return out, row, cid


def test_creative_images_follow_the_policy(tmp_path):
    from ctr.creative.data import CreativeDataModule

    out, row, cid = _creative_folder(tmp_path)
    kw = dict(dir=str(out), image_size=16, tokens=False, cot=True)
    with pytest.raises(ContractError, match=rf"creatives.parquet, column 'image', row {row} .*creative_id {cid}: "
                                            r"cannot decode image \(truncated\)"):
        CreativeDataModule(**kw).setup()
    dm = CreativeDataModule(**kw, bad_images="skip")
    dm.setup()
    t, pairs = dm.tables, pl.read_parquet(out / "pairs.parquet")
    assert cid not in t.creatives["creative_id"].to_list() and len(dm.images.pixels) == t.creatives.height
    shows = (pl.col("creative_a") == cid) | (pl.col("creative_b") == cid)
    assert dm.pairs_without_image == pairs.filter(shows).height > 0
    assert sum(dm.splits[s].height for s in dm.splits) == pairs.height - dm.pairs_without_image
    ids = t.creatives["creative_id"].to_numpy()
    for s, df in dm.splits.items():  # the renumbered rows still point at each pair's creatives
        assert (ids[df["row_a"].to_numpy()] == df["creative_a"].to_numpy()).all()
        assert (ids[df["row_b"].to_numpy()] == df["creative_b"].to_numpy()).all()
    s = dm.image_failures.summary()
    assert s["skipped"] == 1 and s["reasons"] == {"truncated": 1} and s["source"].endswith("creatives.parquet")
    assert [(x["row"], x["item_id"]) for x in s["examples"]] == [(row, cid)]
    assert cid not in dm.cells("train")["creative_id"].to_list()


def _compose(stage: str, overrides: list[str], tmp_path, run: str = "run"):
    from pathlib import Path

    from ctr.runs import compose_config

    conf = Path(__file__).resolve().parents[1] / "conf" / stage
    return compose_config(conf, [*overrides, "logger=csv", "trainer.enable_progress_bar=false"],
                          run_dir=tmp_path / run, cache_dir=tmp_path / "cache")


def test_moon2_run_reports_skipped_photos_in_metrics_json(tmp_path):
    from omegaconf import open_dict

    from encoders.moon2.train import train

    _fashion_folder(tmp_path, n=12, bad=2)
    _hm_folder(tmp_path, n=12, bad=3, moon2=True)
    cfg = _compose("moon2", ["experiment=dual_encoder", "trainer.fast_dev_run=true", "data.bad_images=skip",
                             "data.held_out=[0.4,0.3,0.3]", "data.batch_size=4", "image_size=32"], tmp_path)
    with open_dict(cfg):
        cfg.data.data_dir = str(tmp_path)
    train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    hm, fashion = saved["image_failures"]["hm"], saved["image_failures"]["fashion"]
    assert (hm["skipped"], hm["examples"][0]["row"], hm["examples"][0]["item_id"]) == (1, 3, 3)
    assert (fashion["skipped"], fashion["examples"][0]["item_id"], fashion["reasons"]) == (1, 12, {"unidentified": 1})
    assert saved["items"]["hm"]["n"] == saved["items"]["fashion"]["n"] == 11


def test_creative_run_reports_skipped_creatives_in_metrics_json(tmp_path):
    from ctr.creative.train import train

    out, row, cid = _creative_folder(tmp_path)
    small = ["experiment=creative_sft_answer", "trainer.fast_dev_run=1", f"data.dir={out}", "data.image_size=64",
             "data.batch_size=8", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2"]
    with pytest.raises(ContractError, match=rf"creatives.parquet, column 'image', row {row} .*creative_id {cid}"):
        train(_compose("creative", small, tmp_path, run="failed"))
    m = train(_compose("creative", [*small, "data.bad_images=skip"], tmp_path))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["image_failures"] == m["image_failures"]
    assert saved["image_failures"]["skipped"] == 1 and saved["image_failures"]["examples"][0]["item_id"] == cid
    assert saved["data"]["pairs_without_image"] > 0
