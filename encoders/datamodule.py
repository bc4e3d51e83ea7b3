"""Item sources for the encoders and the Lightning data module that serves their task batches.

A source's ``load(image_size, cache_dir)`` returns an :class:`ItemSet` and, where the source has
visual-search traffic, a :class:`ClickLog`. The data module turns them into training batches
(:class:`TaskBatches`), evaluation chunks (every item of the split to embed) and the evaluation
spec the module scores them with (image search queries and titles).

Distributed (a trainer with ``world_size > 1``; the trainer presets set
``use_distributed_sampler: false``): ``batch_size`` (and ``product_pairs``) is the *global*
batch. Every rank draws the same multi-task batch of a step (the generator is seeded by seed,
epoch and step) and keeps its own contiguous share of each task's rows (:class:`RankShare`); the
losses gather the embeddings over the ranks with gradient, so the in-batch negatives span the
global batch and a DDP step equals the single-process step on it. Each task's rows must split
evenly over the ranks. Evaluation is not sharded: every rank embeds every item of the split and
computes the same retrieval metrics (item sets here are small; the training is what scales).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from ctr.data.datamodule import RankSharding, StepResume
from encoders.data import ClickLog, ItemSet, TaskBatches, hm_items, items_from_table
from encoders.evaluate import SearchQueries, same_group_queries
from encoders.images import MAX_PIXELS, check_image_settings


@dataclass
class SimItems:
    """The visual-search simulator (:mod:`ctr.data.sources.simulator`): its catalogue and its
    production log's clicks, split in time like the CTR stage's data (``fractions`` of the log
    ordered by timestamp, request, position), so an encoder post-trained on the train clicks
    never sees the CTR stage's validation or test period. Image search is scored on the val/test
    requests (a query image against the items clicked for it) over the whole catalogue.

    ``bad_images`` (``"fail"`` / ``"skip"``) and ``max_image_pixels``: what happens to an item whose
    image cannot be used (:func:`encoders.data.items_from_table`); a skipped item's events are
    dropped from the click log too."""

    preset: str = "default"
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    bad_images: str = "fail"
    max_image_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        check_image_settings(self.bad_images, self.max_image_pixels)

    def load(self, image_size: int, cache_dir: str | None) -> tuple[ItemSet, ClickLog]:
        from ctr.data.sources.simulator import SimulatorSource, simulate

        # the policy reaches a real catalogue's photos too (overrides win)
        d = simulate(SimulatorSource(self.preset, self.seed, dict(self.overrides), bad_images=self.bad_images,
                                     max_image_pixels=self.max_image_pixels).config())
        where = f"simulator({self.preset}, seed={self.seed})"
        items = items_from_table(d.items, image_size, cache_dir, source=f"{where}.items",
                                 bad_images=self.bad_images, max_pixels=self.max_image_pixels)
        items.meta = {"source": "sim", "preset": self.preset, "seed": self.seed,
                      "overrides": dict(self.overrides),
                      # the click split: an encoder post-trained here saw clicks of the first
                      # fractions[0] of the log in this order (the CTR stage must split alike)
                      "click_split": {"fractions": list(self.fractions),
                                      "order": ["timestamp", "request_id", "position"]}}
        clicks = ClickLog.from_events(d.events, items, source=f"{where}.events",
                                      fractions=tuple(self.fractions))
        if clicks.dropped_events:
            items.meta["events_of_skipped_items"] = clicks.dropped_events
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
    same-product image search among a split's items (a photo against its colour variants).
    ``bad_images``, ``max_image_pixels``: as for :class:`SimItems`."""

    held_out: tuple[float, float, float] = (0.8, 0.1, 0.1)
    n_items: int | None = None
    data_dir: str | None = None
    bad_images: str = "fail"
    max_image_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        check_image_settings(self.bad_images, self.max_image_pixels)

    def load(self, image_size: int, cache_dir: str | None) -> tuple[ItemSet, None]:
        items = hm_items(image_size, cache_dir, self.data_dir, tuple(self.held_out), self.n_items,
                         bad_images=self.bad_images, max_pixels=self.max_image_pixels)
        return items, None

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


