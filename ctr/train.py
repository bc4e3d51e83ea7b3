"""Train and evaluate a CTR model: ``python -m ctr.train experiment=ml100k_din [key=value ...]``.

Everything is wired by the Hydra configs in ``conf/``. The run folder (Hydra's output dir) ends up
holding the resolved config, package versions, the data fingerprint, the best checkpoint, the
CSV/wandb logs and ``metrics.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import ctr  # noqa: F401  (installs the torchvision import hook before lightning is imported)
import warnings

warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning 2.6 on torch 2.13, harmless
warnings.filterwarnings("ignore", message=".*anonymous setting has no effect.*")
# DDP: the metrics logged at epoch end are computed over every rank's data already (torchmetrics
# gathers their states), so Lightning's advice to add sync_dist=True does not apply
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ctr.runs import (best_checkpoint, best_epoch, build_trainer, compile_in_place, failure_recorded, finish_run,
                      forward_flops, resume_checkpoint, section, start_run)


def oracle_metrics(split_dir: Path) -> dict | None:
    """Metrics of the known click probability (``true_ctr``), the best any model can do."""
    from ctr.metrics import ctr_metrics

    p = split_dir / "extra.true_ctr.npy"
    if not p.exists():
        return None
    # every rank reads the whole split: nothing to gather (under NCCL, gathering these CPU
    # tensors would fail: "No backend type associated with device type cpu")
    m = ctr_metrics(sync_on_compute=False)
    m.update(torch.from_numpy(np.load(p)).float(), torch.from_numpy(np.load(split_dir / "label.npy")),
             groups=torch.from_numpy(np.load(split_dir / "group.npy")))
    return {k: float(v) for k, v in m.compute().items()}


def item_slices(meta: dict, spec: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Item-row masks of the evaluation slices. ``spec``: name -> {"max_quantile": q} (the items
    whose train impressions are at most the q-quantile over items: the low-impression items)."""
    from ctr.models.visual import artefact_items

    if not spec:
        return {}, {}
    imp = artefact_items(meta)["train_impressions"].to_numpy()
    masks, info = {}, {}
    for name, s in spec.items():
        q = float(s["max_quantile"])
        t = float(np.quantile(imp, q))
        m = np.r_[False, imp <= t]
        masks[name] = torch.from_numpy(m)
        info[name] = {"max_train_impressions": t, "items": int(m.sum()), "of": int(len(imp))}
    return masks, info


def train(cfg: DictConfig) -> dict:
    """Prepare data, fit, reload the best checkpoint, test; write and return ``metrics.json``.

    Under a DDP trainer preset (``trainer=ddp``, ``trainer=ddp_cpu``) every rank runs this whole
    function (Lightning launches the other ranks at ``fit``); rank 0 writes ``metrics.json``."""
    from ctr.checks import check_config
    check_config(cfg)  # every config mistake at once, before any data is prepared
    from hydra.utils import instantiate

    from ctr.module import CTRModule

    t_start = time.perf_counter()
    run_dir = start_run(cfg)
    t0 = time.perf_counter()
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    prepare_s = time.perf_counter() - t0
    meta = {**dm.meta, "path": str(dm.artefact.path)}
    describe = getattr(dm.source, "describe", None)
    if describe is not None:
        meta["source_config"] = describe()
    model = instantiate(cfg.model, _convert_="all")(meta=meta)
    dm.setup()
    flops = forward_flops(model, next(iter(dm.train_dataloader())))  # eager, before any compile
    compiled = compile_in_place(model, cfg)
    spec = OmegaConf.to_container(cfg.slices, resolve=True) if cfg.get("slices") else {}
    slices, slice_info = item_slices(meta, spec)
    module = CTRModule(model, eval_splits=tuple(dm.eval_splits), slices=slices,
                       **OmegaConf.to_container(cfg.optim, resolve=True),  # plain data: checkpoints load safely
                       monitor=cfg.monitor.get("metric"), monitor_mode=cfg.monitor.mode)
    trainer, ckpt, loggers = build_trainer(cfg, run_dir)
    n_train = dm.n_train

    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_checkpoint(cfg, run_dir))
    fit_s = time.perf_counter() - t_fit
    best = best_checkpoint(cfg, ckpt)
    val = trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
    test_all = {k: v for d in test for k, v in d.items()}

    metrics = {
        "experiment": cfg.get("name"),
        "seed": cfg.seed,
        "axes": OmegaConf.to_container(cfg.axes, resolve=True) if cfg.get("axes") else {},
        "data_fingerprint": dm.artefact.fingerprint,
        "data_path": str(dm.artefact.path),
        "data_repairs": meta.get("repairs") or {},  # bad rows dropped per file and reason (bad_rows=drop)
        "splits": meta["splits"],
        "val": section("val", val),
        **{s: section(s, test_all) for s in dm.eval_splits},
        "slices": slice_info,
        "visual": _visual_info(model),
        "oracle": {s: oracle_metrics(dm.artefact.split_dir(s)) for s in dm.eval_splits
                   if (dm.artefact.split_dir(s) / "extra.true_ctr.npy").exists()},
        "best_epoch": best_epoch(ckpt),
        "epochs": trainer.current_epoch,
        "train_impressions": n_train,  # the (sub)set of the train split trained on
        "train_samples": module.train_samples,  # impressions seen, epochs included: the CTR stage's tokens
        "tokens_seen": module.train_samples,
        "history_tokens_seen": module.history_tokens,
        "flops_per_sample": flops,  # forward; a training step costs about 3x
        "train_flops": 3.0 * flops * module.train_samples,
        "train_samples_per_s": module.train_samples_per_s,
        "skipped_batches": module.nonfinite.skipped,  # non-finite loss/gradients skipped (optim.nonfinite=skip)
        "prepare_seconds": prepare_s,  # this run (0 when the artefact was cached)
        "data_build_seconds": meta.get("prepare_seconds"),  # raw files -> tensors, when it was built
        "fit_seconds": fit_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        "compiled": compiled,
        "world_size": trainer.world_size,  # DDP ranks (train_samples counts all of them)
        "checkpoint": best,
        "wall_seconds": time.perf_counter() - t_start,
    }
    if not metrics["oracle"]:
        del metrics["oracle"]
    return finish_run(run_dir, metrics, loggers)


def _visual_info(model) -> dict | None:
    v = getattr(model, "visual", None)
    if v is None:
        return None
    return {**getattr(v, "source", {}), "mode": v.mode, "debias": bool(v.debias is not None),
            "debias_pairs": v.pair_stats or None, "similarity": v.sim_stats}


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
    with failure_recorded(cfg):
        metrics = train(cfg)
    print(format_table(metrics))
    print(f"run folder: {cfg.paths.run_dir}")
    return float(metrics["val"].get("auc", float("nan")))


if __name__ == "__main__":
    main()
