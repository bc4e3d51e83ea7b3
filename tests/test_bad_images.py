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
