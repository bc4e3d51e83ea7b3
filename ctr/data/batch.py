"""The one ``Batch`` type every model consumes, and the tensor store that cuts batches from columns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of impressions as tensors.

    sparse: feature -> [B] int ids (0 padding, 1 out of vocabulary)
    seq: sequence feature (named like the sparse feature whose table it shares) -> [B, L] ids,
        most recent first, padded with 0
    seq_len: [B] number of real history items
    dense: [B, D] standardised numeric features, or None
    label: [B] float 0/1
    group: [B] int64 group (user) index, for GAUC
    extra: evaluation-only columns (never features), e.g. true_ctr, position
    refs: item rows (1-based rows of the artefact's items.parquet, 0 none) of the columns listed in
        the settings' ``item_refs`` ([B] each) and of the history items (``hist.item_id``: [B, L]),
        for content features such as frozen image embeddings
    """

    sparse: dict[str, Tensor]
    label: Tensor
    group: Tensor
    seq: dict[str, Tensor] = field(default_factory=dict)
    seq_len: Tensor | None = None
    dense: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)
    refs: dict[str, Tensor] = field(default_factory=dict)

    def _map(self, fn) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                out[f.name] = None if v is None else fn(v)
        return Batch(**out)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.label.shape[0]


class TensorStore(torch.utils.data.Dataset):
    """One split of a prepared artefact, held as tensors over memory-mapped ``.npy`` columns.

    ``store[indices]`` (a 1-D tensor or list of row indices) returns a :class:`Batch` by index
    slicing: there is no per-row Python. Use it with a ``BatchSampler`` and ``batch_size=None``.
    ``in_memory=True`` (the default) reads the columns into RAM; ``False`` memory-maps them, for
    splits larger than memory.
    """

    def __init__(self, split_dir: str | Path, in_memory: bool = True, extra: tuple[str, ...] | None = None):
        d = Path(split_dir)
        if not (d / "label.npy").exists():
            raise FileNotFoundError(f"{d}: not a prepared split (no label.npy)")

        def load(p: Path) -> Tensor:
            # mmap_mode "c" (copy-on-write) maps the file without reading it; torch shares its pages
            return torch.from_numpy(np.load(p, mmap_mode=None if in_memory else "c"))

        self.label = load(d / "label.npy")
        self.group = load(d / "group.npy")
        self.sparse = {p.name[7:-4]: load(p) for p in sorted(d.glob("sparse.*.npy"))}
        self.seq = {p.name[5:-4]: load(p) for p in sorted(d.glob("hist.*.npy"))}
        self.seq_len = load(d / "hist_len.npy") if (d / "hist_len.npy").exists() else None
        self.dense = load(d / "dense.npy") if (d / "dense.npy").exists() else None
        names = [p.name[6:-4] for p in sorted(d.glob("extra.*.npy"))]
        self.extra = {n: load(d / f"extra.{n}.npy") for n in names if extra is None or n in extra}
        self.refs = {p.name[4:-4]: load(p) for p in sorted(d.glob("ref.*.npy"))}
        self.refs.update({"hist." + p.name[8:-4]: load(p) for p in sorted(d.glob("histref.*.npy"))})

    def __len__(self) -> int:
        return self.label.shape[0]

    def __getitem__(self, idx) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Batch(
            sparse={k: v[idx] for k, v in self.sparse.items()},
            label=self.label[idx],
            group=self.group[idx],
            seq={k: v[idx] for k, v in self.seq.items()},
            seq_len=None if self.seq_len is None else self.seq_len[idx],
            dense=None if self.dense is None else self.dense[idx],
            extra={k: v[idx] for k, v in self.extra.items()},
            refs={k: v[idx] for k, v in self.refs.items()},
        )
