"""MOON2.0 presets: every preset under fast_dev_run on real H&M and Fashion items, and a short
real training whose benchmark reaches metrics.json."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from conftest import data_dir
from ctr.runs import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "moon2"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_run(overrides, run_dir: Path, cache_dir: Path):
    data_dir()
    cfg = compose_config(CONF, [*overrides, "logger=csv", "trainer.enable_progress_bar=false"],
                         run_dir=run_dir, cache_dir=cache_dir)
    with open_dict(cfg):
        cfg.data.n_items = 400  # every source: H&M's first 400 articles, 400 Fashion items
        cfg.data.batch_size = 16
        cfg.image_size = 64
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_preset(experiment, tmp_path, cache_dir):
    from encoders.moon2.train import train

    cfg = compose_run([f"experiment={experiment}", "trainer.fast_dev_run=true"], tmp_path / "run", cache_dir)
    train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["experiment"] == experiment
    assert set(saved["benchmark"]) == {"hm", "fashion"}
    fashion = saved["benchmark"]["fashion"]
    assert {"item/t2i/r@10", "item/i2mm/r@10", "item/mm2t/r@1", "zs_image/acc", "probe_colour/acc"} <= set(fashion)
    assert np.isnan(fashion["variant/mm2mm/r@10"])  # Fashion items are their own products: no variants
    assert "variant/i2mm/r@1" in saved["benchmark"]["hm"]
    assert json.loads((tmp_path / "run" / "benchmark.json").read_text())["benchmark"] == saved["benchmark"]
    assert saved["coaug"] == (experiment not in ("moon2_no_coaug", "dual_encoder"))


@pytest.mark.slow
def test_short_training_learns_and_logs_the_moon2_signals(tmp_path, cache_dir):
    from encoders.moon2.train import train

    cfg = compose_run(["experiment=moon2_full", "trainer.max_epochs=2", "trainer.log_every_n_steps=5"],
                      tmp_path / "run", cache_dir)
    m = train(cfg)
    assert m["best_epoch"] is not None and Path(m["checkpoint"]).exists()
    rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    for col in ("train/filtered_share_step", "train/filtered_share_epoch", "train/w_t2mm_epoch", "train/w_intra_epoch", "train/balance",
                "train/router_entropy", "train/aug_kept_share", "val/mean_r@1", "val/i2mm/r@10"):
        assert col in head, col
    # the consistency filter ran from epoch 1 and kept part of the augmented views
    assert 0 < m["augmented_kept"] <= m["augmented_views"]
    # the robust weighting gives the largest weight to the objective with the largest loss
    objs = ("t2mm", "i2mm", "mm2mm", "intra")
    w = [m["train_last"][f"train/w_{o}_epoch"] for o in objs]
    loss = [m["train_last"][f"train/{o}_loss_epoch"] for o in objs]
    assert int(np.argmax(w)) == int(np.argmax(loss)) and max(w) > 1.0
    # training lowers every objective's loss from the first epoch to the last
    import polars as pl

    log = pl.read_csv(tmp_path / "run" / "csv" / "metrics.csv", infer_schema_length=None)
    for o in objs:
        per_epoch = log.filter(pl.col(f"train/{o}_loss_epoch").is_not_null())[f"train/{o}_loss_epoch"].to_list()
        assert len(per_epoch) == 2 and per_epoch[1] < per_epoch[0], o
    hm = m["benchmark"]["hm"]
    # re-evaluating the best checkpoint (benchmark.py on the run folder) gives the same numbers
    from encoders.moon2.benchmark import evaluate_run

    again = evaluate_run(tmp_path / "run", force=True)
    for k in ("variant/i2mm/r@1", "item/i2t/r@10", "zs_mm/acc"):
        assert again["hm"][k] == pytest.approx(hm[k], abs=1e-6), k
