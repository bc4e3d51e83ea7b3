"""Scaling-law studies: run a Hydra sweep along one axis, fit L(x) = a * x^-b + c, report and plot.

Each study is a Hydra multirun preset (``conf/experiment/scale_*.yaml`` for the CTR stage,
``conf/encoders/experiment/scale_*.yaml`` for the encoders) that sweeps one axis crossed with seeds;
every run records its axis values, parameters, FLOPs, samples and tokens seen, wall time and metrics
in ``metrics.json`` (a failed run leaves ``failed.json``). This script needs nothing but the run
folders (no wandb):

    python experiments/scaling.py run sim_tokens               # sweep + fit + table + plot
    python experiments/scaling.py run sim_tokens --launcher local_parallel --seeds 0 1 2 -- threads=1
    python experiments/scaling.py fit sim_tokens --runs DIR    # refit existing run folders
    python experiments/scaling.py run all                      # the documented study (docs/scaling/)
    python experiments/scaling.py list

Fit: for each offset ``c`` on a fine grid below the smallest loss, ``log(L - c)`` is linear in
``log x`` (closed-form least squares gives ``a`` and ``b``); the ``c`` with the least squared error
in L itself wins, refined by golden-section search. Confidence intervals: a case bootstrap over
the runs (resamples with fewer than 3 distinct x are redrawn). Extrapolation: the law is refitted
without the largest ``--holdout`` x values and its prediction there is compared with the
measured mean (absolute and relative error, and whether the measurement falls in the bootstrap
95 % interval of the prediction).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctr.runs import split_overrides

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Study:
    entry: str                 # python module run as `python -m <entry> -m experiment=<preset>`
    preset: str
    x: str                     # dotted path into metrics.json (e.g. tokens_seen, axes.seq_len)
    y: str                     # dotted path of the loss-like metric (e.g. test_random.logloss)
    one_minus: bool = False    # L = 1 - y (for a recall: the error rate)
    x_label: str = ""
    y_label: str = ""
    seeds: tuple[int, ...] = (0, 1)  # `run` without --seeds


STUDIES: dict[str, Study] = {
    "sim_tokens": Study("ctr.train", "scale_sim_tokens", "train_impressions", "test.logloss",
                        x_label="training impressions", y_label="test logloss"),
    "sim_seq_len": Study("ctr.train", "scale_sim_seq_len", "axes.seq_len", "test.logloss",
                         x_label="behaviour-sequence length", y_label="test logloss"),
    "ml100k_seq_len": Study("ctr.train", "scale_ml100k_seq_len", "axes.seq_len", "test.logloss",
                            x_label="behaviour-sequence length", y_label="ML100K test logloss",
                            seeds=(0, 1, 2)),  # the effect (~0.007) is about twice the seed std
    "sim_pairs": Study("encoders.train", "scale_pairs", "tokens_seen", "test.search/recall@100", one_minus=True,
                       x_label="click pairs seen", y_label="1 - image-search recall@100"),
    "sim_negatives": Study("encoders.train", "scale_negatives", "seen.negatives_per_query.click",
                           "test.search/recall@100", one_minus=True,
                           x_label="negatives per query (batch + queue)", y_label="1 - image-search recall@100"),
}


# ----------------------------------------------------------------------------------------------
# run folders

def get_path(d: dict, path: str):
    """``d["a"]["b"]`` for ``"a.b"`` (keys may hold '/'); None when missing."""
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def collect(dirs: list[Path], x: str, y: str, one_minus: bool = False) -> tuple[list[dict], list[dict]]:
    """Runs under ``dirs``: ([{x, L, seed, dir, wall_seconds, train_flops}], [failed runs])."""
    runs, failed = [], []
    for d in dirs:
        if not Path(d).exists():
            raise FileNotFoundError(f"{d}: no such run folder")
        for f in sorted(Path(d).rglob("failed.json")):
            if not (f.parent / "metrics.json").exists():
                info = json.loads(f.read_text())
                failed.append({"dir": str(f.parent), "error": info.get("error"), "axes": info.get("axes"),
                               "seed": info.get("seed")})
        for f in sorted(Path(d).rglob("metrics.json")):
            m = json.loads(f.read_text())
            xv, yv = get_path(m, x), get_path(m, y)
            if xv is None or yv is None:
                raise KeyError(f"{f}: lacks {x if xv is None else y!r} (is it a run of this study?)")
            L = 1.0 - float(yv) if one_minus else float(yv)
            if not (float(xv) > 0 and math.isfinite(L) and L > 0):
                raise ValueError(f"{f}: x={xv} and L={L} must both be positive and finite for a power law")
            runs.append({"x": float(xv), "L": L, "seed": m.get("seed"), "dir": str(f.parent),
                         "wall_seconds": m.get("wall_seconds"), "train_flops": m.get("train_flops"),
                         "parameters": m.get("parameters")})
    return runs, failed


# ----------------------------------------------------------------------------------------------
# the fit

def _profile(lx: np.ndarray, y: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each offset c: least squares of log(y - c) = log a - b log x; returns (a, b, sse in y)."""
    z = np.log(y[None, :] - c[:, None])                      # [C, n]
    xm, zm = lx.mean(), z.mean(1, keepdims=True)
    sxx = ((lx - xm) ** 2).sum()
    b = -((lx - xm)[None, :] * (z - zm)).sum(1) / sxx        # b < 0: L grows with x (reported as such)
    loga = zm[:, 0] + b * xm
    pred = np.exp(loga[:, None] - b[:, None] * lx[None, :]) + c[:, None]
    return np.exp(loga), b, ((y[None, :] - pred) ** 2).sum(1)


