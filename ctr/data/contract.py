"""The data contract: the canonical ``items`` / ``events`` / ``users`` tables (see DESIGN.md).

Every source adapter emits these tables; everything after the adapters knows only them.
:func:`check` tests a table and returns it normalised (ids kept as they are, labels as Int8,
timestamps as naive UTC ``Datetime("us")``); :func:`validate` is its strict form. Nobody trains on
silently wrong data: a violation either raises :class:`ContractError`, naming the file (or source),
the column and example rows (0-based data rows of the file), or, for row-level violations under
the policy ``"drop"``, removes the offending rows and counts them per ``"<column>: <reason>"``.

Always errors (the table as a whole is unusable): an empty table, a missing required column, a
column of the wrong dtype (the message names the dtype found), a duplicated ``item_id`` in
``items`` or ``user_id`` in ``users`` (which row's attributes are right cannot be decided), an id
column whose dtype differs from the table it references.

Row-level violations (``policy="fail"``: an error; ``"drop"``: the rows are dropped and counted,
each row under the first check it fails, in this order):

- a null id (``request_id``, ``user_id``, ``item_id``, ``query_item_id``);
- a null label, or a label other than 0/1 (NaN included);
- a null timestamp; an unparseable one (a string in no known ISO format, a NaN or infinite number
  of unix seconds); one outside :data:`TIME_RANGE` = (1970-01-01 00:00, 2100-01-01): no click log
  predates unix time, so such a value is a placeholder (0, -1) or a unit mistake (milliseconds or
  microseconds read as seconds land past the year 50,000);
- a null or non-positive ``position``; a ``true_ctr`` outside [0, 1] or missing;
- a NaN or infinite value in any float column;
- ``events`` only, after the checks above: a duplicate impression, a row equal to an earlier one in
  :data:`IMPRESSION_KEY` (``request_id``, ``user_id``, ``item_id``, ``timestamp`` and, where the
  log has it, ``position``; timestamps compared after parsing). ``"drop"`` keeps the first row in
  file order, whatever its label: a log that writes a click as a second row of the impression
  must be merged first (e.g. the max of ``clicked``).

:func:`check_references` adds, with the same policy: an event whose ``item_id`` (or another item
reference such as ``query_item_id``) is not in ``items``, or whose ``user_id`` is not in ``users``.
Dropping an ``items`` (``users``) row therefore also drops the events that name it, counted as
"not in the items (users) table" under the events file.

Timestamps may come in any order: preparation sorts the events (``PrepareSettings.order``, ties
broken by the impression key, which duplicate-free rows never share), so a shuffled copy of a log
gives the same artefact. Time zones: tz-aware datetimes and ISO strings with an offset are
converted to UTC; naive ones are taken as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import NamedTuple

import polars as pl

ID, LABEL, TIME, POSITION, PROB, TEXT, BYTES, NUMBER = (
    "id", "label", "timestamp", "position", "probability", "text", "bytes", "number")
POLICIES = ("fail", "drop")
TIME_RANGE = (datetime(1970, 1, 1), datetime(2100, 1, 1))  # valid timestamps lie strictly inside
IMPRESSION_KEY = ("request_id", "user_id", "item_id", "timestamp", "position")  # position: if present


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


# --------------------------------------------------------------------------------------------
# Row checks: one vectorised pass, then an error (fail) or a filter with counts (drop)
@dataclass(frozen=True)
class RowCheck:
    """A row-level rule. ``bad`` is true on a violating row (a null counts as "not bad");
    ``message`` is the error text, where ``{value}`` is the first bad row's value of ``column``.
    Dropped rows are counted under ``"<column>: <reason>"``."""

    column: str
    reason: str
    bad: pl.Expr
    message: str = ""
    rows: pl.Expr | None = None  # the rows to show, when not those of ``bad``

    @property
    def key(self) -> str:
        return f"{self.column}: {self.reason}"


class Checked(NamedTuple):
    frame: pl.DataFrame
    dropped: dict[str, int]  # "<column>: <reason>" -> rows dropped (empty under "fail")


def _shown(value: object) -> str:
    """A value for an error message: datetimes as ISO text, the rest as their repr."""
    return value.isoformat(sep=" ") if isinstance(value, (datetime, date)) else repr(value)


def _check_policy(policy: str, name: str = "bad-row policy") -> None:
    """``policy`` must be one of :data:`POLICIES`; ``name`` is what the error calls it."""
    if policy not in POLICIES:
        raise ValueError(f"{name} must be one of {POLICIES}, got {policy!r}")


def enforce(df: pl.DataFrame, checks: list[RowCheck], source: str, policy: str = "fail") -> Checked:
    """Apply row checks. ``"fail"``: raise for the first check that any row fails, naming up to
    five rows and how many fail in all. ``"drop"``: remove every failing row, each counted under
    the first check it fails; a table left with no rows is an error."""
    _check_policy(policy)
    if not checks:
        return Checked(df, {})
    masks = df.select([c.bad.fill_null(False).alias(f"__m{i}") for i, c in enumerate(checks)])
    if policy == "fail":
        for i, c in enumerate(checks):
            m = masks[f"__m{i}"]
            n = int(m.sum())
            if n:
                rows = bad_rows(df, c.rows) if c.rows is not None else m.arg_true().head(5).to_list()
                text = (c.message or c.reason).format(value=_shown(df[c.column][rows[0]]))
                raise ContractError(source, c.column, f"{text}; {n} such row{'s' * (n > 1)} in all "
                                    f"(bad_rows=drop would drop and count {'them' if n > 1 else 'it'})", rows)
        return Checked(df, {})
    dropped: dict[str, int] = {}
    seen = pl.repeat(False, df.height, eager=True)
    for i, c in enumerate(checks):
        m = masks[f"__m{i}"]
        n = int((m & ~seen).sum())
        if n:
            dropped[c.key] = dropped.get(c.key, 0) + n
        seen = seen | m
    if not dropped:
        return Checked(df, {})
    out = df.filter(~seen)
    if out.height == 0:
        raise ContractError(source, None, f"every row is bad: {dropped} (of {df.height} rows)")
    return Checked(out, dropped)


# --------------------------------------------------------------------------------------------
# Column checks (always errors) and the row checks of each kind of column
def _id_checks(df: pl.DataFrame, name: str, source: str) -> list[RowCheck]:
    dtype = df.schema[name]
    if not (dtype.is_integer() or dtype in (pl.Utf8, pl.Categorical)):
        raise ContractError(source, name, f"ids must be integers or strings, got dtype {dtype}")
    return [RowCheck(name, "null id", pl.col(name).is_null())]


def _label_checks(df: pl.DataFrame, name: str, source: str) -> list[RowCheck]:
    dtype = df.schema[name]
    if not (dtype.is_integer() or dtype == pl.Boolean or dtype.is_float()):
        raise ContractError(source, name, f"labels must be 0/1 integers or booleans, got dtype {dtype}")
    checks = [RowCheck(name, "null label", pl.col(name).is_null())]
    if dtype != pl.Boolean:
        bad = (pl.col(name) != 0) & (pl.col(name) != 1)  # NaN too
        checks.append(RowCheck(name, "label not 0 or 1", bad, "label must be 0 or 1, got {value}"))
    return checks


_FORMATS = (None, "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%d")
_RANGE_TEXT = ("timestamp {value} is outside (1970-01-01, 2100-01-01): a placeholder such as 0 "
               "or -1, or a unit mistake such as milliseconds read as seconds")


def _parsed(name: str) -> str:
    """The helper column holding a timestamp column's parsed values during the checks."""
    return f"__parsed_{name}"


