"""Train and evaluate a CTR model: ``python -m ctr.train experiment=ml100k_din [key=value ...]``.

Everything is wired by the Hydra configs in ``conf/``. The run folder (Hydra's output dir) ends up
holding the resolved config, package versions, the data fingerprint, the best checkpoint, the
CSV/wandb logs and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import ctr  # noqa: F401  (installs the torchvision import hook before lightning is imported)
import warnings

warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning 2.6 on torch 2.13, harmless
warnings.filterwarnings("ignore", message=".*anonymous setting has no effect.*")
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

PACKAGES = ("torch", "pytorch-lightning", "torchmetrics", "timm", "polars", "hydra-core", "wandb", "numpy")


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "packages": versions}


def oracle_metrics(split_dir: Path) -> dict | None:
    """Metrics of the known click probability (``true_ctr``), the best any model can do."""
    from ctr.metrics import ctr_metrics

    p = split_dir / "extra.true_ctr.npy"
    if not p.exists():
        return None
    m = ctr_metrics()
    m.update(torch.from_numpy(np.load(p)).float(), torch.from_numpy(np.load(split_dir / "label.npy")),
             groups=torch.from_numpy(np.load(split_dir / "group.npy")))
    return {k: float(v) for k, v in m.compute().items()}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(cfg: DictConfig) -> dict:
    """Prepare data, fit, reload the best checkpoint, test; write and return ``metrics.json``."""
    import pytorch_lightning as pl_
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from ctr.module import CTRModule

    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl_.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))

    t0 = time.perf_counter()
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    prepare_s = time.perf_counter() - t0
    meta = dm.meta
    model = instantiate(cfg.model, _convert_="all")(meta=meta)
    module = CTRModule(model, eval_splits=tuple(dm.eval_splits), **cfg.optim)

    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=cfg.monitor.metric,
                           mode=cfg.monitor.mode, save_top_k=1)
    callbacks = [ckpt]
    if cfg.monitor.patience is not None:
        callbacks.append(EarlyStopping(monitor=cfg.monitor.metric, mode=cfg.monitor.mode,
                                       patience=cfg.monitor.patience))
    loggers = [instantiate(lg, _convert_="all") for lg in (cfg.get("logger") or {}).values() if lg]
    trainer: pl_.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                       default_root_dir=str(run_dir), _convert_="all")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    _atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    _atomic_write(run_dir / "env.json", json.dumps(environment(), indent=1))

    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t_fit
    fast = bool(cfg.trainer.get("fast_dev_run"))
    best = None if fast or not ckpt.best_model_path else ckpt.best_model_path
    val = trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
    test_all = {k: v for d in test for k, v in d.items()}

    def section(prefix: str, d: dict) -> dict:
        return {k.split("/", 1)[1]: float(v) for k, v in d.items() if k.startswith(prefix + "/")}

    metrics = {
        "experiment": cfg.get("name"),
        "seed": cfg.seed,
        "axes": OmegaConf.to_container(cfg.axes, resolve=True) if cfg.get("axes") else {},
        "data_fingerprint": dm.artefact.fingerprint,
        "data_path": str(dm.artefact.path),
        "splits": meta["splits"],
        "val": section("val", val),
        **{s: section(s, test_all) for s in dm.eval_splits},
        "oracle": {s: oracle_metrics(dm.artefact.split_dir(s)) for s in dm.eval_splits
                   if (dm.artefact.split_dir(s) / "extra.true_ctr.npy").exists()},
        "best_epoch": _best_epoch(ckpt),
        "epochs": trainer.current_epoch,
        "train_samples": module.train_samples,
        "train_samples_per_s": module.train_samples_per_s,
        "prepare_seconds": prepare_s,  # this run (0 when the artefact was cached)
        "data_build_seconds": meta.get("prepare_seconds"),  # raw files -> tensors, when it was built
        "fit_seconds": fit_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint": best,
    }
    if not metrics["oracle"]:
        del metrics["oracle"]
    _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=1, default=str))
    for lg in loggers:
        lg.log_metrics({f"final/{k}": v for k, v in _flat(metrics).items()})
        lg.finalize("success")
    return metrics


def _best_epoch(ckpt) -> int | None:
    if not ckpt.best_model_path or not Path(ckpt.best_model_path).exists():
        return None
    state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
    return int(state.get("epoch", -1))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def format_table(metrics: dict) -> str:
    """One row per evaluated split (and its true_ctr oracle where the data has one)."""
    cols = ["auc", "gauc", "logloss", "calibration", "ece"]
    rows = [("val", metrics["val"])]
    for s in metrics:
        if s.startswith("test"):
            rows.append((s, metrics[s]))
            if metrics.get("oracle", {}).get(s):
                rows.append((f"{s} (true_ctr oracle)", metrics["oracle"][s]))
    w = max(len(r[0]) for r in rows) + 2
    lines = ["split".ljust(w) + "".join(c.rjust(12) for c in cols)]
    for name, m in rows:
        lines.append(name.ljust(w) + "".join(f"{m.get(c, float('nan')):12.4f}" for c in cols))
    lines.append(f"train samples/s: {metrics['train_samples_per_s']:.0f}   best epoch: {metrics['best_epoch']}"
                 f"   data: {metrics['data_fingerprint']}")
    return "\n".join(lines)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    print(format_table(metrics))
    print(f"run folder: {cfg.paths.run_dir}")
    return float(metrics["val"].get("auc", float("nan")))


if __name__ == "__main__":
    main()
