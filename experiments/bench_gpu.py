"""The CTR benchmark on a GPU at large batches: train samples/s, peak GPU memory, test AUC.

    python experiments/bench_gpu.py [--presets ml100k_din sim_din] [--batch-sizes 1024 8192 32768]
        [--precision bf16-mixed 32-true] [--seed 0] [-- extra hydra overrides]

For whoever has a GPU (it refuses to run without CUDA). Each (preset, batch size, precision) is a
fresh process through the real Hydra config with ``trainer=gpu`` (pinned host memory,
non-blocking copies), the target attention on the padded grid (``model.sequence.pack=false``:
no data-dependent shapes) and an evaluation batch of at least the training
batch. The learning rate is left as configured: at very large batches the AUC column shows what
that costs, the samples/s column is the point. Prints one table; ``--out`` keeps the run folders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from ctr.runs import split_overrides

    argv, overrides = split_overrides(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["ml100k_din", "sim_din"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1024, 8192, 32768])
    ap.add_argument("--precision", nargs="+", default=["bf16-mixed", "32-true"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (see experiments/bench_peers.py for CPU)")
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="bench-gpu-")
    out = args.out or Path(tmp.name)
    # each row is printed as its run ends: a run cut short by a time limit keeps the rows before it
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| preset | batch | precision | train samples/s | peak GPU memory GB | epochs | test AUC |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for preset in args.presets:
        for bs in args.batch_sizes:
            for prec in args.precision:
                run = out / f"{preset}-b{bs}-{prec}"
                run.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(ROOT / "experiments" / "bench_ctr.py"), "--one", preset, str(args.seed),
                       str(run), "trainer=gpu", f"trainer.precision={prec}", f"data.batch_size={bs}",
                       f"data.eval_batch_size={max(bs, 8192)}", "model.sequence.pack=false", *overrides]
                with open(run / "stdout.log", "w") as log:
                    p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "WANDB_MODE": "disabled"})
                if p.returncode != 0:
                    print(f"| {preset} | {bs:,} | {prec} | failed (see {run / 'stdout.log'}) | | | |", flush=True)
                    continue
                m = json.loads((run / "bench.json").read_text())
                print(f"| {preset} | {bs:,} | {prec} | {m['train_samples_per_s']:,.0f} | "
                      f"{(m.get('peak_gpu_mb') or 0) / 1024:.2f} | {m['epochs']} | {m['test']['auc']:.4f} |", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