def _naive_utc(s: pl.Series) -> pl.Series:
    """A datetime series in naive UTC: a tz-aware one converted, a naive one as it is."""
    if s.dtype.time_zone:  # type: ignore[union-attr]
        return s.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return s


def _parse(s: pl.Series, fmt: str | None) -> pl.Series:
    """Parse ISO-like strings with one format (None: inferred) to naive UTC ``Datetime("us")``."""
    try:
        out = s.str.to_datetime(fmt, strict=False, time_unit="us")
    except pl.exceptions.PolarsError:
        return pl.Series(s.name, [None] * len(s), dtype=pl.Datetime("us"))
    return _naive_utc(out)


def _timestamps(df: pl.DataFrame, name: str, source: str) -> tuple[pl.Series, list[RowCheck]]:
    """The column as naive UTC ``Datetime("us")`` (null where it cannot be parsed), named
    ``__parsed_<name>``, and its row checks (which read the raw column and the parsed one)."""
    s, parsed = df[name], pl.col(_parsed(name))
    lo, hi = TIME_RANGE
    unparseable = RowCheck(name, "unparseable timestamp", pl.col(name).is_not_null() & parsed.is_null(),
                           "unparseable timestamp {value}")
    out_of_range = (parsed <= lo) | (parsed >= hi)
    if isinstance(s.dtype, pl.Datetime):
        out = _naive_utc(s).dt.cast_time_unit("us")
    elif s.dtype == pl.Date:
        out = s.cast(pl.Datetime("us"))
    elif s.dtype.is_integer() or s.dtype.is_float():  # unix seconds
        # judged on the seconds themselves: a value too large for Datetime("us") parses to null
        # but is out of range, not unparseable
        secs = pl.col(name).cast(pl.Float64)
        out = (s.cast(pl.Float64) * 1e6).round().cast(pl.Int64, strict=False).cast(pl.Datetime("us"))
        unparseable = RowCheck(name, "timestamp not finite", ~secs.is_finite(),
                               "timestamp is not a finite number: {value}")
        out_of_range = (secs <= 0) | (secs >= (hi - lo).total_seconds())
    elif s.dtype == pl.Utf8:
        out = pl.select(pl.coalesce([_parse(s, f) for f in _FORMATS])).to_series()
    else:
        raise ContractError(source, name, f"timestamps must be datetimes, unix seconds or ISO strings, "
                            f"got dtype {s.dtype}")
    return out.alias(_parsed(name)), [
        RowCheck(name, "null timestamp", pl.col(name).is_null()),
        unparseable,
        RowCheck(name, "timestamp out of range", out_of_range, _RANGE_TEXT)]