ROLES = ("items", "query", "positive", "negatives", "anchor", "partner")  # per-task index tensors


def rank_share(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a global multi-task batch (:class:`encoders.data.TaskBatches`):
    the contiguous ``1 / world`` of every role's rows (and of the title tokens, which follow
    ``items``), with ``images``/``rows``/``keys`` cut down to the distinct images those rows use
    and the roles re-indexed into them. Concatenating the ranks' shares in rank order gives the
    global batch's rows back."""
    unknown = set(batch) - {*ROLES, "tokens", "images", "rows", "keys"}
    if unknown:
        raise KeyError(f"rank_share: unknown batch entries {sorted(unknown)}")
    parts = {}
    for k in ROLES:
        if k in batch:
            n = batch[k].shape[0]
            if n % world:
                raise ValueError(f"{k}: {n} rows of the global batch do not split evenly over {world} ranks "
                                 f"(the contrastive losses need equal shares): choose a batch size divisible by it")
            parts[k] = slice(n // world * rank, n // world * (rank + 1))
    roles = {k: batch[k][sl] for k, sl in parts.items()}
    uniq, inv = torch.unique(torch.cat([r.reshape(-1) for r in roles.values()]), return_inverse=True)
    out = {"images": batch["images"][uniq], "rows": batch["rows"][uniq], "keys": batch["keys"][uniq]}
    if "tokens" in batch:
        out["tokens"] = {k: v[parts["items"]] for k, v in batch["tokens"].items()}
    at = 0
    for k, r in roles.items():
        out[k] = inv[at:at + r.numel()].reshape(r.shape)
        at += r.numel()
    return out


class RankShare(torch.utils.data.Dataset):
    """This rank's share (:func:`rank_share`) of every global batch of ``batches``."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> dict:
        return rank_share(self.batches[step], self.rank, self.world)


class ContrastiveDataModule(StepResume, RankSharding, pl.LightningDataModule):
    """Loads a source once (``setup``), tokenises titles once, serves task batches and evaluation
    chunks. ``tokenize`` is the text tower's tokenizer (None without a text tower).

    ``batch_size`` and ``product_pairs`` are global: under DDP each rank gets its share (see the
    module docstring). ``pin_memory``: page-locked batches for asynchronous copies to the GPU;
    ``None`` pins when the trainer's device is a CUDA GPU."""

    def __init__(self, source, tasks: dict[str, float], image_size: int = 64, batch_size: int = 64,
                 n_shown: int = 4, n_category: int = 4, product_pairs: int | None = None,
                 steps_per_epoch: int | None = None, eval_batch_size: int = 256,
                 cache_dir: str | None = None, seed: int = 0, tokenize=None, pin_memory: bool | None = None):
        super().__init__()
        self.pin_memory = pin_memory
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
        self._check_fit(ds)
        rank, world = self._distributed()
        wrap = (lambda d: RankShare(d, rank, world)) if world > 1 else None
        return self.step_loader(ds, wrap, pin_memory=self._pin())

    def _check_fit(self, batches: TaskBatches) -> None:
        """When a trainer fits with this data module (it builds the task batches once, here): the
        click negatives against the data's pools and the monitored metric against what the
        module's validation logs (:func:`ctr.checks.check_encoder_data`), before the first step."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.state.status != "running":
            return
        module = trainer.lightning_module
        if not hasattr(module, "metric_names"):
            return
        from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

        from ctr.checks import check_encoder_data

        monitors = [cb.monitor for cb in trainer.callbacks
                    if isinstance(cb, (ModelCheckpoint, EarlyStopping)) and cb.monitor]
        check_encoder_data(batches, monitors, module.metric_names("val"))

    def _eval(self, split: str):
        self._distributed()  # the same check; every rank evaluates the whole split
        ds = EvalChunks(self.spec[split]["rows"], self.images, self.tokens, self.eval_batch_size)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0,
                                           pin_memory=self._pin())

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")

    def all_items(self):
        """Chunks over every item (for the export)."""
        ds = EvalChunks(np.arange(len(self.items)), self.images, None, self.eval_batch_size)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)
