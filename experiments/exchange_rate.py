"""The exchange rate: downstream CTR gain per unit of an intermediate encoder metric.

    python experiments/exchange_rate.py [--runs DIR ...] [--tables FP ...] [--seeds 0]
        [--k 10] [--out outputs/exchange_rate] [-- CTR Hydra overrides]

Encoder variants are exported item tables: ``--tables`` names them by fingerprint (in
``$CTR_EMBED_DIR``), ``--runs`` takes encoder run folders and uses every table each one exported
(with ``export_epochs=true``: the table before training and after each epoch, i.e. checkpoints
along training; otherwise its final table). Without either, the script first trains the
pipeline's two encoder stages itself with ``export_epochs=true`` (pretrain from the ImageNet
Lite0, then click post-training; folders under ``<out>/encoders/``, reused when present): the
ImageNet encoder and every epoch of both stages are the variants. For each variant it measures,
from the table alone,

* image-search recall@K on the simulator's test clicks (query image -> the items clicked for it,
  among the whole catalogue): the intermediate metric of MOON;
* linear-probe accuracy of the item's category and colour (a logistic regression on half of the
  items, scored on the other half): other intermediate metrics to compare with;

and trains the image-aware CTR model (``sim_din_visual`` by default, ``--preset``) on it for each
seed, reading its test GAUC and AUC on the uniform-random exposure log. It then fits, for each
intermediate metric x, the least-squares line GAUC = a + b x over the variants: the slope ``b``
(the exchange rate: GAUC points per unit of x) with its 95 % confidence interval (t distribution,
n - 2 degrees of freedom) and the correlation. Results: ``<out>/exchange_rate.md`` (the tables)
and ``<out>/exchange_rate.png`` (the scatter plots with the fitted lines). CTR runs are pipeline
stages, ``<out>/ctr-<table>-seed<k>-<fingerprint>/``, reused while their config is unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ctr  # noqa: E402,F401  (the torchvision import hook)
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from ctr.runs import split_overrides  # noqa: E402


# ----------------------------------------------------------------------------------------------
# variants


def collect_tables(runs: list[Path], tables: list[str]) -> list[dict]:
    out = [{"fingerprint": t, "origin": "given"} for t in tables]
    for r in runs:
        m = json.loads((Path(r) / "metrics.json").read_text())
        name = f"{m.get('experiment')}-seed{m.get('seed')}"
        for t in m.get("epoch_tables") or []:
            out.append({"fingerprint": t["fingerprint"], "origin": f"{name} epoch {t['epoch']}"})
        final = m["embeddings"]["fingerprint"]
        if final not in {t["fingerprint"] for t in out}:
            out.append({"fingerprint": final, "origin": f"{name} final"})
    seen, uniq = set(), []
    for t in out:
        if t["fingerprint"] not in seen:
            seen.add(t["fingerprint"])
            uniq.append(t)
    return uniq


# ----------------------------------------------------------------------------------------------
# intermediate metrics from a table


class SimTruth:
    """The simulator's catalogue and test clicks, loaded once (the default data, seed 0)."""

    def __init__(self, preset: str = "default", seed: int = 0):
        from ctr.data.sources.simulator import SimConfig, simulate
        from encoders.data import ClickLog, ItemSet
        from encoders.evaluate import SearchQueries

        d = simulate(SimConfig.preset(preset, seed=seed))
        self.item_ids = d.items["item_id"].to_numpy()
        n = len(self.item_ids)
        # ClickLog needs an ItemSet only for its item rows: no images are decoded here
        items = ItemSet(name="sim", item_ids=self.item_ids, images=np.zeros((n, 3, 1, 1), np.uint8),
                        titles=None, category=np.zeros(n, np.int64), group=np.arange(n),
                        split=np.full(n, "train"))
        clicks = ClickLog.from_events(d.events, items, source="simulator.events")
        q, off, rel = clicks.queries["test"]
        self.queries = SearchQueries(q, off, rel, np.arange(n))
        truth = d.item_truth.sort("item_id")
        assert (truth["item_id"].to_numpy() == np.sort(self.item_ids)).all()
        order = np.argsort(self.item_ids)
        self.labels = {}
        for name, col in (("category", "category_idx"), ("colour", "colour_idx")):
            lab = np.empty(n, np.int64)
            lab[order] = truth[col].to_numpy()
            self.labels[name] = lab
        self.probe_train = (np.arange(n) * 2654435761 % 1000) < 500  # a fixed half of the items

    def embeddings(self, fingerprint: str, embeddings_dir: Path) -> torch.Tensor:
        from encoders.export import load_embeddings

        ids, emb = load_embeddings(fingerprint, embeddings_dir)
        pos = {int(i): k for k, i in enumerate(ids)}
        missing = [int(i) for i in self.item_ids if int(i) not in pos]
        if missing:
            raise ValueError(f"table {fingerprint} lacks {len(missing)} simulator items, e.g. {missing[0]}")
        return torch.from_numpy(emb[[pos[int(i)] for i in self.item_ids]])

    def recall(self, emb: torch.Tensor, k: int) -> float:
        from encoders.evaluate import search_recall

        return float(search_recall(emb, self.queries, ks=(k,))[f"recall@{k}"])

    def probe(self, emb: torch.Tensor, name: str) -> float:
        """Accuracy of a multinomial logistic regression (L-BFGS, L2 1e-3) on the held-out half."""
        y = torch.from_numpy(self.labels[name])
        tr = torch.from_numpy(self.probe_train)
        x = torch.nn.functional.normalize(emb.float(), dim=-1)
        x = (x - x[tr].mean(0)) / x[tr].std(0).clamp_min(1e-6)
        n_cls = int(y.max()) + 1
        w = torch.zeros(x.shape[1], n_cls, requires_grad=True)
        b = torch.zeros(n_cls, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[tr] @ w + b, y[tr]) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return float(((x[~tr] @ w + b).argmax(1) == y[~tr]).float().mean())