def _column_checks(df: pl.DataFrame, col: Col, source: str) -> tuple[list[RowCheck], pl.Series | None]:
    """Dtype errors for one contract column; its row checks and, for a timestamp, its parsed values."""
    name, dtype = col.name, df.schema[col.name]
    if col.kind == ID:
        return _id_checks(df, name, source), None
    if col.kind == LABEL:
        return _label_checks(df, name, source), None
    if col.kind == TIME:
        parsed, checks = _timestamps(df, name, source)
        return checks, parsed
    if col.kind == POSITION:
        if not dtype.is_integer():
            raise ContractError(source, name, f"positions must be integers, got dtype {dtype}")
        return [RowCheck(name, "position null or < 1", pl.col(name).is_null() | (pl.col(name) < 1),
                         "positions must be non-null and >= 1, got {value}")], None
    if col.kind == PROB:
        if not dtype.is_float():
            raise ContractError(source, name, f"probabilities must be floats, got dtype {dtype}")
        ok = (pl.col(name) >= 0) & (pl.col(name) <= 1)
        return [RowCheck(name, "probability outside [0, 1] or missing", ~ok.fill_null(False),
                         "probability outside [0, 1] or missing, got {value}")], None
    if col.kind == TEXT and dtype != pl.Utf8:
        raise ContractError(source, name, f"expected text, got dtype {dtype}")
    if col.kind == BYTES and dtype != pl.Binary:
        raise ContractError(source, name, f"expected encoded image bytes, got dtype {dtype}")
    return [], None


