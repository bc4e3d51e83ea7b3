"""Config checks that run before any training and report every mistake at once.

``check_config(cfg)`` (``python -m ctr.train``) and ``check_encoder_config(cfg)``
(``python -m encoders.train``) read the composed config only: nothing is loaded or prepared, so a
mistake costs a second, not a data preparation. Each collects all the problems it finds and raises
one :class:`ConfigError` listing them, one ``key: problem (got value)`` per line.

Where a component validates its own arguments (``PrepareSettings``, the data modules, the
sources, ``SimConfig``, the position tower, the non-finite guard), the check builds it from the
config, which loads no data, and reports its message under the key it was built from: the
component stays the one source of truth. What needs the data, the click task's negatives against
the pools they are drawn from and the monitored metric against what validation logs, is checked
by :func:`check_encoder_data` once the encoders' data module is set up, still before the first
training step.

Unknown keys (``foo=1``, ``model.nonexistent=1``, also in a ``-m`` sweep) never get this far: the
configs are in Hydra's struct mode, so composing them fails with ``Could not override 'foo'``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

_UNSET = object()


class ConfigError(ValueError):
    """Config mistakes found before training. ``problems``: one ``key: problem (got value)`` each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} config mistake{'s' if n != 1 else ''}, found before training:\n"
                         + "\n".join(f"  {x}" for x in self.problems))

    def __reduce__(self):  # pickled whole, e.g. back from a joblib launcher's worker
        return type(self), (self.problems,)


