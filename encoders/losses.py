"""Contrastive losses: InfoNCE (CLIP-style, with hard negatives and a MoCo queue) and NT-Xent (SimCLR).

Conventions (the open_clip contract):

* features are L2-normalised by the caller, so ``a @ b.T`` are cosine similarities;
* the temperature is always passed as a **scale** ``s = 1 / tau`` (``LogitScale()`` output or a float),
  logits are ``s * cos``; ``LogitScale.clamp_()`` is called after each optimiser step;
* keys are LongTensors ``[..., K]`` (one column per key kind, e.g. item id and product group; a bare
  ``[...]`` tensor means ``K = 1``); two rows *match* when some column holds the same value in both,
  negative values (``-1``) meaning "no key" and never matching. A candidate that matches the anchor's
  positive is a false negative: its logit is set to ``-inf``;
* distributed (``torch.distributed`` initialised, world size ``W > 1``): in-batch candidates are gathered
  from all ranks with gradient (:func:`gather_with_grad`), each rank computes the loss of its own rows only,
  so that the mean over ranks of the per-rank losses is the single-process loss on the global batch and
  DDP's gradient averaging gives the single-process gradient. All ranks must use the same local batch size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LogitScale", "rank_and_world", "gather_with_grad", "gather_no_grad", "InfoNCE",
           "EmbeddingQueue", "NTXent", "matryoshka_slices"]


class LogitScale(nn.Module):
    """Learnable inverse temperature ``s = exp(t)``, stored as ``t = log s`` (CLIP).

    ``clamp_()`` keeps ``s`` in ``[1, max]``; call it after each optimiser step. Non-learnable: ``t`` is a
    (persistent) buffer under the same name, so checkpoints are interchangeable.
    """

    def __init__(self, init: float = 1 / 0.07, max: float = 100.0, learnable: bool = True):  # noqa: A002
        super().__init__()
        if not (init > 0 and max >= 1):
            raise ValueError(f"need init > 0 and max >= 1, got init={init}, max={max}")
        self.max_scale = float(max)
        t = torch.tensor(math.log(init), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(t)
        else:
            self.register_buffer("log_scale", t)
        self.clamp_()

    def forward(self) -> Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> LogitScale:
        self.log_scale.clamp_(0.0, math.log(self.max_scale))
        return self

    def extra_repr(self) -> str:
        return f"scale={float(self.log_scale.exp()):.4g}, max={self.max_scale:g}, " \
               f"learnable={isinstance(self.log_scale, nn.Parameter)}"


# ---------------------------------------------------------------------------------------- distributed


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """``y = cat(x_0, ..., x_{W-1})``; backward: ``dx_r = sum over ranks of dL_rank/dy[slice r]``.

    Each rank's loss depends on every rank's features, so the gradient of this rank's features is the sum of
    the gradients every rank's loss sends to them (an all-reduce of ``dy``, then the local slice). With DDP's
    gradient averaging this gives exactly the gradient of the mean of the per-rank losses.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:  # type: ignore[override]
        dy = dy.contiguous().clone()
        dist.all_reduce(dy, op=dist.ReduceOp.SUM)
        return dy[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenation of ``x`` over ranks (rank order, no gradient); identity when not distributed."""
    _, world = rank_and_world()
    if world == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenation of ``x`` over ranks (rank order) through which the backward pass reaches every rank.

    Identity when not distributed; :func:`gather_no_grad` when ``x`` needs no gradient. Shapes must agree
    across ranks. Every rank must run the backward pass (it is a collective).
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    if not (x.requires_grad and torch.is_grad_enabled()):
        return gather_no_grad(x)
    return _GatherWithGrad.apply(x)


# ---------------------------------------------------------------------------------------- helpers


def _keys(k: Tensor | None, ndim: int) -> Tensor | None:
    """Keys as ``[..., K]`` (a tensor with ``ndim`` dims gets a trailing ``K = 1``)."""
    if k is None:
        return None
    return k.unsqueeze(-1) if k.dim() == ndim else k


def _match(a: Tensor, b: Tensor) -> Tensor:
    """``any_k (a[..., k] == b[..., k] >= 0)`` with broadcasting, one key column at a time (memory)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"key columns differ: {a.shape[-1]} vs {b.shape[-1]}")
    out = None
    for k in range(a.shape[-1]):
        ak, bk = a[..., k], b[..., k]
        m = (ak == bk) & (ak >= 0)
        out = m if out is None else out | m
    return out


