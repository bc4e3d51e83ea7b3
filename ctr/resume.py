"""Interrupted runs: atomic, safely loaded checkpoints and an exact resume.

A run killed at any moment (even by SIGKILL) and started again with the same command
(``resume=true``, the default, and the same run folder) continues from ``checkpoints/last.ckpt``,
written at the end of every epoch, and ends with the metrics an uninterrupted run would have
given (bit-identical on CPU). What makes that hold:

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the same folder,
  flushes it to disk and renames it over the old one: a crash leaves the previous checkpoint
  intact, never a truncated one. It loads with ``torch.load(weights_only=True)``: tensors and
  plain containers only, never arbitrary pickled objects.
* With ``checkpoint_every_n_steps`` (:class:`StepCheckpoint`) ``last.ckpt`` is also written every
  N optimiser steps inside an epoch; a run resumed from one skips the epoch's batches already
  trained and goes on as the uninterrupted run would.
* :class:`ResumeState` keeps the random-number generators (torch, CUDA, numpy, python) and
  whether early stopping has fired in every checkpoint, so dropout masks and the stopping
  decision after a resume are those of the uninterrupted run. The data order is kept by the
  datamodule's state (``CTRDataModule.state_dict``: the shuffling generator); the optimiser, scheduler, loop
  counters, early-stopping and best-checkpoint bookkeeping by Lightning.
* :func:`check_resumable` refuses to resume from a checkpoint written under another config (the
  comparable config is kept in every checkpoint; run-control keys such as the thread count and
  paths may differ, and ``trainer.max_epochs`` may grow), instead of silently mixing two
  experiments; ``resume=false`` removes an earlier run's ``last.ckpt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO

# config keys that control how a run executes, not what it computes: they may change on a resume
RUN_CONTROL = ("paths", "resume", "threads", "logger", "callbacks")
# ... and the trainer's: the progress display, and the length limits (a run may be continued for longer)
RUN_CONTROL_TRAINER = ("enable_progress_bar", "log_every_n_steps", "max_epochs", "max_steps", "max_time")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint or table holds objects that only an unpickler could rebuild."""


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of them.
    A file that needs arbitrary unpickling (code that would run on load) is refused with a clear
    error instead of being executed. ``mmap``: tensors are mapped, not read (a quick look)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises UnpicklingError (or a RuntimeError wrapping it)
        if "weights_only" in str(e) or isinstance(e, __import__("pickle").UnpicklingError):
            raise UnsafeCheckpointError(
                f"{path}: refusing to load; it holds objects beyond tensors and plain containers, and "
                f"loading it would run pickled code (only files this project wrote load). torch said: "
                f"{str(e).splitlines()[0]}") from e
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`ctr.runs.atomic_replace` (temporary file, fsync, rename)."""
    from ctr.runs import atomic_replace

    atomic_replace(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes and ``weights_only`` loads (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return safe_load(path, map_location=map_location or (lambda storage, loc: storage))


def rng_state() -> dict:
    """Every generator a training step may draw from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": [version, list(internal), gauss]}  # lists: weights_only loads them
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batches_done(trainer) -> int:
    """The training batches of the current epoch done when a checkpoint is taken inside an epoch
    (``checkpoint_every_n_steps``, or validation within an epoch); 0 at an epoch's end or
    outside ``fit``."""
    if trainer is None or trainer.state.fn != "fit":
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return int(done) if 0 < done < trainer.num_training_batches else 0