def fit_power_law(x, y, offset: bool = True) -> dict:
    """Least-squares fit of ``L = a * x^-b + c`` (``c = 0`` when ``offset`` is false); needs at
    least 3 distinct positive x and positive L. Returns a, b, c, r2 and the sse."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(np.unique(x)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct x values, got {sorted(set(x.tolist()))}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("x and L must be positive")
    lx = np.log(x)
    if offset:
        ymin = y.min()
        c = ymin * (1.0 - np.geomspace(1e-4, 1.0, 400))  # from just below min(L) down to 0
        a, b, sse = _profile(lx, y, c)
        i = int(np.argmin(sse))
        lo, hi = c[max(i - 1, 0)], c[min(i + 1, len(c) - 1)]
        lo, hi = min(lo, hi), max(lo, hi)
        g = (math.sqrt(5) - 1) / 2
        for _ in range(40):  # golden section on the profile between the grid neighbours
            m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
            s1, s2 = _profile(lx, y, np.array([m1, m2]))[2]
            if s1 < s2:
                hi = m2
            else:
                lo = m1
        cs = np.array([c[i], (lo + hi) / 2])
        a2, b2, sse2 = _profile(lx, y, cs)
        j = int(np.argmin(sse2))
        a_, b_, c_, s_ = a2[j], b2[j], cs[j], sse2[j]
    else:
        a1, b1, s1 = _profile(lx, y, np.array([0.0]))
        a_, b_, c_, s_ = a1[0], b1[0], 0.0, s1[0]
    sst = ((y - y.mean()) ** 2).sum()
    return {"a": float(a_), "b": float(b_), "c": float(c_), "sse": float(s_),
            "r2": float(1 - s_ / sst) if sst > 0 else float("nan")}


def predict(f: dict, x) -> np.ndarray:
    return f["a"] * np.asarray(x, np.float64) ** -f["b"] + f["c"]


def bootstrap(x, y, n_boot: int = 1000, offset: bool = True, seed: int = 0, at=None) -> dict:
    """Case bootstrap over the runs: percentile 95 % intervals of a, b, c (and of the prediction
    at the points ``at``)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    draws, preds = [], []
    tries = 0
    while len(draws) < n_boot and tries < 20 * n_boot:
        tries += 1
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) < 3:
            continue
        f = fit_power_law(x[i], y[i], offset)
        draws.append((f["a"], f["b"], f["c"]))
        if at is not None:
            preds.append(predict(f, at))
    d = np.asarray(draws)
    out = {k: [float(np.percentile(d[:, j], 2.5)), float(np.percentile(d[:, j], 97.5))]
           for j, k in enumerate(("a", "b", "c"))}
    out["n"] = len(draws)
    if at is not None:
        p = np.asarray(preds)
        out["prediction"] = [[float(np.percentile(p[:, j], 2.5)), float(np.percentile(p[:, j], 97.5))]
                             for j in range(p.shape[1])]
    return out


