"""Train a MOON2.0 multimodal encoder: ``python -m encoders.moon2.train experiment=moon2_full``.

Presets (``conf/moon2/experiment/``): ``moon2_full`` (fusion transformer with modality-driven MoE,
dual-level alignment, co-augmentation, dynamic sample filtering), the ablations ``moon2_no_moe``,
``moon2_no_dual``, ``moon2_no_coaug``, ``moon2_no_filter``, and ``dual_encoder`` (the encoders
issue's plain dual encoder: linear heads on the same frozen towers, image-text InfoNCE).

The towers (ImageNet EfficientNet-Lite0, MiniLM) stay frozen; their token features are cached once.
The run folder holds the resolved config, the best checkpoint (on ``val/mean_r@1``: the mean R@1
over the nine query -> candidate modality directions of the variant search, validation products) and ``metrics.json`` with
the benchmark of :mod:`encoders.moon2.benchmark` on every source's test items.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import encoders  # noqa: F401  (installs the torchvision import hook before lightning is imported)
import warnings

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
import hydra
from omegaconf import DictConfig, OmegaConf

from ctr.resume import safe_load
from ctr.runs import (best_checkpoint, best_epoch, build_trainer, failure_recorded, finish_run,
                      resume_checkpoint, start_run)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "moon2")


def train(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from encoders.moon2.benchmark import BENCHMARK_VERSION, run_benchmark
    from encoders.moon2.datamodule import Moon2DataModule
    from encoders.moon2.module import Moon2Module

    t_start = time.perf_counter()
    run_dir = start_run(cfg)
    image_tower = instantiate(cfg.towers.image, _convert_="all")
    text_tower = instantiate(cfg.towers.text, _convert_="all")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = Moon2DataModule(image_tower, text_tower, image_size=cfg.image_size, cache_dir=cfg.paths.cache_dir,
                         seed=cfg.seed, coaug=OmegaConf.to_container(cfg.coaug, resolve=True), **data)
    t0 = time.perf_counter()
    dm.setup()
    data_s = time.perf_counter() - t0
    tokens = dm.tokens
    module = Moon2Module(int(tokens.image.shape[-1]), int(tokens.text.shape[-1]),
                         **OmegaConf.to_container(cfg.model, resolve=True),
                         **OmegaConf.to_container(cfg.optim, resolve=True))
    module.evaluation = {"group": dm.products.items.group}

    trainer, ckpt, loggers = build_trainer(cfg, run_dir)
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_checkpoint(cfg, run_dir))
    fit_s = time.perf_counter() - t_fit
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}  # before validate() resets them
    best = best_checkpoint(cfg, ckpt)
    if best:
        module.load_state_dict(safe_load(best)["state_dict"])
    res = trainer.validate(module, datamodule=dm, verbose=False) if not cfg.trainer.get("fast_dev_run") else []
    val = {k: float(v) for k, v in res[0].items()} if res else {}  # [] when there is no validation item
    bench = run_benchmark(module, dm.sources, dm.prompts)
    (run_dir / "benchmark.json").write_text(json.dumps(
        {"version": BENCHMARK_VERSION, "checkpoint": best, "benchmark": bench}, indent=1, default=float))
    metrics = {
        "experiment": cfg.get("name"),
        "seed": cfg.seed,
        "axes": OmegaConf.to_container(cfg.axes, resolve=True) if cfg.get("axes") else {},
        "objectives": list(module.objectives),
        "encoder": OmegaConf.to_container(cfg.model.encoder, resolve=True),
        "coaug": bool(cfg.coaug.enabled),
        "filtering": bool(cfg.model.filtering.enabled),
        "items": {name: {"n": len(p), "train": int((p.items.split == "train").sum()),
                         "test": int((p.items.split == "test").sum())} for name, (p, _) in dm.sources.items()},
        # bad photos per source (data.bad_images): policy, skipped, reasons, examples (images.parquet rows)
        "image_failures": {name: p.items.image_failures.summary() for name, (p, _) in dm.sources.items()},
        "augmented_views": 0 if dm.aug is None else int(len(dm.aug.keep)),
        "augmented_kept": None if dm.aug is None else int(dm.aug.keep.sum()),
        "val": val,
        "benchmark": bench,
        "train_last": {k: v for k, v in logged.items() if k.endswith("_epoch") or "/w_" in k},
        "best_epoch": best_epoch(ckpt),
        "epochs": trainer.current_epoch,
        "skipped_batches": module.nonfinite.skipped,  # non-finite loss/gradients skipped (optim.nonfinite=skip)
        "data_seconds": data_s,
        "fit_seconds": fit_s,
        "parameters": sum(p.numel() for p in module.parameters()),
        "wall_seconds": time.perf_counter() - t_start,
        "checkpoint": best,
    }
    return finish_run(run_dir, metrics, loggers)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from encoders.moon2.benchmark import format_benchmark

    with failure_recorded(cfg):
        metrics = train(cfg)
    print(format_benchmark({cfg.get("name"): metrics["benchmark"]}))
    print(f"run folder: {cfg.paths.run_dir}")
    return float(metrics["val"].get("val/mean_r@1", float("nan")))


if __name__ == "__main__":
    main()