class ResumeState(Callback):
    """Saves the random-number generators and the early-stopping decision in every checkpoint and
    restores them when training resumes from one (see the module doc)."""

    def __init__(self, config: dict | None = None) -> None:
        self.config = config  # the run's comparable config (check_resumable compares a resume's with it)
        self._stop = False
        self._rng: dict | None = None  # a mid-epoch checkpoint's generators, for the next batch

    def state_dict(self) -> dict:
        import json

        trainer = getattr(self, "_trainer", None)
        return {"rng": rng_state(), "should_stop": bool(trainer.should_stop) if trainer is not None else False,
                "mid_epoch": batches_done(trainer) > 0,
                "config": json.dumps(self.config, sort_keys=True, default=str)}

    def load_state_dict(self, state: dict) -> None:
        self._stop = bool(state.get("should_stop"))
        if state.get("mid_epoch"):
            # taken just before a batch: applied just before the resumed run's first batch, after
            # the fit loop has created its data iterators (which may draw a seed)
            self._rng = state["rng"]
        else:
            # taken at an epoch's end: Lightning restores callbacks just before the fit loop sets up
            # the next epoch's data; nothing draws a random number in between (its sanity check
            # runs under isolate_rng)
            set_rng_state(state["rng"])

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        if self._stop:
            trainer.should_stop = True  # early stopping had fired before the interruption
        self._stop = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None


class StepCheckpoint(Callback):
    """``checkpoint_every_n_steps``: writes ``last.ckpt`` every ``every_n_steps`` optimiser steps
    inside an epoch too, so that a killed run loses at most that many steps (the epoch-end
    checkpoints stay). It saves at the start of a batch, once the previous one is wholly done (its
    counters included); the resumed run skips the epoch's batches already trained (the data
    modules' ``state_dict``) and goes on bit-identically."""

    def __init__(self, every_n_steps: int, path: str | os.PathLike):
        if int(every_n_steps) < 1:
            raise ValueError(f"checkpoint_every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        self.every, self.path, self._last = int(every_n_steps), str(path), -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        import warnings

        # the data modules resume inside an epoch themselves (Lightning only knows stateful loaders)
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if (batch_idx == 0 or step == 0 or step % self.every or step == self._last
                or batch_idx % trainer.accumulate_grad_batches  # inside an accumulation window
                or trainer.fast_dev_run or trainer.sanity_checking):
            return
        self._last = step
        trainer.save_checkpoint(self.path)


def _comparable(cfg: dict) -> dict:
    """The config without its run-control keys and without paths (a folder may move)."""
    def strip(d):
        if not isinstance(d, dict):
            return d
        return {k: strip(v) for k, v in d.items() if not (str(k).endswith("_dir") or k in ("dir", "init_from"))}

    d = {k: v for k, v in cfg.items() if k not in RUN_CONTROL}
    if isinstance(d.get("trainer"), dict):
        d["trainer"] = {k: v for k, v in d["trainer"].items() if k not in RUN_CONTROL_TRAINER}
    return strip(d)


def comparable_config(cfg) -> dict:
    """What ``check_resumable`` compares: ``cfg`` resolved, without run control and paths."""
    import json

    from omegaconf import OmegaConf

    return json.loads(json.dumps(_comparable(OmegaConf.to_container(cfg, resolve=True)), sort_keys=True, default=str))


class ResumeError(RuntimeError):
    """The run folder holds a different run: resuming would mix two experiments."""


def check_resumable(cfg, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``run_dir/checkpoints/last.ckpt`` when ``cfg.resume`` and it
    exists, after checking that it was written by a run of the same config (recorded in the
    checkpoint itself; checkpoints of versions that did not record it are trusted); else None.
    With ``resume=false`` a previous run's ``last.ckpt`` is removed, so that a later resume can
    never continue from it."""
    import json

    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    if not cfg.get("resume"):
        last.unlink()  # starting over: the earlier run's state must not be resumed later
        return None
    state = safe_load(last, mmap=True)  # only its recorded config is read
    recorded = next((v.get("config") for k, v in (state.get("callbacks") or {}).items()
                     if k.startswith("ResumeState") and isinstance(v, dict)), None)
    if recorded is not None:
        old, new = json.loads(recorded), comparable_config(cfg)
        if old != new:
            raise ResumeError(f"{last} was written by a run with a different config "
                              f"({_first_difference(old, new)}); resuming would mix two experiments. "
                              f"Use another run folder, or resume=false to start over in this one.")
    return str(last)


def _first_difference(a: Any, b: Any, key: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                return _first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{key}.{k}" if key else str(k))
        return key
    return f"{key}: recorded {a!r}, now {b!r}"
