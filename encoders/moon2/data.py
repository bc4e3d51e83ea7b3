"""Training triples and evaluation chunks for MOON2.0, over cached token features.

A training step is a batch of triples ``(query, positive, negative)`` over the training items:

* **query**: every training item once per epoch (a fresh permutation each epoch); with
  co-augmentation, with probability ``p_aug`` the query is one of its kept augmented views
  (an edited image with the enriched text) instead of the original pair;
* **positive**: another item of the query's product (a colour variant) when the product has one
  among the training items, else the query item itself (``self_positive``: its original pair is the
  candidate, so an augmented or single-modality query still has a real target);
* **negative**: a training item of the same category (product type) from another product: a hard
  negative, as in MOON's same-category negatives.

Every role is instantiated in tokens (image tokens, text tokens and mask), so the module can embed
it in any modality. Keys (item row, product group) let the losses mask false negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from encoders.data import CategoryPool
from encoders.moon2.features import Products, TokenSet

__all__ = ["AugViews", "TripleBatches", "TokenChunks"]


@dataclass
class AugViews:
    """Co-augmented pairs of the training ``rows``: ``n_views`` edited images per row (tokens
    ``image [R * n_views, Ti, Di]``, view ``v`` of row ``i`` at ``i * n_views + v``) and one enriched
    text per row (``text [R, L, Dt]``, ``mask``). ``keep [R * n_views]``: the views the consistency
    filter currently keeps (all, until the filter first runs)."""

    rows: np.ndarray
    n_views: int
    image: np.ndarray
    text: np.ndarray
    mask: np.ndarray
    texts: list[str]
    keep: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.keep is None:
            self.keep = np.ones(len(self.rows) * self.n_views, bool)
        self.slot = np.full(int(self.rows.max()) + 1 if len(self.rows) else 0, -1, np.int64)
        self.slot[self.rows] = np.arange(len(self.rows))

    def views_of(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random kept view index per row (``-1``: the row has no kept view)."""
        out = np.full(len(rows), -1, np.int64)
        inside = rows < len(self.slot)
        slot = np.where(inside, self.slot[np.minimum(rows, max(len(self.slot) - 1, 0))], -1)
        has = slot >= 0
        if not has.any():
            return out
        cand = slot[has, None] * self.n_views + np.arange(self.n_views)[None, :]  # [h, V]
        kept = self.keep[cand]
        score = np.where(kept, rng.random(kept.shape), -1.0)
        pick = cand[np.arange(len(cand)), score.argmax(1)]
        out[has] = np.where(kept.any(1), pick, -1)
        return out


