"""Train an image (and text) encoder contrastively: ``python -m encoders.train experiment=pretrain``.

Presets (``conf/encoders/experiment/``): ``pretrain`` (self-supervised views + image-text on the
simulator's catalogue), ``posttrain`` (click supervision, started from a pretrain checkpoint:
``init_from=<run folder or .ckpt>``), ``hm_image_text`` (ImageNet EfficientNet-Lite0 + MiniLM
fine-tuned on H&M) and ``hm_heads_only`` (the same towers frozen, only the projection heads
trained: the baseline).

The run folder holds the resolved config, package versions, the best checkpoint, the logs and
``metrics.json``: ``init`` (the encoder before this run's training, on val and test), ``val``,
``test`` (the best checkpoint), throughput, and the exported ``item_id -> embedding`` table's
fingerprint and path.
"""

from __future__ import annotations

import time
from pathlib import Path

import encoders  # noqa: F401  (installs the torchvision import hook before lightning is imported)
import warnings

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*anonymous setting has no effect.*")
# DDP: the metrics logged at epoch end are computed over every rank's data already (torchmetrics
# gathers their states), so Lightning's advice to add sync_dist=True does not apply
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")  # frozen tower parts
import hydra
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback

from ctr.resume import safe_load
from ctr.runs import (best_checkpoint, best_epoch, build_trainer, compile_in_place, failure_recorded, finish_run,
                      forward_flops, resume_checkpoint, section, start_run)


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or a run folder holding ``checkpoints/best.ckpt``."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "best.ckpt"
    if not p.is_file():
        raise FileNotFoundError(f"init_from: no checkpoint at {p} (give a .ckpt or an encoder run "
                                f"folder with checkpoints/best.ckpt)")
    return p


def load_init(module, path: str | Path) -> dict:
    """Start ``module`` from another run's weights: towers, heads and logit scales of the tasks
    both runs have (queues and the other run's task scales are not carried over)."""
    ckpt = resolve_checkpoint(path)
    state = safe_load(ckpt)["state_dict"]
    own = module.state_dict()
    take = {k: v for k, v in state.items() if k in own and not k.startswith("queues.")
            and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(take))
    missing = sorted(k for k in own if k not in take and not k.startswith(("queues.", "scales.")))
    if missing:
        raise ValueError(f"init_from {ckpt}: the checkpoint lacks {len(missing)} weights of this model, "
                         f"e.g. {missing[:4]}; do the towers and heads match?")
    module.load_state_dict(take, strict=False)
    return {"checkpoint": str(ckpt), "skipped": skipped}


def train(cfg: DictConfig) -> dict:
    from ctr.checks import check_encoder_config
    check_encoder_config(cfg)  # every config mistake at once, before any tower or image is loaded
    from hydra.utils import instantiate

    from encoders.module import ContrastiveModule

    t_start = time.perf_counter()
    run_dir = start_run(cfg)

    image_tower = instantiate(cfg.image, _convert_="all")
    text_tower = instantiate(cfg.text, _convert_="all") if cfg.text.get("_target_") else None
    tasks = {k: float(v) for k, v in cfg.tasks.items() if v}
    module = ContrastiveModule(image_tower, text_tower, tasks=tasks, image_size=cfg.image_size,
                               **OmegaConf.to_container(cfg.module, resolve=True),
                               **OmegaConf.to_container(cfg.optim, resolve=True))
    if cfg.get("requires_init") and not cfg.get("init_from"):
        raise ValueError(f"experiment {cfg.get('name')!r} starts from another run's weights: pass "
                         f"init_from=<encoder run folder or .ckpt> (e.g. a pretrain run's folder)")
    init = load_init(module, cfg.init_from) if cfg.init_from else None

    t0 = time.perf_counter()
    dm = instantiate(cfg.data.module, tasks=tasks, image_size=cfg.image_size, cache_dir=cfg.paths.cache_dir,
                     seed=cfg.seed, tokenize=text_tower.tokenize if text_tower is not None else None,
                     _convert_="all")
    dm.setup()
    data_s = time.perf_counter() - t0
    flops = forward_flops(module, dm.images[:8], call=module.eval_images)  # eager, before any compile
    # cfg.compile: the towers, in place (nn.Module.compile: the state_dict keys are unchanged)
    compiled = any([compile_in_place(t, cfg) for t in (image_tower, text_tower) if t is not None])
    module.evaluation = dm.evaluation

    epoch_export = EpochExport(dm, cfg.paths.embeddings_dir, run_dir) if cfg.get("export_epochs") else None
    trainer, ckpt, loggers = build_trainer(cfg, run_dir, [epoch_export] if epoch_export else None)

    # the encoder before training: the baseline that this run's training must beat
    before = {"val": section("val", trainer.validate(module, datamodule=dm, verbose=False)[0]),
              "test": section("test", trainer.test(module, datamodule=dm, verbose=False)[0])}
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume_checkpoint(cfg, run_dir))
    fit_s = time.perf_counter() - t_fit
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    best = best_checkpoint(cfg, ckpt)
    val = section("val", trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False)[0])
    test = section("test", trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)[0])

    seen = module.seen_summary()
    emb_path, emb_fp, reused = export_items(module, dm, cfg.paths.embeddings_dir, run_dir=str(run_dir),
                                            experiment=cfg.get("name"), seed=cfg.seed)
    metrics = {
        "experiment": cfg.get("name"),
        "seed": cfg.seed,
        "axes": OmegaConf.to_container(cfg.axes, resolve=True) if cfg.get("axes") else {},
        "tasks": tasks,
        "items": {"n": len(dm.items), **dm.items.meta, "image_fingerprint": dm.items.image_fingerprint},
        "image_failures": dm.items.image_failures.summary(),  # bad images: policy, skipped, reasons
        "init": before,
        "init_from": init,
        "val": val,
        "test": test,
        "best_epoch": best_epoch(ckpt),
        "epochs": trainer.current_epoch,
        "train_samples_per_s": _float(logged.get("perf/samples_per_s_epoch")),
        "data_time_s": _float(logged.get("perf/data_time_epoch")),
        "augment_time_s": _float(logged.get("perf/augment_time_epoch")),
        "step_time_s": _float(logged.get("perf/step_time_epoch")),
        "skipped_batches": module.nonfinite.skipped,  # non-finite loss/gradients skipped (optim.nonfinite=skip)
        "data_seconds": data_s,
        "fit_seconds": fit_s,
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "compiled": compiled,
        "world_size": trainer.world_size,  # DDP ranks (tokens_seen counts all of them)
        "tokens_seen": seen["tokens"],  # training examples (pairs; items for self_supervised), all tasks
        "seen": seen,
        "flops_per_image": flops,  # forward, image tower + head at image_size; a training step ~3x
        "wall_seconds": time.perf_counter() - t_start,
        "checkpoint": best,
        "embeddings": {"fingerprint": emb_fp, "path": str(emb_path), "reused": reused},
    }
    if epoch_export is not None:
        metrics["epoch_tables"] = epoch_export.tables
    return finish_run(run_dir, metrics, loggers)


