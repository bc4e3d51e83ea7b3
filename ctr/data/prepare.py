"""Preparation: canonical tables -> a fingerprinted artefact of model-ready columns.

Prepare once, train many. :func:`prepare` joins ``events`` with ``items`` and ``users``, orders and
splits the events, fits id vocabularies on the train split only (index 0 = padding, 1 = out of
vocabulary; optionally capped to the most frequent values, or replaced by hashing), builds each
event's behaviour sequence from the same user's *strictly earlier* events, and writes one ``.npy``
file per column and split, plus ``meta.json`` (the feature map) and the vocabularies. The folder is
named by a fingerprint of the source and the settings and is reused when neither changed. Nothing
here loops over rows in Python (hashing runs once per distinct value).

Rows that break the data contract (see :mod:`ctr.data.contract`) stop preparation with an error
naming the file, column and rows, or, with ``PrepareSettings.bad_rows = "drop"``, are dropped and
counted per file and ``"<column>: <reason>"`` in ``meta.json``'s ``repairs`` (logged as a warning
by the ``ctr.data`` logger, and copied into a training run's ``metrics.json`` as ``data_repairs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from ctr.data.contract import (IMPRESSION_KEY, Checked, ContractError, RowCheck, _check_policy, check,
                               check_references, enforce)

PREPARE_VERSION = 2  # bump when the artefact format or the preparation logic changes (2: ties broken by the impression key)
SPLITS = ("train", "val", "test")
log = logging.getLogger("ctr.data")


@dataclass
class Tables:
    """The canonical tables of one source. ``extra_events`` are extra evaluation logs (e.g. a
    random-exposure log), each prepared as a split of its own with the train vocabularies."""

    events: pl.DataFrame
    items: pl.DataFrame | None = None
    users: pl.DataFrame | None = None
    extra_events: dict[str, pl.DataFrame] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # table -> file it came from (for errors)


class Source(Protocol):
    """A source adapter: a cheap fingerprint of its inputs and a loader of the canonical tables."""

    name: str

    def fingerprint(self) -> str: ...

    def load(self) -> Tables: ...


@dataclass
class SequenceSpec:
    max_len: int = 50
    clicked_only: bool = False
    side: list[str] = field(default_factory=list)  # item columns aligned with each history item
    # "time": only events with a strictly earlier timestamp (events in the same second never see
    # each other); "order": every event earlier in the sort order of the log, so that of two
    # same-second events the one sorted first is in the other's history
    earlier: str = "time"

    def __post_init__(self) -> None:
        if self.earlier not in ("time", "order"):
            raise ValueError(f"sequence.earlier must be 'time' or 'order', got {self.earlier!r}")


@dataclass
class PrepareSettings:
    sparse: list[str]  # categorical features (columns of events, items or users)
    dense: list[str] = field(default_factory=list)  # numeric features, standardised on train
    sequence: SequenceSpec | None = field(default_factory=SequenceSpec)
    split: str = "time"  # "time": ordered fractions; "user_last": each user's last events
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    user_last_n: int = 1
    order: list[str] = field(default_factory=lambda: ["timestamp", "user_id", "item_id"])
    # values seen fewer times in train go to the out-of-vocabulary id 1; an int for every feature
    # or {feature: count} (others 1), e.g. {user_id: 20} so that the OOV row learns rare users
    min_count: int | dict[str, int] = 1
    group_key: str = "user_id"  # GAUC groups
    keep: list[str] = field(default_factory=list)  # evaluation-only columns (e.g. true_ctr)
    # columns holding item ids (e.g. item_id, query_item_id) also written as *item rows*: the
    # item's row in the artefact's items.parquet + 1 (0: none), over every item of the items table,
    # not a train-fitted vocabulary, so that content features (image embeddings) reach items never
    # seen in train; with a sequence, the history items' rows too (histref.item_id)
    item_refs: list[str] = field(default_factory=list)
    # frequency cap: keep only the K most frequent train values of a feature (after min_count; ties
    # broken by value, as the vocabulary's order), the rarer ones go to the OOV id 1, so vocab_size
    # <= K + 2; an int for every feature that is not hashed, or {feature: K} (others uncapped)
    max_vocab: int | dict[str, int] | None = None
    # hashed features, {feature: n}: no vocabulary; code = 2 + blake2b(str(value)) % n in every split
    # (values unseen in train get a bucket too; only nulls are OOV), vocab_size n + 2. Collisions
    # share a row. E.g. {user_id: 1024}; vocab/<feature>.parquet lists the train values' buckets.
    # None is read as {} (the Hydra configs default to null, which a {feature: n} override replaces)
    hash_buckets: dict[str, int] = field(default_factory=dict)
    # rows that break the data contract (a null id, a label outside {0, 1}, a NaN or infinite
    # number, a missing/unparseable/implausible timestamp, a duplicate impression, an event naming an
    # item or user missing from items/users, a null dense feature; see ctr.data.contract): "fail"
    # stops with an error naming the file, column and rows; "drop" drops them and counts them per
    # file and reason in meta.json's "repairs" (logged, and in the run's metrics.json). Missing
    # columns, wrong dtypes, empty or unreadable files are errors under either policy.
    bad_rows: str = "fail"

    def categorical(self) -> list[str]:
        """The features that get ids: the sparse ones, and the sequence's item_id and side features."""
        seq = ["item_id", *self.sequence.side] if self.sequence is not None else []
        return list(dict.fromkeys([*self.sparse, *seq]))

    def _check_counts(self) -> None:
        """max_vocab / hash_buckets: positive integers for known categorical features."""
        known = self.categorical()

        def positive(v) -> bool:
            return isinstance(v, Integral) and not isinstance(v, bool) and v > 0

        def per_feature(field_name: str, mapping: Mapping) -> dict[str, int]:
            out = {}
            for name, n in mapping.items():
                if name not in known:
                    raise ValueError(f"{field_name} names {name!r}, which is not a categorical feature "
                                     f"(sparse, or the sequence's item_id and side features: {known})")
                if field_name != "hash_buckets" and name in self.hash_buckets:
                    raise ValueError(f"{field_name} names {name!r}, which is hashed (hash_buckets): "
                                     f"a hashed feature has no vocabulary to cap")
                if not positive(n):
                    raise ValueError(f"{field_name}[{name!r}] must be a positive integer, got {n!r}")
                out[name] = int(n)
            return out

        if self.hash_buckets is None:
            self.hash_buckets = {}
        if not isinstance(self.hash_buckets, Mapping):
            raise ValueError(f"hash_buckets must be {{feature: buckets}}, got {self.hash_buckets!r}")
        self.hash_buckets = per_feature("hash_buckets", self.hash_buckets)
        if isinstance(self.max_vocab, Mapping):
            self.max_vocab = per_feature("max_vocab", self.max_vocab)
        elif self.max_vocab is not None:
            if not positive(self.max_vocab):
                raise ValueError(f"max_vocab must be a positive integer, {{feature: K}} or null, "
                                 f"got {self.max_vocab!r}")
            self.max_vocab = int(self.max_vocab)
        if isinstance(self.min_count, Mapping):
            self.min_count = dict(self.min_count)
            hashed = sorted(set(self.min_count) & set(self.hash_buckets))
            if hashed:
                raise ValueError(f"min_count names {hashed[0]!r}, which is hashed (hash_buckets): "
                                 f"a hashed feature has no vocabulary")

    def vocab_cap(self, name: str) -> int | None:
        if isinstance(self.max_vocab, dict):
            return self.max_vocab.get(name)
        return self.max_vocab

    def __post_init__(self) -> None:
        if isinstance(self.sequence, dict):
            self.sequence = SequenceSpec(**self.sequence)
        self.fractions = tuple(float(f) for f in self.fractions)  # type: ignore[assignment]
        _check_policy(self.bad_rows, "bad_rows")
        if self.split not in ("time", "user_last"):
            raise ValueError(f"split must be 'time' or 'user_last', got {self.split!r}")
        if self.split == "time" and (len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-9
                                     or min(self.fractions) < 0):
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {self.fractions}")
        if self.sequence is not None and self.sequence.max_len < 1:
            raise ValueError(f"sequence.max_len must be >= 1, got {self.sequence.max_len}")
        overlap = set(self.sparse) & set(self.dense)
        if overlap:
            raise ValueError(f"features listed as both sparse and dense: {sorted(overlap)}")
        self._check_counts()


