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


def module_state(module, trainer) -> tuple[dict, list[float]]:
    """Copies of ``module``'s state dict and its optimiser's step counts."""
    opt = trainer.optimizers[0]
    steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, steps


def poison_batch_1(monkeypatch, cls, poison) -> None:
    """``cls.training_step`` with ``poison(module, batch)`` applied for training batch 1 (it returns
    a function undoing it)."""
    step = cls.training_step

    def poisoned(self, batch, batch_idx):
        if batch_idx != 1:
            return step(self, batch, batch_idx)
        undo = poison(self, batch)
        try:
            return step(self, batch, batch_idx)
        finally:
            undo()

    monkeypatch.setattr(cls, "training_step", poisoned)


class Poison(Callback):
    """At training batch ``at``: ``what`` = "label" (a NaN label: the loss goes NaN), "param" (a
    NaN weight: logits and loss go NaN) or "grad" (a finite loss whose backward gives the
    parameter a NaN gradient). Records the module's state before and after that batch."""

    def __init__(self, param: str, what: str, at: int = 1):
        self.param, self.what, self.at = param, what, at
        self.before = self.after = None
        self._hook = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx != self.at:
            return
        self.before = module_state(module, trainer)
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
            self.after = module_state(module, trainer)
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

    def nan_label(module, batch):  # a NaN label in the second batch
        batch.label[0] = NAN
        return lambda: None

    poison_batch_1(monkeypatch, CTRModule, nan_label)
    cfg = compose_sim(["trainer.fast_dev_run=3", "optim.nonfinite=skip"], tmp_path, cache_dir)
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == saved["skipped_batches"] == 1
    assert saved["train_samples"] == 2 * cfg.data.batch_size


def test_ctr_train_fail_on_a_diverging_run(tmp_path, cache_dir):
    """A learning rate of 1e30: Adam's first step throws the weights to ~1e30 and the second
    batch's logits overflow. The run stops there, naming the overflowing outputs."""
    from ctr.train import train

    cfg = compose_sim(["trainer.fast_dev_run=3", "optim.lr=1e30"], tmp_path, cache_dir)
    logits = rf"output\.logits \[{cfg.data.batch_size}\]"
    with pytest.raises(NonFiniteError, match=rf"(?s)global step 1, batch 1.*{logits}"):
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

    def nan_views(module, batch):  # NaN augmented views in the second batch
        augment = module.augment.forward
        module.augment.forward = lambda x: augment(x) * NAN
        return lambda: delattr(module.augment, "forward")

    poison_batch_1(monkeypatch, ContrastiveModule, nan_views)
    over = ["name=nonfinite", "tasks.self_supervised=0", "tasks.click=1", "image=lcnet_050", "text=none",
            "image_size=32", "module.embed_dim=16", "data.module.batch_size=8", "data.module.source.preset=tiny",
            "trainer.fast_dev_run=2", "optim.nonfinite=skip", "logger=csv", "trainer.enable_progress_bar=false"]
    cfg = compose_config(CONF / "encoders", over, run_dir=tmp_path / "run", cache_dir=cache_dir,
                         embeddings_dir=tmp_path / "emb")
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == saved["skipped_batches"] == 1
    assert saved["seen"]["examples"]["click"] == 8  # one batch of 8 pairs trained, one skipped


# ---- shared by the MOON2.0 and Creative4U modules ---------------------------------------------
class PoisonBatch(Callback):
    """At training batch ``at``: a NaN at ``batch[key][index]`` (a dict batch); records the module's
    state and the optimiser's step counts before and after that batch (as :class:`Poison`)."""

    def __init__(self, key: str, at: int = 1, index=0):
        self.key, self.at, self.index = key, at, index
        self.before = self.after = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.at:
            self.before = module_state(module, trainer)
            batch[self.key][self.index] = NAN

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.after = module_state(module, trainer)