# ----------------------------------------------------------------------------------------------
# the CTR model on a table


def ctr_run(pipe, table: str, seed: int, preset: str, overrides: list[str]) -> dict:
    """The CTR model on one table: a pipeline stage (``<out>/ctr-<table>-seed<k>-<fingerprint>``,
    reused when its resolved config is unchanged)."""
    from ctr.pipeline import CONF
    from ctr.train import train

    cfg = pipe.stage_config(CONF, [f"experiment={preset}", f"seed={seed}", f"model.visual.table={table}",
                                   *overrides])
    return pipe.run_stage(f"ctr-{table}-seed{seed}", cfg, {"table": table}, train)[0]


# ----------------------------------------------------------------------------------------------
# the fit


# two-sided 95 % quantiles of Student's t, t_{0.975, dof}, dof = 1..30 (beyond: the normal's 1.960)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def fit_slope(x: list[float], y: list[float]) -> dict:
    """Least squares y = a + b x: slope, its standard error and 95 % CI (t, n - 2 dof), Pearson r."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    n = len(xa)
    if n < 3 or np.ptp(xa) == 0:
        return {"n": n, "slope": float("nan"), "se": float("nan"), "ci": (float("nan"), float("nan")),
                "r": float("nan"), "intercept": float("nan")}
    xm, ym = xa.mean(), ya.mean()
    sxx = ((xa - xm) ** 2).sum()
    b = ((xa - xm) * (ya - ym)).sum() / sxx
    a = ym - b * xm
    resid = ya - (a + b * xa)
    se = math.sqrt((resid ** 2).sum() / (n - 2) / sxx)
    t = T975[n - 3] if n - 2 <= len(T975) else 1.960
    r = float(np.corrcoef(xa, ya)[0, 1]) if np.ptp(ya) > 0 else float("nan")
    return {"n": n, "slope": float(b), "se": se, "ci": (float(b - t * se), float(b + t * se)), "r": r,
            "intercept": float(a)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", type=Path, default=[])
    ap.add_argument("--tables", nargs="*", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--preset", default="sim_din_visual")
    ap.add_argument("--sim-preset", default="default", help="the simulator's size preset (tiny: a smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every stage")
    ap.add_argument("--encoders", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides of the encoder stages it trains (without --runs/--tables)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "exchange_rate")
    argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    emb_dir = Path(os.environ.get("CTR_EMBED_DIR", ROOT / ".cache" / "embeddings"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from ctr.pipeline import Pipeline

    cache = Path(os.environ.get("CTR_CACHE_DIR", ROOT / ".cache" / "prepared"))
    enc = ["export_epochs=true", f"data.module.source.preset={args.sim_preset}", *args.encoders]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    runs = list(args.runs)
    if not runs and not args.tables:  # train the variants: both encoder stages, a table per epoch
        enc_pipe = Pipeline(out / "encoders", cache, emb_dir, enc, [], args.threads, "csv", log=log)
        stages = enc_pipe.encoders(args.seeds[0])
        runs = [Path(stages[n]["run_dir"]) for n in ("pretrain", "posttrain")]
    variants = collect_tables(runs, args.tables)
    if len(variants) < 3:
        raise SystemExit(f"need at least 3 encoder variants for a slope with a confidence interval, got "
                         f"{len(variants)} (export_epochs=true gives one per epoch)")
    truth = SimTruth(args.sim_preset)
    overrides = [f"data.source.preset={args.sim_preset}", *overrides]
    pipe = Pipeline(out, cache, emb_dir, [], [], args.threads, "csv", log=log)
    rec_key = f"recall@{args.k}"
    rows, missing = [], []  # a variant whose metrics or CTR runs fail is a missing point, not a crash
    t0 = time.perf_counter()
    for v in variants:
        row, errors = measure(v, truth, emb_dir, rec_key, args.k, pipe, args.seeds, args.preset, overrides)
        if row is None:
            missing.append({**v, "errors": errors})
            log(f"{v['origin']} ({v['fingerprint']}): MISSING: {'; '.join(errors)}")
            continue
        rows.append({**row, "errors": errors})
        print(f"{v['origin']} ({v['fingerprint']}): {rec_key} {row[rec_key]:.4f}, GAUC {row['gauc']:.4f} "
              f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    metrics = [rec_key, "category probe", "colour probe"]
    lines = [f"Encoder variants ({len(rows)}), CTR preset `{args.preset}`, seeds {args.seeds}; "
             f"GAUC and AUC on the uniform-random exposure log's test.", "",
             "| variant | table | " + " | ".join(metrics) + " | random GAUC | random AUC |",
             "|---|---|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        lines.append(f"| {r['origin']} | {r['fingerprint']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics)
                     + f" | {r['gauc']:.4f} | {r['auc']:.4f} |")
    fits = {m: fit_slope([r[m] for r in rows], [r["gauc"] for r in rows]) for m in metrics}
    lines += ["", "| intermediate metric x | exchange rate dGAUC/dx | 95 % CI | r | n |", "|---|---|---|---|---|"]
    for m, f in fits.items():
        lines.append(f"| {m} | {f['slope']:.4f} | [{f['ci'][0]:.4f}, {f['ci'][1]:.4f}] | {f['r']:.3f} | {f['n']} |")
    partial = [f"- {r['origin']} ({r['fingerprint']}): " + "; ".join(r["errors"]) for r in rows if r["errors"]]
    if missing or partial:
        lines += ["", f"Missing points ({len(missing)} of {len(variants)} variants; the fits use the others):"]
        lines += [f"- {m['origin']} ({m['fingerprint']}): " + "; ".join(m["errors"]) for m in missing]
        if partial:
            lines += ["", "Variants averaged over fewer seeds (a run failed):", *partial]
    text = "\n".join(lines)
    (out / "exchange_rate.md").write_text(text + "\n")
    (out / "exchange_rate.json").write_text(json.dumps({"rows": rows, "fits": fits, "missing": missing}, indent=1))
    if rows:
        plot(rows, fits, metrics, out / "exchange_rate.png")
    print(text)
    print(f"\nwrote {out / 'exchange_rate.md'} and {out / 'exchange_rate.png'}")
    return {"rows": rows, "fits": fits, "missing": missing}


def measure(v: dict, truth, emb_dir: Path, rec_key: str, k: int, pipe, seeds, preset: str,
            overrides: list[str]) -> tuple[dict | None, list[str]]:
    """One variant's intermediate metrics and its CTR GAUC/AUC (mean over the seeds that ran);
    (None, errors) when its table cannot be read or every CTR run failed."""
    try:
        emb = truth.embeddings(v["fingerprint"], emb_dir)
        row = {**v, rec_key: truth.recall(emb, k),
               "category probe": truth.probe(emb, "category"), "colour probe": truth.probe(emb, "colour")}
    except Exception as e:  # noqa: BLE001  (reported as a missing point)
        return None, [f"table: {type(e).__name__}: {e}"]
    ms, errors = [], []
    for s in seeds:
        try:
            ms.append(ctr_run(pipe, v["fingerprint"], s, preset, overrides))
        except Exception as e:  # noqa: BLE001  (the run folder keeps failed.json)
            errors.append(f"CTR seed {s}: {type(e).__name__}: {e}")
    if not ms:
        return None, errors
    row["gauc"] = statistics.mean(m["test_random"]["gauc"] for m in ms)
    row["auc"] = statistics.mean(m["test_random"]["auc"] for m in ms)
    row["seeds"] = len(ms)
    return row, errors


def plot(rows: list[dict], fits: dict, metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), sharey=True)
    y = [r["gauc"] for r in rows]
    for ax, m in zip(axes, metrics):
        x = [r[m] for r in rows]
        ax.scatter(x, y, s=24)
        f = fits[m]
        if math.isfinite(f["slope"]):
            xs = np.linspace(min(x), max(x), 20)
            ax.plot(xs, f["intercept"] + f["slope"] * xs, lw=1)
            ax.set_title(f"slope {f['slope']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]", fontsize=9)
        ax.set_xlabel(m)
    axes[0].set_ylabel("CTR GAUC (random log)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(1 if main()["missing"] else 0)
