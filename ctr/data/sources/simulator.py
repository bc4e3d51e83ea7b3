"""Visual-search advertising traffic simulator: the project's built-in default data set.

No public data set joins user clicks to product images, so this module generates a catalogue of
items with real pixels and visual-search ad traffic whose click model is known exactly. Later stages
(image encoders, image-aware CTR, exposure-bias debiasing, position-bias towers) are tested against
that known truth. Everything is vectorised with numpy (the only Python loop is one per item, to
render its image) and deterministic: :func:`simulate` derives one child generator per stage from
``np.random.SeedSequence(cfg.seed)``, so the same config gives byte-identical tables, PNG bytes
included.

Generative model (every weight is a :class:`SimConfig` field; defaults in brackets)
--------------------------------------------------------------------------------

World. Effect tables drawn once per seed: colour ``a_col ~ N(0, attr_colour_sd [0.5])`` (10),
pattern ``a_pat ~ N(0, attr_pattern_sd [0.4])`` (5), colour x pattern ``a_cp ~ N(0, attr_combo_sd
[0.6])`` (10x5), category ``a_cat ~ N(0, attr_category_sd [0.3])`` (8), shade ``a_sh ~ N(0,
attr_shade_sd [0.2])`` (3).

Items ``i = 0..n_items-1``. Category uniform over 8 silhouettes (:data:`images.CATEGORIES`),
colour uniform over the 10-colour palette, pattern with probabilities ``pattern_probs``
(plain, stripes, dots, checks, diagonal), shade (dark, normal, light) with ``shade_probs``.

* attractiveness ``A_i = a_col[c] + a_pat[p] + a_cp[c,p] + a_cat[k] + a_sh[s] + N(0,
  attr_noise_sd [0.2])``: almost entirely a function of what the image shows, so an image encoder
  can learn it while an ID embedding needs clicks on each item.
* popularity (the exposure prior, "already popular" items): rank items by the noisy
  attractiveness ``A_i + N(0, pop_noise_sd [0.8])``; ``pop_i = rank^-pop_zipf_s [1.0]``, normalised
  to sum to 1. ``lpop_i = log(n_items * pop_i)`` (0 for a uniform prior) is used below.
* image: :func:`images.render_item` (silhouette, colour, pattern, jitter), PNG, ``image_size``
  [64] pixels square. title: the true attributes ("light red striped dress") with 1-3 random filler
  words before/after.

Users ``u``. Segment ``g_u`` uniform over ``n_segments`` [8]; age group (5 groups) with fixed
probabilities. Taste logits over categories, colours and patterns:
``T_u = proto[g_u] + age_eff[age_u] + N(0, taste_user_sd [0.3])`` with segment prototypes
``~ N(0, taste_segment_sd [0.5])`` and age effects ``~ N(0, taste_age_sd [0.15])``, each block
centred per user. ``taste(u, i) = T_cat[u, k_i] + T_col[u, c_i] + T_pat[u, p_i]``. So the segment is
a cluster of the taste (informative, not complete) and the age group a weak signal.

Requests. User activity is Zipf: weights ``rank^-activity_zipf_s [0.6]`` over a random user order;
each user gets ``min_requests_per_user`` [2] requests plus a multinomial share of the rest.
Timestamps uniform over ``days`` [14] days from ``start_date`` [2024-01-01]; request ids follow time
order. The query item is drawn from the user's taste:
``P(q | u) ∝ exp(query_taste_temp [1.5] * taste(u, q) + query_pop_weight [0.3] * lpop_q)``.

Relevance (visual similarity of the query to a candidate, in [0, 1]):
``rel(q, i) = rel_w_category [0.5] [k_q = k_i] + rel_w_colour [0.3] S(c_q, c_i) +
rel_w_pattern [0.15] [p_q = p_i] + rel_w_shade [0.05] [s_q = s_i]`` with palette similarity
``S = exp(-||rgb_a - rgb_b||^2 / (2 colour_sim_scale^2))`` (``colour_sim_scale`` [60]).

Production exposure policy (the ``events`` log). K = ``k`` [10] candidates (never the query item)
are sampled without replacement with weight
``(rel(q, i) + policy_rel_floor [0.02])^policy_rel_power [4] * pop_i^policy_pop_power [1]``
(Gumbel/exponential top-K: exact successive sampling), then ranked by the noisy score
``rank_w_rel [2] * rel + rank_w_pop [0.3] * lpop + N(0, rank_noise_sd [0.5])``: position 1 is the
highest score, so popular items sit higher.

Random exposure policy (the ``events_random`` log, the unbiased yardstick). Same users (same
activity weights) and query process; ``n_random_requests`` requests with timestamps uniform over
the ``random_days`` [3] days right after the main log. The K candidates are sampled without
replacement with weight ``(1 - random_epsilon) / n_same_category * [k_q = k_i] + random_epsilon /
n_items`` (uniform within the query's category, or uniform over the catalogue with probability
``random_epsilon`` [0.1]), and shown in a uniformly random order.

Clicks (both logs, impression at position ``pos``):
``z = click_bias [-3.6] + w_rel [1.5] rel(q, i) + w_taste [1.0] taste(u, i) + w_attr [0.8] A_i
+ w_exposure [0.15] lpop_i``; with ``position_bias_mode = "examination"`` (default)
``true_ctr = pos^-position_eta * sigmoid(z)`` (``position_eta`` [0.7]: an examination probability),
with ``"logit"`` ``true_ctr = sigmoid(z - position_eta * log(pos))``. ``clicked ~
Bernoulli(true_ctr)``. The ``w_exposure`` term is the exposure bias ("herding" bonus of already
popular items), which the production policy confounds with position and relevance.

Real catalogues (``catalogue = "hm"`` or ``"fashion"``; default ``"procedural"``, everything above).
The items are ``n_items`` real products sampled by :func:`catalogues.load_catalogue` from
``$CTR_DATA_DIR`` (H&M: ``hm_fashion_images_sample/``; Fashion Product Images:
``fashion_product_images_small/``) instead of drawn attributes. Their metadata become the four
attributes: category = H&M ``product_type_name`` / Fashion ``articleType``, colour =
``colour_group_name`` / ``baseColour``, pattern = ``graphical_appearance_name`` / ``usage``, shade =
``perceived_colour_value_name`` / ``season`` (the 12, 12, 6 and 4 most frequent values; products of
other categories are not sampled, other colour/pattern/shade values form an ``"other"`` level). The
effect tables, the taste prototypes and the relevance are sized by and computed from those levels, so
attractiveness and taste are functions of the real attributes, and ``S`` is the same Gaussian kernel
on each colour level's mean RGB measured from its photos; the world, users, requests, both policies
and the click model are unchanged. ``image`` holds the original product photo (JPEG, 192x288 for
H&M, 60x80 for Fashion; ``image_size``, ``pattern_probs`` and ``shade_probs`` are ignored), ``title``
the real text (H&M ``prod_name`` + the first sentence of ``detail_desc``; Fashion
``productDisplayName``), ``category`` the real category name, and ``item_truth`` gains ``source_id``
(the original ``article_id`` / ``id``). The sample is drawn with the ``items`` generator, so it is
deterministic per seed. With ``"procedural"`` the output is exactly what it was before the knob.
A sampled product whose photo cannot be used (null, empty, undecodable, truncated, over
``max_image_pixels``) follows ``bad_images`` [``"fail"``]: ``"fail"`` stops with a
:class:`ContractError` naming ``images.parquet``, its ``jpeg`` column, the row and the product id;
``"skip"`` replaces the product by a further draw (the catalogue keeps ``n_items`` products; they
are reported in ``SimData.catalogue.image_failures`` and logged). Without a bad photo both policies
give the same data. The procedural catalogue ignores both knobs (its images always decode).

Outputs (see :class:`SimData`): ``items``, ``users``, ``events``, ``events_random``, plus the
ground truth ``item_truth`` and ``user_truth`` (for tests and analysis only, never features).

CLI: ``python -m ctr.data.sources.simulator --out DIR [--preset tiny|default|large] [--seed N]
[--n-items ...] [--catalogue procedural|hm|fashion] [--bad-images fail|skip]`` writes
``items.parquet``, ``users.parquet``, ``events.parquet``, ``events_random.parquet``,
``item_truth.parquet``, ``user_truth.parquet`` and ``sim_config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ctr.data.sources import images as img
from ctr.data.sources.catalogues import CATALOGUES, Catalogue, catalogue_files, load_catalogue

if TYPE_CHECKING:
    from ctr.data.prepare import Tables

SIM_VERSION = 1  # bump when the generative model changes, so prepared artefacts are rebuilt
#: ``SimConfig.bad_images`` values (those of ``encoders.images.BAD_IMAGE_POLICIES``, which imports torch)
BAD_IMAGE_POLICIES: tuple[str, ...] = ("fail", "skip")

AGE_GROUPS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_PROBS: tuple[float, ...] = (0.22, 0.30, 0.22, 0.15, 0.11)

_FILLER_BEFORE = (
    "new", "classic", "casual", "premium", "vintage", "trendy", "elegant", "basic", "summer",
    "winter", "women's", "men's", "unisex", "slim", "oversized", "soft",
)
_FILLER_AFTER = (
    "cotton", "sale", "2024", "bestseller", "limited edition", "free shipping", "gift",
    "everyday", "for work", "for travel", "lightweight", "eco",
)

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.Int64,
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "clicked": pl.Int8,
    "timestamp": pl.Datetime("us"),
    "position": pl.Int8,
    "query_item_id": pl.Int64,
    "true_ctr": pl.Float64,
}
ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int64,
    "category": pl.Utf8,
    "title": pl.Utf8,
    "image": pl.Binary,
}
USER_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64,
    "segment": pl.Utf8,
    "age_group": pl.Utf8,
}

OUTPUT_FILES = (
    "items.parquet",
    "users.parquet",
    "events.parquet",
    "events_random.parquet",
    "item_truth.parquet",
    "user_truth.parquet",
    "sim_config.json",
)


@dataclass
class SimConfig:
    """All knobs of the simulator. See the module docstring for the model they parameterise."""

    # --- sizes ---
    seed: int = 0
    n_items: int = 2000
    n_users: int = 3000
    n_requests: int = 60_000
    k: int = 10
    n_random_requests: int = 10_000
    days: float = 14.0
    random_days: float = 3.0
    image_size: int = 64
    start_date: str = "2024-01-01"
    # --- items ---
    pattern_probs: tuple[float, ...] = (0.32, 0.17, 0.17, 0.17, 0.17)
    shade_probs: tuple[float, float, float] = (0.25, 0.5, 0.25)
    attr_colour_sd: float = 0.5
    attr_pattern_sd: float = 0.4
    attr_combo_sd: float = 0.6
    attr_category_sd: float = 0.3
    attr_shade_sd: float = 0.2
    attr_noise_sd: float = 0.2
    pop_zipf_s: float = 1.0
    pop_noise_sd: float = 0.8
    # --- users ---
    n_segments: int = 8
    taste_segment_sd: float = 0.5
    taste_user_sd: float = 0.3
    taste_age_sd: float = 0.15
    activity_zipf_s: float = 0.6
    min_requests_per_user: int = 2
    # --- queries ---
    query_taste_temp: float = 1.5
    query_pop_weight: float = 0.3
    # --- relevance ---
    rel_w_category: float = 0.5
    rel_w_colour: float = 0.3
    rel_w_pattern: float = 0.15
    rel_w_shade: float = 0.05
    colour_sim_scale: float = 60.0
    # --- production exposure policy ---
    policy_rel_power: float = 4.0
    policy_pop_power: float = 1.0
    policy_rel_floor: float = 0.02
    rank_w_rel: float = 2.0
    rank_w_pop: float = 0.3
    rank_noise_sd: float = 0.5
    # --- random exposure policy ---
    random_epsilon: float = 0.1
    # --- clicks ---
    click_bias: float = -3.6
    w_rel: float = 1.5
    w_taste: float = 1.0
    w_attr: float = 0.8
    w_exposure: float = 0.15
    position_bias_mode: str = "examination"  # "examination" | "logit"
    position_eta: float = 0.7
    # --- catalogue ---
    catalogue: str = "procedural"  # "procedural" | "hm" | "fashion" (real photos from $CTR_DATA_DIR)
    # a real catalogue's bad photos: "fail" (error naming file, column, row, product) | "skip"
    # (replaced by further draws); max_image_pixels: width x height limit (None: the default of
    # encoders.images.MAX_PIXELS, 200 MP). Part of the fingerprint only when not the default.
    bad_images: str = "fail"
    max_image_pixels: int | None = None

    def __post_init__(self) -> None:
        self.pattern_probs = tuple(float(x) for x in self.pattern_probs)
        self.shade_probs = tuple(float(x) for x in self.shade_probs)
        if len(self.pattern_probs) != len(img.PATTERNS):
            raise ValueError(f"pattern_probs needs {len(img.PATTERNS)} entries")
        if len(self.shade_probs) != len(img.SHADES):
            raise ValueError(f"shade_probs needs {len(img.SHADES)} entries")
        if self.catalogue not in ("procedural", *CATALOGUES):
            raise ValueError(f"unknown catalogue {self.catalogue!r}; choose from "
                             f"{['procedural', *CATALOGUES]}")
        if self.bad_images not in BAD_IMAGE_POLICIES:  # encoders.images' policies (no torch import here)
            raise ValueError(f"bad_images={self.bad_images!r}; choose from {BAD_IMAGE_POLICIES}")
        mp = self.max_image_pixels
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp <= 0):
            raise ValueError(f"max_image_pixels={mp!r} must be a positive integer (width x height) or None")
        if self.position_bias_mode not in ("examination", "logit"):
            raise ValueError("position_bias_mode must be 'examination' or 'logit'")
        if self.k < 1 or self.k >= self.n_items:
            raise ValueError("need 1 <= k < n_items")
        if self.k > 127:
            raise ValueError("position is Int8: k must be <= 127")
        if self.n_requests < self.n_users * self.min_requests_per_user:
            raise ValueError("n_requests < n_users * min_requests_per_user")

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> "SimConfig":
        """A named size preset (``tiny``, ``default``, ``large``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        kw = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SimConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Size presets. ``tiny`` for tests; ``default`` for ``make run`` (600k impressions, ~20 requests per
#: user); ``large`` has 1.5M impressions (10k items, 15 requests per user).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_items=200, n_users=100, n_requests=2_000, n_random_requests=500, days=7.0,
                 random_days=2.0),
    "default": dict(n_items=2_000, n_users=3_000, n_requests=60_000, n_random_requests=10_000,
                    days=14.0, random_days=3.0),
    "large": dict(n_items=10_000, n_users=10_000, n_requests=150_000, n_random_requests=30_000,
                  days=28.0, random_days=4.0),
}


