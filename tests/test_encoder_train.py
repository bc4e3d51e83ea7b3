"""The contrastive module and its presets: every preset under fast_dev_run, init_from, export."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ctr.runs import compose_config
from omegaconf import open_dict

from conftest import data_dir
from encoders.export import load_embeddings
from encoders.train import format_table, train

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoders"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_run(overrides, run_dir: Path, cache_dir: Path, emb_dir: Path):
    cfg = compose_config(CONF, [*overrides, "logger=csv", "trainer.enable_progress_bar=false"],
                         run_dir=run_dir, cache_dir=cache_dir, embeddings_dir=emb_dir)
    with open_dict(cfg):
        src = cfg.data.module.source
        if src._target_.endswith("SimItems"):
            src.preset = "tiny"
            cfg.image_size = 32  # the presets' towers, at a quarter of the pixels
        else:
            src.n_items = 96
        cfg.data.module.eval_batch_size = 64
    return cfg


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, cache_dir):
    """A short real pretrain run on the tiny simulator (2 epochs of 2 steps)."""
    root = tmp_path_factory.mktemp("enc")
    cfg = compose_run(["experiment=pretrain", "trainer.max_epochs=2", "data.module.steps_per_epoch=2",
                       "data.module.batch_size=8"], root / "pretrain", cache_dir, root / "emb")
    return cfg, train(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_preset(experiment, tmp_path, cache_dir, pretrained_run):
    over = [f"experiment={experiment}", "trainer.fast_dev_run=true"]
    if experiment == "posttrain":
        over.append(f"init_from={pretrained_run[0].paths.run_dir}")
    if experiment.startswith("hm"):
        data_dir()
        over += ["data.module.batch_size=8", "image_size=64"]
    cfg = compose_run(over, tmp_path / "run", cache_dir, tmp_path / "emb")
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["experiment"] == experiment
    key = cfg.data.monitor.split("/", 1)[1]
    assert key in saved["test"] and key in saved["init"]["test"]
    if experiment.startswith("hm"):  # held-out products: image-text retrieval is scored too
        assert {"i2t_r@10", "t2i_r@10"} <= set(saved["test"])
    else:  # the simulator's titles are all training pairs: no image-text retrieval scores
        assert not any(k.startswith(("i2t", "t2i")) for k in saved["test"])
    ids, emb = load_embeddings(saved["embeddings"]["fingerprint"], tmp_path / "emb")
    assert len(ids) == saved["items"]["n"] and emb.shape[1] == cfg.module.embed_dim
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert "test" in format_table(metrics)


def test_posttrain_needs_init_from(tmp_path, cache_dir):
    cfg = compose_run(["experiment=posttrain", "trainer.fast_dev_run=true"], tmp_path / "run", cache_dir,
                      tmp_path / "emb")
    with pytest.raises(ValueError, match="init_from=<encoder run folder"):
        train(cfg)


def test_posttrain_starts_from_the_pretrain_weights_and_export_is_reused(tmp_path, cache_dir, pretrained_run):
    pre_cfg, pre = pretrained_run
    assert pre["best_epoch"] is not None and Path(pre["checkpoint"]).exists()
    assert pre["train_samples_per_s"] > 0 and pre["step_time_s"] > 0 and pre["data_time_s"] is not None
    # max_epochs=0: no training, so the post-train run's encoder is the pretrain's best checkpoint
    cfg = compose_run(["experiment=posttrain", f"init_from={pre_cfg.paths.run_dir}", "trainer.max_epochs=0",
                       "data.module.steps_per_epoch=2"], tmp_path / "post", cache_dir,
                      Path(pre_cfg.paths.embeddings_dir))
    post = train(cfg)
    assert post["init_from"]["checkpoint"].endswith("best.ckpt")
    assert post["embeddings"]["fingerprint"] == pre["embeddings"]["fingerprint"]
    assert post["embeddings"]["reused"] is True
    assert post["init"]["test"] == pytest.approx(pre["test"])  # same weights, same numbers
    # a mismatched tower cannot start from it
    bad = compose_run(["experiment=posttrain", f"init_from={pre_cfg.paths.run_dir}", "image=resnet18", "image.trainable=null",
                       "trainer.fast_dev_run=true"], tmp_path / "bad", cache_dir, tmp_path / "emb")
    with pytest.raises(ValueError, match="lacks .* weights"):
        train(bad)


def test_module_losses_clamp_and_queue(cache_dir):
    from encoders.datamodule import ContrastiveDataModule, SimItems
    from encoders.module import ContrastiveModule
    from encoders.towers import ImageTower, SmallTextTower

    text = SmallTextTower(dim=16, layers=1, heads=2, max_length=8)
    tasks = {"self_supervised": 1.0, "image_text": 0.5, "click": 1.0}
    m = ContrastiveModule(ImageTower("lcnet_050", img_size=32), text, embed_dim=16, tasks=tasks,
                          image_size=32, matryoshka_dims=[4, 8], queue_size=20,
                          logit_scale={"init": 200.0, "max": 100.0})
    dm = ContrastiveDataModule(SimItems("tiny"), tasks, image_size=32, batch_size=8, cache_dir=str(cache_dir),
                               tokenize=text.tokenize)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    m.log = lambda *a, **k: None  # outside a Trainer
    m._t_step = 0.0
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in m.image_tower.parameters() if p.requires_grad)
    assert m.scales["click"].log_scale.grad is not None
    assert len(m.queues["click"]) == 8 and len(m.queues["image_text"]) == 8
    # what training saw: 8 click pairs, each query against 7 in-batch + 8 hard negatives (the
    # queue was empty); a second step adds the 8 queued positives
    assert m.seen["click"]["examples"] == 8 and m.seen["click"]["negatives"] == 15
    m.training_step(batch, 1)
    s = m.seen_summary()
    assert s["examples"]["click"] == 16 and s["negatives_per_query"]["click"] == pytest.approx((15 + 23) / 2)
    assert s["negatives_per_query"]["self_supervised"] == 14 and s["tokens"] == 48
    m.on_train_batch_end(None, batch, 0)
    assert float(m.scales["click"]()) == pytest.approx(100.0)  # clamped after the step
    with pytest.raises(ValueError, match="text tower"):
        ContrastiveModule(ImageTower("lcnet_050", img_size=32), None, tasks={"image_text": 1.0})


def test_tower_delay_trains_the_heads_first():
    from encoders.module import ContrastiveModule
    from encoders.towers import ImageTower

    m = ContrastiveModule(ImageTower("lcnet_050", img_size=32), embed_dim=8, image_size=32, lr=1e-3,
                          tower_lr=1e-4, warmup_steps=2, tower_delay_steps=3)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    tower = {id(p) for p in m.image_tower.parameters()}
    is_tower = [id(g["params"][0]) in tower for g in opt.param_groups]
    assert any(is_tower) and not all(is_tower)
    assert not any(p.requires_grad for p in m.image_tower.parameters())  # frozen during the delay
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, row in enumerate(lrs):
        for lr, t in zip(row, is_tower):
            if t:  # 0 for 3 steps, then a 2-step warm-up to tower_lr
                assert lr == pytest.approx([0, 0, 0, 0.5e-4, 1e-4, 1e-4][step])
            else:
                assert lr == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3][step])
    m.hparams.tower_delay_steps = 0  # (global_step is 0 outside a trainer)
    m.on_train_batch_start({}, 0)
    assert all(p.requires_grad for p in m.image_tower.parameters())


def test_cached_tower_features_match_the_tower(cache_dir):
    """cache_tower_features: a frozen tower's features computed once per item, the same as the
    tower's own (training and evaluation); refused for a trainable tower or augmented views."""
    from encoders.datamodule import ContrastiveDataModule, SimItems
    from encoders.images import to_float
    from encoders.module import ContrastiveModule
    from encoders.towers import ImageTower

    torch.manual_seed(0)
    tasks = {"click": 1.0}
    tower = ImageTower("lcnet_050", img_size=32, freeze=True)
    m = ContrastiveModule(tower, None, embed_dim=16, tasks=tasks, image_size=32, queue_size=8,
                          cache_tower_features=True)
    dm = ContrastiveDataModule(SimItems("tiny"), tasks, image_size=32, batch_size=8, cache_dir=str(cache_dir))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    m.log = lambda *a, **k: None
    m._t_step = 0.0
    loss = m.training_step(batch, 0)
    loss.backward()
    assert m.image_head.net.weight.grad is not None and not any(p.grad is not None for p in tower.parameters())
    rows, imgs = batch["rows"], batch["images"]
    assert int(m._cached.sum()) == len(rows)
    with torch.no_grad():
        direct = m.image_tower(to_float(imgs, 32))
    assert torch.allclose(m.tower_features(rows, imgs), direct, atol=1e-5)
    assert torch.allclose(m.eval_images(imgs, rows), m.eval_images(imgs), atol=1e-5)
    with pytest.raises(ValueError, match="frozen image tower"):
        ContrastiveModule(ImageTower("lcnet_050", img_size=32), None, tasks=tasks, cache_tower_features=True)
    with pytest.raises(ValueError, match="self_supervised"):
        ContrastiveModule(ImageTower("lcnet_050", img_size=32, freeze=True), None,
                          tasks={"self_supervised": 1.0}, cache_tower_features=True)
