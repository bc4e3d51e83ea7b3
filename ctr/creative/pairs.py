"""CreativePair-style pairs from any impression log with several creatives per product.

:func:`build_pairs` aggregates the log to one cell per (group, creative), where a group is a
product (and, when the log has one, a search context), keeps the cells with more than
``min_impressions`` impressions, pairs every two creatives of a group, keeps the pairs whose CTRs
differ by more than ``min_ctr_gap`` (relative: ``ctr_hi / ctr_lo - 1``), labels the better creative
and randomises which of the two is shown as ``A``. Products are split into train / val / test so
that held-out pairs show unseen products and creatives.

The log is either aggregated (``impressions`` and ``clicks`` columns) or one row per impression (a
0/1 ``clicked`` column). Bad input (missing columns, nulls, negative counts, more clicks than
impressions) raises :class:`ContractError` naming the source, the column and rows.

``python -m ctr.creative.pairs --out DIR`` simulates creatives (:mod:`ctr.creative.world`) and
writes ``pairs.parquet`` next to the world's tables; ``--log FILE`` builds ``pairs.parquet`` from
your log instead. A training folder also needs ``creatives.parquet``, ``contexts.parquet`` and
``products.parquet`` beside it (columns: :data:`ctr.creative.data.REQUIRED`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ctr.data.contract import ContractError, bad_rows

SPLITS = ("train", "val", "test")


@dataclass
class PairConfig:
    min_ctr_gap: float = 0.6        # keep pairs with ctr_hi / ctr_lo - 1 above this
    min_impressions: int = 1000     # both creatives need more impressions than this
    group_by: tuple[str, ...] | None = None  # default: product_id (+ context_id when present)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test share of products
    seed: int = 0


def check_log(log: pl.DataFrame, source: str, group: list[str]) -> pl.DataFrame:
    """Validate an impression log (aggregated, or one row per impression: then aggregated to
    ``impressions`` and ``clicks`` per group and creative)."""
    need = [*group, "creative_id"]
    if "impressions" in log.columns or "clicks" in log.columns:
        need += ["impressions", "clicks"]
    elif "clicked" in log.columns:
        need += ["clicked"]
    else:
        raise ContractError(source, "impressions", "the log needs impressions and clicks columns "
                            f"(aggregated) or a clicked column (one row per impression); has {log.columns}")
    for c in need:
        if c not in log.columns:
            raise ContractError(source, c, f"missing column (has {log.columns})")
        if log[c].null_count():
            raise ContractError(source, c, "null value", bad_rows(log, pl.col(c).is_null()))
    for c in need[len(group) + 1:]:
        if not log[c].dtype.is_integer() and log[c].dtype != pl.Boolean:
            raise ContractError(source, c, f"counts must be integers, got {log[c].dtype}")
        if log[c].dtype != pl.Boolean and (log[c] < 0).any():
            raise ContractError(source, c, "negative count", bad_rows(log, pl.col(c) < 0))
    if "clicked" in need:
        if log["clicked"].dtype != pl.Boolean and (log["clicked"] > 1).any():
            raise ContractError(source, "clicked", "labels must be 0/1", bad_rows(log, pl.col("clicked") > 1))
        log = log.group_by([*group, "creative_id"]).agg(
            pl.len().alias("impressions"), pl.col("clicked").cast(pl.Int64).sum().alias("clicks"))
    elif (log["clicks"] > log["impressions"]).any():
        raise ContractError(source, "clicks", "more clicks than impressions",
                            bad_rows(log, pl.col("clicks") > pl.col("impressions")))
    return log


def build_pairs(log: pl.DataFrame, cfg: PairConfig | None = None, source: str = "log") -> pl.DataFrame:
    """Labelled creative pairs from an impression log (see the module docstring).

    Returns one row per pair: ``pair_id, <group columns>, creative_a, creative_b, impressions_a/b,
    clicks_a/b, ctr_a/b, gap`` (relative CTR gap), ``label`` (``"A"`` or ``"B"``, the higher CTR)
    and ``split``."""
    cfg = cfg or PairConfig()
    group = list(cfg.group_by) if cfg.group_by else (
        ["product_id", "context_id"] if "context_id" in log.columns else ["product_id"])
    if "product_id" not in group:
        raise ValueError(f"group_by must contain product_id (the split is by product), got {group}")
    cells = (check_log(log, source, group)
             .group_by([*group, "creative_id"]).agg(pl.col("impressions").sum(), pl.col("clicks").sum())
             .filter(pl.col("impressions") > cfg.min_impressions)
             .with_columns((pl.col("clicks") / pl.col("impressions")).alias("ctr")))
    pairs = (cells.join(cells, on=group, suffix="_b")
             .filter(pl.col("creative_id") < pl.col("creative_id_b"))
             .rename({"creative_id": "creative_a", "impressions": "impressions_a", "clicks": "clicks_a",
                      "ctr": "ctr_a", "creative_id_b": "creative_b"})
             .with_columns(  # x / 0 is an infinite gap; 0 / 0 (no clicks on either) is a tie
                 pl.when(pl.max_horizontal("ctr_a", "ctr_b") == 0).then(0.0)
                 .otherwise(pl.max_horizontal("ctr_a", "ctr_b") / pl.min_horizontal("ctr_a", "ctr_b") - 1.0)
                 .alias("gap"))
             .filter(pl.col("gap") > cfg.min_ctr_gap)
             .sort([*group, "creative_a", "creative_b"]))
    rng = np.random.default_rng(cfg.seed)
    swap = rng.random(pairs.height) < 0.5  # randomise which creative is shown as A
    cols = {}
    for x in ("creative", "impressions", "clicks", "ctr"):
        xa, xb = pairs[f"{x}_a"].to_numpy(), pairs[f"{x}_b"].to_numpy()
        cols[f"{x}_a"], cols[f"{x}_b"] = np.where(swap, xb, xa), np.where(swap, xa, xb)
    products = np.unique(pairs["product_id"].to_numpy())
    order = rng.permutation(len(products))
    cut = np.cumsum(np.asarray(cfg.split, dtype=float) / np.sum(cfg.split) * len(products)).round().astype(int)
    split_of = np.empty(len(products), dtype=object)
    for name, lo, hi in zip(SPLITS, [0, *cut[:-1]], cut):
        split_of[order[lo:hi]] = name
    split = split_of[np.searchsorted(products, pairs["product_id"].to_numpy())]
    return pairs.with_columns(**{k: pl.Series(k, v) for k, v in cols.items()}).with_columns(
        pl.when(pl.col("ctr_a") > pl.col("ctr_b")).then(pl.lit("A")).otherwise(pl.lit("B")).alias("label"),
        pl.Series("split", split.astype(str)),
    ).with_row_index("pair_id").select(
        "pair_id", *group, "creative_a", "creative_b", "impressions_a", "impressions_b", "clicks_a",
        "clicks_b", "ctr_a", "ctr_b", "gap", "label", "split")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build labelled creative pairs (simulated by default).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--log", help="an impression log (parquet or csv) instead of the simulator")
    p.add_argument("--seed", type=int, default=0, help="simulator and pair-order seed")
    p.add_argument("--n-products", type=int, default=1500)
    p.add_argument("--min-ctr-gap", type=float, default=PairConfig.min_ctr_gap)
    p.add_argument("--min-impressions", type=int, default=PairConfig.min_impressions)
    return p


def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = PairConfig(min_ctr_gap=args.min_ctr_gap, min_impressions=args.min_impressions, seed=args.seed)
    if args.log:
        src = Path(args.log)
        log = pl.read_parquet(src) if src.suffix == ".parquet" else pl.read_csv(src)
        pairs = build_pairs(log, cfg, source=str(src))
    else:
        from ctr.creative.world import CreativeSimConfig, simulate_creatives
        world = simulate_creatives(CreativeSimConfig(seed=args.seed, n_products=args.n_products))
        world.save(out)
        pairs = build_pairs(world.log, cfg, source="simulated log")
    pairs.write_parquet(out / "pairs.parquet")
    counts = pairs.group_by("split").len().sort("split")
    print(f"wrote {pairs.height} pairs to {out / 'pairs.parquet'} "
          f"({', '.join(f'{s} {n}' for s, n in counts.iter_rows())}); "
          f"A wins {float((pairs['label'] == 'A').mean()):.3f}; median gap {float(pairs['gap'].median()):.2f}")
    return out


if __name__ == "__main__":
    main()
