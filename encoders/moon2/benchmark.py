"""A multi-direction product retrieval benchmark in the spirit of MBE2.0, on held-out products.

``python -m encoders.moon2.benchmark RUN_DIR [RUN_DIR ...]`` prints the full table of trained runs
(evaluating each run's best checkpoint once; the result is kept in the run's ``benchmark.json``).

For every source (H&M: held-out products; Fashion Product Images: a held-out split, never trained
on), over the test items, in every direction ``q2c`` for query and candidate modality in text,
image and multimodal (image + text); Recall@K is the share of queries with a relevant candidate in
the top K:

* **variant search** (``variant/<q2c>``; H&M only): the relevant candidates are the *other* items
  of the query's product (its colour variants); the query's own item is never a candidate, in any
  form, so no direction can be solved by recognising the query's own image or text inside a
  multimodal candidate. Only queries whose product has another test item count.
* **item retrieval** (``item/<q2c>``, cross-modal directions only): the query item's own other
  form is relevant (and, on H&M, its product's other items): classic image-text retrieval and its
  multimodal extensions; a multimodal embedding that keeps both modalities scores high here.
* **zero-shot product-type classification** (``zs_image``, ``zs_mm``): each type name, embedded as a
  text, is a class; an item's image or multimodal embedding picks the nearest. Accuracy.
* **attribute prediction by a linear probe** (``probe_colour``, ``probe_garment``) on frozen
  multimodal embeddings: multinomial logistic regression fitted on the source's training items,
  accuracy on the test items.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from encoders.moon2.fusion import MODALITIES

__all__ = ["retrieval", "zero_shot", "linear_probe", "embed_rows", "run_benchmark", "format_benchmark"]

KS = (1, 5, 10)
SHORT = {"text": "t", "image": "i", "mm": "mm"}


def direction(q: str, c: str) -> str:
    return f"{SHORT[q]}2{SHORT[c]}"


@torch.no_grad()
def retrieval(emb: dict[str, Tensor], group: np.ndarray, directions=None, ks=KS, exclude_self: str = "same",
              chunk: int = 1024) -> dict[str, float]:
    """``{"<q>2<c>/r@K": recall}`` over row-aligned normalised embeddings per modality. Relevant: the
    rows of the query's ``group``. ``exclude_self``: ``"same"`` leaves the query's own row out of
    the gallery in same-modality directions only, ``"all"`` in every direction. Queries without a
    relevant candidate are not counted; a direction without any gives NaN."""
    if exclude_self not in ("same", "all"):
        raise ValueError(f"exclude_self must be 'same' or 'all', got {exclude_self!r}")
    directions = directions or [(q, c) for q in MODALITIES for c in MODALITIES]
    g = torch.as_tensor(np.asarray(group))
    n = len(g)
    out = {}
    for q, c in directions:
        drop_self = exclude_self == "all" or q == c
        hits = {k: 0 for k in ks}
        counted = 0
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            sim = emb[q][lo:hi] @ emb[c].T
            rel = g[lo:hi, None] == g[None, :]
            if drop_self:
                idx = torch.arange(lo, hi)
                sim[idx - lo, idx] = float("-inf")
                rel[idx - lo, idx] = False
            ok = rel.any(1)
            top = sim.topk(min(max(ks), n), dim=1).indices
            found = torch.gather(rel, 1, top)
            for k in ks:
                hits[k] += int((found[:, :k].any(1) & ok).sum())
            counted += int(ok.sum())
        for k in ks:
            out[f"{direction(q, c)}/r@{k}"] = hits[k] / counted if counted else float("nan")
    return out


CROSS = [(q, c) for q in MODALITIES for c in MODALITIES if q != c]


@torch.no_grad()
def zero_shot(emb: Tensor, labels: np.ndarray, class_emb: Tensor, class_names: list[str]) -> float:
    """Top-1 accuracy of nearest-class-text classification."""
    pred = (emb @ class_emb.T).argmax(1).numpy()
    names = np.asarray(class_names)
    return float((names[pred] == np.asarray(labels)).mean())


def linear_probe(train_x: Tensor, train_y: np.ndarray, test_x: Tensor, test_y: np.ndarray,
                 weight_decay: float = 1e-4, iters: int = 200) -> float:
    """Multinomial logistic regression (L-BFGS, L2 ``weight_decay``) on frozen features; accuracy on
    the test rows (a test label never seen in training counts as an error)."""
    classes, y = np.unique(np.asarray(train_y), return_inverse=True)
    x = train_x.float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], len(classes))
    target = torch.from_numpy(y)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), target) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = classes[lin((test_x.float() - mu) / sd).argmax(1).numpy()]
    return float((pred == np.asarray(test_y)).mean())


@torch.no_grad()
def embed_rows(module, tokens, rows: np.ndarray, modalities=MODALITIES, chunk: int = 512) -> dict[str, Tensor]:
    """Normalised embeddings of ``rows`` in each modality (the module in eval mode)."""
    from encoders.moon2.data import TokenChunks

    was = module.training
    module.eval()
    parts: dict[str, list[Tensor]] = {m: [] for m in modalities}
    ds = TokenChunks(rows, tokens, chunk)
    for i in range(len(ds)):
        for m, e in module.embed_modalities(ds[i], modalities).items():
            parts[m].append(e.cpu())
    module.train(was)
    return {m: torch.cat(v) if v else torch.zeros(0, 1) for m, v in parts.items()}


@torch.no_grad()
def run_benchmark(module, sources: dict, prompts: dict) -> dict[str, dict[str, float]]:
    """``sources``: name -> (Products, TokenSet); ``prompts``: name -> (class names, text tokens,
    mask) of the product types. Returns name -> metrics. The module is scored in eval mode."""
    was = module.training
    module.eval()
    try:
        return _run_benchmark(module, sources, prompts)
    finally:
        module.train(was)


def _run_benchmark(module, sources: dict, prompts: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name, (products, tokens) in sources.items():
        items = products.items
        test, train = items.rows("test"), items.rows("train")
        if len(test) == 0 or len(train) == 0:
            warnings.warn(f"benchmark source {name}: {len(train)} training and {len(test)} test items; "
                          "nothing to score", stacklevel=2)
            out[name] = {"n_test": float(len(test))}
            continue
        emb = embed_rows(module, tokens, test)
        res = {f"variant/{k}": v for k, v in retrieval(emb, items.group[test], exclude_self="all").items()}
        res.update({f"item/{k}": v for k, v in retrieval(emb, items.group[test], directions=CROSS).items()})
        names, ptext, pmask = prompts[name]
        cls, _ = module.embed(text=torch.from_numpy(np.array(ptext, np.float32)), mask=torch.from_numpy(np.array(pmask)))
        types = products.attrs["type"][test]
        res["zs_image/acc"] = zero_shot(emb["image"], types, cls.float(), names)
        res["zs_mm/acc"] = zero_shot(emb["mm"], types, cls.float(), names)
        tr = embed_rows(module, tokens, train, modalities=("mm",))["mm"]
        for attr in ("colour", "garment"):
            res[f"probe_{attr}/acc"] = linear_probe(tr, products.attrs[attr][train], emb["mm"],
                                                    products.attrs[attr][test])
        res["n_test"] = float(len(test))
        out[name] = res
    return out


def format_benchmark(results: dict[str, dict[str, dict[str, float]]], ks=KS) -> str:
    """Per source: the variant-search and item-retrieval blocks (rows = directions, columns =
    models x R@K), then classification and probes. ``results``: model -> source -> metrics (values
    may be ``"mean ± std"`` strings). Rows without any value are left out."""
    models = list(results)
    sources = list(dict.fromkeys(s for r in results.values() for s in r))
    lines = []

    def cell(v) -> str:
        if isinstance(v, str):
            return v
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"

    for s in sources:
        lines.append(f"\n### {s} (test items: {int(_first(results, s, 'n_test') or 0)})\n")
        for proto, dirs in (("variant", [(q, c) for q in MODALITIES for c in MODALITIES]), ("item", CROSS)):
            rows = []
            for q, c in dirs:
                d = direction(q, c)
                vals = [cell(results[m].get(s, {}).get(f"{proto}/{d}/r@{k}")) for m in models for k in ks]
                if any(vals):
                    rows.append(f"| {proto} {d} | " + " | ".join(vals) + " |")
            if rows:
                lines += ["| direction | " + " | ".join(f"{m} R@{k}" for m in models for k in ks) + " |",
                          "|" + "---|" * (1 + len(models) * len(ks)), *rows, ""]
        lines += ["| task (accuracy %) | " + " | ".join(models) + " |", "|" + "---|" * (1 + len(models))]
        for key, label in (("zs_image/acc", "zero-shot type, image"), ("zs_mm/acc", "zero-shot type, multimodal"),
                           ("probe_colour/acc", "linear probe: colour"),
                           ("probe_garment/acc", "linear probe: garment group")):
            lines.append(f"| {label} | " + " | ".join(cell(results[m].get(s, {}).get(key)) for m in models) + " |")
    return "\n".join(lines).strip() + "\n"


def _first(results, source, key):
    for r in results.values():
        v = r.get(source, {}).get(key)
        if v is not None and not isinstance(v, str):
            return v
    return None


BENCHMARK_VERSION = 2


def evaluate_run(run_dir: str | Path, force: bool = False) -> dict:
    """The benchmark of a trained run (its best checkpoint, else its last), computed once and kept
    in ``<run>/benchmark.json`` (recomputed when the benchmark's definition has changed)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from encoders.moon2.datamodule import Moon2DataModule
    from encoders.moon2.module import Moon2Module

    run_dir = Path(run_dir)
    out = run_dir / "benchmark.json"
    if out.exists() and not force:
        saved = json.loads(out.read_text())
        if saved.get("version") == BENCHMARK_VERSION:
            return saved["benchmark"]
    ckpt = next((p for p in (run_dir / "checkpoints" / "best.ckpt", run_dir / "checkpoints" / "last.ckpt")
                 if p.exists()), None)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/best.ckpt or last.ckpt to evaluate")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    image_tower = instantiate(cfg.towers.image, _convert_="all")
    text_tower = instantiate(cfg.towers.text, _convert_="all")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = Moon2DataModule(image_tower, text_tower, image_size=cfg.image_size, cache_dir=cfg.paths.cache_dir,
                         seed=cfg.seed, coaug={"enabled": False}, **data)
    dm.setup()
    module = Moon2Module.load_from_checkpoint(str(ckpt), map_location="cpu")
    bench = run_benchmark(module, dm.sources, dm.prompts)
    out.write_text(json.dumps({"version": BENCHMARK_VERSION, "checkpoint": str(ckpt), "benchmark": bench},
                              indent=1, default=float))
    return bench


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    results = {}
    for d in argv:
        m = json.loads((Path(d) / "metrics.json").read_text())
        results[f"{m['experiment']} s{m['seed']}"] = evaluate_run(d)
    print(format_benchmark(results))


if __name__ == "__main__":
    main(sys.argv[1:])
