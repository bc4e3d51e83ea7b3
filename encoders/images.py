"""Image input: decode with PIL, a decoded-and-resized uint8 cache, batched augmentation in torch.

Decoding JPEGs is the slow part of an image pipeline on CPU, so it happens once:
:func:`decode_images` (and its array-only form :func:`build_image_cache`) decodes every image
(bytes or a path), fits it into a square of ``size`` pixels (aspect kept, padded with the photo's
own border colour, so garments are never cropped or distorted), and stores the result as one
``uint8 [N, 3, size, size]`` array under a fingerprint of the images and the settings. Later
epochs and later runs memory-map that array.

Every decodable image becomes 8-bit RGB (:func:`open_rgb`): greyscale, 1-bit, palette and CMYK
images by PIL's conversions, 16-bit greyscale scaled by its bit depth, transparent pixels
composited onto white, EXIF orientation applied; a huge JPEG is decoded at a reduced scale. The
rest are *bad images* (:class:`BadImage`: null, a missing or unreadable file, no bytes, a zero
size, an unknown format, truncated or broken data, more pixels than ``max_pixels``), handled by
the ``bad_images`` policy: ``"fail"`` raises a :class:`ContractError` naming the source, the
column, the rows (and item ids) and the reason; ``"skip"`` leaves them out, logs a warning and
reports them (:class:`ImageFailures`).

Augmentation runs on whole batches of those uint8 tensors, on whatever device the model is on
(:class:`BatchAugment`): random resized crop and horizontal flip as one affine ``grid_sample``, and
colour jitter (brightness, contrast, saturation, hue) plus random greyscale as a few tensor ops.
No per-image Python runs in the training loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ctr.data.contract import ContractError

log = logging.getLogger(__name__)

# 2: transparency composited onto white, 16-bit greyscale scaled, EXIF orientation applied, and
# the bad-image policy and pixel limit in the key
CACHE_VERSION = 2
#: What :func:`decode_images` does with a bad image: raise, or leave it out and count it.
BAD_IMAGE_POLICIES = ("fail", "skip")
#: Default limit on width x height: a bigger image is bad (``too_large``). 200 MP is above any
#: camera's photo and far below what a decompression bomb would expand to.
MAX_PIXELS = 200_000_000

_BYTES = (bytes, bytearray, memoryview)
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class BadImage(ValueError):
    """An image that cannot be used. ``kind`` names the reason: ``null``, ``missing_file``,
    ``unreadable_file``, ``empty`` (0 bytes), ``zero_size``, ``unidentified`` (not an image
    format PIL reads), ``truncated``, ``too_large`` or ``undecodable`` (other broken data); the
    message adds what the file system or PIL said."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ----------------------------------------------------------------------------------------------
# one image