def _finite_checks(df: pl.DataFrame, skip: set[str]) -> list[RowCheck]:
    return [RowCheck(name, "non-finite value", ~pl.col(name).is_finite() & pl.col(name).is_not_null(),
                     "non-finite value {value}")
            for name, dtype in df.schema.items() if dtype.is_float() and name not in skip]


def _duplicate_impressions(df: pl.DataFrame) -> RowCheck:
    """Rows equal to an earlier one in the impression key; an error shows the first such group."""
    names = [c for c in IMPRESSION_KEY if c in df.columns]
    key = pl.struct(names)
    return RowCheck("request_id", "duplicate impression", ~key.is_first_distinct(),
                    f"duplicate impression: the later rows repeat the first one's {', '.join(names)}",
                    rows=key == key.filter(key.is_duplicated()).first())


def check(df: pl.DataFrame, table: str, source: str = "<memory>", policy: str = "fail") -> Checked:
    """Check ``df`` against the contract of ``table``; return it normalised, with the rows dropped.

    ``source`` is the file (or a description of the in-memory origin) used in error messages.
    ``policy``: ``"fail"`` raises :class:`ContractError` for any violation; ``"drop"`` removes rows
    with row-level violations and counts them (see the module docstring for which are which).
    """
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    _check_policy(policy)
    if df.height == 0:
        raise ContractError(source, None, f"the {table} table is empty")
    checks: list[RowCheck] = []
    parsed: dict[str, pl.Series] = {}
    for col in SCHEMAS[table]:
        if col.name not in df.columns:
            if col.required:
                raise ContractError(source, col.name, f"missing required column of the {table} table; "
                                    f"found columns {df.columns}")
            continue
        rules, values = _column_checks(df, col, source)
        checks += rules
        if values is not None:
            parsed[col.name] = values
    # labels and probabilities: their own range checks, which come first, catch NaN and inf
    checks += _finite_checks(df, {c.name for c in SCHEMAS[table] if c.kind in (LABEL, TIME, PROB)})
    key = KEYS.get(table)
    if key is not None:
        rows = bad_rows(df, pl.col(key).is_duplicated() & pl.col(key).is_not_null(), 2)
        if rows:
            raise ContractError(source, key, f"duplicate {key} {df[key][rows[0]]!r}", rows)
    df, dropped = enforce(df.with_columns(parsed.values()), checks, source, policy)
    labels = [c.name for c in SCHEMAS[table] if c.kind == LABEL and c.name in df.columns]
    normalised = [pl.col(_parsed(n)).alias(n) for n in parsed] + [pl.col(n).cast(pl.Int8) for n in labels]
    df = df.with_columns(normalised).drop([_parsed(n) for n in parsed])
    if table == "events":
        df, dups = enforce(df, [_duplicate_impressions(df)], source, policy)
        dropped.update(dups)
    return Checked(df, dropped)


def validate(df: pl.DataFrame, table: str, source: str = "<memory>") -> pl.DataFrame:
    """Check ``df`` against the contract of ``table`` and return it normalised; any violation is
    a :class:`ContractError`. ``source`` is the file named in error messages."""
    return check(df, table, source, "fail").frame


def check_references(events: pl.DataFrame, table: pl.DataFrame, key: str, source: str,
                     column: str | None = None, policy: str = "fail") -> Checked:
    """Every ``events[column]`` (default ``key``) must exist in ``table[key]``: under ``"fail"``
    an error, under ``"drop"`` the events are dropped, counted as "not in the items/users table"."""
    column = column or key
    if events.schema[column] != table.schema[key]:
        raise ContractError(source, column, f"dtype {events.schema[column]} does not match "
                            f"{key} dtype {table.schema[key]} of the referenced table")
    where = "items" if key == "item_id" else "users"
    bad = pl.col(column).is_not_null() & ~pl.col(column).is_in(table[key].implode())
    rule = RowCheck(column, f"not in the {where} table", bad, f"{column} {{value}} is not in the {where} table")
    return enforce(events, [rule], source, policy)
