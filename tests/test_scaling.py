"""Scaling-law studies: the power-law fit, run collection, train subsets, FLOPs, sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import scaling  # noqa: E402


def synthetic(a=2.0, b=0.5, c=0.1, noise=0.002, seed=0):
    rng = np.random.default_rng(seed)
    x = np.repeat(np.geomspace(100, 10_000, 6), 2)
    return x, a * x ** -b + c + rng.normal(0, noise, len(x))


def test_fit_recovers_a_known_law_with_intervals_and_extrapolates():
    x, y = synthetic()
    res = scaling.analyse([{"x": u, "L": v} for u, v in zip(x, y)], holdout=1, n_boot=300)
    f = res["fit"]
    assert f["r2"] > 0.99
    for k, true in (("a", 2.0), ("b", 0.5), ("c", 0.1)):
        lo, hi = f["ci"][k]
        assert lo <= true <= hi, (k, lo, hi)
    assert abs(f["b"] - 0.5) < 0.05 and abs(f["c"] - 0.1) < 0.01
    (held,) = res["extrapolation"]["held_out"]
    assert held["x"] == 10_000 and abs(held["rel_error"]) < 0.03 and held["inside"]
    assert [lv["n"] for lv in res["levels"]] == [2] * 6


def test_pure_power_law_and_bad_inputs():
    x = np.geomspace(1, 1000, 5)
    f = scaling.fit_power_law(x, 3.0 * x ** -0.3, offset=False)
    assert f["c"] == 0 and f["b"] == pytest.approx(0.3, abs=1e-9) and f["a"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="3 distinct"):
        scaling.fit_power_law([1, 1, 2, 2], [1, 1, 0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1, 2, 3], [1, 0, 0.5])
    # a loss that grows with x gets a negative exponent, not a forced flat law
    grow = scaling.fit_power_law(x, 0.3 + 0.05 * x ** 0.2)
    assert grow["b"] < 0 and grow["r2"] > 0.99


def _run(d: Path, metrics: dict | None = None, failed: dict | None = None):
    d.mkdir(parents=True)
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if failed is not None:
        (d / "failed.json").write_text(json.dumps(failed))


def test_collect_report_and_failures(tmp_path):
    x, y = synthetic(c=0.2)
    for i, (u, v) in enumerate(zip(x, y)):
        _run(tmp_path / "runs" / f"{i}", {"seed": i % 2, "axes": {"n": u}, "test": {"search/recall@10": 1 - v},
                                          "wall_seconds": 2.0, "train_flops": 1e9})
    _run(tmp_path / "runs" / "99", failed={"error": "ValueError: boom", "axes": {"n": 7}, "seed": 0})
    runs, failed = scaling.collect([tmp_path / "runs"], "axes.n", "test.search/recall@10", one_minus=True)
    assert len(runs) == 12 and [f["error"] for f in failed] == ["ValueError: boom"]
    assert sorted(r["L"] for r in runs) == pytest.approx(sorted(y))
    study = scaling.STUDIES["sim_pairs"]
    res = scaling.report("demo", study, [tmp_path / "runs"], tmp_path / "out", "axes.n", "test.search/recall@10",
                         True, holdout=1, n_boot=100)
    md = (tmp_path / "out" / "demo.md").read_text()
    assert "failed: " in md and "ValueError: boom" in md and "Extrapolation" in md and "24 s" in md
    assert (tmp_path / "out" / "demo.png").stat().st_size > 1000
    assert "[demo](demo.md)" in scaling.index(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert saved["fit"]["b"] == pytest.approx(res["fit"]["b"]) and len(saved["runs"]) == 12
    with pytest.raises(KeyError, match="metrics.json.*lacks 'axes.m'"):
        scaling.collect([tmp_path / "runs"], "axes.m", "test.search/recall@10")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        scaling.collect([tmp_path / "nope"], "axes.n", "x")


def test_every_study_names_a_preset():
    for name, s in scaling.STUDIES.items():
        conf = ROOT / "conf" / ("encoders/experiment" if s.entry == "encoders.train" else "experiment")
        assert (conf / f"{s.preset}.yaml").exists(), name


def test_train_subset_is_nested_and_checked(tiny_sim, cache_dir):
    from ctr.data.datamodule import CTRDataModule
    from ctr.data.sources.simulator import SimulatorSource
    from conftest import SIM_SETTINGS

    def dm(**kw):
        d = CTRDataModule(SimulatorSource("tiny", seed=0), SIM_SETTINGS, cache_dir, **kw)
        d.setup()
        return d

    n = len(dm().stores["train"])
    quarter, half = dm(train_samples=0.25), dm(train_samples=0.5)
    assert quarter.n_train == round(0.25 * n) and half.n_train == round(0.5 * n)
    assert set(quarter.train_index.tolist()) <= set(half.train_index.tolist())  # nested
    assert torch.equal(dm(train_samples=0.25, seed=3).train_index, quarter.train_index)  # same for every seed
    latest = dm(train_samples=100, train_subset="latest")
    assert latest.train_index.tolist() == list(range(n - 100, n))
    batches = list(latest.train_dataloader())
    assert sum(len(b) for b in batches) == 100
    seen = torch.cat([b.label for b in batches]).sort().values
    assert torch.equal(seen, latest.stores["train"].label[n - 100:].sort().values)
    with pytest.raises(ValueError, match="has .* impressions"):
        dm(train_samples=n + 1)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="train_samples"):
            CTRDataModule(SimulatorSource("tiny", seed=0), SIM_SETTINGS, cache_dir, train_samples=bad)


def test_forward_flops_counts_matmuls():
    from ctr.runs import forward_flops

    lin = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4))
    assert forward_flops(lin, torch.zeros(5, dtype=torch.long)) == 2 * 8 * 4
    assert lin.training  # the mode is restored


def _env(cache_dir, tmp_path):
    return {**os.environ, "CTR_CACHE_DIR": str(cache_dir), "CTR_EMBED_DIR": str(tmp_path / "emb"),
            "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


@pytest.mark.slow
def test_parallel_sweep_keeps_going_past_a_failed_run(tmp_path, cache_dir):
    """A joblib multirun of the tokens preset on the tiny simulator where one job fails: the other
    finishes, the failed one leaves failed.json, the sweep exits non-zero, scaling.py lists it."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ctr.train", "-m", "experiment=scale_sim_tokens", "data.source.preset=tiny",
           "data.train_samples=0.5,2.0", "seed=0", "trainer.max_epochs=1", "threads=1", "logger=csv",
           "trainer.enable_progress_bar=false",
           "hydra/launcher=local_parallel", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir, tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout[-2000:]
    runs, failed = scaling.collect([sweep], "tokens_seen", "test_random.logloss")
    assert len(runs) == 1 and len(failed) == 1 and "train_samples" in failed[0]["error"]
    m = json.loads(next(sweep.rglob("metrics.json")).read_text())
    assert m["axes"] == {"train_fraction": 0.5} and m["train_samples"] == m["train_impressions"] > 0
    assert m["flops_per_sample"] > 0 and m["train_flops"] > 0 and m["wall_seconds"] > 0
    assert m["history_tokens_seen"] > 0 and m["parameters"] > 0


