"""Open Bandit Dataset (ZOZOTOWN, small version) -> the canonical tables.

Real fashion click logs of a 3-slot widget under two logging policies (``random`` and ``bts``,
Bernoulli Thompson sampling) and three campaigns (``all``, ``men``, ``women``). Kept: position,
propensity score, policy and campaign. The data has no user ids: ``user_id`` is the combination of
the four hashed user features (a user segment, not a person), so behaviour sequences and GAUC
work over segments. Items are campaign-specific, so ``item_id`` is ``"<campaign>/<item>"``.
The categorical item features are hashed differently in the two policy folders (the same item
gets different hashes), so the item table is read from the ``random`` folder for both; the
folders agree on item ids and on ``item_feature_0`` (checked on load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ctr.data.contract import ContractError
from ctr.data.sources import data_path
from ctr.data.prepare import PrepareSettings, Tables, file_fingerprint

POLICIES = ("bts", "random")
CAMPAIGNS = ("all", "men", "women")
USER_FEATURES = [f"user_feature_{i}" for i in range(4)]


def _require(df: pl.DataFrame, path: Path, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ContractError(str(path), missing[0], f"missing column; found {df.columns[:12]}...")


@dataclass
class OpenBandit:
    """Source adapter. ``root`` defaults to ``$CTR_DATA_DIR/open_bandit_small``."""

    root: str | None = None
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    campaigns: list[str] = field(default_factory=lambda: list(CAMPAIGNS))
    name: str = "obd"
    # logging policies kept apart as whole evaluation splits ``test_<policy>`` (e.g. train on the
    # Thompson-sampling log, evaluate on the random policy's log of the same campaigns)
    eval_policies: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        both = set(self.policies) & set(self.eval_policies)
        if both:
            raise ValueError(f"policies {sorted(both)} are both trained on and held out for evaluation")
        for p in [*self.policies, *self.eval_policies]:
            if p not in POLICIES:
                raise ValueError(f"unknown policy {p!r}; expected {POLICIES}")
        for c in self.campaigns:
            if c not in CAMPAIGNS:
                raise ValueError(f"unknown campaign {c!r}; expected {CAMPAIGNS}")

    @property
    def path(self) -> Path:
        return data_path(self.root, "open_bandit_small")

    def _files(self) -> list[Path]:
        out = []
        for c in self.campaigns:
            for p in [*self.policies, *self.eval_policies]:
                out.append(self.path / p / c / f"{c}.csv")
            out.append(self.path / "random" / c / "item_context.csv")
        return out

    def fingerprint(self) -> str:
        fp = file_fingerprint(*self._files()) + f"|{sorted(self.policies)}|{sorted(self.campaigns)}"
        return fp + (f"|eval:{sorted(self.eval_policies)}" if self.eval_policies else "")

    def load(self) -> Tables:
        events, items = {p: [] for p in [*self.policies, *self.eval_policies]}, []
        for c in self.campaigns:
            ic_path = self.path / "random" / c / "item_context.csv"
            ic = pl.read_csv(ic_path)
            _require(ic, ic_path, ["item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"])
            for p in events:
                other_path = self.path / p / c / "item_context.csv"
                if p != "random" and other_path.exists():
                    other = pl.read_csv(other_path)
                    if not (other["item_id"].equals(ic["item_id"])
                            and np.allclose(other["item_feature_0"].to_numpy(), ic["item_feature_0"].to_numpy())):
                        raise ContractError(str(other_path), "item_feature_0",
                                            f"items disagree with {ic_path}; cannot share one item table")
            items.append(ic.select(
                (pl.lit(f"{c}/") + pl.col("item_id").cast(pl.Utf8)).alias("item_id"),
                pl.lit(c).alias("campaign"),
                pl.col("item_feature_0").cast(pl.Float64),
                *[pl.col(f"item_feature_{i}").cast(pl.Utf8) for i in (1, 2, 3)]))
            for p in events:
                path = self.path / p / c / f"{c}.csv"
                if not path.exists():
                    raise FileNotFoundError(f"{path}: file not found")
                df = pl.read_csv(path)
                _require(df, path, ["timestamp", "item_id", "position", "click", "propensity_score", *USER_FEATURES])
                n_items = ic.height
                aff = [f"user-item_affinity_{i}" for i in range(n_items)]
                _require(df, path, aff)
                bad = df.with_row_index("__r").filter(~pl.col("item_id").is_between(0, n_items - 1))
                if bad.height:
                    raise ContractError(str(path), "item_id", f"item {bad['item_id'][0]} not in {ic_path}",
                                        bad["__r"].head(5).to_list())
                # the affinity of the user to the item actually shown, gathered without a row loop
                a = df.select(aff).to_numpy()
                affinity = a[np.arange(df.height), df["item_id"].to_numpy()]
                events[p].append(df.select(
                    (pl.lit(f"{c}/") + pl.col("item_id").cast(pl.Utf8)).alias("item_id"),
                    pl.concat_str(USER_FEATURES, separator="|").alias("user_id"),
                    pl.col("click").alias("clicked"),
                    pl.col("timestamp"),
                    pl.col("position").cast(pl.Int8),
                    pl.col("propensity_score").cast(pl.Float64),
                    pl.lit(p).alias("policy"),
                    *[pl.col(u).cast(pl.Utf8) for u in USER_FEATURES],
                ).with_columns(pl.Series("affinity", affinity, dtype=pl.Float64)))
        # request ids run over every log, main logs first, so that they never collide
        logs, start = {}, 0
        for p in events:
            df = pl.concat(events[p])
            logs[p] = df.with_row_index("request_id", offset=start).with_columns(pl.col("request_id").cast(pl.Int64))
            start += df.height
        ev = pl.concat([logs[p] for p in self.policies])
        pattern = str(self.path / "{policy}/{campaign}/{campaign}.csv")
        return Tables(events=ev, items=pl.concat(items),
                      extra_events={f"test_{p}": logs[p] for p in self.eval_policies},
                      names={"events": pattern, "items": str(self.path / "random/{campaign}/item_context.csv"),
                             **{f"test_{p}": str(self.path / p / "{campaign}/{campaign}.csv")
                                for p in self.eval_policies}})


PRESET = PrepareSettings(
    sparse=["item_id", "campaign", "policy", "position", *USER_FEATURES,
            "item_feature_1", "item_feature_2", "item_feature_3"],
    dense=["item_feature_0", "affinity"],
    sequence=None, split="time", fractions=(0.8, 0.1, 0.1),
    order=["timestamp", "request_id"], keep=["propensity_score", "position"])