def file_fingerprint(*paths: str | os.PathLike) -> str:
    """sha256 over the names and bytes of files (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def settings_fingerprint(source_fp: str, settings: PrepareSettings) -> str:
    d = asdict(settings)
    # options added later count only when set, so that artefacts prepared before they existed keep
    # their fingerprint (and are reused)
    for key, default in (("max_vocab", None), ("hash_buckets", {}), ("bad_rows", "fail")):
        if d.get(key) == default:
            d.pop(key)
    blob = json.dumps({"source": source_fp, "settings": d, "v": PREPARE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
_MEDIA = ("title", "image", "image_path")  # item columns that are no features (encoders read them)


@dataclass
class _Joined:
    events: pl.DataFrame  # every log, joined with items and users, with a ``__split`` column
    items: pl.DataFrame | None  # the checked items table (rows dropped under bad_rows="drop"), less _MEDIA
    repairs: dict[str, dict[str, int]]  # file -> {"<column>: <reason>": rows dropped}


def _join_tables(t: Tables, settings: PrepareSettings) -> _Joined:
    """Check the tables (``settings.bad_rows``) and join every log with items and users."""
    policy, repairs = settings.bad_rows, {}

    def kept(result: Checked, where: str) -> pl.DataFrame:
        for key, n in result.dropped.items():
            counts = repairs.setdefault(where, {})
            counts[key] = counts.get(key, 0) + n
        return result.frame

    logs = {}  # split -> (file, checked events)
    for split, raw in {"__main": t.events, **t.extra_events}.items():
        where = t.names.get("events" if split == "__main" else split, split)
        logs[split] = (where, kept(check(raw, "events", where, policy), where))
    main = logs["__main"][1]
    for where, ev in logs.values():
        if ev.schema != main.schema:
            raise ContractError(where, None, f"columns/dtypes {ev.schema} differ from the main log's")
    items = users = None
    if t.items is not None:
        where = t.names.get("items", "items")
        items = kept(check(t.items, "items", where, policy), where)
        items = items.drop([c for c in _MEDIA if c in items.columns])  # no features: encoders read them
        clash = (set(items.columns) - {"item_id"}) & set(main.columns)
        if clash:
            raise ContractError(where, sorted(clash)[0], "column exists in both events and items")
    if t.users is not None:
        where = t.names.get("users", "users")
        users = kept(check(t.users, "users", where, policy), where)
    _check_features(settings, main, items, users, logs["__main"][0])
    dense = [RowCheck(n, "null dense feature", pl.col(n).is_null(), "null value in a dense feature")
             for n in settings.dense]
    frames = []
    for split, (where, ev) in logs.items():
        if items is not None:
            for col in dict.fromkeys(["item_id", *settings.item_refs]):
                if col not in ev.columns:
                    raise ContractError(where, col, "item_refs column not found in the events")
                ev = kept(check_references(ev, items, "item_id", where, column=col, policy=policy), where)
            ev = ev.join(items, on="item_id", how="left", maintain_order="left")
        if users is not None:
            ev = kept(check_references(ev, users, "user_id", where, policy=policy), where)
            ev = ev.join(users, on="user_id", how="left", maintain_order="left")
        ev = kept(enforce(ev, dense, where, policy), where)
        frames.append(ev.with_columns(pl.lit(split).alias("__split")))
    return _Joined(pl.concat(frames, how="vertical"), items, repairs)


def _check_features(s: PrepareSettings, events: pl.DataFrame, items: pl.DataFrame | None,
                    users: pl.DataFrame | None, where: str) -> None:
    """Every column the settings name must be in events, items (its media dropped) or users."""
    have = set(events.columns)
    if items is not None:
        have |= set(items.columns)
    if users is not None:
        have |= set(users.columns)
    needed = set(s.sparse) | set(s.dense) | set(s.keep) | set(s.order) | set(s.item_refs)
    if s.sequence is not None:
        needed |= set(s.sequence.side)
    missing = sorted(needed - have)
    if missing:
        raise ContractError(where, missing[0], f"feature column not found in events, items or users "
                            f"(available: {sorted(have)})")


def _assign_splits(df: pl.DataFrame, s: PrepareSettings) -> pl.DataFrame:
    """Order the main log by ``s.order`` and split it. Extra logs keep their own name.

    Ties in ``s.order`` are broken by the impression key (duplicate-free events never share it),
    so that the order of the rows in the files never changes the artefact."""
    ties = [c for c in IMPRESSION_KEY if c in df.columns and c not in s.order]
    df = df.sort([pl.col("__split") != "__main", *s.order, *ties], maintain_order=True)
    main = pl.col("__split") == "__main"
    if s.split == "time":
        n = df.filter(main).height
        n_train, n_val = int(n * s.fractions[0]), int(n * (s.fractions[0] + s.fractions[1]))
        r = pl.int_range(pl.len())
        label = pl.when(r < n_train).then(pl.lit("train")).when(r < n_val).then(pl.lit("val")).otherwise(pl.lit("test"))
    else:
        k = s.user_last_n
        rank_from_end = pl.int_range(pl.len()).reverse().over("user_id")
        label = (pl.when(rank_from_end < k).then(pl.lit("test"))
                 .when(rank_from_end < 2 * k).then(pl.lit("val")).otherwise(pl.lit("train")))
    return df.with_columns(pl.when(main).then(label).otherwise(pl.col("__split")).alias("__split"))


def _fit_vocab(train_values: pl.Series, min_count: int, max_vocab: int | None = None) -> pl.DataFrame:
    """value -> index, most frequent first (ties broken by value); 0 is padding, 1 out of vocabulary.
    ``max_vocab`` keeps only the first (most frequent) values."""
    name = train_values.name
    counts = (train_values.drop_nulls().value_counts(name="count")
              .filter(pl.col("count") >= min_count)
              .sort(["count", name], descending=[True, False]))
    if max_vocab is not None:
        counts = counts.head(max_vocab)
    return counts.with_columns((pl.int_range(pl.len()) + 2).cast(pl.Int32).alias("index"))


def stable_hash(value, buckets: int) -> int:
    """The bucket (0..buckets-1) of a value: blake2b (8 bytes, little-endian) of ``str(value)``'s
    UTF-8 bytes, modulo ``buckets``; the same in every process, platform and library version."""
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def _hash_encode(values: pl.Series, train_values: pl.Series, buckets: int) -> tuple[np.ndarray, pl.DataFrame]:
    """Codes 2 + stable_hash(value) (nulls: 1), hashing each distinct value once, and the table of
    the train values (value, count, index: their code), most frequent first, for vocab/<name>.parquet."""
    uniq = values.drop_nulls().unique()
    codes = pl.Series([2 + stable_hash(v, buckets) for v in uniq.to_list()], dtype=pl.Int32)
    encoded = _encode(values, pl.DataFrame({values.name: uniq, "index": codes}))
    table = _fit_vocab(train_values, 1)  # the train values, most frequent first; their codes as index
    table = table.with_columns(table[values.name].replace_strict(uniq, codes, return_dtype=pl.Int32).alias("index"))
    return encoded, table


def _encode(values: pl.Series, vocab: pl.DataFrame) -> np.ndarray:
    encoded = values.replace_strict(vocab[values.name], vocab["index"], default=1, return_dtype=pl.Int32)
    return encoded.fill_null(1).to_numpy()


def _item_rows(items: pl.DataFrame | None, df: pl.DataFrame, s: PrepareSettings, is_train: np.ndarray,
               out: Path, source_name: str) -> tuple[dict[str, np.ndarray], dict]:
    """Item rows (1-based, 0 for a null) of the ``item_refs`` columns, and the artefact's item table
    (``items.parquet``: ``row``, the items' own columns but title/image, and their train
    impressions and clicks)."""
    if items is None:
        raise ContractError(source_name, s.item_refs[0], "item_refs need an items table")
    items = items.sort("item_id").with_columns((pl.int_range(pl.len()) + 1).cast(pl.Int32).alias("row"))
    refs = {}  # every id was checked against the items table by _join_tables
    for name in s.item_refs:
        codes = df[name].replace_strict(items["item_id"], items["row"], default=0, return_dtype=pl.Int32)
        refs[name] = codes.fill_null(0).to_numpy()
    if "item_id" in refs:
        n = items.height + 1
        lab = df["clicked"].cast(pl.Int64).to_numpy()
        r = refs["item_id"][is_train]
        items = items.with_columns(
            pl.Series("train_impressions", np.bincount(r, minlength=n)[1:].astype(np.int64)),
            pl.Series("train_clicks", np.bincount(r, weights=lab[is_train], minlength=n)[1:].astype(np.int64)))
    items.write_parquet(out / "items.parquet")
    return refs, {"rows": items.height, "refs": list(s.item_refs), "file": "items.parquet"}


def _histories(uid: np.ndarray, ts: np.ndarray, pool: np.ndarray, codes: dict[str, np.ndarray],
               max_len: int, chunk: int = 200_000) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """For each event, the codes of the same user's earlier pool events, most recent first.

    ``ts`` is the event time, or the event's rank in the sorted log for "earlier in the order".
    Vectorised: pool events sorted by (user, time); each event's history ends where its own
    (user, time) key would be inserted, so events with equal ``ts`` never see each other.
    """
    _, ts_rank = np.unique(ts, return_inverse=True)
    width = np.int64(ts_rank.max() + 2)
    key = uid.astype(np.int64) * width + ts_rank.astype(np.int64)
    pool_idx = np.flatnonzero(pool)
    pool_idx = pool_idx[np.argsort(key[pool_idx], kind="stable")]
    pool_key = key[pool_idx]
    end = np.searchsorted(pool_key, key, side="left")
    start = np.searchsorted(pool_key, uid.astype(np.int64) * width, side="left")
    length = np.minimum(end - start, max_len).astype(np.int32)
    out = {name: np.zeros((len(uid), max_len), dtype=np.int32) for name in codes}
    pooled = {name: c[pool_idx] for name, c in codes.items()}
    steps = np.arange(max_len)
    for lo in range(0, len(uid), chunk):
        hi = min(lo + chunk, len(uid))
        valid = steps[None, :] < length[lo:hi, None]
        idx = np.where(valid, end[lo:hi, None] - 1 - steps[None, :], 0)
        for name, c in pooled.items():
            out[name][lo:hi] = np.where(valid, c[idx] if len(c) else 0, 0)
    return out, length


# --------------------------------------------------------------------------------------------
@dataclass
class Artefact:
    path: Path
    meta: dict

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def split_dir(self, split: str) -> Path:
        return self.path / split


def _build(t: Tables, s: PrepareSettings, out: Path, fingerprint: str, source_name: str) -> dict:
    joined = _join_tables(t, s)
    df = _assign_splits(joined.events, s)
    split_col = df["__split"].to_numpy()
    is_train = split_col == "train"
    if not is_train.any():
        raise ValueError(f"{source_name}: the train split is empty ({df.height} events)")
    features: dict[str, dict] = {}
    codes: dict[str, np.ndarray] = {}
    vocab_dir = out / "vocab"
    vocab_dir.mkdir(parents=True)
    seq_side = list(s.sequence.side) if s.sequence is not None else []
    train_rows = pl.Series(is_train)
    # one encoding per feature: the sequence's item_id / side features reuse the target's codes
    for name in s.categorical():
        if name in s.hash_buckets:
            n = s.hash_buckets[name]
            codes[name], vocab = _hash_encode(df[name], df[name].filter(train_rows), n)
            features[name] = {"vocab_size": n + 2, "hashed": n, "oov_share": {}}
        else:
            mc = s.min_count.get(name, 1) if isinstance(s.min_count, dict) else s.min_count
            vocab = _fit_vocab(df[name].filter(train_rows), mc, s.vocab_cap(name))
            codes[name] = _encode(df[name], vocab)
            features[name] = {"vocab_size": vocab.height + 2, "oov_share": {}}
        vocab.write_parquet(vocab_dir / f"{name}.parquet")
    dense_stats = {}
    dense = None
    if s.dense:
        cols = []
        for name in s.dense:
            col = df[name]
            if not col.dtype.is_numeric():
                raise ContractError(source_name, name, f"dense feature must be numeric, got {col.dtype}")
            x = col.cast(pl.Float64).to_numpy()
            mu, sd = float(x[is_train].mean()), float(x[is_train].std()) or 1.0
            dense_stats[name] = {"mean": mu, "std": sd}
            cols.append(((x - mu) / sd).astype(np.float32))
        dense = np.stack(cols, axis=1)
    keep = {}
    for name in s.keep:
        col = df[name]
        if col.dtype.is_temporal():
            col = col.dt.epoch("us")
        if not (col.dtype.is_numeric() or col.dtype == pl.Boolean) or col.null_count():
            raise ContractError(source_name, name, f"evaluation column must be numeric without nulls, "
                                f"got {col.dtype} with {col.null_count()} nulls")
        keep[name] = col.to_numpy()
    group_codes = df[s.group_key].rank("dense").cast(pl.Int64).to_numpy() - 1
    label = df["clicked"].cast(pl.Float32).to_numpy()
    ts = df["timestamp"].dt.epoch("us").to_numpy()
    refs, items_meta = (_item_rows(joined.items, df, s, is_train, out, source_name) if s.item_refs
                        else ({}, None))
    hist, hist_len = {}, None
    if s.sequence is not None:
        uid = df["user_id"].rank("dense").cast(pl.Int64).to_numpy()
        pool = label > 0.5 if s.sequence.clicked_only else np.ones(len(label), dtype=bool)
        when = ts if s.sequence.earlier == "time" else np.arange(len(ts))  # df is in log order
        seq_codes = {n: codes[n] for n in ["item_id", *seq_side]}
        if "item_id" in refs:
            seq_codes["ref:item_id"] = refs["item_id"]
        hist, hist_len = _histories(uid, when, pool, seq_codes, s.sequence.max_len)
    splits = {}
    for split in dict.fromkeys([*SPLITS, *t.extra_events]):
        m = split_col == split
        d = out / split
        d.mkdir()
        np.save(d / "label.npy", label[m])
        np.save(d / "group.npy", group_codes[m])
        np.save(d / "timestamp_us.npy", ts[m])
        for name in s.sparse:
            np.save(d / f"sparse.{name}.npy", codes[name][m])
        for name, h in hist.items():
            ref = name.startswith("ref:")
            np.save(d / (f"histref.{name[4:]}.npy" if ref else f"hist.{name}.npy"), h[m])
        for name, r in refs.items():
            np.save(d / f"ref.{name}.npy", r[m])
        if hist_len is not None:
            np.save(d / "hist_len.npy", hist_len[m])
        if dense is not None:
            np.save(d / "dense.npy", dense[m])
        for name in s.keep:
            np.save(d / f"extra.{name}.npy", keep[name][m])
        n = int(m.sum())
        splits[split] = {"rows": n, "ctr": float(label[m].mean()) if n else None,
                         "groups": int(np.unique(group_codes[m]).size)}
        for name in s.sparse:
            features[name]["oov_share"][split] = float((codes[name][m] == 1).mean()) if n else None
    return {
        "fingerprint": fingerprint,
        "source": source_name,
        "settings": asdict(s),
        "version": PREPARE_VERSION,
        "sparse": {n: features[n] for n in s.sparse},
        "vocab_sizes": {n: f["vocab_size"] for n, f in features.items()},
        "sequence": None if s.sequence is None else {
            "max_len": s.sequence.max_len, "features": ["item_id", *seq_side],
            "clicked_only": s.sequence.clicked_only},
        "dense": s.dense,
        "dense_stats": dense_stats,
        "keep": s.keep,
        "items": items_meta,
        "splits": splits,
        "repairs": joined.repairs,  # file -> {"<column>: <reason>": rows dropped} (bad_rows="drop")
    }


def prepare(source: Source, settings: PrepareSettings, cache_dir: str | os.PathLike,
            force: bool = False) -> Artefact:
    """Return the artefact for (source, settings), building it only when it does not exist yet."""
    fp = settings_fingerprint(source.fingerprint(), settings)
    root = Path(cache_dir)
    final = root / f"{source.name}-{fp}"
    if (final / "meta.json").exists() and not force:
        artefact = Artefact(final, json.loads((final / "meta.json").read_text()))
        _log_repairs(artefact.meta, f"reused artefact {final.name}")
        return artefact
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{source.name}-{fp}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        meta = _build(source.load(), settings, tmp, fp, source.name)
        meta["prepare_seconds"] = round(time.perf_counter() - t0, 3)  # from raw inputs, loading included
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a crash never leaves a half-written artefact in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log_repairs(meta, f"prepared {final.name}")
    return Artefact(final, meta)


def _log_repairs(meta: dict, what: str) -> None:
    """A warning per file whose bad rows were dropped (``bad_rows="drop"``)."""
    for where, counts in (meta.get("repairs") or {}).items():
        log.warning("%s: dropped %d bad rows of %s (bad_rows=drop): %s", what, sum(counts.values()),
                    where, json.dumps(counts))