@pytest.mark.slow
def test_submitit_local_sweep_of_an_encoder_axis(tmp_path, cache_dir):
    """The negatives preset through submitit (the SLURM launcher's local twin): two queue sizes."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "encoders.train", "-m", "experiment=scale_negatives",
           "data.module.source.preset=tiny", "image_size=32", "module.queue_size=0,16", "seed=0",
           "data.module.steps_per_epoch=3", "data.module.batch_size=8", "data.module.eval_batch_size=64",
           "threads=1", "logger=csv", "trainer.enable_progress_bar=false",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir, tmp_path), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs, failed = scaling.collect([sweep], "seen.negatives_per_query.click", "test.search/recall@10", True)
    assert len(runs) == 2 and not failed
    # 7 in-batch negatives; with a queue of 16 the second and third steps add 8 and 16
    assert sorted(r["x"] for r in runs) == pytest.approx([7.0, 7 + (0 + 8 + 16) / 3])
    m = json.loads(next(sweep.rglob("metrics.json")).read_text())
    assert m["tokens_seen"] == 24 and m["flops_per_image"] > 0 and m["wall_seconds"] > 0


def test_slurm_launcher_config_composes():
    r = subprocess.run([sys.executable, "-m", "ctr.train", "experiment=scale_sim_tokens", "hydra/launcher=slurm",
                        "--cfg", "hydra", "--package", "hydra.launcher"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SlurmLauncher" in r.stdout and "max_num_timeout: 3" in r.stdout


@pytest.mark.slow
def test_run_command_sweeps_fits_and_refits(tmp_path, cache_dir, monkeypatch):
    """`scaling.py run` on the tiny simulator (3 subset sizes, one seed), then `fit` on its folder."""
    for k, v in _env(cache_dir, tmp_path).items():
        monkeypatch.setenv(k, v)
    over = ["data.source.preset=tiny", "data.train_samples=0.25,0.5,1.0", "trainer.max_epochs=2", "threads=1",
            "logger=csv",
            "trainer.enable_progress_bar=false"]
    args = ["--out", str(tmp_path / "docs"), "--runs-root", str(tmp_path / "runs"), "--bootstrap", "50"]
    assert scaling.main(["run", "sim_tokens", *args, "--seeds", "0", "--", *over]) == 0
    res = json.loads((tmp_path / "docs" / "sim_tokens.json").read_text())
    assert len(res["runs"]) == 3 and len(res["levels"]) == 3 and not res["failed"]
    xs = sorted(r["x"] for r in res["runs"])
    assert xs[2] == pytest.approx(4 * xs[0], rel=0.01)  # training impressions: a quarter, a half, all
    docs = tmp_path / "docs"
    assert (docs / "sim_tokens.png").exists() and "sim_tokens" in (docs / "summary.md").read_text()
    assert scaling.main(["fit", "sim_tokens", *args]) == 0  # refits the newest sweep
