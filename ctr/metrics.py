"""CTR evaluation metrics as torchmetrics ``Metric``s (distributed-safe, vectorised).

All metrics take *probabilities* (not logits) and 0/1 targets of the same shape. Every
``update`` accepts a ``groups`` keyword (user index) so that a whole collection can be
updated with ``collection.update(preds, target, groups=groups)``; only ``GAUC`` uses it.
Reductions are done in float64 with ``index_add_`` (deterministic on CUDA), never with
Python loops over rows or groups.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

NAN = float("nan")


def _check(preds: Tensor, target: Tensor, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Validate inputs; return flattened detached (preds, target) as float (>= float32)."""
    if preds.shape != target.shape:
        raise ValueError(f"preds and target must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}")
    if groups is not None:
        if groups.shape != preds.shape:
            raise ValueError(f"groups must have the same shape as preds, got {tuple(groups.shape)} and {tuple(preds.shape)}")
        if groups.is_floating_point() or groups.is_complex():
            raise ValueError(f"groups must be an integer tensor (user index), got {groups.dtype}")
    if not preds.is_floating_point():
        raise ValueError(f"preds must be floating-point probabilities, got {preds.dtype}")
    dtype = torch.promote_types(preds.dtype, torch.float32)
    preds, target = preds.detach().reshape(-1).to(dtype), target.detach().reshape(-1).to(dtype)
    has_nan, out_of_range, bad_target = torch.stack(
        [preds.isnan().any(), ((preds < 0) | (preds > 1)).any(), ((target != 0) & (target != 1)).any()]
    ).tolist()  # one device sync for all three checks
    if has_nan:
        raise ValueError("preds contain NaN")
    if out_of_range:
        raise ValueError(
            f"preds must be probabilities in [0, 1], got range [{preds.min().item():.4g}, {preds.max().item():.4g}]"
            " (pass sigmoid(logits), not logits)"
        )
    if bad_target:
        raise ValueError("target must contain only 0 and 1")
    return preds, target


def _segment_sum(x: Tensor, index: Tensor, n: int) -> Tensor:
    """out[i] = sum of x[index == i], in float64 (index_add_ is deterministic on CUDA, unlike bincount)."""
    return torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, index, x.to(torch.float64))


def group_auc(preds: Tensor, target: Tensor, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group Mann-Whitney AUC with average ranks for ties.

    ``groups`` must be dense indices in [0, n_groups). Returns (auc, n) of shape [n_groups] in
    float64: auc is NaN for groups without both classes, n is the number of rows per group.
    """
    # sort by (group, pred): stable sort by pred, then stable sort by group
    order = torch.argsort(preds, stable=True)
    if n_groups > 1:
        order = order[torch.argsort(groups[order], stable=True)]
    g, p, t = groups[order], preds[order], target[order].to(torch.float64)
    n = g.numel()
    # runs of equal (group, pred) share the average of their (0-based, global) positions
    new_run = torch.ones(n, dtype=torch.bool, device=p.device)
    new_run[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    run_id = torch.cumsum(new_run, 0) - 1
    run_start = new_run.nonzero().squeeze(1)
    run_len = torch.diff(run_start, append=run_start.new_tensor([n]))
    avg_pos = run_start.to(torch.float64) + (run_len - 1).to(torch.float64) / 2
    # 1-based rank within the group = global position - first position of the group + 1
    count = torch.bincount(g, minlength=n_groups)
    group_start = torch.cumsum(count, 0) - count
    rank = avg_pos[run_id] - group_start[g].to(torch.float64) + 1
    n_pos = _segment_sum(t, g, n_groups)
    n_neg = count.to(torch.float64) - n_pos
    rank_sum_pos = _segment_sum(rank * t, g, n_groups)
    auc = (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc = torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, NAN))
    return auc, count


class _CTRMetric(Metric):
    """Shared torchmetrics flags: evaluation-only, no full-state update needed."""

    is_differentiable = False
    full_state_update = False


class AUC(_CTRMetric):
    """Exact binary ROC-AUC (Mann-Whitney, ties count 1/2). NaN if only one class was seen."""

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        preds, target = _check(preds, target)
        self.preds.append(preds)
        self.target.append(target)

    def compute(self) -> Tensor:
        if isinstance(self.preds, list) and not self.preds:
            return torch.tensor(NAN, device=self.device)
        p, t = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        auc, _ = group_auc(p, t, torch.zeros(p.numel(), dtype=torch.long, device=p.device), 1)
        return auc[0].float()


class GAUC(_CTRMetric):
    """Group (per-user) AUC: impression-weighted mean of per-group AUC over groups with both classes.

    Weight of a group = its number of impressions. Ties within a group count 1/2.
    NaN if no group has both classes.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        if groups is None:
            raise ValueError("GAUC.update needs groups (an integer user index per row)")
        preds, target = _check(preds, target, groups)
        self.preds.append(preds)
        self.target.append(target)
        self.groups.append(groups.detach().reshape(-1).long())

    def compute_per_group(self) -> tuple[Tensor, Tensor, Tensor]:
        """Return (group ids, per-group AUC [float64, NaN if one class], impressions per group)."""
        if isinstance(self.preds, list) and not self.preds:
            empty = torch.zeros(0, device=self.device)
            return empty.long(), empty.double(), empty.long()
        p, t, g = dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.groups)
        ids, dense = torch.unique(g, return_inverse=True)
        auc, count = group_auc(p, t, dense, ids.numel())
        return ids, auc, count

    def compute(self) -> Tensor:
        _, auc, count = self.compute_per_group()
        valid = ~auc.isnan()
        if not valid.any():
            return torch.tensor(NAN, device=self.device)
        w = count[valid].to(torch.float64)
        return ((auc[valid] * w).sum() / w.sum()).float()


