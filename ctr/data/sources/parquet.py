"""A user's own parquet (or CSV) files in the shape of the data contract.

A file that cannot be read (0 bytes, truncated, not parquet at all, a CSV row with more or fewer
fields than the header) is a :class:`ContractError` naming the file (and, for a ragged CSV, its
rows), under either ``bad_rows`` policy: such a file is damaged as a whole.
"""

from __future__ import annotations

import glob
import io
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
    frames = [_read_one(Path(f)) for f in files]
    if len(frames) > 1 and any(fr.schema != frames[0].schema for fr in frames):
        raise ContractError(str(path), None, "the matched files have different columns or dtypes")
    return pl.concat(frames) if len(frames) > 1 else frames[0]


def _read_one(p: Path) -> pl.DataFrame:
    if not p.exists():
        raise FileNotFoundError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise ContractError(str(p), None, "the file is empty (0 bytes)")
    csv = p.suffix in (".csv", ".tsv")
    sep = "\t" if p.suffix == ".tsv" else ","
    data = p.read_bytes() if csv else b""  # a CSV is read from disk once, its checks work on the bytes
    if csv:
        _check_csv_fields(p, data, sep)
    try:
        if csv:
            return pl.read_csv(io.BytesIO(data), separator=sep, infer_schema_length=CSV_INFER_ROWS)
        return pl.read_parquet(p)
    except (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException) as e:
        if csv:
            _name_unparseable_csv_values(p, data, sep)
        what = "csv" if csv else "parquet (is it truncated, or not a parquet file?)"
        raise ContractError(str(p), None, f"cannot be read as {what}: {e}") from e


CSV_INFER_ROWS = 100  # polars' default: a column's type comes from its first rows


def _name_unparseable_csv_values(p: Path, data: bytes, sep: str) -> None:
    """A CSV value that does not parse as its column's type (inferred from the first rows, e.g. a
    ``yes`` far down an integer column): an error naming the column and the rows, where polars
    names only the column. Returns when it finds none (the caller reports polars' error)."""
    try:
        text = pl.read_csv(io.BytesIO(data), separator=sep, infer_schema=False)
        # the types polars infers from the first rows (the schema alone: no row is parsed)
        schema = pl.scan_csv(data, separator=sep, infer_schema_length=CSV_INFER_ROWS).collect_schema()
    except (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException):
        return
    for name, dtype in schema.items():
        if dtype == pl.String:
            continue
        raw = text[name].str.strip_chars()
        bad = (raw.is_not_null() & (raw != "") & raw.cast(dtype, strict=False).is_null()).arg_true()
        if bad.len():
            rows = bad.head(5).to_list()
            raise ContractError(str(p), name, f"value {raw[rows[0]]!r} does not parse as {dtype}, the type of "
                                f"the column's first {CSV_INFER_ROWS} rows; {bad.len()} such row(s) in all",
                                rows)


def _check_csv_fields(p: Path, data: bytes, sep: str) -> None:
    """Every line of ``data`` (the bytes of the file ``p``) must have as many fields as the header:
    polars pads a short row with nulls and reads a blank line as a row of nulls, silently. Lines are
    rows unless a quoted field spans lines (an odd number of quote characters on a line), where this
    check stands aside."""
    text = data.decode("utf-8", errors="replace")
    lines = pl.Series("line", [text]).str.split("\n").explode().str.strip_suffix("\r")
    if lines[-1] == "":
        lines = lines.head(-1)  # the final newline
    if (lines.str.count_matches('"', literal=True) % 2 == 1).any():
        return
    fields = lines.str.replace_all(r'"(?:[^"]|"")*"', "").str.count_matches(sep, literal=True) + 1
    bad = (fields.slice(1) != fields[0]).arg_true()
    if bad.len():
        rows = bad.head(5).to_list()
        raise ContractError(str(p), None, f"ragged CSV: data row {rows[0]} (line {rows[0] + 2}) has "
                            f"{fields[rows[0] + 1]} field(s), the header {fields[0]}; {bad.len()} such "
                            f"row(s) in all", rows)


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
