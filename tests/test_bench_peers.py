"""The side-by-side benchmark's fairness checks: the peer's preprocessing (what a DeepCTR-Torch user
writes, in pandas) yields this project's ML100K-CTR v1 split, and the check catches a difference;
both systems are scored by the same metric code."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_peers", ROOT / "experiments" / "bench_peers.py")


@pytest.fixture(scope="module")
def peer():
    pytest.importorskip("pandas")
    return _load("deepctr_din", ROOT / "experiments" / "peers" / "deepctr_din.py")


def test_peer_preprocessing_is_our_split(ml100k, peer, bench, tmp_path):
    data = peer.preprocess(_ml100k_dir())
    check = peer.split_check(data)
    np.savez(tmp_path / "split_check.npz", **check)
    msg = bench.check_same_split(ml100k.path, tmp_path)
    assert "100,000 labels" in msg
    # the check is not a formality: one flipped label, one shifted history item
    bad = dict(check)
    bad["val_label"] = check["val_label"].copy()
    bad["val_label"][17] = 1 - bad["val_label"][17]
    np.savez(tmp_path / "split_check.npz", **bad)
    with pytest.raises(AssertionError, match="val labels differ"):
        bench.check_same_split(ml100k.path, tmp_path)
    bad = dict(check)
    bad["test_hist_item"] = check["test_hist_item"].copy()
    row = int(np.flatnonzero(check["test_hist_len"] > 3)[0])
    bad["test_hist_item"][row, [0, 1]] = bad["test_hist_item"][row, [1, 0]]
    np.savez(tmp_path / "split_check.npz", **bad)
    with pytest.raises(AssertionError, match="test histories differ"):
        bench.check_same_split(ml100k.path, tmp_path)


def _ml100k_dir() -> Path:
    from ctr.data.sources.movielens import MovieLens100K

    return MovieLens100K().path


def test_both_systems_are_scored_by_the_same_metrics(bench):
    """``score`` is this project's metric code: AUC as the Mann-Whitney statistic, GAUC per group."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 400).astype(np.float32)
    pred = np.clip(0.3 * label + rng.random(400) * 0.7, 1e-4, 1 - 1e-4).astype(np.float32)
    groups = rng.integers(0, 7, 400)
    got = bench.score(pred, label, groups)
    pos, neg = pred[label == 1], pred[label == 0]
    auc = ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
    assert got["auc"] == pytest.approx(auc, abs=1e-6)
    ll = -np.mean(label * np.log(pred) + (1 - label) * np.log(1 - pred))
    assert got["logloss"] == pytest.approx(ll, rel=1e-5)
    assert 0.5 < got["gauc"] <= 1.0
