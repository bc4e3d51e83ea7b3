"""Non-finite losses and gradients (optim.nonfinite): "fail" stops naming the step, batch and
tensors; "skip" skips the batch with weights, optimiser state and buffers unchanged, and counts
it; a model left with non-finite weights never passes silently."""

import json
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback

from conftest import SIM_SETTINGS
from ctr.data.datamodule import CTRDataModule
from ctr.data.sources.simulator import SimulatorSource
from ctr.guards import NonFiniteError, NonFiniteGuard
from ctr.models import CTRModel, TargetAttention
from ctr.module import CTRModule
from ctr.runs import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
NAN = float("nan")


def trainer(*callbacks, steps: int = 4) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=list(callbacks))


class Poison(Callback):
    """At training batch ``at``: ``what`` = "label" (a NaN label: the loss goes NaN), "param" (a
    NaN weight: logits and loss go NaN) or "grad" (a finite loss whose backward gives the
    parameter a NaN gradient). Records the module's state before and after that batch."""

    def __init__(self, param: str, what: str, at: int = 1):
        self.param, self.what, self.at = param, what, at
        self.before = self.after = None
        self._hook = None

    def _state(self, module, trainer):
        opt = trainer.optimizers[0]
        steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, steps

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx != self.at:
            return
        self.before = self._state(module, trainer)
        p = module.get_parameter(self.param)
        if self.what == "label":
            batch.label[0] = NAN
        elif self.what == "param":
            with torch.no_grad():
                p.view(-1)[0] = NAN
        else:
            self._hook = p.register_hook(lambda g: torch.full_like(g, NAN))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.after = self._state(module, trainer)
            if self._hook is not None:
                self._hook.remove()


@pytest.fixture(scope="module")
def sim_dm(cache_dir):
    dm = CTRDataModule(SimulatorSource("tiny", seed=0), SIM_SETTINGS, cache_dir, batch_size=256)
    dm.prepare_data()
    return dm


def ctr_module(dm, nonfinite: str) -> CTRModule:
    torch.manual_seed(0)
    model = CTRModel(dm.meta, embedding_dim=8, sequence=partial(TargetAttention, hidden=[8], act="dice"),
                     over_hidden=[16])
    return CTRModule(model, nonfinite=nonfinite)


OVER = "model.over.net.0.weight"


@pytest.mark.parametrize("what, names", [
    ("label", ["non-finite training loss (loss nan)", "batch.label [256]: 1 of 256 values non-finite (1 nan, 0 inf)",
               "output.ctr_loss"]),
    ("param", ["non-finite training loss", "output.logits [256]: 256 of 256", f"{OVER} [16, "]),
    ("grad", ["non-finite gradients behind a finite loss", f"{OVER}.grad [16, ", "parameters: all finite"]),
])
def test_fail_names_the_step_batch_and_tensors(sim_dm, what, names):
    module = ctr_module(sim_dm, "fail")
    with pytest.raises(NonFiniteError) as e:
        trainer(Poison(OVER, what)).fit(module, datamodule=sim_dm)
    msg = str(e.value)
    assert "at epoch 0, global step 1, batch 1" in msg and "optim.nonfinite=skip" in msg
    for name in names:
        assert name in msg, msg


@pytest.mark.parametrize("what", ["label", "grad"])
def test_skip_leaves_weights_optimiser_and_buffers_unchanged(sim_dm, what, caplog):
    module = ctr_module(sim_dm, "skip")
    poison = Poison(OVER, what)
    with caplog.at_level("WARNING", logger="ctr.guards"):
        trainer(poison).fit(module, datamodule=sim_dm)
    assert module.nonfinite.skipped == 1
    (before, steps_before), (after, steps_after) = poison.before, poison.after
    assert before.keys() == after.keys()
    for k in before:  # parameters and buffers (Dice running statistics) as before the batch
        assert torch.equal(before[k], after[k]), k
    assert steps_after == steps_before  # Adam took no step either
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.train_samples == 3 * 256  # the skipped batch is not counted as seen
    assert "skipped the batch at epoch 0, global step 1, batch 1" in caplog.text


def test_skip_never_hands_on_a_nan_model(sim_dm):
    """A NaN weight makes every later loss NaN: each batch is skipped, and the end of fitting
    refuses the model."""
    module = ctr_module(sim_dm, "skip")
    with pytest.raises(NonFiniteError, match=r"training ended with non-finite weights \(skipped batches: 3\)"):
        trainer(Poison(OVER, "param")).fit(module, datamodule=sim_dm)


def test_guard_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        NonFiniteGuard("ignore")


# ---- through the entry point: metrics.json ---------------------------------------------------
def compose_sim(overrides, tmp_path, cache_dir):
    from omegaconf import open_dict

    cfg = compose_config(CONF, ["experiment=sim_din", "logger=csv", "trainer.enable_progress_bar=false",
                                *overrides], run_dir=tmp_path / "run", cache_dir=cache_dir,
                         embeddings_dir=tmp_path / "emb")
    with open_dict(cfg):
        cfg.data.source.preset = "tiny"
    return cfg


