"""The CUDA code paths, where a GPU exists (skipped on a CPU-only machine, CI's included): DIN's
forward and backward on the GPU equal the CPU's; bf16 autocast stays close to float32; the packed
and the padded target attention agree on the GPU; torch.compile equals eager there; and the real
entry points train through the GPU trainer presets (``gpu`` in bf16 and float32, ``ddp`` and
``fsdp`` on one device, ``compile=true``) and through the encoders' ``gpu`` preset."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 off: the CPU comparisons are of float32 arithmetic."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label.float())
    loss.backward()
    return logits.detach().cpu(), float(loss.detach()), _grads(model)


def _assert_same_step(a, b) -> None:
    """Two ``_loss_and_grads`` results agree: logits, loss, and every gradient (relative to its
    largest entry), to float32 reduction-order noise."""
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = a, b
    assert torch.allclose(logits_a, logits_b, atol=1e-4, rtol=1e-4), (logits_a - logits_b).abs().max()
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for k in grads_a:
        scale = float(grads_a[k].abs().max()) + 1e-6
        assert float((grads_a[k] - grads_b[k]).abs().max()) <= 1e-3 * scale + 1e-6, k


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_din_forward_and_backward_on_gpu_equal_the_cpu(cache_dir, pack):
    """Same weights, same batch: the GPU's logits, loss and every gradient equal the CPU's in
    float32 (to float32 reduction-order noise)."""
    from test_distributed import _tiny_din

    model, batch = _tiny_din(cache_dir, [f"model.sequence.pack={str(pack).lower()}"])
    model.train()
    cpu = _loss_and_grads(model, batch)
    model.cuda()
    _assert_same_step(cpu, _loss_and_grads(model, batch.to("cuda")))


def test_packed_and_padded_attention_agree_on_gpu(cache_dir):
    """The packed unit (real history items only; data-dependent shapes) and the padded grid give
    the same logits on the GPU (eval mode: Dice's running statistics)."""
    from test_distributed import _tiny_din

    packed, batch = _tiny_din(cache_dir, ["model.sequence.pack=true"])
    padded, _ = _tiny_din(cache_dir, ["model.sequence.pack=false"])
    padded.load_state_dict(packed.state_dict())
    batch = batch.to("cuda")
    with torch.no_grad():
        a = packed.cuda().eval()(batch)
        b = padded.cuda().eval()(batch)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_bf16_autocast_stays_close_to_float32_on_gpu(cache_dir):
    from test_distributed import _tiny_din

    model, batch = _tiny_din(cache_dir, ["model.sequence.pack=true"])
    model = model.cuda().eval()
    batch = batch.to("cuda")
    with torch.no_grad():
        full = model(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(batch).float()
    assert torch.isfinite(half).all()
    assert float((full - half).abs().max()) < 0.05


def test_compiled_din_equals_eager_on_gpu(cache_dir):
    """``compile=true``'s in-place nn.Module.compile of the padded DIN: same logits and gradients
    as eager on the GPU."""
    from test_distributed import _tiny_din

    model, batch = _tiny_din(cache_dir, ["model.sequence.pack=false"])
    model = model.cuda().train()
    batch = batch.to("cuda")
    eager = _loss_and_grads(model, batch)
    torch._dynamo.reset()
    model.compile()
    _assert_same_step(eager, _loss_and_grads(model, batch))


@pytest.mark.parametrize("preset", [
    ["trainer=gpu"],
    ["trainer=gpu", "trainer.precision=32-true"],
    ["trainer=gpu", "compile=true", "model.sequence.pack=false"],
    ["trainer=ddp", "trainer.devices=1"],
    ["trainer=fsdp", "trainer.devices=1"],
], ids=["gpu-bf16", "gpu-fp32", "gpu-compile", "ddp-1", "fsdp-1"])
def test_ctr_trains_through_the_gpu_presets(tmp_path, preset):
    """The command line (``python -m ctr.train``) through each GPU preset: a whole small training
    (fit, best checkpoint, test) with finite metrics that learned something, and a checkpoint that
    loads on the CPU."""
    import math

    from test_distributed import CTR_OVERRIDES, run_cli, state

    over = [o for o in CTR_OVERRIDES if not o.startswith(("trainer.limit_train_batches", "trainer.max_epochs"))]
    m = run_cli("ctr.train", [*over, "trainer.max_epochs=2", *preset], tmp_path / "run", tmp_path / "cache",
                tmp_path / "emb")
    assert m["train_samples"] > 0 and math.isfinite(m["test"]["logloss"])
    assert 0.5 < m["val"]["auc"] < 1.0, m["val"]
    weights = state(tmp_path / "run")
    assert weights and all(v.device.type == "cpu" for v in weights.values())
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_encoders_train_through_the_gpu_preset(tmp_path):
    """The contrastive stage on the GPU (bf16 autocast): a short run with finite losses and
    retrieval metrics."""
    import math

    from test_distributed import ENC_OVERRIDES, run_cli

    m = run_cli("encoders.train", [*ENC_OVERRIDES, "trainer=gpu"], tmp_path / "run", tmp_path / "cache",
                tmp_path / "emb")
    scores = [v for v in m["test"].values() if isinstance(v, float)]
    assert scores and all(math.isfinite(v) for v in scores), m["test"]
