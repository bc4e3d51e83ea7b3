"""Embedding backends: the tables that map categorical ids to vectors, behind one small seam.

Every backend is built as ``Backend(vocab_sizes, dim, init_std, aliases=None)`` and offers

* ``forward(name, ids)``: the embeddings of one feature's ids (any shape -> ``[*ids.shape, dim]``);
* ``lookup({name: ids})``: several features at once (the TorchRec backend does them in one
  ``KeyedJaggedTensor`` call);
* ``weight(name)``: the table's weight (e.g. to initialise it);
* ``tables``: the submodule that holds the tables, so that their parameters' names contain
  ``.tables.`` (:meth:`ctr.module.CTRModule.configure_optimizers` gives them their own weight decay).

``vocab_sizes`` maps table -> rows (padding row 0 and the out-of-vocabulary row 1 included);
``aliases`` maps extra feature names to the table they read (e.g. ``{"hist.item_id": "item_id"}``:
the behaviour sequence shares the target's table), so that one ``lookup`` holds both.

Id 0 is padding and embeds to a zero vector in every backend. The plain backend keeps row 0 at
zero (``padding_idx=0``: it gets no gradient); the TorchRec backend never looks id 0 up (padding is
dropped from the jagged values and the result filled with zeros), so row 0 gets no gradient either
and stays as initialised (zero; a sharded re-initialisation may draw it, unread).
With the same seed both backends draw the same initial weights.

Backends: ``plain`` (:class:`FeatureEmbedding`, ``nn.Embedding`` per table) and ``torchrec``
(:class:`TorchRecEmbedding`, one TorchRec ``EmbeddingCollection``), chosen with
:func:`make_embedding`. :func:`shard_embeddings` shards a model holding TorchRec tables with
``DistributedModelParallel`` when ``torch.distributed`` is initialised (tested on CPU with gloo:
see tests/test_embeddings.py for what is covered).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

BACKENDS = ("plain", "torchrec")
TORCHREC_INSTALL = (
    "the torchrec embedding backend needs torchrec; with torch 2.13 (CPU) install\n"
    "  python -m pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0\n"
    "  python -m pip install -c constraints.txt tensordict pyre-extensions\n"
    "(as the Makefile's venv recipe does), or use embedding_backend=plain")


def _check_aliases(vocab_sizes: dict[str, int], aliases: dict[str, str] | None) -> dict[str, str]:
    aliases = dict(aliases or {})
    for a, t in aliases.items():
        if t not in vocab_sizes:
            raise ValueError(f"embedding alias {a!r} names unknown table {t!r}; tables: {sorted(vocab_sizes)}")
        if a in vocab_sizes:
            raise ValueError(f"embedding alias {a!r} is also a table name")
    return aliases


def _init_tables(weights: list[Tensor], init_std: float) -> None:
    """N(0, init_std) rows, row 0 (padding) zero; in table order (same draws in every backend)."""
    for w in weights:
        nn.init.normal_(w, std=init_std)
        with torch.no_grad():
            w[0].zero_()


class FeatureEmbedding(nn.Module):
    """The plain backend: one ``nn.Embedding`` per table; sequences share the table of their
    feature (through ``aliases``, or by being looked up under the table's own name).

    ``vocab_sizes`` maps feature -> rows (padding row 0 and the out-of-vocabulary row 1 included).
    """

    def __init__(self, vocab_sizes: dict[str, int], dim: int, init_std: float = 1e-2,
                 aliases: dict[str, str] | None = None):
        super().__init__()
        self.dim = dim
        self.aliases = _check_aliases(vocab_sizes, aliases)
        self.tables = nn.ModuleDict({n: nn.Embedding(v, dim, padding_idx=0) for n, v in vocab_sizes.items()})
        _init_tables([t.weight for t in self.tables.values()], init_std)

    def table_of(self, name: str) -> str:
        return self.aliases.get(name, name)

    def weight(self, name: str) -> Tensor:
        return self.tables[self.table_of(name)].weight

    def forward(self, name: str, ids: Tensor) -> Tensor:
        return self.tables[self.table_of(name)](ids)

    def lookup(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: self(n, x) for n, x in ids.items()}


def _no_init(w: Tensor) -> None:
    return None


def _normal_init(w: Tensor, std: float) -> None:
    """A re-initialisation (e.g. of a shard, by DMP): N(0, std). Row 0 of a shard is not row 0 of
    the table, so nothing is zeroed; padding is never looked up anyway."""
    nn.init.normal_(w, std=std)


def _torchrec():
    try:
        from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    except ImportError as e:  # torchrec or one of its dependencies (fbgemm_gpu, tensordict) missing
        raise ImportError(f"{TORCHREC_INSTALL}\n(import failed: {e})") from e
    return EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor


class TorchRecEmbedding(nn.Module):
    """The TorchRec backend: one table per entry of ``vocab_sizes`` in a TorchRec
    ``EmbeddingCollection`` (``self.tables``); aliases are extra feature names of a table (TorchRec's
    shared tables). Parameters are ``tables.embeddings.<table>.weight``.

    A lookup turns the ids into one ``KeyedJaggedTensor``: per feature and batch row, the row's
    non-padding ids (a ``[B]`` feature has 0 or 1 value per row, a ``[B, L]`` history up to L).
    The collection's jagged output is scattered back into the ids' dense shape, zeros at padding.
    All features of one :meth:`lookup` must share the leading (batch) size.
    """

    def __init__(self, vocab_sizes: dict[str, int], dim: int, init_std: float = 1e-2,
                 aliases: dict[str, str] | None = None):
        super().__init__()
        EmbeddingCollection, EmbeddingConfig, self._kjt = _torchrec()
        self.dim = dim
        self.aliases = _check_aliases(vocab_sizes, aliases)
        # a no-op init_fn at construction (the config's default would draw uniform weights at once),
        # then the tables are drawn as the plain backend draws them, and init_fn set for re-inits
        configs = [EmbeddingConfig(name=n, embedding_dim=dim, num_embeddings=int(v),
                                   feature_names=[n, *(a for a, t in self.aliases.items() if t == n)],
                                   init_fn=_no_init)
                   for n, v in vocab_sizes.items()]
        self.tables = EmbeddingCollection(tables=configs, device=torch.device("cpu"))
        _init_tables([self.tables.embeddings[n].weight for n in vocab_sizes], init_std)

        for c in configs:
            c.init_fn = functools.partial(_normal_init, std=init_std)
        self.feature_names = [f for c in configs for f in c.feature_names]

    def table_of(self, name: str) -> str:
        return self.aliases.get(name, name)

    def weight(self, name: str) -> Tensor:
        return self.tables.embeddings[self.table_of(name)].weight

    def forward(self, name: str, ids: Tensor) -> Tensor:
        return self.lookup({name: ids})[name]

    def lookup(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        if not ids:
            return {}
        unknown = [n for n in ids if n not in self.feature_names]
        if unknown:
            raise KeyError(f"no embedding table for features {unknown}; known: {self.feature_names}")
        batch = {int(x.shape[0]) if x.dim() else 1 for x in ids.values()}
        if len(batch) != 1:
            raise ValueError(f"one lookup needs the same batch size for every feature, got "
                             f"{ {n: tuple(x.shape) for n, x in ids.items()} }")
        b = batch.pop()
        # every feature of the collection, in its fixed order (what a sharded collection expects);
        # the features not asked for have no values
        device = next(iter(ids.values())).device
        masks = {n: x.reshape(b, -1) != 0 for n, x in ids.items()}  # [B, L_f] (L_f = 1: a target feature)
        values = torch.cat([ids[n].reshape(b, -1)[masks[n]] for n in self.feature_names if n in ids]).long()
        lengths = torch.cat([masks[n].sum(1) if n in ids else torch.zeros(b, dtype=torch.long, device=device)
                             for n in self.feature_names]).int()
        out = self.tables(self._kjt(keys=self.feature_names, values=values, lengths=lengths))
        res = {}
        for n, x in ids.items():
            v = out[n].values()  # [non-padding ids, dim]
            flat = masks[n].reshape(-1)
            dense = v.new_zeros(flat.shape[0], self.dim).index_put((flat.nonzero().squeeze(1),), v)
            res[n] = dense.reshape(*x.shape, self.dim)
        return res


def make_embedding(backend: str, vocab_sizes: dict[str, int], dim: int, init_std: float = 1e-2,
                   aliases: dict[str, str] | None = None) -> nn.Module:
    """The embedding tables of ``backend`` ("plain" or "torchrec")."""
    if backend == "plain":
        return FeatureEmbedding(vocab_sizes, dim, init_std, aliases)
    if backend == "torchrec":
        return TorchRecEmbedding(vocab_sizes, dim, init_std, aliases)
    raise ValueError(f"unknown embedding_backend {backend!r} ({', '.join(BACKENDS)})")


def shard_embeddings(model: nn.Module, sharding_type: str | None = None, compute_kernel: str | None = None,
                     fused_params: dict | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Shard the TorchRec tables of ``model`` with ``DistributedModelParallel`` over the default
    process group, planned by TorchRec's ``EmbeddingShardingPlanner`` for ``compute_device`` =
    ``device``; the rest of the model is replicated (DDP). Without an initialised
    ``torch.distributed`` the model is returned as it is.

    ``sharding_type`` ("table_wise", "row_wise", "column_wise", "data_parallel"; None: the planner
    picks) and ``compute_kernel`` (None: the planner picks) constrain every table. TorchRec 1.8
    shards tables across ranks (table/row/column-wise) only with the ``fused`` kernel: FBGEMM's
    table-batched embeddings, whose optimiser runs inside the backward (``fused_params``, e.g.
    ``{"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}``; the tables then get no
    ``.grad`` and must be left out of the model's own optimiser). ``data_parallel`` replicates the
    tables with the ``dense`` kernel (plain gradients, all-reduced).

    The sharded tables start from the module's current weights. Embedding gradients are averaged
    over the ranks (TorchRec's gradient division, matching DDP's averaging of the dense part).

    On CPU use gloo and ``device="cpu"``. Tested there (tests/test_embeddings.py) in a 2-process
    group, table- and row-wise with the fused kernel: each rank's lookups (shared-table aliases and
    padding included) equal the plain backend's on the same weights, and one backward with
    EXACT_SGD moves every row by ``-lr`` times the plain backend's gradient averaged over both
    ranks' batches. Not tested: GPUs/NCCL, column-wise and data-parallel sharding, other
    optimisers, checkpoints of sharded models, and a whole CTRModel/CTRModule under DMP (forward,
    DDP of the dense part, training through Lightning).

    A script that shards by hand should end each rank by dropping the sharded model
    (``del`` and ``gc.collect()``) and meeting the others at ``dist.barrier()`` before
    ``dist.destroy_process_group()``: without that, about one process in 20 aborted at interpreter
    exit here (SIGABRT, "terminate called without an active exception") after its work was done.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return model
    _torchrec()
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.types import ShardingEnv

    device = torch.device(device)
    collections = [m for m in model.modules() if isinstance(m, TorchRecEmbedding)]
    if not collections:
        raise ValueError("shard_embeddings: the model holds no TorchRecEmbedding (embedding_backend=torchrec)")
    tables = [c.name for m in collections for c in m.tables.embedding_configs()]
    constraints = {t: ParameterConstraints(sharding_types=[sharding_type] if sharding_type else None,
                                           compute_kernels=[compute_kernel] if compute_kernel else None)
                   for t in tables}
    pg = dist.GroupMember.WORLD
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device=device.type),
        constraints=constraints, storage_reservation=FixedPercentageStorageReservation(0.15))
    sharders = [EmbeddingCollectionSharder(fused_params=fused_params)]
    plan = planner.collective_plan(model, sharders, pg)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device,
                                    plan=plan, sharders=sharders)
