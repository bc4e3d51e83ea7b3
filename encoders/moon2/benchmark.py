"""A multi-direction product retrieval benchmark in the spirit of MBE2.0, on held-out products.

``python -m encoders.moon2.benchmark RUN_DIR [RUN_DIR ...]`` prints the full table of each trained
run (``encoders.moon2.train`` writes the same numbers into its ``metrics.json``).

For every source (H&M: held-out products; Fashion Product Images: a held-out split, never trained
on), over the test items:

* **retrieval in every direction** ``q2c`` for query and candidate modality in text, image and
  multimodal (image + text): Recall@K is the share of queries with a relevant candidate in the top
  K. Relevant: the items of the query's product (colour variants on H&M; on Fashion each item is its
  own product). For ``q == c`` the query itself is left out of the gallery and only queries with
  another item of their product count (none on Fashion: those cells are empty); for ``q != c`` the
  query item's own other form is a relevant candidate.
* **zero-shot product-type classification**: each type name, embedded as a text, is a class; an
  item's image (``zs_image``) or multimodal (``zs_mm``) embedding picks the nearest class. Accuracy.
* **attribute prediction by a linear probe** (colour, garment group) on frozen multimodal
  embeddings: multinomial logistic regression fitted on the source's training items, accuracy on the
  test items.
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
def retrieval(emb: dict[str, Tensor], group: np.ndarray, directions=None, ks=KS,
              chunk: int = 1024) -> dict[str, float]:
    """``{"<q>2<c>/r@K": recall}`` over row-aligned normalised embeddings per modality; see the module
    docstring for relevance. A direction without a valid query gives NaN."""
    directions = directions or [(q, c) for q in MODALITIES for c in MODALITIES]
    g = torch.as_tensor(np.asarray(group))
    n = len(g)
    out = {}
    for q, c in directions:
        same = q == c
        hits = {k: 0 for k in ks}
        counted = 0
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            sim = emb[q][lo:hi] @ emb[c].T
            rel = g[lo:hi, None] == g[None, :]
            if same:
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
    mask) of the product types. Returns name -> metrics."""
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
        res = retrieval(emb, items.group[test])
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
    """One block per source: rows = directions (then classification and probes), columns = models
    x R@K. ``results``: model -> source -> metrics (values may be ``"mean ± std"`` strings)."""
    models = list(results)
    sources = list(dict.fromkeys(s for r in results.values() for s in r))
    lines = []

    def cell(v) -> str:
        if isinstance(v, str):
            return v
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"

    for s in sources:
        lines.append(f"\n### {s} (test items: {int(_first(results, s, 'n_test') or 0)})\n")
        head = "| direction | " + " | ".join(f"{m} R@{k}" for m in models for k in ks) + " |"
        lines += [head, "|" + "---|" * (1 + len(models) * len(ks))]
        for q in MODALITIES:
            for c in MODALITIES:
                d = direction(q, c)
                vals = [cell(results[m].get(s, {}).get(f"{d}/r@{k}")) for m in models for k in ks]
                lines.append(f"| {d} | " + " | ".join(vals) + " |")
        lines += ["", "| task (accuracy %) | " + " | ".join(models) + " |", "|" + "---|" * (1 + len(models))]
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


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    results = {}
    for d in argv:
        m = json.loads((Path(d) / "metrics.json").read_text())
        results[f"{m['experiment']} s{m['seed']}"] = m["benchmark"]
    print(format_benchmark(results))


if __name__ == "__main__":
    main(sys.argv[1:])
