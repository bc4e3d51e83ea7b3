"""Sweeps survive failures: a multirun job that fails is recorded with its error (failed.json) and
the other jobs finish; the analyses report the missing points instead of failing. (The joblib and
submitit launchers are exercised in test_scaling.py; the exchange rate in test_exchange_rate.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctr.runs import missing_runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import scaling  # noqa: E402


@pytest.mark.slow
def test_basic_launcher_multirun_finishes_past_a_failed_job(tmp_path, cache_dir):
    """Hydra's default launcher, the failing job first: the second still runs to its metrics."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ctr.train", "-m", "experiment=sim_din", "data.source.preset=tiny",
           "model.dropout=1.5,0.1", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "threads=1",
           "logger=csv", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "CTR_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout[-2000:]  # the sweep says that a job failed
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    failed = json.loads((jobs[0] / "failed.json").read_text())
    assert "dropout" in failed["error"] and "Traceback" in failed["traceback"]
    assert not (jobs[0] / "metrics.json").exists()
    assert json.loads((jobs[1] / "metrics.json").read_text())["train_samples"] > 0
    runs, failures = scaling.collect([sweep], "train_samples", "test.logloss")
    assert len(runs) == 1 and len(failures) == 1 and "dropout" in failures[0]["error"]
    lines = missing_runs({j.name: j for j in jobs})
    assert len(lines) == 1 and "dropout" in lines[0]


def test_missing_runs_names_failed_and_absent_runs(tmp_path):
    done, failed, absent = tmp_path / "done", tmp_path / "failed", tmp_path / "absent"
    done.mkdir(), failed.mkdir()
    (done / "metrics.json").write_text("{}")
    (failed / "failed.json").write_text(json.dumps({"error": "ValueError: boom"}))
    lines = missing_runs({"a seed 0": done, "a seed 1": failed, "a seed 2": absent})
    assert lines == [f"- a seed 1 ({failed}): ValueError: boom",
                     f"- a seed 2 ({absent}): no metrics.json and no failed.json (not run, or killed)"]
