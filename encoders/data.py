"""Data for the encoders: item sets (cached images, titles, masking keys), click pairs, task batches.

* :class:`ItemSet`: the items an encoder sees: ids, the decoded-and-resized uint8 image cache,
  titles, a category and a product group per item, and a split per item (H&M holds products out).
* :class:`ClickLog`: visual-search clicks cut from a contract ``events`` table: for every click a
  (query item, clicked item) pair, the items shown but not clicked in the same request (hard
  negatives), and, for evaluation, each request's query against its clicked items.
* :class:`TaskBatches`: a map-style dataset whose element ``step`` is one whole multi-task batch
  (``self_supervised``, ``image_text``, ``click``, ``same_product``), cut by vectorised index arithmetic with a
  generator seeded by (seed, epoch, step). Each distinct image of a batch is sent once
  (``images`` + index tensors per role), so the module encodes it once.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import polars as pl
import torch
from torch import Tensor

from ctr.data.contract import IMPRESSION_KEY, ContractError, bad_rows
from encoders.images import MAX_PIXELS, ImageFailures, decode_images

TASKS = ("self_supervised", "image_text", "click", "same_product")


@dataclass
class ItemSet:
    """Items with cached images. Row ``i`` of every array is the same item."""

    name: str
    item_ids: np.ndarray  # int64 [N] the contract's item_id
    images: np.ndarray  # uint8 [N, 3, S, S] (memory-mapped from the cache)
    titles: list[str] | None  # [N] or None
    category: np.ndarray  # int64 [N] category index (0 when unknown)
    group: np.ndarray  # int64 [N] product group (the item's own row when there is none)
    split: np.ndarray  # <U5 [N] "train" / "val" / "test" (all "train" when items are not held out)
    image_fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    # items left out for a bad image (``bad_images="skip"``); their rows are the source table's
    image_failures: ImageFailures = field(default_factory=ImageFailures)

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def keys(self) -> np.ndarray:
        """[N, 2] false-negative keys: the item's row and its product group."""
        return np.stack([np.arange(len(self), dtype=np.int64), self.group], axis=1)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def split_by_group(groups: list[str] | np.ndarray, fractions: tuple[float, float, float],
                   salt: str = "products") -> np.ndarray:
    """A split per item such that every item of a group lands in the same split. The split is a
    stable hash of the group name (crc32 with ``salt``), so it depends neither on the order of the
    items nor on the training seed."""
    f_train, f_val, _ = fractions
    u = np.array([zlib.crc32(f"{salt}:{g}".encode()) / 2**32 for g in groups])
    return np.where(u < f_train, "train", np.where(u < f_train + f_val, "val", "test"))


