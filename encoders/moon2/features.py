"""Products with attributes (H&M, Fashion Product Images) and cached token features of frozen towers.

MOON2.0 here trains a fusion transformer on top of frozen pretrained towers (ImageNet
EfficientNet-Lite0, MiniLM), so each item's tower outputs never change: they are computed once
(:func:`image_token_cache`: the backbone's last feature map as ``h * w`` tokens;
:func:`text_token_cache`: MiniLM's last hidden states and attention mask) and memory-mapped from a
float16 ``.npy`` keyed by a fingerprint of the inputs and of the tower's weights.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from ctr.data.contract import ContractError, bad_rows
from encoders.data import ItemSet, hm_items, items_from_table
from encoders.images import MAX_PIXELS, to_float

__all__ = ["Products", "hm_products", "fashion_products", "load_products", "TokenSet",
           "image_token_cache", "text_token_cache", "module_fingerprint"]

TOKEN_CACHE_VERSION = 1


@dataclass
class Products:
    """An :class:`ItemSet` (images, titles, product group, split, category) with string attributes
    per item (``colour``, ``pattern``, ``garment``, ``type``): what co-augmentation and the
    benchmark's classification and probes read."""

    items: ItemSet
    attrs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.items.meta.get("source", self.items.name)

    def __len__(self) -> int:
        return len(self.items)


HM_ATTRS = {"colour": "colour_group_name", "pattern": "graphical_appearance_name",
            "garment": "garment_group_name", "type": "product_type_name"}
FASHION_ATTRS = {"colour": "baseColour", "pattern": "usage", "garment": "subCategory", "type": "articleType"}


def _attr_table(path: Path, id_col: str, cols: dict[str, str], ids: np.ndarray, id_cast) -> dict[str, np.ndarray]:
    found = pl.read_csv(path, n_rows=0, infer_schema=False).columns
    for c in [id_col, *cols.values()]:
        if c not in found:
            raise ContractError(str(path), c, f"missing column (found {found})")
    meta = pl.read_csv(path, columns=[id_col, *cols.values()], infer_schema=False)
    meta = meta.with_columns(id_cast(pl.col(id_col)).alias("__id")).unique("__id", keep="first")
    df = pl.DataFrame({"__id": ids}).join(meta, on="__id", how="left", maintain_order="left")
    return {a: df[c].fill_null("unknown").to_numpy().astype(str) for a, c in cols.items()}


def hm_products(size: int, cache_dir: str | None, data_dir: str | None = None,
                held_out: tuple[float, float, float] = (0.8, 0.1, 0.1), n_items: int | None = None, *,
                bad_images: str = "fail", max_pixels: int = MAX_PIXELS) -> Products:
    """The H&M sample: titles without colour (``prod_name, type. description``), colour variants
    sharing ``product_code``; products held out whole. ``bad_images`` / ``max_pixels``: as in
    :func:`encoders.data.hm_items` (a skipped article is left out of the items and the attributes;
    ``items.image_failures`` names ``images.parquet``'s ``jpeg`` rows)."""
    from ctr.data.sources.catalogues import catalogue_files

    items = hm_items(size, cache_dir, data_dir, held_out, n_items, bad_images=bad_images, max_pixels=max_pixels)
    meta_path, _ = catalogue_files("hm", data_dir)
    attrs = _attr_table(meta_path, "article_id", HM_ATTRS, items.item_ids, lambda c: c.cast(pl.Int64))
    return Products(items, attrs)


def fashion_products(size: int, cache_dir: str | None, data_dir: str | None = None,
                     held_out: tuple[float, float, float] = (0.8, 0.1, 0.1),
                     n_items: int | None = None, *, bad_images: str = "fail",
                     max_pixels: int = MAX_PIXELS) -> Products:
    """Fashion Product Images (small): title ``productDisplayName`` (the 7 rows without one get their
    ``articleType``; their ids are listed in ``items.meta["titles_filled"]``), each item its own
    product, split by a stable hash of the id. ``n_items`` keeps a deterministic hash-ordered sample
    (drawn before bad photos are left out, so ``"skip"`` may keep fewer).

    A bad photo (:func:`encoders.data.items_from_table`) follows ``bad_images``: ``"fail"`` raises a
    :class:`ContractError` naming ``images.parquet``, its ``jpeg`` column, the row and the item id;
    ``"skip"`` leaves the item out of the items and the attributes (``items.image_failures``, rows of
    ``images.parquet``)."""
    from ctr.data.sources.catalogues import catalogue_files

    meta_path, img_path = catalogue_files("fashion", data_dir)
    need = ["id", "productDisplayName", *FASHION_ATTRS.values()]
    found = pl.read_csv(meta_path, n_rows=0, infer_schema=False).columns
    for c in need:
        if c not in found:
            raise ContractError(str(meta_path), c, f"missing column (found {found})")
    meta = pl.read_csv(meta_path, columns=list(dict.fromkeys(need)), infer_schema=False)
    rows = bad_rows(meta, pl.col("id").is_null() | pl.col("articleType").is_null())
    if rows:
        raise ContractError(str(meta_path), "id/articleType", "null value", rows)
    meta = meta.with_columns(pl.col("id").cast(pl.Int64)).unique("id", keep="first")
    photos = (pl.read_parquet(img_path, columns=["id", "jpeg"]).with_row_index("__src_row")
              .with_columns(pl.col("id").cast(pl.Int64)))
    df = meta.join(photos, on="id", how="inner")
    # sample order: SHA-1 of the id (CRC32, which splits the items, is affine in its input: a CRC-ordered
    # sample would fall into one split)
    h = [int.from_bytes(hashlib.sha1(f"fashion:{i}".encode()).digest()[:7], "big") for i in df["id"].to_list()]
    df = df.with_columns(pl.Series("__h", h, dtype=pl.Int64)).sort("__h", "id")
    if n_items is not None:
        df = df.head(n_items)
    filled = df.filter(pl.col("productDisplayName").is_null())["id"].to_list()
    if filled:
        warnings.warn(f"{meta_path}: {len(filled)} items without productDisplayName get their articleType "
                      f"as title (ids {filled[:7]})", stacklevel=2)
    df = df.sort("id").with_columns(pl.col("id").alias("item_id"), pl.col("jpeg").alias("image"),
                                    pl.col("productDisplayName").fill_null(pl.col("articleType")).alias("title"),
                                    pl.col("articleType").alias("category"))
    items = items_from_table(df.select("item_id", "image", "title", "category"), size, cache_dir,
                             source=str(img_path), held_out=held_out, bad_images=bad_images,
                             max_pixels=max_pixels, image_column="jpeg",
                             image_rows=df["__src_row"].to_list())  # the parquet's own column and rows
    if len(items.image_failures):  # the attributes follow the kept rows
        df = df.filter(pl.col("id").is_in(pl.Series(items.item_ids).implode()))
        filled = [i for i, k in zip(filled, np.isin(filled, items.item_ids)) if k]
    items.meta = {"source": "fashion", "n_products": len(items), "titles_filled": filled}
    attrs = {a: df[c].fill_null("unknown").to_numpy().astype(str) for a, c in FASHION_ATTRS.items()}
    return Products(items, attrs)