class LogLoss(_CTRMetric):
    """Mean binary cross-entropy of probabilities clamped to [eps, 1 - eps]. NaN if no data."""

    higher_is_better = False

    def __init__(self, eps: float = 1e-7, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("sum_loss", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        preds, target = _check(preds, target)
        p, t = preds.to(torch.float64).clamp(self.eps, 1 - self.eps), target.to(torch.float64)
        self.sum_loss += -(t * p.log() + (1 - t) * (1 - p).log()).sum()
        self.count += p.numel()

    def compute(self) -> Tensor:
        return (self.sum_loss / self.count).float()  # 0/0 = NaN when empty


class CalibrationRatio(_CTRMetric):
    """Predicted over observed CTR: sum(preds) / sum(target). 1 is perfect; NaN if no positives."""

    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_pred", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_target", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        preds, target = _check(preds, target)
        self.sum_pred += preds.to(torch.float64).sum()
        self.sum_target += target.to(torch.float64).sum()

    def compute(self) -> Tensor:
        if self.sum_target == 0:
            return torch.tensor(NAN, device=self.device)
        return (self.sum_pred / self.sum_target).float()


class ExpectedCalibrationError(_CTRMetric):
    """ECE over ``n_bins`` equal-width bins of [0, 1]: sum_b n_b/N * |mean pred_b - mean target_b|.

    Bin b holds b/n_bins <= p < (b+1)/n_bins (edges compared in float64); p == 1 goes in the
    last bin. NaN if no data.
    """

    higher_is_better = False

    def __init__(self, n_bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        for name in ("count", "sum_pred", "sum_target"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        preds, target = _check(preds, target)
        p = preds.to(torch.float64)
        edges = torch.arange(self.n_bins + 1, dtype=torch.float64, device=p.device) / self.n_bins
        b = (torch.bucketize(p, edges, right=True) - 1).clamp_(0, self.n_bins - 1)
        self.count += _segment_sum(torch.ones_like(p), b, self.n_bins)
        self.sum_pred += _segment_sum(p, b, self.n_bins)
        self.sum_target += _segment_sum(target, b, self.n_bins)

    def compute(self) -> Tensor:
        # n_b/N * |sum_pred_b/n_b - sum_target_b/n_b| = |sum_pred_b - sum_target_b| / N
        return ((self.sum_pred - self.sum_target).abs().sum() / self.count.sum()).float()


def ctr_metrics(prefix: str = "", **kwargs) -> MetricCollection:
    """Standard CTR evaluation collection: auc, gauc, logloss, calibration, ece.

    Update with ``collection.update(preds, target, groups=groups)`` (probabilities, 0/1, user index).
    ``kwargs`` go to every metric (torchmetrics' ``sync_on_compute=False``: a rank-local computation
    that gathers nothing, e.g. over data every rank holds whole).
    """
    return MetricCollection(
        {
            "auc": AUC(**kwargs),
            "gauc": GAUC(**kwargs),
            "logloss": LogLoss(**kwargs),
            "calibration": CalibrationRatio(**kwargs),
            "ece": ExpectedCalibrationError(**kwargs),
        },
        prefix=prefix,
        compute_groups=False,  # every metric has its own states; nothing to share
    )