def items_from_table(items: pl.DataFrame, size: int, cache_dir: str | os.PathLike | None, *,
                     source: str = "items", group_col: str | None = None,
                     category_col: str | None = "category", title_col: str | None = "title",
                     held_out: tuple[float, float, float] | None = None, bad_images: str = "fail",
                     max_pixels: int = MAX_PIXELS, image_column: str | None = None,
                     image_rows: Sequence[int] | None = None) -> ItemSet:
    """An :class:`ItemSet` from a contract ``items`` table with an ``image`` (bytes) or
    ``image_path`` column. ``held_out`` (train/val/test fractions) splits the items by product
    group (``group_col``, else by item); without it every item is a training item.

    A null, missing, undecodable or too large (over ``max_pixels``) image follows ``bad_images``:
    ``"fail"`` raises a :class:`ContractError` naming ``source``, the image column, the row, the
    item id and the reason; ``"skip"`` leaves the item out (every array of the item set stays
    aligned) and records it in ``image_failures``. Skipping every item raises too. Those errors and
    failures call the image column ``image_column`` and each row ``image_rows[row]`` when given
    (a table derived from ``source``: its own column name and rows)."""
    img_col = "image" if "image" in items.columns else "image_path" if "image_path" in items.columns else None
    need = ["item_id"] + ([img_col] if img_col else ["image"])
    for c in need + [c for c in (group_col,) if c]:
        if c not in items.columns:
            raise ContractError(source, c, f"missing column (found {items.columns})")
    rows = bad_rows(items, pl.col("item_id").is_null())
    if rows:
        raise ContractError(source, "item_id", "null id", rows)
    ids = items["item_id"]
    if ids.dtype not in (pl.Int64, pl.Int32, pl.UInt32, pl.Int16, pl.Int8):
        raise ContractError(source, "item_id", f"item ids must be integers here, got {ids.dtype}")
    dup = bad_rows(items, pl.col("item_id").is_duplicated())
    if dup:
        raise ContractError(source, "item_id", "duplicate item id", dup)
    if title_col and title_col in items.columns:
        nulls = bad_rows(items, pl.col(title_col).is_null())
        if nulls:
            raise ContractError(source, title_col, "null title", nulls)
    decoded = decode_images(items[img_col].to_list(), size, cache_dir, source=source,
                            column=image_column or img_col, ids=ids.to_list(), rows=image_rows,
                            bad_images=bad_images, max_pixels=max_pixels)
    if len(decoded.failures):
        items = items[decoded.kept]  # every column below follows the kept rows
        ids = items["item_id"]
    titles = items[title_col].to_list() if title_col and title_col in items.columns else None
    n = items.height
    category = (_codes(items[category_col]) if category_col and category_col in items.columns
                else np.zeros(n, np.int64))
    group_names = items[group_col].cast(pl.Utf8).to_list() if group_col else [str(i) for i in ids.to_list()]
    group = _codes(pl.Series(group_names))
    split = split_by_group(group_names, held_out) if held_out else np.full(n, "train")
    return ItemSet(name=source, item_ids=ids.cast(pl.Int64).to_numpy(), images=decoded.pixels,
                   titles=titles, category=category, group=group, split=split,
                   image_fingerprint=decoded.fingerprint, image_failures=decoded.failures)


def _codes(s: pl.Series) -> np.ndarray:
    """Dense integer codes of a column's values (sorted order; nulls get their own code)."""
    return s.cast(pl.Utf8).fill_null("\x00null").rank("dense").cast(pl.Int64).to_numpy() - 1


# ----------------------------------------------------------------------------------------------
# H&M: product photos with names and descriptions; colour variants share a product_code


def hm_items(size: int, cache_dir: str | os.PathLike | None, data_dir: str | None = None,
             held_out: tuple[float, float, float] = (0.8, 0.1, 0.1), n_items: int | None = None, *,
             bad_images: str = "fail", max_pixels: int = MAX_PIXELS) -> ItemSet:
    """The H&M sample (``$CTR_DATA_DIR/hm_fashion_images_sample``) as an :class:`ItemSet`.

    Title: ``prod_name``, ``product_type_name`` and ``detail_desc``, so colour variants of one
    product share their text (colour is left to the image; image-text training then does not
    push variants of one product apart). Group: ``product_code``; products are held out whole
    (``held_out`` fractions, stable hash). Category: ``product_type_name``. ``n_items`` keeps the
    first items in article order (for tests). ``bad_images``, ``max_pixels``: as in
    :func:`items_from_table`; errors and failures name ``images.parquet``'s ``jpeg`` column and rows.
    """
    from ctr.data.sources.catalogues import catalogue_files

    meta_path, img_path = catalogue_files("hm", data_dir)
    need = ["article_id", "product_code", "prod_name", "product_type_name", "detail_desc"]
    found = pl.read_csv(meta_path, n_rows=0, infer_schema=False).columns
    for c in need:
        if c not in found:
            raise ContractError(str(meta_path), c, f"missing column (found {found})")
    meta = pl.read_csv(meta_path, columns=need, infer_schema=False)
    for c in ("article_id", "product_code", "prod_name"):
        rows = bad_rows(meta, pl.col(c).is_null())
        if rows:
            raise ContractError(str(meta_path), c, "null value", rows)
    photos = (pl.read_parquet(img_path, columns=["article_id", "jpeg"]).with_row_index("__src_row")
              .unique("article_id", keep="first", maintain_order=True))
    df = (meta.unique("article_id", keep="first").join(photos, on="article_id", how="inner")
          .sort("article_id"))
    if n_items is not None:
        df = df.head(n_items)
    df = df.with_columns(
        pl.col("article_id").cast(pl.Int64).alias("item_id"),
        pl.col("jpeg").alias("image"),
        pl.concat_str([pl.col("prod_name"), pl.lit(", "), pl.col("product_type_name").fill_null(""),
                       pl.lit(". "), pl.col("detail_desc").fill_null("")]).alias("title"),
        pl.col("product_type_name").fill_null("unknown").alias("category"),
    )
    items = items_from_table(df.select("item_id", "image", "title", "category", "product_code"), size,
                             cache_dir, source=str(img_path), group_col="product_code", held_out=held_out,
                             bad_images=bad_images, max_pixels=max_pixels,
                             image_column="jpeg", image_rows=df["__src_row"].to_list())  # the parquet's own
    items.meta = {"source": "hm", "n_products": len(np.unique(items.group))}
    return items


