"""The contrastive Lightning module: towers + projection heads, tasks combined by weight.

Tasks (each a loss over L2-normalised projections, with a logit scale of its own):

* ``self_supervised``: two augmented views of an item image (SimCLR's NT-Xent).
* ``image_text``: an item image against its title (symmetric InfoNCE).
* ``click``: a query image against an item clicked in that request (InfoNCE), with the request's
  shown-but-unclicked items and same-category items as hard negatives.
* ``same_product``: an item image against another item of its product group, e.g. a colour
  variant (InfoNCE; MOON2.0's intra-product alignment).

False negatives (the same item, the same product group) are masked in every task. ``queue_size``
keeps a MoCo-style memory of past positive-side embeddings (titles for ``image_text``, clicked
items for ``click``), so the number of negatives is a knob apart from the batch size.
``matryoshka_dims`` trains every listed prefix of the embedding as well (each re-normalised), so
a prefix can serve at lower cost.

Distributed (DDP): each rank encodes its share of the global batch
(:class:`encoders.datamodule.RankShare`); the losses gather the embeddings over the ranks with
gradient (:func:`encoders.losses.gather_with_grad`), so the in-batch negatives span the global
batch. The ``seen`` counters count the global batch (examples summed over the ranks, in-batch
negatives of the gathered batch), as does ``perf/samples_per_s``.

A training batch (see :class:`encoders.data.TaskBatches`) carries every distinct image once; each
is augmented and encoded once per step (the self-supervised task's second view aside).

``nonfinite`` (``optim.nonfinite`` in the config): what a NaN/inf training loss or gradient does,
``"fail"`` (stop, naming the step, batch and tensors) or ``"skip"`` (skip the batch, counted in
``nonfinite.skipped``; the queues, the BatchNorm statistics and the ``seen`` counters are left as
they were before it); see :mod:`ctr.guards`. Non-finite weights at the end of fitting always stop
the run. (The data module, when a trainer fits with it, checks the click task's negatives counts
against the data's pools and the monitored metric against :meth:`ContrastiveModule.metric_names`
(:func:`ctr.checks.check_encoder_data`), before the first step.)
"""

from __future__ import annotations

import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctr.guards import GuardedModule, NonFiniteGuard
from ctr.optim import warmup_cosine
from ctr.runs import all_sum, fitting
from encoders.data import TASKS
from encoders.evaluate import KS, image_text_recall, search_recall
from encoders.images import BatchAugment, to_float
from encoders.losses import EmbeddingQueue, InfoNCE, LogitScale, NTXent, matryoshka_slices, rank_and_world
from encoders.towers import ProjectionHead

OPTIMIZERS = ("adamw", "sgd")