class TripleBatches(torch.utils.data.Dataset):
    """Element ``step`` of an epoch is one batch of triples (see the module docstring).

    Returns a dict of tensors: ``q_image [B, Ti, Di]``, ``q_text [B, L, Dt]``, ``q_mask [B, L]``
    (and the same for ``p_`` and ``n_``), ``q_keys``/``p_keys``/``n_keys [B, 2]``, ``self_positive``
    and ``augmented`` ``[B]`` bool, ``rows [B]`` (query item rows).
    """

    def __init__(self, products: Products, tokens: TokenSet, batch_size: int, *, steps: int | None = None,
                 seed: int = 0, aug: AugViews | None = None, p_aug: float = 0.5):
        items = products.items
        self.items, self.tokens, self.batch_size, self.seed = items, tokens, batch_size, seed
        self.aug, self.p_aug = aug, p_aug
        self.train_rows = items.rows("train")
        if len(self.train_rows) < 2:
            raise ValueError(f"{items.name}: MOON2.0 training needs at least two training items")
        self.keys = torch.from_numpy(items.keys)
        rows = self.train_rows[np.argsort(items.group[self.train_rows], kind="stable")]
        _, start, count = np.unique(items.group[rows], return_index=True, return_counts=True)
        self.by_group = rows
        self.group_start = np.zeros(int(items.group.max()) + 1, np.int64)
        self.group_count = np.zeros(int(items.group.max()) + 1, np.int64)
        self.group_start[items.group[rows[start]]] = start
        self.group_count[items.group[rows[start]]] = count
        self.pos_in_group = np.zeros(len(items), np.int64)  # a training row's position in its product
        self.pos_in_group[rows] = np.arange(len(rows)) - np.repeat(start, count)
        self.category_pool = CategoryPool(self.train_rows, items.category)
        self.steps = steps or max(1, math.ceil(len(self.train_rows) / batch_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def _queries(self, step: int) -> np.ndarray:
        n, b = len(self.train_rows), min(self.batch_size, len(self.train_rows))
        lo = (step * b) % n
        perm = np.random.default_rng([self.seed, self.epoch, 1 + (step * b) // n]).permutation(self.train_rows)
        if lo + b <= n:
            return perm[lo:lo + b]
        nxt = np.random.default_rng([self.seed, self.epoch, 2 + (step * b) // n]).permutation(self.train_rows)
        return np.concatenate([perm[lo:], nxt[:lo + b - n]])

    def positives(self, q: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Another training item of each query's product, drawn at random (the query itself when its
        product has no other training item); and which queries are their own positive."""
        g = self.items.group[q]
        count, start = self.group_count[g], self.group_start[g]
        alone = count < 2
        off = (rng.random(len(q)) * np.maximum(count - 1, 1)).astype(np.int64)
        off += off >= self.pos_in_group[q]  # skip the query's own position in its product
        other = self.by_group[np.minimum(start + off, len(self.by_group) - 1)]
        return np.where(alone, q, other), alone

    def negatives(self, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A training item of each query's category from another product (any other product's
        item when the category has none)."""
        g, cat = self.items.group, self.items.category[q]
        out = self.category_pool.draw(rng.random((len(q), 1)), cat)[:, 0]
        for _ in range(4):
            bad = g[out] == g[q]
            if not bad.any():
                break
            k = int(bad.sum())
            redraw = self.category_pool.draw(rng.random((k, 1)), cat[bad])[:, 0]
            anywhere = self.train_rows[(rng.random(k) * len(self.train_rows)).astype(np.int64)]
            out[bad] = np.where(rng.random(k) < 0.5, redraw, anywhere)
        bad = g[out] == g[q]
        if bad.any():  # a last deterministic sweep: the next training item of another product
            for i in np.flatnonzero(bad):
                other = self.train_rows[g[self.train_rows] != g[q[i]]]
                out[i] = other[int(rng.integers(len(other)))] if len(other) else out[i]
        return out

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(step), 7])
        q = self._queries(int(step))
        p, self_pos = self.positives(q, rng)
        n = self.negatives(q, rng)
        out: dict = {"rows": torch.from_numpy(q), "self_positive": torch.from_numpy(self_pos)}
        view = np.full(len(q), -1, np.int64)
        if self.aug is not None and self.p_aug > 0:
            view = self.aug.views_of(q, rng)
            view[rng.random(len(q)) >= self.p_aug] = -1
        augmented = view >= 0
        q_image = self.tokens.images(q)
        q_text, q_mask = self.tokens.texts(q)
        if augmented.any():
            a = np.flatnonzero(augmented)
            q_image[a] = torch.from_numpy(np.asarray(self.aug.image[view[a]])).float()
            slot = self.aug.slot[q[a]]
            q_text[a] = torch.from_numpy(np.asarray(self.aug.text[slot])).float()
            q_mask[a] = torch.from_numpy(self.aug.mask[slot])
        out.update(q_image=q_image, q_text=q_text, q_mask=q_mask, augmented=torch.from_numpy(augmented))
        for name, r in (("p", p), ("n", n)):
            out[f"{name}_image"] = self.tokens.images(r)
            out[f"{name}_text"], out[f"{name}_mask"] = self.tokens.texts(r)
        for name, r in (("q", q), ("p", p), ("n", n)):
            out[f"{name}_keys"] = self.keys[torch.from_numpy(r)]
        return out


class TokenChunks(torch.utils.data.Dataset):
    """Rows to embed, in chunks: element i holds ``rows``, ``image``, ``text`` and ``mask``."""

    def __init__(self, rows: np.ndarray, tokens: TokenSet, chunk: int = 512):
        self.rows, self.tokens, self.chunk = np.asarray(rows), tokens, chunk

    def __len__(self) -> int:
        return (len(self.rows) + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        r = self.rows[i * self.chunk:(i + 1) * self.chunk]
        text, mask = self.tokens.texts(r)
        return {"rows": torch.from_numpy(r), "image": self.tokens.images(r), "text": text, "mask": mask}
