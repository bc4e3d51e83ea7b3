"""Image input: decode with PIL, a decoded-and-resized uint8 cache, batched augmentation in torch.

Decoding JPEGs is the slow part of an image pipeline on CPU, so it happens once:
:func:`build_image_cache` decodes every image (bytes or a path), fits it into a square of
``size`` pixels (aspect kept, padded with the photo's own border colour, so garments are never
cropped or distorted), and stores the result as one ``uint8 [N, 3, size, size]`` array under a
fingerprint of the images and the settings. Later epochs and later runs memory-map that array.

Augmentation runs on whole batches of those uint8 tensors, on whatever device the model is on
(:class:`BatchAugment`): random resized crop and horizontal flip as one affine ``grid_sample``, and
colour jitter (brightness, contrast, saturation, hue) plus random greyscale as a few tensor ops.
No per-image Python runs in the training loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ctr.data.contract import ContractError

CACHE_VERSION = 1


def decode_image(data: bytes | str | os.PathLike, size: int) -> np.ndarray:
    """Decode one image (encoded bytes or a file path) to ``uint8 [3, size, size]``.

    The image is scaled to fit ``size`` x ``size`` with its aspect ratio kept and centred on a
    canvas of its own median border colour. Raises ``OSError``/``ValueError`` on broken data (the
    cache builder turns those into a :class:`ContractError` naming the row).
    """
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(src) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is much larger
        im = im.convert("RGB")
        w, h = im.size
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        small = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(small)
    if nw == size and nh == size:
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    fill = np.median(border, axis=0).astype(np.uint8)
    out = np.empty((size, size, 3), np.uint8)
    out[:] = fill
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = arr
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def images_fingerprint(images: Sequence[bytes | str | os.PathLike], size: int, *, source: str = "images",
                       column: str = "image") -> str:
    """sha256 over every image's bytes (a path: its file's bytes) and the decode settings. A file
    that cannot be read raises :class:`ContractError` naming ``source``, ``column`` and the row."""
    h = hashlib.sha256(json.dumps({"size": size, "v": CACHE_VERSION}).encode())
    for i, x in enumerate(images):
        try:
            b = bytes(x) if isinstance(x, (bytes, bytearray, memoryview)) else Path(x).read_bytes()
        except OSError as e:
            raise ContractError(source, column, f"cannot read image file {x!s}: {e.strerror or e}", [i]) from None
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def build_image_cache(images: Sequence[bytes | str | os.PathLike], size: int,
                      cache_dir: str | os.PathLike | None = None, *, source: str = "images",
                      column: str = "image", threads: int | None = None,
                      fingerprint: str | None = None) -> np.ndarray:
    """Decode ``images`` once into ``uint8 [N, 3, size, size]``.

    With ``cache_dir`` the array is written to ``<cache_dir>/images-<fingerprint>.npy`` (atomically)
    and memory-mapped (copy-on-write); a second call with the same images and size reuses it without
    decoding (``fingerprint``: :func:`images_fingerprint` of the same images, when the caller
    has it already). A broken, missing or null image raises :class:`ContractError` naming
    ``source``, ``column`` and the 0-based row.
    """
    nulls = [i for i, x in enumerate(images) if x is None]
    if nulls:
        raise ContractError(source, column, "null image", nulls)
    path = None
    if cache_dir is not None:
        fp = fingerprint or images_fingerprint(images, size, source=source, column=column)
        path = Path(cache_dir) / f"images-{fp}.npy"
        if path.exists():
            return np.load(path, mmap_mode="c")  # copy-on-write: torch-compatible, no copy
    out = np.empty((len(images), 3, size, size), np.uint8)

    def work(i: int) -> int | None:
        try:
            out[i] = decode_image(images[i], size)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
            return i
        return None

    n_threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(n_threads) as pool:  # PIL releases the GIL while decoding
        bad = [i for i in pool.map(work, range(len(images)), chunksize=64) if i is not None]
    if bad:
        raise ContractError(source, column, "cannot decode image (broken or unsupported data)", bad)
    if path is None:
        return out
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="c")  # copy-on-write: torch-compatible, no copy


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
