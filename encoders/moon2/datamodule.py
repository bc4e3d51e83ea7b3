"""The MOON2.0 data module: products, frozen towers' token caches, co-augmentation, batches.

``setup`` loads the training source (H&M by default) and the benchmark sources, computes (or
memory-maps) every token cache, and builds the co-augmented views of the training items (texts
enriched from their attributes, ``n_views`` edited images each), whose edited images exist only
as cached tokens. Validation and test items are never augmented.

``bad_images`` (``"fail"`` / ``"skip"``) and ``max_image_pixels`` apply to every source's photos
(:func:`encoders.data.items_from_table`); each source's skipped items are in
``products.items.image_failures``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytorch_lightning as pl
import torch

from ctr.data.datamodule import StepResume
from encoders.images import MAX_PIXELS, check_image_settings
from encoders.moon2.augment import AttributeEnricher, CallableEnricher, expand_images
from encoders.moon2.data import AugViews, TokenChunks, TripleBatches
from encoders.moon2.features import Products, TokenSet, image_token_cache, load_products, text_token_cache


class Moon2DataModule(StepResume, pl.LightningDataModule):
    def __init__(self, image_tower, text_tower, *, train: str = "hm", bench: dict | None = None,
                 image_size: int = 96, held_out=(0.8, 0.1, 0.1), n_items: int | None = None,
                 batch_size: int = 128, steps_per_epoch: int | None = None, eval_batch_size: int = 512,
                 coaug: dict | None = None, cache_dir: str | None = None, data_dir: str | None = None,
                 seed: int = 0, enricher=None, bad_images: str = "fail", max_image_pixels: int = MAX_PIXELS):
        super().__init__()
        check_image_settings(bad_images, max_image_pixels)
        self.bad_images, self.max_image_pixels = bad_images, max_image_pixels
        self.image_tower, self.text_tower = image_tower, text_tower
        self.train_source, self.bench = train, dict(bench if bench is not None else {"hm": None})
        self.image_size, self.held_out, self.n_items = image_size, tuple(held_out), n_items
        self.batch_size, self.steps_per_epoch, self.eval_batch_size = batch_size, steps_per_epoch, eval_batch_size
        self.coaug = {"enabled": False, "n_views": 2, "seed": 0, "p_aug": 0.5, "template": None, **(coaug or {})}
        self.cache_dir, self.data_dir, self.seed = cache_dir, data_dir, seed
        self.enricher = enricher  # a TextEnricher (e.g. CallableEnricher over a local model); None: template
        self.sources: dict[str, tuple[Products, TokenSet]] = {}
        self.aug: AugViews | None = None
        self.prompts: dict | None = None

    # ------------------------------------------------------------------ loading
    def _tokens(self, products: Products) -> TokenSet:
        items = products.items
        img = image_token_cache(self.image_tower, items.images, items.image_fingerprint, self._cache, self.image_size)
        txt, mask = text_token_cache(self.text_tower, items.titles, self._cache)
        return TokenSet(img, txt, mask)

    @property
    def _cache(self) -> str | None:
        return None if self.cache_dir is None else str(self.cache_dir)

    def load(self, name: str, n_items: int | None) -> tuple[Products, TokenSet]:
        if name not in self.sources:
            images = None if self.cache_dir is None else os.path.join(self.cache_dir, "images")
            p = load_products(name, self.image_size, images, data_dir=self.data_dir, held_out=self.held_out,
                              n_items=n_items, bad_images=self.bad_images, max_pixels=self.max_image_pixels)
            self.sources[name] = (p, self._tokens(p))
        return self.sources[name]

    def setup(self, stage: str | None = None) -> None:
        if self.prompts is not None:  # set up already (prompts come last)
            return
        self.products, self.tokens = self.load(self.train_source, self.n_items)
        for name, n in self.bench.items():
            cap = [c for c in (self.n_items, n) if c is not None]
            self.load(name, min(cap) if cap else None)
        if self.coaug["enabled"]:
            self.aug = self.build_aug(self.products)
        self.prompts = {}
        for name, (p, _) in self.sources.items():
            names = sorted(set(p.attrs["type"].tolist()))
            hidden, mask = text_token_cache(self.text_tower, names, self._cache)
            self.prompts[name] = (names, hidden, mask)

    def build_aug(self, products: Products) -> AugViews:
        """Co-augmented views of the training items (enriched texts, edited images' tokens)."""
        items, c = products.items, self.coaug
        rows = items.rows("train")
        attrs = {k: v[rows] for k, v in products.attrs.items()}
        titles = [items.titles[r] for r in rows]
        enricher = self.enricher or (AttributeEnricher(c["template"]) if c["template"] else AttributeEnricher())
        if isinstance(enricher, dict):  # from a config: {"generate": callable, "prompt": ...}
            enricher = CallableEnricher(**enricher)
        texts = enricher(titles, attrs)
        hidden, mask = text_token_cache(self.text_tower, texts, self._cache)
        v, seed = int(c["n_views"]), int(c["seed"])
        key = hashlib.sha1(f"{items.image_fingerprint}:{hashlib.sha1(rows.tobytes()).hexdigest()}:views{v}:seed{seed}"
                           .encode()).hexdigest()[:16]
        edited = _LazyViews(items.images, rows, v, seed)
        img = image_token_cache(self.image_tower, edited, f"coaug-{key}", self._cache, self.image_size)
        return AugViews(rows=rows, n_views=v, image=img, text=hidden, mask=mask, texts=texts)

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self):
        ds = TripleBatches(self.products, self.tokens, self.batch_size, steps=self.steps_per_epoch, seed=self.seed,
                           aug=self.aug, p_aug=float(self.coaug["p_aug"]) if self.aug is not None else 0.0)
        return self.step_loader(ds)  # the epoch's steps; a resumed run's from where its checkpoint was

    def _eval(self, split: str):
        ds = TokenChunks(self.products.items.rows(split), self.tokens, self.eval_batch_size)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")


class _LazyViews:
    """``expand_images`` of the training rows, produced chunk by chunk when the token cache asks
    for rows ``[lo, hi)`` of the ``len(rows) * n_views`` edited images (never all in memory). The
    edits of a chunk depend on the seed and the chunk's first row only."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, n_views: int, seed: int):
        self.images, self.rows, self.n_views, self.seed = images, rows, n_views, seed

    def __len__(self) -> int:
        return len(self.rows) * self.n_views

    def __getitem__(self, sl) -> np.ndarray:
        if not isinstance(sl, slice):
            raise TypeError("_LazyViews supports contiguous slices only")
        lo, hi, _ = sl.indices(len(self))
        first, last = lo // self.n_views, (hi - 1) // self.n_views + 1
        views = expand_images(np.asarray(self.images[self.rows[first:last]]), self.n_views,
                              seed=self.seed * 1_000_003 + first)
        return views[lo - first * self.n_views:hi - first * self.n_views]
