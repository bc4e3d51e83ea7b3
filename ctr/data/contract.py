"""The data contract: the canonical ``items`` / ``events`` / ``users`` tables (see DESIGN.md).

Every source adapter emits these tables; everything after the adapters knows only them.
:func:`validate` checks a table and returns it normalised (ids kept as they are, labels as Int8,
timestamps as ``Datetime("us")``). A violation raises :class:`ContractError` naming the file (or
source), the column and an example row, so nobody trains on silently wrong data.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

ID, LABEL, TIME, POSITION, PROB, TEXT, BYTES, NUMBER = (
    "id", "label", "timestamp", "position", "probability", "text", "bytes", "number")


@dataclass(frozen=True)
class Col:
    name: str
    kind: str
    required: bool = True


SCHEMAS: dict[str, tuple[Col, ...]] = {
    "items": (Col("item_id", ID), Col("title", TEXT, False), Col("image", BYTES, False),
              Col("image_path", TEXT, False)),
    "events": (Col("request_id", ID), Col("user_id", ID), Col("item_id", ID),
               Col("clicked", LABEL), Col("timestamp", TIME), Col("position", POSITION, False),
               Col("query_item_id", ID, False), Col("true_ctr", PROB, False)),
    "users": (Col("user_id", ID),),
}
KEYS = {"items": "item_id", "users": "user_id"}


class ContractError(ValueError):
    """A table breaks the data contract. Names the file, the column and an example row."""

    def __init__(self, source: str, column: str | None, problem: str, rows: list[int] | None = None):
        self.source, self.column, self.problem, self.rows = source, column, problem, rows or []
        where = f"{source}" + (f", column '{column}'" if column else "")
        if rows:
            shown = ", ".join(str(r) for r in rows[:5])
            where += f", row {shown}" if len(rows) == 1 else f", rows {shown}"
            where += " (0-based data rows)"
        super().__init__(f"{where}: {problem}")


def bad_rows(df: pl.DataFrame, mask: pl.Expr, limit: int = 5) -> list[int]:
    """0-based indices of the first ``limit`` rows where ``mask`` holds (for error messages)."""
    return (df.lazy().with_row_index("__row").filter(mask).select("__row").head(limit)
            .collect()["__row"].to_list())


def _check_ids(df: pl.DataFrame, name: str, source: str) -> None:
    dtype = df.schema[name]
    if not (dtype.is_integer() or dtype in (pl.Utf8, pl.Categorical)):
        raise ContractError(source, name, f"ids must be integers or strings, got {dtype}")
    if df[name].null_count():
        raise ContractError(source, name, "null id", bad_rows(df, pl.col(name).is_null()))


def _check_label(df: pl.DataFrame, name: str, source: str) -> pl.Series:
    s = df[name]
    if not (s.dtype.is_integer() or s.dtype == pl.Boolean or s.dtype.is_float()):
        raise ContractError(source, name, f"labels must be 0/1 integers or booleans, got {s.dtype}")
    if s.null_count():
        raise ContractError(source, name, "null label", bad_rows(df, pl.col(name).is_null()))
    if s.dtype != pl.Boolean:
        bad = ~pl.col(name).is_in([0, 1])
        if s.dtype.is_float():
            bad = bad | pl.col(name).is_nan()
        rows = bad_rows(df, bad)
        if rows:
            raise ContractError(source, name, f"label must be 0 or 1, got {s[rows[0]]!r}", rows)
    return s.cast(pl.Int8)


_FORMATS = (None, "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%d")


def _parse(s: pl.Series, fmt: str | None) -> pl.Series:
    """Parse ISO-like strings with one format (None: inferred) to naive UTC ``Datetime("us")``."""
    try:
        out = s.str.to_datetime(fmt, strict=False, time_unit="us")
    except pl.exceptions.PolarsError:
        return pl.Series(s.name, [None] * len(s), dtype=pl.Datetime("us"))
    if out.dtype.time_zone:  # type: ignore[union-attr]
        out = out.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return out


def _to_datetime(df: pl.DataFrame, name: str, source: str) -> pl.Series:
    s = df[name]
    if s.null_count():
        raise ContractError(source, name, "null timestamp", bad_rows(df, pl.col(name).is_null()))
    if s.dtype == pl.Datetime or isinstance(s.dtype, pl.Datetime):
        out = s.dt.replace_time_zone(None) if s.dtype.time_zone else s  # type: ignore[union-attr]
        return out.dt.cast_time_unit("us")
    if s.dtype == pl.Date:
        return s.cast(pl.Datetime("us"))
    if s.dtype.is_integer() or s.dtype.is_float():  # unix seconds
        bad = ~pl.col(name).cast(pl.Float64).is_finite()
        rows = bad_rows(df, bad)
        if rows:
            raise ContractError(source, name, f"timestamp is not a finite number: {s[rows[0]]!r}", rows)
        return (s.cast(pl.Float64) * 1e6).round().cast(pl.Int64).cast(pl.Datetime("us"))
    if s.dtype == pl.Utf8:
        parsed = pl.select(pl.coalesce([_parse(s, f) for f in _FORMATS])).to_series()
        rows = bad_rows(df.with_columns(parsed.alias("__p")), pl.col("__p").is_null())
        if rows:
            raise ContractError(source, name, f"unparseable timestamp {s[rows[0]]!r}", rows)
        return parsed.alias(name)
    raise ContractError(source, name, f"timestamps must be datetimes, unix seconds or ISO strings, got {s.dtype}")


def _check_numeric_finite(df: pl.DataFrame, name: str, source: str) -> None:
    if df.schema[name].is_float():
        rows = bad_rows(df, ~pl.col(name).is_finite() & pl.col(name).is_not_null())
        if rows:
            raise ContractError(source, name, f"non-finite value {df[name][rows[0]]!r}", rows)


def validate(df: pl.DataFrame, table: str, source: str = "<memory>") -> pl.DataFrame:
    """Check ``df`` against the contract of ``table`` and return it normalised.

    ``source`` is the file (or a description of the in-memory origin) used in error messages.
    """
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    if df.height == 0:
        raise ContractError(source, None, f"the {table} table is empty")
    updates: list[pl.Series] = []
    for col in SCHEMAS[table]:
        if col.name not in df.columns:
            if col.required:
                raise ContractError(source, col.name, f"missing required column of the {table} table; "
                                    f"found columns {df.columns}")
            continue
        s = df[col.name]
        if col.kind == ID:
            _check_ids(df, col.name, source)
        elif col.kind == LABEL:
            updates.append(_check_label(df, col.name, source))
        elif col.kind == TIME:
            updates.append(_to_datetime(df, col.name, source))
        elif col.kind == POSITION:
            if not s.dtype.is_integer():
                raise ContractError(source, col.name, f"positions must be integers, got {s.dtype}")
            rows = bad_rows(df, pl.col(col.name).is_null() | (pl.col(col.name) < 1))
            if rows:
                raise ContractError(source, col.name, "positions must be non-null and >= 1", rows)
        elif col.kind == PROB:
            if not s.dtype.is_float():
                raise ContractError(source, col.name, f"probabilities must be floats, got {s.dtype}")
            rows = bad_rows(df, ~((pl.col(col.name) >= 0) & (pl.col(col.name) <= 1)))
            if rows:
                raise ContractError(source, col.name, "probability outside [0, 1] or missing", rows)
        elif col.kind == TEXT and s.dtype != pl.Utf8:
            raise ContractError(source, col.name, f"expected text, got {s.dtype}")
        elif col.kind == BYTES and s.dtype != pl.Binary:
            raise ContractError(source, col.name, f"expected encoded image bytes, got {s.dtype}")
    for name in df.columns:
        _check_numeric_finite(df, name, source)
    key = KEYS.get(table)
    if key is not None:
        rows = bad_rows(df, pl.col(key).is_duplicated(), 2)
        if rows:
            raise ContractError(source, key, f"duplicate {key} {df[key][rows[0]]!r}", rows)
    return df.with_columns(updates) if updates else df


def check_references(events: pl.DataFrame, table: pl.DataFrame, key: str, source: str,
                     column: str | None = None) -> None:
    """Every ``events[column]`` (default ``key``) must exist in ``table[key]``."""
    column = column or key
    if events.schema[column] != table.schema[key]:
        raise ContractError(source, column, f"dtype {events.schema[column]} does not match "
                            f"{key} dtype {table.schema[key]} of the referenced table")
    known = table[key].implode()
    rows = bad_rows(events, pl.col(column).is_not_null() & ~pl.col(column).is_in(known))
    if rows:
        raise ContractError(source, column, f"{column} {events[column][rows[0]]!r} is not in the "
                            f"{'items' if key == 'item_id' else 'users'} table", rows)