def _scaled(sim: Tensor, scale: Tensor | float) -> Tensor:
    logits = sim * scale
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


# ---------------------------------------------------------------------------------------- InfoNCE


class InfoNCE(nn.Module):
    """InfoNCE / CLIP loss with false-negative masking, per-query hard negatives and a queue.

    For local query ``i`` (global row ``g = rank * B + i``), with scale ``s``::

        l_i = -log  exp(s q_i.p_g) / ( sum_j exp(s q_i.p_j) + sum_m exp(s q_i.h_im) + sum_n exp(s q_i.u_n) )

    over the gathered positives ``p_j``, the query's hard negatives ``h_im`` and the queue ``u_n``; terms of
    false negatives are dropped (logit ``-inf``). ``symmetric`` adds the positive -> query direction over the
    in-batch part only (``p_g`` against all gathered queries) and averages the two directions.

    False negatives (``mask_false_negatives``): an in-batch pair ``(i, j != g)`` is masked, in both
    directions, when ``positive_keys`` of ``i`` and ``j`` match or ``query_keys`` of ``i`` and ``j`` match;
    a hard negative / queue entry is masked when its keys match ``positive_keys`` of ``i``. When query
    and positive keys have the same columns (e.g. both are [item, product group]), a candidate that
    matches the query's own keys is masked as well (query i vs positive j, positive i vs query j, and
    hard negatives / queue entries vs query i): the query's own item is no negative.

    ``forward`` returns the mean over local rows (``reduction="none"``: the ``[B]`` per-row losses, each
    the mean of its two directions when symmetric, for per-example weights); ``last_accuracy`` holds the top-1 accuracy of the query
    direction (over all its candidates) of the last call.
    """

    def __init__(self, symmetric: bool = True, mask_false_negatives: bool = True, gather: bool = True):
        super().__init__()
        self.symmetric = symmetric
        self.mask_false_negatives = mask_false_negatives
        self.gather = gather
        self.last_accuracy: Tensor | None = None

    def forward(self, query: Tensor, positive: Tensor, logit_scale: Tensor | float, *,
                query_keys: Tensor | None = None, positive_keys: Tensor | None = None,
                hard_negatives: Tensor | None = None, hard_negative_keys: Tensor | None = None,
                queue: Tensor | None = None, queue_keys: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if query.shape != positive.shape or query.dim() != 2:
            raise ValueError(f"query and positive must both be [B, D], got {tuple(query.shape)} "
                             f"and {tuple(positive.shape)}")
        b = query.shape[0]
        qk, pk = _keys(query_keys, 1), _keys(positive_keys, 1)
        hk, uk = _keys(hard_negative_keys, 2), _keys(queue_keys, 1)
        rank, world = rank_and_world() if self.gather else (0, 1)
        if world > 1:
            q_all, p_all = gather_with_grad(query), gather_with_grad(positive)
            qk_all = gather_no_grad(qk) if qk is not None else None
            pk_all = gather_no_grad(pk) if pk is not None else None
        else:
            rank, q_all, p_all, qk_all, pk_all = 0, query, positive, qk, pk
        rows = torch.arange(b, device=query.device)
        target = rows + rank * b

        # in-batch false negatives, shared by both directions: [B, W*B]
        mask = None
        if self.mask_false_negatives:
            for lk, ak in ((pk, pk_all), (qk, qk_all)):
                if lk is not None:
                    m = _match(lk[:, None, :], ak[None, :, :])
                    mask = m if mask is None else mask | m
        # a candidate that is the query's own item (same keys as the query) is no negative either
        cross = (self.mask_false_negatives and qk is not None and pk is not None
                 and qk.shape[-1] == pk.shape[-1])
        mask_q, mask_p = mask, mask
        if cross:
            mq = _match(qk[:, None, :], pk_all[None, :, :])  # query i vs gathered positive j
            mp = _match(pk[:, None, :], qk_all[None, :, :])  # positive i vs gathered query j
            mask_q = mq if mask is None else mask | mq
            mask_p = mp if mask is None else mask | mp
        for m in (mask_q, mask_p):
            if m is not None:
                m[rows, target] = False

        def extra_mask(keys: Tensor | None, expand) -> Tensor | None:
            """Mask of extra candidates whose keys match the query's positive (or the query)."""
            if not self.mask_false_negatives or keys is None:
                return None
            out = _match(pk[:, None, :], expand(keys)) if pk is not None else None
            if cross:
                mq = _match(qk[:, None, :], expand(keys))
                out = mq if out is None else out | mq
            return out

        parts, masks = [query @ p_all.T], [mask_q]
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            parts.append(torch.einsum("bd,bhd->bh", query, hard_negatives.to(query.dtype)))
            masks.append(extra_mask(hk, lambda k: k))
        if queue is not None and queue.shape[0] > 0:
            parts.append(query @ queue.detach().to(query.dtype).T)
            masks.append(extra_mask(uk, lambda k: k[None, :, :]))
        logits = _scaled(torch.cat(parts, dim=1), logit_scale)
        if any(m is not None for m in masks):
            full = torch.cat([m if m is not None else torch.zeros_like(p, dtype=torch.bool)
                              for m, p in zip(masks, parts)], dim=1)
            logits = logits.masked_fill(full, float("-inf"))
        loss = F.cross_entropy(logits, target, reduction=reduction)
        with torch.no_grad():
            self.last_accuracy = (logits.argmax(dim=1) == target).float().mean() if b else None

        if self.symmetric:
            logits_p = _scaled(positive @ q_all.T, logit_scale)
            if mask_p is not None:
                logits_p = logits_p.masked_fill(mask_p, float("-inf"))
            loss = (loss + F.cross_entropy(logits_p, target, reduction=reduction)) / 2
        return loss

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}, mask_false_negatives={self.mask_false_negatives}, " \
               f"gather={self.gather}"


