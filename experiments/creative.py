"""Creative4U at this machine's scale: train the four selectors per seed and print the evaluation table.

    python experiments/creative.py run   [--seeds 0 1 2] [--runs DIR] [--jobs 2] [-- hydra overrides]
    python experiments/creative.py table [--runs DIR] [--out DIR]

``run`` trains, for every seed (each seed is its own simulated world of creatives): the pointwise
baseline (``creative_pointwise``), SFT without reasoning (``creative_sft_answer``), CoT-SFT
(``creative_sft_cot``) and SFT + GRPO (``creative_grpo`` from that seed's CoT-SFT checkpoint),
``--jobs`` at a time (one thread each), then prints the table. Runs live in
``DIR/<preset>/seed<k>/`` (default ``multirun/creative``); a run with a ``metrics.json`` is reused.
``table`` prints the table from the run folders alone and writes it to ``docs/creative/results.md``
(``--out``): held-out (test) pairs, both orders, mean ± std over seeds in %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctr.runs import mean_std, missing_runs, split_overrides  # noqa: E402

METHODS = [("creative_pointwise", "pointwise CTR regressor (image embeddings)"),
           ("creative_sft_answer", "SFT without reasoning"),
           ("creative_sft_cot", "SFT with reasoning (CoT-SFT)"),
           ("creative_grpo", "SFT + GRPO")]


def _cmd(preset: str, seed: int, out: Path, overrides: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ctr.creative.train", f"experiment={preset}", f"seed={seed}",
            f"hydra.run.dir={out}", "trainer.enable_progress_bar=false", *extra, *overrides]


def train_runs(seeds: list[int], runs: Path, jobs: int, overrides: list[str]) -> list[tuple[str, int]]:
    """Every (preset, seed) run without a metrics.json, ``jobs`` at a time; GRPO waits for its
    seed's CoT-SFT run. A failing run is reported and the others still run (a GRPO run whose
    CoT-SFT failed is skipped); returns the failed (preset, seed) pairs."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    todo = [(p, s) for s in seeds for p, _ in METHODS]
    running: dict[tuple[str, int], subprocess.Popen] = {}
    failed = []

    def done(p, s):
        return (runs / p / f"seed{s}" / "metrics.json").exists()

    while todo or running:
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode:
                    failed.append(key)
                    print(f"[creative] FAILED {key[0]} seed {key[1]} (see its run folder)", flush=True)
        for p, s in list(todo):
            if len(running) >= jobs:
                break
            if done(p, s):
                print(f"[creative] reuse {runs / p / f'seed{s}'}")
                todo.remove((p, s))
                continue
            extra = [f"threads={1 if jobs > 1 else os.cpu_count()}"]
            if p == "creative_grpo":
                if ("creative_sft_cot", s) in failed:
                    todo.remove((p, s))
                    continue
                if not done("creative_sft_cot", s):
                    continue  # wait for the seed's SFT
                ckpt = json.loads((runs / "creative_sft_cot" / f"seed{s}" / "metrics.json").read_text())["checkpoint"]
                if not ckpt:
                    raise SystemExit(f"the CoT-SFT run of seed {s} saved no checkpoint (fast_dev_run?): "
                                     "GRPO needs one")
                extra.append(f"init_ckpt={ckpt}")
            # the first run of a seed builds its world and image tokens: let it finish first
            if not any(done(q, s) for q, _ in METHODS) and any(k[1] == s for k in running):
                continue
            out = runs / p / f"seed{s}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = _cmd(p, s, out, overrides, extra)
            print(f"[creative] {' '.join(cmd[2:])}", flush=True)
            with open(out / "stdout.log", "w") as log:  # the child keeps its own handle
                running[(p, s)] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            todo.remove((p, s))
        time.sleep(2)
    return failed


def collect(runs: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(runs.glob("*/seed*/metrics.json")):
        m = json.loads(f.read_text())
        out.setdefault(m["experiment"], []).append(m)
    return out


def _pct(vals) -> str:
    vals = [100 * v for v in vals if v is not None and not np.isnan(v)]
    out = mean_std(vals, digits=1)
    return "" if out == "-" else out


def table(res: dict[str, list[dict]]) -> str:
    from ctr.creative.evaluate import gap_bucket_names

    buckets = gap_bucket_names()
    head = ["method", "seeds", "accuracy", "first order", "order-swap consistency",
            *[f"acc, gap {b}" for b in buckets], "well formed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, label in METHODS:
        ms = res.get(preset, [])
        if not ms:
            continue
        t = [m["test"] for m in ms]
        row = [label, str(len(ms)), _pct(x["accuracy"] for x in t), _pct(x["accuracy_first_order"] for x in t),
               _pct(x["consistency"] for x in t), *[_pct(x.get(f"accuracy_gap_{b}") for x in t) for b in buckets],
               # the answer-only format has no <think> block: "well formed" does not apply
               "" if preset == "creative_sft_answer" else _pct(x.get("well_formed") for x in t)]
        lines.append("| " + " | ".join(row) + " |")
    per_seed = ["", "Per seed (test accuracy, both orders, %):", "",
                "| seed | test pairs | " + " | ".join(p for p, _ in METHODS) + " | GRPO - CoT-SFT |",
                "|" + "---|" * (len(METHODS) + 3)]
    seeds = sorted({m["seed"] for ms in res.values() for m in ms})
    for s in seeds:
        acc = {p: next((m["test"]["accuracy"] for m in res.get(p, []) if m["seed"] == s), None) for p, _ in METHODS}
        n = next((m["test"]["n_pairs"] for ms in res.values() for m in ms if m["seed"] == s), "")
        d = (acc["creative_grpo"] - acc["creative_sft_cot"]) if None not in (acc["creative_grpo"], acc["creative_sft_cot"]) else None
        per_seed.append(f"| {s} | {n} | " + " | ".join("" if acc[p] is None else f"{100 * acc[p]:.1f}" for p, _ in METHODS)
                        + f" | {'' if d is None else f'{100 * d:+.1f}'} |")
    return "\n".join(lines + per_seed)


def main(argv: list[str] | None = None) -> int:
    args_, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "multirun" / "creative")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "creative")
    args = ap.parse_args(args_)
    if args.command == "run":
        train_runs(args.seeds, args.runs, args.jobs, overrides)
    res = collect(args.runs)
    missing = missing_runs({f"{p} seed {s}": args.runs / p / f"seed{s}" for p, _ in METHODS for s in args.seeds})
    text = table(res) + (("\n\nMissing runs (the table averages the others):\n" + "\n".join(missing))
                         if missing else "")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(
        "# Creative4U: creative selection on held-out simulated pairs\n\n"
        f"`python experiments/creative.py table` (runs: `{args.runs.relative_to(ROOT) if args.runs.is_relative_to(ROOT) else args.runs}`).\n\n"
        + text + "\n")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
