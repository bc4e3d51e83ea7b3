"""Scaling out with existing engines: DDP over 2 CPU processes (gloo) takes the same optimisation
steps as one process on the same global batch (the CTR and the contrastive stage, through the real
``trainer=ddp_cpu`` preset); the data modules' rank shares; metrics gathered over ranks; the trainer
presets; torch.compile against eager."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _gloo import free_port, gloo_group
from ctr.runs import compose_config
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENC_CONF = CONF / "encoders"
PRESETS = ["cpu", "gpu", "ddp", "fsdp", "bf16", "ddp_cpu"]

# A tiny DIN on the tiny simulator; relu instead of Dice (whose batch statistics are per rank, as
# unsynchronised batch norm's are) and no dropout, so that a DDP step can equal a single-process one.
CTR_OVERRIDES = ["experiment=sim_din", "data.source.preset=tiny", "model.sequence.act=relu", "model.dropout=0.0",
                 "data.batch_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "monitor.patience=null", "optim.lr=0.01", "logger=csv", "trainer.enable_progress_bar=false"]
# ViT-Tiny (LayerNorm: per-sample, unlike the CNNs' batch norm), the small text tower without
# dropout and an identity augmentation: each rank's embeddings of its rows equal the single process's.
ENC_OVERRIDES = ["name=enc_ddp", "image=vit_tiny", "data.module.source.preset=tiny", "image_size=32",
                 "tasks.self_supervised=1.0", "tasks.image_text=1.0", "tasks.click=1.0", "+text.dropout=0.0",
                 "data.augment.scale=[1.0,1.0]", "+data.augment.ratio=[1.0,1.0]", "+data.augment.flip=0.0",
                 "+data.augment.jitter_p=0.0", "data.module.batch_size=8", "data.module.steps_per_epoch=2",
                 "trainer.max_epochs=1", "data.module.eval_batch_size=64", "logger=csv",
                 "trainer.enable_progress_bar=false", "optim.optimizer=sgd", "optim.lr=0.01"]
# SGD rather than AdamW: Adam's first steps are about lr * sign(gradient), which turns the float
# noise of gradients that are zero in exact arithmetic (attention key biases) into lr-sized steps.


def run_cli(module: str, overrides: list[str], run_dir: Path, cache_dir: Path, emb_dir: Path) -> dict:
    """``python -m <module> <overrides>`` in a subprocess (Lightning's ddp strategy launches the
    other rank by re-running this command); returns the run's metrics.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CTR_CACHE_DIR": str(cache_dir),
           "CTR_EMBED_DIR": str(emb_dir), "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{module} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    assert not (run_dir / "failed.json").exists()
    return json.loads((run_dir / "metrics.json").read_text())


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> float:
    """Same keys, same values (to ``atol``); returns the largest difference."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            d = float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0
            assert d <= atol, f"{k}: differs by {d:.3g}"
            worst = max(worst, d)
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


# ---------------------------------------------------------------------------------------- rank shares


@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_split_every_global_batch(world):
    """Every rank draws the same permutation; at each step the ranks' batches are disjoint and, in
    rank order, are the single-process batch. A last batch with fewer rows than ranks is dropped
    on every rank."""
    from torch.utils.data import BatchSampler, RandomSampler

    from ctr.data.datamodule import RankBatches

    n, bs = 6 * 17 + 1, 6  # 17 full batches and a last one of 1 row (< world)
    single = list(BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(3)), bs, False))
    ranks = [list(RankBatches(BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(3)),
                                           bs, False), r, world)) for r in range(world)]
    assert all(len(x) == len(single) - 1 for x in ranks)  # the 1-row batch is dropped everywhere
    assert all(len(RankBatches(BatchSampler(range(n), bs, False), r, world)) == len(single) - 1
               for r in range(world))
    for step, batch in enumerate(single[:-1]):
        shares = [x[step] for x in ranks]
        assert [len(s) for s in shares] == [bs // world] * world
        assert sum(shares, []) == batch
    # a last batch of at least `world` rows is split as evenly as it goes
    single = list(BatchSampler(range(bs + world + 1), bs, False))
    last = [list(RankBatches(BatchSampler(range(bs + world + 1), bs, False), r, world))[-1] for r in range(world)]
    assert sum(last, []) == single[-1] and max(map(len, last)) - min(map(len, last)) <= 1


def test_eval_shards_cover_each_split_once():
    from ctr.data.datamodule import EvalShard

    for n, world, bs in [(10, 2, 3), (7, 3, 2), (5, 5, 4), (1000, 2, 128)]:
        per_rank = [list(EvalShard(n, bs, r, world)) for r in range(world)]
        assert all(len(p) >= 1 and len(p) == len(EvalShard(n, bs, r, world)) for r, p in enumerate(per_rank))
        rows = [i for p in per_rank for b in p for i in b]
        assert rows == list(range(n))  # contiguous, in order: the gathered states are the split's order
        assert all(len(b) <= bs for p in per_rank for b in p)


def test_ctr_data_module_checks_the_trainer(tiny_sim, cache_dir):
    """A DDP trainer: the global batch must split evenly, and Lightning must not inject its own
    sampler. A CPU trainer pins no memory unless asked to."""
    import pytorch_lightning as pl

    from conftest import SIM_SETTINGS
    from ctr.data.datamodule import CTRDataModule
    from ctr.data.sources.simulator import SimulatorSource

    def dm_with(trainer, **kw):
        dm = CTRDataModule(SimulatorSource("tiny", seed=0), SIM_SETTINGS, cache_dir, **kw)
        dm.setup()
        dm.trainer = trainer
        return dm

    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", use_distributed_sampler=False,
                     logger=False, enable_progress_bar=False)
    assert ddp.world_size == 2
    loader = dm_with(ddp, batch_size=64).train_dataloader()
    assert len(next(iter(loader))) == 32  # rank 0's half of the global batch
    with pytest.raises(ValueError, match="not divisible"):
        dm_with(ddp, batch_size=63).train_dataloader()
    injecting = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="use_distributed_sampler=false"):
        dm_with(injecting).val_dataloader()
    cpu = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    dm = dm_with(cpu)
    assert dm.train_dataloader().pin_memory is False and dm_with(cpu, pin_memory=True).val_dataloader().pin_memory
    batch = dm.transfer_batch_to_device(next(iter(dm.val_dataloader())), torch.device("cpu"), 0)
    assert type(batch).__name__ == "Batch" and batch.label.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_trainer_pins_memory_and_copies_batches(tiny_sim, cache_dir):
    import pytorch_lightning as pl

    from conftest import SIM_SETTINGS
    from ctr.data.datamodule import CTRDataModule
    from ctr.data.sources.simulator import SimulatorSource

    dm = CTRDataModule(SimulatorSource("tiny", seed=0), SIM_SETTINGS, cache_dir)
    dm.setup()
    dm.trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False)
    loader = dm.val_dataloader()
    assert loader.pin_memory
    batch = next(iter(loader))
    assert batch.label.is_pinned()
    moved = dm.transfer_batch_to_device(batch, torch.device("cuda", 0), 0)
    torch.cuda.synchronize()
    assert moved.label.is_cuda and torch.equal(moved.label.cpu(), batch.label)


def test_contrastive_rank_shares_are_the_global_batch(cache_dir):
    """The ranks' shares of a multi-task batch, concatenated in rank order, give back every role's
    rows (and keys and title tokens) of the global batch; uneven shares are refused."""
    from encoders.data import TaskBatches
    from encoders.datamodule import ROLES, ContrastiveDataModule, SimItems, rank_share
    from encoders.towers import SmallTextTower

    text = SmallTextTower(dim=16, layers=1, heads=2, max_length=8)
    tasks = {"self_supervised": 1.0, "image_text": 1.0, "click": 1.0, "same_product": 1.0}
    dm = ContrastiveDataModule(SimItems("tiny"), tasks, image_size=32, cache_dir=str(cache_dir), tokenize=text.tokenize)
    dm.setup()
    # the tiny catalogue has no product groups: pair up its items, so that same_product has pairs
    items = dataclasses.replace(dm.items, group=np.arange(len(dm.items)) // 2)
    ds = TaskBatches(items, tasks, 8, clicks=dm.clicks, tokens=dm.tokens, product_pairs=4, seed=1)
    batch = ds[3]
    for world in (2, 4):
        shares = [rank_share(batch, r, world) for r in range(world)]
        assert set(ROLES) <= set(batch)
        for k in ROLES:
            if k in batch:
                assert torch.equal(torch.cat([s["rows"][s[k]] for s in shares]), batch["rows"][batch[k]]), k
                assert torch.equal(torch.cat([s["keys"][s[k]] for s in shares]), batch["keys"][batch[k]]), k
        for s in shares:  # each share sends every image it uses once, and only those
            used = torch.cat([s[k].reshape(-1) for k in ROLES if k in s])
            assert torch.equal(torch.unique(used), torch.arange(len(s["rows"])))
            assert torch.equal(s["images"], dm.images[s["rows"]])
        for k, v in batch["tokens"].items():
            assert torch.equal(torch.cat([s["tokens"][k] for s in shares]), v)
    with pytest.raises(ValueError, match="split evenly"):
        rank_share(batch, 0, 3)


# ---------------------------------------------------------------------------------------- metrics over ranks


def _metrics_worker(rank: int, world: int, port: int, preds, target, groups, out_dir: str):
    import ctr  # noqa: F401  (the torchvision import hook, before torchmetrics)
    from ctr.module import CTRModule

    with gloo_group(rank, world, port):
        m = CTRModule(torch.nn.Identity())
        lo, hi = len(preds) * rank // world, len(preds) * (rank + 1) // world
        if rank == 1:  # this rank's share holds none of the slice's rows
            lo = hi
        if hi > lo:
            m.val_metrics.update(preds[lo:hi], target[lo:hi], groups=groups[lo:hi])
        out = m._compute(m.val_metrics)
        none = m._compute(m.test_metrics[0])  # no rank updated it
        torch.save({"out": {k: float(v) for k, v in out.items()}, "none": none}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_metrics_are_computed_over_every_rank(tmp_path):
    """2 gloo processes: each rank's metrics are those of the rows of all ranks, also when a rank
    saw no rows (its states are empty); a collection no rank updated is skipped on every rank."""
    import torch.multiprocessing as mp

    from ctr.metrics import ctr_metrics

    g = torch.Generator().manual_seed(0)
    n = 300
    preds, groups = torch.rand(n, generator=g), torch.randint(0, 12, (n,), generator=g)
    target = (torch.rand(n, generator=g) < preds).float()
    mp.spawn(_metrics_worker, args=(2, free_port(), preds, target, groups, str(tmp_path)), nprocs=2)
    ref = ctr_metrics("val/")
    ref.update(preds[:n // 2], target[:n // 2], groups=groups[:n // 2])  # rank 0's rows; rank 1 had none
    expect = {k: float(v) for k, v in ref.compute().items()}
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["none"] is None
        assert got["out"].keys() == expect.keys()
        for k in expect:
            assert got["out"][k] == pytest.approx(expect[k], abs=1e-6), (r, k)


# ---------------------------------------------------------------------------------------- DDP == one process


def _initial_state(cfg) -> dict[str, torch.Tensor]:
    """The CTR model's weights before training, as ``ctr.train.train`` builds them."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    pl.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    meta = {**dm.meta, "path": str(dm.artefact.path)}
    if getattr(dm.source, "describe", None) is not None:
        meta["source_config"] = dm.source.describe()
    return {f"model.{k}": v for k, v in instantiate(cfg.model, _convert_="all")(meta=meta).state_dict().items()}


