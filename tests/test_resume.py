"""Interrupted runs: a run killed by SIGKILL and started again with the same command resumes from
its last checkpoint and ends with the metrics of an uninterrupted run, bit for bit (CPU, one
thread); a run folder holding a different run is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the tiny simulator (16 training batches an epoch), DIN with dropout, early stopping
SIM = ["experiment=sim_din", "data.source.preset=tiny", "monitor.patience=1", "threads=1", "logger=csv",
       "trainer.enable_progress_bar=false"]
# the contrastive pretraining preset, tiny: 4 steps an epoch, augmentations and a cosine schedule
ENC = ["experiment=pretrain", "data.module.source.preset=tiny", "image_size=32", "data.module.steps_per_epoch=4",
       "data.module.batch_size=8", "data.module.eval_batch_size=64", "trainer.max_epochs=3", "threads=1",
       "logger=csv", "trainer.enable_progress_bar=false"]


def run_cli(module: str, overrides: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **env_extra, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests" / "helpers"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def final(run: Path) -> tuple[dict, dict]:
    """What a run ends with: its metrics (timings left out) and its best weights."""
    m = json.loads((run / "metrics.json").read_text())
    timing = ("seconds", "per_s", "_time_s", "_s")
    m = {k: v for k, v in m.items() if k not in ("checkpoint", "data_path") and not k.endswith(timing)}
    if "embeddings" in m:  # the exported table: the second run finds the first one's (same fingerprint)
        m["embeddings"] = {k: v for k, v in m["embeddings"].items() if k != "reused"}
    return m, torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]


def assert_same_end(a: Path, b: Path) -> None:
    (ma, wa), (mb, wb) = final(a), final(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == mb[k], k
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_and_resume(module: str, args: list[str], tmp_path: Path, env: dict, from_step: int | None = None,
                    **kill) -> Path:
    """Run, SIGKILLed as ``kill`` says; check that ``last.ckpt`` is the one of step ``from_step``
    (when given); run the same command again."""
    run, marker = tmp_path / "killed", tmp_path / "killed.marker"
    cmd = [*args, f"hydra.run.dir={run}", "+callbacks.kill._target_=killers.KillAt", f"+callbacks.kill.marker={marker}",
           *(f"+callbacks.kill.{k}={v}" for k, v in kill.items())]
    r = run_cli(module, cmd, env)
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])  # SIGKILL
    assert marker.exists() and not (run / "metrics.json").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    if from_step is not None:  # the checkpoint the resume starts from (inside an epoch or at its end)
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == from_step
    r = run_cli(module, cmd, env)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "csv" / "resume1").is_dir()  # it resumed (a fresh start would not keep the first log)
    return run


def clean_run(module: str, args: list[str], tmp_path: Path, env: dict) -> Path:
    run = tmp_path / "clean"
    r = run_cli(module, [*args, f"hydra.run.dir={run}"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("every, accumulate, step, from_step", [(None, 1, 24, 16), (5, 1, 24, 20), (3, 2, 11, 9)])
def test_ctr_killed_mid_epoch_resumes_bit_identical(tmp_path, cache_dir, every, accumulate, step, from_step):
    """Killed in the middle of the second epoch (16 batches an epoch); it resumes from the first
    epoch's end, or with checkpoint_every_n_steps from the last multiple of it (skipping the epoch's
    batches done); with gradient accumulation, from the start of an accumulation window."""
    env = {"CTR_CACHE_DIR": str(cache_dir)}
    args = [*SIM, "trainer.max_epochs=3", *([f"checkpoint_every_n_steps={every}"] if every else []),
            *([f"+trainer.accumulate_grad_batches={accumulate}"] if accumulate > 1 else [])]
    clean = clean_run("ctr.train", args, tmp_path, env)
    killed = kill_and_resume("ctr.train", args, tmp_path, env, from_step=from_step, step=step)
    assert_same_end(clean, killed)


@pytest.mark.slow
def test_ctr_killed_after_early_stopping_does_not_train_on(tmp_path, cache_dir):
    """Killed while testing, after early stopping ended fit before max_epochs: the restarted run
    must not train another epoch (the stopping decision is in the checkpoint)."""
    env = {"CTR_CACHE_DIR": str(cache_dir)}
    args = [*SIM, "trainer.max_epochs=10"]
    clean = clean_run("ctr.train", args, tmp_path, env)
    assert json.loads((clean / "metrics.json").read_text())["epochs"] < 10  # it did stop early
    assert_same_end(clean, kill_and_resume("ctr.train", args, tmp_path, env))


@pytest.mark.slow
def test_encoder_killed_mid_epoch_resumes_bit_identical(tmp_path, cache_dir):
    """4 steps an epoch, a checkpoint every 2 steps: killed after step 7, resumed from step 6."""
    env = {"CTR_CACHE_DIR": str(cache_dir), "CTR_EMBED_DIR": str(tmp_path / "emb")}
    args = [*ENC, "checkpoint_every_n_steps=2"]
    assert_same_end(clean_run("encoders.train", args, tmp_path, env),
                    kill_and_resume("encoders.train", args, tmp_path, env, from_step=6, step=7))


@pytest.mark.slow
def test_moon2_killed_mid_epoch_resumes_bit_identical(tmp_path, cache_dir):
    """MOON2.0 on 400 real H&M and Fashion items, 4 steps an epoch, a checkpoint every 2 steps:
    killed after step 7, resumed from step 6."""
    from conftest import data_dir

    env = {"CTR_CACHE_DIR": str(cache_dir), "CTR_DATA_DIR": str(data_dir())}
    args = ["experiment=moon2_full", "data.n_items=400", "data.batch_size=16", "image_size=64",
            "data.steps_per_epoch=4", "trainer.max_epochs=3", "checkpoint_every_n_steps=2", "threads=1",
            "logger=csv", "trainer.enable_progress_bar=false"]
    assert_same_end(clean_run("encoders.moon2.train", args, tmp_path, env),
                    kill_and_resume("encoders.moon2.train", args, tmp_path, env, from_step=6, step=7))


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, cache_dir):
    from omegaconf import open_dict

    from ctr.resume import ResumeError, check_resumable, comparable_config
    from ctr.runs import compose_config

    cfg = compose_config(ROOT / "conf", [*SIM, "trainer.max_epochs=3"], run_dir=tmp_path, cache_dir=cache_dir,
                         embeddings_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"callbacks": {"ResumeState": {"config": json.dumps(comparable_config(cfg))}}}, last)
    assert check_resumable(cfg, tmp_path) == str(last)
    with open_dict(cfg):  # run control and paths may change: threads, progress bar, length, folders
        cfg.threads, cfg.trainer.enable_progress_bar, cfg.trainer.max_epochs = 2, True, 5
        cfg.data.cache_dir = str(tmp_path / "elsewhere")
    assert check_resumable(cfg, tmp_path)
    with open_dict(cfg):
        cfg.optim.lr = 0.5
    with pytest.raises(ResumeError, match=r"optim\.lr: recorded 0\.001, now 0\.5"):
        check_resumable(cfg, tmp_path)
    with open_dict(cfg):
        cfg.resume = False  # start over in the folder: the earlier run's last.ckpt goes
    assert check_resumable(cfg, tmp_path) is None and not last.exists()