class ContrastiveModule(GuardedModule, pl.LightningModule):
    def __init__(self, image_tower: nn.Module, text_tower: nn.Module | None = None, *,
                 embed_dim: int = 128, head_hidden: int | None = None,
                 tasks: dict[str, float] | None = None, image_size: int = 64,
                 augment: dict | None = None,
                 matryoshka_dims: list[int] | None = None, queue_size: int = 0,
                 logit_scale: dict | None = None, symmetric: bool = True,
                 lr: float = 1e-3, tower_lr: float | None = None, weight_decay: float = 0.05,
                 warmup_steps: int = 0, tower_delay_steps: int = 0, optimizer: str = "adamw",
                 cache_tower_features: bool = False, nonfinite: str = "fail"):
        super().__init__()
        self.save_hyperparameters(ignore=["image_tower", "text_tower"])
        self.tasks = {t: float(w) for t, w in (tasks or {"self_supervised": 1.0}).items() if w}
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        if "image_text" in self.tasks and text_tower is None:
            raise ValueError("the image_text task needs a text tower")
        self.image_tower, self.text_tower = image_tower, text_tower
        # a frozen tower on unaugmented images gives each item the same features at every step:
        # compute them once per item, train the heads (and scales, queues) on the cached ones
        self.cache_tower_features = cache_tower_features
        if cache_tower_features:
            if any(p.requires_grad for p in image_tower.parameters()):
                raise ValueError("cache_tower_features needs a frozen image tower (image.freeze=true)")
            if "self_supervised" in self.tasks:
                raise ValueError("cache_tower_features trains without augmentation: the self_supervised task "
                                 "(two augmented views) cannot run with it")
        self._features: Tensor | None = None  # [rows, out_dim] cached tower features
        self._cached: Tensor | None = None    # [rows] bool
        self.image_head = ProjectionHead(image_tower.out_dim, embed_dim, head_hidden)
        self.text_head = ProjectionHead(text_tower.out_dim, embed_dim, head_hidden) if text_tower else None
        self.image_size = image_size
        self.augment = BatchAugment(image_size, **(augment or {}))
        dims = sorted(set(matryoshka_dims or [])) or [embed_dim]
        if not all(0 < d <= embed_dim for d in dims):
            raise ValueError(f"matryoshka_dims must lie in 1..embed_dim={embed_dim}, got {matryoshka_dims}")
        if dims[-1] != embed_dim:
            dims.append(embed_dim)
        self.dims = dims
        self.scales = nn.ModuleDict({t: LogitScale(**(logit_scale or {})) for t in self.tasks})
        self.info_nce = InfoNCE(symmetric=symmetric)
        self.nt_xent = NTXent()
        self.queues = nn.ModuleDict({t: EmbeddingQueue(embed_dim, queue_size, n_keys=2)
                                     for t in self.tasks if t != "self_supervised" and queue_size > 0})
        self.evaluation: dict | None = None  # set by the data module: what validation/test measure
        self._t_end: float | None = None
        self._delayed: list[nn.Parameter] = []
        self._val: dict[str, list] = {}
        # what training has seen, per task (kept in checkpoints, so a resumed run counts on):
        # examples (pairs, or items for self_supervised), images encoded, negatives per query summed
        self.seen: dict[str, dict[str, float]] = {t: {"examples": 0, "negatives": 0.0, "steps": 0}
                                                  for t in self.tasks}
        self.images_seen = 0
        self.nonfinite = NonFiniteGuard(nonfinite)
        # this step's counts (task -> (examples, negatives, steps), images), taken back if it is skipped
        self._pending: tuple[dict[str, tuple[int, float, int]], int] = ({}, 0)

    # ------------------------------------------------------------------ checks
    def metric_names(self, split: str = "val") -> list[str]:
        """The metrics validation (``split="val"``) or test logs, as :meth:`evaluate_collected`
        names them for the data's ``evaluation``: recall@K and nll per search, i2t/t2i R@K."""
        ev = self.evaluation or {}
        names = [f"{split}/{s}/{m}" for s in ev.get(f"{split}_search", {})
                 for m in (*(f"recall@{k}" for k in KS), "nll", "queries")]
        if self.text_tower is not None and ev.get("titles") is not None and ev.get(f"{split}_image_text", True):
            names += [f"{split}/{d}_r@{k}" for d in ("i2t", "t2i") for k in KS]
        return names

    # ------------------------------------------------------------------ encoding
    def embed_images(self, images: Tensor, normalize: bool = True) -> Tensor:
        z = self.image_head(self.image_tower(images))
        return F.normalize(z, dim=-1) if normalize else z

    def tower_features(self, rows: Tensor, images: Tensor) -> Tensor:
        """Tower features of item ``rows`` (uint8 ``images``, row-aligned), computed on first use."""
        grow = int(rows.max()) + 1 - (0 if self._features is None else len(self._features))
        if grow > 0:
            feats = torch.zeros(grow, self.image_tower.out_dim, device=images.device)
            have = torch.zeros(grow, dtype=torch.bool, device=images.device)
            self._features = feats if self._features is None else torch.cat([self._features, feats])
            self._cached = have if self._cached is None else torch.cat([self._cached, have])
        miss = ~self._cached[rows]
        if miss.any():
            with torch.no_grad():
                self._features[rows[miss]] = self.image_tower(to_float(images[miss], self.image_size)).float()
            self._cached[rows[miss]] = True
        return self._features[rows]

    def embed_cached(self, rows: Tensor, images: Tensor) -> Tensor:
        """Normalised embeddings of item ``rows`` from their cached tower features."""
        return F.normalize(self.image_head(self.tower_features(rows, images)), dim=-1)

    def embed_texts(self, tokens: dict[str, Tensor], normalize: bool = True) -> Tensor:
        z = self.text_head(self.text_tower(tokens))
        return F.normalize(z, dim=-1) if normalize else z

    def eval_images(self, images: Tensor, rows: Tensor | None = None) -> Tensor:
        """Embeddings of uint8 images without augmentation, at the training resolution (the item
        ``rows`` let ``cache_tower_features`` reuse the cached tower features)."""
        if self.cache_tower_features and rows is not None:
            return self.embed_cached(rows, images)
        return self.embed_images(to_float(images, self.image_size))

    # ------------------------------------------------------------------ training
    def _task_loss(self, task: str, batch: dict, emb: Tensor, keys: Tensor) -> tuple[Tensor, dict]:
        scale = self.scales[task]()
        logs = {}
        if task == "self_supervised":
            rows = batch["items"]
            z1 = emb[rows]
            z2 = self.embed_images(self.augment(batch["images"][rows]))
            losses = [self.nt_xent(a, b, scale, keys=keys[rows])
                      for a, b in zip(matryoshka_slices(z1, self.dims), matryoshka_slices(z2, self.dims))]
            world = rank_and_world()[1]  # NT-Xent contrasts the gathered views of every rank's rows
            self._count(task, len(rows), 2 * len(rows) * world - 2)
            return torch.stack(losses).mean(), logs
        if task == "image_text":
            rows = batch["items"]
            q, p = emb[rows], self.embed_texts(batch["tokens"])
            qk = pk = keys[rows]
            hard = hard_k = None
        elif task == "same_product":
            q, p = emb[batch["anchor"]], emb[batch["partner"]]
            qk, pk = keys[batch["anchor"]], keys[batch["partner"]]
            hard = hard_k = None
        else:  # click
            q, p = emb[batch["query"]], emb[batch["positive"]]
            qk, pk = keys[batch["query"]], keys[batch["positive"]]
            hard, hard_k = emb[batch["negatives"]], keys[batch["negatives"]]
        queue = self.queues[task] if task in self.queues else None
        qe, qkeys = queue.get() if queue is not None else (None, None)
        losses = []
        for i, (qs, ps) in enumerate(zip(matryoshka_slices(q, self.dims), matryoshka_slices(p, self.dims))):
            d = self.dims[i]
            hs = matryoshka_slices(hard, [d])[0] if hard is not None else None
            qu = matryoshka_slices(qe, [d])[0] if qe is not None and len(qe) else None
            losses.append(self.info_nce(qs, ps, scale, query_keys=qk, positive_keys=pk,
                                        hard_negatives=hs, hard_negative_keys=hard_k,
                                        queue=qu, queue_keys=qkeys if qu is not None else None))
        if getattr(self.info_nce, "last_accuracy", None) is not None:
            logs["acc"] = self.info_nce.last_accuracy
        if queue is not None:
            queue.enqueue(p.detach(), pk)
        n_hard = 0 if hard is None else (hard.shape[1] if hard.dim() == 3 else hard.shape[0])
        in_batch = len(p) * rank_and_world()[1] - 1  # the positives gathered over the ranks
        self._count(task, len(q), in_batch + (len(qe) if qe is not None else 0) + n_hard)
        return torch.stack(losses).mean(), logs

    def _count(self, task: str, examples: int, negatives: int) -> None:
        """Training examples seen and the negatives each query was contrasted with (in-batch,
        queue and hard negatives; before false-negative masking). Under DDP ``examples`` is this
        rank's share, which is the same on every rank (the losses need equal shares)."""
        if self.training:
            examples, negatives = int(examples) * rank_and_world()[1], float(negatives)
            c = self.seen[task]
            c["examples"] += examples
            c["negatives"] += negatives
            c["steps"] += 1
            e, n, k = self._pending[0].get(task, (0, 0.0, 0))
            self._pending[0][task] = (e + examples, n + negatives, k + 1)

    def seen_summary(self) -> dict:
        """``{"examples": per task, "negatives_per_query": mean per task, "tokens": all examples,
        "images": images encoded}``: the encoder's scaling axes as training saw them."""
        return {"examples": {t: int(c["examples"]) for t, c in self.seen.items()},
                "negatives_per_query": {t: c["negatives"] / c["steps"] if c["steps"] else None
                                        for t, c in self.seen.items()},
                "tokens": int(sum(c["examples"] for c in self.seen.values())),
                "images": int(self.images_seen)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["seen"] = {"tasks": self.seen, "images": self.images_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        seen = checkpoint.get("seen")
        if seen and fitting(self):  # resuming; not reloading the best weights for evaluation
            self.seen.update({t: dict(c) for t, c in seen["tasks"].items() if t in self.seen})
            self.images_seen = int(seen["images"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        t0 = self._t_step = time.perf_counter()
        self.nonfinite.start_step(self)
        self._pending = ({}, 0)
        images, keys = batch["images"], batch["keys"]
        inputs = dict(batch)
        if self.cache_tower_features:
            t_aug = 0.0
            emb = self.embed_cached(batch["rows"], images)
        else:
            x = self.augment(images)
            t_aug = time.perf_counter() - t0
            inputs["augmented_images"] = x
            emb = self.embed_images(x)
        (n_images,) = all_sum([images.shape[0]], self.device)  # images encoded by every rank
        self.images_seen += int(n_images)
        self._pending = (self._pending[0], int(n_images))
        total = 0.0
        n = _batch_samples(batch)
        outputs, task_logs = {"image_embeddings": emb}, []
        for task, w in self.tasks.items():
            loss, logs = self._task_loss(task, batch, emb, keys)
            total = total + w * loss
            outputs[f"{task}_loss"] = loss
            task_logs.append((task, loss, logs))
        if not self.nonfinite.loss_ok(self, total, batch_idx, inputs=inputs, outputs=outputs):
            return None  # skipped (nonfinite=skip): no backward, no optimiser step
        for task, loss, logs in task_logs:
            self.log(f"train/{task}_loss", loss, on_step=True, on_epoch=True, batch_size=n)
            self.log(f"train/{task}_scale", self.scales[task]().detach(), on_step=True, on_epoch=False, batch_size=n)
            for k, v in logs.items():
                self.log(f"train/{task}_{k}", v, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        if self._t_end is not None:
            self.log("perf/data_time", t0 - self._t_end, on_step=True, on_epoch=True, batch_size=1)
        self.log("perf/augment_time", t_aug, on_step=True, on_epoch=True, batch_size=1)
        self.log("perf/images_per_step", float(images.shape[0]), on_step=True, on_epoch=True, batch_size=1)
        return total

    def _uncount_skipped(self) -> None:
        """A skipped batch (its loss, or its gradients, non-finite) is not counted: its counts are
        taken back from the ``seen`` counters."""
        counts, images = self._pending
        self._pending = ({}, 0)
        if not self.nonfinite.step_skipped:
            return
        for task, (examples, negatives, steps) in counts.items():
            c = self.seen[task]
            c["examples"] -= examples
            c["negatives"] -= negatives  # whole numbers as floats: exact
            c["steps"] -= steps
        self.images_seen -= images

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self._uncount_skipped()
        super().on_train_batch_end(outputs, batch, batch_idx)  # the guard's step ends
        for s in self.scales.values():
            s.clamp_()
        now = time.perf_counter()
        step = now - self._t_step
        data = self._t_step - self._t_end if self._t_end is not None else 0.0
        n = _batch_samples(batch) * rank_and_world()[1]  # the global batch (equal shares)
        self.log("perf/step_time", step, on_step=True, on_epoch=True, batch_size=1)
        # throughput over the whole iteration: loading the batch plus the step
        self.log("perf/samples_per_s", n / max(step + data, 1e-9), on_step=True, on_epoch=True,
                 prog_bar=True, batch_size=1)
        self._t_end = now

    def on_train_epoch_start(self) -> None:
        self._t_end = None
        loader = self.trainer.train_dataloader
        ds = getattr(loader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._val = {"rows": [], "img": [], "txt": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val["rows"].append(batch["rows"])
        self._val["img"].append(self.eval_images(batch["images"], batch["rows"]).float())
        if "tokens" in batch and self.text_tower is not None:
            self._val["txt"].append(self.embed_texts(batch["tokens"]).float())

    def on_validation_epoch_end(self) -> None:
        split = "test" if self.trainer.testing else "val"
        metrics = self.evaluate_collected(split)
        for k, v in metrics.items():
            self.log(f"{split}/{k}", v, prog_bar=k.endswith("recall@10"), batch_size=1)

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def evaluate_collected(self, split: str) -> dict[str, float]:
        """Metrics of ``split`` over the embeddings gathered by the validation/test steps."""
        if not self._val.get("rows") or self.evaluation is None:
            return {}
        rows = torch.cat(self._val["rows"]).cpu().numpy()
        img = torch.cat(self._val["img"]).cpu()
        n = self.evaluation["n_items"]
        full = torch.zeros(n, img.shape[1])
        full[torch.from_numpy(rows)] = img
        have = np.zeros(n, bool)
        have[rows] = True
        out = {}
        for name, q in self.evaluation.get(f"{split}_search", {}).items():
            q = q.restrict(have)
            out.update({f"{name}/{k}": v for k, v in search_recall(full, q).items()})
            out[f"{name}/queries"] = float(len(q))
        titles = self.evaluation.get("titles")
        if self._val["txt"] and titles is not None and self.evaluation.get(f"{split}_image_text", True):
            txt = torch.cat(self._val["txt"]).cpu()
            out.update(image_text_recall(img, txt, [titles[r] for r in rows]))
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """AdamW (or SGD) with no weight decay on norms, biases, logit scales and embeddings; the
        towers' parameters at ``tower_lr`` (default: ``lr``). Schedule per step: linear warm-up,
        then cosine to 0. ``tower_delay_steps`` trains the heads alone first (the towers join
        after that many steps, with a warm-up of their own), so that gradients from random heads
        do not disturb pretrained towers (linear probing, then fine-tuning)."""
        h = self.hparams
        towers = {id(p) for m in (self.image_tower, self.text_tower) if m is not None for p in m.parameters()}
        buckets: dict[tuple[bool, bool], list] = {(t, f): [] for t in (False, True) for f in (False, True)}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            flat = p.ndim < 2 or "scales." in name or "embed" in name or "cls_token" in name
            buckets[(id(p) in towers, flat)].append(p)
        tower_lr = h.tower_lr if h.tower_lr is not None else h.lr
        groups, is_tower = [], []
        for (tower, flat), params in buckets.items():
            if params:
                groups.append({"params": params, "weight_decay": 0.0 if flat else h.weight_decay,
                               "lr": tower_lr if tower else h.lr})
                is_tower.append(tower)
        if h.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=h.lr)
        elif h.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=h.lr, momentum=0.9)
        else:
            raise ValueError(f"unknown optimizer {h.optimizer!r} ({' or '.join(OPTIMIZERS)})")
        trainer = getattr(self, "_trainer", None)
        total = trainer.estimated_stepping_batches if trainer is not None else 1
        delay = h.tower_delay_steps
        self._delayed = [p for g, t in zip(groups, is_tower) if t for p in g["params"]] if delay else []
        for p in self._delayed:  # no gradients through the towers until the delay is over
            p.requires_grad_(False)

        # towers: 0 until the delay is over, then their own warm-up and cosine to 0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [warmup_cosine(h.warmup_steps, total, start=delay if t else 0) for t in is_tower])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._delayed and self.global_step >= self.hparams.tower_delay_steps:
            for p in self._delayed:
                p.requires_grad_(True)
            self._delayed = []


def _batch_samples(batch: dict) -> int:
    """Training examples in a multi-task batch (items, click pairs and product pairs)."""
    n = 0
    for k in ("items", "query", "anchor"):
        if k in batch:
            n += int(batch[k].shape[0])
    return n
