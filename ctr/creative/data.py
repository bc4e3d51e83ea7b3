"""Data for creative selection: the pair tables, prompts and targets, and the creatives' images.

:func:`load_tables` returns the world's tables (``creatives``, ``contexts``, ``products``, ``log``)
and the labelled ``pairs``, either read from a folder written by ``python -m ctr.creative.pairs``
(or by hand, see :data:`REQUIRED`) or simulated and cached under ``<cache_dir>/creative/<key>/``.
:class:`CreativeDataModule` turns the pairs into batches of ``{"a", "b"}`` (creative rows), the
prompt, the target completion and the label, and holds the creatives' decoded images and, for the
small selector, the frozen image tower's token features.

Creative images are procedurally rendered PNGs in a simulated world, but a data folder (``dir``,
written by hand) may hold any image bytes or paths, so they follow the bad-image policy of
:mod:`encoders.images`. A creative whose image cannot be used (null, missing file, 0 bytes, zero
size, unknown format, truncated, over ``max_image_pixels``): under ``bad_images="fail"`` (default) a
:class:`ContractError` names ``creatives.parquet``, its ``image`` column, the bad rows and the first
one's ``creative_id`` and reason; under ``"skip"`` such creatives are left out, with every pair that
shows one (counted in ``pairs_without_image``), and reported in ``image_failures``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ctr.creative.pairs import SPLITS, PairConfig, check_log, build_pairs
from ctr.creative.prompts import answer_only, prompt_expr, rationale, swap_text
from ctr.creative.world import ASPECTS, CREATIVE_LEVELS, Attractiveness, CreativeSimConfig, simulate_creatives
from ctr.data.contract import ContractError, bad_rows
from encoders.images import MAX_PIXELS, ImageFailures, check_image_settings, decode_images

DATA_VERSION = 1
#: table -> columns every creative data folder needs
REQUIRED = {
    "creatives": ["creative_id", "product_id", "image"],
    "contexts": ["context_id", "product_id", "query"],
    "products": ["product_id", "title"],
    "pairs": ["pair_id", "product_id", "context_id", "creative_a", "creative_b", "label", "gap", "split"],
}
#: columns the chain-of-thought rationales need (the simulator writes them)
RATIONALE_COLUMNS = {
    "creatives": ["framing", "background", "brightness", "clutter", "text", "shown_colour"],
    "contexts": ["intent", "query_colour"],
    "products": ["colour", "alt_colour"],
    "log": ["context_id", "creative_id", *(f"u_{a}" for a in ASPECTS)],
}


@dataclass
class CreativeTables:
    creatives: pl.DataFrame
    contexts: pl.DataFrame
    products: pl.DataFrame
    pairs: pl.DataFrame
    log: pl.DataFrame | None = None
    source: str = "simulated"


def _check(df: pl.DataFrame, name: str, cols: list[str], source: str) -> None:
    src = f"{source}/{name}.parquet"
    for c in cols:
        if c not in df.columns:
            raise ContractError(src, c, f"missing column (has {df.columns})")
        if df[c].null_count():
            raise ContractError(src, c, "null value", bad_rows(df, pl.col(c).is_null()))
    key = {"creatives": "creative_id", "contexts": "context_id", "products": "product_id", "pairs": "pair_id"}[name]
    dup = pl.col(key).is_duplicated()
    if df.select(dup.any()).item():
        raise ContractError(src, key, "duplicate id", bad_rows(df, dup))
    if name == "pairs":
        for col, bad, what in [
            ("label", ~pl.col("label").is_in(["A", "B"]), "labels must be 'A' or 'B'"),
            ("split", ~pl.col("split").is_in(list(SPLITS)), f"splits must be one of {list(SPLITS)}"),
            ("gap", pl.col("gap").is_nan() | (pl.col("gap") <= 0), "CTR gaps must be positive numbers"),
            ("split", pl.col("split").n_unique().over("product_id") > 1,
             "a product's pairs must all be in one split (held-out products)"),
        ]:
            if df.select(bad.any()).item():
                raise ContractError(src, col, what, bad_rows(df, bad))


def sim_key(sim: dict, pairs: dict) -> str:
    blob = json.dumps({"v": DATA_VERSION, "sim": sim, "pairs": pairs}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_tables(dir: str | None = None, sim: dict | None = None, pairs: dict | None = None,
                cache_dir: str | None = None) -> CreativeTables:
    """The tables of a data folder (``dir``), or of the simulator with ``sim`` (fields of
    :class:`CreativeSimConfig`) and ``pairs`` (fields of :class:`PairConfig`), cached."""
    if dir is not None:
        root = Path(dir)
        if not root.is_dir():
            raise FileNotFoundError(f"creative data folder {root} does not exist "
                                    "(write one with `python -m ctr.creative.pairs --out DIR`)")
        tabs = {}
        for name in ("creatives", "contexts", "products", "pairs", "log"):
            f = root / f"{name}.parquet"
            if not f.exists():
                if name == "log":
                    continue
                raise FileNotFoundError(f"{f} is missing (a creative data folder needs {sorted(REQUIRED)})")
            tabs[name] = pl.read_parquet(f)
        for name, cols in REQUIRED.items():
            _check(tabs[name], name, cols, str(root))
        return CreativeTables(**tabs, source=str(root))
    sim, pairs = dict(sim or {}), dict(pairs or {})
    root = Path(cache_dir or ".cache/prepared") / "creative" / sim_key(sim, pairs)
    if not (root / "pairs.parquet").exists():
        kw = dict(sim)
        if isinstance(kw.get("attractiveness"), dict):
            kw["attractiveness"] = Attractiveness(**kw["attractiveness"])
        world = simulate_creatives(CreativeSimConfig(**kw))
        tmp = root.with_name(root.name + ".tmp")
        world.save(tmp)
        pc = PairConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pairs.items()})
        build_pairs(world.log, pc, source="simulated log").write_parquet(tmp / "pairs.parquet")
        (tmp / "config.json").write_text(json.dumps({"sim": sim, "pairs": pairs}, indent=1, default=str))
        if root.exists():  # a concurrent job finished first
            import shutil
            shutil.rmtree(tmp)
        else:
            tmp.rename(root)
    return load_tables(str(root))


def _contexts(t: CreativeTables) -> pl.DataFrame:
    """The contexts with their product's title (and colours, where the products have them) and the
    ``prompt`` every selector reads."""
    pcols = ["product_id", "title", *[c for c in ("colour", "alt_colour") if c in t.products.columns]]
    return (t.contexts.join(t.products.select(pcols), on="product_id", how="left")
            .with_columns(prompt_expr().alias("prompt")))


def _creative_rows(t: CreativeTables) -> pl.DataFrame:
    """``creative_id -> row`` (the creative's row number in ``t.creatives``)."""
    return pl.DataFrame({"creative_id": t.creatives["creative_id"],
                         "row": np.arange(t.creatives.height, dtype=np.int64)})


def pair_texts(t: CreativeTables, pairs: pl.DataFrame, cot: bool) -> pl.DataFrame:
    """``pairs`` with ``prompt``, ``target`` (CoT rationale or answer only) and ``row_a``/``row_b``
    (the creatives' row numbers in ``t.creatives``)."""
    ctx = _contexts(t)
    df = pairs.join(ctx.drop("product_id"), on="context_id", how="left", maintain_order="left")
    missing = df["query"].is_null()
    if missing.any():
        raise ContractError(f"{t.source}/pairs.parquet", "context_id", "no such context in contexts.parquet",
                            bad_rows(df, pl.col("query").is_null()))
    rows = _creative_rows(t)
    for side in ("a", "b"):
        df = df.join(rows.rename({"creative_id": f"creative_{side}", "row": f"row_{side}"}),
                     on=f"creative_{side}", how="left", maintain_order="left")
        if df[f"row_{side}"].null_count():
            raise ContractError(f"{t.source}/pairs.parquet", f"creative_{side}",
                                "no such creative in creatives.parquet", bad_rows(df, pl.col(f"row_{side}").is_null()))
    targets = _rationales(t, df) if cot else [answer_only(y) for y in df["label"].to_list()]
    return df.with_columns(pl.Series("target", targets))


def _rationales(t: CreativeTables, df: pl.DataFrame) -> list[str]:
    for name, cols in RATIONALE_COLUMNS.items():
        tab = getattr(t, name)
        have = [] if tab is None else tab.columns
        lack = [c for c in cols if c not in have]
        if lack:
            raise ContractError(f"{t.source}/{name}.parquet", lack[0],
                                "chain-of-thought targets need the creatives' attributes and the per-aspect "
                                f"utilities (missing {lack}); train with answer-only targets (sft.target=answer)")
    for name, cols in RATIONALE_COLUMNS.items():
        _check_values(getattr(t, name), name, cols, t.source)
    attrs = t.creatives.select(RATIONALE_COLUMNS["creatives"]).to_dicts()
    u = {(c, k): r for c, k, *r in t.log.select(RATIONALE_COLUMNS["log"]).iter_rows()}
    out = []
    for row in df.select("context_id", "row_a", "row_b", "creative_a", "creative_b", "intent", "query_colour",
                         "colour", "alt_colour", "label").iter_rows(named=True):
        ua = u.get((row["context_id"], row["creative_a"]))
        ub = u.get((row["context_id"], row["creative_b"]))
        if ua is None or ub is None:
            raise ContractError(f"{t.source}/log.parquet", "creative_id",
                                f"no utilities for context {row['context_id']} and creative "
                                f"{row['creative_a'] if ua is None else row['creative_b']}")
        qc = {"main": row["colour"], "alt": row["alt_colour"]}.get(row["query_colour"])
        out.append(rationale(attrs[row["row_a"]], attrs[row["row_b"]], dict(zip(ASPECTS, ua)),
                             dict(zip(ASPECTS, ub)), row["intent"], qc, row["label"]))
    return out


def _check_values(df: pl.DataFrame, name: str, cols: list[str], source: str) -> None:
    """No nulls in the rationale columns, and only level names the rationales know."""
    src = f"{source}/{name}.parquet"
    known = {**{k: v for k, v in CREATIVE_LEVELS.items() if k != "shown"}, "query_colour": ("main", "alt", "none")}
    for c in cols:
        if df[c].null_count():
            raise ContractError(src, c, "null value", bad_rows(df, pl.col(c).is_null()))
        if c in known:
            bad = ~pl.col(c).is_in(list(known[c]))
            if df.select(bad.any()).item():
                raise ContractError(src, c, f"unknown level (known: {list(known[c])})", bad_rows(df, bad))


class PairDataset(Dataset):
    """Pairs of one split as dict items; ``swapped`` shows every pair in the other order (label and
    target swapped too), for order-swap consistency."""

    def __init__(self, df: pl.DataFrame, swapped: bool = False):
        self.a = torch.tensor(df["row_a"].to_numpy())
        self.b = torch.tensor(df["row_b"].to_numpy())
        self.label = torch.as_tensor((df["label"] == "B").to_numpy().astype(np.int64))
        self.gap = torch.as_tensor(df["gap"].to_numpy().astype(np.float32))
        self.pair = torch.as_tensor(df["pair_id"].to_numpy().astype(np.int64))
        self.prompt = df["prompt"].to_list()
        self.target = df["target"].to_list()
        if swapped:
            self.a, self.b, self.label = self.b, self.a, 1 - self.label
            self.target = [swap_text(x) for x in self.target]

    def __len__(self) -> int:
        return len(self.a)

    def extend(self, other: "PairDataset") -> "PairDataset":
        """This dataset followed by ``other`` (e.g. the same pairs swapped)."""
        out = object.__new__(PairDataset)
        for k in ("a", "b", "label", "gap", "pair"):
            setattr(out, k, torch.cat([getattr(self, k), getattr(other, k)]))
        out.prompt, out.target = self.prompt + other.prompt, self.target + other.target
        return out

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict:
        ix = torch.as_tensor(idx)
        return {"a": self.a[ix], "b": self.b[ix], "label": self.label[ix], "gap": self.gap[ix],
                "pair": self.pair[ix], "prompt": [self.prompt[i] for i in idx],
                "target": [self.target[i] for i in idx]}


@dataclass
class CreativeImages:
    """The creatives' decoded ``pixels`` (``uint8 [N, 3, S, S]``) and, when computed, the frozen
    image tower's ``tokens`` (``float16 [N, T, C]``), row-aligned with ``CreativeTables.creatives``."""

    pixels: np.ndarray
    tokens: np.ndarray | None = None

    def token_rows(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """``float32 [len(rows), T, C]`` token features of the creatives at ``rows``."""
        return torch.from_numpy(np.asarray(self.tokens[rows.cpu().numpy()])).float().to(device)


class CreativeDataModule(L.LightningDataModule):
    """Batches of creative pairs for the selectors (train / val / test splits by product).

    ``cot``: targets are rationales (else answer only). ``tokens``: compute the image tower's token
    features (the small selector's input). ``both_orders``: train on every pair in both orders.
    ``bad_images`` / ``max_image_pixels``: what a creative whose image cannot be used does (see the
    module's docstring)."""

    def __init__(self, dir: str | None = None, sim: dict | None = None, pairs: dict | None = None,
                 image_size: int = 128, batch_size: int = 64, eval_batch_size: int = 256,
                 cot: bool = True, tokens: bool = True, both_orders: bool = False,
                 image_tower: torch.nn.Module | None = None, cache_dir: str | None = None,
                 limit_pairs: int | None = None, bad_images: str = "fail", max_image_pixels: int = MAX_PIXELS):
        super().__init__()
        check_image_settings(bad_images, max_image_pixels)
        self.bad_images, self.max_image_pixels = bad_images, max_image_pixels
        self.image_failures = ImageFailures(policy=bad_images)  # creatives left out ("skip")
        self.pairs_without_image = 0  # pairs left out with them
        self.dir, self.sim, self.pairs_cfg = dir, dict(sim or {}), dict(pairs or {})
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.cot, self.want_tokens, self.both_orders = cot, tokens, both_orders
        self.image_tower, self.cache_dir, self.limit_pairs = image_tower, cache_dir, limit_pairs
        self.tables: CreativeTables | None = None
        self.splits: dict[str, pl.DataFrame] = {}
        self.images: CreativeImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.tables is not None:
            return
        t = load_tables(self.dir, self.sim, self.pairs_cfg, self.cache_dir)
        df = pair_texts(t, t.pairs, self.cot)  # checked against every creative: rows as in the files
        decoded = self._decode(t)
        if len(decoded.failures):  # leave out the creatives with a bad image and the pairs showing one
            t, df = self._without(t, df, decoded)
        for s in ("train", "val", "test"):
            part = df.filter(pl.col("split") == s)
            self.splits[s] = part.head(self.limit_pairs) if self.limit_pairs else part
        if self.splits["train"].height == 0:
            raise ValueError(f"{t.source}: no training pairs (check the pair thresholds)")
        pixels = decoded.pixels
        tokens = None
        if self.want_tokens:
            from encoders.moon2.features import image_token_cache
            from encoders.towers import ImageTower

            tower = self.image_tower or ImageTower("efficientnet_lite0", pretrained=True,
                                                   img_size=self.image_size, freeze=True)
            # the images' fingerprint, the policy and pixel limit included (image cache version 2:
            # token caches keyed before the policy existed are not reused)
            tokens = image_token_cache(tower, pixels, decoded.fingerprint, self.cache_dir, self.image_size)
        self.images = CreativeImages(pixels, tokens)
        self.tables = t

    def _decode(self, t: CreativeTables):
        """The creatives' images under the bad-image policy (rows of ``creatives.parquet``); errors
        and failures name the ``creative_id``."""
        decoded = decode_images(t.creatives["image"].to_list(), self.image_size,
                                None if self.cache_dir is None else Path(self.cache_dir) / "images",
                                source=f"{t.source}/creatives.parquet", column="image",
                                ids=t.creatives["creative_id"].to_list(), id_name="creative_id",
                                bad_images=self.bad_images, max_pixels=self.max_image_pixels)
        self.image_failures = decoded.failures
        return decoded

    def _without(self, t: CreativeTables, df: pl.DataFrame, decoded) -> tuple[CreativeTables, pl.DataFrame]:
        """``t`` and the pair texts ``df`` without the creatives ``decoded`` left out: the creatives
        follow the decoded rows (``row_a`` / ``row_b`` renumbered), their pairs are dropped (counted);
        the log keeps them (:meth:`cells` joins on the kept creatives)."""
        bad = pl.Series(decoded.failures.item_ids, dtype=t.creatives["creative_id"].dtype).implode()
        shows_bad = pl.col("creative_a").is_in(bad) | pl.col("creative_b").is_in(bad)
        new_row = np.full(t.creatives.height, -1, np.int64)
        new_row[decoded.kept] = np.arange(len(decoded.kept))
        df = df.filter(~shows_bad)
        df = df.with_columns(pl.Series("row_a", new_row[df["row_a"].to_numpy()]),
                             pl.Series("row_b", new_row[df["row_b"].to_numpy()]))
        pairs = t.pairs.filter(~shows_bad)
        self.pairs_without_image = t.pairs.height - pairs.height
        return replace(t, creatives=t.creatives[decoded.kept], pairs=pairs), df

    def dataset(self, split: str, swapped: bool = False) -> PairDataset:
        return PairDataset(self.splits[split], swapped)

    def _loader(self, ds: Dataset, batch: int, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch, shuffle=shuffle, collate_fn=ds.collate)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        if self.both_orders:
            ds = ds.extend(self.dataset("train", swapped=True))
        return self._loader(ds, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, False)

    def cells(self, split: str) -> pl.DataFrame:
        """The log's (context, creative) cells of one split's products with impressions and clicks,
        plus the creative's row and the context's prompt: the pointwise baseline's training data."""
        t = self.tables
        if t.log is None:
            raise ValueError(f"{t.source}: the pointwise baseline needs log.parquet (impressions, clicks)")
        prods = self.splits[split].select("product_id").unique()
        log = check_log(t.log, f"{t.source}/log.parquet", ["product_id", "context_id"])
        return (log.join(prods, on="product_id").join(_creative_rows(t), on="creative_id")
                .join(_contexts(t).select("context_id", "query", "title", "prompt"), on="context_id", how="left"))

