"""Small named parts that compose into CTR models (as TorchRec composes DLRM from archs)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activation(name: str, dim: int | None = None) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU()
    if name == "dice":
        assert dim is not None, "Dice needs the feature dimension"
        return Dice(dim)
    if name == "gelu":
        return nn.GELU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r} (relu, prelu, dice, gelu, sigmoid)")


class Dice(nn.Module):
    """DIN's data-adaptive activation: a PReLU whose switch point follows the batch statistics.

    Statistics are taken over every leading dimension (batch and sequence); running estimates
    are kept for evaluation, as in batch norm.
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # the normalisation is batch norm over the flattened leading dims (one fused native kernel
        # with its backward through the statistics, instead of var_mean and element-wise ops);
        # running estimates as batch norm keeps them
        flat = x.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] < 2:  # one row (a packed history of one item, a last
            z = torch.zeros_like(flat)  # batch of one): x - mean(x) = 0; no statistics to keep
        else:
            z = F.batch_norm(flat, self.running_mean, self.running_var, None, None, self.training,
                             self.momentum, self.eps)
        gate = torch.addcmul(self.alpha, torch.sigmoid(z), 1 - self.alpha)  # alpha + p (1 - alpha)
        return x * gate.reshape(x.shape)


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> dropout, per hidden layer; optional output layer."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int | None = None,
                 act: str = "relu", dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation(act, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and any(isinstance(m, nn.BatchNorm1d) for m in self.net):
            b, l, _ = x.shape
            return self.net(x.reshape(b * l, -1)).reshape(b, l, -1)
        return self.net(x)


def sequence_mask(lengths: Tensor, max_len: int) -> Tensor:
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class MeanPooling(nn.Module):
    """Masked mean of the history embeddings (the pooled-history DNN baseline); ignores the target."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        m = mask.unsqueeze(-1).to(keys.dtype)
        return (keys * m).sum(1) / m.sum(1).clamp_min(1.0)


class TargetAttention(nn.Module):
    """DIN's local activation unit: each history item is weighted by an MLP of
    [query, key, query - key, query * key] and the weighted keys are summed.

    The first layer is evaluated without building the 4-way concatenation: with its weight split
    as [Wq, Wk, Wd, Wp], ``W·[q, k, q-k, q*k] = (Wq+Wd)·q + (Wk-Wd)·k + Wp·(q*k)``, and the
    query term is computed once per row instead of once per history item (same function, about
    half the multiply-adds of that layer).

    ``normalize="none"`` keeps DIN's unnormalised weights (the intensity of interest is kept);
    ``"softmax"`` turns them into a distribution over the history.

    ``pack=True`` runs the unit on the real history items only (gathered into [M, D] rows, M the
    sum of the lengths) and scatters the scores back: the padding costs nothing, and Dice's batch
    statistics are those of the real items (not diluted by padding). On ML100K (mean length 38.5
    of 50) that is about a quarter of the unit's work. ``False`` runs on the padded [B, L]
    grid (no data-dependent shapes: CUDA graphs, ``torch.compile`` without graph breaks).

    ``unit_precision="bf16"`` runs the unit (its matrix products and activations, the [M, H] part
    that dominates DIN's cost) under bf16 autocast; the scores, the pooling and everything else
    stay float32, and so do the weights and their gradients. On CPUs with native bf16 (AVX512-BF16,
    AMX) and on GPUs it is faster (ML100K here, both before the allocator tuning: 13,865 against
    12,477 samples/s, ``experiments/bench_ctr.py``); elsewhere bf16 is emulated and slower.
    """

    def __init__(self, dim: int, hidden: list[int] = (64, 32), act: str = "dice",
                 normalize: str = "none", dropout: float = 0.0, pack: bool = True,
                 unit_precision: str = "32"):
        super().__init__()
        if normalize not in ("none", "softmax"):
            raise ValueError(f"normalize must be 'none' or 'softmax', got {normalize!r}")
        if str(unit_precision) not in ("32", "bf16"):
            raise ValueError(f"unit_precision must be '32' or 'bf16', got {unit_precision!r}")
        self.bf16 = str(unit_precision) == "bf16"
        hidden = list(hidden)
        if not hidden:
            raise ValueError("TargetAttention needs at least one hidden layer")
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_act = activation(act, hidden[0])
        self.first_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rest = MLP(hidden[0], hidden[1:], 1, act=act, dropout=dropout)
        self.normalize, self.pack = normalize, pack
        self.dim = self.out_dim = dim

    @property
    def packs(self) -> bool:
        """True: the model may hand over only the real history items (:meth:`forward_packed`)."""
        return self.pack

    def _unit(self, device: torch.device):
        """bf16 autocast for the unit when ``unit_precision="bf16"``; otherwise nothing changes (an
        outer autocast, e.g. the trainer's bf16-mixed, stays in force)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _packed_scores(self, query: Tensor, k: Tensor, row: Tensor) -> Tensor:
        """Raw scores [M] (float32) of packed keys ``k`` [M, D], ``row`` [M] their batch rows."""
        with self._unit(k.device):
            wq, wk, wd, wp = self.first.weight.split(self.dim, dim=1)
            q_term = F.linear(query, wq + wd, self.first.bias)  # [B, H], once per row
            h = (torch.matmul(k, (wk - wd).t()) + torch.matmul(query.index_select(0, row) * k, wp.t())
                 + q_term.index_select(0, row))
            s = self.rest(self.first_drop(self.first_act(h))).squeeze(-1)
        return s.float()

    def _grid(self, packed: Tensor, pos: Tensor, shape: tuple[int, int]) -> Tensor:
        """Packed raw scores onto the [B, L] grid, normalised (padding: weight 0)."""
        b, l = shape
        fill = float("-inf") if self.normalize == "softmax" else 0.0
        s = packed.new_full((b * l,), fill).index_put((pos,), packed).reshape(b, l)
        return s.softmax(dim=1).nan_to_num(0.0) if self.normalize == "softmax" else s

    def scores(self, query: Tensor, keys: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        """[B, L] attention weights; ``bias`` ([B, L], e.g. a scaled visual similarity) is added to
        the unit's raw scores before normalisation."""
        b, l, d = keys.shape
        if self.pack:
            pos = mask.reshape(-1).nonzero().squeeze(1)  # flat (row, step) of the real items
            row = torch.div(pos, l, rounding_mode="floor")
            packed = self._packed_scores(query, keys.reshape(b * l, d).index_select(0, pos), row)
            if bias is not None:
                packed = packed + bias.reshape(-1).index_select(0, pos)
            return self._grid(packed, pos, (b, l))
        with self._unit(keys.device):
            wq, wk, wd, wp = self.first.weight.split(self.dim, dim=1)
            h = (torch.matmul(keys, (wk - wd).t()) + torch.matmul(query.unsqueeze(1) * keys, wp.t())
                 + F.linear(query, wq + wd, self.first.bias).unsqueeze(1))
            s = self.rest(self.first_drop(self.first_act(h))).squeeze(-1).float()
        if bias is not None:
            s = s + bias
        if self.normalize == "softmax":
            return s.masked_fill(~mask, float("-inf")).softmax(dim=1).nan_to_num(0.0)
        return s * mask.to(s.dtype)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        w = self.scores(query, keys, mask, bias)
        return torch.bmm(w.unsqueeze(1), keys).squeeze(1)

    def forward_packed(self, query: Tensor, keys: Tensor, pos: Tensor, shape: tuple[int, int]) -> Tensor:
        """Pooled history [B, D] from the real history items only: ``keys`` [M, D] are the items at
        the flat positions ``pos`` [M] (row * L + step, ascending) of the [B, L] grid ``shape``. The
        same function as :meth:`forward` on the padded grid, without ever building it."""
        row = torch.div(pos, shape[1], rounding_mode="floor")
        w = self._packed_scores(query, keys, row)
        if self.normalize == "softmax":  # normalised over each row's grid ("none": the round trip is the identity)
            w = self._grid(w, pos, shape).reshape(-1).index_select(0, pos)
        weighted = w.unsqueeze(1) * keys  # float32 weights: bf16 keys (FSDP's bf16 parameters) promote
        return weighted.new_zeros(shape[0], keys.shape[1]).index_add(0, row, weighted)


class ConcatPooling(nn.Module):
    """Several sequence archs over the same history, their outputs concatenated
    (e.g. target attention for the target-specific interest plus a masked mean for the user's
    general profile, which does not grow with the history length)."""

    def __init__(self, dim: int, parts: list):
        super().__init__()
        self.parts = nn.ModuleList([p(dim) for p in parts])
        self.out_dim = sum(p.out_dim for p in self.parts)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        return torch.cat([p(query, keys, mask, bias=bias) for p in self.parts], dim=-1)