def assert_unchanged(poison, module) -> None:
    """Weights, buffers and the optimiser's step counts as before the poisoned batch, all finite."""
    (before, steps_before), (after, steps_after) = poison.before, poison.after
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert steps_after == steps_before  # AdamW took no step either
    assert all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def assert_checkpoint_keeps_count(trainer_, tmp_path, skipped: int) -> None:
    from ctr.resume import safe_load

    path = tmp_path / "last.ckpt"
    trainer_.save_checkpoint(path)
    assert safe_load(path)["nonfinite"] == {"skipped": skipped}


# ---- MOON2.0 -----------------------------------------------------------------------------------
def moon2_loader(n: int = 40, batch_size: int = 8):
    import numpy as np

    from encoders.data import ItemSet
    from encoders.moon2.data import TripleBatches
    from encoders.moon2.features import Products, TokenSet

    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(n // 2), 2)
    cat = rng.integers(0, 3, n)
    items = ItemSet(name="t", item_ids=np.arange(n), images=np.zeros((n, 3, 8, 8), np.uint8),
                    titles=[f"t{g}" for g in group], category=cat, group=group, split=np.full(n, "train"))
    tokens = TokenSet(rng.normal(size=(n, 4, 6)).astype(np.float16), rng.normal(size=(n, 5, 3)).astype(np.float16),
                      np.ones((n, 5), bool))
    ds = TripleBatches(Products(items, {"type": cat.astype(str)}), tokens, batch_size=batch_size, seed=0)
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)


def moon2_module(nonfinite: str):
    from encoders.moon2.module import Moon2Module

    torch.manual_seed(0)
    return Moon2Module(6, 3, encoder={"kind": "fusion", "dim": 8, "layers": 1, "heads": 2, "embed_dim": 8,
                                      "ffn": "moe", "ffn_mult": 2, "experts": 2, "top_k": 1,
                                      "image_tokens": 4, "text_tokens": 5},
                       filtering={"enabled": True}, warmup_steps=1, nonfinite=nonfinite)


M2 = "encoder.out.weight"


@pytest.mark.parametrize("poison, names", [
    (PoisonBatch("q_image"), ["non-finite training loss (loss nan)", "batch.q_image [8, 4, 6]: 24 of 192",
                              "output.q_mm_embeddings [8, 8]", "output.t2mm_loss", "parameters: all finite"]),
    (Poison(M2, "grad"), ["non-finite gradients behind a finite loss", f"{M2}.grad [8, 8]: 64 of 64"]),
], ids=["loss", "grad"])
def test_moon2_fail_names_the_step_batch_and_tensors(poison, names):
    module = moon2_module("fail")
    with pytest.raises(NonFiniteError) as e:
        trainer(poison).fit(module, train_dataloaders=moon2_loader())
    msg = str(e.value)
    assert "at epoch 0, global step 1, batch 1" in msg
    for name in names:
        assert name in msg, msg


@pytest.mark.parametrize("make", [lambda: PoisonBatch("q_text"), lambda: Poison(M2, "grad")], ids=["loss", "grad"])
def test_moon2_skip_leaves_weights_and_optimiser_unchanged(make, tmp_path):
    module, poison = moon2_module("skip"), make()
    t = trainer(poison)
    t.fit(module, train_dataloaders=moon2_loader())
    assert module.nonfinite.skipped == 1
    assert_unchanged(poison, module)
    assert_checkpoint_keeps_count(t, tmp_path, 1)


