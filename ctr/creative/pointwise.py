"""The pointwise baseline: a CTR regressor on image embeddings that picks the higher-scored creative.

:class:`PointwiseCTR` scores one creative in one search context: the frozen image tower's token
features, mean pooled and projected, the prompt's words as a mean-pooled bag of embeddings, and an
MLP over ``[image, prompt, image * prompt]`` to a CTR logit. :class:`PointwiseModule` fits it on
every (context, creative) cell of the training products' impression log with the binomial
log-likelihood of the clicks (per impression), and selects between two creatives by comparing
their scores, which makes it order-swap consistent by construction.

``nonfinite`` (the config's ``pointwise.nonfinite``): what a NaN/inf training loss or gradient
does, ``"fail"`` (stop, naming the epoch, step, batch and the inputs, outputs and parameters
holding NaN/inf) or ``"skip"`` (skip the batch, counted in ``nonfinite.skipped`` and kept in
checkpoints); see :mod:`ctr.guards`. Non-finite weights at the end of fitting always stop the run.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ctr.creative.selector import WordVocab, pad_ids
from ctr.guards import GuardedModule, NonFiniteGuard
from ctr.optim import warmup_cosine


class PointwiseCTR(nn.Module):
    def __init__(self, vocab: WordVocab, image_dim: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.vocab = vocab
        self.img = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, hidden))
        self.words = nn.EmbeddingBag(len(vocab), hidden, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self._images = None

    def bind(self, images) -> None:
        if images.tokens is None:
            raise ValueError("the pointwise baseline needs the image tower's token features (data tokens=true)")
        self._images = images

    def forward(self, rows: Tensor, prompts: list[str]) -> Tensor:
        x = self._images.token_rows(rows, self.img[1].weight.device)
        ids, _ = pad_ids([self.vocab.ids(p) for p in prompts])
        v = self.img(x.mean(1))
        q = self.words(ids.to(v.device))
        return self.mlp(torch.cat([v, q, v * q], -1)).squeeze(-1)


class CellDataset(Dataset):
    """(context, creative) cells: creative ``row``, ``prompt``, ``impressions``, ``clicks``."""

    def __init__(self, cells: pl.DataFrame):
        self.row = torch.tensor(cells["row"].to_numpy())
        self.imp = torch.as_tensor(cells["impressions"].to_numpy().astype(np.float32))
        self.clk = torch.as_tensor(cells["clicks"].to_numpy().astype(np.float32))
        self.prompt = cells["prompt"].to_list()

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict:
        ix = torch.as_tensor(idx)
        return {"row": self.row[ix], "impressions": self.imp[ix], "clicks": self.clk[ix],
                "prompt": [self.prompt[i] for i in idx]}


class PointwiseModule(GuardedModule, L.LightningModule):
    def __init__(self, model: PointwiseCTR, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 50,
                 nonfinite: str = "fail"):
        super().__init__()
        self.model, self.lr, self.weight_decay, self.warmup_steps = model, lr, weight_decay, warmup_steps
        self.nonfinite = NonFiniteGuard(nonfinite)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self.nonfinite.start_step(self)
        z = self.model(batch["row"], batch["prompt"])
        nll = -(batch["clicks"] * F.logsigmoid(z) + (batch["impressions"] - batch["clicks"]) * F.logsigmoid(-z))
        loss = (nll / batch["impressions"]).mean()
        if not self.nonfinite.loss_ok(self, loss, batch_idx, inputs=batch, outputs={"logits": z, "nll": nll}):
            return None  # skipped (nonfinite=skip): no backward, no optimiser step
        self.log("train/loss", loss, prog_bar=True, batch_size=len(z))
        return loss

    def choose(self, batch: dict) -> Tensor:
        """1 where creative ``a`` scores higher than ``b``."""
        return (self.model(batch["a"], batch["prompt"]) > self.model(batch["b"], batch["prompt"])).long()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pick_a = self.choose(batch)
        self.log("val/acc", (pick_a == (batch["label"] == 0).long()).float().mean(), batch_size=len(pick_a),
                 prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(self.warmup_steps, self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def pointwise_choices(module: PointwiseModule, ds, batch_size: int = 1024) -> np.ndarray:
    """1 where the baseline picks the pair's ``A`` creative."""
    module.eval()
    out = [module.choose(ds.collate(list(range(lo, min(len(ds), lo + batch_size))))).numpy()
           for lo in range(0, len(ds), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def cell_loader(cells: pl.DataFrame, batch_size: int, shuffle: bool) -> DataLoader:
    ds = CellDataset(cells)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=ds.collate)
