"""How close the training loops run to the machine: time split, framework overhead, FLOPs.

    python experiments/bench_overhead.py [--steps 40] [--parts ctr enc64 enc128 decode]

For each stage it times the same model on the same batches twice, alternating:

* a bare PyTorch loop (next batch, forward + loss, backward, optimiser step), timed phase by
  phase, and
* the real Lightning module under a Lightning ``Trainer`` (this project's loop: logging, hooks,
  metrics bookkeeping), timed from the first measured batch's start to the last one's end.

The overhead is (Lightning time per step - bare time per step) / bare time per step, the better
of two rounds each. Stages: ``ctr`` (the ``ml100k_din`` preset, batch 1024), ``enc64`` and
``enc128`` (contrastive pretraining of a ResNet-18 on the simulator's catalogue, self-supervised
views, batch 64, at 64 and 128 px), and ``decode`` (images/s of decoding H&M JPEGs with PIL
against reading this project's decoded uint8 cache, and what that does to the training rate).
FLOPs per sample come from torch's FlopCounterMode (matrix products and convolutions; a training
step is counted as 3x the forward), against the machine's measured fp32 peak (the higher of a BLAS
matmul and a oneDNN 1x1 convolution).
Needs CTR_DATA_DIR for ``ctr`` and ``decode``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
import ctr  # noqa: F401,E402  (torchvision hook)
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _gflops(f, flops: float) -> float:
    f()  # warm-up (kernel selection, allocation)
    reps = max(2, int(4e10 / flops))
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return reps * flops / (time.perf_counter() - t) / 1e9


def fp32_peak_gflops() -> dict[str, float]:
    """The machine's measured fp32 throughput, by the two libraries torch computes with: BLAS
    (``torch.matmul``, MKL in the CPU wheel; the best of square products at a few sizes) and oneDNN
    (a 1x1 convolution is a GEMM of [C_out, C_in] by [C_in, H*W]; the convolutions and the
    training runs here go through it). On AMD CPUs MKL's sgemm may take a narrower code path than
    oneDNN's JIT kernels (half the rate on this machine's EPYC), so the peak is the higher of the two."""
    out = {"matmul": 0.0, "onednn": 0.0}
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        out["matmul"] = max(out["matmul"], _gflops(lambda: a @ b, 2 * n ** 3))
    for c, hw in ((1024, (32, 64)), (2048, (32, 32))):
        x, w = torch.randn(1, c, *hw), torch.randn(c, c, 1, 1)
        out["onednn"] = max(out["onednn"], _gflops(lambda: torch.nn.functional.conv2d(x, w),
                                                   2 * c * c * hw[0] * hw[1]))
    out["peak"] = max(out["matmul"], out["onednn"])
    return out


class _StepClock:
    """A Lightning callback: wall time from the start of batch ``warm`` to the end of the last."""

    def __init__(self, warm: int):
        import pytorch_lightning as pl

        outer = self

        class CB(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == warm:
                    outer.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                outer.t1, outer.n = time.perf_counter(), batch_idx + 1 - warm

        self.callback = CB()
        self.t0 = self.t1 = None
        self.n = 0

    @property
    def per_step(self) -> float:
        return (self.t1 - self.t0) / self.n


def lightning_step_time(module, dm, warm: int, steps: int) -> float:
    import pytorch_lightning as pl

    clock = _StepClock(warm)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=warm + steps,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock.callback])
    trainer.fit(module, datamodule=dm)
    return clock.per_step


def bare_step_time(loader, loss_fn, opt, warm: int, steps: int) -> dict:
    """Seconds per step of a plain loop, split into data / forward / backward / optimiser."""
    it = iter(loader)
    split = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimiser": 0.0}
    for i in range(warm + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        loss = loss_fn(batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i >= warm:
            for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimiser", t3, t4)):
                split[k] += b - a
    return {k: v / steps for k, v in split.items()}


def compare(make, warm: int, steps: int, rounds: int = 2) -> dict:
    """``make()`` -> (module, dm, bare_loss_fn, samples per step, flops per sample). Alternates
    bare and Lightning rounds from the same initial weights; keeps the best of each."""
    bare, light = [], []
    module0, dm, loss_fn, n, flops = make()
    init = copy.deepcopy(module0.state_dict())
    for _ in range(rounds):
        module0.load_state_dict(init)
        module0.train()
        opt = module0.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        bare.append(bare_step_time(dm.train_dataloader(), loss_fn, opt, warm, steps))
        module0.load_state_dict(init)
        light.append(lightning_step_time(module0, dm, warm, steps))
    b = min(bare, key=lambda s: sum(s.values()))
    tb, tl = sum(b.values()), min(light)
    return {"split": b, "bare": tb, "lightning": tl, "overhead": (tl - tb) / tb, "samples": n, "flops": flops}


def make_ctr():
    from hydra.utils import instantiate

    from ctr.module import CTRModule
    from ctr.runs import compose_config, forward_flops

    cfg = compose_config(ROOT / "conf", ["experiment=ml100k_din"], run_dir="/tmp/bench-overhead",
                         cache_dir=os.environ.get("CTR_CACHE_DIR", ROOT / ".cache" / "prepared"),
                         embeddings_dir=ROOT / ".cache" / "embeddings")
    torch.manual_seed(0)
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup()
    model = instantiate(cfg.model, _convert_="all")(meta=dm.meta)
    module = CTRModule(model, **cfg.optim)
    batch = next(iter(dm.train_dataloader()))

    def loss_fn(b):
        return module.loss_fn(module(b), b.label)

    return module, dm, loss_fn, len(batch), forward_flops(model, batch)


def make_encoder(size: int):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ctr.runs import compose_config, forward_flops
    from encoders.module import ContrastiveModule

    cfg = compose_config(ROOT / "conf" / "encoders", [f"image_size={size}", "image=resnet18", "text=none"],
                         run_dir="/tmp/bench-overhead", cache_dir=os.environ.get("CTR_CACHE_DIR", ROOT / ".cache" / "prepared"),
                         embeddings_dir=ROOT / ".cache" / "embeddings")
    torch.manual_seed(0)
    tower = instantiate(cfg.image, _convert_="all")
    tasks = {"self_supervised": 1.0}
    module = ContrastiveModule(tower, None, tasks=tasks, image_size=size,
                               **OmegaConf.to_container(cfg.module, resolve=True),
                               **OmegaConf.to_container(cfg.optim, resolve=True))
    module.evaluation = None
    dm = instantiate(cfg.data.module, tasks=tasks, image_size=size, cache_dir=cfg.paths.cache_dir, seed=0,
                     tokenize=None, _convert_="all")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    def loss_fn(b):  # the module's training step without its logging
        emb = module.embed_images(module.augment(b["images"]))
        loss, _ = module._task_loss("self_supervised", b, emb, b["keys"])
        return loss

    flops = forward_flops(module, batch["images"][:8], call=module.eval_images)
    n = int(batch["images"].shape[0])
    return module, dm, loss_fn, n, 2 * flops  # two views per item image


def decode_rates(sizes=(64, 128), n: int = 300) -> dict:
    """Images/s: PIL decoding of H&M JPEGs (this project's decode_image) vs the uint8 cache."""
    import polars as pl

    from ctr.data.sources import data_path
    from encoders.images import decode_image, to_float

    path = data_path(None, "hm_fashion_images_sample") / "images.parquet"
    files = pl.read_parquet(path, columns=["jpeg"], n_rows=n)["jpeg"].to_list()  # encoded JPEG bytes
    out = {}
    for size in sizes:
        t = time.perf_counter()
        arr = [decode_image(f, size) for f in files]
        dec = len(files) / (time.perf_counter() - t)
        cache = torch.from_numpy(np.stack(arr))
        idx = torch.randint(len(files), (64,))
        t = time.perf_counter()
        for _ in range(200):
            to_float(cache[idx])
        cached = 200 * 64 / (time.perf_counter() - t)
        out[size] = {"decode": dec, "cache": cached}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--parts", nargs="+", default=["ctr", "enc64", "enc128", "decode"])
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from ctr.malloc import tune_malloc

    tune_malloc()  # as the training entry points do
    fp32 = fp32_peak_gflops()
    peak = fp32["peak"]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"measured fp32 GFLOP/s: matmul (BLAS) {fp32['matmul']:,.0f}, 1x1 convolution (oneDNN) "
          f"{fp32['onednn']:,.0f}; peak {peak:,.0f}")
    rows = {}
    for part in args.parts:
        if part == "ctr":
            rows["CTR: DIN, ML100K, batch 1024"] = compare(make_ctr, args.warm, args.steps)
        elif part.startswith("enc"):
            size = int(part[3:])
            rows[f"contrastive: ResNet-18, {size} px, batch 64"] = compare(
                lambda: make_encoder(size), 2, max(args.steps // 2, 10))
        print(f"done {part}", file=sys.stderr, flush=True)
    if rows:
        cols = ["stage", "data ms", "forward ms", "backward ms", "optimiser ms", "bare ms/step",
                "Lightning ms/step", "overhead", "samples/s (Lightning)", "train GFLOP/sample", "achieved GFLOP/s",
                "of fp32 peak"]
        print()
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for name, r in rows.items():
            s = r["split"]
            rate = r["samples"] / r["lightning"]
            gf = 3 * r["flops"] / 1e9
            print("| " + " | ".join([name, *(f"{1e3 * s[k]:.1f}" for k in ("data", "forward", "backward", "optimiser")),
                                     f"{1e3 * r['bare']:.1f}", f"{1e3 * r['lightning']:.1f}",
                                     f"{100 * r['overhead']:+.1f} %", f"{rate:,.0f}", f"{gf:.4f}",
                                     f"{gf * rate:,.1f}", f"{100 * gf * rate / peak:.0f} %"]) + " |")
    if "decode" in args.parts:
        print()
        print("| image size | PIL decode images/s | decoded-cache images/s | cache speed-up | training images/s "
              "from the cache | same, decoding in the loop (estimated) |")
        print("|---|---|---|---|---|---|")
        for size, r in decode_rates().items():
            enc = rows.get(f"contrastive: ResNet-18, {size} px, batch 64")
            train = enc["samples"] / enc["lightning"] if enc else None
            # estimated: one serial decode per image added to the cached step (not a measured loop)
            cells = ["-", "-"] if train is None else [f"{train:,.0f}", f"{1 / (1 / train + 1 / r['decode']):,.0f}"]
            print(f"| {size} px | {r['decode']:,.0f} | {r['cache']:,.0f} | {r['cache'] / r['decode']:,.0f}× | "
                  + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