# ---- Creative4U: SFT, GRPO, the pointwise baseline ---------------------------------------------
@pytest.fixture(scope="module")
def creative_parts():
    """Eight creatives' (random) tower tokens, a vocabulary, 16 training pairs and 32 cells."""
    import numpy as np
    import polars as pl_

    from ctr.creative.data import CreativeImages, PairDataset
    from ctr.creative.prompts import answer_only
    from ctr.creative.selector import WordVocab

    rng = np.random.default_rng(0)
    images = CreativeImages(np.zeros((8, 3, 8, 8), np.uint8), rng.normal(size=(8, 4, 6)).astype(np.float32))
    prompts = [f"query {w} red dress" for w in ("summer", "winter", "party", "office")]
    n = 16
    pairs = pl_.DataFrame({"row_a": rng.integers(0, 8, n), "row_b": rng.integers(0, 8, n),
                           "label": ["A", "B"] * (n // 2), "gap": np.ones(n), "pair_id": np.arange(n),
                           "prompt": [prompts[i % 4] for i in range(n)],
                           "target": [answer_only("AB"[i % 2]) for i in range(n)]})
    vocab = WordVocab.from_texts(prompts + [answer_only("A"), answer_only("B"), "<think> </think>"])
    cells = pl_.DataFrame({"row": rng.integers(0, 8, 32), "impressions": np.full(32, 100.0),
                           "clicks": rng.integers(0, 20, 32).astype(float),
                           "prompt": [prompts[i % 4] for i in range(32)]})
    return images, vocab, PairDataset(pairs), cells


def selector(parts):
    from ctr.creative.selector import SmallSelector

    images, vocab, _, _ = parts
    torch.manual_seed(0)
    policy = SmallSelector(vocab, image_dim=6, image_tokens=4, d_model=16, n_layers=1, n_heads=2, dropout=0.0,
                           max_prompt=8, max_completion=16, image_grid=None)
    policy.bind(images)
    return policy


def pair_loader(parts, batch_size: int = 4):
    ds = parts[2]
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=ds.collate)


class PoisonTokens(Callback):
    """NaN tower tokens for the creatives of training batch ``at`` (the policy's image inputs)."""

    def __init__(self, at: int = 1):
        self.at, self.saved = at, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.at:
            tokens = module.policy._images.tokens
            self.saved = tokens.copy()
            tokens[batch["a"][0].item()] = NAN

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.saved is not None:
            module.policy._images.tokens[:] = self.saved
            self.saved = None


def test_sft_fail_names_the_step_batch_and_tensors(creative_parts):
    from ctr.creative.module import SFTModule

    module = SFTModule(selector(creative_parts), nonfinite="fail")
    poison = PoisonTokens()
    with pytest.raises(NonFiniteError) as e:
        trainer(poison).fit(module, train_dataloaders=pair_loader(creative_parts))
    creative_parts[0].tokens[:] = poison.saved  # (the callback's end of batch never came)
    msg = str(e.value)
    assert "non-finite training loss (loss nan) at epoch 0, global step 1, batch 1" in msg
    assert "batch.prompts.img_a [4, 4, 6]: 24 of 96 values non-finite (24 nan, 0 inf)" in msg, msg
    assert "output.token_logprobs [4, " in msg and "parameters: all finite" in msg


def test_sft_skip_leaves_weights_and_optimiser_unchanged(creative_parts, tmp_path):
    from ctr.creative.module import SFTModule

    module = SFTModule(selector(creative_parts), nonfinite="skip")
    poison = Poison("policy.img_in.1.weight", "grad")
    t = trainer(poison)
    t.fit(module, train_dataloaders=pair_loader(creative_parts))
    assert module.nonfinite.skipped == 1
    assert_unchanged(poison, module)
    assert_checkpoint_keeps_count(t, tmp_path, 1)


def grpo_module(parts, nonfinite: str, updates: int = 2):
    from ctr.creative.module import GRPOModule

    return GRPOModule(selector(parts), group_size=2, max_new_tokens=6, updates_per_batch=updates,
                      warmup_steps=1, nonfinite=nonfinite)


GP = "policy.img_in.1.weight"


class PoisonUpdate(Callback):
    """GRPO: NaN gradients for ``param`` in update ``update`` of training batch ``at`` (the earlier
    updates of that batch are finite and applied); records the state around the batch."""

    def __init__(self, param: str, at: int = 1, update: int = 1):
        self.param, self.at, self.update = param, at, update
        self.before = self.after = None
        self._hook = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx != self.at:
            return
        self.before = module_state(module, trainer)
        calls = iter(range(1000))
        self._hook = module.get_parameter(self.param).register_hook(
            lambda g: torch.full_like(g, NAN) if next(calls) == self.update else g)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.after = module_state(module, trainer)
            self._hook.remove()


