"""Selection metrics on held-out pairs: accuracy, order-swap consistency, accuracy by CTR gap.

Every pair is shown twice, as (A, B) and as (B, A). A selector's choice is read as "picks the
pair's first creative" in each order; it is *correct* when that is the logged winner and
*consistent* when both orders pick the same creative (an unparseable answer is neither).
``accuracy`` averages both orders; ``accuracy_first_order`` uses the pairs' own order only.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ctr.creative.prompts import parse

#: relative CTR gap bucket edges (``ctr_hi / ctr_lo - 1``); the last bucket is open
GAP_EDGES = (0.6, 1.0, 2.0)


def gap_bucket_names(edges=GAP_EDGES) -> list[str]:
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])] + [f">{edges[-1]:g}"]


def selection_metrics(first: np.ndarray, first_swapped: np.ndarray, first_wins: np.ndarray,
                      gap: np.ndarray, edges=GAP_EDGES) -> dict:
    """``first``/``first_swapped``: per pair, 1 if the selector picked the pair's first creative in
    the original / swapped order, 0 for the other, -1 for no answer; ``first_wins``: 1 if the first
    creative has the higher CTR; ``gap``: the relative CTR gap."""
    first, first_swapped = np.asarray(first), np.asarray(first_swapped)
    y = np.asarray(first_wins).astype(int)
    ok1, ok2 = first == y, first_swapped == y
    both = (first >= 0) & (first_swapped >= 0)
    out = {"n_pairs": int(len(y)), "accuracy": float((ok1.mean() + ok2.mean()) / 2) if len(y) else float("nan"),
           "accuracy_first_order": float(ok1.mean()) if len(y) else float("nan"),
           "consistency": float((both & (first == first_swapped)).mean()) if len(y) else float("nan"),
           "answered": float(((first >= 0).mean() + (first_swapped >= 0).mean()) / 2) if len(y) else float("nan")}
    b = np.digitize(np.asarray(gap), edges[1:], right=True)
    for k, name in enumerate(gap_bucket_names(edges)):
        sel = b == k
        out[f"accuracy_gap_{name}"] = float((ok1[sel].mean() + ok2[sel].mean()) / 2) if sel.any() else None
        out[f"n_gap_{name}"] = int(sel.sum())
    return out


@torch.no_grad()
def policy_choices(policy, ds, batch_size: int, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Greedy answers of ``policy`` on a :class:`ctr.creative.data.PairDataset`:
    ``(picks A: 1 / B: 0 / none: -1, well formed, completions)``."""
    was = policy.training
    policy.eval()
    picks, fmt, texts = [], [], []
    try:
        for lo in range(0, len(ds), batch_size):
            batch = ds.collate(list(range(lo, min(len(ds), lo + batch_size))))
            ids, mask = policy.generate(policy.prompts(batch), max_new_tokens, greedy=True)
            for t in policy.decode(ids, mask):
                p = parse(t)
                picks.append(-1 if p.answer is None else int(p.answer == "A"))
                fmt.append(p.well_formed)
                texts.append(t)
    finally:
        policy.train(was)
    return np.asarray(picks), np.asarray(fmt), texts


def clauses(text: str) -> dict[str, str]:
    """The ``aspect : ... .`` clauses of a rationale, keyed by aspect (``intent``, ``relevance``,
    ``text``, ``layout``, ``subject``, ``background``, ``verdict``)."""
    m = re.search(r"<think>(.*?)</think>", text, re.S | re.I)
    out = {}
    for c in (m.group(1) if m else "").split(" . "):
        c = c.strip().rstrip(".").strip()
        if " : " in c:
            k, v = c.split(" : ", 1)
            out.setdefault(k.strip().lower(), v.strip())
    return out


def rationale_agreement(generated: list[str], references: list[str]) -> dict:
    """Per aspect, the share of generated rationales whose clause equals the reference's (what
    each creative shows and which one the aspect favours): how well the selector *reads* the
    creatives and the query, separately from its final answer."""
    ref = [clauses(r) for r in references]
    gen = [clauses(g) for g in generated]
    keys = sorted({k for r in ref for k in r} - {"verdict"})
    return {f"clause_{k}": float(np.mean([g.get(k) == r.get(k) for g, r in zip(gen, ref) if k in r])) for k in keys}


def evaluate_policy(policy, dm, split: str = "test", batch_size: int = 256, max_new_tokens: int = 96) -> dict:
    """Selection metrics of a generative selector on one split (both orders), plus the share of
    well-formed outputs and an example completion."""
    ds, sw = dm.dataset(split), dm.dataset(split, swapped=True)
    p1, f1, t1 = policy_choices(policy, ds, batch_size, max_new_tokens)
    p2, f2, _ = policy_choices(policy, sw, batch_size, max_new_tokens)
    # in the swapped order "A" is the pair's second creative
    first_swapped = np.where(p2 < 0, -1, 1 - p2)
    out = selection_metrics(p1, first_swapped, (ds.label == 0).numpy(), ds.gap.numpy())
    out["well_formed"] = float((f1.mean() + f2.mean()) / 2) if len(f1) else float("nan")
    if ds.target and "<think>" in ds.target[0]:
        out.update(rationale_agreement(t1, ds.target))
    out["example"] = t1[0] if t1 else ""
    return out
