"""The composed CTR model: feature embeddings -> behaviour-sequence arch -> over-arch -> logit."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ctr.data.batch import Batch
from ctr.models.parts import MLP, FeatureEmbedding, sequence_mask


class CTRModel(nn.Module):
    """Embeds every sparse feature, pools the behaviour sequence against the target, and maps the
    concatenation (with dense features) to one logit per impression.

    ``meta`` is the prepared artefact's feature map (``Artefact.meta``). ``sequence`` builds the
    sequence arch from its input width, e.g. ``functools.partial(TargetAttention, hidden=[64, 32])``
    or ``MeanPooling``; ``None`` ignores the history. ``id_dropout`` maps a sparse feature to the
    probability of hiding its id (as out-of-vocabulary) in training. ``wide`` adds a first-order term
    (a learned scalar per id, summed over the sparse features) to the logit, as Wide & Deep does.
    ``length_feature`` feeds the (log) history length to the over-arch. ``share_history_tables``
    (default) embeds history items with the target's tables; False gives them tables of their own. The query of the sequence
    arch is the target's embeddings of the same features as the history (item_id and its side
    features).
    """

    def __init__(self, meta: dict, embedding_dim: int = 32,
                 sequence: Callable[[int], nn.Module] | None = None,
                 over_hidden: list[int] = (200, 80), over_act: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False, embedding_dropout: float = 0.0,
                 init_std: float = 1e-2, id_dropout: dict[str, float] | None = None,
                 wide: bool = False, length_feature: bool = False, share_history_tables: bool = True):
        super().__init__()
        self.sparse_names = list(meta["sparse"])
        self.seq_names = list(meta["sequence"]["features"]) if meta.get("sequence") and sequence else []
        missing = [n for n in self.seq_names if n not in self.sparse_names]
        if missing:
            raise ValueError(f"sequence features {missing} are not sparse features of the target; "
                             f"add them to the data settings' sparse list")
        self.id_dropout = dict(id_dropout or {})
        unknown = sorted(set(self.id_dropout) - set(self.sparse_names))
        if unknown:
            raise ValueError(f"id_dropout names unknown sparse features {unknown}; known: {self.sparse_names}")
        tables = dict(meta["vocab_sizes"])
        self.hist_prefix = "" if share_history_tables else "hist__"
        if not share_history_tables:  # history items get tables of their own
            tables.update({f"hist__{n}": meta["vocab_sizes"][n] for n in self.seq_names})
        self.embedding = FeatureEmbedding(tables, embedding_dim, init_std)
        self.embedding_dropout = nn.Dropout(embedding_dropout) if embedding_dropout > 0 else nn.Identity()
        seq_dim = embedding_dim * len(self.seq_names)
        self.sequence = sequence(seq_dim) if self.seq_names else None
        n_dense = len(meta.get("dense") or [])
        self.length_feature = length_feature and self.sequence is not None
        self.max_len = meta["sequence"]["max_len"] if self.sequence is not None else 1
        in_dim = (embedding_dim * len(self.sparse_names) + (self.sequence.out_dim if self.sequence else 0)
                  + n_dense + int(self.length_feature))
        # first-order ("wide") part: one learned scalar per id of each sparse feature
        self.wide = FeatureEmbedding({n: meta["vocab_sizes"][n] for n in self.sparse_names}, 1, 0.0) if wide else None
        self.over = MLP(in_dim, list(over_hidden), 1, act=over_act, dropout=dropout, batch_norm=batch_norm)

    def _ids(self, name: str, ids: Tensor) -> Tensor:
        """In training, replace ids by the out-of-vocabulary id 1 with probability ``id_dropout[name]``,
        so that the OOV row is trained and the model learns to predict for unseen users and items."""
        p = self.id_dropout.get(name, 0.0)
        if not self.training or p <= 0:
            return ids
        drop = torch.rand(ids.shape, device=ids.device) < p
        return torch.where(drop & (ids > 0), torch.ones_like(ids), ids)

    def features(self, batch: Batch) -> Tensor:
        """The over-arch input: [B, in_dim]."""
        emb = {n: self.embedding(n, self._ids(n, batch.sparse[n])) for n in self.sparse_names}
        parts = [emb[n] for n in self.sparse_names]
        if self.sequence is not None:
            query = torch.cat([emb[n] for n in self.seq_names], dim=-1)
            keys = torch.cat([self.embedding(self.hist_prefix + n, batch.seq[n]) for n in self.seq_names], dim=-1)
            mask = sequence_mask(batch.seq_len, keys.shape[1])
            parts.append(self.sequence(query, keys, mask))
            if self.length_feature:  # log history length, scaled to [0, 1]
                n = batch.seq_len.to(keys.dtype).clamp_min(0)
                parts.append((torch.log1p(n) / math.log1p(self.max_len)).unsqueeze(-1))
        x = self.embedding_dropout(torch.cat(parts, dim=-1))
        return x if batch.dense is None else torch.cat([x, batch.dense], dim=-1)

    def forward(self, batch: Batch) -> Tensor:
        logit = self.over(self.features(batch)).squeeze(-1)
        if self.wide is not None:
            logit = logit + sum(self.wide(n, batch.sparse[n]) for n in self.sparse_names).squeeze(-1)
        return logit