def export_items(module, dm, out_dir: str, **extra):
    """Export every item of the data module's item set (the sidecar records ``extra`` and the
    items' source and click split); returns (path, fingerprint, reused)."""
    from encoders.export import export_embeddings

    return export_embeddings(module, dm.all_items(), dm.items.item_ids, dm.items.image_fingerprint, out_dir,
                             extra={**extra, "items": dm.items.meta})


class EpochExport(Callback):
    """``export_epochs=true``: export the item table before training and after every epoch, with
    (checkpoints along training: the encoder variants of ``experiments/exchange_rate.py``).
    ``tables`` lists them, oldest first (a resumed run lists the epochs it trained itself)."""

    def __init__(self, dm, out_dir: str, run_dir: Path):
        self.dm, self.out_dir, self.run_dir = dm, out_dir, run_dir
        self.tables: list[dict] = []

    def _export(self, trainer, module, epoch: int) -> None:
        _, fp, _ = export_items(module, self.dm, self.out_dir, run_dir=str(self.run_dir), epoch=epoch)
        self.tables.append({"epoch": epoch, "fingerprint": fp})

    def on_train_start(self, trainer, module) -> None:
        if not self.tables:  # the state training starts from: -1, or a resumed run's last epoch
            self._export(trainer, module, trainer.current_epoch - 1)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._export(trainer, module, trainer.current_epoch)


def _float(x) -> float | None:
    return None if x is None else float(x)


def format_table(metrics: dict) -> str:
    """Recall rows (before training, val, test) over the retrieval metrics the run measured."""
    keys = [k for k in metrics["test"] if "queries" not in k]
    rows = [("init (test)", metrics["init"]["test"]), ("val", metrics["val"]), ("test", metrics["test"])]
    w = max(len(k) for k in keys) + 2 if keys else 10
    lines = ["metric".ljust(w) + "".join(n.rjust(13) for n, _ in rows)]
    for k in keys:
        lines.append(k.ljust(w) + "".join(f"{m.get(k, float('nan')):13.4f}" for _, m in rows))
    sps = metrics.get("train_samples_per_s")
    lines.append(f"train samples/s: {sps if sps is None else round(sps)}   best epoch: {metrics['best_epoch']}"
                 f"   embeddings: {metrics['embeddings']['fingerprint']}")
    return "\n".join(lines)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "encoders")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    with failure_recorded(cfg):
        metrics = train(cfg)
    print(format_table(metrics))
    print(f"run folder: {cfg.paths.run_dir}")
    key = (cfg.monitor.get("metric") or cfg.data.monitor).split("/", 1)[1]
    return float(metrics["val"].get(key, float("nan")))


if __name__ == "__main__":
    main()
