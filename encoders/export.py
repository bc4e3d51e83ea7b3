"""Export of a trained encoder: an ``item_id -> embedding`` table named by the run's fingerprint.

The fingerprint hashes what decides the numbers: the image tower's and image head's weights, the
evaluation resolution, the item ids and the image bytes' fingerprint. The table is written once
(``<dir>/item_embeddings-<fingerprint>.parquet``, columns ``item_id`` Int64 and ``embedding``
Array(Float32, D), L2-normalised, plus a JSON sidecar); exporting an unchanged run again finds
the file and reuses it. The CTR stage reads it with :func:`load_embeddings`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

EXPORT_VERSION = 1


def encoder_fingerprint(module, item_ids: np.ndarray, image_fingerprint: str) -> str:
    h = hashlib.sha256(json.dumps({"v": EXPORT_VERSION, "image_size": module.image_size,
                                   "images": image_fingerprint}).encode())
    h.update(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes())
    for part in ("image_tower", "image_head"):
        for name, t in getattr(module, part).state_dict().items():
            h.update(f"{part}.{name}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def table_path(out_dir: str | os.PathLike, fingerprint: str) -> Path:
    return Path(out_dir) / f"item_embeddings-{fingerprint}.parquet"


@torch.no_grad()
def export_embeddings(module, loader, item_ids: np.ndarray, image_fingerprint: str,
                      out_dir: str | os.PathLike, extra: dict | None = None) -> tuple[Path, str, bool]:
    """Embed every item (``loader`` yields ``rows`` and uint8 ``images``) and write the table.

    Returns (path, fingerprint, reused): ``reused`` is True when the table already existed.
    """
    fp = encoder_fingerprint(module, item_ids, image_fingerprint)
    path = table_path(out_dir, fp)
    if path.exists():
        return path, fp, True
    was_training = module.training
    module.eval()
    emb = None
    for chunk in loader:
        z = module.eval_images(chunk["images"].to(module.device), chunk["rows"]).float().cpu().numpy()
        if emb is None:
            emb = np.zeros((len(item_ids), z.shape[1]), np.float32)
        emb[chunk["rows"].numpy()] = z
    module.train(was_training)
    write_table(item_ids, emb, out_dir, fp, {"image_fingerprint": image_fingerprint, **(extra or {})})
    return path, fp, False


def write_table(item_ids: np.ndarray, emb: np.ndarray, out_dir: str | os.PathLike, fingerprint: str,
                extra: dict | None = None) -> Path:
    """Write an ``item_id -> embedding`` table and its JSON sidecar (both atomically)."""
    path = table_path(out_dir, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    df = pl.DataFrame({"item_id": np.asarray(item_ids, np.int64),
                       "embedding": pl.Series(emb).cast(pl.Array(pl.Float32, emb.shape[1]))})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    df.write_parquet(tmp)
    side = {"fingerprint": fingerprint, "dim": int(emb.shape[1]), "n_items": int(len(item_ids)), **(extra or {})}
    side_tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    side_tmp.write_text(json.dumps(side, indent=1, default=str) + "\n")
    os.replace(side_tmp, path.with_suffix(".json"))
    os.replace(tmp, path)
    return path


def load_embeddings(fingerprint: str, out_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids int64 [N], embeddings float32 [N, D]) of the table named by ``fingerprint``."""
    path = table_path(out_dir, fingerprint)
    if not path.exists():
        have = sorted(p.name for p in Path(out_dir).glob("item_embeddings-*.parquet")) if Path(out_dir).exists() else []
        raise FileNotFoundError(f"no embedding table {path.name} in {out_dir} (found {have[:5]})")
    df = pl.read_parquet(path)
    emb = df["embedding"].to_numpy()
    return df["item_id"].to_numpy(), np.ascontiguousarray(emb, dtype=np.float32)
