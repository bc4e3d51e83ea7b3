"""Run-folder plumbing shared by every training entry point (``ctr.train``, ``encoders.train``).

A run folder holds the resolved config (``config.yaml``), package versions (``env.json``), the
best checkpoint (``checkpoints/best.ckpt``), the CSV/wandb logs and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

PACKAGES = ("torch", "pytorch-lightning", "torchmetrics", "timm", "polars", "hydra-core", "wandb", "numpy")


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    from ctr.malloc import applied

    return {"python": sys.version.split()[0], "platform": platform.platform(), "malloc_tuning": applied(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "packages": versions}


def atomic_replace(path: str | os.PathLike, write) -> None:
    """``write(f)`` into a temporary file beside ``path`` (opened ``"wb"``), fsync, then rename it
    over ``path``: a crash leaves the old file or the new one, never half of one. The temporary
    file is this process's own (the ranks of a DDP run write the same files) and never left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # the rename itself reaches the disk
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    atomic_replace(path, lambda f: f.write(text.encode()))


def start_run(cfg: DictConfig) -> Path:
    """Create the run folder, seed everything, set the thread count."""
    import pytorch_lightning as pl

    from ctr.malloc import tune_malloc

    from ctr.resume import check_resumable

    tune_malloc()  # keep freed memory: no fresh pages to fault in at every step (ctr/malloc.py)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, run_dir)  # before anything is computed: a different run's folder is refused
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return run_dir


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None):
    """The Lightning trainer of ``cfg.trainer`` with best-checkpointing (and early stopping when
    ``cfg.monitor.patience`` is set) on ``cfg.monitor.metric`` (null: the last epoch is kept),
    the configured loggers, and the
    resolved config and environment written into the run folder. Returns (trainer, checkpoint
    callback, loggers)."""
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from ctr.resume import AtomicCheckpointIO, ResumeState, StepCheckpoint, comparable_config

    metric = cfg.monitor.get("metric")  # None: keep the last epoch's weights, no early stopping
    # a reused run folder gets its best.ckpt replaced, never a best-v1.ckpt beside a stale one
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=metric,
                           mode=cfg.monitor.mode, save_top_k=1, enable_version_counter=False,
                           save_last=True)  # checkpoints/last.ckpt: what `resume=true` continues from
    callbacks = [ckpt, ResumeState(comparable_config(cfg)), *(extra_callbacks or []),
                 *(instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c)]
    if cfg.get("checkpoint_every_n_steps"):  # last.ckpt inside epochs too (ctr/resume.py)
        callbacks.append(StepCheckpoint(cfg.checkpoint_every_n_steps, run_dir / "checkpoints" / "last.ckpt"))
    if metric is not None and cfg.monitor.get("patience") is not None:
        callbacks.append(EarlyStopping(monitor=cfg.monitor.metric, mode=cfg.monitor.mode,
                                       patience=cfg.monitor.patience))
    resuming = resume_checkpoint(cfg, run_dir) is not None
    loggers = [instantiate(_resume_version(lg, run_dir) if resuming else lg, _convert_="all")
               for lg in (cfg.get("logger") or {}).values() if lg]
    # checkpoints are written atomically and loaded with weights_only=True (ctr/resume.py)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()], _convert_="all")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write(run_dir / "env.json", json.dumps(environment(), indent=1))
    return trainer, ckpt, loggers


def compile_in_place(module: torch.nn.Module, cfg: DictConfig) -> bool:
    """``cfg.compile``: ``torch.compile`` ``module`` in place (``nn.Module.compile``: its
    ``state_dict`` keys and checkpoints are unchanged), with ``cfg.compile_mode`` (null: torch's
    default; e.g. ``max-autotune``) and ``cfg.compile_dynamic`` (null: dynamic shapes after a
    recompile). Returns whether it compiled."""
    if not cfg.get("compile"):
        return False
    module.compile(mode=cfg.get("compile_mode"), dynamic=cfg.get("compile_dynamic"))
    return True


def _resume_version(lg: DictConfig, run_dir: Path) -> DictConfig:
    """A resumed run's CSV log goes to ``<name>/resume<k>/`` next to the earlier attempts' logs
    (Lightning's CSVLogger would otherwise delete them)."""
    if not str(lg.get("_target_", "")).endswith("CSVLogger"):
        return lg
    base = Path(str(lg.get("save_dir", run_dir))) / str(lg.get("name", "lightning_logs"))
    k = 1 + sum(1 for p in base.glob("resume*") if p.is_dir())
    lg = lg.copy()
    with open_dict(lg):
        lg.version = f"resume{k}"
    return lg


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=true`` and an interrupted run in ``run_dir``: its last checkpoint (else None).
    ``start_run`` has checked that the folder's recorded config is this run's (ctr/resume.py)."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    return str(last) if cfg.get("resume") and last.exists() else None


def best_checkpoint(cfg: DictConfig, ckpt) -> str | None:
    """The best checkpoint's path (None under fast_dev_run, which saves none)."""
    if cfg.trainer.get("fast_dev_run") or not ckpt.best_model_path:
        return None
    return ckpt.best_model_path