# ---------------------------------------------------------------------------------------- queue


class EmbeddingQueue(nn.Module):
    """FIFO ring buffer of past (positive-side) embeddings and their keys, MoCo-style.

    Buffers (persistent, so they are checkpointed): ``emb [size, dim]``, ``keys [size, n_keys]`` (-1 when
    empty), ``ptr`` (next slot to write) and ``filled``. ``enqueue`` stores detached rows, gathered over
    ranks when distributed (every rank must call it, all ranks then hold the same queue); when full, the
    oldest rows are overwritten first. ``size = 0`` disables the queue.
    """

    def __init__(self, dim: int, size: int, n_keys: int = 1):
        super().__init__()
        if size < 0 or dim <= 0 or n_keys <= 0:
            raise ValueError(f"bad queue shape: dim={dim}, size={size}, n_keys={n_keys}")
        self.dim, self.size, self.n_keys = dim, size, n_keys
        self.register_buffer("emb", torch.zeros(size, dim))
        self.register_buffer("keys", torch.full((size, n_keys), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, emb: Tensor, keys: Tensor | None = None) -> None:
        """Append ``emb [N, dim]`` (and ``keys [N, n_keys]`` or ``[N]``; ``None``: no keys)."""
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"expected [N, {self.dim}] embeddings, got {tuple(emb.shape)}")
        keys = torch.full((emb.shape[0], self.n_keys), -1, dtype=torch.long, device=emb.device) \
            if keys is None else _keys(keys, 1).long()
        if keys.shape != (emb.shape[0], self.n_keys):
            raise ValueError(f"expected [{emb.shape[0]}, {self.n_keys}] keys, got {tuple(keys.shape)}")
        if self.size == 0:
            return
        emb, keys = gather_no_grad(emb.detach()), gather_no_grad(keys)
        if emb.shape[0] == 0:
            return
        emb, keys = emb[-self.size:], keys[-self.size:]     # only the newest `size` rows can survive
        n, ptr = emb.shape[0], int(self.ptr)
        idx = (ptr + torch.arange(n, device=self.emb.device)) % self.size
        self.emb[idx] = emb.to(self.emb)
        self.keys[idx] = keys.to(self.keys.device)
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def get(self) -> tuple[Tensor, Tensor]:
        """Snapshot ``(emb [F, dim], keys [F, n_keys])`` of the filled slots, in storage order.

        A copy, so that a later ``enqueue`` (in place) does not invalidate a graph that used it.
        """
        f = int(self.filled)
        return self.emb[:f].clone(), self.keys[:f].clone()

    def __len__(self) -> int:
        return int(self.filled)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, n_keys={self.n_keys}"


