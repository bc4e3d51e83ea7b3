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


def basic_sweep(sweep: Path, cache_dir: Path, dropouts: str, logger: str, env: dict):
    """``python -m ctr.train -m`` (Hydra's basic launcher: the jobs run in one process) over
    ``model.dropout=<dropouts>`` on the tiny simulator; returns the process and the job folders."""
    cmd = [sys.executable, "-m", "ctr.train", "-m", "experiment=sim_din", "data.source.preset=tiny",
           f"model.dropout={dropouts}", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "threads=1",
           f"logger={logger}", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CTR_CACHE_DIR": str(cache_dir), **env},
                       capture_output=True, text=True, timeout=300)
    return r, sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())


@pytest.mark.slow
def test_basic_launcher_multirun_finishes_past_a_failed_job(tmp_path, cache_dir):
    """Hydra's default launcher, the failing job first: the second still runs to its metrics."""
    r, jobs = basic_sweep(tmp_path / "sweep", cache_dir, "1.5,0.1", "csv", {"WANDB_MODE": "disabled",
                                                                            "HYDRA_FULL_ERROR": "0"})
    assert r.returncode != 0, r.stdout[-2000:]  # the sweep says that a job failed
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    failed = json.loads((jobs[0] / "failed.json").read_text())
    assert "dropout" in failed["error"] and "Traceback" in failed["traceback"]
    assert not (jobs[0] / "metrics.json").exists()
    assert json.loads((jobs[1] / "metrics.json").read_text())["train_samples"] > 0
    runs, failures = scaling.collect([tmp_path / "sweep"], "train_samples", "test.logloss")
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


@pytest.mark.slow
def test_each_job_of_an_in_process_sweep_gets_its_own_wandb_run(tmp_path, cache_dir):
    """Hydra's basic launcher runs the jobs in one process; Lightning's WandbLogger leaves its run
    open, so without ending it the second job logged into the first job's run."""
    r, jobs = basic_sweep(tmp_path / "sweep", cache_dir, "0.1,0.2", "default", {"WANDB_MODE": "offline",
                                                                                 "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [sorted((j / "wandb").glob("offline-run-*")) for j in jobs]
    assert [len(x) for x in runs] == [1, 1], runs
    assert runs[0][0].name.split("-")[-1] != runs[1][0].name.split("-")[-1]  # two run ids


def test_a_failed_run_ends_its_wandb_run(tmp_path, monkeypatch):
    """A job that raises marks its wandb run failed and closes it (the next job starts its own)."""
    import wandb
    from omegaconf import OmegaConf

    from ctr.runs import failure_recorded

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run")}, "seed": 0, "name": "x"})
    wandb.init(dir=str(tmp_path), project="t")
    assert wandb.run is not None
    with pytest.raises(ValueError), failure_recorded(cfg):
        raise ValueError("boom")
    assert wandb.run is None and (tmp_path / "run" / "failed.json").exists()
