"""A user's own parquet (or CSV) files in the shape of the data contract."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ctr.data.contract import ContractError
from ctr.data.prepare import Tables, file_fingerprint


def read_table(path: str | Path) -> pl.DataFrame:
    """Read one table from a parquet/CSV file or a glob of them, with the file named in any error."""
    files = _files(str(path))
    if not files:
        raise FileNotFoundError(f"{path}: no file matches")
    frames = []
    for f in files:
        p = Path(f)
        if not p.exists():
            raise FileNotFoundError(f"{p}: file not found")
        try:
            if p.suffix in (".csv", ".tsv"):
                frames.append(pl.read_csv(p, separator="\t" if p.suffix == ".tsv" else ","))
            else:
                frames.append(pl.read_parquet(p))
        except (pl.exceptions.ComputeError, OSError, pl.exceptions.PolarsError) as e:
            raise ContractError(str(p), None, f"cannot be read as {p.suffix.lstrip('.') or 'parquet'}: {e}") from e
    if len(frames) > 1 and any(fr.schema != frames[0].schema for fr in frames):
        raise ContractError(str(path), None, "the matched files have different columns or dtypes")
    return pl.concat(frames) if len(frames) > 1 else frames[0]


def _files(path: str | None) -> list[str]:
    if path is None:
        return []
    return sorted(glob.glob(str(path))) if any(ch in str(path) for ch in "*?[") else [str(path)]


@dataclass
class ParquetSource:
    """``events`` (required), ``items`` and ``users`` (optional) as file paths or globs;
    ``extra_events`` maps a split name (e.g. ``test_random``) to a further evaluation log."""

    events: str
    items: str | None = None
    users: str | None = None
    extra_events: dict[str, str] = field(default_factory=dict)
    name: str = "parquet"

    def fingerprint(self) -> str:
        paths = [*_files(self.events), *_files(self.items), *_files(self.users)]
        for k in sorted(self.extra_events):
            paths += _files(self.extra_events[k])
        return file_fingerprint(*paths) + f"|{sorted(self.extra_events)}"

    def load(self) -> Tables:
        return Tables(
            events=read_table(self.events),
            items=read_table(self.items) if self.items else None,
            users=read_table(self.users) if self.users else None,
            extra_events={k: read_table(v) for k, v in self.extra_events.items()},
            names={"events": str(self.events), "items": str(self.items), "users": str(self.users),
                   **{k: str(v) for k, v in self.extra_events.items()}})