# ---------------------------------------------------------------------------------------- NT-Xent


class NTXent(nn.Module):
    """NT-Xent (SimCLR): two views ``z1, z2 [B, D]`` of the same rows.

    Over the ``2N`` gathered embeddings (``N = W * B``), anchor ``a`` (each local row of each view) has the
    other view of its row as positive, itself masked out, and every other embedding as negative::

        l_a = -log exp(s a.a+) / sum_{c != a} exp(s a.c)

    With ``keys`` (per row) and ``mask_false_negatives``, both views of any other row whose keys match the
    anchor's row keys are dropped. Returns the mean over the ``2B`` local anchors.
    """

    def __init__(self, mask_false_negatives: bool = True, gather: bool = True):
        super().__init__()
        self.mask_false_negatives = mask_false_negatives
        self.gather = gather

    def forward(self, z1: Tensor, z2: Tensor, logit_scale: Tensor | float,
                keys: Tensor | None = None) -> Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
        b = z1.shape[0]
        keys = _keys(keys, 1)
        rank, world = rank_and_world() if self.gather else (0, 1)
        if world > 1:
            z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)
            keys_all = gather_no_grad(keys) if keys is not None else None
        else:
            rank, z1_all, z2_all, keys_all = 0, z1, z2, keys
        n = z1_all.shape[0]
        g = torch.arange(b, device=z1.device) + rank * b
        anchors = torch.cat([z1, z2])
        self_idx = torch.cat([g, g + n])
        target = torch.cat([g + n, g])
        rows = torch.arange(2 * b, device=z1.device)

        mask = torch.zeros(2 * b, 2 * n, dtype=torch.bool, device=z1.device)
        if self.mask_false_negatives and keys is not None:
            m = _match(keys[:, None, :], keys_all[None, :, :])       # [B, N]
            mask = m.repeat(2, 2)
            mask[rows, target] = False
        mask[rows, self_idx] = True
        logits = _scaled(anchors @ torch.cat([z1_all, z2_all]).T, logit_scale)
        return F.cross_entropy(logits.masked_fill(mask, float("-inf")), target)


# ---------------------------------------------------------------------------------------- Matryoshka


def matryoshka_slices(x: Tensor, dims: list[int]) -> list[Tensor]:
    """Re-normalised prefixes ``normalize(x[..., :d])`` for each ``d`` in ``dims`` (Matryoshka learning).

    Apply the same slicing to every feature tensor of a loss and sum the losses over ``dims``.
    """
    if any(d <= 0 or d > x.shape[-1] for d in dims):
        raise ValueError(f"dims {dims} must lie in [1, {x.shape[-1]}]")
    return [F.normalize(x[..., :d], dim=-1) for d in dims]