def test_ctr_train_skip_counts_in_metrics_json(tmp_path, cache_dir, monkeypatch):
    from ctr.train import train

    step = CTRModule.training_step

    def poisoned(self, batch, batch_idx):  # a NaN label in the second batch
        if batch_idx == 1:
            batch.label[0] = NAN
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CTRModule, "training_step", poisoned)
    cfg = compose_sim(["trainer.fast_dev_run=3", "optim.nonfinite=skip"], tmp_path, cache_dir)
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == saved["skipped_batches"] == 1
    assert saved["train_samples"] == 2 * 1024


def test_ctr_train_fail_on_a_diverging_run(tmp_path, cache_dir):
    """A learning rate of 1e30: Adam's first step throws the weights to ~1e30 and the second
    batch's logits overflow. The run stops there, naming the overflowing outputs."""
    from ctr.train import train

    cfg = compose_sim(["trainer.fast_dev_run=3", "optim.lr=1e30"], tmp_path, cache_dir)
    with pytest.raises(NonFiniteError, match=r"(?s)global step 1, batch 1.*output\.logits \[1024\]"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- the contrastive module ------------------------------------------------------------------
@pytest.fixture(scope="module")
def enc_dm(cache_dir):
    from encoders.datamodule import ContrastiveDataModule, SimItems

    dm = ContrastiveDataModule(SimItems("tiny"), {"click": 1.0}, image_size=32, batch_size=8,
                               steps_per_epoch=4, cache_dir=str(cache_dir))
    dm.setup()
    return dm


def contrastive_module(nonfinite: str):
    from encoders.module import ContrastiveModule
    from encoders.towers import ImageTower

    torch.manual_seed(0)
    return ContrastiveModule(ImageTower("lcnet_050", img_size=32), None, embed_dim=16, tasks={"click": 1.0},
                             image_size=32, queue_size=16, nonfinite=nonfinite)


class PoisonViews(Callback):
    """NaN augmented images at training batch ``at`` (embeddings, loss and the tower's BatchNorm
    statistics go NaN); records the module's state before and after that batch."""

    def __init__(self, at: int = 1):
        self.at, self.before, self.after = at, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        augment = module.augment.forward
        if batch_idx == self.at:
            self.before = {k: v.detach().clone() for k, v in module.state_dict().items()}
            module.augment.forward = lambda x: augment(x) * NAN
        elif "forward" in vars(module.augment):
            del module.augment.forward

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.after = {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_contrastive_fail_names_inputs_and_embeddings(enc_dm):
    module = contrastive_module("fail")
    with pytest.raises(NonFiniteError) as e:
        trainer(PoisonViews()).fit(module, datamodule=enc_dm)
    msg = str(e.value)
    assert "non-finite training loss (loss nan) at epoch 0, global step 1, batch 1" in msg
    assert "batch.augmented_images" in msg and "output.image_embeddings" in msg and "output.click_loss" in msg
    assert "parameters: all finite" in msg


def test_contrastive_skip_keeps_queue_and_batchnorm(enc_dm):
    module = contrastive_module("skip")
    poison = PoisonViews()
    trainer(poison).fit(module, datamodule=enc_dm)
    assert module.nonfinite.skipped == 1
    for k in poison.before:  # weights, BatchNorm statistics and the queue as before the batch
        assert torch.equal(poison.before[k], poison.after[k]), k
    assert all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())
    assert module.seen["click"]["steps"] == 3  # the skipped batch is not counted as seen


def test_encoder_train_skip_counts_in_metrics_json(tmp_path, cache_dir, monkeypatch):
    from encoders.module import ContrastiveModule
    from encoders.train import train

    step = ContrastiveModule.training_step

    def poisoned(self, batch, batch_idx):  # NaN augmented views in the second batch
        if batch_idx != 1:
            return step(self, batch, batch_idx)
        augment = self.augment.forward
        self.augment.forward = lambda x: augment(x) * NAN
        try:
            return step(self, batch, batch_idx)
        finally:
            del self.augment.forward

    monkeypatch.setattr(ContrastiveModule, "training_step", poisoned)
    over = ["name=nonfinite", "tasks.self_supervised=0", "tasks.click=1", "image=lcnet_050", "text=none",
            "image_size=32", "module.embed_dim=16", "data.module.batch_size=8", "data.module.source.preset=tiny",
            "trainer.fast_dev_run=2", "optim.nonfinite=skip", "logger=csv", "trainer.enable_progress_bar=false"]
    cfg = compose_config(CONF / "encoders", over, run_dir=tmp_path / "run", cache_dir=cache_dir,
                         embeddings_dir=tmp_path / "emb")
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == saved["skipped_batches"] == 1
    assert saved["seen"]["examples"]["click"] == 8  # one batch of 8 pairs trained, one skipped
