"""Small named parts that compose into CTR models (as TorchRec composes DLRM from archs)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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

    ``tables=True`` (with ``pack``) lets the model hand over the history as embedding-table rows
    and ids instead of gathered vectors (:meth:`forward_tables`, the plain embedding backend): the
    unit's first layer is then evaluated in table space where the tables are small. The key term
    ``(Wk-Wd)·k`` becomes a table ``E·(Wk-Wd)ᵀ`` of one row per id, gathered per history item
    (when the table has fewer rows than the packed history); a feature whose (target id, history
    id) pairs are fewer than the packed rows (e.g. a genre) gets its whole term, key and
    ``Wp·(q*k)``, as one table of pairs; and such a small table's pooled vector is a per-row
    histogram of the attention weights times the table, so its rows are never gathered. The same
    function with the same gradients (up to float32 rounding); on ML100K about a fifth less time
    per step (``experiments/bench_overhead.py --parts ctr``, bare loop: 36.7-37.2 against 45.2-47.1
    ms here).

    ``unit_precision="bf16"`` runs the unit (its matrix products and activations, the [M, H] part
    that dominates DIN's cost) under bf16 autocast; the scores, the pooling and everything else
    stay float32, and so do the weights and their gradients. On CPUs with native bf16 (AVX512-BF16,
    AMX) and on GPUs it is faster (ML100K here, both before the allocator tuning: 13,865 against
    12,477 samples/s, ``experiments/bench_ctr.py``); elsewhere bf16 is emulated and slower.
    """

    def __init__(self, dim: int, hidden: list[int] = (64, 32), act: str = "dice",
                 normalize: str = "none", dropout: float = 0.0, pack: bool = True,
                 unit_precision: str = "32", tables: bool = True):
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
        self.normalize, self.pack, self.tables = normalize, pack, tables
        self.dim = self.out_dim = dim

    @property
    def packs(self) -> bool:
        """True: the model may hand over only the real history items (:meth:`forward_packed`)."""
        return self.pack

    @property
    def takes_tables(self) -> bool:
        """True: the model may hand over the history as table rows and ids (:meth:`forward_tables`)."""
        return self.pack and self.tables

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
            return self._rest(h)

    def _rest(self, h: Tensor) -> Tensor:
        """The unit after its first layer's pre-activation ``h`` [M, H]: raw scores [M], float32."""
        return self.rest(self.first_drop(self.first_act(h))).squeeze(-1).float()

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
        w = self._packed_weights(self._packed_scores(query, keys, row), pos, shape)
        return self._pool_rows(w, keys, row, shape[0])

    def _packed_weights(self, scores: Tensor, pos: Tensor, shape: tuple[int, int]) -> Tensor:
        """Raw packed scores [M] -> attention weights [M], normalised over each row's grid
        (``"none"``: the round trip would be the identity)."""
        if self.normalize == "softmax":
            return self._grid(scores, pos, shape).reshape(-1).index_select(0, pos)
        return scores

    @staticmethod
    def _pool_rows(w: Tensor, keys: Tensor, row: Tensor, b: int) -> Tensor:
        """Sum of the weighted packed keys [M, d] per batch row: [B, d]."""
        weighted = w.unsqueeze(1) * keys  # float32 weights: bf16 keys (FSDP's bf16 parameters) promote
        return weighted.new_zeros(b, keys.shape[1]).index_add(0, row, weighted)

    def forward_tables(self, query: Tensor, features: list[HistoryTable], pos: Tensor,
                       shape: tuple[int, int]) -> Tensor:
        """Pooled history [B, D] as :meth:`forward_packed` gives it, from the history's embedding
        tables and ids instead of gathered keys (see the class docstring for what is evaluated in
        table space, and when). ``features`` follow the keys' column order; ``query`` [B, D] must be
        the concatenation of ``f.query_table[f.query_ids]`` over them (the target's embeddings),
        ``pos`` [M] and ``shape`` as in :meth:`forward_packed`."""
        if sum(f.table.shape[1] for f in features) != self.dim:
            raise ValueError(f"history tables of widths {[f.table.shape[1] for f in features]} do not "
                             f"make the unit's width {self.dim}")
        b = shape[0]
        row = torch.div(pos, shape[1], rounding_mode="floor")
        m = pos.shape[0]
        keys: list[Tensor | None] = []
        with self._unit(query.device):
            wq, wk, wd, wp = self.first.weight.split(self.dim, dim=1)
            wkd = wk - wd
            h = F.linear(query, wq + wd, self.first.bias).index_select(0, row)  # [M, H]
            c = 0
            for f in features:
                v, d = f.table.shape
                cols = slice(c, c + d)
                c += d
                if f.query_table.shape[0] * v <= m:  # one table of (target id, history id) pairs
                    qt = f.query_table.to(f.table.dtype)
                    pair = torch.matmul((qt[:, None, :] * f.table[None, :, :]).reshape(-1, d), wp[:, cols].t())
                    pair = (pair.reshape(qt.shape[0], v, -1) + torch.matmul(f.table, wkd[:, cols].t())).flatten(0, 1)
                    h = h + pair.index_select(0, f.query_ids.index_select(0, row) * v + f.ids)
                    keys.append(None)
                    continue
                k = F.embedding(f.ids, f.table)  # [M, d]
                key_term = (torch.matmul(f.table, wkd[:, cols].t()).index_select(0, f.ids) if v <= m
                            else torch.matmul(k, wkd[:, cols].t()))
                h = h + key_term + torch.matmul(query[:, cols].index_select(0, row) * k, wp[:, cols].t())
                keys.append(k)
            w = self._packed_weights(self._rest(h), pos, shape)
        pooled = []
        for f, k in zip(features, keys):
            v = f.table.shape[0]
            if b * v <= m:  # small table: per-row histogram of the weights, times the table
                hist = w.new_zeros(b * v).index_add(0, row * v + f.ids, w).reshape(b, v)
                pooled.append(torch.matmul(hist, f.table.to(hist.dtype)))
            else:
                pooled.append(self._pool_rows(w, F.embedding(f.ids, f.table) if k is None else k, row, b))
        return torch.cat(pooled, dim=1)


@dataclass
class HistoryTable:
    """One sequence feature of a packed history, as table rows and ids (:meth:`TargetAttention.forward_tables`):
    ``table`` [V, d] the history's embedding table, ``ids`` [M] its packed history ids;
    ``query_table`` [V', d] the target's table of the same feature (the same tensor when the
    history shares it), ``query_ids`` [B] the target's ids."""

    table: Tensor
    ids: Tensor
    query_table: Tensor
    query_ids: Tensor


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
