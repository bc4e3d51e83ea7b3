"""The MOON2.0 Lightning module: a multimodal encoder trained by dual-level alignment.

Objectives (each an InfoNCE with a logit scale of its own, names as in ``objectives``):

* ``t2mm``, ``i2mm``, ``mm2mm``: inter-product alignment of the query in text, image and
  multimodal form against multimodal candidates (:func:`~encoders.moon2.objectives.inter_product_loss`),
  per triple weighted by dynamic sample filtering (``filtering.enabled``); an ``mm2mm`` query
  identical to its positive (an un-augmented item without a colour variant) is left out of that
  objective, as it would only teach the identity;
* ``intra``: intra-product alignment of each query item's image and its own text.

The objectives are combined with the modality-driven weights of
:class:`~encoders.moon2.fusion.ObjectiveWeights` when the encoder has MoE layers and
``weighting.learned``; otherwise with weight 1 each (the fixed-ratio mixture). MoE adds
``aux.balance * load-balancing + aux.entropy * router entropy``. The routing behind each
objective's weight: the text-only pass (``t2mm``), the image-only pass (``i2mm``), the multimodal
pass over the batch's queries, positives and negatives (``mm2mm``), the mean of the image-only and
text-only passes (``intra``).

``nonfinite`` (``optim.nonfinite`` in the config): what a NaN/inf training loss or gradient does,
``"fail"`` (stop, naming the epoch, step, batch and the inputs, embeddings, losses and parameters
holding NaN/inf) or ``"skip"`` (skip the batch: weights, AdamW state and buffers as they were
before it; counted in ``nonfinite.skipped``, kept in checkpoints); see :mod:`ctr.guards`.
Non-finite weights at the end of fitting always stop the run.
"""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from ctr.guards import GuardedModule, NonFiniteGuard
from ctr.optim import warmup_cosine
from encoders.losses import LogitScale
from encoders.moon2.augment import consistency_keep
from encoders.moon2.fusion import DualEncoder, MultimodalEncoder, ObjectiveWeights, Routing
from encoders.moon2.objectives import (MarginSchedule, filter_weights, inter_product_loss,
                                       intra_product_loss, reliability)

OBJECTIVES = ("t2mm", "i2mm", "mm2mm", "intra")


