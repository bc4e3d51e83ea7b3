"""Item sources for the encoders and the Lightning data module that serves their task batches.

A source's ``load(image_size, cache_dir)`` returns an :class:`ItemSet` and, where the source has
visual-search traffic, a :class:`ClickLog`. The data module turns them into training batches
(:class:`TaskBatches`), evaluation chunks (every item of the split to embed) and the evaluation
spec the module scores them with (image search queries and titles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from encoders.data import ClickLog, ItemSet, TaskBatches, hm_items, items_from_table
from encoders.evaluate import SearchQueries, same_group_queries


@dataclass
class SimItems:
    """The visual-search simulator (:mod:`ctr.data.sources.simulator`): its catalogue and its
    production log's clicks, split in time like the CTR stage's data (``fractions`` of the log
    ordered by timestamp, request, position), so an encoder post-trained on the train clicks
    never sees the CTR stage's validation or test period. Image search is scored on the val/test
    requests (a query image against the items clicked for it) over the whole catalogue."""

    preset: str = "default"
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def load(self, image_size: int, cache_dir: str | None) -> tuple[ItemSet, ClickLog]:
        from ctr.data.sources.simulator import SimConfig, simulate

        cfg = SimConfig.preset(self.preset, seed=self.seed, **self.overrides)
        d = simulate(cfg)
        where = f"simulator({self.preset}, seed={self.seed})"
        items = items_from_table(d.items, image_size, cache_dir, source=f"{where}.items")
        items.meta = {"source": "sim", "preset": self.preset, "seed": self.seed,
                      "overrides": dict(self.overrides),
                      # the click split: an encoder post-trained here saw clicks of the first
                      # fractions[0] of the log in this order (the CTR stage must split alike)
                      "click_split": {"fractions": list(self.fractions),
                                      "order": ["timestamp", "request_id", "position"]}}
        clicks = ClickLog.from_events(d.events, items, source=f"{where}.events",
                                      fractions=tuple(self.fractions))
        return items, clicks

    def evaluation(self, items: ItemSet, clicks: ClickLog | None) -> dict:
        gallery = np.arange(len(items))
        out = {}
        for split in ("val", "test"):
            q, off, rel = clicks.queries[split]
            # the catalogue's titles are all training pairs: no image-text retrieval is scored here
            out[split] = {"rows": gallery, "search": {"search": SearchQueries(q, off, rel, gallery)},
                          "image_text": False}
        return out


@dataclass
class HMItems:
    """The H&M sample: image-text pairs; products held out whole (``held_out`` fractions), and
    same-product image search among a split's items (a photo against its colour variants)."""

    held_out: tuple[float, float, float] = (0.8, 0.1, 0.1)
    n_items: int | None = None
    data_dir: str | None = None

    def load(self, image_size: int, cache_dir: str | None) -> tuple[ItemSet, None]:
        return hm_items(image_size, cache_dir, self.data_dir, tuple(self.held_out), self.n_items), None

    def evaluation(self, items: ItemSet, clicks: ClickLog | None) -> dict:
        out = {}
        for split in ("val", "test"):
            rows = items.rows(split)
            out[split] = {"rows": rows, "search": {"same_product": same_group_queries(rows, items.group)},
                          "image_text": True}
        return out


class EvalChunks(torch.utils.data.Dataset):
    """Item rows to embed, in chunks: element i holds rows, uint8 images and title tokens."""

    def __init__(self, rows: np.ndarray, images: Tensor, tokens: dict[str, Tensor] | None, chunk: int):
        self.rows, self.images, self.tokens, self.chunk = torch.from_numpy(np.asarray(rows)), images, tokens, chunk

    def __len__(self) -> int:
        return (len(self.rows) + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i * self.chunk:(i + 1) * self.chunk]
        out = {"rows": r, "images": self.images[r]}
        if self.tokens is not None:
            out["tokens"] = {k: v[r] for k, v in self.tokens.items()}
        return out


class ContrastiveDataModule(pl.LightningDataModule):
    """Loads a source once (``setup``), tokenises titles once, serves task batches and evaluation
    chunks. ``tokenize`` is the text tower's tokenizer (None without a text tower)."""

    def __init__(self, source, tasks: dict[str, float], image_size: int = 64, batch_size: int = 64,
                 n_shown: int = 4, n_category: int = 4, product_pairs: int | None = None,
                 steps_per_epoch: int | None = None, eval_batch_size: int = 256,
                 cache_dir: str | None = None, seed: int = 0, tokenize=None):
        super().__init__()
        self.source, self.tasks = source, {k: float(v) for k, v in tasks.items()}
        self.image_size, self.batch_size = image_size, batch_size
        self.n_shown, self.n_category, self.steps_per_epoch = n_shown, n_category, steps_per_epoch
        self.product_pairs = product_pairs
        self.eval_batch_size, self.cache_dir, self.seed = eval_batch_size, cache_dir, seed
        self.tokenize = tokenize
        self.items: ItemSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        cache = None if self.cache_dir is None else os.path.join(self.cache_dir, "images")
        self.items, self.clicks = self.source.load(self.image_size, cache)
        self.tokens = (None if self.tokenize is None or self.items.titles is None
                       else {k: v.contiguous() for k, v in self.tokenize(self.items.titles).items()})
        self.images = torch.from_numpy(np.asarray(self.items.images))
        self.spec = self.source.evaluation(self.items, self.clicks)

    @property
    def evaluation(self) -> dict:
        """What the module measures (see ``ContrastiveModule.evaluate_collected``)."""
        self.setup()
        return {"n_items": len(self.items), "titles": self.items.titles,
                **{f"{s}_search": self.spec[s]["search"] for s in self.spec},
                **{f"{s}_image_text": self.spec[s]["image_text"] for s in self.spec}}

    def train_dataloader(self):
        ds = TaskBatches(self.items, self.tasks, self.batch_size, clicks=self.clicks, tokens=self.tokens,
                         n_shown=self.n_shown, n_category=self.n_category,
                         product_pairs=self.product_pairs, steps=self.steps_per_epoch, seed=self.seed)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # a resumed run's first epoch; the module's epoch hook sets later ones
            ds.set_epoch(trainer.current_epoch)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def _eval(self, split: str):
        ds = EvalChunks(self.spec[split]["rows"], self.images, self.tokens, self.eval_batch_size)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")

    def all_items(self):
        """Chunks over every item (for the export)."""
        ds = EvalChunks(np.arange(len(self.items)), self.images, None, self.eval_batch_size)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)