class PoisonAdvantages(Callback):
    """GRPO: a NaN advantage in the sampled batch of training batch ``at`` (a NaN loss)."""

    def __init__(self, at: int = 1):
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        sample = type(module).sample
        if batch_idx == self.at:
            def poisoned(batch_):
                s = sample(module, batch_)
                s["adv"][0] = NAN
                return s
            module.sample = poisoned
        elif "sample" in vars(module):
            del module.sample


@pytest.mark.parametrize("make, names", [
    (PoisonAdvantages, ["non-finite training loss (loss nan) at epoch 0, global step 2, batch 1",
                        "output.advantages [8]: 1 of 8 values non-finite", "parameters: all finite"]),
    (lambda: Poison(GP, "param"), ["non-finite weights before sampling at epoch 0, global step 2, batch 1",
                                   f"{GP} [16, 6]: 1 of 96 values non-finite"]),
    (lambda: PoisonUpdate(GP), ["non-finite gradients behind a finite loss", "global step 3, batch 1",
                                f"{GP}.grad [16, 6]: 96 of 96"]),
], ids=["loss", "weights", "grad"])
def test_grpo_fail_names_the_step_batch_and_tensors(creative_parts, make, names):
    module = grpo_module(creative_parts, "fail")
    with pytest.raises(NonFiniteError) as e:
        trainer(make(), steps=8).fit(module, train_dataloaders=pair_loader(creative_parts))
    msg = str(e.value)
    for name in names:
        assert name in msg, msg


@pytest.mark.parametrize("update", [0, 1])
def test_grpo_skip_undoes_every_update_of_the_batch(creative_parts, update, tmp_path):
    """Two updates per sampled batch; a NaN gradient in the first or the second update of batch 1:
    neither update stays (the first one is taken back), the optimiser steps on, counted once."""
    module = grpo_module(creative_parts, "skip")
    poison = PoisonUpdate(GP, update=update)
    t = trainer(poison, steps=8)
    t.fit(module, train_dataloaders=pair_loader(creative_parts))
    assert module.nonfinite.skipped == 1
    assert_unchanged(poison, module)
    assert t.global_step == 8  # 4 batches x 2 updates: the skipped batch's steps are counted
    assert_checkpoint_keeps_count(t, tmp_path, 1)


def test_grpo_skip_never_hands_on_a_nan_model(creative_parts):
    """NaN weights: no batch can be sampled, each is skipped, and the end of fitting refuses them."""
    module = grpo_module(creative_parts, "skip", updates=1)
    with pytest.raises(NonFiniteError, match=r"training ended with non-finite weights \(skipped batches: 3\)"):
        trainer(Poison(GP, "param")).fit(module, train_dataloaders=pair_loader(creative_parts))


def pointwise_module(parts, nonfinite: str):
    from ctr.creative.pointwise import PointwiseCTR, PointwiseModule

    images, vocab, _, _ = parts
    torch.manual_seed(0)
    model = PointwiseCTR(vocab, 6, hidden=8, dropout=0.0)
    model.bind(images)
    return PointwiseModule(model, warmup_steps=1, nonfinite=nonfinite)


def test_pointwise_fail_names_the_step_batch_and_tensors(creative_parts):
    from ctr.creative.pointwise import cell_loader

    module = pointwise_module(creative_parts, "fail")
    with pytest.raises(NonFiniteError) as e:
        trainer(PoisonBatch("clicks")).fit(module, train_dataloaders=cell_loader(creative_parts[3], 8, False))
    msg = str(e.value)
    assert "non-finite training loss (loss nan) at epoch 0, global step 1, batch 1" in msg
    assert "batch.clicks [8]: 1 of 8 values non-finite (1 nan, 0 inf)" in msg and "output.nll [8]: 1 of 8" in msg