def analyse(runs: list[dict], holdout: int = 1, n_boot: int = 1000, offset: bool = True) -> dict:
    """The full-data fit with bootstrap intervals, and the extrapolation check."""
    x = np.array([r["x"] for r in runs])
    y = np.array([r["L"] for r in runs])
    levels = np.unique(x)
    fit = fit_power_law(x, y, offset)
    fit["ci"] = bootstrap(x, y, n_boot, offset)
    out = {"fit": fit, "levels": []}
    for v in levels:
        ys = y[x == v]
        out["levels"].append({"x": float(v), "n": int(len(ys)), "mean": float(ys.mean()),
                              "std": float(ys.std(ddof=1)) if len(ys) > 1 else 0.0,
                              "fit": float(predict(fit, v))})
    # R² over the per-x means: how much of the trend the law explains, seed noise averaged out
    mu = np.array([lv["mean"] for lv in out["levels"]])
    res_m = ((mu - np.array([lv["fit"] for lv in out["levels"]])) ** 2).sum()
    sst_m = ((mu - mu.mean()) ** 2).sum()
    fit["r2_means"] = float(1 - res_m / sst_m) if sst_m > 0 else float("nan")
    if holdout and len(levels) - holdout >= 3:
        held = levels[-holdout:]
        keep = x < held[0]
        sub = fit_power_law(x[keep], y[keep], offset)
        sub["ci"] = bootstrap(x[keep], y[keep], n_boot, offset, at=held)
        rows = []
        for j, v in enumerate(held):
            meas = float(y[x == v].mean())
            pred = float(predict(sub, v))
            lo, hi = sub["ci"]["prediction"][j]
            rows.append({"x": float(v), "measured": meas, "predicted": pred, "abs_error": pred - meas,
                         "rel_error": (pred - meas) / meas, "interval": [lo, hi], "inside": lo <= meas <= hi})
        out["extrapolation"] = {"fit": sub, "held_out": rows}
    return out


# ----------------------------------------------------------------------------------------------
# reporting

def _fmt(v: float) -> str:
    return f"{v:.4g}"


def markdown(name: str, study: Study | None, res: dict, runs: list[dict], failed: list[dict]) -> str:
    f = res["fit"]
    ci = f["ci"]
    xl = study.x_label if study else "x"
    yl = study.y_label if study else "L"
    lines = [f"### {name}: L = {yl}, x = {xl}", "",
             f"L(x) = a·x^(−b) + c with a = {_fmt(f['a'])} [{_fmt(ci['a'][0])}, {_fmt(ci['a'][1])}], "
             f"**b = {_fmt(f['b'])} [{_fmt(ci['b'][0])}, {_fmt(ci['b'][1])}]**, "
             f"c = {_fmt(f['c'])} [{_fmt(ci['c'][0])}, {_fmt(ci['c'][1])}] "
             f"(95 % bootstrap intervals, {ci['n']} resamples); R² = {f['r2']:.3f} over the runs, "
             f"{f['r2_means']:.3f} over the per-x means; "
             f"{len(runs)} runs over {len(res['levels'])} points"
             + (f", {len(failed)} failed" if failed else "") + ".", "",
             "| x | runs | L mean ± std | fit |", "|---|---|---|---|"]
    for lv in res["levels"]:
        lines.append(f"| {_fmt(lv['x'])} | {lv['n']} | {lv['mean']:.4f} ± {lv['std']:.4f} | {lv['fit']:.4f} |")
    ex = res.get("extrapolation")
    if ex:
        s = ex["fit"]
        lines += ["", f"Extrapolation: fitted on x < {_fmt(ex['held_out'][0]['x'])} "
                      f"(b = {_fmt(s['b'])}, c = {_fmt(s['c'])}, R² = {s['r2']:.3f}), predicting the held-out "
                      f"largest point(s):", "",
                  "| x | measured | predicted | error | relative | 95 % interval | inside |",
                  "|---|---|---|---|---|---|---|"]
        for r in ex["held_out"]:
            lines.append(f"| {_fmt(r['x'])} | {r['measured']:.4f} | {r['predicted']:.4f} | {r['abs_error']:+.4f} | "
                         f"{100 * r['rel_error']:+.2f} % | [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}] | "
                         f"{'yes' if r['inside'] else 'no'} |")
    walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds")]
    if walls:
        lines += ["", f"Compute: {sum(walls):.0f} s of run wall time in all"
                      + (f", {sum(r['train_flops'] or 0 for r in runs):.3g} training FLOPs" if any(
                          r.get("train_flops") for r in runs) else "") + "."]
    for fl in failed:
        lines.append(f"- failed: {fl['dir']} (axes {fl['axes']}, seed {fl['seed']}): {fl['error']}")
    return "\n".join(lines) + "\n"


