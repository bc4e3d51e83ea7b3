"""The encoder studies of the encoders issue, one table each (mean ± sd over seeds).

    python experiments/bench_encoders.py sim [--seeds 0 1 2] [--out runs/enc] [-- hydra overrides ...]
    python experiments/bench_encoders.py hm  [--seeds 0 1 2] [--out runs/enc] [-- hydra overrides]

``sim``: per seed, ``pretrain`` then ``posttrain`` (started from that pretrain run) on the
simulator; the table shows test image-search recall@K of the ImageNet encoder before any
training, after pretraining, and after click post-training, and checks that the post-trained
run's exported embedding table loads by its fingerprint.

``hm``: per seed, ``hm_heads_only`` (frozen ImageNet EfficientNet-Lite0 and MiniLM, only the
projection heads trained) and ``hm_image_text`` (their top layers fine-tuned); test
text->image R@K and same-product image search recall@K on held-out products.

Every run is a fresh process through the real Hydra configs; its folder (metrics.json, logs,
checkpoint) stays under ``--out``. Needs CTR_DATA_DIR for ``hm``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ctr.runs import mean_std as ms, split_overrides

ROOT = Path(__file__).resolve().parents[1]


REUSE = False  # --reuse: a run folder that already holds metrics.json is read, not run again


def run(preset: str, seed: int, out: Path, overrides: list[str]) -> dict:
    if REUSE and (out / "metrics.json").exists():
        print(f"reused {out}", file=sys.stderr, flush=True)
        return json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "encoders.train", f"experiment={preset}", f"seed={seed}", "logger=csv",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", *overrides]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    t0 = time.perf_counter()
    with open(out / "stdout.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    print(f"done {preset} seed {seed} in {m['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
    return m


def table(rows: list[tuple[str, list[dict], str]], keys: list[str]) -> None:
    """rows: (label, runs, section) where section picks 'test' or 'init.test'."""
    cols = ["encoder", "seeds", *keys, "train samples/s", "fit s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for label, runs, section in rows:
        def get(m, k):
            d = m["init"]["test"] if section == "init" else m["test"]
            return d.get(k)
        sps = [m["train_samples_per_s"] for m in runs if section != "init" and m.get("train_samples_per_s")]
        fit = [m["fit_seconds"] for m in runs if section != "init" and m.get("fit_seconds")]
        print("| " + " | ".join([label, str(len(runs)), *[ms([get(m, k) for m in runs]) for k in keys],
                                 f"{statistics.mean(sps):,.0f}" if sps else "-",
                                 f"{statistics.mean(fit):,.0f}" if fit else "-"]) + " |")


def sim(seeds: list[int], out: Path, overrides: list[str]) -> None:
    from encoders.export import load_embeddings

    pre, post = [], []
    for s in seeds:
        p = run("pretrain", s, out / f"pretrain-{s}", overrides)
        q = run("posttrain", s, out / f"posttrain-{s}", [f"init_from={out / f'pretrain-{s}'}", *overrides])
        ids, emb = load_embeddings(q["embeddings"]["fingerprint"], Path(q["embeddings"]["path"]).parent)
        assert len(ids) == q["items"]["n"], "exported table does not cover the items"
        pre.append(p)
        post.append(q)
    keys = ["search/recall@1", "search/recall@5", "search/recall@10"]
    table([("ImageNet EfficientNet-Lite0 (no training)", pre, "init"), ("pretrain (ssl + image-text)", pre, "test"),
           ("posttrain (clicks), from pretrain", post, "test")], keys)
    gains = [q["test"]["search/recall@10"] - q["init"]["test"]["search/recall@10"] for q in post]
    print(f"\nclick post-training gain in test recall@10 over its pretrained start: {ms(gains)} "
          f"(per seed: {', '.join(f'{g:+.4f}' for g in gains)})")
    print("exported tables (load by fingerprint): " + ", ".join(q["embeddings"]["fingerprint"] for q in post))


def hm(seeds: list[int], out: Path, overrides: list[str]) -> None:
    heads, tuned = [], []
    for s in seeds:
        heads.append(run("hm_heads_only", s, out / f"hm_heads_only-{s}", overrides))
        tuned.append(run("hm_image_text", s, out / f"hm_image_text-{s}", overrides))
    keys = ["t2i_r@1", "t2i_r@5", "t2i_r@10", "i2t_r@10", "same_product/recall@10"]
    table([("frozen towers, heads only", heads, "test"), ("image-text fine-tuned", tuned, "test")], keys)
    for k in ("t2i_r@10", "same_product/recall@10"):
        d = [b["test"][k] - a["test"][k] for a, b in zip(heads, tuned)]
        print(f"fine-tuned minus heads-only, test {k}: {ms(d)} (per seed: {', '.join(f'{x:+.4f}' for x in d)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=["sim", "hm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_encoders")
    ap.add_argument("--reuse", action="store_true", help="read run folders that already hold metrics.json")
    argv, overrides = split_overrides(sys.argv[1:])
    args = ap.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    {"sim": sim, "hm": hm}[args.study](args.seeds, args.out.resolve(), overrides)


if __name__ == "__main__":
    main()