def test_pointwise_skip_leaves_weights_and_resumes_with_its_count(creative_parts, tmp_path):
    from ctr.creative.pointwise import cell_loader

    module, poison = pointwise_module(creative_parts, "skip"), PoisonBatch("clicks")
    t = trainer(poison)
    t.fit(module, train_dataloaders=cell_loader(creative_parts[3], 8, False))
    assert module.nonfinite.skipped == 1
    assert_unchanged(poison, module)
    assert_checkpoint_keeps_count(t, tmp_path, 1)
    again = pointwise_module(creative_parts, "skip")  # resumed: counts on from the checkpoint
    trainer(steps=6).fit(again, train_dataloaders=cell_loader(creative_parts[3], 8, False),
                         ckpt_path=tmp_path / "last.ckpt")
    assert again.nonfinite.skipped == 1 and again.global_step == 6


# ---- through the entry points: metrics.json ----------------------------------------------------
def nan_clicks(module, batch):
    batch["clicks"][0] = NAN
    return lambda: None


def nan_logprobs(module, batch):
    logprobs = module.policy.token_logprobs
    module.policy.token_logprobs = lambda *a: logprobs(*a) * NAN
    return lambda: delattr(module.policy, "token_logprobs")


def nan_advantage(module, batch):
    sample = module.sample

    def poisoned(batch_):
        s = sample(batch_)
        s["adv"][0] = NAN
        return s

    module.sample = poisoned
    return lambda: delattr(module, "sample")


@pytest.mark.parametrize("experiment, stage, cls, poison", [
    ("creative_pointwise", "pointwise", "ctr.creative.pointwise.PointwiseModule", nan_clicks),
    ("creative_sft_answer", "sft", "ctr.creative.module.SFTModule", nan_logprobs),
    ("creative_grpo", "grpo", "ctr.creative.module.GRPOModule", nan_advantage),
], ids=["pointwise", "sft", "grpo"])
def test_creative_train_skip_counts_in_metrics_json(experiment, stage, cls, poison, tmp_path, cache_dir,
                                                    monkeypatch):
    """Each stage's own key (pointwise.nonfinite, sft.nonfinite, grpo.nonfinite); creative_grpo runs
    its CoT-SFT stage first (not poisoned)."""
    import importlib

    from ctr.creative.train import train
    from test_creative_train import compose_run as compose_creative

    module_name, name = cls.rsplit(".", 1)
    poison_batch_1(monkeypatch, getattr(importlib.import_module(module_name), name), poison)
    cfg = compose_creative([f"experiment={experiment}", "trainer.fast_dev_run=2", f"{stage}.nonfinite=skip"],
                           tmp_path / "run", cache_dir)
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == saved["skipped_batches"] == 1


def test_creative_train_fail_names_the_stage_batch(tmp_path, cache_dir, monkeypatch):
    from ctr.creative.module import SFTModule
    from ctr.creative.train import train
    from test_creative_train import compose_run as compose_creative

    poison_batch_1(monkeypatch, SFTModule, nan_logprobs)
    cfg = compose_creative(["experiment=creative_sft_answer", "trainer.fast_dev_run=2"], tmp_path / "run", cache_dir)
    with pytest.raises(NonFiniteError, match=r"(?s)global step 1, batch 1.*output\.token_logprobs \[8, "):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_moon2_train_skip_counts_in_metrics_json(tmp_path, cache_dir, monkeypatch):
    """Real H&M and Fashion items through the frozen towers (tens of seconds on a fresh cache)."""
    from encoders.moon2.module import Moon2Module
    from encoders.moon2.train import train
    from test_moon2_train import compose_run as compose_moon2

    def nan_queries(module, batch):
        batch["q_image"][0] = NAN
        return lambda: None

    poison_batch_1(monkeypatch, Moon2Module, nan_queries)
    cfg = compose_moon2(["experiment=moon2_full", "trainer.fast_dev_run=2", "optim.nonfinite=skip"],
                        tmp_path / "run", cache_dir)
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_batches"] == saved["skipped_batches"] == 1