def load_products(name: str, size: int, cache_dir: str | None, **kwargs) -> Products:
    loaders = {"hm": hm_products, "fashion": fashion_products}
    if name not in loaders:
        raise ValueError(f"unknown product source {name!r}; choose from {sorted(loaders)}")
    return loaders[name](size, cache_dir, **kwargs)


# ----------------------------------------------------------------------------------------------
# token caches


def module_fingerprint(module: nn.Module) -> str:
    """SHA-1 over a module's parameter and buffer names, shapes and bytes."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _cached(path: Path, shape: tuple, fill, batch: int, total: int) -> np.ndarray:
    """Memory-map ``path`` if it exists, else build it with ``fill(lo, hi) -> array`` in batches
    (written to a temporary file, then renamed, so a crash never leaves a partial cache)."""
    if path.exists():
        arr = np.load(path, mmap_mode="r")
        if arr.shape == shape:
            return arr
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    for lo in range(0, total, batch):
        hi = min(lo + batch, total)
        out[lo:hi] = fill(lo, hi)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


@torch.no_grad()
def image_token_cache(tower: nn.Module, images: np.ndarray, key: str, cache_dir: str | None,
                      size: int, batch: int = 256) -> np.ndarray:
    """``float16 [N, h*w, C]``: the image tower's last feature map of each uint8 image, as tokens.
    ``key`` identifies the images (e.g. their fingerprint); the tower's weights are fingerprinted."""
    tower.eval()
    probe = tower.backbone.forward_features(tower.normalize(to_float(torch.as_tensor(np.asarray(images[:1])), size)))
    c, t = probe.shape[1], probe.shape[2] * probe.shape[3]
    name = hashlib.sha1(f"{TOKEN_CACHE_VERSION}:{key}:{module_fingerprint(tower)}:{size}".encode()).hexdigest()[:16]

    def fill(lo: int, hi: int) -> np.ndarray:
        x = to_float(torch.as_tensor(np.asarray(images[lo:hi])), size)
        f = tower.backbone.forward_features(tower.normalize(x))
        return f.flatten(2).transpose(1, 2).to(torch.float16).numpy()

    root = Path(cache_dir or ".cache/prepared") / "tokens"
    return _cached(root / f"image-{name}.npy", (len(images), t, c), fill, batch, len(images))


@torch.no_grad()
def text_token_cache(tower: nn.Module, texts: list[str], cache_dir: str | None,
                     batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(float16 [N, L, D] last hidden states, bool [N, L] mask)`` of a text tower with
    ``tokenize`` and a ``model`` (MiniLM), ``L`` its ``max_length``."""
    tower.eval()
    h = hashlib.sha1(f"{TOKEN_CACHE_VERSION}:{tower.max_length}:{module_fingerprint(tower)}".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    name = h.hexdigest()[:16]
    tokens = tower.tokenize(list(texts))
    mask = tokens["attention_mask"].bool().numpy()
    dim = tower.out_dim

    def fill(lo: int, hi: int) -> np.ndarray:
        ids, m = tokens["input_ids"][lo:hi], tokens["attention_mask"][lo:hi]
        return tower.model(input_ids=ids, attention_mask=m).last_hidden_state.to(torch.float16).numpy()

    root = Path(cache_dir or ".cache/prepared") / "tokens"
    hidden = _cached(root / f"text-{name}.npy", (len(texts), tower.max_length, dim), fill, batch, len(texts))
    return hidden, mask


@dataclass
class TokenSet:
    """Row-aligned token features: ``image [N, Ti, Di]``, ``text [N, L, Dt]``, ``mask [N, L]``."""

    image: np.ndarray
    text: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.image)

    def images(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(self.image[rows])).float()

    def texts(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(np.asarray(self.text[rows])).float(), torch.from_numpy(self.mask[rows])
