"""MOON2.0's training objectives: dual-level alignment and dynamic sample filtering.

* **Inter-product alignment**: for each query modality (text, image, multimodal) an InfoNCE of
  the query against multimodal candidates: the triple's positive, the other rows' positives
  (in-batch negatives) and the triple's own hard negative; false negatives (same item, same
  product) masked. Per-triple losses, so filtering can weight them.
* **Intra-product alignment**: InfoNCE between a product's image and its own text, the other
  products' texts in the batch as negatives (symmetric; rows of the same product masked).
* **Dynamic sample filtering**: the reliability of a triple ``(q, p, n)`` is
  ``r = sigmoid(kappa * (sim(q, p) - sim(q, n) - m))`` under the current encoder (no gradient);
  the margin ``m`` decays over training (:class:`MarginSchedule`). A triple with ``r`` under the
  threshold (0.6) is down-weighted to ``r / threshold``, never dropped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from encoders.losses import InfoNCE

__all__ = ["reliability", "filter_weights", "MarginSchedule", "inter_product_loss", "intra_product_loss"]


def reliability(q: Tensor, p: Tensor, n: Tensor, kappa: float, margin: float) -> Tensor:
    """``sigmoid(kappa * (q.p - q.n - margin))`` per row of normalised ``[B, D]`` embeddings."""
    return torch.sigmoid(kappa * ((q * p).sum(-1) - (q * n).sum(-1) - margin))


def filter_weights(score: Tensor, threshold: float = 0.6) -> Tensor:
    """1 for reliable triples (``score >= threshold``), ``score / threshold`` for the others."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return torch.where(score >= threshold, torch.ones_like(score), score / threshold)


class MarginSchedule:
    """The filtering margin at a training step: ``start`` decaying to ``end`` over ``steps``
    (``"cosine"`` or ``"linear"``), ``end`` afterwards."""

    def __init__(self, start: float = 0.1, end: float = 0.0, steps: int = 1000, kind: str = "cosine"):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"kind must be 'cosine' or 'linear', got {kind!r}")
        self.start, self.end, self.steps, self.kind = float(start), float(end), max(1, int(steps)), kind

    def __call__(self, step: int) -> float:
        t = min(1.0, max(0.0, step / self.steps))
        f = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t
        return self.end + (self.start - self.end) * f


_NCE = InfoNCE(symmetric=False)
_NCE_SYM = InfoNCE(symmetric=True)


def inter_product_loss(query: Tensor, positive: Tensor, negative: Tensor, scale: Tensor | float,
                       query_keys: Tensor, positive_keys: Tensor, negative_keys: Tensor) -> Tensor:
    """Per-triple InfoNCE ``[B]``: query vs its positive, the in-batch positives and its own hard
    negative (all multimodal candidates); keys ``[B, 2]`` (item row, product) mask false negatives."""
    return _NCE(query, positive, scale, query_keys=query_keys, positive_keys=positive_keys,
                hard_negatives=negative.unsqueeze(1), hard_negative_keys=negative_keys.unsqueeze(1),
                reduction="none")


def intra_product_loss(image: Tensor, text: Tensor, scale: Tensor | float, keys: Tensor) -> Tensor:
    """Symmetric InfoNCE between each product's image and its own text ``[B]`` (rows with matching
    keys, e.g. colour variants of one product sharing a title, are not negatives)."""
    return _NCE_SYM(image, text, scale, query_keys=keys, positive_keys=keys, reduction="none")
