"""Lightning DataModule over a prepared artefact: batches by index slicing over a shuffled index.

Distributed (a trainer with ``world_size > 1``, e.g. ``trainer=ddp_cpu`` or ``trainer=ddp``): the
data module shards its batches itself (the trainer presets set ``use_distributed_sampler: false``,
so that Lightning does not put a ``DistributedSampler`` in their place):

* training: ``batch_size`` is the *global* batch. Every rank draws the same permutation (the same
  ``seed``) and takes its own contiguous share of each global batch, ``batch_size / world_size``
  rows (``batch_size`` must be divisible by the world size), so that the ranks' batches of a step
  are disjoint and together are the single-process batch. With DDP's gradient averaging, a step
  then equals the single-process step on the same global batch (the loss is a mean over equal
  shares). The last, partial batch of an epoch (``drop_last=False``) is split as evenly as it
  goes (its gradient is then the mean of unequal shares' means) and dropped on every rank when it
  has fewer rows than ranks.
* evaluation: each rank evaluates a contiguous ``1 / world_size`` of each split (no padding, no
  duplicates); the metrics (``ctr.metrics``, torchmetrics with ``cat``/``sum`` states) gather
  their states over the ranks when computed, so every rank logs the metrics of the whole split.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl_
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from ctr.data.batch import Batch, TensorStore
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


class ResumableSampler(Sampler):
    """Wraps a training (batch) sampler for mid-epoch resume: remembers ``generator``'s state at the
    start of every epoch (before the epoch's permutation is drawn) and, once, skips the first
    ``skip`` elements of an epoch (the batches a resumed run had trained before its checkpoint)."""

    def __init__(self, sampler, generator: torch.Generator | None = None, skip: int = 0):
        self.sampler, self.generator, self.skip = sampler, generator, skip
        self.start_state: torch.Tensor | None = None  # set as each epoch starts

    def __iter__(self):
        if self.generator is not None:
            self.start_state = self.generator.get_state()
        skip, self.skip = self.skip, 0
        it = iter(self.sampler)
        for _ in range(skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)  # the epoch's length; Lightning counts on from the skipped batches


class StepResume:
    """Mixin for data modules whose training batch is a function of (seed, epoch, step) (the
    encoders'): a checkpoint taken inside an epoch (``checkpoint_every_n_steps``) records that epoch
    and the steps done; the next training loader (:meth:`step_loader`) goes on from there."""

    _resume_skip: int = 0
    _resume_epoch: int | None = None

    def step_loader(self, ds, wrap=None, **loader_kwargs) -> DataLoader:
        """A loader over the steps of ``ds`` (with ``set_epoch``), for the epoch being trained;
        ``wrap(ds)``, e.g. a rank's share, is applied after the epoch is set."""
        trainer = getattr(self, "trainer", None)
        if self._resume_epoch is not None:  # resuming inside an epoch: its batches, from the next step
            ds.set_epoch(self._resume_epoch)
        elif trainer is not None:  # a resumed run's first epoch; the module's epoch hook sets later ones
            ds.set_epoch(trainer.current_epoch)
        ds = wrap(ds) if wrap is not None else ds
        sampler = ResumableSampler(SequentialSampler(ds), skip=self._resume_skip)
        self._resume_skip, self._resume_epoch = 0, None
        return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0, **loader_kwargs)

    def state_dict(self) -> dict:
        from ctr.resume import batches_done

        trainer = getattr(self, "trainer", None)
        done = batches_done(trainer)
        return {"batches_done": done, "epoch": trainer.current_epoch} if done else {}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores this before it builds the training loader, and does not call the
        # epoch-start hooks of an epoch it resumes inside: the loader sets that epoch itself
        self._resume_skip = int(state.get("batches_done", 0))
        self._resume_epoch = state.get("epoch") if self._resume_skip else None


class RankBatches(Sampler):
    """Rank ``rank``'s share of every batch of ``batches`` (global batches, the same on every rank):
    its contiguous slice ``[n * rank // world, n * (rank + 1) // world)`` of a batch of ``n`` rows.
    A batch with fewer rows than ranks (only an epoch's last, partial batch can be one) is skipped
    on every rank, so that all ranks take the same number of steps."""

    def __init__(self, batches: BatchSampler, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for idx in self.batches:
            n = len(idx)
            if n >= self.world:
                yield idx[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def __len__(self) -> int:
        b = self.batches
        last = len(b.sampler) % b.batch_size  # rows of the last, partial batch (0: none)
        return len(b) - int(not b.drop_last and 0 < last < self.world)


class EvalShard(Sampler):
    """Batches of ``batch_size`` rows over rank ``rank``'s contiguous ``1 / world`` of ``n`` rows
    (in order; every rank has at least one row when ``n >= world``)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1):
        self.lo, self.hi, self.batch_size = n * rank // world, n * (rank + 1) // world, batch_size

    def __iter__(self):
        for s in range(self.lo, self.hi, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.hi)))

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)


class RankSharding:
    """For the data modules that shard batches over DDP ranks themselves: the attached trainer's
    (rank, world size), and whether to pin host memory (``self.pin_memory``: None = on a GPU)."""

    def _distributed(self) -> tuple[int, int]:
        """(global rank, world size) of the attached trainer ((0, 1) without one)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        # the presets set use_distributed_sampler: false; Lightning would otherwise replace the
        # batch sampler by a DistributedSampler over single rows
        if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise ValueError(f"{type(self).__name__} shards its batches over the ranks itself: set "
                             "trainer.use_distributed_sampler=false (the trainer presets do)")
        return trainer.global_rank, trainer.world_size

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"


class CTRDataModule(RankSharding, pl_.LightningDataModule):
    """Prepares ``source`` with ``settings`` (once, cached by fingerprint) and serves its splits.

    ``eval_splits`` lists the splits evaluated at test time (``test`` plus e.g. ``test_random``).

    ``train_samples`` trains on part of the train split (the data axis of scaling studies): an int
    keeps that many impressions, a float in (0, 1] that share. ``train_subset`` picks them:
    ``"random"`` (a fixed permutation drawn from ``subset_seed``, so that smaller subsets are
    nested in larger ones and every training seed sees the same impressions) or ``"latest"`` (the
    most recent ones, next to the validation period). Histories still come from the whole log.

    ``batch_size`` is the global training batch: under DDP each of the ``W`` ranks trains on
    ``batch_size / W`` rows of it (see the module docstring). ``pin_memory``: page-locked batches
    for faster, asynchronous host-to-GPU copies; ``None`` (the default) pins when the trainer's
    device is a CUDA GPU.
    """

    def __init__(self, source: Source, settings: PrepareSettings, cache_dir: str | Path,
                 batch_size: int = 1024, eval_batch_size: int = 8192, in_memory: bool = True,
                 eval_splits: tuple[str, ...] = ("test",), pin_memory: bool | None = None,
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
        self._shuffle: ResumableSampler | None = None  # the training loader's (global) batches
        self._resume: dict | None = None  # a checkpoint's data state, for the next training loader

    # The data order goes into every checkpoint (Lightning saves a datamodule's state_dict) and
    # comes back on resume, so that a resumed run trains on the batches an uninterrupted run would
    # have: at an epoch's end, the shuffling generator's state (the next epochs' permutations); in
    # an epoch (checkpoint_every_n_steps), its state at the epoch's start and the batches done.
    def state_dict(self) -> dict:
        from ctr.resume import batches_done

        if self._shuffle is None:
            return {}
        done = batches_done(getattr(self, "trainer", None))
        if done:
            return {"shuffle_generator": self._shuffle.start_state, "batches_done": done}
        return {"shuffle_generator": self._shuffle.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "shuffle_generator" in state:
            self._resume = dict(state)

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
        rank, world = self._distributed()
        if train and self.train_index is not None:
            store = _Rows(store, self.train_index)
        if train:
            if self.batch_size % world:
                raise ValueError(f"batch_size={self.batch_size} (the global batch) is not divisible by the "
                                 f"{world} ranks of the trainer")
            g = torch.Generator().manual_seed(self.seed)  # the same permutation on every rank
            if self._resume is not None:  # resuming: the generator as the checkpoint left it
                g.set_state(self._resume["shuffle_generator"])
            skip = int((self._resume or {}).get("batches_done", 0))
            self._resume = None
            sampler = BatchSampler(RandomSampler(store, generator=g), self.batch_size, self.drop_last)
            if world > 1:
                sampler = RankBatches(sampler, rank, world)
            sampler = self._shuffle = ResumableSampler(sampler, g, skip)  # skips whole (global) batches
        elif world > 1:
            if 0 < len(store) < world:
                raise ValueError(f"split {split!r} has {len(store)} rows, fewer than the {world} ranks")
            sampler = EvalShard(len(store), self.eval_batch_size, rank, world)
        else:
            sampler = BatchSampler(SequentialSampler(store), self.eval_batch_size, False)
        return DataLoader(store, sampler=sampler, batch_size=None, collate_fn=_identity,
                          pin_memory=self._pin())

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Lightning's hook: a ``Batch`` goes to a GPU with non-blocking copies (asynchronous from
        pinned memory). Lightning's own transfer passes ``non_blocking`` to bare tensors only, not to
        objects with a ``.to()`` such as ``Batch``."""
        if isinstance(batch, Batch):
            return batch.to(device, non_blocking=torch.device(device).type not in ("cpu", "mps"))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(s, False) for s in self.eval_splits]
