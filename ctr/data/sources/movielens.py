"""MovieLens-100K (RecBole atomic files) -> the canonical tables, protocol ML100K-CTR v1.

ML100K-CTR v1: label = rating >= 4; events ordered by (timestamp, user_id, item_id); the first
80 % of that order is train, the next 10 % val, the last 10 % test; features user_id, item_id,
genre (the first genre token), age, gender, occupation; the behaviour sequence is the user's
strictly earlier item_ids (all ratings), the last 50, with the aligned first-genre sequence.
:data:`PROTOCOL` holds exactly those preparation settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ctr.data.contract import ContractError
from ctr.data.sources import data_path
from ctr.data.prepare import PrepareSettings, SequenceSpec, Tables, file_fingerprint

FILES = {"events": "ml-100k.inter", "items": "ml-100k.item", "users": "ml-100k.user"}
PROTOCOL = PrepareSettings(
    sparse=["user_id", "item_id", "genre", "age", "gender", "occupation"],
    sequence=SequenceSpec(max_len=50, clicked_only=False, side=["genre"]),
    split="time", fractions=(0.8, 0.1, 0.1), order=["timestamp", "user_id", "item_id"])


def _read_atomic(path: Path) -> pl.DataFrame:
    """Read a RecBole atomic file (tab-separated, header cells ``name:type``) as strings."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (set CTR_DATA_DIR to the folder holding movielens_100k/)")
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
    return df.rename({c: c.split(":")[0] for c in df.columns})


def _column(df: pl.DataFrame, path: Path, name: str) -> pl.Series:
    if name not in df.columns:
        raise ContractError(str(path), name, f"missing column; found {df.columns}")
    return df[name]


def _to_number(df: pl.DataFrame, path: Path, name: str, dtype: pl.DataType) -> pl.Series:
    raw = _column(df, path, name)
    out = raw.cast(dtype, strict=False)
    bad = out.is_null() & raw.is_not_null() | raw.is_null()
    if bad.any():
        rows = bad.arg_true().head(5).to_list()
        raise ContractError(str(path), name, f"not a number: {raw[rows[0]]!r}", rows)
    return out


@dataclass
class MovieLens100K:
    """Source adapter. ``root`` defaults to ``$CTR_DATA_DIR/movielens_100k``."""

    root: str | None = None
    threshold: float = 4.0
    name: str = "ml100k"

    @property
    def path(self) -> Path:
        return data_path(self.root, "movielens_100k")

    def fingerprint(self) -> str:
        return file_fingerprint(*(self.path / f for f in FILES.values())) + f"|thr={self.threshold}"

    def load(self) -> Tables:
        p = {k: self.path / f for k, f in FILES.items()}
        inter = _read_atomic(p["events"])
        rating = _to_number(inter, p["events"], "rating", pl.Float64)
        events = pl.DataFrame({
            "user_id": _to_number(inter, p["events"], "user_id", pl.Int64),
            "item_id": _to_number(inter, p["events"], "item_id", pl.Int64),
            "clicked": (rating >= self.threshold).cast(pl.Int8),
            "timestamp": _to_number(inter, p["events"], "timestamp", pl.Float64),
            "rating": rating,
        }).with_row_index("request_id").with_columns(pl.col("request_id").cast(pl.Int64))
        item = _read_atomic(p["items"])
        items = pl.DataFrame({
            "item_id": _to_number(item, p["items"], "item_id", pl.Int64),
            "genre": _column(item, p["items"], "class").str.split(" ").list.first(),
            "title": _column(item, p["items"], "movie_title"),
        })
        user = _read_atomic(p["users"])
        users = pl.DataFrame({
            "user_id": _to_number(user, p["users"], "user_id", pl.Int64),
            **{c: _column(user, p["users"], c) for c in ("age", "gender", "occupation")},
        })
        # rating is the label's source: drop it so that it can never become a feature
        return Tables(events=events.drop("rating"), items=items, users=users,
                      names={k: str(v) for k, v in p.items()})
