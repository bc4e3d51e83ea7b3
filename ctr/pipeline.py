"""The three-stage MOON pipeline: pretrain -> post-train -> export -> CTR, as one command.

``python -m ctr.pipeline [--seeds 0 1 2] [--out DIR] [--encoders k=v ...] [--posttrain k=v ...] [--ctr k=v ...]``

Two epochs per stage unless overridden (``ENCODER_BUDGET``, ``CTR_BUDGET`` below).

1. **pretrain** (``encoders.train experiment=pretrain``): the ImageNet EfficientNet-Lite0 and a
   small text tower, self-supervised views plus image-title pairs, on the simulator's catalogue;
2. **post-train** (``experiment=posttrain init_from=<pretrain>``): click-supervised contrastive
   learning on the simulator's training clicks (the CTR stage's train split);
3. **export**: each encoder run writes its ``item_id -> embedding`` table (named by its fingerprint);
4. **CTR** (``ctr.train``) on the same simulated traffic: ID-only DIN (``sim_din``), + pretrained
   embeddings and + post-trained embeddings (``sim_din_visual``), + the debiasing network
   (``sim_din_debias``), beside the ``true_ctr`` oracle.

Every stage runs in its own folder ``<out>/<stage>-<fingerprint>``, the fingerprint hashing the
stage's resolved config and its upstream stages' fingerprints: a stage whose folder holds
``metrics.json`` is reused, and one that was interrupted resumes from its ``last.ckpt``. The run
ends with one table (test metrics on the production log and on the uniform-random exposure log,
the low-impression items apart, and the encoders' image-search recall@10), printed and saved as
``<out>/pipeline-seed<k>.md`` (and ``pipeline.md`` over all seeds, mean ± std).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ctr  # noqa: F401  (installs the torchvision import hook before lightning is imported)
from ctr.runs import compose_config, failure_recorded, mean_std

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PIPELINE_VERSION = 1  # bump when a stage's code changes what a reused folder would hold


@dataclass(frozen=True)
class Variant:
    """One CTR row of the table: a ``conf/experiment`` preset and the encoder stage whose table it reads."""

    label: str
    preset: str
    table: str | None  # an encoder stage name, or None (no image embeddings)


ENCODER_STAGES = (("pretrain", "pretrain", None), ("posttrain", "posttrain", "pretrain"))  # name, preset, init
# The pipeline's own budget, ahead of the stages' overrides (a later override wins): two epochs per
# stage, so that `make run` ends within 10 minutes on 2 CPU cores (8 min 52 s measured). The CTR
# runs lose nothing (their best validation AUC came by the second epoch, never after a worse one,
# in every measured run: the same checkpoints); the encoders train half as long (seed 0: post-trained
# recall@10 0.119 against 0.130). The presets' own budgets (4 epochs each):
# `--encoders trainer.max_epochs=4 --ctr trainer.max_epochs=4`.
ENCODER_BUDGET = ("trainer.max_epochs=2",)
CTR_BUDGET = ("trainer.max_epochs=2",)
VARIANTS = (
    Variant("ID-only DIN", "sim_din", None),
    Variant("+ pretrained embeddings", "sim_din_visual", "pretrain"),
    Variant("+ post-trained embeddings", "sim_din_visual", "posttrain"),
    Variant("+ debiasing network", "sim_din_debias", "posttrain"),
)


def _fingerprint(cfg, upstream: dict) -> str:
    """sha256 over the resolved config (paths and run-control keys such as the thread count left
    out) and the upstream stages' fingerprints."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True)
    for k in ("paths", "resume", "init_from", "logger"):
        d.pop(k, None)
    d["threads"] = None  # the thread count does not change what a stage computes
    d.get("trainer", {}).pop("enable_progress_bar", None)
    blob = json.dumps({"cfg": d, "upstream": upstream, "v": PIPELINE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Pipeline:
    def __init__(self, out: Path, cache_dir: Path, embeddings_dir: Path, encoder_overrides: list[str],
                 ctr_overrides: list[str], threads: int | None, logger: str, log=print,
                 posttrain_overrides: list[str] = ()):
        self.out, self.cache_dir, self.embeddings_dir = out, cache_dir, embeddings_dir
        self.encoder_overrides, self.ctr_overrides = encoder_overrides, ctr_overrides
        self.posttrain_overrides = list(posttrain_overrides)  # the post-training stage's alone (recipes)
        self.threads, self.logger, self.log = threads, logger, log

    def stage_config(self, conf_dir: Path, overrides: list[str]):
        extra = [f"threads={self.threads}"] if self.threads else []
        return compose_config(conf_dir, [*overrides, f"logger={self.logger}", "trainer.enable_progress_bar=false",
                                         *extra], cache_dir=self.cache_dir, embeddings_dir=self.embeddings_dir,
                              run_dir="unset")

    def run_stage(self, stage: str, cfg, upstream: dict, train_fn) -> tuple[dict, str, Path]:
        from omegaconf import open_dict

        fp = _fingerprint(cfg, upstream)
        run_dir = self.out / f"{stage}-{fp}"
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
            cfg.resume = True
        done = run_dir / "metrics.json"
        if done.exists():
            self.log(f"[{stage}] reused {run_dir}")
            return json.loads(done.read_text()), fp, run_dir
        resumed = (run_dir / "checkpoints" / "last.ckpt").exists()
        self.log(f"[{stage}] {'resuming' if resumed else 'running'} in {run_dir}")
        t0 = time.perf_counter()
        with failure_recorded(cfg):  # a failing stage leaves failed.json in its folder
            metrics = train_fn(cfg)
        self.log(f"[{stage}] done in {time.perf_counter() - t0:.0f} s")
        return metrics, fp, run_dir

    def encoders(self, seed: int) -> dict[str, dict]:
        from encoders.train import train as train_encoder

        stages: dict[str, dict] = {}
        for name, preset, init in ENCODER_STAGES:
            over = [f"experiment={preset}", f"seed={seed}", *self.encoder_overrides,
                    *(self.posttrain_overrides if name == "posttrain" else [])]
            upstream = {}
            if init is not None:
                over.append(f"init_from={stages[init]['run_dir']}")
                upstream = {init: stages[init]["fingerprint"]}
            cfg = self.stage_config(CONF / "encoders", over)
            m, fp, run_dir = self.run_stage(f"{name}-seed{seed}", cfg, upstream, train_encoder)
            stages[name] = {"metrics": m, "fingerprint": fp, "run_dir": str(run_dir),
                            "table": m["embeddings"]["fingerprint"]}
        return stages

    def ctr(self, seed: int, stages: dict[str, dict]) -> list[tuple[Variant, dict]]:
        from ctr.train import train as train_ctr

        rows = []
        for v in VARIANTS:
            over = [f"experiment={v.preset}", f"seed={seed}", *self.ctr_overrides]
            upstream = {}
            if v.table is not None:
                over.append(f"model.visual.table={stages[v.table]['table']}")
                upstream = {v.table: stages[v.table]["table"]}
            cfg = self.stage_config(CONF, over)
            stage = f"ctr-{v.preset}-{v.table or 'ids'}-seed{seed}"
            m, _, _ = self.run_stage(stage, cfg, upstream, train_ctr)
            rows.append((v, m))
        return rows

    def seed(self, seed: int) -> dict:
        stages = self.encoders(seed)
        rows = self.ctr(seed, stages)
        return {"seed": seed, "encoders": stages, "ctr": rows}


# ----------------------------------------------------------------------------------------------
# the table

COLS = (("test_random", "auc"), ("test_random", "gauc"), ("test_random", "logloss"), ("test_random", "ece"),
        ("test_random", "low_impression/auc"), ("test_random", "low_impression/ece"),
        ("test", "auc"), ("test", "gauc"), ("test", "calibration"))
RECALL = "search/recall@10"


def table(results: list[dict]) -> str:
    """Markdown: one row per CTR variant (mean ± std over the seeds given) and the oracle."""
    head = ["model", *[f"{s.replace('test_random', 'random')} {k}" for s, k in COLS], "image R@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (v, _) in enumerate(results[0]["ctr"]):
        ms = [r["ctr"][i][1] for r in results]
        cells = [mean_std([m[s].get(k) for m in ms]) for s, k in COLS]
        rec = "-" if v.table is None else mean_std(
            [r["encoders"][v.table]["metrics"]["test"].get(RECALL) for r in results])
        lines.append("| " + " | ".join([v.label, *cells, rec]) + " |")
    ms = [r["ctr"][0][1] for r in results]
    cells = [mean_std([(m.get("oracle", {}).get(s) or {}).get(k) for m in ms]) for s, k in COLS]
    lines.append("| " + " | ".join(["true_ctr oracle", *cells, "-"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="ctr-pipeline", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "pipeline")
    ap.add_argument("--encoders", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for both encoder stages (e.g. trainer.max_epochs=2)")
    ap.add_argument("--posttrain", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for the post-training stage alone (e.g. tasks.image_text=1.0): "
                         "the pretrain stage is reused")
    ap.add_argument("--ctr", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for every CTR run (e.g. trainer.max_epochs=2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--logger", default="default", help="logger preset (default: CSV + offline wandb)")
    args = ap.parse_args(argv)
    cache = Path(os.environ.get("CTR_CACHE_DIR", ROOT / ".cache" / "prepared"))
    emb = Path(os.environ.get("CTR_EMBED_DIR", ROOT / ".cache" / "embeddings"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = Pipeline(out, cache, emb, [*ENCODER_BUDGET, *args.encoders], [*CTR_BUDGET, *args.ctr],
                 args.threads, args.logger,
                 log=lambda s: print(s, file=sys.stderr, flush=True), posttrain_overrides=args.posttrain)
    t0 = time.perf_counter()
    results = []
    for s in args.seeds:
        r = p.seed(s)
        results.append(r)
        (out / f"pipeline-seed{s}.md").write_text(table([r]) + "\n")
    text = table(results)
    seeds = ", ".join(map(str, args.seeds))
    footer = (f"\nseeds: {seeds}; random = the uniform-random exposure log, low_impression = items with at most "
              f"the median train impressions; image R@10 = the encoder's test image-search recall@10\n"
              f"stage folders: {out}   total {time.perf_counter() - t0:.0f} s")
    (out / "pipeline.md").write_text(text + "\n" + footer + "\n")
    print(text + "\n" + footer)
    return results


if __name__ == "__main__":
    main()