class Problems:
    """Collects ``key: problem (got value)`` lines about ``cfg``; ``raise_if_any`` raises them."""

    def __init__(self, cfg: DictConfig | None = None):
        self.cfg, self.found = cfg, []

    def get(self, key: str):
        """The resolved value at ``key`` (None when the key is absent)."""
        v = OmegaConf.select(self.cfg, key, default=None)
        return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v

    def add(self, key: str, problem: str, got=_UNSET) -> None:
        self.found.append(f"{key}: {problem}" + ("" if got is _UNSET else f" (got {got!r})"))

    def require(self, key: str, ok: Callable, problem: str, optional: bool = False) -> bool:
        """Add ``problem`` unless ``ok(value)`` (or the value is null and ``optional``); whether it held."""
        v = self.get(key)
        if v is None and optional:
            return True
        try:
            good = bool(ok(v))
        except (TypeError, ValueError):
            good = False
        if not good:
            self.add(key, problem, v)
        return good

    def build(self, key: str, make: Callable):
        """``make()`` (a constructor that validates its arguments); its error becomes a problem
        under ``key`` (or under the ``full_key`` Hydra names). Returns the object, or None."""
        from hydra.errors import InstantiationException

        try:
            return make()
        except InstantiationException as e:
            m = re.search(r"full_key: (\S+)\s*$", str(e))
            cause = e.__cause__ or e
            self.add(m.group(1) if m else key, str(cause))
        except (ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
            self.add(key, str(e))
        return None

    def raise_if_any(self) -> None:
        if self.found:
            raise ConfigError(self.found)


# ---- predicates ------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
    return _is_int(v) and v > 0


def non_negative_int(v) -> bool:
    return _is_int(v) and v >= 0


def positive_number(v) -> bool:
    return _is_number(v) and v > 0


def non_negative_number(v) -> bool:
    return _is_number(v) and v >= 0


def dropout_rate(v) -> bool:
    return _is_number(v) and 0 <= v < 1


def positive_ints(v) -> bool:
    return isinstance(v, (list, tuple)) and all(positive_int(x) for x in v)


def three_fractions(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 3 and all(non_negative_number(x) for x in v)
            and abs(sum(v) - 1) < 1e-9)


def better(metric: str) -> str | None:
    """``"max"`` or ``"min"``: the direction in which ``metric`` improves (None: unknown)."""
    name = metric.rsplit("/", 1)[-1]
    if name in ("auc", "gauc") or name.startswith("recall@") or re.fullmatch(r"[it]2[it]_r@\d+", name):
        return "max"
    if name in ("logloss", "ece", "nll") or name.endswith("loss"):
        return "min"
    return None


# ---- shared parts ----------------------------------------------------------------------------
def _check_run(p: Problems, optimizers: tuple[str, ...]) -> None:
    """Keys both entry points share: seed, threads, optimiser, non-finite mode, monitor."""
    from ctr.guards import NonFiniteGuard

    p.require("seed", _is_int, "must be an integer")
    p.require("threads", positive_int, "must be a positive integer or null", optional=True)
    p.require("optim.lr", positive_number, "must be a positive number")
    p.require("optim.weight_decay", non_negative_number, "must be a non-negative number")
    p.require("optim.optimizer", lambda v: v in optimizers, f"must be one of {list(optimizers)}")
    p.build("optim.nonfinite", lambda: NonFiniteGuard(p.get("optim.nonfinite") or "fail"))
    accumulate = p.get("trainer.accumulate_grad_batches") or 1
    if p.get("optim.nonfinite") == "skip" and accumulate != 1:
        # a skipped micro-batch cannot take back the gradients its window has accumulated already
        p.add("optim.nonfinite", f"skip does not combine with trainer.accumulate_grad_batches={accumulate}: "
              f"use fail, or no accumulation", "skip")
    p.require("checkpoint_every_n_steps", positive_int, "must be a positive integer or null", optional=True)
    p.require("monitor.mode", lambda v: v in ("min", "max"), "must be 'min' or 'max'")
    p.require("monitor.patience", non_negative_int, "must be a non-negative integer or null", optional=True)
    metric, mode = p.get("monitor.metric"), p.get("monitor.mode")
    direction = better(metric) if metric is not None else None
    if mode in ("min", "max") and direction not in (None, mode):
        p.add("monitor.mode", f"{metric} improves as it {'grows' if direction == 'max' else 'falls'}: "
              f"use {direction}", mode)


def _check_monitor(p: Problems, logged: list[str], monitors: list | None = None) -> None:
    """Each monitored metric (default: ``monitor.metric``; null: none) must be one validation logs."""
    for m in dict.fromkeys(monitors if monitors is not None else [p.get("monitor.metric")]):
        if m is not None and m not in logged:
            p.add("monitor.metric", f"must be null or a metric validation logs: {', '.join(logged)}", m)


# ---- the CTR stage ---------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Check a ``ctr.train`` config before anything is prepared or trained: data settings
    (fractions, sequence length, feature lists, ...), batch sizes, the model's sizes, optimiser,
    monitor and non-finite mode. Raises :class:`ConfigError` listing every mistake."""
    from ctr.module import OPTIMIZERS, CTRModule

    p = Problems(cfg)
    _check_run(p, tuple(OPTIMIZERS))
    p.require("optim.embedding_weight_decay", non_negative_number, "must be a non-negative number", optional=True)
    plateau = p.get("optim.plateau")
    if plateau is not None:
        if not hasattr(plateau, "keys") or set(plateau) - {"factor", "patience", "min_lr"}:
            p.add("optim.plateau", "must be null or a mapping of factor, patience, min_lr", plateau)
        else:
            p.require("optim.plateau.factor", lambda v: _is_number(v) and 0 < v < 1,
                      "must be a number in (0, 1)", optional=True)
            p.require("optim.plateau.patience", non_negative_int, "must be a non-negative integer", optional=True)
            p.require("optim.plateau.min_lr", non_negative_number, "must be a non-negative number", optional=True)
            if p.get("monitor.metric") is None:
                p.add("optim.plateau", "needs a monitored metric (monitor.metric is null)", plateau)
    _check_monitor(p, CTRModule.monitor_metrics())
    _check_ctr_data(p)
    _check_ctr_model(p)
    for name in (p.get("slices") or {}):
        p.require(f"slices.{name}.max_quantile", lambda v: _is_number(v) and 0 <= v <= 1,
                  "must be a number in [0, 1]")
    p.raise_if_any()


def _check_ctr_data(p: Problems) -> None:
    from hydra.utils import instantiate

    p.require("data.batch_size", positive_int, "must be a positive integer")
    p.require("data.eval_batch_size", positive_int, "must be a positive integer")
    # the settings, the source and the data module validate themselves on construction (no data is read)
    dm = p.build("data", lambda: instantiate(p.cfg.data, _convert_="all"))
    config = getattr(getattr(dm, "source", None), "config", None)
    if callable(config):  # the simulator's SimConfig
        p.build("data.source", config)


def _check_ctr_model(p: Problems) -> None:
    from ctr.models.ctr_model import PositionTower

    p.require("model.embedding_dim", positive_int, "must be a positive integer")
    p.require("model.over_hidden", positive_ints, "must be a list of positive integers")
    p.require("model.sequence.hidden", positive_ints, "must be a list of positive integers", optional=True)
    for key in ("model.dropout", "model.embedding_dropout"):
        p.require(key, dropout_rate, "must be a number in [0, 1)", optional=True)
    position = p.get("model.position")
    if position:
        if p.require("model.position.n_positions", positive_int, "must be a positive integer (the positions "
                     "the tower has rows for)"):
            p.build("model.position", lambda: PositionTower(**position))
    if p.get("model.visual"):
        p.require("model.visual.tiers", non_negative_int, "must be a non-negative integer (0: off)", optional=True)


# ---- the encoders ----------------------------------------------------------------------------
def check_encoder_config(cfg: DictConfig) -> None:
    """Check an ``encoders.train`` config before any tower is built or image decoded: task
    weights, image size, embedding and queue sizes, text length, batch sizes, the click task's
    negatives counts, the source's settings, optimiser, monitor and non-finite mode. Raises
    :class:`ConfigError` listing every mistake. (The negatives against the data's pools are
    checked later, by :func:`check_encoder_data`.)"""
    from encoders.module import OPTIMIZERS

    p = Problems(cfg)
    _check_run(p, tuple(OPTIMIZERS))
    tasks = p.get("tasks") or {}
    for t, w in tasks.items():
        p.require(f"tasks.{t}", non_negative_number, "must be a non-negative weight (0: off)")
    if not any(non_negative_number(w) and w > 0 for w in tasks.values()):
        p.add("tasks", "no task has a positive weight", tasks)
    p.require("image_size", positive_int, "must be a positive integer (pixels)")
    if p.get("text._target_"):
        p.require("text.max_length", positive_int, "must be a positive integer (tokens)", optional=True)
    _check_encoder_module(p)
    _check_encoder_data_config(p)
    p.require("optim.tower_lr", positive_number, "must be a positive number or null", optional=True)
    for key in ("optim.warmup_steps", "optim.tower_delay_steps"):
        p.require(key, non_negative_int, "must be a non-negative integer")
    p.raise_if_any()


def _check_encoder_module(p: Problems) -> None:
    p.require("module.embed_dim", positive_int, "must be a positive integer")
    p.require("module.head_hidden", positive_int, "must be a positive integer or null", optional=True)
    p.require("module.queue_size", non_negative_int, "must be a non-negative integer (0: no queue)")
    dim = p.get("module.embed_dim")
    p.require("module.matryoshka_dims", lambda v: positive_ints(v) and (not positive_int(dim) or max(v) <= dim),
              f"must be positive integers up to module.embed_dim ({dim}), or null", optional=True)


def _check_encoder_data_config(p: Problems) -> None:
    from hydra.utils import instantiate

    from ctr.data.sources.simulator import SimConfig
    from encoders.datamodule import SimItems

    key = "data.module"
    p.require(f"{key}.batch_size", positive_int, "must be a positive integer")
    p.require(f"{key}.eval_batch_size", positive_int, "must be a positive integer")
    for k in ("steps_per_epoch", "product_pairs"):
        p.require(f"{key}.{k}", positive_int, "must be a positive integer or null", optional=True)
    for k in ("n_shown", "n_category"):
        p.require(f"{key}.{k}", non_negative_int, "must be a non-negative integer (click task hard negatives)")
    src = p.build(f"{key}.source", lambda: instantiate(p.cfg.data.module.source, _convert_="all"))
    for k in ("fractions", "held_out"):
        if getattr(src, k, None) is not None:
            p.require(f"{key}.source.{k}", three_fractions, "must be three non-negative numbers summing to 1")
    if isinstance(src, SimItems):  # the simulator validates its own settings
        p.build(f"{key}.source", lambda: SimConfig.preset(src.preset, seed=src.seed, **dict(src.overrides)))


def check_encoder_data(batches, monitors: list[str], logged: list[str], key: str = "data.module") -> None:
    """Checks that need the encoders' data, before the first training step.

    ``batches``: the training :class:`encoders.data.TaskBatches`. The click task draws ``n_shown``
    hard negatives from the request's shown-but-unclicked items and ``n_category`` from the
    training items of the positive's category; a count above what any training click's pool
    holds could only be met by repeats (or, for ``n_shown``, always by category items).
    ``monitors``: the metrics the checkpoint/early-stopping callbacks watch; ``logged``: the
    metrics validation logs. Raises :class:`ConfigError` listing every mistake."""
    import numpy as np

    p = Problems()
    if "click" in batches.tasks and batches.clicks is not None:
        pairs, shown = batches.clicks.pairs["train"], batches.clicks.shown["train"]
        most_shown = int((shown >= 0).sum(axis=1).max()) if len(shown) else 0
        if batches.n_shown > most_shown:
            p.add(f"{key}.n_shown", f"more than the shown-but-unclicked items of any training click's "
                  f"request (at most {most_shown}): the rest would always come from the category pool",
                  batches.n_shown)
        count = batches.category_pool.count[batches.items.category[pairs[:, 1]]]
        count = np.where(count == 0, len(batches.train_rows), count)  # such categories draw from all
        most_other = int(count.max()) - 1 if len(count) else 0
        if batches.n_category > most_other:
            p.add(f"{key}.n_category", f"more than the other training items in any clicked item's category "
                  f"(at most {most_other}): the draws would repeat items", batches.n_category)
    _check_monitor(p, logged, monitors)  # a checkpoint and early stopping may watch the same one
    p.raise_if_any()
