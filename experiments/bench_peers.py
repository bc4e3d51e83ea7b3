"""This project's DIN against DeepCTR-Torch's DIN on ML100K-CTR v1, side by side, one table.

    python experiments/bench_peers.py [--seeds 0 1 2] [--peer-python .venv-peers/bin/python]
        [--out DIR] [-- hydra overrides for this project's runs]

Matched settings: embedding 32, history 50, attention MLP [64, 32], DNN [200, 80], batch 1024,
Adam 1e-3, early stopping on validation AUC with patience 2 (20 epochs at most), the best epoch's
weights tested. Each system keeps its own defaults otherwise (this project: the ``ml100k_din``
preset). The systems alternate (seed 0: ours first, seed 1: the peer first, ...) and every run is
a fresh process, so that peak RSS is its own and neither system warms the other's caches; each
of this project's runs builds its data from the raw files into an empty cache.

Both systems' test metrics come from the same code (``ctr.metrics`` on their test predictions),
and the peer's preprocessed split is checked against this project's (same labels in every split,
same test histories, same test targets among those seen in training) before any number is printed.
``--peer-malloc-tuning`` gives the peer this project's allocator settings too (ctr/malloc.py). ``make bench`` builds
``.venv-peers`` (deepctr-torch 0.3.0 over the pinned torch) and runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT / "experiments" / "peers" / "deepctr_din.py"

# the bar of the issue: the best public result on this protocol here
PUBLIC_BEST = {"auc": 0.7196, "gauc": 0.7155}


def data_dir() -> Path:
    d = os.environ.get("CTR_DATA_DIR")
    if not d:
        raise SystemExit("set CTR_DATA_DIR to the folder holding movielens_100k/")
    return Path(d) / "movielens_100k"


def run_ours(seed: int, out: Path, overrides: list[str]) -> dict:
    """Our DIN through the real Hydra config, building its data from raw files into ``out/cache``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CTR_CACHE_DIR": str(out / "cache"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_ctr.py"), "--one", "ml100k_din", str(seed), str(out),
           *overrides]
    with open(out / "stdout.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    m = json.loads((out / "bench.json").read_text())
    return {"system": "ours", "seed": seed, "auc": m["test"]["auc"], "gauc": m["test"]["gauc"],
            "logloss": m["test"]["logloss"], "train_samples_per_s": m["train_samples_per_s"],
            "prepare_seconds": m["data_build_seconds"], "peak_rss_mb": m["peak_rss_mb"], "epochs": m["epochs"],
            "artefact": m["data_path"]}


def run_peer(python: str, seed: int, out: Path, malloc_tuning: bool = False) -> dict:
    """The peer in its own environment; ``malloc_tuning`` hands it this project's allocator
    settings (ctr/malloc.py) through glibc's MALLOC_* variables."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(PEER_SCRIPT), "--data", str(data_dir()), "--seed", str(seed), "--out", str(out)]
    env = dict(os.environ)
    if malloc_tuning:
        from ctr.malloc import SETTINGS

        env.update({var: str(value) for value, var in SETTINGS.values()})
    with open(out / "stdout.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    r = json.loads((out / "result.json").read_text())
    check = np.load(out / "split_check.npz")
    pred = np.load(out / "test_pred.npy")
    _, groups = np.unique(check["test_user"], return_inverse=True)
    r.update(score(pred, check["test_label"], groups))
    return r


def score(pred: np.ndarray, label: np.ndarray, groups: np.ndarray) -> dict:
    """Test AUC / GAUC / logloss with this project's metric code (the same for both systems)."""
    import torch

    from ctr.metrics import ctr_metrics

    m = ctr_metrics()
    m.update(torch.from_numpy(pred).float(), torch.from_numpy(label).float(), groups=torch.from_numpy(groups).long())
    out = {k: float(v) for k, v in m.compute().items()}
    return {"auc": out["auc"], "gauc": out["gauc"], "logloss": out["logloss"]}


def check_same_split(artefact: Path, peer_out: Path) -> str:
    """Raise unless the peer's preprocessing produced this project's split: the same labels in
    every split, the same test history lengths and histories (as raw item ids; items unseen in
    training are out-of-vocabulary on both sides) and the same test targets seen in training."""
    import polars as pl

    peer = np.load(peer_out / "split_check.npz")
    for split in ("train", "val", "test"):
        ours = np.load(artefact / split / "label.npy")
        if not np.array_equal(ours, peer[f"{split}_label"]):
            raise AssertionError(f"{split} labels differ between the systems ({len(ours)} vs {len(peer[f'{split}_label'])})")
    vocab = pl.read_parquet(artefact / "vocab" / "item_id.parquet")
    raw = np.zeros(int(vocab["index"].max()) + 1, dtype=np.int64)
    raw[vocab["index"].to_numpy()] = vocab["item_id"].to_numpy()
    n = np.load(artefact / "test" / "hist_len.npy")
    if not np.array_equal(n, peer["test_hist_len"]):
        raise AssertionError("test history lengths differ between the systems")
    hist = raw[np.load(artefact / "test" / "hist.item_id.npy")]
    if not np.array_equal(hist, peer["test_hist_item"]):
        raise AssertionError("test histories differ between the systems")
    code = np.load(artefact / "test" / "sparse.item_id.npy")
    seen = code >= 2
    if not np.array_equal(raw[code[seen]], peer["test_item"][seen]):
        raise AssertionError("test target items differ between the systems")
    return (f"same split checked: {sum(len(peer[f'{s}_label']) for s in ('train', 'val', 'test')):,} labels, "
            f"{int(n.sum()):,} test history items, {int(seen.sum()):,} test targets")


COLS = [("test AUC", "auc", "{:.4f}"), ("test GAUC", "gauc", "{:.4f}"), ("test logloss", "logloss", "{:.4f}"),
        ("train samples/s", "train_samples_per_s", "{:,.0f}"), ("raw files → tensors s", "prepare_seconds", "{:.2f}"),
        ("peak RSS MB", "peak_rss_mb", "{:,.0f}")]


def summarize(runs: list[dict]) -> dict:
    """(mean, sd) over the runs per column; peak RSS: the largest run's."""
    out = {}
    for _, key, _ in COLS:
        vals = [r[key] for r in runs]
        if key == "peak_rss_mb":
            out[key] = (max(vals), 0.0)
        else:
            out[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def table(ours: list[dict], peer: list[dict]) -> str:
    so, sp = summarize(ours), summarize(peer)
    head = ["system", "seeds", *(c for c, _, _ in COLS), "epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s, runs in (("this project, DIN (ml100k_din)", so, ours), ("DeepCTR-Torch 0.3.0, DIN", sp, peer)):
        cells = []
        for _, key, fmt in COLS:
            m, sd = s[key]
            cells.append(fmt.format(m) + (f" ± {fmt.format(sd)}" if key in ("auc", "gauc", "logloss") and len(runs) > 1 else ""))
        lines.append("| " + " | ".join([name, str(len(runs)), *cells, ",".join(str(r["epochs"]) for r in runs)]) + " |")
    ratio = []
    for _, key, _ in COLS:
        ratio.append(f"{so[key][0] / sp[key][0]:.2f}×" if key not in ("auc", "gauc", "logloss")
                     else f"{so[key][0] - sp[key][0]:+.4f}")
    lines.append("| " + " | ".join(["ours vs peer (difference / ratio)", "", *ratio, ""]) + " |")
    return "\n".join(lines)


def verdict(ours: list[dict], peer: list[dict]) -> str:
    so, sp = summarize(ours), summarize(peer)
    checks = [
        ("test AUC ≥ peer", so["auc"][0] >= sp["auc"][0]),
        ("test GAUC ≥ peer", so["gauc"][0] >= sp["gauc"][0]),
        (f"test AUC ≥ {PUBLIC_BEST['auc']} (best public result on this protocol here)", so["auc"][0] >= PUBLIC_BEST["auc"]),
        (f"test GAUC ≥ {PUBLIC_BEST['gauc']}", so["gauc"][0] >= PUBLIC_BEST["gauc"]),
        ("train samples/s ≥ 3× peer", so["train_samples_per_s"][0] >= 3 * sp["train_samples_per_s"][0]),
        ("raw files → tensors < 8 s", so["prepare_seconds"][0] < 8.0),
        ("peak RSS ≤ peer", so["peak_rss_mb"][0] <= sp["peak_rss_mb"][0]),
    ]
    return "\n".join(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks)


def main() -> None:
    from ctr.runs import split_overrides

    argv, overrides = split_overrides(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    ap.add_argument("--peer-malloc-tuning", action="store_true",
                    help="give the peer this project's allocator settings too (ctr/malloc.py; off: as its users run it)")
    args = ap.parse_args(argv)
    if not Path(args.peer_python).exists():
        raise SystemExit(f"{args.peer_python} not found: `make bench` builds .venv-peers")
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="bench-peers-")
    out = args.out or Path(tmp.name)
    ours, peer, checked = [], [], None
    for i, seed in enumerate(args.seeds):
        order = ("ours", "peer") if i % 2 == 0 else ("peer", "ours")
        for system in order:
            if system == "ours":
                ours.append(run_ours(seed, out / f"ours-{seed}", overrides))
            else:
                peer.append(run_peer(args.peer_python, seed, out / f"peer-{seed}", args.peer_malloc_tuning))
            r = (ours if system == "ours" else peer)[-1]
            print(f"seed {seed} {system}: AUC {r['auc']:.4f}, {r['train_samples_per_s']:,.0f} samples/s",
                  file=sys.stderr, flush=True)
        if checked is None:
            checked = check_same_split(Path(ours[-1]["artefact"]), out / f"peer-{seed}")
            print(checked, file=sys.stderr, flush=True)
    import platform

    import torch

    print(f"ML100K-CTR v1, {len(args.seeds)} seeds, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; {checked}; "
          f"peer allocator: {'this project' + chr(39) + 's settings' if args.peer_malloc_tuning else 'glibc default'}")
    print()
    print(table(ours, peer))
    print()
    print(verdict(ours, peer))
    (out / "bench_peers.json").write_text(json.dumps({"ours": ours, "peer": peer}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