def best_epoch(ckpt) -> int | None:
    if not ckpt.best_model_path or not Path(ckpt.best_model_path).exists():
        return None
    from ctr.resume import safe_load

    return int(safe_load(ckpt.best_model_path).get("epoch", -1))


def compose_config(conf_dir: str | Path, overrides: list[str], **paths: str) -> DictConfig:
    """Compose ``conf_dir/config.yaml`` with ``overrides`` outside a Hydra app (scripts, the
    pipeline), filling the ``paths.*`` that Hydra's runtime would resolve (``run_dir``,
    ``cache_dir``, ``embeddings_dir``) from ``paths``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        for k, v in paths.items():
            cfg.paths[k] = str(v)
    return cfg


def mean_std(vals, digits: int = 4) -> str:
    """``"m ± s"`` over the non-missing values (``"m"`` for one, ``"-"`` for none), ``digits`` decimals."""
    import statistics

    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.{digits}f}" + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")


def section(prefix: str, logged: dict) -> dict:
    """``{"val/auc": x, ...}`` -> ``{"auc": x}`` for one prefix."""
    return {k.split("/", 1)[1]: float(v) for k, v in logged.items() if k.startswith(prefix + "/")}


def global_rank() -> int:
    """This process's rank in a distributed run (0 outside one), as Lightning set it."""
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """``values`` summed over the ranks of the initialised process group (unchanged outside
    one). A collective: every rank must call it, in the same order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def finish_run(run_dir: Path, metrics: dict, loggers: list) -> dict:
    """Write ``metrics.json`` (global rank 0 only: every rank of a DDP run gets here) and hand its
    numbers to the loggers (as ``final/...``; Lightning's loggers log on rank 0 only)."""
    if global_rank() == 0:
        atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=1, default=str))
        (run_dir / "failed.json").unlink(missing_ok=True)  # a stale one from an earlier attempt
    for lg in loggers:
        lg.log_metrics({f"final/{k}": v for k, v in flat(metrics).items()})
        lg.finalize("success")
    end_wandb_run(0)
    return metrics


def end_wandb_run(exit_code: int) -> None:
    """Finish the process's wandb run, if one is open. Lightning's ``WandbLogger.finalize`` leaves
    it open, and the next ``WandbLogger`` in the same process (the pipeline's next stage, the next
    job of a Hydra basic-launcher sweep) would log into it ("a wandb run already in progress ...
    will reuse this run") instead of starting its own."""
    wandb = sys.modules.get("wandb")  # never imported: no run to end
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def forward_flops(model: torch.nn.Module, batch, call=None) -> float:
    """Forward FLOPs per sample of ``model`` on ``batch`` (torch's FlopCounterMode: matrix products
    and convolutions, 2 FLOPs per multiply-add; embedding lookups and element-wise ops count 0),
    in eval mode; ``call(batch)`` instead of ``model(batch)`` when given. A training step costs
    about three times this."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            (call or model)(batch)
    finally:
        model.train(was)
    return fc.get_total_flops() / max(len(batch), 1)


@contextlib.contextmanager
def failure_recorded(cfg: DictConfig):
    """Write ``failed.json`` (the error, its traceback, the axes) into the run folder when the run
    raises, then re-raise. In a Hydra multirun every launcher still runs the other jobs; the sweep's
    analysis (``experiments/scaling.py``) lists the failed folders instead of silently missing them."""
    try:
        yield
    except Exception as e:
        import traceback

        run_dir = Path(cfg.paths.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "axes": OmegaConf.to_container(cfg.axes, resolve=True) if cfg.get("axes") else {},
                "seed": cfg.get("seed"), "experiment": cfg.get("name")}
        atomic_write(run_dir / "failed.json", json.dumps(info, indent=1, default=str))
        end_wandb_run(1)  # marked failed; the sweep's next job starts its own run
        raise


def fitting(module) -> bool:
    """True while ``trainer.fit`` runs (e.g. resuming from a checkpoint), False in validate/test
    (e.g. reloading the best weights) or outside a trainer."""
    try:
        return module.trainer.state.fn == "fit"
    except RuntimeError:  # not attached to a trainer
        return False


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """A script's arguments before ``--`` and the Hydra overrides after it."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return list(argv[:i]), list(argv[i + 1:])


def missing_runs(expected: dict[str, Path]) -> list[str]:
    """For a sweep's analysis: ``label -> run folder`` of the runs it expected; one line per
    folder without ``metrics.json``, with the error its ``failed.json`` recorded (or why there is
    none: never started, or killed)."""
    lines = []
    for label, d in expected.items():
        if (Path(d) / "metrics.json").exists():
            continue
        failed = Path(d) / "failed.json"
        why = (json.loads(failed.read_text()).get("error") if failed.exists()
               else "no metrics.json and no failed.json (not run, or killed)")
        lines.append(f"- {label} ({d}): {why}")
    return lines