def _initial_encoder_state(cfg) -> dict[str, torch.Tensor]:
    """The contrastive module's weights before training, as ``encoders.train.train`` builds them."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from encoders.module import ContrastiveModule

    pl.seed_everything(cfg.seed, workers=True)
    image_tower = instantiate(cfg.image, _convert_="all")
    text_tower = instantiate(cfg.text, _convert_="all")
    module = ContrastiveModule(image_tower, text_tower, tasks={k: float(v) for k, v in cfg.tasks.items() if v},
                               image_size=cfg.image_size, **OmegaConf.to_container(cfg.module, resolve=True),
                               **OmegaConf.to_container(cfg.optim, resolve=True))
    return module.state_dict()


@pytest.mark.slow
def test_ctr_ddp_step_equals_one_process(tmp_path, cache_dir):
    """Two optimisation steps of a tiny DIN: ``trainer=ddp_cpu`` (2 processes, gloo, each with 32
    rows of the 64-row global batch) ends with the same weights as one process on the same global
    batches; the metrics (each rank evaluated half of every split, states gathered) and the
    impressions counted agree too."""
    from ctr.train import train

    cfg = compose_config(CONF, [*CTR_OVERRIDES, "trainer=cpu"], run_dir=tmp_path / "one", cache_dir=cache_dir,
                         embeddings_dir=tmp_path / "emb")
    init = _initial_state(cfg)  # also prepares the data: the DDP run reads the cached artefact
    one = train(cfg)
    ddp = run_cli("ctr.train", [*CTR_OVERRIDES, "trainer=ddp_cpu"], tmp_path / "ddp", cache_dir, tmp_path / "emb")

    a, b = state(tmp_path / "one"), state(tmp_path / "ddp")
    worst = assert_same_state(a, b, atol=1e-6)
    moved = max(float((a[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3 > 100 * worst  # the steps moved the weights far more than the runs differ
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert one["train_samples"] == ddp["train_samples"] == 2 * 64
    assert one["history_tokens_seen"] == ddp["history_tokens_seen"] > 0
    for split in ("val", "test", "test_random"):
        for k, v in one[split].items():
            assert ddp[split][k] == pytest.approx(v, abs=1e-5), (split, k)
    assert set(ddp["test"]) >= {"low_impression/auc"}  # the slice metrics, gathered over ranks too


@pytest.mark.slow
def test_contrastive_ddp_step_equals_one_process(tmp_path, cache_dir):
    """Two steps of self-supervised + image-text + click training: ``trainer=ddp_cpu`` (each rank
    with half of the 8-example global batch of every task, the losses' in-batch negatives gathered
    over the ranks with gradient) ends with the same towers, heads and logit scales as one process
    on the global batches, with the same examples and negatives counted."""
    from encoders.train import train

    cfg = compose_config(ENC_CONF, [*ENC_OVERRIDES, "trainer=cpu"], run_dir=tmp_path / "one", cache_dir=cache_dir,
                         embeddings_dir=tmp_path / "emb")
    one = train(cfg)  # also caches the decoded images that the DDP ranks read
    ddp = run_cli("encoders.train", [*ENC_OVERRIDES, "trainer=ddp_cpu"], tmp_path / "ddp", cache_dir,
                  tmp_path / "emb")

    assert ddp["world_size"] == 2
    assert ddp["seen"]["examples"] == one["seen"]["examples"] == {"self_supervised": 16, "image_text": 16,
                                                                  "click": 16}
    assert ddp["seen"]["negatives_per_query"] == one["seen"]["negatives_per_query"]
    a, b = state(tmp_path / "one"), state(tmp_path / "ddp")
    worst = assert_same_state(a, b, atol=1e-6)
    init = _initial_encoder_state(cfg)
    moved = max(float((a[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3 > 100 * worst  # the steps moved the weights far more than the runs differ
    assert ddp["val"] == pytest.approx(one["val"], abs=1e-5) and ddp["test"] == pytest.approx(one["test"], abs=1e-5)


# ---------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("conf", [CONF, ENC_CONF], ids=["ctr", "encoders"])
def test_trainer_presets_compose_with_the_same_keys(conf, tmp_path):
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DDPStrategy

    composed = {}
    for p in PRESETS:
        cfg = compose_config(conf, [f"trainer={p}", "name=x"], run_dir=tmp_path, cache_dir=tmp_path,
                             embeddings_dir=tmp_path)
        composed[p] = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert all(composed[p].keys() == composed["cpu"].keys() for p in PRESETS)
    assert all(composed[p]["use_distributed_sampler"] is False for p in PRESETS)
    assert {p: composed[p]["precision"] for p in PRESETS} == {
        "cpu": "32-true", "gpu": "bf16-mixed", "ddp": "bf16-mixed", "fsdp": "bf16-mixed", "bf16": "bf16-mixed",
        "ddp_cpu": "32-true"}
    assert {p: composed[p]["accelerator"] for p in PRESETS} == {
        "cpu": "cpu", "gpu": "gpu", "ddp": "gpu", "fsdp": "gpu", "bf16": "auto", "ddp_cpu": "cpu"}
    assert composed["ddp"]["strategy"] == "ddp" and composed["fsdp"]["strategy"] == "fsdp"
    assert composed["ddp"]["devices"] == composed["fsdp"]["devices"] == -1
    # instantiate those whose accelerator this machine has
    for p in PRESETS if torch.cuda.is_available() else ["cpu", "bf16", "ddp_cpu"]:
        t = instantiate(OmegaConf.create(composed[p]), logger=False, _convert_="all")
        assert isinstance(t, pl.Trainer), p
    t = instantiate(OmegaConf.create(composed["ddp_cpu"]), logger=False, _convert_="all")
    assert isinstance(t.strategy, DDPStrategy) and t.strategy.process_group_backend == "gloo"
    assert t.world_size == 2 and t.strategy.root_device.type == "cpu"
    t = instantiate(OmegaConf.create(composed["bf16"]), logger=False, _convert_="all")
    assert t.precision == "bf16-mixed"


def test_bf16_autocast_runs_on_the_cpu(tmp_path, cache_dir):
    from ctr.train import train

    cfg = compose_config(CONF, ["experiment=sim_din", "data.source.preset=tiny", "trainer=bf16",
                                "trainer.accelerator=cpu", "trainer.fast_dev_run=true", "logger=csv",
                                "trainer.enable_progress_bar=false"],
                         run_dir=tmp_path / "run", cache_dir=cache_dir, embeddings_dir=tmp_path / "emb")
    m = train(cfg)
    assert 0.0 < m["val"]["auc"] < 1.0 and np.isfinite(m["test"]["logloss"])


# ---------------------------------------------------------------------------------------- torch.compile


def _tiny_din(cache_dir, overrides=()):
    from hydra.utils import instantiate

    cfg = compose_config(CONF, ["experiment=sim_din", "data.source.preset=tiny", "model.dropout=0.0", *overrides],
                         run_dir="/unused", cache_dir=cache_dir, embeddings_dir="/unused")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    torch.manual_seed(0)
    return instantiate(cfg.model, _convert_="all")(meta=dm.meta), next(iter(dm.train_dataloader()))


def test_oracle_metrics_gather_nothing_under_a_process_group(tiny_sim, monkeypatch, tmp_path):
    """Every rank computes the true_ctr oracle over the whole split from CPU arrays: torchmetrics
    must not gather them (under NCCL a CPU all_gather fails: "No backend type associated with
    device type cpu", seen on an H100 with ``trainer=ddp``)."""
    import torch.distributed as dist

    from ctr.train import oracle_metrics

    expected = oracle_metrics(tiny_sim.split_dir("test"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def refuse(*a, **k):
            raise RuntimeError("all_gather called")

        monkeypatch.setattr(dist, "all_gather", refuse)
        assert oracle_metrics(tiny_sim.split_dir("test")) == expected
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_target_attention_runs_on_bf16_parameters(cache_dir):
    """FSDP's bf16-mixed casts the parameters themselves to bf16 (``param_dtype``) inside autocast;
    the packed attention pooled bf16 keys with float32 weights into a bf16 buffer and failed there
    (index_add_ dtype mismatch, seen on an H100). Packed and padded agree on bf16 parameters too."""
    out = {}
    for pack in (True, False):
        model, batch = _tiny_din(cache_dir, [f"model.sequence.pack={str(pack).lower()}"])
        model = model.to(torch.bfloat16).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[pack] = model(batch).float()
        assert torch.isfinite(out[pack]).all()
    torch.testing.assert_close(out[True], out[False], atol=0.05, rtol=0.05)


def test_packed_attention_breaks_the_graph_unpacked_does_not(cache_dir):
    """The README's advice: ``model.sequence.pack=false`` gives torch.compile one graph (the packed
    target attention's nonzero has a data-dependent shape)."""
    for pack, one_graph in ((True, False), (False, True)):
        model, batch = _tiny_din(cache_dir, [f"model.sequence.pack={str(pack).lower()}"])
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(batch)
        assert (explained.graph_break_count == 0) == one_graph, (pack, explained.break_reasons[:1])


@pytest.mark.parametrize("conf", [CONF, ENC_CONF], ids=["ctr", "encoders"])
def test_compile_switch_compiles_in_place(conf, tmp_path):
    """``compile`` is off by default; on, ``compile_in_place`` wraps the module's call in place
    (lazily: nothing is compiled before the first call), parameter names unchanged."""
    from ctr.runs import compile_in_place

    def cfg(*over):
        return compose_config(conf, ["name=x", *over], run_dir=tmp_path, cache_dir=tmp_path, embeddings_dir=tmp_path)

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    keys = list(module.state_dict())
    assert cfg().compile is False and compile_in_place(module, cfg()) is False
    assert module._compiled_call_impl is None
    assert compile_in_place(module, cfg("compile=true", "compile_mode=reduce-overhead")) is True
    assert module._compiled_call_impl is not None and list(module.state_dict()) == keys


@pytest.mark.slow
def test_compiled_ctr_model_matches_eager(cache_dir):
    """``nn.Module.compile`` in place (what ``compile=true`` does): same state_dict keys, and the
    same logits and gradients as the eager model in a training step."""
    eager, batch = _tiny_din(cache_dir, ["model.sequence.pack=false"])
    compiled = copy.deepcopy(eager)
    compiled.compile()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    torch._dynamo.reset()
    out_e, out_c = eager(batch), compiled(batch)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fast_dev_run_with_compile(tmp_path, cache_dir):
    from ctr.train import train

    cfg = compose_config(CONF, ["data=sim", "model=dnn", "name=compiled", "data.source.preset=tiny",
                                "data.batch_size=256", "data.eval_batch_size=256", "compile=true",
                                "trainer.fast_dev_run=true", "logger=csv", "trainer.enable_progress_bar=false"],
                         run_dir=tmp_path / "run", cache_dir=cache_dir, embeddings_dir=tmp_path / "emb")
    m = train(cfg)
    assert m["compiled"] is True and 0.0 < m["val"]["auc"] < 1.0 and m["flops_per_sample"] > 0