# ----------------------------------------------------------------------------------------------
# Clicks


@dataclass
class ClickLog:
    """Clicks of a visual-search log, over the rows of an :class:`ItemSet`.

    ``pairs[split]``: int64 [P, 2] (query row, clicked row) per click, queries equal to the clicked
    item left out. ``shown[split]``: int64 [P, K] the rows shown but not clicked in the click's
    request, padded with -1. ``queries[split]``: (query row [R], offsets [R + 1], clicked rows)
    per request with at least one click (evaluation). The split follows the CTR stage's time split
    of the events (ordered fractions), so an encoder post-trained on ``train`` clicks never sees
    the CTR stage's validation or test period.

    Events of items the item set left out for a bad image (``items.image_failures``) are dropped
    after the split, so the split's boundaries stay the CTR stage's; ``dropped_events`` counts
    them. Any other item missing from the item set is an error.
    """

    pairs: dict[str, np.ndarray]
    shown: dict[str, np.ndarray]
    queries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    dropped_events: int = 0

    @classmethod
    def from_events(cls, events: pl.DataFrame, items: ItemSet, *, source: str = "events",
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    order: tuple[str, ...] = ("timestamp", "request_id", "position")) -> "ClickLog":
        need = ["request_id", "item_id", "query_item_id", "clicked", *order]
        for c in dict.fromkeys(need):
            if c not in events.columns:
                raise ContractError(source, c, f"missing column (found {events.columns})")
        for c in dict.fromkeys(("request_id", "item_id", "query_item_id", "clicked", *order)):
            rows = bad_rows(events, pl.col(c).is_null())
            if rows:
                raise ContractError(source, c, "null value", rows)
        rows = bad_rows(events, ~pl.col("clicked").is_in([0, 1]))
        if rows:
            raise ContractError(source, "clicked", "label must be 0 or 1", rows)
        lookup = pl.DataFrame({"__id": items.item_ids, "__row": np.arange(len(items), dtype=np.int64)})
        skipped = pl.Series(items.image_failures.item_ids or [], dtype=pl.Int64).implode()
        ev = events.with_row_index("__event")
        for col, name in (("item_id", "__item"), ("query_item_id", "__query")):
            ev = ev.join(lookup.rename({"__id": col, "__row": name}), on=col, how="left")
            unknown = pl.col(name).is_null() & ~pl.col(col).cast(pl.Int64).is_in(skipped)
            missing = ev.filter(unknown)["__event"].sort().head(5).to_list()
            if missing:
                raise ContractError(source, col, f"item not in the item set {items.name}", missing)
        # ties broken by the impression key, then file order, as ctr.data.prepare splits the log
        ev = ev.sort([*order, *(c for c in IMPRESSION_KEY if c in ev.columns and c not in order), "__event"])
        n = ev.height
        n_train, n_val = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
        r = pl.int_range(pl.len())
        ev = ev.with_columns(pl.when(r < n_train).then(pl.lit("train")).when(r < n_val)
                             .then(pl.lit("val")).otherwise(pl.lit("test")).alias("__split"))
        ev = ev.filter(pl.col("__item").is_not_null() & pl.col("__query").is_not_null())
        pairs, shown, queries = {}, {}, {}
        for split in ("train", "val", "test"):
            part = ev.filter(pl.col("__split") == split)
            clicks = part.filter((pl.col("clicked") == 1) & (pl.col("__item") != pl.col("__query")))
            neg = (part.filter(pl.col("clicked") == 0).group_by("request_id")
                   .agg(pl.col("__item").alias("__shown")))
            clicks = clicks.join(neg, on="request_id", how="left").sort("__event")
            pairs[split] = clicks.select("__query", "__item").to_numpy().astype(np.int64).reshape(-1, 2)
            k = int(clicks["__shown"].list.len().max() or 0) if clicks.height else 0
            mat = np.full((clicks.height, max(k, 1)), -1, np.int64)
            if clicks.height and k:
                lens = clicks["__shown"].list.len().fill_null(0).to_numpy().astype(np.int64)
                flat = clicks["__shown"].explode().drop_nulls().to_numpy().astype(np.int64)
                row = np.repeat(np.arange(clicks.height), lens)
                col = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
                mat[row, col] = flat
            shown[split] = mat
            req = (clicks.group_by("request_id", maintain_order=True)
                   .agg(pl.col("__query").first(), pl.col("__item").unique(maintain_order=True)))
            lens = req["__item"].list.len().to_numpy().astype(np.int64)
            queries[split] = (req["__query"].to_numpy().astype(np.int64),
                              np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                              req["__item"].explode().to_numpy().astype(np.int64))
        return cls(pairs=pairs, shown=shown, queries=queries, dropped_events=n - ev.height)