class Moon2Module(GuardedModule, pl.LightningModule):
    def __init__(self, image_dim: int, text_dim: int, *, encoder: dict | None = None,
                 objectives: list[str] | tuple[str, ...] = OBJECTIVES, weighting: dict | None = None,
                 aux: dict | None = None, filtering: dict | None = None, consistency: dict | None = None,
                 logit_scale: dict | None = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_steps: int = 0, nonfinite: str = "fail"):
        super().__init__()
        self.save_hyperparameters()
        enc = dict(encoder or {})
        kind = enc.pop("kind", "fusion")
        if kind not in ("fusion", "dual"):
            raise ValueError(f"encoder.kind must be 'fusion' or 'dual', got {kind!r}")
        self.encoder = (MultimodalEncoder if kind == "fusion" else DualEncoder)(image_dim, text_dim, **enc)
        self.objectives = list(objectives)
        unknown = set(self.objectives) - set(OBJECTIVES)
        if unknown or not self.objectives:
            raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {objectives}")
        w = {"learned": True, "temperature": 1.0, "lr": 1e-2, **(weighting or {})}
        self.weighting = w
        self.weights = (ObjectiveWeights(self.encoder.n_experts, self.objectives, w["temperature"])
                        if w["learned"] and self.encoder.n_experts else None)
        self.aux = {"balance": 0.01, "entropy": 0.0, **(aux or {})}
        self.filtering = {"enabled": False, "kappa": 10.0, "threshold": 0.6, "margin_start": 0.1,
                          "margin_end": 0.0, "schedule": "cosine", **(filtering or {})}
        self.consistency = {"quantile": 0.1, "threshold": None, "from_epoch": 1, **(consistency or {})}
        self.scales = torch.nn.ModuleDict({o: LogitScale(**(logit_scale or {})) for o in self.objectives})
        self._margin: MarginSchedule | None = None
        self._val: dict[str, list] = {}
        self.evaluation: dict | None = None  # set by train(): {"group": [N] product of each row}
        self.nonfinite = NonFiniteGuard(nonfinite)

    # ------------------------------------------------------------------ embedding
    def embed(self, image: Tensor | None = None, text: Tensor | None = None, mask: Tensor | None = None
              ) -> tuple[Tensor, Routing | None]:
        return self.encoder(image=image, text=text, text_mask=mask)

    @torch.no_grad()
    def embed_modalities(self, batch: dict, modalities=("text", "image", "mm")) -> dict[str, Tensor]:
        out = {}
        for m in modalities:
            out[m] = self.embed(image=batch["image"] if m in ("image", "mm") else None,
                                text=batch["text"] if m in ("text", "mm") else None,
                                mask=batch["mask"] if m in ("text", "mm") else None)[0].float()
        return out

    # ------------------------------------------------------------------ training
    def margin(self) -> float:
        if self._margin is None:
            f = self.filtering
            total = getattr(self.trainer, "estimated_stepping_batches", 1) if self._trainer else 1
            self._margin = MarginSchedule(f["margin_start"], f["margin_end"],
                                          int(total) if math.isfinite(total) else 1000, f["schedule"])
        return self._margin(self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self.nonfinite.start_step(self)
        objs = self.objectives
        b = batch["q_image"].shape[0]
        emb: dict[str, Tensor] = {}
        routing: dict[str, Routing | None] = {}
        if any(o in objs for o in ("t2mm", "i2mm", "mm2mm")) or self.filtering["enabled"]:
            cat = lambda k: torch.cat([batch[f"q_{k}"], batch[f"p_{k}"], batch[f"n_{k}"]])  # noqa: E731
            mm, routing["mm"] = self.embed(cat("image"), cat("text"), cat("mask"))
            emb["q_mm"], emb["p_mm"], emb["n_mm"] = mm[:b], mm[b:2 * b], mm[2 * b:]
        if "t2mm" in objs or "intra" in objs:
            emb["q_text"], routing["text"] = self.embed(text=batch["q_text"], mask=batch["q_mask"])
        if "i2mm" in objs or "intra" in objs:
            emb["q_image"], routing["image"] = self.embed(image=batch["q_image"])

        fw = torch.ones(b, device=batch["q_image"].device)
        logs: dict[str, tuple[Tensor | float, bool]] = {}  # name -> (value, also per epoch), logged unless skipped
        if self.filtering["enabled"]:
            m = self.margin()
            score = reliability(emb["q_mm"].detach(), emb["p_mm"].detach(), emb["n_mm"].detach(),
                                self.filtering["kappa"], m)
            fw = filter_weights(score, self.filtering["threshold"])
            logs["train/filtered_share"] = ((score < self.filtering["threshold"]).float().mean(), True)
            logs["train/filter_weight"] = (fw.mean(), True)
            logs["train/margin"] = (float(m), False)

        losses = {}
        for o, key in (("t2mm", "q_text"), ("i2mm", "q_image"), ("mm2mm", "q_mm")):
            if o not in objs:
                continue
            per = inter_product_loss(emb[key], emb["p_mm"], emb["n_mm"], self.scales[o](),
                                     batch["q_keys"], batch["p_keys"], batch["n_keys"])
            valid = torch.ones_like(fw)
            if o == "mm2mm":
                valid = (~(batch["self_positive"] & ~batch["augmented"])).to(fw.dtype)
            losses[o] = (fw * valid * per).sum() / valid.sum().clamp_min(1.0)
        if "intra" in objs:
            losses["intra"] = intra_product_loss(emb["q_image"], emb["q_text"], self.scales["intra"](),
                                                 batch["q_keys"]).mean()
        stacked = torch.stack([losses[o] for o in objs])
        if self.weights is not None:
            mod = {"t2mm": "text", "i2mm": "image", "mm2mm": "mm"}
            u = torch.stack([(routing["image"].probs + routing["text"].probs) / 2 if o == "intra"
                             else routing[mod[o]].probs for o in objs])
            w = self.weights(u)
            total = (w.detach() * stacked).sum() + self.weights.adversary_loss(w, stacked)
        else:
            w = torch.ones_like(stacked)
            total = stacked.sum()
        routed = [r for r in routing.values() if r is not None]
        if routed:
            balance = torch.stack([r.balance for r in routed]).mean()
            entropy = torch.stack([r.entropy for r in routed]).mean()
            total = total + self.aux["balance"] * balance + self.aux["entropy"] * entropy
            logs["train/balance"] = (balance, False)
            logs["train/router_entropy"] = (entropy, False)
            logs["train/expert_load_max"] = (torch.stack([r.load for r in routed]).mean(0).max(), False)
        outputs = {**{f"{k}_embeddings": v for k, v in emb.items()}, "filter_weights": fw,
                   **{f"{o}_loss": losses[o] for o in objs}, "objective_weights": w}
        if routed:
            outputs.update(balance=balance, router_entropy=entropy)
        if not self.nonfinite.loss_ok(self, total, batch_idx, inputs=batch, outputs=outputs):
            return None  # skipped (nonfinite=skip): no backward, no optimiser step
        for k, (v, epoch) in logs.items():
            self.log(k, v, on_step=True, on_epoch=epoch, batch_size=b)
        for o, wi in zip(objs, w):
            self.log(f"train/{o}_loss", losses[o], on_step=True, on_epoch=True, batch_size=b)
            self.log(f"train/w_{o}", wi.detach(), on_step=True, on_epoch=True, batch_size=b)
        self.log("train/augmented_share", batch["augmented"].float().mean(), batch_size=b)
        self.log("train/loss", (w.detach() * stacked).sum(), prog_bar=True, batch_size=b)
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the guard's step ends
        for s in self.scales.values():
            s.clamp_()

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.current_epoch)
        aug = getattr(dm, "aug", None)
        if aug is not None and self.current_epoch >= self.consistency["from_epoch"]:
            keep, thr = self.consistency_filter(aug, dm.tokens)
            aug.keep = keep.cpu().numpy()
            self.log("train/aug_kept_share", float(keep.float().mean()), on_step=False, on_epoch=True)
            self.log("train/consistency_threshold", thr, on_step=False, on_epoch=True)

    @torch.no_grad()
    def consistency_filter(self, aug, tokens, chunk: int = 1024) -> tuple[Tensor, float]:
        """Image-text similarity of every augmented pair (edited image vs enriched text) and of the
        original pairs of the same items, under the current encoder; see
        :func:`~encoders.moon2.augment.consistency_keep`."""
        was = self.training
        self.eval()
        dev = self.device

        def emb_img(arr, idx):
            return torch.cat([self.embed(image=torch.from_numpy(np.asarray(arr[idx[i:i + chunk]])).float().to(dev))[0]
                              for i in range(0, len(idx), chunk)])

        def emb_txt(arr, mask, idx):
            return torch.cat([self.embed(text=torch.from_numpy(np.asarray(arr[idx[i:i + chunk]])).float().to(dev),
                                         mask=torch.from_numpy(mask[idx[i:i + chunk]]).to(dev))[0]
                              for i in range(0, len(idx), chunk)])

        r = np.arange(len(aug.rows))
        txt_aug = emb_txt(aug.text, aug.mask, r)
        img_aug = emb_img(aug.image, np.arange(len(aug.rows) * aug.n_views))
        sim_aug = (img_aug * txt_aug.repeat_interleave(aug.n_views, 0)).sum(-1)
        sim_orig = (emb_img(tokens.image, aug.rows) * emb_txt(tokens.text, tokens.mask, aug.rows)).sum(-1)
        self.train(was)
        c = self.consistency
        return consistency_keep(sim_aug, sim_orig, quantile=c["quantile"], threshold=c["threshold"])

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"rows": [], "text": [], "image": [], "mm": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val["rows"].append(batch["rows"].cpu())
        for m, e in self.embed_modalities(batch).items():
            self._val[m].append(e.cpu())

    def on_validation_epoch_end(self) -> None:
        from encoders.moon2.benchmark import retrieval

        if not self._val.get("rows") or self.evaluation is None:
            return
        rows = torch.cat(self._val["rows"]).numpy()
        emb = {m: torch.cat(self._val[m]) for m in ("text", "image", "mm")}
        # variant search: the other items of the query's product, the query's own item never a candidate
        res = retrieval(emb, self.evaluation["group"][rows], ks=(1, 10), exclude_self="all")
        for k, v in res.items():
            self.log(f"val/{k}", v, batch_size=1)
        for k in (1, 10):  # over the nine directions (those with a query)
            vals = [v for n, v in res.items() if n.endswith(f"/r@{k}") and not np.isnan(v)]
            self.log(f"val/mean_r@{k}", float(np.mean(vals)) if vals else float("nan"), prog_bar=k == 1,
                     batch_size=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """AdamW, no weight decay on norms, biases, position/modality embeddings, logit scales and
        the objective-weight matrix (which has its own ``weighting.lr``); linear warm-up then
        cosine to 0, per step."""
        h = self.hparams
        decay, flat, adversary = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("weights."):
                adversary.append(p)
                continue
            no_decay = p.ndim < 2 or name.startswith("scales.") or name.endswith(("_pos", "modality"))
            (flat if no_decay else decay).append(p)
        groups = [{"params": decay, "weight_decay": h.weight_decay}, {"params": flat, "weight_decay": 0.0}]
        if adversary:  # the objective-weight matrix: its own learning rate (it must track the losses)
            groups.append({"params": adversary, "weight_decay": 0.0, "lr": float(self.weighting["lr"])})
        opt = torch.optim.AdamW(groups, lr=h.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(h.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