@dataclass
class SimData:
    """The simulated data set: the canonical tables, the ground truth and the config."""

    items: pl.DataFrame
    users: pl.DataFrame
    events: pl.DataFrame
    events_random: pl.DataFrame
    item_truth: pl.DataFrame
    config: SimConfig
    user_truth: pl.DataFrame | None = None
    timings: dict = field(default_factory=dict, compare=False, repr=False)
    #: the real catalogue (level names, colour similarity, ...) when ``config.catalogue`` is one;
    #: not saved by :meth:`save`
    catalogue: Catalogue | None = field(default=None, compare=False, repr=False)

    def save(self, out: str | Path) -> Path:
        """Write the tables (parquet) and ``sim_config.json`` into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.items.write_parquet(out / "items.parquet")
        self.users.write_parquet(out / "users.parquet")
        self.events.write_parquet(out / "events.parquet")
        self.events_random.write_parquet(out / "events_random.parquet")
        self.item_truth.write_parquet(out / "item_truth.parquet")
        if self.user_truth is not None:
            self.user_truth.write_parquet(out / "user_truth.parquet")
        (out / "sim_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return out


def load(path: str | Path) -> SimData:
    """Read a data set written by :meth:`SimData.save` (or the CLI)."""
    p = Path(path)
    cfg = SimConfig.from_dict(json.loads((p / "sim_config.json").read_text()))
    ut = p / "user_truth.parquet"
    return SimData(
        items=pl.read_parquet(p / "items.parquet"),
        users=pl.read_parquet(p / "users.parquet"),
        events=pl.read_parquet(p / "events.parquet"),
        events_random=pl.read_parquet(p / "events_random.parquet"),
        item_truth=pl.read_parquet(p / "item_truth.parquet"),
        config=cfg,
        user_truth=pl.read_parquet(ut) if ut.exists() else None,
    )


# ----------------------------------------------------------------------------------------------
# helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=1, keepdims=True)


def _topk_weighted(
    w_rows: np.ndarray, row_of_req: np.ndarray, k: int, exclude: np.ndarray,
    rng: np.random.Generator, chunk_elems: int = 8_000_000,
) -> np.ndarray:
    """Sample ``k`` distinct columns per request without replacement, ∝ ``w_rows[row_of_req[r]]``.

    Exact successive sampling via exponential races: the k smallest ``E_j / w_j`` (largest
    ``w_j / E_j``) with ``E ~ Exp(1)``. ``exclude[r]`` (a column) gets weight 0. Returns [R, k] in
    race order (the order successive sampling would draw them).
    """
    n_req = len(row_of_req)
    n = w_rows.shape[1]
    out = np.empty((n_req, k), dtype=np.int64)
    step = max(1, chunk_elems // n)
    for a in range(0, n_req, step):
        b = min(n_req, a + step)
        w = w_rows[row_of_req[a:b]]  # gather (copy), float32
        w[np.arange(b - a), exclude[a:b]] = 0.0
        keys = w / (rng.standard_exponential(size=w.shape, dtype=np.float32) + np.float32(1e-30))
        part = np.argpartition(keys, n - k, axis=1)[:, n - k:]
        pk = np.take_along_axis(keys, part, axis=1)
        order = np.argsort(-pk, axis=1, kind="stable")
        out[a:b] = np.take_along_axis(part, order, axis=1)
    return out


def _sample_rows(probs_fn, n_rows: int, row_of_req: np.ndarray, rng: np.random.Generator,
                 n_cols: int, chunk_rows: int) -> np.ndarray:
    """One categorical draw per request from row ``row_of_req[r]`` of a row-stochastic matrix that
    ``probs_fn(lo, hi)`` builds chunk by chunk (rows lo..hi-1)."""
    out = np.empty(len(row_of_req), dtype=np.int64)
    order = np.argsort(row_of_req, kind="stable")
    rows_sorted = row_of_req[order]
    u_all = rng.random(len(row_of_req))
    bounds = np.searchsorted(rows_sorted, np.arange(0, n_rows + chunk_rows, chunk_rows))
    for ci, lo in enumerate(range(0, n_rows, chunk_rows)):
        hi = min(n_rows, lo + chunk_rows)
        s, e = bounds[ci], bounds[ci + 1]
        if s == e:
            continue
        p = probs_fn(lo, hi)
        cdf = np.cumsum(p, axis=1)
        cdf /= cdf[:, -1:]
        local = rows_sorted[s:e] - lo
        # search within each row: offset rows by their index so one flat searchsorted works
        flat = (cdf + np.arange(hi - lo)[:, None]).ravel()
        pos = np.searchsorted(flat, local + u_all[order[s:e]], side="right")
        col = np.clip(pos - local * n_cols, 0, n_cols - 1)
        out[order[s:e]] = col
    return out


# ----------------------------------------------------------------------------------------------
# the simulator


def simulate(cfg: SimConfig | None = None) -> SimData:
    """Generate a catalogue with images, users, and two logs of visual-search ad traffic."""
    cfg = cfg or SimConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    names = ("world", "items", "images", "users", "requests", "policy", "clicks", "random")
    rngs = dict(zip(names, (np.random.default_rng(s) for s in
                            np.random.SeedSequence(cfg.seed).spawn(len(names)))))
    n, k = cfg.n_items, cfg.k
    real: Catalogue | None = None
    if cfg.catalogue == "procedural":
        cat_names = img.CATEGORIES
        n_cat, n_col, n_pat, n_sh = len(img.CATEGORIES), len(img.COLOURS), len(img.PATTERNS), len(img.SHADES)
    else:  # a real catalogue: sampled with the items generator, before any other draw from it
        t = time.perf_counter()
        real = load_catalogue(cfg.catalogue, n, rngs["items"], colour_sim_scale=cfg.colour_sim_scale,
                              bad_images=cfg.bad_images, max_pixels=cfg.max_image_pixels)
        timings["catalogue"] = time.perf_counter() - t
        cat_names = tuple(real.categories)
        n_cat, n_col = len(real.categories), len(real.colours)
        n_pat, n_sh = len(real.patterns), len(real.shades)

    # ---- world: effect tables ----
    rw = rngs["world"]
    a_col = rw.normal(0, cfg.attr_colour_sd, n_col)
    a_pat = rw.normal(0, cfg.attr_pattern_sd, n_pat)
    a_cp = rw.normal(0, cfg.attr_combo_sd, (n_col, n_pat))
    a_cat = rw.normal(0, cfg.attr_category_sd, n_cat)
    a_sh = rw.normal(0, cfg.attr_shade_sd, n_sh)
    proto_cat = rw.normal(0, cfg.taste_segment_sd, (cfg.n_segments, n_cat))
    proto_col = rw.normal(0, cfg.taste_segment_sd, (cfg.n_segments, n_col))
    proto_pat = rw.normal(0, cfg.taste_segment_sd, (cfg.n_segments, n_pat))
    age_cat = rw.normal(0, cfg.taste_age_sd, (len(AGE_GROUPS), n_cat))
    age_col = rw.normal(0, cfg.taste_age_sd, (len(AGE_GROUPS), n_col))
    age_pat = rw.normal(0, cfg.taste_age_sd, (len(AGE_GROUPS), n_pat))

    # ---- items ----
    ri = rngs["items"]
    if real is None:
        cat = ri.integers(0, n_cat, n)
        col = ri.integers(0, n_col, n)
        pat = ri.choice(n_pat, size=n, p=np.asarray(cfg.pattern_probs) / sum(cfg.pattern_probs))
        sh = ri.choice(n_sh, size=n, p=np.asarray(cfg.shade_probs) / sum(cfg.shade_probs))
    else:
        cat, col, pat, sh = real.cat, real.col, real.pat, real.sh
    attract = (a_col[col] + a_pat[pat] + a_cp[col, pat] + a_cat[cat] + a_sh[sh]
               + ri.normal(0, cfg.attr_noise_sd, n))
    noisy = attract + ri.normal(0, cfg.pop_noise_sd, n)
    pop_rank = np.empty(n, dtype=np.int64)
    pop_rank[np.argsort(-noisy, kind="stable")] = np.arange(1, n + 1)
    pop = pop_rank.astype(np.float64) ** -cfg.pop_zipf_s
    pop /= pop.sum()
    lpop = np.log(n * pop)
    if real is None:
        titles = _titles(cat, col, pat, sh, ri)
        t = time.perf_counter()
        pngs = img.render_catalogue(cat, col, pat, sh, rngs["images"], size=cfg.image_size)
        timings["images"] = time.perf_counter() - t
    else:
        titles, pngs = real.titles, real.images  # the real photos (JPEG), untouched

    items = pl.DataFrame(
        {
            "item_id": pl.Series(np.arange(n, dtype=np.int64)),
            "category": pl.Series(np.asarray(cat_names, dtype=object)[cat].tolist(), dtype=pl.Utf8),
            "title": pl.Series(titles, dtype=pl.Utf8),
            "image": pl.Series(pngs, dtype=pl.Binary),
        }
    )
    item_truth = pl.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int64),
            "category_idx": cat.astype(np.int64),
            "colour_idx": col.astype(np.int64),
            "pattern_idx": pat.astype(np.int64),
            "shade_idx": sh.astype(np.int64),
            "attractiveness": attract.astype(np.float64),
            "popularity": pop,
            "pop_rank": pop_rank,
        }
    )
    if real is not None:
        item_truth = item_truth.with_columns(source_id=pl.Series(real.source_ids, dtype=pl.Utf8))

    # ---- users ----
    ru = rngs["users"]
    nu = cfg.n_users
    seg = ru.integers(0, cfg.n_segments, nu)
    age = ru.choice(len(AGE_GROUPS), size=nu, p=np.asarray(AGE_PROBS))
    t_cat = _centre(proto_cat[seg] + age_cat[age] + ru.normal(0, cfg.taste_user_sd, (nu, n_cat)))
    t_col = _centre(proto_col[seg] + age_col[age] + ru.normal(0, cfg.taste_user_sd, (nu, n_col)))
    t_pat = _centre(proto_pat[seg] + age_pat[age] + ru.normal(0, cfg.taste_user_sd, (nu, n_pat)))
    activity = np.empty(nu)
    activity[ru.permutation(nu)] = np.arange(1, nu + 1, dtype=np.float64) ** -cfg.activity_zipf_s
    activity /= activity.sum()
    users = pl.DataFrame(
        {
            "user_id": pl.Series(np.arange(nu, dtype=np.int64)),
            "segment": pl.Series([f"seg{j}" for j in seg.tolist()], dtype=pl.Utf8),
            "age_group": pl.Series(np.asarray(AGE_GROUPS, dtype=object)[age].tolist(), dtype=pl.Utf8),
        }
    )
    user_truth = pl.DataFrame(
        {
            "user_id": np.arange(nu, dtype=np.int64),
            "segment_idx": seg.astype(np.int64),
            "age_idx": age.astype(np.int64),
            "activity": activity,
            "taste_category": t_cat,
            "taste_colour": t_col,
            "taste_pattern": t_pat,
        }
    )

    def taste(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return t_cat[u, cat[i]] + t_col[u, col[i]] + t_pat[u, pat[i]]

    # ---- relevance by query group (category, colour, pattern, shade) ----
    csim = img.colour_similarity(cfg.colour_sim_scale) if real is None else real.csim
    group = ((cat * n_col + col) * n_pat + pat) * n_sh + sh
    groups, g_item = np.unique(group, return_inverse=True)  # g_item: group row of each item
    g_sh = groups % n_sh
    g_pat = (groups // n_sh) % n_pat
    g_col = (groups // (n_sh * n_pat)) % n_col
    g_cat = groups // (n_sh * n_pat * n_col)
    rel_g = (cfg.rel_w_category * (g_cat[:, None] == cat[None, :])
             + cfg.rel_w_colour * csim[g_col][:, col]
             + cfg.rel_w_pattern * (g_pat[:, None] == pat[None, :])
             + cfg.rel_w_shade * (g_sh[:, None] == sh[None, :]))  # [G, n]
    logw = (cfg.policy_rel_power * np.log(rel_g + cfg.policy_rel_floor)
            + cfg.policy_pop_power * np.log(pop)[None, :])
    w_prod = np.exp(logw - logw.max(axis=1, keepdims=True)).astype(np.float32)
    same_cat = (g_cat[:, None] == cat[None, :])
    n_same = same_cat.sum(axis=1, keepdims=True)
    w_rand = ((1.0 - cfg.random_epsilon) * same_cat / n_same + cfg.random_epsilon / n).astype(np.float32)

    # ---- requests (users, timestamps, queries) ----
    rr = rngs["requests"]
    counts = cfg.min_requests_per_user + rr.multinomial(
        cfg.n_requests - nu * cfg.min_requests_per_user, activity)
    req_user = np.repeat(np.arange(nu), counts)
    day_us = 86_400 * 1_000_000
    req_ts = rr.integers(0, int(cfg.days * day_us), cfg.n_requests)
    order = np.lexsort((req_user, req_ts))
    req_user, req_ts = req_user[order], req_ts[order]
    rnd_user = rr.choice(nu, size=cfg.n_random_requests, p=activity)
    rnd_ts = int(cfg.days * day_us) + rr.integers(0, int(cfg.random_days * day_us), cfg.n_random_requests)
    order = np.lexsort((rnd_user, rnd_ts))
    rnd_user, rnd_ts = rnd_user[order], rnd_ts[order]

    all_user = np.concatenate([req_user, rnd_user])

    def query_probs(lo: int, hi: int) -> np.ndarray:
        u = np.arange(lo, hi)
        z = cfg.query_taste_temp * (t_cat[u][:, cat] + t_col[u][:, col] + t_pat[u][:, pat])
        z += cfg.query_pop_weight * lpop[None, :]
        z -= z.max(axis=1, keepdims=True)
        return np.exp(z)

    t = time.perf_counter()
    all_query = _sample_rows(query_probs, nu, all_user, rr, n, chunk_rows=max(1, 4_000_000 // n))
    req_query, rnd_query = all_query[: cfg.n_requests], all_query[cfg.n_requests:]
    timings["queries"] = time.perf_counter() - t

    # ---- production policy: candidates + noisy ranking ----
    t = time.perf_counter()
    rp = rngs["policy"]
    cand = _topk_weighted(w_prod, g_item[req_query], k, req_query, rp)
    rel_c = rel_g[g_item[req_query][:, None], cand]
    score = cfg.rank_w_rel * rel_c + cfg.rank_w_pop * lpop[cand] + rp.normal(0, cfg.rank_noise_sd, cand.shape)
    cand = np.take_along_axis(cand, np.argsort(-score, axis=1, kind="stable"), axis=1)
    timings["policy"] = time.perf_counter() - t

    # ---- random policy: same-category (or ε-uniform) candidates, random order ----
    t = time.perf_counter()
    rq = rngs["random"]
    rcand = _topk_weighted(w_rand, g_item[rnd_query], k, rnd_query, rq)
    perm = np.argsort(rq.random(rcand.shape), axis=1)
    rcand = np.take_along_axis(rcand, perm, axis=1)
    timings["random_policy"] = time.perf_counter() - t

    # ---- clicks ----
    t = time.perf_counter()
    rc = rngs["clicks"]

    def log_frame(req_ids, users_, ts, queries, slate, rng) -> pl.DataFrame:
        r = len(req_ids)
        u = np.repeat(users_, k)
        q = np.repeat(queries, k)
        i = slate.ravel()
        pos = np.tile(np.arange(1, k + 1), r)
        z = (cfg.click_bias
             + cfg.w_rel * rel_g[g_item[q], i]
             + cfg.w_taste * taste(u, i)
             + cfg.w_attr * attract[i]
             + cfg.w_exposure * lpop[i])
        if cfg.position_bias_mode == "examination":
            p = pos.astype(np.float64) ** -cfg.position_eta * _sigmoid(z)
        else:
            p = _sigmoid(z - cfg.position_eta * np.log(pos))
        clicked = (rng.random(len(p)) < p).astype(np.int8)
        start = np.datetime64(cfg.start_date, "us")
        stamps = start + np.repeat(ts, k).astype("timedelta64[us]")
        return pl.DataFrame(
            {
                "request_id": pl.Series(np.repeat(req_ids, k).astype(np.int64)),
                "user_id": pl.Series(u.astype(np.int64)),
                "item_id": pl.Series(i.astype(np.int64)),
                "clicked": pl.Series(clicked, dtype=pl.Int8),
                "timestamp": pl.Series(stamps).cast(pl.Datetime("us")),
                "position": pl.Series(pos.astype(np.int8), dtype=pl.Int8),
                "query_item_id": pl.Series(q.astype(np.int64)),
                "true_ctr": pl.Series(p.astype(np.float64)),
            }
        )

    events = log_frame(np.arange(cfg.n_requests), req_user, req_ts, req_query, cand, rc)
    events_random = log_frame(cfg.n_requests + np.arange(cfg.n_random_requests), rnd_user, rnd_ts,
                              rnd_query, rcand, rc)
    timings["clicks"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    return SimData(items=items, users=users, events=events, events_random=events_random,
                   item_truth=item_truth, config=cfg, user_truth=user_truth, timings=timings,
                   catalogue=real)


def _titles(cat, col, pat, sh, rng: np.random.Generator) -> list[str]:
    """Product titles from the true attributes plus 1-3 filler words (vectorised draws)."""
    n = len(cat)
    n_before = rng.integers(0, 3, n)  # 0..2 words before
    n_after = rng.integers(0, 2, n)  # 0..1 words after
    n_after = np.where(n_before + n_after == 0, 1, n_after)
    fb = rng.integers(0, len(_FILLER_BEFORE), (n, 2))
    fa = rng.integers(0, len(_FILLER_AFTER), n)
    out = []
    for j in range(n):
        words = []
        if n_before[j] >= 1:
            words.append(_FILLER_BEFORE[fb[j, 0]])
        if n_before[j] == 2 and fb[j, 1] != fb[j, 0]:
            words.append(_FILLER_BEFORE[fb[j, 1]])
        if img.SHADES[sh[j]]:
            words.append(img.SHADES[sh[j]])
        words.append(img.COLOURS[col[j]])
        if pat[j] != 0:
            words.append(img.PATTERN_WORDS[pat[j]])
        words.append(img.CATEGORIES[cat[j]])
        if n_after[j]:
            words.append(_FILLER_AFTER[fa[j]])
        out.append(" ".join(words))
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ctr-simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--n-items", type=int, default=None)
    ap.add_argument("--n-users", type=int, default=None)
    ap.add_argument("--n-requests", type=int, default=None)
    ap.add_argument("--k", type=int, default=None, help="slate size")
    ap.add_argument("--n-random-requests", type=int, default=None)
    ap.add_argument("--days", type=float, default=None)
    ap.add_argument("--random-days", type=float, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--catalogue", choices=["procedural", *CATALOGUES], default=None,
                    help="item catalogue: procedural images (default) or real photos from $CTR_DATA_DIR")
    ap.add_argument("--bad-images", choices=list(BAD_IMAGE_POLICIES), default=None,
                    help="a real catalogue's bad photos: fail (default) or skip (replaced by other products)")
    ap.add_argument("--max-image-pixels", type=int, default=None,
                    help="width x height over which a real photo is bad (default 200,000,000)")
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    over = {k: getattr(args, k) for k in ("seed", "n_items", "n_users", "n_requests", "k",
                                          "n_random_requests", "days", "random_days", "image_size",
                                          "catalogue", "bad_images", "max_image_pixels")}
    cfg = SimConfig.preset(args.preset, **over)
    data = simulate(cfg)
    out = data.save(args.out)
    if not args.quiet:
        ev = data.events
        print(
            f"wrote {out}: {data.items.height} items, {data.users.height} users, "
            f"{ev.height} impressions (CTR {ev['clicked'].mean():.4f}), "
            f"{data.events_random.height} random-policy impressions "
            f"(CTR {data.events_random['clicked'].mean():.4f}) in {data.timings['total']:.1f}s"
        )
    return out


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------------------------
# Source adapter: the simulator as a data source of `ctr.data.prepare`.
@dataclass
class SimulatorSource:
    """Generates the data on load; its fingerprint is the generator config, so a prepared
    artefact is reused without simulating again (for a real catalogue, ``overrides:
    {catalogue: hm}``, the catalogue's files are part of it). The random-exposure log becomes the
    extra evaluation split ``test_random``.

    ``bad_images`` / ``max_image_pixels``: :class:`SimConfig`'s fields of the same names (a real
    catalogue's bad photos); keys of ``overrides`` take precedence over them."""

    preset: str = "default"
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    name: str = "sim"
    bad_images: str = "fail"
    max_image_pixels: int | None = None

    def config(self) -> SimConfig:
        policy = {"bad_images": self.bad_images, "max_image_pixels": self.max_image_pixels}
        return SimConfig.preset(self.preset, seed=self.seed, **{**policy, **self.overrides})

    def describe(self) -> dict:
        """What identifies the generated data (the encoders record the same for their items). The
        bad-image policy is left out: data that load are the same under either policy (a bad photo
        stops ``"fail"``), and the encoders' item metadata do not record it."""
        return {"source": self.name, "preset": self.preset, "seed": self.seed, "overrides": dict(self.overrides)}

    def fingerprint(self) -> str:
        cfg = self.config().to_dict()
        # the bad-image settings enter only when they differ from the defaults, so the fingerprints
        # of existing data stay (as ctr.data.prepare's settings_fingerprint does for max_vocab)
        if cfg["bad_images"] == "fail":
            del cfg["bad_images"]
        if cfg["max_image_pixels"] is not None:
            from encoders.images import MAX_PIXELS  # imports torch: only when a limit is set

            if cfg["max_image_pixels"] == MAX_PIXELS:
                del cfg["max_image_pixels"]
        else:
            del cfg["max_image_pixels"]
        if cfg["catalogue"] == "procedural":
            del cfg["catalogue"]  # the procedural data predate the knob: keep their fingerprints
        else:  # a real catalogue: its files are inputs too
            from ctr.data.prepare import file_fingerprint

            cfg["catalogue_files"] = file_fingerprint(*catalogue_files(cfg["catalogue"]))
        blob = json.dumps({"config": cfg, "version": SIM_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def load(self) -> "Tables":
        from ctr.data.prepare import Tables

        d = simulate(self.config())
        cat = d.config.catalogue
        where = f"simulator({self.preset}, seed={self.seed}{'' if cat == 'procedural' else ', ' + cat})"
        return Tables(events=d.events, items=d.items, users=d.users,
                      extra_events={"test_random": d.events_random},
                      names={"events": f"{where}.events", "items": f"{where}.items",
                             "users": f"{where}.users", "test_random": f"{where}.events_random"})