# ----------------------------------------------------------------------------------------------
# Task batches


class CategoryPool:
    """``rows`` grouped by their ``category`` (sorted, with offsets), so that same-category items
    are drawn by index arithmetic."""

    def __init__(self, rows: np.ndarray, category: np.ndarray):
        self.rows = rows
        cat = category[rows]
        self.pool = rows[np.argsort(cat, kind="stable")]
        counts = np.bincount(cat, minlength=int(category.max()) + 1)
        self.start, self.count = np.concatenate([[0], np.cumsum(counts)[:-1]]), counts

    def draw(self, u: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """One row of category ``categories[i]`` per uniform ``u[i, j]`` in [0, 1): ``[n, k] -> [n, k]``
        (a category without rows draws from all rows)."""
        start, count = self.start[categories], self.count[categories]
        pick = self.pool[np.minimum(start[:, None] + (u * count[:, None]).astype(np.int64), len(self.pool) - 1)]
        empty = count == 0
        if empty.any():
            pick[empty] = self.rows[(u[empty] * len(self.rows)).astype(np.int64)]
        return pick


class TaskBatches(torch.utils.data.Dataset):
    """Element ``step`` of an epoch is one batch for every task with a positive weight.

    ``self_supervised``: ``batch_size`` training items (two augmented views each, made by the
    module). ``image_text``: training items with their title tokens. ``click``: click pairs with
    ``n_shown`` negatives drawn from the request's shown-but-unclicked items and ``n_category``
    from a pool of items of the positive's category (the shown ones are topped up from that pool
    when a request has too few). ``same_product``: training items of product groups with at least
    two training items, each paired with another item of its group drawn at random (MOON2.0's
    intra-product alignment: colour variants of one product are positives); ``product_pairs``
    pairs per step (default ``batch_size``). Every distinct image of the step appears once in ``images``;
    roles index into it.

    The epoch length is ``steps`` or, by default, one pass over the largest task's examples.
    Call :meth:`set_epoch` (the data module does) so each epoch draws new batches.
    """

    def __init__(self, items: ItemSet, tasks: dict[str, float], batch_size: int, *,
                 clicks: ClickLog | None = None, tokens: dict[str, Tensor] | None = None,
                 n_shown: int = 4, n_category: int = 4, product_pairs: int | None = None,
                 steps: int | None = None, seed: int = 0):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.tasks = {t: w for t, w in tasks.items() if w > 0}
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        if not self.tasks:
            raise ValueError("no task has a positive weight")
        if "image_text" in self.tasks and tokens is None:
            raise ValueError("the image_text task needs title tokens (a text tower and titles)")
        if "click" in self.tasks and (clicks is None or len(clicks.pairs["train"]) == 0):
            raise ValueError("the click task needs a click log with training clicks")
        self.train_rows = items.rows("train")
        if len(self.train_rows) == 0:
            raise ValueError(f"item set {items.name} has no training items")
        self.tokens, self.clicks = tokens, clicks
        # product pool: training rows of groups with >= 2 training items, sorted by group, with
        # each row's group start and size in the pool
        rows = self.train_rows[np.argsort(items.group[self.train_rows], kind="stable")]
        _, count = np.unique(items.group[rows], return_counts=True)
        self.product_pool = rows[np.repeat(count >= 2, count)]
        _, start, count = np.unique(items.group[self.product_pool], return_index=True, return_counts=True)
        self.product_start, self.product_count = np.repeat(start, count), np.repeat(count, count)
        if "same_product" in self.tasks and len(self.product_pool) == 0:
            raise ValueError(f"the same_product task needs product groups with two or more training "
                             f"items; item set {items.name} has none")
        self.n_shown, self.n_category = n_shown, n_category
        self.product_pairs = product_pairs or batch_size
        self.keys = torch.from_numpy(items.keys)
        self.images = torch.from_numpy(np.asarray(items.images))  # memory-mapped: no copy
        self.category_pool = CategoryPool(self.train_rows, items.category)
        sizes = [len(self.train_rows)] + ([len(clicks.pairs["train"])] if "click" in self.tasks else [])
        self.steps = steps or max(1, math.ceil(max(sizes) / batch_size))
        if "same_product" in self.tasks and not steps:
            self.steps = max(self.steps, math.ceil(len(self.product_pool) / self.product_pairs))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def _category_pool(self, rng: np.random.Generator, rows: np.ndarray, k: int) -> np.ndarray:
        """``k`` random training items of each row's category: [len(rows), k] (with replacement;
        a category without training items draws from all training items)."""
        return self.category_pool.draw(rng.random((len(rows), k)), self.items.category[rows])

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(step)])
        roles: dict[str, np.ndarray] = {}
        out: dict = {}
        b = self.batch_size
        if "self_supervised" in self.tasks or "image_text" in self.tasks:
            rows = rng.choice(self.train_rows, size=min(b, len(self.train_rows)), replace=False)
            roles["items"] = rows
            if "image_text" in self.tasks:
                out["tokens"] = {k: v[torch.from_numpy(rows)] for k, v in self.tokens.items()}
        if "click" in self.tasks:
            pairs, shown = self.clicks.pairs["train"], self.clicks.shown["train"]
            pick = rng.choice(len(pairs), size=min(b, len(pairs)), replace=False)
            q, p = pairs[pick, 0], pairs[pick, 1]
            negs = []
            if self.n_shown > 0:
                cand = shown[pick]
                # random order of each request's shown items, pads (-1) last
                score = np.where(cand >= 0, rng.random(cand.shape), 2.0)
                cand = np.take_along_axis(cand, np.argsort(score, axis=1), axis=1)
                cand = cand[:, :self.n_shown]
                if cand.shape[1] < self.n_shown:
                    cand = np.pad(cand, ((0, 0), (0, self.n_shown - cand.shape[1])), constant_values=-1)
                fill = self._category_pool(rng, p, self.n_shown)
                negs.append(np.where(cand >= 0, cand, fill))
            if self.n_category > 0:
                negs.append(self._category_pool(rng, p, self.n_category))
            roles["query"], roles["positive"] = q, p
            roles["negatives"] = np.concatenate(negs, axis=1) if negs else np.zeros((len(q), 0), np.int64)
        if "same_product" in self.tasks:
            n = len(self.product_pool)
            at = rng.choice(n, size=min(self.product_pairs, n), replace=False)  # pool positions
            start, count = self.product_start[at], self.product_count[at]
            other = start + (rng.random(len(at)) * (count - 1)).astype(np.int64)
            other += other >= at  # skip the anchor itself: another item of its group
            roles["anchor"], roles["partner"] = self.product_pool[at], self.product_pool[other]
        flat = np.concatenate([r.reshape(-1) for r in roles.values()])
        uniq, inv = np.unique(flat, return_inverse=True)
        out["images"] = self.images[torch.from_numpy(uniq)]
        out["rows"] = torch.from_numpy(uniq)
        out["keys"] = self.keys[torch.from_numpy(uniq)]
        at = 0
        for name, r in roles.items():
            out[name] = torch.from_numpy(inv[at:at + r.size].reshape(r.shape))
            at += r.size
        return out

