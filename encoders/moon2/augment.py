"""Image-text co-augmentation, offline and pluggable (MOON2.0), for training items only.

* **Text enrichment**: a text per item built from its attributes (:class:`AttributeEnricher`, a
  format template over the title and attribute columns) or produced by a user's local generative
  model through :class:`CallableEnricher` (any ``list[prompt] -> list[text]`` callable, e.g. a
  local ``transformers`` pipeline; nothing is downloaded here).
* **Image expansion**: ``n_views`` content-preserving edits per image (:func:`expand_images`):
  horizontal flip, a mild zoom/shift crop, small brightness and contrast changes. No hue, saturation
  or greyscale change: a garment's colour is part of what the product is.
* **Consistency filter**: :func:`consistency_keep` drops augmented pairs whose image-text
  similarity under the current encoder is below a threshold (by default the ``quantile`` of the
  un-augmented training pairs' similarities, so the threshold follows the encoder as it trains).

Test and validation items are never augmented: callers pass training rows only.
"""

from __future__ import annotations

import string
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from encoders.images import BatchAugment

__all__ = ["TextEnricher", "AttributeEnricher", "CallableEnricher", "expand_images", "consistency_keep",
           "DEFAULT_TEMPLATE"]

#: attributes first: a text tower truncates long texts from the end
DEFAULT_TEMPLATE = "{colour} {pattern} {garment}. {title}"


class TextEnricher(Protocol):
    def __call__(self, titles: Sequence[str], attrs: dict[str, Sequence[str]]) -> list[str]: ...


class AttributeEnricher:
    """``template.format(title=..., **attributes)`` per item; every field of the template must be
    ``title`` or an attribute column (else ``KeyError`` naming the missing ones)."""

    def __init__(self, template: str = DEFAULT_TEMPLATE):
        self.template = template
        self.fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}

    def __call__(self, titles: Sequence[str], attrs: dict[str, Sequence[str]]) -> list[str]:
        missing = sorted(self.fields - {"title"} - set(attrs))
        if missing:
            raise KeyError(f"template fields {missing} are not attributes (have {sorted(attrs)})")
        cols = {f: attrs[f] for f in self.fields if f != "title"}
        return [self.template.format(title=t, **{f: c[i] for f, c in cols.items()})
                for i, t in enumerate(titles)]


class CallableEnricher:
    """Enrichment by a user's generative model: ``generate(prompts) -> texts`` (one per prompt),
    with prompts from ``prompt`` (a template over ``title`` and the attributes), in batches."""

    def __init__(self, generate: Callable[[list[str]], list[str]],
                 prompt: str = "Describe this product for a shopper: {title} ({colour}, {pattern})",
                 batch_size: int = 32):
        self.generate, self.prompts, self.batch_size = generate, AttributeEnricher(prompt), batch_size

    def __call__(self, titles: Sequence[str], attrs: dict[str, Sequence[str]]) -> list[str]:
        prompts = self.prompts(titles, attrs)
        out: list[str] = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk = prompts[lo:lo + self.batch_size]
            got = list(self.generate(chunk))
            if len(got) != len(chunk) or not all(isinstance(t, str) for t in got):
                raise ValueError(f"the generator returned {len(got)} items for {len(chunk)} prompts "
                                 f"(prompts {lo}..{lo + len(chunk) - 1}); it must return one string each")
            out.extend(got)
        return out


def expand_images(images: np.ndarray | Tensor, n_views: int, seed: int = 0, *, scale=(0.8, 1.0),
                  brightness: float = 0.1, contrast: float = 0.1, chunk: int = 512) -> np.ndarray:
    """``n_views`` content-preserving edits of each uint8 image ``[N, 3, S, S]``: a uint8 array
    ``[N * n_views, 3, S, S]``, view ``v`` of image ``i`` at row ``i * n_views + v``. Deterministic
    for a ``seed``."""
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, S, S], got {x.dtype} {tuple(x.shape)}")
    n, size = x.shape[0], x.shape[-1]
    aug = BatchAugment(size, scale=tuple(scale), ratio=(0.9, 1.1), flip=0.5, brightness=brightness,
                       contrast=contrast, saturation=0.0, hue=0.0, jitter_p=1.0, grey_p=0.0)
    g = torch.Generator().manual_seed(int(seed))
    out = np.empty((n * n_views, 3, size, size), np.uint8)
    rep = x.repeat_interleave(n_views, 0) if n * n_views <= chunk else None
    for lo in range(0, n * n_views, chunk):
        hi = min(lo + chunk, n * n_views)
        src = rep[lo:hi] if rep is not None else x[torch.arange(lo, hi) // n_views]
        out[lo:hi] = (aug(src, generator=g) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def consistency_keep(sim_aug: Tensor, sim_orig: Tensor, *, quantile: float | None = 0.1,
                     threshold: float | None = None) -> tuple[Tensor, float]:
    """Which augmented pairs to keep: similarity ``>= threshold``; without ``threshold``, the
    ``quantile`` of the original pairs' similarities ``sim_orig`` is the threshold. Returns
    ``(keep [V] bool, threshold used)``."""
    if threshold is None:
        if quantile is None or not 0 <= quantile <= 1:
            raise ValueError(f"give threshold=, or quantile= in [0, 1] (got {quantile})")
        threshold = float(torch.quantile(sim_orig.float(), quantile))
    return sim_aug >= threshold, float(threshold)
