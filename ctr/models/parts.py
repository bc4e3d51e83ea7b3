"""Small named parts that compose into CTR models (as TorchRec composes DLRM from archs)."""

from __future__ import annotations

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
        if self.training:
            flat = x.reshape(-1, x.shape[-1])
            var, mean = torch.var_mean(flat, dim=0, correction=0)
            with torch.no_grad():
                n = flat.shape[0]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))
        return x * (self.alpha + p * (1 - self.alpha))


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


class FeatureEmbedding(nn.Module):
    """One embedding table per categorical feature; sequences share the table of their feature.

    ``vocab_sizes`` maps feature -> rows (padding row 0 and the out-of-vocabulary row 1 included).
    """

    def __init__(self, vocab_sizes: dict[str, int], dim: int, init_std: float = 1e-2):
        super().__init__()
        self.dim = dim
        self.tables = nn.ModuleDict({n: nn.Embedding(v, dim, padding_idx=0) for n, v in vocab_sizes.items()})
        for t in self.tables.values():
            nn.init.normal_(t.weight, std=init_std)
            with torch.no_grad():
                t.weight[0].zero_()

    def forward(self, name: str, ids: Tensor) -> Tensor:
        return self.tables[name](ids)


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
    """

    def __init__(self, dim: int, hidden: list[int] = (64, 32), act: str = "dice",
                 normalize: str = "none", dropout: float = 0.0):
        super().__init__()
        if normalize not in ("none", "softmax"):
            raise ValueError(f"normalize must be 'none' or 'softmax', got {normalize!r}")
        hidden = list(hidden)
        if not hidden:
            raise ValueError("TargetAttention needs at least one hidden layer")
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_act = activation(act, hidden[0])
        self.first_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rest = MLP(hidden[0], hidden[1:], 1, act=act, dropout=dropout)
        self.normalize = normalize
        self.dim = self.out_dim = dim

    def scores(self, query: Tensor, keys: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        """[B, L] attention weights; ``bias`` ([B, L], e.g. a scaled visual similarity) is added to
        the unit's raw scores before normalisation."""
        wq, wk, wd, wp = self.first.weight.split(self.dim, dim=1)
        h = (torch.matmul(keys, (wk - wd).t()) + torch.matmul(query.unsqueeze(1) * keys, wp.t())
             + (F.linear(query, wq + wd, self.first.bias)).unsqueeze(1))
        s = self.rest(self.first_drop(self.first_act(h))).squeeze(-1)
        if bias is not None:
            s = s + bias
        if self.normalize == "softmax":
            s = s.masked_fill(~mask, float("-inf")).softmax(dim=1).nan_to_num(0.0)
        else:
            s = s * mask.to(s.dtype)
        return s

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
        w = self.scores(query, keys, mask, bias)
        return torch.bmm(w.unsqueeze(1), keys).squeeze(1)


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
