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


class _Rows(torch.utils.data.Dataset):
    """The rows ``index`` of a store, served by the same batched index slicing."""

    def __init__(self, store: TensorStore, index: torch.Tensor):
        self.store, self.index = store, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx):
        return self.store[self.index[torch.as_tensor(idx, dtype=torch.long)]]


class CTRDataModule(pl_.LightningDataModule):
    """Prepares ``source`` with ``settings`` (once, cached by fingerprint) and serves its splits.

    ``eval_splits`` lists the splits evaluated at test time (``test`` plus e.g. ``test_random``).

    ``train_samples`` trains on part of the train split (the data axis of scaling studies): an int
    keeps that many impressions, a float in (0, 1] that share. ``train_subset`` picks them:
    ``"random"`` (a fixed permutation drawn from ``subset_seed``, so that smaller subsets are
    nested in larger ones and every training seed sees the same impressions) or ``"latest"`` (the
    most recent ones, next to the validation period). Histories still come from the whole log.
    """

    def __init__(self, source: Source, settings: PrepareSettings, cache_dir: str | Path,
                 batch_size: int = 1024, eval_batch_size: int = 8192, in_memory: bool = True,
                 eval_splits: tuple[str, ...] = ("test",), pin_memory: bool = False,
                 drop_last: bool = False, seed: int = 0, train_samples: int | float | None = None,
                 train_subset: str = "random", subset_seed: int = 0):
        super().__init__()
        self.source, self.settings, self.cache_dir = source, settings, Path(cache_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.in_memory, self.pin_memory, self.drop_last, self.seed = in_memory, pin_memory, drop_last, seed
        self.eval_splits = tuple(eval_splits)
        if train_subset not in ("random", "latest"):
            raise ValueError(f"train_subset must be 'random' or 'latest', got {train_subset!r}")
        if train_samples is not None and (isinstance(train_samples, bool) or train_samples <= 0
                                          or (isinstance(train_samples, float) and train_samples > 1)):
            raise ValueError(f"train_samples must be a positive int or a float in (0, 1], got {train_samples!r}")
        self.train_samples, self.train_subset, self.subset_seed = train_samples, train_subset, subset_seed
        self.train_index: torch.Tensor | None = None  # rows of the train split used (None: all)
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
        if self.train_samples is not None and self.train_index is None:
            self.train_index = self._subset(len(self.stores["train"]))

    def _subset(self, n: int) -> torch.Tensor:
        k = self.train_samples
        k = int(round(k * n)) if isinstance(k, float) else int(k)
        if k > n:
            raise ValueError(f"train_samples={self.train_samples} but the train split of "
                             f"{self.artefact.path} has {n} impressions")
        k = max(k, 1)
        if self.train_subset == "latest":  # the split is in time order
            return torch.arange(n - k, n)
        g = torch.Generator().manual_seed(self.subset_seed)
        return torch.randperm(n, generator=g)[:k].sort().values

    @property
    def n_train(self) -> int:
        """Impressions the model trains on (the whole train split unless ``train_samples`` is set)."""
        self.setup()
        return len(self.stores["train"]) if self.train_index is None else len(self.train_index)

    def _loader(self, split: str, train: bool) -> DataLoader:
        store = self.stores[split]
        if train and self.train_index is not None:
            store = _Rows(store, self.train_index)
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