def open_rgb(data: bytes | str | os.PathLike | None, box: tuple[int, int] | None = None,
             max_pixels: int = MAX_PIXELS, *, reduce: int | None = None) -> Image.Image:
    """Open one image (encoded bytes or a file path) as an upright 8-bit ``RGB`` PIL image.

    A JPEG is decoded at the smallest DCT scale (1/2 .. 1/8) that still covers ``box`` (width,
    height), or at about ``1 / reduce`` of its size, so a huge photo costs little; other formats
    (and a JPEG without either) are decoded whole. Greyscale, 1-bit, palette, CMYK and YCbCr
    images go through PIL's conversions; 16/32-bit greyscale is scaled by its bit depth (PIL's own
    conversion clips at 255, turning it white); an alpha channel, a palette's transparency or a
    colour key is composited onto white; EXIF orientation is applied. Raises :class:`BadImage`
    for anything that cannot be decoded or has more than ``max_pixels`` (width x height).
    """
    if data is None:
        raise BadImage("null", "null image")
    _allow_pixels(max_pixels)
    try:
        return _open_rgb(data, box, max_pixels, reduce)
    except (BadImage, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - PIL reports broken data as OSError, SyntaxError, struct.error, ...
        raise _explain(data, e, max_pixels) from e


def decode_image(data: bytes | str | os.PathLike | None, size: int, *,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image (encoded bytes or a file path) to ``uint8 [3, size, size]``.

    The image (8-bit RGB by :func:`open_rgb`) is scaled to fit ``size`` x ``size`` with its aspect
    ratio kept and centred on a canvas of its own median border colour. Raises :class:`BadImage`
    (a ``ValueError``) when it cannot be used.
    """
    im = open_rgb(data, (size, size), max_pixels)
    w, h = im.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    arr = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0))
    if nw == size and nh == size:
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    out = np.empty((size, size, 3), np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = arr
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _allow_pixels(max_pixels: int) -> None:
    """PIL refuses an image over twice ``Image.MAX_IMAGE_PIXELS`` (89.5 MP by default) when it
    opens it, before any caller can look; :func:`open_rgb` applies its own limit instead, so PIL's
    is raised to it (never lowered)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open_rgb(data, box: tuple[int, int] | None, max_pixels: int, reduce: int | None) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, _BYTES) else data) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise BadImage("too_large", f"{_where(data)}image too large: {w}x{h} = {w * h:,} pixels, over "
                                        f"the limit of {max_pixels:,}")
        if reduce:
            box = (max(1, w // reduce), max(1, h // reduce))
        if box is not None:
            im.draft("RGB", box)  # JPEG: decode at a reduced DCT scale
        rgb = _to_rgb(im)  # loads: broken data raises here
        turn = _TRANSPOSE.get(_orientation(im))
    return rgb if turn is None else rgb.transpose(turn)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: upright); malformed EXIF does not make a decodable image bad."""
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - any EXIF parsing error
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = _grey_to_8bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))  # alpha blend onto white
        return out
    return im.convert("RGB")


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (``I;16*``) or 32-bit (``I``) greyscale as ``L``: ``round(v * 255 / (2**bits - 1))``.
    ``bits``: 16 for ``I;16*`` and for ``I`` images whose format says nothing (PNG and PGM store at
    most 16 bits, which PIL spreads over 0..65535); a TIFF's BitsPerSample otherwise."""
    bits = 16
    if im.mode == "I":
        tag = getattr(im, "tag_v2", {}).get(258, 16)  # TIFF BitsPerSample
        bits = int(tag[0] if isinstance(tag, tuple) else tag)
    top = (1 << bits) - 1
    a = np.clip(np.asarray(im), 0, top).astype(np.uint32 if bits <= 16 else np.uint64)
    return Image.fromarray(((a * 255 + top // 2) // top).astype(np.uint8), "L")


def _where(data) -> str:
    return "" if isinstance(data, _BYTES) else f"{os.fspath(data)}: "


def _explain(data, e: Exception, max_pixels: int) -> BadImage:
    """The :class:`BadImage` that says why the file system or PIL refused ``data``."""
    where = _where(data)
    if isinstance(e, Image.DecompressionBombError):
        return BadImage("too_large", f"{where}image too large: over the limit of {max_pixels:,} pixels ({e})")
    if isinstance(e, OSError) and e.errno is not None:  # the file system's error, not PIL's
        kind = "missing_file" if isinstance(e, FileNotFoundError) else "unreadable_file"
        return BadImage(kind, f"cannot read image file {os.fspath(data)}: {e.strerror}")
    if isinstance(e, UnidentifiedImageError):
        head = _head(data)
        if not head:
            return BadImage("empty", f"{where}cannot decode image: no data (0 bytes)")
        size = _declared_size(head)
        if size is not None and 0 in size:
            return BadImage("zero_size", f"{where}cannot decode image: its header declares "
                                         f"{size[0]}x{size[1]} pixels")
        return BadImage("unidentified", f"{where}cannot decode image: PIL cannot identify its format")
    kind = "truncated" if "truncated" in str(e).lower() else "undecodable"
    return BadImage(kind, f"{where}cannot decode image ({kind}): {type(e).__name__}: {e}")


def _head(data, n: int = 32) -> bytes:
    if isinstance(data, _BYTES):
        return bytes(data[:n])
    try:
        with open(data, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _declared_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF or BMP header (PIL will not open a zero-sized image)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"BM" and len(head) >= 26:
        w, h = struct.unpack("<ii", head[18:26])
        return abs(w), abs(h)
    return None


# ----------------------------------------------------------------------------------------------
# many images: the cache and the bad-image policy


@dataclass
class ImageFailures:
    """Bad images left out under ``bad_images="skip"`` (empty under ``"fail"``): their rows in
    ``source`` (0-based; :func:`decode_images`' ``rows``, else the input positions), reasons (:attr:`BadImage.kind`), messages and, when known, item ids."""

    source: str = ""
    column: str = ""
    policy: str = "fail"
    rows: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    item_ids: list | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, examples: int = 5) -> dict:
        """For logs and ``metrics.json``: the policy, the number skipped, a count per reason and
        the first ``examples`` failures (row, item id, reason, message)."""
        ids = self.item_ids if self.item_ids is not None else [None] * len(self.rows)
        return {"policy": self.policy, "skipped": len(self.rows),
                "reasons": dict(sorted(Counter(self.kinds).items())),
                "source": self.source, "column": self.column,
                "examples": [{"row": r, "item_id": i, "reason": k, "message": m} for r, i, k, m in
                             list(zip(self.rows, ids, self.kinds, self.messages))[:examples]]}

    def add(self, row: int, err: BadImage, item_id=None) -> None:
        """Record one bad image: its row, its :class:`BadImage` and, when ids are kept, its item id."""
        if item_id is not None and self.item_ids is None:
            self.item_ids = [None] * len(self.rows)
        self.rows.append(row)
        self.kinds.append(err.kind)
        self.messages.append(str(err))
        if self.item_ids is not None:
            self.item_ids.append(item_id)


@dataclass
class DecodedImages:
    """What :func:`decode_images` returns."""

    pixels: np.ndarray  # uint8 [K, 3, S, S]: the usable images, in input order (memory-mapped when cached)
    kept: np.ndarray  # int64 [K]: their rows in the input
    failures: ImageFailures  # the rows left out (``"skip"`` only)
    fingerprint: str  # :func:`images_fingerprint` of the input and the settings


def images_fingerprint(images: Sequence[bytes | str | os.PathLike | None], size: int, *,
                       source: str = "images", column: str = "image", bad_images: str = "fail",
                       max_pixels: int = MAX_PIXELS, ids: Sequence | None = None, id_name: str = "item_id",
                       rows: Sequence[int] | None = None) -> str:
    """sha256 over every image's bytes (a path: its file's bytes) and the decode settings (size,
    ``bad_images`` policy, ``max_pixels``). A null image or a file that cannot be read raises, under
    ``"fail"``, a :class:`ContractError` naming ``source``, ``column``, the row (``rows[i]`` when
    given) and its id (``id_name`` and ``ids``); under ``"skip"`` it is hashed as absent (decoding
    then leaves it out). ``source``, ``column``, ``ids``, ``id_name`` and ``rows`` only name things
    in errors: the fingerprint does not depend on them."""
    check_image_settings(bad_images, max_pixels)
    settings = {"size": size, "v": CACHE_VERSION, "bad_images": bad_images, "max_pixels": max_pixels}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for i, x in enumerate(images):
        try:
            b = _read(x)
        except BadImage as e:
            if bad_images == "fail":
                raise policy_error(source, column, [(i, e)], ids, id_name=id_name, rows=rows) from None
            h.update(b"\xff" * 8 + e.kind.encode())
            continue
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def decode_images(images: Sequence[bytes | str | os.PathLike | None], size: int,
                  cache_dir: str | os.PathLike | None = None, *, source: str = "images",
                  column: str = "image", ids: Sequence | None = None, id_name: str = "item_id",
                  rows: Sequence[int] | None = None, bad_images: str = "fail",
                  max_pixels: int = MAX_PIXELS, threads: int | None = None,
                  fingerprint: str | None = None) -> DecodedImages:
    """Decode ``images`` once into ``uint8 [K, 3, size, size]`` (:func:`decode_image` each, on
    threads), applying the ``bad_images`` policy to the ones that cannot be used.

    ``"fail"`` (the default) raises a :class:`ContractError` naming ``source``, ``column``, the
    0-based rows, the first bad one's id (``ids``: one per image, called ``id_name`` in messages)
    and PIL's reason. ``"skip"`` leaves them out (``kept`` says which input positions remain), logs
    a warning and returns them as :class:`ImageFailures`; when every image is bad it raises too.
    ``rows`` (one per image): each image's row in ``source``, which errors and failures report
    instead of its position in ``images`` (e.g. a parquet file's rows when ``images`` is a subset).

    With ``cache_dir`` the array is written to ``<cache_dir>/images-<fingerprint>.npy``
    (atomically; the failures beside it in ``.failures.json``) and memory-mapped (copy-on-write);
    a second call with the same images and settings reuses it without decoding (``fingerprint``:
    :func:`images_fingerprint` of the same images and settings, when the caller has it already).
    """
    check_image_settings(bad_images, max_pixels)
    fp = fingerprint or images_fingerprint(images, size, source=source, column=column, ids=ids, id_name=id_name,
                                           rows=rows, bad_images=bad_images, max_pixels=max_pixels)
    path = None if cache_dir is None else Path(cache_dir) / f"images-{fp}.npy"
    if path is not None and path.exists():
        pixels, bad = np.load(path, mmap_mode="c"), _read_failures(path)  # copy-on-write: no copy
    else:
        pixels, bad = _decode_all(images, size, max_pixels, threads)
        if bad and bad_images == "fail":
            raise policy_error(source, column, bad, ids, id_name=id_name, rows=rows)
        if path is not None:
            pixels = _write_cache(path, pixels, bad)
    failures = ImageFailures(source, column, bad_images, item_ids=None if ids is None else [])
    for i, e in bad:
        failures.add(i if rows is None else int(rows[i]), e, None if ids is None else ids[i])
    kept = np.setdiff1d(np.arange(len(images), dtype=np.int64), np.asarray([i for i, _ in bad], dtype=np.int64))
    if failures:
        who = "" if ids is None else f"{id_name} {failures.item_ids[0]}: "
        if len(kept) == 0:
            raise ContractError(source, column, f"every image is bad ({failures.summary()['reasons']}), "
                                                f"e.g. {who}{failures.messages[0]}", failures.rows)
        log_skipped(failures, f"{len(failures)} of {len(images)} images are bad and left out", id_name)
    return DecodedImages(pixels, kept, failures, fp)


def build_image_cache(images: Sequence[bytes | str | os.PathLike | None], size: int,
                      cache_dir: str | os.PathLike | None = None, *, source: str = "images",
                      column: str = "image", threads: int | None = None,
                      fingerprint: str | None = None, bad_images: str = "fail",
                      max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """:func:`decode_images`' array alone: ``uint8 [N, 3, size, size]`` under ``"fail"``; under
    ``"skip"`` only the usable images (call :func:`decode_images` to learn which rows they are)."""
    return decode_images(images, size, cache_dir, source=source, column=column, threads=threads,
                         fingerprint=fingerprint, bad_images=bad_images, max_pixels=max_pixels).pixels


def check_image_settings(bad_images: str, max_pixels: int = MAX_PIXELS) -> None:
    """Raise ``ValueError`` unless ``bad_images`` is a policy of :data:`BAD_IMAGE_POLICIES` and
    ``max_pixels`` a positive integer (sources call it when they are configured)."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images={bad_images!r}; choose from {BAD_IMAGE_POLICIES}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_image_pixels={max_pixels!r} must be a positive integer (width x height)")


def _read(x) -> bytes:
    """An image's bytes (a path: its file's), or :class:`BadImage` (null, unreadable file)."""
    if x is None:
        raise BadImage("null", "null image")
    if isinstance(x, _BYTES):
        return bytes(x)
    try:
        return Path(x).read_bytes()
    except OSError as e:
        raise _explain(x, e, MAX_PIXELS) from None


def _decode_all(images, size: int, max_pixels: int,
                threads: int | None) -> tuple[np.ndarray, list[tuple[int, BadImage]]]:
    """Every usable image decoded (input order) and the bad ones as (row, :class:`BadImage`)."""
    out = np.empty((len(images), 3, size, size), np.uint8)

    def work(i: int) -> tuple[int, BadImage] | None:
        try:
            out[i] = decode_image(images[i], size, max_pixels=max_pixels)
        except BadImage as e:
            return i, e
        return None

    n_threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(n_threads) as pool:  # PIL releases the GIL while decoding
        bad = [r for r in pool.map(work, range(len(images)), chunksize=64) if r is not None]
    if bad:
        keep = np.ones(len(images), bool)
        keep[[i for i, _ in bad]] = False
        out = out[keep]
    return out, bad


def policy_error(source: str, column: str, bad: list[tuple[int, BadImage]], ids: Sequence | None, *,
                 id_name: str = "item_id", rows: Sequence[int] | None = None,
                 skip_does: str = "leaves bad images out") -> ContractError:
    """The ``"fail"`` policy's error for ``bad`` ((position, :class:`BadImage`) pairs): the rows
    (``rows[position]`` when given), the first bad image's id (``ids[position]``, called ``id_name``)
    and reason, and what ``bad_images='skip'`` would do instead (``skip_does``)."""
    first, e = bad[0]
    who = "" if ids is None else f"{id_name} {ids[first]}: "
    more = f"; {len(bad)} bad images in all" if len(bad) > 1 else ""
    return ContractError(source, column, f"{who}{e}{more} (bad_images='skip' {skip_does})",
                         [i if rows is None else int(rows[i]) for i, _ in bad])


def log_skipped(f: ImageFailures, what: str, id_name: str = "item_id",
                logger: logging.Logger | None = None) -> None:
    """The ``"skip"`` policy's warning about ``f`` (not empty) on ``logger`` (default: this
    module's): ``what`` says what became of the bad images; then the count per reason and the first
    one's row, id and message."""
    reasons = ", ".join(f"{k}: {c}" for k, c in sorted(Counter(f.kinds).items()))
    who = "" if f.item_ids is None else f", {id_name} {f.item_ids[0]}"
    (logger or log).warning("%s, column '%s': %s (bad_images=skip; %s); e.g. row %d%s: %s",
                f.source, f.column, what, reasons, f.rows[0], who, f.messages[0])


def _write_cache(path: Path, pixels: np.ndarray, bad: list[tuple[int, BadImage]]) -> np.ndarray:
    """Write the array (and its failures first, so an array on disk always has them) atomically;
    return it memory-mapped (copy-on-write: torch-compatible, no copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp{os.getpid()}"
    if bad:
        side = _failures_path(path)
        tmp = side.with_name(side.name + tag)
        tmp.write_text(json.dumps([[i, e.kind, str(e)] for i, e in bad]))
        os.replace(tmp, side)
    tmp = path.with_suffix(f"{tag}.npy")
    np.save(tmp, pixels)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="c")


def _failures_path(path: Path) -> Path:
    return path.with_name(path.stem + ".failures.json")


def _read_failures(path: Path) -> list[tuple[int, BadImage]]:
    side = _failures_path(path)
    if not side.exists():
        return []
    return [(int(i), BadImage(kind, msg)) for i, kind, msg in json.loads(side.read_text())]


# ----------------------------------------------------------------------------------------------
# augmentation


def to_float(images: Tensor, size: int | None = None) -> Tensor:
    """uint8 ``[B, 3, S, S]`` -> float in [0, 1], resized to ``size`` (antialiased) if given."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GREY = torch.tensor([0.299, 0.587, 0.114])


class BatchAugment(torch.nn.Module):
    """SimCLR-style augmentation of a whole uint8 batch at once, on the batch's device.

    Per image: a random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``, log-
    uniform) resampled to ``out_size`` with a horizontal flip (probability ``flip``), both as one
    affine grid; then, with probability ``jitter_p``, brightness/contrast/saturation factors drawn
    from [1 - j, 1 + j] and a hue rotation of up to ``hue`` turns (in YIQ space); greyscale with
    probability ``grey_p``. Returns float images in [0, 1]. ``generator`` makes it reproducible.
    """

    def __init__(self, out_size: int, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, jitter_p: float = 0.8, grey_p: float = 0.2):
        super().__init__()
        self.out_size = out_size
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.jitter_p, self.grey_p = jitter_p, grey_p

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, dev = images.shape[0], images.device
        x = to_float(images)

        def u(lo: float, hi: float) -> Tensor:
            return torch.rand(b, generator=generator, device="cpu").mul(hi - lo).add(lo).to(dev)

        # random resized crop + flip as an affine map of the output grid onto the input
        area = u(*self.scale)
        log_r = u(math.log(self.ratio[0]), math.log(self.ratio[1]))
        r = log_r.exp()
        w = (area * r).sqrt().clamp(max=1.0)  # crop width / height as fractions of the image
        h = (area / r).sqrt().clamp(max=1.0)
        cx = (u(0.0, 1.0) * (1 - w) + w / 2) * 2 - 1  # crop centre in [-1, 1]
        cy = (u(0.0, 1.0) * (1 - h) + h / 2) * 2 - 1
        sign = torch.where(u(0.0, 1.0) < self.flip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = w * sign
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [b, 3, self.out_size, self.out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        if self.jitter_p > 0:
            on = (u(0.0, 1.0) < self.jitter_p).view(b, 1, 1, 1)
            y = x
            if self.brightness:
                y = y * u(1 - self.brightness, 1 + self.brightness).view(b, 1, 1, 1)
            if self.contrast:
                mean = (y * _GREY.to(dev).view(1, 3, 1, 1)).sum(1, keepdim=True).mean((2, 3), keepdim=True)
                y = (y - mean) * u(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1) + mean
            if self.saturation:
                grey = (y * _GREY.to(dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
                y = (y - grey) * u(1 - self.saturation, 1 + self.saturation).view(b, 1, 1, 1) + grey
            if self.hue:
                y = _rotate_hue(y, u(-self.hue, self.hue) * 2 * math.pi)
            x = torch.where(on, y.clamp(0, 1), x)
        if self.grey_p > 0:
            grey = (x * _GREY.to(dev).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
            x = torch.where((u(0.0, 1.0) < self.grey_p).view(b, 1, 1, 1), grey, x)
        return x


def _rotate_hue(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by ``angle`` radians per image."""
    m = _RGB_TO_YIQ.to(x.device)
    inv = torch.linalg.inv(m)
    c, s = angle.cos(), angle.sin()
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    full = inv @ rot @ m  # [B, 3, 3] in RGB space
    return torch.einsum("bij,bjhw->bihw", full, x)