def plot(name: str, study: Study | None, res: dict, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    x = np.array([r["x"] for r in runs])
    y = np.array([r["L"] for r in runs])
    ax.scatter(x, y, s=14, alpha=0.5, color="C0", label="runs")
    lv = res["levels"]
    ax.errorbar([v["x"] for v in lv], [v["mean"] for v in lv], yerr=[v["std"] for v in lv], fmt="o",
                color="C0", ms=4, capsize=2)
    grid = np.geomspace(x.min(), x.max(), 200)
    f = res["fit"]
    ax.plot(grid, predict(f, grid), color="C1", label=f"fit: b={f['b']:.3g}, c={f['c']:.3g}")
    ax.axhline(f["c"], color="C1", ls=":", lw=0.8)
    ex = res.get("extrapolation")
    if ex:
        s = ex["fit"]
        ax.plot(grid, predict(s, grid), color="C2", ls="--", label="fit without the largest x")
        for r in ex["held_out"]:
            ax.plot([r["x"]], [r["measured"]], marker="s", mfc="none", color="C2", ms=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain major labels; minor labels would overlap
        axis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter() if y.max() / y.min() < 10 else NullFormatter())
    ax.set_xlabel(study.x_label if study else "x")
    ax.set_ylabel(study.y_label if study else "L")
    ax.set_title(name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(name: str, study: Study | None, dirs: list[Path], out: Path, x: str, y: str, one_minus: bool,
           holdout: int, n_boot: int, offset: bool = True) -> dict:
    runs, failed = collect(dirs, x, y, one_minus)
    if not runs:
        raise RuntimeError(f"{name}: no finished runs under {[str(d) for d in dirs]} "
                           f"({len(failed)} failed)")
    res = analyse(runs, holdout, n_boot, offset)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(name, study, res, runs, failed)
    (out / f"{name}.md").write_text(md)
    plot(name, study, res, runs, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps({"study": name, "x": x, "y": y, "one_minus": one_minus,
                                                  "runs": runs, "failed": failed, **res}, indent=1))
    print(md)
    print(f"wrote {out / (name + '.md')}, {name}.png, {name}.json")
    return res


def index(out: Path) -> str:
    """``<out>/summary.md``: one row per study fitted there (its exponent, fit quality, extrapolation
    error and compute), rebuilt from the studies' json files."""
    rows = ["| study | x | L | points, runs | b [95 % CI] | c [95 % CI] | R² (runs, means) | extrapolation error | "
            "run wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*.json")):
        d = json.loads(f.read_text())
        if "fit" not in d or "study" not in d:
            continue
        st = STUDIES.get(d["study"])
        fit, ci = d["fit"], d["fit"]["ci"]
        ex = d.get("extrapolation", {}).get("held_out") or []
        exs = ", ".join(f"{100 * r['rel_error']:+.1f} % at {_fmt(r['x'])}" for r in ex) or "-"
        wall = sum(r.get("wall_seconds") or 0 for r in d["runs"])
        rows.append(f"| [{d['study']}]({d['study']}.md) | {st.x_label if st else d['x']} | "
                    f"{st.y_label if st else d['y']} | {len(d['levels'])}, {len(d['runs'])} | "
                    f"{_fmt(fit['b'])} [{_fmt(ci['b'][0])}, {_fmt(ci['b'][1])}] | "
                    f"{_fmt(fit['c'])} [{_fmt(ci['c'][0])}, {_fmt(ci['c'][1])}] | "
                    f"{fit['r2']:.2f}, {fit.get('r2_means', float('nan')):.2f} | {exs} | "
                    f"{wall / 60:.1f} min |")
    text = "\n".join(rows) + "\n"
    (out / "summary.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------------------
# running a sweep

def latest_sweep(d: Path) -> Path:
    """The newest sweep folder under ``<runs-root>/<study>`` (``run`` names them by start time)."""
    subs = sorted(p for p in Path(d).glob("*") if p.is_dir())
    if not subs:
        raise FileNotFoundError(f"{d}: no sweep folders (run the study first, or pass --runs)")
    return subs[-1]


def sweep(name: str, study: Study, runs_dir: Path, seeds, launcher: str, extra: list[str]) -> int:
    """``python -m <entry> -m experiment=<preset> seed=<seeds> hydra.sweep.dir=<runs_dir>``; returns
    the exit status (non-zero when a job failed: the others still ran)."""
    cmd = [sys.executable, "-m", study.entry, "-m", f"experiment={study.preset}",
           f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={runs_dir}", "trainer.enable_progress_bar=false",
           *extra]
    if launcher != "basic":
        cmd.append(f"hydra/launcher={launcher}")
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ}
    env.setdefault("WANDB_MODE", "offline")
    return subprocess.call(cmd, cwd=ROOT, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the studies")
    for c in ("run", "fit"):
        p = sub.add_parser(c)
        p.add_argument("study", help=f"one of {sorted(STUDIES)}, all" + ("" if c == "run" else ", or a custom name"))
        p.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling",
                       help="where the table, plot and fit go")
        p.add_argument("--runs-root", type=Path, default=ROOT / "multirun" / "scaling",
                       help="the sweeps' run folders: <runs-root>/<study>/<start time>")
        p.add_argument("--holdout", type=int, default=1, help="largest x values held out for extrapolation")
        p.add_argument("--bootstrap", type=int, default=1000)
        p.add_argument("--no-offset", action="store_true", help="fit a pure power law (c = 0)")
        if c == "run":
            p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the study's (0 1, or 0 1 2)")
            p.add_argument("--launcher", default="basic",
                           help="basic, local_parallel (joblib), submitit_local, slurm (conf/hydra/launcher/)")
        else:
            p.add_argument("--runs", type=Path, nargs="+",
                           help="run folders (default: the newest sweep under <runs-root>/<study>)")
            p.add_argument("--x", help="dotted metrics.json path of x (custom studies)")
            p.add_argument("--y", help="dotted metrics.json path of the loss")
            p.add_argument("--one-minus", action="store_true", help="L = 1 - y")
    argv, extra = split_overrides(sys.argv[1:] if argv is None else argv)  # Hydra overrides after "--"
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for k, s in STUDIES.items():
            print(f"{k:16s} {s.entry} experiment={s.preset}   x={s.x}   L={'1 - ' if s.one_minus else ''}{s.y}")
        return 0
    names = list(STUDIES) if args.study == "all" else [args.study]
    status = 0
    for name in names:
        study = STUDIES.get(name)
        if args.cmd == "run":
            if study is None:
                raise SystemExit(f"unknown study {name!r}; known: {sorted(STUDIES)}")
            runs_dir = (args.runs_root / name / time.strftime("%Y%m%d-%H%M%S")).resolve()
            t0 = time.perf_counter()
            rc = sweep(name, study, runs_dir, args.seeds or study.seeds, args.launcher, extra)
            print(f"[{name}] sweep finished in {time.perf_counter() - t0:.0f} s (exit status {rc})", flush=True)
            status = status or rc
            dirs = [runs_dir]
            x, y, one_minus = study.x, study.y, study.one_minus
        else:
            dirs = args.runs or [latest_sweep(args.runs_root / name)]
            x = args.x or (study.x if study else None)
            y = args.y or (study.y if study else None)
            if x is None or y is None:
                raise SystemExit(f"custom study {name!r}: give --x and --y")
            one_minus = args.one_minus or (study.one_minus if study else False)
        report(name, study, dirs, args.out, x, y, one_minus, args.holdout, args.bootstrap, not args.no_offset)
    print(index(args.out))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
