"""MOON2.0 at this machine's scale: the benchmark table and the ablation table, one command each.

    python experiments/moon2.py benchmark [--seeds 0 1 2] [--runs DIR] [-- hydra overrides]
    python experiments/moon2.py ablation  [--seeds 0 1 2] [--runs DIR] [-- hydra overrides]
    python experiments/moon2.py table     [--runs DIR]

``benchmark`` trains the plain dual encoder and the full model (``dual_encoder``, ``moon2_full``)
for each seed and prints the multi-direction benchmark (mean ± std over seeds, in %);
``ablation`` trains the full model and its four ablations (``moon2_no_moe``, ``moon2_no_dual``,
``moon2_no_coaug``, ``moon2_no_filter``) and prints the ablation table. Runs live in
``DIR/<preset>/seed<k>/`` (default ``multirun/moon2``); a run with a ``metrics.json`` is reused, so
both commands share the full model's runs and resume after an interruption. ``table`` prints both
tables from the run folders alone. Tables are also written to ``docs/moon2/`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctr.runs import mean_std, missing_runs, split_overrides  # noqa: E402

BENCH = ["dual_encoder", "moon2_full"]
ABLATION = ["moon2_full", "moon2_no_moe", "moon2_no_dual", "moon2_no_coaug", "moon2_no_filter"]
# the ablation table's columns: (source, metric, label)
ABLATION_COLS = [("hm", "variant/i2mm/r@1", "H&M variant i2mm R@1"),
                 ("hm", "variant/mm2mm/r@1", "H&M variant mm2mm R@1"),
                 ("hm", "variant/i2i/r@1", "H&M variant i2i R@1"),
                 ("hm", "variant/t2i/r@1", "H&M variant t2i R@1"),
                 ("hm", "item/i2t/r@1", "H&M item i2t R@1"),
                 ("fashion", "item/i2mm/r@1", "Fashion item i2mm R@1"),
                 ("fashion", "item/i2t/r@10", "Fashion item i2t R@10"),
                 ("fashion", "zs_image/acc", "Fashion zero-shot (image)"),
                 ("hm", "probe_colour/acc", "H&M colour probe")]


def train_runs(presets: list[str], seeds: list[int], runs: Path, overrides: list[str]) -> None:
    """Every (preset, seed) run without a metrics.json; a failing run is reported (and listed under
    the tables, ``missing_runs``) and the others still run."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    for p in presets:
        for s in seeds:
            out = runs / p / f"seed{s}"
            if (out / "metrics.json").exists():
                print(f"[moon2] reuse {out}")
                continue
            cmd = [sys.executable, "-m", "encoders.moon2.train", f"experiment={p}", f"seed={s}",
                   f"hydra.run.dir={out}", "trainer.enable_progress_bar=false", *overrides]
            print(f"[moon2] {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
                print(f"[moon2] FAILED {p} seed {s} (see {out / 'failed.json'})", flush=True)


def collect(runs: Path) -> dict[str, list[dict]]:
    """experiment -> metrics of its seeds (run folders with a metrics.json under ``runs``), each
    with the current benchmark of its best checkpoint."""
    from encoders.moon2.benchmark import evaluate_run

    out: dict[str, list[dict]] = {}
    for f in sorted(runs.glob("*/seed*/metrics.json")):
        m = json.loads(f.read_text())
        m["benchmark"] = evaluate_run(f.parent)  # the run's benchmark.json (recomputed if outdated)
        m["signals"] = train_signals(f.parent)
        out.setdefault(m["experiment"], []).append(m)
    return out


def _stat(vals: list[float]) -> str:
    """Percent, ``"m ± s"`` over the finite values ("" for none)."""
    out = mean_std([100 * x for x in vals if x is not None and not np.isnan(x)], digits=1)
    return "" if out == "-" else out


def benchmark_table(res: dict[str, list[dict]], presets: list[str]) -> str:
    from encoders.moon2.benchmark import format_benchmark

    merged = {}
    for p in presets:
        if p not in res:
            continue
        ms = res[p]
        label = f"{p} (n={len(ms)})"
        merged[label] = {}
        for src in ms[0]["benchmark"]:
            keys = [k for k in ms[0]["benchmark"][src] if k != "n_test"]
            merged[label][src] = {k: _stat([m["benchmark"][src].get(k) for m in ms]) for k in keys}
            merged[label][src]["n_test"] = ms[0]["benchmark"][src]["n_test"]
    return format_benchmark(merged)


def ablation_table(res: dict[str, list[dict]], presets: list[str]) -> str:
    head = "| variant | seeds | " + " | ".join(c[2] for c in ABLATION_COLS) + " |"
    lines = [head, "|" + "---|" * (2 + len(ABLATION_COLS))]
    for p in presets:
        if p not in res:
            continue
        ms = res[p]
        cells = [_stat([m["benchmark"].get(src, {}).get(k) for m in ms]) for src, k, _ in ABLATION_COLS]
        lines.append(f"| {p} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


OBJECTIVES = ("t2mm", "i2mm", "mm2mm", "intra")


def train_signals(run_dir: Path) -> dict[str, float]:
    """From a run's CSV log: the last epoch's objective weights, and the mean filtered share and
    kept share of augmented views over the last epoch's logged values."""
    import polars as pl

    f = run_dir / "csv" / "metrics.csv"
    if not f.exists():
        return {}
    d = pl.read_csv(f, infer_schema_length=None)
    out = {}
    for o in OBJECTIVES:
        c = f"train/w_{o}_epoch"
        if c in d.columns and d[c].drop_nulls().len():
            out[f"w_{o}"] = float(d[c].drop_nulls()[-1])
    for name in ("filtered_share", "aug_kept_share"):
        cols = [c for c in (f"train/{name}_epoch", f"train/{name}_step", f"train/{name}") if c in d.columns]
        if cols and "epoch" in d.columns:
            rows = d.filter(pl.col(cols[0]).is_not_null())
            if rows.height:
                out[name] = float(rows.filter(pl.col("epoch") == rows["epoch"].max())[cols[0]].mean())
    return out


def weights_table(res: dict[str, list[dict]], presets: list[str]) -> str:
    """Training signals of each variant (mean over seeds): the learned objective weights (last
    epoch), the share of triples the filter down-weighted and the share of augmented views the
    consistency filter kept (last epoch)."""
    cols = [f"w_{o}" for o in OBJECTIVES] + ["filtered_share", "aug_kept_share"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
    for p in presets:
        sig = [m.get("signals", {}) for m in res.get(p, [])]
        if not sig:
            continue
        cells = []
        for c in cols:
            v = [x[c] for x in sig if c in x]
            cells.append(f"{np.mean(v):.2f}" if v else "")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["benchmark", "ablation", "table"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "multirun" / "moon2")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "moon2")
    args = ap.parse_args(own)
    if args.command in ("benchmark", "ablation"):
        train_runs(BENCH if args.command == "benchmark" else ABLATION, args.seeds, args.runs, overrides)
    res = collect(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    missing_all = []
    for cmd, presets, name in (("benchmark", BENCH, "benchmark.md"), ("ablation", ABLATION, "ablation.md")):
        if args.command not in (cmd, "table"):
            continue
        missing = missing_runs({f"{p} seed {s}": args.runs / p / f"seed{s}" for p in presets for s in args.seeds})
        note = ("\nMissing runs (the tables average the others):\n" + "\n".join(missing) + "\n") if missing else ""
        missing_all += missing
        if cmd == "benchmark":
            text = benchmark_table(res, BENCH) + note
            print("## Benchmark: recall and accuracy in %, mean ± std over seeds\n\n" + text)
        else:
            text = ablation_table(res, ABLATION) + "\n" + weights_table(res, ABLATION) + note
            print("## Ablation (%, mean ± std over seeds)\n\n" + text)
        (args.out / name).write_text(text)
    return 1 if missing_all else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
