"""Every experiment preset composes from the real configs and runs under fast_dev_run."""

import json
from pathlib import Path

import pytest
from ctr.runs import compose_config
from omegaconf import open_dict

from ctr.train import format_table, train

from conftest import data_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_run(overrides, tmp_path, cache_dir):
    cfg = compose_config(CONF, [*overrides, "logger=csv"], run_dir=tmp_path / "run", cache_dir=cache_dir,
                         embeddings_dir=tmp_path / "embeddings")
    with open_dict(cfg):
        if "SimulatorSource" in cfg.data.source._target_:
            cfg.data.source.preset = "tiny"
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_preset(experiment, tmp_path, cache_dir, sim_table):
    if not experiment.startswith("sim"):
        data_dir()
    cfg = compose_run([f"experiment={experiment}", "trainer.fast_dev_run=true"], tmp_path, cache_dir)
    if cfg.model.get("visual"):  # an exported table of the tiny simulator's items
        with open_dict(cfg):
            cfg.model.visual.table, cfg.model.visual.embeddings_dir = sim_table[1], str(sim_table[0])
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["experiment"] == experiment
    for split in ["val", *cfg.data.eval_splits]:
        assert set(saved[split]) >= {"auc", "gauc", "logloss", "calibration", "ece"}
    assert saved["data_fingerprint"] == metrics["data_fingerprint"]
    assert saved["train_samples"] > 0 and saved["train_samples_per_s"] > 0
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and json.loads((run / "env.json").read_text())["packages"]["torch"]
    assert "test" in format_table(metrics)
    if cfg.get("slices"):  # the low-impression items, measured apart
        assert saved["slices"]["low_impression"]["items"] > 0
        assert set(saved["test_random"]) >= {"low_impression/auc", "low_impression/ece"}
    if cfg.model.get("visual"):
        assert saved["visual"]["fingerprint"] == sim_table[1]
        assert saved["visual"]["debias"] == bool(cfg.model.visual.debias)


def test_sim_reports_true_ctr_oracle(tmp_path, cache_dir):
    cfg = compose_run(["experiment=sim_din", "trainer.fast_dev_run=true"], tmp_path, cache_dir)
    metrics = train(cfg)
    oracle = metrics["oracle"]["test_random"]
    assert 0.6 < oracle["auc"] < 1.0 and abs(oracle["calibration"] - 1) < 0.2
    assert "test_random (true_ctr oracle)" in format_table(metrics)


@pytest.mark.slow
def test_short_real_training_on_ml100k(tmp_path, cache_dir):
    data_dir()
    cfg = compose_run(["experiment=ml100k_dnn", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"],
                      tmp_path, cache_dir)
    metrics = train(cfg)
    assert metrics["test"]["auc"] > 0.70 and metrics["test"]["gauc"] > 0.70
    assert metrics["best_epoch"] is not None and Path(metrics["checkpoint"]).exists()


def test_samples_seen_count_every_epoch_and_survive_a_resume(tmp_path, cache_dir):
    """tokens_seen counts every training impression (not those up to the best epoch, whose
    weights are reloaded for evaluation), and a resumed run counts on from its checkpoint."""
    over = ["experiment=scale_sim_tokens", "data.train_samples=0.5", "trainer.max_epochs=2",
            "monitor.patience=null", "trainer.enable_progress_bar=false"]
    cfg = compose_run(over, tmp_path, cache_dir)
    m = train(cfg)
    n = m["train_impressions"]
    assert m["tokens_seen"] == m["train_samples"] == 2 * n and m["epochs"] == 2
    assert m["train_flops"] == pytest.approx(3 * m["flops_per_sample"] * 2 * n)
    with open_dict(cfg):
        cfg.trainer.max_epochs, cfg.resume = 3, True
    m3 = train(cfg)
    assert m3["tokens_seen"] == 3 * n and m3["history_tokens_seen"] > m["history_tokens_seen"]
    # the first attempt's CSV log is kept beside the resumed one's
    csv = tmp_path / "run" / "csv"
    assert (csv / "metrics.csv").exists() and (csv / "resume1" / "metrics.csv").exists()


def test_plateau_lowers_the_learning_rate_and_its_checkpoints_reload(tmp_path, cache_dir):
    import torch

    from ctr.module import CTRModule

    # the schedule: a validation without a better monitored value multiplies every rate by factor
    module = CTRModule(torch.nn.Linear(3, 1), lr=1e-3, plateau={"factor": 0.1, "patience": 0})
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["monitor"] == "val/auc"
    for auc, lr in [(0.70, 1e-3), (0.71, 1e-3), (0.705, 1e-4), (0.71, 1e-5), (0.72, 1e-5)]:
        sched.step(auc)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    with pytest.raises(ValueError, match="monitored metric"):
        CTRModule(torch.nn.Linear(3, 1), plateau={"factor": 0.5}, monitor=None).configure_optimizers()
    # a real run: its checkpoints (scheduler state, hyperparameters) are plain data and reload
    cfg = compose_run(["experiment=sim_din", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
                       "optim.plateau={factor:0.5,patience:0}"], tmp_path, cache_dir)
    m = train(cfg)
    ckpt = torch.load(m["checkpoint"], weights_only=True)
    assert ckpt["hyper_parameters"]["plateau"] == {"factor": 0.5, "patience": 0}
    assert ckpt["lr_schedulers"][0]["factor"] == 0.5
