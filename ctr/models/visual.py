"""Image-aware CTR parts: frozen item vectors from an exported encoder, and what the model does with them.

The CTR stage never runs an image tower: it reads the ``item_id -> embedding`` table that
``encoders.train`` exported (MOON's decoupling), aligned to the prepared artefact's item rows
(``Batch.refs``: every item of the items table, so items never seen in train keep their vector).

:class:`VisualArch` turns those frozen vectors into

* item features, by ``mode``: ``init`` (the item-ID table starts from a projection of the vectors,
  then trains as usual), ``sum`` (a learned projection of the vector added to the item-ID embedding,
  for the target and every history item), ``concat`` (the projection appended to it);
* an attention bias: the cosine similarity between the target's and each history item's vector,
  scaled by a learned weight, added to the target-attention scores;
* SimTier features: a histogram of those similarities over the history (fractions per tier);
* for visual-search traffic, the query image's projected vector and its cosine to the candidate;
* similarity standardisation (``standardize``, on by default): every cosine above enters the model as
  ``(cos - mu) / sigma``, with ``mu``, ``sigma`` the mean and standard deviation of the cosine over
  every pair of distinct items of the frozen table (:func:`pair_cosine_stats`). Encoders spread their
  cosines very differently (over all item pairs, a click-post-trained table here: 0.37 +- 0.15, the
  pretrained one 0.01 +- 0.23; ``metrics.json``'s ``visual.similarity``), and a raw cosine fed to the
  MLP, the attention scores and fixed tiers carries that scale: standardised, the CTR model sees
  each table's similarities on one scale.
  When the debiasing network adjusts the vectors the similarities read (its scope ``all``), the
  statistics are those of the adjusted table, recomputed each forward (exact, O(N D^2));
* a **debiasing network** (:class:`Debias`): a residual MLP that adjusts the vectors inside the
  CTR model, trained with an auxiliary contrastive loss that pulls each high-impression item
  towards a lower-impression item picked by :func:`debias_pairs` (the most similar one of the same
  category), against the other pairs of the batch, so that exposure does not leak into the visual
  features the model sees. Its scope: ``features`` (default) adjusts the item features and the
  query's projected vector, the similarities reading the encoder's vectors; ``all`` adjusts the
  vectors the similarities read too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctr.data.batch import Batch
from ctr.data.contract import ContractError
from ctr.models.parts import MLP

MODES = ("init", "sum", "concat", "none")
DEBIAS_SCOPES = ("features", "all")  # what the debiasing network adjusts: the item features, or also the similarities


class Tables(NamedTuple):
    """What one forward reads (:meth:`VisualArch.tables`, computed once): ``items`` [N + 1, D], the
    vectors of the item features; ``sims``, those the similarities read (``items`` itself unless
    the debiasing network leaves the similarities to the encoder); ``mu``, ``sigma``: the
    standardisation of their cosines."""

    items: Tensor
    sims: Tensor
    mu: Tensor | float
    sigma: Tensor | float


# ----------------------------------------------------------------------------------------------
# the exported table, aligned to the artefact


def table_files(table: str, embeddings_dir: str | Path | None) -> tuple[Path, Path]:
    """(parquet, sidecar) of an exported table given by fingerprint (looked up in ``embeddings_dir``)
    or by path."""
    p = Path(table)
    if p.suffix != ".parquet":
        if embeddings_dir is None:
            raise ValueError(f"embedding table {table!r} is a fingerprint: embeddings_dir is needed")
        p = Path(embeddings_dir) / f"item_embeddings-{table}.parquet"
    if not p.exists():
        d = p.parent
        have = sorted(x.name for x in d.glob("item_embeddings-*.parquet")) if d.exists() else []
        raise FileNotFoundError(f"no embedding table {p.name} in {d} (found {have[:5]})")
    return p, p.with_suffix(".json")


def check_click_split(sidecar: dict, meta: dict, where: str) -> None:
    """An encoder post-trained on clicks must have seen only the CTR stage's training clicks: the
    table's item source and click split must match the artefact's source and split settings."""
    items = sidecar.get("items") or {}
    split = items.get("click_split")
    if split is None:
        return  # no clicks were used (pretraining on images / titles only)
    s = meta["settings"]
    if s["split"] != "time" or [float(f) for f in s["fractions"]] != [float(f) for f in split["fractions"]] \
            or list(s["order"]) != list(split["order"]):
        raise ValueError(f"{where}: the encoder was trained on clicks split by {split}, but the CTR data is "
                         f"split by {s['split']} {s['fractions']} {s['order']}: its test clicks may have been "
                         f"training clicks of the encoder. Post-train with the CTR data's split.")
    src = meta.get("source_config")
    if src is not None:
        mine = {k: items.get(k) for k in src}
        if mine != src:
            raise ValueError(f"{where}: the encoder's clicks come from {mine}, the CTR data from {src}")


def artefact_items(meta: dict) -> pl.DataFrame:
    """The prepared artefact's item table (``row``, the items' columns, train impressions)."""
    if meta.get("items") is None or "path" not in meta:
        raise ValueError("image-aware CTR needs item rows: add `item_refs: [item_id, ...]` to the "
                         "data settings")
    return pl.read_parquet(Path(meta["path"]) / meta["items"]["file"])


def load_item_vectors(table: str, embeddings_dir: str | Path | None, meta: dict,
                      items: pl.DataFrame | None = None) -> tuple[Tensor, dict]:
    """The table's vectors in the artefact's item-row order: [N + 1, D] float32 (row 0: zeros), and
    its sidecar. Every item of the artefact must be in the table (an error names the first missing).
    ``items``: the artefact's item table when the caller has read it already."""
    path, side_path = table_files(table, embeddings_dir)
    sidecar = json.loads(side_path.read_text()) if side_path.exists() else {}
    items = (artefact_items(meta) if items is None else items).select("item_id", "row")
    df = pl.read_parquet(path)
    for col in ("item_id", "embedding"):
        if col not in df.columns:
            raise ContractError(str(path), col, "missing column of an embedding table")
    if df["item_id"].dtype != items["item_id"].dtype:
        raise ContractError(str(path), "item_id", f"dtype {df['item_id'].dtype} differs from the items' "
                            f"{items['item_id'].dtype}")
    j = items.join(df.with_row_index("__t"), on="item_id", how="left", maintain_order="left")
    missing = j.filter(pl.col("__t").is_null())
    if missing.height:
        raise ContractError(str(path), "item_id", f"{missing.height} of {items.height} items have no "
                            f"embedding, e.g. item_id {missing['item_id'][0]!r}")
    emb = np.ascontiguousarray(df["embedding"].to_numpy(), dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
        raise ContractError(str(path), "embedding", "non-finite value", [bad])
    out = np.zeros((items.height + 1, emb.shape[1]), np.float32)
    out[j["row"].to_numpy()] = emb[j["__t"].to_numpy()]
    check_click_split(sidecar, meta, str(path))
    return torch.from_numpy(out), sidecar


# ----------------------------------------------------------------------------------------------
# similarity scale


def pair_cosine_stats(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (0-d float64 tensors) of the cosine similarity over every
    ordered pair of distinct items of ``vectors`` ([N + 1, D], row 0 padding), exactly and without
    the N x N matrix: with ``u`` the unit rows, ``s = sum u`` and ``G = u^T u`` ([D, D]), the pairs'
    cosines sum to ``|s|^2 - sum |u|^2`` and their squares to ``|G|_F^2 - sum |u|^4`` (O(N D^2))."""
    n = len(vectors) - 1
    if n < 2:
        raise ValueError(f"similarity statistics need at least 2 items, the table has {n}")
    u = F.normalize(vectors[1:].double(), dim=-1)
    sq = (u * u).sum(-1)
    pairs = n * (n - 1)
    mean = ((u.sum(0) ** 2).sum() - sq.sum()) / pairs
    second = ((u.T @ u) ** 2).sum() - (sq ** 2).sum()
    return mean, (second / pairs - mean ** 2).clamp_min(1e-12).sqrt()


# ----------------------------------------------------------------------------------------------
# debiasing


def debias_pairs(vectors: Tensor, impressions: np.ndarray, group: np.ndarray | None,
                 high_quantile: float = 0.8, low_quantile: float = 0.5, top_k: int = 1,
                 seed: int = 0) -> tuple[Tensor, dict]:
    """For every high-impression item, a lower-impression partner: [N + 1] item rows (0: none).

    High: train impressions at or above the ``high_quantile`` of the items' impressions (and > 0);
    low: at or below the ``low_quantile``. The partner is drawn among the ``top_k`` low items most
    cosine-similar to it, within its ``group`` (e.g. the category) when given. Rows are 1-based
    (row 0 is padding): ``impressions`` and ``group`` are per item row 1..N.
    """
    n = len(impressions)
    imp = np.asarray(impressions, dtype=np.float64)
    hi_t, lo_t = np.quantile(imp, high_quantile), np.quantile(imp, low_quantile)
    high = (imp >= hi_t) & (imp > 0) & (imp > lo_t)
    low = imp <= lo_t
    v = F.normalize(vectors[1:].float(), dim=-1)
    partner = torch.zeros(n + 1, dtype=torch.long)
    g = np.zeros(n, np.int64) if group is None else np.asarray(group)
    rng = np.random.default_rng(seed)
    for key in np.unique(g[high]):
        hi_rows = np.flatnonzero(high & (g == key))
        lo_rows = np.flatnonzero(low & (g == key))
        if len(lo_rows) == 0:
            continue
        sim = v[hi_rows] @ v[lo_rows].T
        k = min(top_k, len(lo_rows))
        top = sim.topk(k, dim=1).indices.numpy()
        pick = top[np.arange(len(hi_rows)), rng.integers(0, k, len(hi_rows))]
        partner[torch.from_numpy(hi_rows + 1)] = torch.from_numpy(lo_rows[pick] + 1)
    stats = {"high_threshold": float(hi_t), "low_threshold": float(lo_t), "high_items": int(high.sum()),
             "low_items": int(low.sum()), "paired": int((partner > 0).sum())}
    return partner, stats


class Debias(nn.Module):
    """``v + MLP(v)``: a residual adjustment of the visual vectors (its last layer starts at zero,
    so training starts from the encoder's vectors)."""

    def __init__(self, dim: int, hidden: list[int] = (128,)):
        super().__init__()
        self.mlp = MLP(dim, list(hidden), dim, act="relu")
        last = self.mlp.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, v: Tensor) -> Tensor:
        return v + self.mlp(v)


# ----------------------------------------------------------------------------------------------
# the arch


class VisualArch(nn.Module):
    """Frozen item vectors -> item features, attention bias, SimTier and query features, debiasing.

    ``vectors``: [N + 1, D] by item row (row 0 zeros). ``embedding_dim``: the CTR model's id
    embedding width (the projection's output). See the module docstring for the parts; each is
    switched by its argument. ``debias`` (a dict: ``hidden``, ``weight``, ``temperature`` and the
    :func:`debias_pairs` rule) needs ``impressions`` (train impressions per item row 1..N) and
    optionally ``pair_group`` (e.g. category codes per item row).
    """

    def __init__(self, vectors: Tensor, embedding_dim: int, mode: str = "sum",
                 attention_bias: bool = True, tiers: int = 0, query: str | None = None,
                 debias: dict | None = None, impressions: np.ndarray | None = None,
                 pair_group: np.ndarray | None = None, normalize: bool = True,
                 standardize: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"visual mode must be one of {MODES}, got {mode!r}")
        if vectors.dim() != 2 or not torch.all(vectors[0] == 0):
            raise ValueError("vectors must be [N + 1, D] with a zero row 0 (padding)")
        self.register_buffer("table", vectors.float(), persistent=False)
        self.mode, self.embedding_dim, self.normalize = mode, embedding_dim, normalize
        d = vectors.shape[1]
        self.dim = d
        self.proj = nn.Linear(d, embedding_dim) if mode in ("sum", "concat") else None
        self.bias_weight = nn.Parameter(torch.tensor(1.0)) if attention_bias else None
        self.tiers = int(tiers)
        # (cos - mu) / sigma with the frozen table's pair statistics (identity when off)
        self.standardize = bool(standardize)
        mu, sd = (float(x) for x in pair_cosine_stats(vectors)) if standardize else (0.0, 1.0)
        self.sim_stats = {"mean": mu, "std": sd, "standardized": self.standardize}
        self.query = query
        self.query_proj = nn.Linear(d, embedding_dim) if query else None
        self.debias = None
        self.debias_cfg: dict = {}
        self.pair_stats: dict = {}
        if debias:
            cfg = dict(debias)
            if impressions is None:
                raise ValueError("the debiasing network needs the items' train impressions")
            self.debias = Debias(d, cfg.pop("hidden", [128]))
            scope = cfg.pop("scope", "features")
            if scope not in DEBIAS_SCOPES:
                raise ValueError(f"debias scope must be one of {DEBIAS_SCOPES}, got {scope!r}")
            self.debias_cfg = {"weight": float(cfg.pop("weight", 0.1)),
                               "temperature": float(cfg.pop("temperature", 0.1)), "scope": scope}
            partner, self.pair_stats = debias_pairs(vectors, impressions, pair_group, **cfg)
            self.register_buffer("partner", partner, persistent=False)
            if scope == "features":  # the similarities read the encoder's own (unit) vectors
                self.register_buffer("sim_vectors", F.normalize(vectors.float(), dim=-1) if normalize
                                     else vectors.float(), persistent=False)
            # with scope "all" the debiasing network moves the vectors the similarities read: the
            # statistics follow the adjusted table, recomputed (no gradient) in each forward
            self.sim_stats["follows_debias"] = self.standardize and scope == "all"

    # the width each part adds ------------------------------------------------------------------
    @property
    def item_extra_dim(self) -> int:
        """Width appended to every item representation (target and history) in ``concat`` mode."""
        return self.embedding_dim if self.mode == "concat" else 0

    @property
    def out_dim(self) -> int:
        """Width of :meth:`features` (over-arch inputs)."""
        return self.tiers + ((self.embedding_dim + 1) if self.query else 0)

    # vectors -----------------------------------------------------------------------------------
    def item_table(self) -> Tensor:
        """[N + 1, D]: every item row's vector after the debiasing network, normalised (when
        ``normalize``); row 0 stays zero. One forward computes it once and looks its rows up (the
        table has ~N rows, a batch's history B x L of them: the debiasing MLP, the normalisation and
        their backward run on the table, and the look-ups' backward is one embedding backward)."""
        t = self.table
        if self.debias is not None:
            t = self.debias(t)
            t = torch.cat([torch.zeros_like(t[:1]), t[1:]])
        return F.normalize(t, dim=-1) if self.normalize else t

    def tables(self) -> Tables:
        """The forward's tables and similarity scale, computed once (:class:`Tables`)."""
        items = self.item_table()
        sims = self.sim_vectors if hasattr(self, "sim_vectors") else items
        if self.sim_stats.get("follows_debias"):
            with torch.no_grad():
                mu, sd = (x.float() for x in pair_cosine_stats(sims))
        else:  # the frozen table's statistics (0 and 1 when not standardised)
            mu, sd = self.sim_stats["mean"], self.sim_stats["std"]
        return Tables(items, sims, mu, sd)

    def sim_vectors_of(self, rows: Tensor, tables: Tables, looked_up: Tensor | None = None) -> Tensor:
        """Vectors of item rows from ``tables.sims``, the ones the similarities read; ``looked_up``:
        the rows' vectors from ``tables.items``, reused when the two tables are one."""
        if looked_up is not None and tables.sims is tables.items:
            return looked_up
        return self.vectors(rows, tables.sims)

    def vectors(self, rows: Tensor, table: Tensor | None = None) -> Tensor:
        """Item vectors of item rows (any shape) from :meth:`item_table` (``table``: its value,
        when the caller has it already)."""
        return F.embedding(rows, self.item_table() if table is None else table)

    def item_features(self, v: Tensor) -> Tensor | None:
        """The projected vector (sum / concat modes) for item vectors ``v``."""
        return self.proj(v) if self.proj is not None else None

    def similarity(self, target: Tensor, hist: Tensor, mask: Tensor) -> Tensor:
        """cos(target, each history item): [B, L], 0 at padding."""
        t, h = self._unit(target), self._unit(hist)
        return torch.einsum("bd,bld->bl", t, h) * mask.to(t.dtype)

    def _unit(self, v: Tensor) -> Tensor:
        """``v`` scaled to unit length (the looked-up vectors are already, when ``normalize``)."""
        return v if self.normalize else F.normalize(v, dim=-1)

    def scaled(self, cos: Tensor, tables: Tables) -> Tensor:
        """A cosine on the model's scale: ``(cos - mu) / sigma`` when ``standardize``, else as is."""
        return (cos - tables.mu) / tables.sigma if self.standardize else cos

    def attention_bias(self, sim: Tensor, tables: Tables | None = None) -> Tensor | None:
        """The learned weight times the (scaled) similarity; padding (``sim`` 0) is masked later.
        ``tables``: :meth:`tables`' value, when the caller has it already."""
        if self.bias_weight is None:
            return None
        return self.bias_weight * self.scaled(sim, self.tables() if tables is None else tables)

    def features(self, batch: Batch, target: Tensor, sim: Tensor | None, mask: Tensor | None,
                 tables: Tables | None = None, sim_target: Tensor | None = None) -> Tensor | None:
        """SimTier fractions and the query features: [B, out_dim] (None when empty). ``target``: the
        target's vectors from ``tables.items``, ``sim_target`` from ``tables.sims`` (``tables``:
        :meth:`tables`' value), when the caller has them already."""
        t = self.tables() if tables is None else tables
        if sim_target is None:
            sim_target = self.sim_vectors_of(batch.refs["item_id"], t, target)
        parts = []
        if self.tiers:
            # tier of each history item's similarity: equal-width bins over [-1, 1] (raw cosine) or
            # over mu +- 3 sigma (standardised: z in [-3, 3])
            if self.standardize:
                x = (self.scaled(sim, t).clamp(-3, 3) + 3) / 6
            else:
                x = (sim.clamp(-1, 1) + 1) / 2
            tier = (x * self.tiers).long().clamp(max=self.tiers - 1)
            m = mask.to(sim.dtype)
            hist = torch.zeros(sim.shape[0], self.tiers, dtype=sim.dtype, device=sim.device)
            hist.scatter_add_(1, tier, m)
            parts.append(hist / m.sum(1, keepdim=True).clamp_min(1.0))
        if self.query:
            q = batch.refs.get(self.query)
            if q is None:
                raise KeyError(f"the query feature needs item rows of {self.query!r}: add it to the data "
                               f"settings' item_refs")
            vq = self.vectors(q, t.items)
            sq = self.sim_vectors_of(q, t, vq)
            cos = (self._unit(sq) * self._unit(sim_target)).sum(-1, keepdim=True)
            parts += [self.query_proj(vq), self.scaled(cos, t) * (q > 0).unsqueeze(-1).to(cos.dtype)]
        return torch.cat(parts, dim=-1) if parts else None

    # debiasing loss ----------------------------------------------------------------------------
    def aux_loss(self, batch: Batch) -> Tensor | None:
        """The debiasing network's contrastive loss over the batch's high-impression targets
        (unique items), each against its low-impression partner; None when the batch has none."""
        if self.debias is None:
            return None
        rows = torch.unique(batch.refs["item_id"])
        rows = rows[self.partner[rows] > 0]
        if len(rows) < 2:
            return None
        a = F.normalize(self.debias(self.table[rows]), dim=-1)
        p = F.normalize(self.debias(self.table[self.partner[rows]]), dim=-1)
        logits = a @ p.T / self.debias_cfg["temperature"]
        # two anchors may share a partner: that column is no negative for either
        same = self.partner[rows][:, None] == self.partner[rows][None, :]
        eye = torch.eye(len(rows), dtype=torch.bool, device=rows.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(len(rows), device=rows.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return self.debias_cfg["weight"] * loss

    # init mode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_id_table(self, weight: Tensor, vocab_rows: Tensor) -> None:
        """``init`` mode: set the item-ID table's rows (``vocab_rows[j]``: item row of vocab index j,
        0 for padding / OOV) to the vectors' top principal components, scaled to the table's std."""
        v = self.table[1:]
        v = v - v.mean(0)
        k = min(weight.shape[1], v.shape[1])
        _, _, vt = torch.linalg.svd(v, full_matrices=False)
        z = (self.table[vocab_rows] - self.table[1:].mean(0)) @ vt[:k].T
        std = weight[2:].std().clamp_min(1e-4)
        z = z / z[vocab_rows > 0].std().clamp_min(1e-8) * std
        have = vocab_rows > 0
        weight[have, :k] = z[have].to(weight.dtype)


def vocab_item_rows(meta: dict) -> Tensor:
    """Item row of each item_id vocabulary index ([vocab_size]; 0 for padding and OOV).

    Needs an item_id vocabulary: with a hashed item_id a bucket holds several items (and items
    unseen in train), so there is no one item row per index, and this raises a ValueError."""
    hashed = (meta.get("settings") or {}).get("hash_buckets") or {}
    if "item_id" in hashed:
        raise ValueError(f"visual mode 'init' maps each item_id vocabulary index to one item, but item_id "
                         f"is hashed into {hashed['item_id']} buckets (data.settings.hash_buckets): "
                         f"drop item_id from hash_buckets (max_vocab caps a vocabulary instead) or use "
                         f"visual mode sum/concat, which read the items' rows, not the vocabulary")
    vocab = pl.read_parquet(Path(meta["path"]) / "vocab" / "item_id.parquet")
    j = vocab.join(artefact_items(meta).select("item_id", "row"), on="item_id", how="left")
    out = torch.zeros(meta["vocab_sizes"]["item_id"], dtype=torch.long)
    out[torch.from_numpy(j["index"].to_numpy().astype(np.int64))] = torch.from_numpy(
        j["row"].fill_null(0).to_numpy().astype(np.int64))
    return out


def build_visual_arch(meta: dict, embedding_dim: int, table: str, embeddings_dir: str | None = None,
                      pair_by: str | None = "category", **kw) -> VisualArch:
    """The :class:`VisualArch` of an exported table (fingerprint or path) for a prepared artefact:
    vectors aligned to the item rows, and the train impressions and ``pair_by`` groups of the
    artefact's items for the debiasing pairs."""
    items = artefact_items(meta)
    vectors, sidecar = load_item_vectors(table, embeddings_dir, meta, items)
    impressions = items["train_impressions"].to_numpy() if "train_impressions" in items.columns else None
    group = None
    if pair_by:
        if pair_by not in items.columns:
            raise ContractError(str(Path(meta["path"]) / meta["items"]["file"]), pair_by,
                                f"debias pairing column not in the items (have {items.columns})")
        group = items[pair_by].rank("dense").cast(pl.Int64).to_numpy()
    arch = VisualArch(vectors, embedding_dim, impressions=impressions, pair_group=group, **kw)
    arch.source = {"table": table, "fingerprint": sidecar.get("fingerprint"),
                   "experiment": sidecar.get("experiment"), "run_dir": sidecar.get("run_dir")}
    return arch
