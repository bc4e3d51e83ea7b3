"""Lightning DataModule over a prepared artefact: batches by index slicing over a shuffled index."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl_
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from ctr.data.batch import TensorStore
from ctr.data.prepare import Artefact, PrepareSettings, Source, prepare


def _identity(batch):
    return batch


class CTRDataModule(pl_.LightningDataModule):
    """Prepares ``source`` with ``settings`` (once, cached by fingerprint) and serves its splits.

    ``eval_splits`` lists the splits evaluated at test time (``test`` plus e.g. ``test_random``).
    """

    def __init__(self, source: Source, settings: PrepareSettings, cache_dir: str | Path,
                 batch_size: int = 1024, eval_batch_size: int = 8192, in_memory: bool = True,
                 eval_splits: tuple[str, ...] = ("test",), pin_memory: bool = False,
                 drop_last: bool = False, seed: int = 0):
        super().__init__()
        self.source, self.settings, self.cache_dir = source, settings, Path(cache_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.in_memory, self.pin_memory, self.drop_last, self.seed = in_memory, pin_memory, drop_last, seed
        self.eval_splits = tuple(eval_splits)
        self.artefact: Artefact | None = None
        self.stores: dict[str, TensorStore] = {}

    def prepare_data(self) -> None:
        self.artefact = prepare(self.source, self.settings, self.cache_dir)

    @property
    def meta(self) -> dict:
        if self.artefact is None:
            self.prepare_data()
        return self.artefact.meta  # type: ignore[union-attr]

    def setup(self, stage: str | None = None) -> None:
        if self.artefact is None:
            self.prepare_data()
        for split in ("train", "val", *self.eval_splits):
            if split not in self.stores:
                if split not in self.meta["splits"]:
                    raise KeyError(f"split {split!r} not in the prepared data (has {list(self.meta['splits'])})")
                self.stores[split] = TensorStore(self.artefact.split_dir(split), in_memory=self.in_memory)

    def _loader(self, split: str, train: bool) -> DataLoader:
        store = self.stores[split]
        if train:
            g = torch.Generator().manual_seed(self.seed)
            sampler = BatchSampler(RandomSampler(store, generator=g), self.batch_size, self.drop_last)
        else:
            sampler = BatchSampler(SequentialSampler(store), self.eval_batch_size, False)
        return DataLoader(store, sampler=sampler, batch_size=None, collate_fn=_identity,
                          pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(s, False) for s in self.eval_splits]
