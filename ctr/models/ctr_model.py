"""The composed CTR model: feature embeddings -> behaviour-sequence arch -> over-arch -> logit."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ctr.data.batch import Batch
from ctr.models.embedding import FeatureEmbedding, make_embedding
from ctr.models.parts import MLP, HistoryTable, sequence_mask


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

    ``visual`` builds a :class:`ctr.models.visual.VisualArch` from (meta, embedding_dim): frozen item
    vectors that join the item-ID embedding of the target and of each history item (``sum`` /
    ``concat``) or initialise it (``init``), bias the target attention by visual similarity, and
    add SimTier and query features; its debiasing loss is :meth:`aux_loss`. ``position`` adds a
    shallow position-bias tower (:class:`PositionTower`) to the logit in training only.
    ``prior_bias`` starts the output bias at the logit of the train split's CTR (for rare clicks).

    ``embedding_backend`` picks the id tables (:mod:`ctr.models.embedding`): ``plain``
    (``nn.Embedding`` per feature) or ``torchrec`` (a TorchRec ``EmbeddingCollection``, shardable
    with :func:`ctr.models.embedding.shard_embeddings`); same initial weights for the same seed and
    the same function of them. Every feature of a batch (target and history) is embedded in one
    ``lookup``, the history under ``hist.<feature>``.
    """

    def __init__(self, meta: dict, embedding_dim: int = 32,
                 sequence: Callable[[int], nn.Module] | None = None,
                 over_hidden: list[int] = (200, 80), over_act: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False, embedding_dropout: float = 0.0,
                 init_std: float = 1e-2, id_dropout: dict[str, float] | None = None,
                 wide: bool = False, length_feature: bool = False, share_history_tables: bool = True,
                 visual: Callable[..., nn.Module] | None = None, position: dict | None = None,
                 prior_bias: bool = False, embedding_backend: str = "plain"):
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
        prefix = "" if share_history_tables else "hist__"
        if not share_history_tables:  # history items get tables of their own
            tables.update({f"hist__{n}": meta["vocab_sizes"][n] for n in self.seq_names})
        # the history's ids are looked up as hist.<feature>, in the target's table or its own
        aliases = {f"hist.{n}": prefix + n for n in self.seq_names}
        self.embedding = make_embedding(embedding_backend, tables, embedding_dim, init_std, aliases)
        self.embedding_dropout = nn.Dropout(embedding_dropout) if embedding_dropout > 0 else nn.Identity()
        self.visual = visual(meta=meta, embedding_dim=embedding_dim) if visual is not None else None
        if self.visual is not None and "item_id" not in self.sparse_names:
            raise ValueError("the visual arch joins the item_id feature: add item_id to the sparse features")
        if self.visual is not None and self.visual.mode == "init":
            from ctr.models.visual import vocab_item_rows

            rows = vocab_item_rows(meta)
            for t in ("item_id", "hist__item_id"):
                if t in tables:
                    self.visual.init_id_table(self.embedding.weight(t), rows)
        if self.visual is not None and self.visual.tiers and not self.seq_names:
            raise ValueError("visual tiers (SimTier) need a behaviour sequence: set tiers=0 or add a sequence")
        vx = self.visual.item_extra_dim if self.visual is not None else 0
        seq_dim = embedding_dim * len(self.seq_names) + (vx if "item_id" in self.seq_names else 0)
        self.sequence = sequence(seq_dim) if self.seq_names else None
        # the packed history handed over as table rows and ids (plain tables: dense weights)
        self._tables = (self.sequence is not None and getattr(self.sequence, "takes_tables", False)
                        and isinstance(self.embedding, FeatureEmbedding))
        n_dense = len(meta.get("dense") or [])
        self.length_feature = length_feature and self.sequence is not None
        self.max_len = meta["sequence"]["max_len"] if self.sequence is not None else 1
        in_dim = (embedding_dim * len(self.sparse_names) + (self.sequence.out_dim if self.sequence else 0)
                  + n_dense + int(self.length_feature) + vx
                  + (self.visual.out_dim if self.visual is not None else 0))
        # first-order ("wide") part: one learned scalar per id of each sparse feature
        self.wide = (make_embedding(embedding_backend, {n: meta["vocab_sizes"][n] for n in self.sparse_names}, 1, 0.0)
                     if wide else None)
        self.over = MLP(in_dim, list(over_hidden), 1, act=over_act, dropout=dropout, batch_norm=batch_norm)
        self.position = PositionTower(**position) if position else None
        if prior_bias:  # start at the train CTR, not 0.5: rare clicks need no epochs to get there
            p = float(meta["splits"]["train"]["ctr"])
            with torch.no_grad():
                self.over.net[-1].bias.fill_(math.log(p / (1 - p)))

    def _ids(self, name: str, ids: Tensor) -> Tensor:
        """In training, replace ids by the out-of-vocabulary id 1 with probability ``id_dropout[name]``,
        so that the OOV row is trained and the model learns to predict for unseen users and items."""
        p = self.id_dropout.get(name, 0.0)
        if not self.training or p <= 0:
            return ids
        drop = torch.rand(ids.shape, device=ids.device) < p
        return torch.where(drop & (ids > 0), torch.ones_like(ids), ids)

    def _item(self, e: Tensor, pv: Tensor | None) -> Tensor:
        """An item's ID embedding joined with its projected visual vector (sum / concat)."""
        if pv is None:
            return e
        return e + pv if self.visual.mode == "sum" else torch.cat([e, pv], dim=-1)

    def features(self, batch: Batch) -> Tensor:
        """The over-arch input: [B, in_dim]."""
        ids = {n: self._ids(n, batch.sparse[n]) for n in self.sparse_names}
        vis = self.visual
        # the packed path: only the real history items are embedded and attended to (no padding)
        packed = self.sequence is not None and vis is None and getattr(self.sequence, "packs", False)
        if self.sequence is not None and not packed:
            ids.update({f"hist.{n}": batch.seq[n] for n in self.seq_names})
        emb = self.embedding.lookup(ids)  # one call for every table (one KJT with torchrec)
        if vis is not None:
            tabs = vis.tables()  # once per forward, then looked up
            v_t = vis.vectors(batch.refs["item_id"], tabs.items)
            s_t = vis.sim_vectors_of(batch.refs["item_id"], tabs, v_t)
            emb["item_id"] = self._item(emb["item_id"], vis.item_features(v_t))
        parts = [emb[n] for n in self.sparse_names]
        sim = mask = None
        if self.sequence is not None:
            query = torch.cat([emb[n] for n in self.seq_names], dim=-1)
            mask = sequence_mask(batch.seq_len, batch.seq[self.seq_names[0]].shape[1])
            if packed:
                parts.append(self._pool_packed(batch, query, mask, ids))
            else:
                hk = {n: emb.pop(f"hist.{n}") for n in self.seq_names}
                bias = None
                if vis is not None:
                    v_h = vis.vectors(batch.refs["hist.item_id"], tabs.items)
                    if "item_id" in hk:
                        hk["item_id"] = self._item(hk["item_id"], vis.item_features(v_h))
                    s_h = vis.sim_vectors_of(batch.refs["hist.item_id"], tabs, v_h)
                    sim = vis.similarity(s_t, s_h, mask)
                    bias = vis.attention_bias(sim, tabs)
                keys = torch.cat([hk[n] for n in self.seq_names], dim=-1)
                parts.append(self.sequence(query, keys, mask) if bias is None
                             else self.sequence(query, keys, mask, bias=bias))
            if self.length_feature:  # log history length, scaled to [0, 1]
                n = batch.seq_len.to(query.dtype).clamp_min(0)
                parts.append((torch.log1p(n) / math.log1p(self.max_len)).unsqueeze(-1))
        if vis is not None:
            f = vis.features(batch, v_t, sim, mask, tabs, s_t)
            if f is not None:
                parts.append(f)
        x = self.embedding_dropout(torch.cat(parts, dim=-1))
        return x if batch.dense is None else torch.cat([x, batch.dense], dim=-1)

    def _pool_packed(self, batch: Batch, query: Tensor, mask: Tensor, target_ids: dict[str, Tensor]) -> Tensor:
        """The pooled history [B, D] from the real history items only: they are embedded ([M, D],
        M the sum of the lengths) and handed to the sequence arch's ``forward_packed``; or, when the
        arch takes tables and the tables are plain tensors, their ids and tables are handed to its
        ``forward_tables``. ``target_ids`` are the ids the query was looked up with."""
        pos = mask.reshape(-1).nonzero().squeeze(1)
        ids = {n: batch.seq[n].reshape(-1).index_select(0, pos) for n in self.seq_names}
        if self._tables:  # the unit reads the tables themselves (table space where they are small)
            feats = [HistoryTable(self.embedding.weight(f"hist.{n}"), ids[n], self.embedding.weight(n),
                                  target_ids[n]) for n in self.seq_names]
            return self.sequence.forward_tables(query, feats, pos, tuple(mask.shape))
        hk = self.embedding.lookup({f"hist.{n}": i for n, i in ids.items()})
        keys = torch.cat([hk[f"hist.{n}"] for n in self.seq_names], dim=-1)
        return self.sequence.forward_packed(query, keys, pos, tuple(mask.shape))

    def forward(self, batch: Batch) -> Tensor:
        logit = self.over(self.features(batch)).squeeze(-1)
        if self.wide is not None:
            w = self.wide.lookup({n: batch.sparse[n] for n in self.sparse_names})
            logit = logit + sum(w.values()).squeeze(-1)
        if self.position is not None and self.training:
            logit = logit + self.position(batch)
        return logit

    def aux_loss(self, batch: Batch) -> Tensor | None:
        """Auxiliary training losses of the parts (the debiasing network's), or None."""
        return self.visual.aux_loss(batch) if self.visual is not None else None


