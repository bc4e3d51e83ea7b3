"""Source adapters: each turns one data source into the canonical tables of the data contract."""

from __future__ import annotations

import os
from pathlib import Path


def data_path(root: str | None, subdir: str) -> Path:
    """``root`` if given, else ``$CTR_DATA_DIR/<subdir>``, with a clear error when neither is set."""
    if root:
        return Path(root)
    base = os.environ.get("CTR_DATA_DIR")
    if not base:
        raise RuntimeError(f"CTR_DATA_DIR is not set: point it at the folder holding {subdir}/ "
                           f"(e.g. ../shared/data), or pass root=")
    return Path(base) / subdir
