"""Benchmark of the CTR presets: train samples/s, peak memory and test metrics, one table.

    python experiments/bench_ctr.py [--presets ml100k_din ml100k_dnn sim_din] [--seeds 0 1 2]
        [--columns test/auc test_random/logloss ...]

``--columns`` (``<split>/<metric>``, e.g. ``test_random/low_impression/ece``) adds a second table of
those metrics, mean ± std over the seeds. The Open Bandit position-bias study:
``--presets obd_bts obd_bts_position_tower --seeds 0 1 2 --columns test/auc test_random/auc
test_random/logloss test_random/calibration test_random/ece``.

Each (preset, seed) runs in a fresh process (so peak RSS is its own) through the real Hydra
configs; extra Hydra overrides go after ``--``. Needs CTR_DATA_DIR for the ML100K presets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctr.runs import mean_std

ROOT = Path(__file__).resolve().parents[1]


def run_one(preset: str, seed: int, out: Path, overrides: list[str]) -> None:
    """Child process: train one preset, then record peak RSS beside its metrics."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ctr  # noqa: F401
    from ctr.runs import compose_config
    from ctr.train import train

    cfg = compose_config(ROOT / "conf", [f"experiment={preset}", f"seed={seed}", "logger=csv",
                                         "trainer.enable_progress_bar=false", *overrides], run_dir=out,
                         cache_dir=os.environ.get("CTR_CACHE_DIR", ROOT / ".cache" / "prepared"),
                         embeddings_dir=os.environ.get("CTR_EMBED_DIR", ROOT / ".cache" / "embeddings"))
    t0 = time.perf_counter()
    metrics = train(cfg)
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    if torch.cuda.is_available():
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "bench.json").write_text(json.dumps(metrics, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["ml100k_din", "ml100k_dnn", "sim_din"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--columns", nargs="*", default=[], metavar="SPLIT/METRIC")
    ap.add_argument("--one", nargs=3, metavar=("PRESET", "SEED", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = ap.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), Path(args.one[2]), args.overrides)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for preset in args.presets:
            for seed in args.seeds:
                out = Path(tmp) / f"{preset}-{seed}"
                out.mkdir()
                cmd = [sys.executable, __file__, "--one", preset, str(seed), str(out), *args.overrides]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rows.append((preset, json.loads((out / "bench.json").read_text())))
                print(f"done {preset} seed {seed}", file=sys.stderr)
    print_table(rows)
    if args.columns:
        print()
        print_columns(rows, args.columns)


def print_columns(rows: list[tuple[str, dict]], columns: list[str]) -> None:
    """Chosen ``<split>/<metric>`` columns per preset, mean ± std over its seeds."""
    by: dict[str, list[dict]] = {}
    for preset, m in rows:
        by.setdefault(preset, []).append(m)
    print("| " + " | ".join(["preset", "seeds", *columns]) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for preset, ms_ in by.items():
        cells = []
        for c in columns:
            split, metric = c.split("/", 1)
            cells.append(mean_std([(m.get(split) or {}).get(metric) for m in ms_]))
        print("| " + " | ".join([preset, str(len(ms_)), *cells]) + " |")


def print_table(rows: list[tuple[str, dict]]) -> None:
    by: dict[str, list[dict]] = {}
    for preset, m in rows:
        by.setdefault(preset, []).append(m)
    cols = ["preset", "seeds", "train samples/s", "peak RSS MB", "prepare from raw s", "epochs", "test AUC", "test GAUC",
            "test logloss", "random AUC", "oracle random AUC"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    for preset, ms_ in by.items():
        rnd = [m.get("test_random", {}).get("auc") for m in ms_]
        orc = [m.get("oracle", {}).get("test_random", {}).get("auc") for m in ms_]
        print("| " + " | ".join([
            preset, str(len(ms_)),
            f"{statistics.mean(m['train_samples_per_s'] for m in ms_):,.0f}",
            f"{max(m['peak_rss_mb'] for m in ms_):,.0f}",
            f"{statistics.mean(m['data_build_seconds'] for m in ms_):.2f}",
            ",".join(str(m["epochs"]) for m in ms_),
            mean_std([m["test"]["auc"] for m in ms_]), mean_std([m["test"]["gauc"] for m in ms_]),
            mean_std([m["test"]["logloss"] for m in ms_]), mean_std(rnd), mean_std(orc)]) + " |")


if __name__ == "__main__":
    main()
