"""Config mistakes stop a run before any training, with a message naming each key: unknown keys
(also in a sweep), bad lengths, sizes, fractions, monitor, optimiser and non-finite mode, and the
encoders' click negatives against the pools they are drawn from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from ctr.checks import ConfigError, check_config, check_encoder_config
from ctr.runs import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def ctr_cfg(overrides, tmp_path=Path("/nonexistent")):
    return compose_config(CONF, overrides, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                          embeddings_dir=tmp_path / "emb")


def enc_cfg(overrides, tmp_path=Path("/nonexistent")):
    cfg = compose_config(CONF / "encoders", [*overrides, "logger=csv", "trainer.enable_progress_bar=false"],
                         run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", embeddings_dir=tmp_path / "emb")
    with open_dict(cfg):
        if cfg.data.module.source._target_.endswith("SimItems") and cfg.data.module.source.preset == "default":
            cfg.data.module.source.preset = "tiny"
    return cfg


# ---- unknown keys: Hydra's struct mode refuses them while composing ---------------------------
@pytest.mark.parametrize("key", ["foo", "model.nonexistent", "data.settings.sequence.maxlen"])
def test_unknown_key_is_refused_by_name(key):
    with pytest.raises(ConfigCompositionException) as e:
        ctr_cfg([f"{key}=1"])
    assert f"Could not override '{key}'" in str(e.value)
    assert f"+{key}=1" in str(e.value)  # how to add a key on purpose


@pytest.mark.parametrize("launcher", ["basic", "local_parallel"])
def test_sweep_over_a_missing_key_fails_before_any_job(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "ctr.train", "-m", "model.nonexistent=1,2", f"hydra.sweep.dir={sweep}"]
    if launcher != "basic":
        args.append(f"hydra/launcher={launcher}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CTR_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)  # the message a user sees, not the stack trace
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Could not override 'model.nonexistent'" in r.stderr + r.stdout
    jobs = [p for p in sweep.rglob("*") if p.is_dir()] if sweep.exists() else []
    assert jobs == []  # no job folder: no job started
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path / "cache").exists()  # nothing was prepared


# ---- the CTR config: one ConfigError listing every mistake -----------------------------------
CTR_MISTAKES = [
    (["data.settings.sequence.max_len=0"], "data.settings: sequence.max_len must be >= 1, got 0"),
    (["data.settings.sequence.max_len=-5"], "data.settings: sequence.max_len must be >= 1, got -5"),
    (["data.settings.fractions=[0.5,0.3,0.1]"],
     "data.settings: fractions must be three non-negative numbers summing to 1, got (0.5, 0.3, 0.1)"),
    (["data.batch_size=0"], "data.batch_size: must be a positive integer (got 0)"),
    (["data.eval_batch_size=-1"], "data.eval_batch_size: must be a positive integer (got -1)"),
    (["+data.train_samples=1.5"], "data: train_samples must be a positive int or a float in (0, 1], got 1.5"),
    (["data=sim", "data.source.preset=huge"],
     "data.source: unknown preset 'huge'; choose from ['default', 'large', 'tiny']"),
    (["model.embedding_dim=0"], "model.embedding_dim: must be a positive integer (got 0)"),
    (["model.over_hidden=[64,0]"], "model.over_hidden: must be a list of positive integers (got [64, 0])"),
    (["model.dropout=1.0"], "model.dropout: must be a number in [0, 1) (got 1.0)"),
    (["experiment=obd_bts_position_tower", "model.position.n_positions=0"],
     "model.position.n_positions: must be a positive integer (the positions the tower has rows for) (got 0)"),
    (["monitor.metric=val/accuracy"], "monitor.metric: must be null or a metric validation logs: val/auc, "
                                      "val/calibration, val/ece, val/gauc, val/logloss (got 'val/accuracy')"),
    (["monitor.mode=min"], "monitor.mode: val/auc improves as it grows: use max (got 'min')"),
    (["monitor.metric=val/logloss"], "monitor.mode: val/logloss improves as it falls: use min (got 'max')"),
    (["optim.optimizer=sgd"], "optim.optimizer: must be one of ['adam', 'adamw'] (got 'sgd')"),
    (["optim.lr=0"], "optim.lr: must be a positive number (got 0)"),
    (["optim.nonfinite=ignore"], "optim.nonfinite: nonfinite must be one of ('fail', 'skip'), got 'ignore'"),
    (["+slices.low.max_quantile=1.5"], "slices.low.max_quantile: must be a number in [0, 1] (got 1.5)"),
    (["optim.plateau={factor:1.5}"], "optim.plateau.factor: must be a number in (0, 1) (got 1.5)"),
    (["optim.plateau={factor:0.1,wait:2}"],
     "optim.plateau: must be null or a mapping of factor, patience, min_lr (got {'factor': 0.1, 'wait': 2})"),
    (["optim.plateau={factor:0.1}", "monitor.metric=null"],
     "optim.plateau: needs a monitored metric (monitor.metric is null) (got {'factor': 0.1})"),
]


def test_every_ctr_mistake_is_listed_at_once():
    over = [o for overrides, _ in CTR_MISTAKES[:5] for o in overrides if "-5" not in o] + ["optim.lr=0"]
    with pytest.raises(ConfigError) as e:
        check_config(ctr_cfg(over))
    lines = e.value.problems
    assert len(lines) == 4  # the settings stop at their first mistake (max_len): one line for them
    assert {x.split(":")[0] for x in lines} == {"optim.lr", "data.batch_size", "data.eval_batch_size", "data.settings"}
    assert str(e.value).startswith("4 config mistakes, found before training:")


def test_config_error_survives_pickling():  # joblib's workers send it back pickled
    import pickle

    e = pickle.loads(pickle.dumps(ConfigError(["a: b (got 1)", "c: d"])))
    assert e.problems == ["a: b (got 1)", "c: d"] and str(e).startswith("2 config mistakes")


def test_every_preset_passes(tmp_path):
    for p in sorted((CONF / "experiment").glob("*.yaml")):
        check_config(ctr_cfg([f"experiment={p.stem}"], tmp_path))
    for p in sorted((CONF / "encoders" / "experiment").glob("*.yaml")):
        check_encoder_config(enc_cfg([f"experiment={p.stem}"], tmp_path))


def test_ctr_train_stops_before_preparing_anything(tmp_path):
    from ctr.train import train

    cfg = ctr_cfg(["experiment=sim_din", "data.settings.sequence.max_len=0"], tmp_path)
    with pytest.raises(ConfigError, match="data.settings: sequence.max_len must be >= 1, got 0"):
        train(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# ---- the encoders' config --------------------------------------------------------------------
ENC_MISTAKES = [
    (["data.module.batch_size=0"], "data.module.batch_size: must be a positive integer (got 0)"),
    (["data.module.n_shown=-1"],
     "data.module.n_shown: must be a non-negative integer (click task hard negatives) (got -1)"),
    (["data.module.source.fractions=[0.9,0.2,0.1]"],
     "data.module.source.fractions: must be three non-negative numbers summing to 1 (got [0.9, 0.2, 0.1])"),
    (["data.module.source.preset=huge"],
     "data.module.source: unknown preset 'huge'; choose from ['default', 'large', 'tiny']"),
    (["module.queue_size=-5"], "module.queue_size: must be a non-negative integer (0: no queue) (got -5)"),
    (["module.matryoshka_dims=[8,512]"],
     "module.matryoshka_dims: must be positive integers up to module.embed_dim (128), or null (got [8, 512])"),
    (["text.max_length=0"], "text.max_length: must be a positive integer (tokens) (got 0)"),
    (["image_size=0"], "image_size: must be a positive integer (pixels) (got 0)"),
    (["tasks.self_supervised=0"], "tasks: no task has a positive weight (got {'self_supervised': 0, "
                                  "'image_text': 0.0, 'click': 0.0, 'same_product': 0.0})"),
    (["monitor.mode=min"], "monitor.mode: val/search/recall@10 improves as it grows: use max (got 'min')"),
    (["optim.optimizer=adam"], "optim.optimizer: must be one of ['adamw', 'sgd'] (got 'adam')"),
]


MISTAKES = [("ctr", *m) for m in CTR_MISTAKES] + [("encoders", *m) for m in ENC_MISTAKES]


@pytest.mark.parametrize("entry, overrides, line", MISTAKES, ids=[f"{e}: {' '.join(o)}" for e, o, _ in MISTAKES])
def test_each_mistake_is_named(entry, overrides, line):
    check, compose = (check_config, ctr_cfg) if entry == "ctr" else (check_encoder_config, enc_cfg)
    with pytest.raises(ConfigError) as e:
        check(compose(overrides))
    assert e.value.problems == [line]
    assert str(e.value).startswith("1 config mistake, found before training:\n  ")


def test_encoder_negatives_larger_than_their_pools_stop_before_training(tmp_path, cache_dir):
    """The tiny simulator shows 10 items per request (at most 9 shown-but-unclicked) and has
    about 25 items per category: 50 and 500 hard negatives cannot be met; a monitored metric that
    validation does not log is named too. All before the first training step."""
    from encoders.train import train

    cfg = enc_cfg(["name=pools", "tasks.self_supervised=0", "tasks.click=1", "image=lcnet_050", "text=none", "image_size=32",
                   "module.embed_dim=16", "data.module.batch_size=8", "data.module.n_shown=50",
                   "data.module.n_category=500", "monitor.metric=val/search/recall@3",
                   "data.module.steps_per_epoch=2", "trainer.max_epochs=1"], tmp_path)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache_dir)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    lines = e.value.problems
    assert len(lines) == 3, lines
    assert lines[0].startswith("data.module.n_shown: more than the shown-but-unclicked items of any training "
                               "click's request (at most 9)") and lines[0].endswith("(got 50)")
    assert lines[1].startswith("data.module.n_category: more than the other training items in any clicked "
                               "item's category (at most ") and lines[1].endswith("(got 500)")
    assert lines[2].startswith("monitor.metric: must be null or a metric validation logs: val/search/recall@1, ")
    assert lines[2].endswith("(got 'val/search/recall@3')")
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "metrics.json").exists()
