"""Retrieval metrics: image-based search recall@K and image<->text R@K.

Definitions (all vectorised; similarities are dot products of L2-normalised embeddings, scored in
chunks of queries so that memory stays ``chunk x gallery``):

* **image search recall@K**: for each query item, the fraction of its relevant items found in the
  top K of the gallery, the query item itself left out of the gallery; averaged over queries. On
  the simulator a query is a request's query image and its relevant items are those clicked in
  that request; on H&M a query is a held-out product photo and its relevant items are the other
  colour variants of the same product (``product_code``).
* **i2t / t2i R@K**: the fraction of queries with at least one relevant candidate in the top K
  (the usual image-text retrieval R@K). An image's relevant texts are the titles equal to its own
  title, and a title's relevant images are the items carrying that title (exact duplicates
  cannot be told apart by text).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

KS = (1, 5, 10, 100)


@dataclass
class SearchQueries:
    """Queries of an image search: ``query`` rows [R], and for query r its relevant rows
    ``relevant[offsets[r]:offsets[r+1]]``, searched among the ``gallery`` rows."""

    query: np.ndarray
    offsets: np.ndarray
    relevant: np.ndarray
    gallery: np.ndarray

    def __len__(self) -> int:
        return len(self.query)

    def restrict(self, available: np.ndarray) -> "SearchQueries":
        """Only the rows in ``available`` (a boolean mask over item rows): queries whose item is
        missing are dropped, missing relevant and gallery rows left out (a partial evaluation, e.g.
        under ``fast_dev_run`` or ``limit_val_batches``)."""
        lens = np.diff(self.offsets)
        owner = np.repeat(np.arange(len(self.query)), lens)
        keep_rel = available[self.relevant]
        rel, owner = self.relevant[keep_rel], owner[keep_rel]
        new_lens = np.bincount(owner, minlength=len(self.query))
        keep_q = available[self.query] & (new_lens > 0)
        rel = rel[keep_q[owner]]
        new_lens = new_lens[keep_q]
        return SearchQueries(self.query[keep_q], np.concatenate([[0], np.cumsum(new_lens)]),
                             rel, self.gallery[available[self.gallery]])


def same_group_queries(rows: np.ndarray, group: np.ndarray) -> SearchQueries:
    """Every row whose group has another member among ``rows`` queries for those members;
    the gallery is ``rows``."""
    rows = np.asarray(rows)
    g = group[rows]
    order = np.argsort(g, kind="stable")
    rows_s, g_s = rows[order], g[order]
    starts = np.flatnonzero(np.r_[True, g_s[1:] != g_s[:-1]])
    sizes = np.diff(np.r_[starts, len(g_s)])
    size_of = np.repeat(sizes, sizes)
    start_of = np.repeat(starts, sizes)
    q_idx = np.flatnonzero(size_of > 1)
    lens = size_of[q_idx] - 1
    # relevant of query at sorted position i: its group's positions except i
    owner = np.repeat(q_idx, lens)
    k = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    pos = start_of[owner] + k
    pos = pos + (pos >= owner)  # skip the query itself
    return SearchQueries(rows_s[q_idx], np.concatenate([[0], np.cumsum(lens)]), rows_s[pos], rows)


NLL_TEMPERATURE = 0.05


@torch.no_grad()
def search_recall(emb: Tensor, q: SearchQueries, ks=KS, chunk: int = 1024) -> dict[str, float]:
    """Image search recall@K of ``q`` over item embeddings ``emb`` [N, D] (row-aligned), and
    ``nll``: the mean over queries of -log of the softmax mass (cosine / 0.05, over the gallery
    without the query) on the query's relevant items, a smooth retrieval loss (about
    log(gallery / relevant) for uninformative embeddings) for learning curves and scaling fits."""
    if len(q) == 0:
        return {**{f"recall@{k}": float("nan") for k in ks}, "nll": float("nan")}
    kmax = min(max(ks), len(q.gallery) - 1)
    gal = emb[torch.from_numpy(q.gallery)]
    pos_in_gallery = np.full(emb.shape[0], -1, np.int64)
    pos_in_gallery[q.gallery] = np.arange(len(q.gallery))
    hits = {k: np.zeros(len(q)) for k in ks}
    nll = np.zeros(len(q))
    lens = np.diff(q.offsets)
    for lo in range(0, len(q), chunk):
        hi = min(lo + chunk, len(q))
        sim = emb[torch.from_numpy(q.query[lo:hi])] @ gal.T
        self_pos = torch.from_numpy(pos_in_gallery[q.query[lo:hi]])
        has = self_pos >= 0
        sim[has.nonzero().squeeze(1), self_pos[has]] = float("-inf")  # the query is no result
        top = sim.topk(kmax, dim=1).indices.numpy()  # [c, kmax] gallery positions
        # relevant gallery positions of these queries, as a boolean [c, gallery] mask
        rel = np.zeros((hi - lo, len(q.gallery)), bool)
        owner = np.repeat(np.arange(hi - lo), lens[lo:hi])
        rel_pos = pos_in_gallery[q.relevant[q.offsets[lo]:q.offsets[hi]]]
        ok = rel_pos >= 0
        rel[owner[ok], rel_pos[ok]] = True
        found = np.take_along_axis(rel, top, axis=1)
        denom = np.maximum(rel.sum(1), 1)
        for k in ks:
            hits[k][lo:hi] = found[:, :k].sum(1) / denom
        logits = sim.float() / NLL_TEMPERATURE
        on_rel = logits.masked_fill(~torch.from_numpy(rel), float("-inf"))
        nll[lo:hi] = (logits.logsumexp(1) - on_rel.logsumexp(1)).numpy()
    # queries without a relevant item in the gallery have nll inf: left out of the mean
    fin = np.isfinite(nll)
    return {**{f"recall@{k}": float(hits[k].mean()) for k in ks},
            "nll": float(nll[fin].mean()) if fin.any() else float("nan")}


@torch.no_grad()
def image_text_recall(img: Tensor, txt: Tensor, titles: list[str], ks=KS, chunk: int = 1024) -> dict[str, float]:
    """i2t and t2i R@K over row-aligned image and text embeddings, duplicates of a title relevant."""
    n = img.shape[0]
    codes = np.unique(np.asarray(titles, dtype=object).astype(str), return_inverse=True)[1]
    codes_t = torch.from_numpy(codes)
    out = {}
    for name, a, b in (("i2t", img, txt), ("t2i", txt, img)):
        kmax = min(max(ks), n)
        found = {k: 0 for k in ks}
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            top = (a[lo:hi] @ b.T).topk(kmax, dim=1).indices
            match = (codes_t[top] == codes_t[lo:hi, None])
            for k in ks:
                found[k] += int(match[:, :k].any(1).sum())
        out.update({f"{name}_r@{k}": found[k] / n for k in ks})
    return out
