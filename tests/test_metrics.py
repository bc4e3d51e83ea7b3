"""ctr.metrics against plain Python/numpy reference implementations."""

import math

import numpy as np
import pytest
import torch
from _gloo import free_port, gloo_group

import ctr  # noqa: F401  (installs the torchvision hook before torchmetrics is imported)
from ctr.metrics import AUC, GAUC, CalibrationRatio, ExpectedCalibrationError, LogLoss, ctr_metrics

SEEDS = [0, 1, 2, 3]


# ---------------------------------------------------------------- references (obvious, slow)


def ref_auc(p, t):
    pos, neg = p[t == 1], p[t == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


def ref_gauc(p, t, g):
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        a = ref_auc(p[m], t[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
    return num / den if den else math.nan


def ref_logloss(p, t, eps=1e-7):
    p = np.clip(p.astype(np.float64), eps, 1 - eps)
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def ref_ece(p, t, n_bins=15):
    p = p.astype(np.float64)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (p >= lo) & ((p < hi) | ((b == n_bins - 1) & (p == 1.0)))
        if m.any():
            ece += m.sum() / len(p) * abs(p[m].mean() - t[m].mean())
    return ece


def make_data(seed, n=600, n_groups=40, decimals=1):
    """Tie-heavy probabilities; a few groups have a single class (all-0 / all-1 / one row)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, n_groups, n) * 7 + 1000  # sparse, non-contiguous user ids
    p = np.round(rng.random(n), decimals).astype(np.float32)
    t = (rng.random(n) < 0.2 + 0.6 * p).astype(np.int64)
    t[g == 1000] = 0  # single-class groups
    t[g == 1007] = 1
    g[0] = 99_999  # a singleton group
    return torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(g)


def close(a, b, tol=1e-6):
    a = float(a)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [1, 2])
def test_against_reference(seed, decimals):
    p, t, g = make_data(seed, decimals=decimals)
    pn, tn, gn = p.numpy(), t.numpy(), g.numpy()
    expected = {
        "auc": ref_auc(pn, tn),
        "gauc": ref_gauc(pn, tn, gn),
        "logloss": ref_logloss(pn, tn),
        "calibration": float(pn.astype(np.float64).sum() / tn.sum()),
        "ece": ref_ece(pn, tn),
    }
    got = ctr_metrics()
    got.update(p, t, groups=g)
    got = got.compute()
    for k, v in expected.items():
        assert close(got[k], v), (k, float(got[k]), v)


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_bins_and_edges(n_bins):
    # values exactly on bin edges, 0 and 1 included
    p = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.7, 0.9, 1.0, 1.0, 0.3, 0.6], dtype=torch.float64)
    t = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 0, 1])
    m = ExpectedCalibrationError(n_bins=n_bins)
    m.update(p, t)
    assert close(m.compute(), ref_ece(p.numpy(), t.numpy(), n_bins))
    assert m.count.sum() == len(p)
    assert m.count[-1] >= 2  # both 1.0s in the last bin


def test_auc_simple_values():
    auc = AUC()
    auc.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert close(auc.compute(), 0.75)
    auc.reset()
    auc.update(torch.full((6,), 0.5), torch.tensor([0, 1, 0, 1, 1, 0]))  # all tied
    assert close(auc.compute(), 0.5)


def test_gauc_per_group():
    p, t, g = make_data(5)
    m = GAUC()
    m.update(p, t, groups=g)
    ids, auc, count = m.compute_per_group()
    for u, a, c in zip(ids.tolist(), auc.tolist(), count.tolist()):
        mask = g == u
        assert c == int(mask.sum())
        assert close(a, ref_auc(p[mask].numpy(), t[mask].numpy()))
    assert auc.isnan().sum() >= 3  # all-0, all-1 and singleton groups


@pytest.mark.parametrize("seed", SEEDS)
def test_accumulation_equals_single_update(seed):
    p, t, g = make_data(seed)
    one, many = ctr_metrics(), ctr_metrics()
    one.update(p, t, groups=g)
    for idx in torch.tensor_split(torch.randperm(len(p), generator=torch.Generator().manual_seed(seed)), 5):
        many.update(p[idx], t[idx].float(), groups=g[idx])  # float targets work too
    a, b = one.compute(), many.compute()
    for k in a:
        assert close(b[k], float(a[k])), k


def test_forward_returns_batch_value_and_accumulates():
    p, t, g = make_data(0)
    m = AUC()
    batch = m(p[:300], t[:300])
    assert close(batch, ref_auc(p[:300].numpy(), t[:300].numpy()))
    m(p[300:], t[300:])
    assert close(m.compute(), ref_auc(p.numpy(), t.numpy()))


# ---------------------------------------------------------------- NaN cases


def test_nan_cases():
    p = torch.tensor([0.2, 0.7, 0.7])
    for t in (torch.zeros(3), torch.ones(3)):  # one class only
        auc, gauc = AUC(), GAUC()
        auc.update(p, t)
        gauc.update(p, t, groups=torch.tensor([0, 0, 1]))
        assert math.isnan(auc.compute())
        assert math.isnan(gauc.compute())
    # both classes overall but no single group has both
    gauc = GAUC()
    gauc.update(p, torch.tensor([0, 1, 1]), groups=torch.tensor([0, 1, 1]))
    assert math.isnan(gauc.compute())
    cal = CalibrationRatio()
    cal.update(p, torch.zeros(3))
    assert math.isnan(cal.compute())
    # no data at all
    with pytest.warns(UserWarning):  # torchmetrics warns about compute() before update()
        for m in (AUC(), GAUC(), LogLoss(), CalibrationRatio(), ExpectedCalibrationError()):
            assert math.isnan(m.compute())


def test_logloss_clamps_extremes():
    m = LogLoss()
    m.update(torch.tensor([0.0, 1.0]), torch.tensor([1, 0]))
    assert close(m.compute(), -math.log(1e-7), tol=1e-4)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("metric", [AUC, GAUC, LogLoss, CalibrationRatio, ExpectedCalibrationError])
def test_input_validation(metric):
    m = metric()
    g = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.rand(3), torch.ones(4), groups=g)
    with pytest.raises(ValueError, match="NaN"):
        m.update(torch.tensor([0.1, math.nan, 0.3]), torch.ones(3), groups=g)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(torch.tensor([0.1, 1.5, 0.3]), torch.ones(3), groups=g)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(torch.tensor([-2.0, 0.5, 0.3]), torch.ones(3), groups=g)
    with pytest.raises(ValueError, match="target"):
        m.update(torch.rand(3), torch.tensor([0, 2, 1]), groups=g)
    with pytest.raises(ValueError, match="floating"):
        m.update(torch.tensor([0, 1, 1]), torch.ones(3), groups=g)


def test_gauc_validation():
    m = GAUC()
    with pytest.raises(ValueError, match="groups"):
        m.update(torch.rand(3), torch.ones(3))
    with pytest.raises(ValueError, match="groups"):
        m.update(torch.rand(3), torch.ones(3), groups=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.rand(3), torch.ones(3), groups=torch.zeros(3))


# ---------------------------------------------------------------- collection


def test_collection_keys_and_prefix():
    mc = ctr_metrics(prefix="val/")
    assert set(mc.keys()) == {f"val/{k}" for k in ("auc", "gauc", "logloss", "calibration", "ece")}
    p, t, g = make_data(0)
    mc.update(p, t, groups=g)
    mc.update(p, t, groups=g)  # a second update, after compute groups would have been formed
    out = mc.compute()
    assert set(out) == set(mc.keys())
    assert all(torch.isfinite(v) for v in out.values())


# ---------------------------------------------------------------- distributed (gloo, 2 CPU processes)


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    with gloo_group(rank, world, port):
        p, t, g = make_data(7)
        mine = torch.arange(len(p))[rank::world][: 250 + 50 * rank]  # uneven shards, rest dropped
        mc = ctr_metrics()
        mc.update(p[mine], t[mine], groups=g[mine])
        out = {k: float(v) for k, v in mc.compute().items()}
        if rank == 0:
            queue.put(out)


@pytest.mark.slow
def test_distributed_matches_single_process():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn")
    got = queue.get()
    p, t, g = make_data(7)
    idx = torch.cat([torch.arange(len(p))[r::2][: 250 + 50 * r] for r in range(2)])
    ref = ctr_metrics()
    ref.update(p[idx], t[idx], groups=g[idx])
    for k, v in ref.compute().items():
        assert close(got[k], float(v)), k
