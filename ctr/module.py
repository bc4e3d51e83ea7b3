"""The Lightning module of the CTR stage: a thin wrapper that owns the loss, optimiser and metrics."""

from __future__ import annotations

import time

import pytorch_lightning as pl_
import torch
from torch import nn

from ctr.data.batch import Batch
from ctr.guards import GuardedModule, NonFiniteGuard
from ctr.metrics import ctr_metrics
from ctr.runs import all_sum, fitting

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class CTRModule(GuardedModule, pl_.LightningModule):
    """BCE on logits; torchmetrics AUC / GAUC / logloss / calibration on val and every eval split.

    ``eval_splits`` names the test dataloaders in order (e.g. ``["test", "test_random"]``); their
    metrics are logged as ``<split>/<metric>``. Embedding tables get their own weight decay.
    A model's ``aux_loss(batch)`` (e.g. the debiasing network's contrastive loss) is added to the
    training loss. ``slices`` maps a name to a boolean mask over item rows ([N + 1], indexed by
    ``batch.refs["item_id"]``), e.g. the low-impression items: each eval split is then also
    measured on those impressions alone, as ``<split>/<slice>/<metric>``.

    Distributed (DDP): each rank sees its share of every batch (``CTRDataModule``); the
    ``train_samples``/``history_tokens`` counters are summed over the ranks after every step, and
    the metrics gather their states over the ranks when computed, so every rank logs the metrics
    of the whole split.

    ``nonfinite`` (``optim.nonfinite`` in the config): what a NaN/inf training loss or gradient
    does, ``"fail"`` (stop, naming the step, batch and tensors) or ``"skip"`` (skip the batch,
    counted in ``nonfinite.skipped``); see :mod:`ctr.guards`. A skipped batch is not counted in
    ``train_samples``. Non-finite weights at the end of fitting always stop the run.

    ``plateau`` (``optim.plateau``): ``{factor, patience, min_lr}`` multiplies every learning rate by
    ``factor`` after ``patience`` + 1 validations in a row without a better ``monitor`` (the epochs
    after the best one continue from the current weights at the lower rate, as FuxiCTR's
    ``reduce_lr_on_plateau`` does); null: a constant rate.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 embedding_weight_decay: float = 0.0, optimizer: str = "adam",
                 eval_splits: tuple[str, ...] = ("test",), slices: dict[str, torch.Tensor] | None = None,
                 nonfinite: str = "fail", plateau: dict | None = None,
                 monitor: str | None = "val/auc", monitor_mode: str = "max"):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "slices"])
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.eval_splits = list(eval_splits)
        self.val_metrics = ctr_metrics("val/")
        self.test_metrics = nn.ModuleList([ctr_metrics(f"{s}/") for s in self.eval_splits])
        self.slice_names = list(slices or {})
        for name, m in (slices or {}).items():
            self.register_buffer(f"slice_{name}", m.bool(), persistent=False)
        self.slice_metrics = nn.ModuleList([
            nn.ModuleList([ctr_metrics(f"{s}/{name}/") for name in self.slice_names]) for s in self.eval_splits])
        self.train_samples = 0
        self.history_tokens = 0  # behaviour-sequence items the model has read in training
        self.train_seconds = 0.0
        self._t_prev: float | None = None
        self.nonfinite = NonFiniteGuard(nonfinite)

    @staticmethod
    def monitor_metrics() -> list[str]:
        """The metrics validation logs (what ``monitor.metric`` may name)."""
        return list(ctr_metrics("val/").keys())

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch)

    # ---- training ---------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_prev is not None:  # data time since the previous step ended
            self.train_seconds += now - self._t_prev
        self._t_prev = now

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        self.nonfinite.start_step(self)
        logits = self(batch)
        loss = self.loss_fn(logits, batch.label)
        aux = self.model.aux_loss(batch) if hasattr(self.model, "aux_loss") else None
        outputs = {"logits": logits, "ctr_loss": loss, **({"aux_loss": aux} if aux is not None else {})}
        if aux is not None:
            loss = loss + aux
        if not self.nonfinite.loss_ok(self, loss, batch_idx, inputs=batch, outputs=outputs):
            return None  # skipped (nonfinite=skip): no backward, no optimiser step
        if aux is not None:
            self.log("train/aux_loss", aux, batch_size=len(batch))
            self.log("train/ctr_loss", outputs["ctr_loss"], batch_size=len(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._t_prev  # type: ignore[operator]
        self._t_prev = now
        super().on_train_batch_end(outputs, batch, batch_idx)  # the guard's step ends
        if self.nonfinite.step_skipped:  # the same on every rank: no rank waits in all_sum below
            return
        hist = int(batch.seq_len.sum()) if batch.seq_len is not None else 0
        n, hist = all_sum([len(batch), hist], self.device)  # over the ranks of a DDP run
        self.train_samples += int(n)
        self.history_tokens += int(hist)

    def on_validation_start(self) -> None:
        self._t_prev = None  # evaluation time is not training time

    def on_train_epoch_start(self) -> None:
        self._t_prev = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # a resumed run counts on
        super().on_save_checkpoint(checkpoint)
        checkpoint["seen"] = {"samples": self.train_samples, "history_tokens": self.history_tokens}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if fitting(self):  # resuming; not reloading the best weights for evaluation
            seen = checkpoint.get("seen") or {}
            self.train_samples = int(seen.get("samples", 0))
            self.history_tokens = int(seen.get("history_tokens", 0))

    @property
    def train_samples_per_s(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else float("nan")

    # ---- evaluation -------------------------------------------------------------------------
    def _update(self, metrics, batch: Batch, slices=None) -> None:
        probs = torch.sigmoid(self(batch).float())
        metrics.update(probs, batch.label, groups=batch.group)
        for name, m in zip(self.slice_names, slices or []):
            keep = getattr(self, f"slice_{name}")[batch.refs["item_id"]]
            if keep.any():
                m.update(probs[keep], batch.label[keep], groups=batch.group[keep])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update(self.val_metrics, batch)

    def _compute(self, metrics, always: bool = False) -> dict | None:
        """``metrics.compute()`` over every rank's updates; None when no rank updated them (unless
        ``always``). Every rank must call it (the count and the states are gathered)."""
        local = next(iter(metrics.values())).update_count
        (total,) = all_sum([local], self.device)
        if total == 0 and not always:
            return None
        if local == 0 and total > 0:  # this rank saw none of the rows: typed empty states to gather
            empty = torch.zeros(0, device=self.device)
            metrics.update(empty, empty, groups=torch.zeros(0, dtype=torch.long, device=self.device))
        return metrics.compute()

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._compute(self.val_metrics, always=True), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(self.test_metrics[dataloader_idx], batch, self.slice_metrics[dataloader_idx])

    def on_test_epoch_end(self) -> None:
        for m in [*self.test_metrics, *(x for ms in self.slice_metrics for x in ms)]:
            values = self._compute(m)
            if values is not None:
                self.log_dict(values, add_dataloader_idx=False)
            m.reset()

    # ---- optimiser --------------------------------------------------------------------------
    def configure_optimizers(self):
        emb, decay, no_decay = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".tables." in name:  # embedding tables (FeatureEmbedding), the wide term's too
                emb.append(p)
            elif p.ndim < 2:  # biases, norms, PReLU/Dice slopes
                no_decay.append(p)
            else:
                decay.append(p)
        h = self.hparams
        groups = [{"params": emb, "weight_decay": h.embedding_weight_decay},
                  {"params": decay, "weight_decay": h.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if h.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {h.optimizer!r} ({', '.join(OPTIMIZERS)})")
        opt = OPTIMIZERS[h.optimizer](groups, lr=h.lr, fused=_fusable(groups))
        if not h.plateau:
            return opt
        if h.monitor is None:
            raise ValueError("optim.plateau needs a monitored metric (monitor.metric is null)")
        p = {"factor": 0.1, "patience": 0, "min_lr": 0.0, **h.plateau}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=h.monitor_mode, factor=float(p["factor"]), patience=int(p["patience"]),
            min_lr=float(p["min_lr"]), threshold=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": h.monitor,
                                                    "interval": "epoch", "strict": True}}


def _fusable(groups: list[dict]) -> bool | None:
    """torch's fused Adam kernels (one pass per tensor, CPU and CUDA) when every parameter is a
    dense float tensor on such a device; else None (torch's default implementation)."""
    ps = [p for g in groups for p in g["params"]]
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and not p.is_sparse for p in ps)
    return True if ps and ok else None