class PositionTower(nn.Module):
    """A shallow tower on the impression's position whose output is added to the logit in training
    and left out at inference (PAL-style), so that the main model learns position-free
    relevance. The tower is pinned to 0 at ``reference`` (position 1 by default): inference
    predicts the click probability as if the item were shown there. ``feature`` names the raw
    position column, kept in the batch's ``extra`` (the data settings' ``keep``), never a sparse
    feature of the main model.
    """

    def __init__(self, feature: str = "position", n_positions: int = 128, dim: int = 8,
                 hidden: list[int] = (), reference: int = 1):
        super().__init__()
        if not 0 <= reference <= n_positions:
            raise ValueError(f"reference position {reference} outside 0..{n_positions}")
        self.feature, self.n_positions, self.reference = feature, n_positions, reference
        self.embedding = nn.Embedding(n_positions + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.01)
        self.mlp = MLP(dim, list(hidden), 1, act="relu")

    def _f(self, pos: Tensor) -> Tensor:
        return self.mlp(self.embedding(pos)).squeeze(-1)

    def forward(self, batch: Batch) -> Tensor:
        raw = batch.extra.get(self.feature)
        if raw is None:
            raise KeyError(f"the position tower needs the raw {self.feature!r} column: add it to the "
                           f"data settings' keep list")
        pos = raw.long()
        if bool(((pos < 0) | (pos > self.n_positions)).any()):
            raise ValueError(f"{self.feature} outside 0..{self.n_positions}: raise position.n_positions")
        ref = torch.full_like(pos[:1], self.reference)
        return self._f(pos) - self._f(ref)
