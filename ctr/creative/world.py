"""Simulated advertising creatives with a known attractiveness model (Creative4U's data).

A *creative* is one rendering of a product for an ad slot. Each product gets several creatives that
differ in five visible aspects, and each product is searched under a few *contexts* (a query with
an intent). Every (product, context, creative) cell gets an impression count and clicks from a
known click model, so that pairs of creatives and their true winners exist.

Creative aspects (level names in brackets, in index order):

* ``framing`` (close, medium, far): the product's scale in the frame (the paper's *product subject*);
* ``background`` (white, colour, scene): flat white, a flat pastel tint, or a lifestyle scene
  (gradient, floor band, furniture blocks);
* ``brightness`` (dark, normal, bright): a global exposure factor (also *product subject*);
* ``clutter`` (none, some, heavy): 0, 2 or 5 small props of other categories around the product
  (the paper's *layout*);
* ``text`` (none, banner, dense): no overlay, a promotional banner along the bottom, or a block of
  dense copy over the image (*text-in-image*);
* ``shown`` (main, alt): the product in its title colour or in its alternative colour variant
  (*relevance to the query and title*).

Contexts. ``intent`` (browse, deal, inspiration) is expressed by the query's words ("sale",
"outfit ideas", ...); the query names the product's category and, with probabilities
``query_colour_probs``, its main colour, its alternative colour or no colour.

Click model. ``ctr = sigmoid(logit(base_ctr) + b_product + u(creative, context) + e)`` with a
product effect ``b ~ N(0, product_sd)``, creative noise ``e ~ N(0, creative_noise_sd)`` and the
utility ``u``, the sum of the aspect contributions of :meth:`Attractiveness.contributions` (each
aspect's effect, some depending on the intent, relevance on the query's colour). Impressions per
cell are log-normal around ``impressions_mean``; clicks are binomial. Everything is deterministic
given ``seed`` (one child generator per stage).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFont

from ctr.data.sources import images as img

FRAMINGS = ("close", "medium", "far")
BACKGROUNDS = ("white", "colour", "scene")
BRIGHTNESS = ("dark", "normal", "bright")
CLUTTER = ("none", "some", "heavy")
TEXTS = ("none", "banner", "dense")
SHOWN = ("main", "alt")
INTENTS = ("browse", "deal", "inspiration")
ASPECTS = ("relevance", "text", "layout", "subject", "background")
#: column name -> level names, for every creative attribute
CREATIVE_LEVELS: dict[str, tuple[str, ...]] = {
    "framing": FRAMINGS, "background": BACKGROUNDS, "brightness": BRIGHTNESS, "clutter": CLUTTER,
    "text": TEXTS, "shown": SHOWN,
}

_INTENT_WORDS = {
    "browse": ("", "new", "women", "men", "online"),
    "deal": ("sale", "cheap", "discount", "deal", "offer"),
    "inspiration": ("outfit ideas", "style inspiration", "lookbook", "how to wear", "trend"),
}
_FRAME_SCALE = {"close": (0.9, 1.0), "medium": (0.62, 0.72), "far": (0.36, 0.44)}
_FRAME_SHIFT = {"close": 0.03, "medium": 0.1, "far": 0.22}
_N_PROPS = {"none": 0, "some": 2, "heavy": 5}
_BRIGHT = {"dark": 0.55, "normal": 1.0, "bright": 1.35}
_BANNERS = ("SALE -30%", "DEAL -50%", "NEW IN", "FREE SHIP")
_COPY = ("LIMITED OFFER", "BEST PRICE", "BUY 2 GET 1", "FREE RETURNS", "TOP RATED", "HOT ITEM")


@dataclass
class Attractiveness:
    """The known utility of a creative in a context (logit units), one term per aspect.

    Each field is a table ``level -> effect``; ``*_by_intent`` fields override an effect for an
    intent (``{intent: {level: effect}}``)."""

    relevance_match: float = 0.5       # query names a colour, the creative shows it
    relevance_mismatch: float = -0.5   # query names a colour, the creative shows another one
    relevance_alt_no_query: float = -0.15  # no colour in the query, creative not in the title colour
    text: dict = field(default_factory=lambda: {"none": 0.0, "banner": -0.15, "dense": -0.5})
    text_by_intent: dict = field(default_factory=lambda: {"deal": {"banner": 0.6, "dense": -0.1}})
    clutter: dict = field(default_factory=lambda: {"none": 0.0, "some": -0.25, "heavy": -0.6})
    clutter_by_intent: dict = field(default_factory=lambda: {"inspiration": {"some": 0.1, "heavy": -0.3}})
    framing: dict = field(default_factory=lambda: {"close": 0.3, "medium": 0.1, "far": -0.4})
    framing_by_intent: dict = field(default_factory=lambda: {"inspiration": {"far": -0.1}})
    brightness: dict = field(default_factory=lambda: {"dark": -0.4, "normal": 0.0, "bright": -0.15})
    background: dict = field(default_factory=lambda: {"white": 0.0, "colour": 0.1, "scene": -0.2})
    background_by_intent: dict = field(default_factory=lambda: {"inspiration": {"scene": 0.5}})

    def _table(self, name: str, levels: tuple[str, ...]) -> np.ndarray:
        """``[n_intents, n_levels]`` effects of one attribute."""
        base = getattr(self, name)
        over = getattr(self, f"{name}_by_intent", {}) or {}
        return np.array([[float((over.get(it) or {}).get(lv, base[lv])) for lv in levels] for it in INTENTS])

    def contributions(self, creative: dict[str, np.ndarray], intent: np.ndarray,
                      query_colour: np.ndarray) -> dict[str, np.ndarray]:
        """Per-aspect utility ``{aspect: float [n]}`` of creatives (attribute level indices, one row
        per (creative, context)) under their contexts' ``intent`` index and ``query_colour``
        (0 main, 1 alt, -1 none)."""
        shown = creative["shown"]
        rel = np.where(query_colour < 0, np.where(shown == 1, self.relevance_alt_no_query, 0.0),
                       np.where(shown == query_colour, self.relevance_match, self.relevance_mismatch))
        out = {"relevance": rel}
        out["text"] = self._table("text", TEXTS)[intent, creative["text"]]
        out["layout"] = self._table("clutter", CLUTTER)[intent, creative["clutter"]]
        out["subject"] = (self._table("framing", FRAMINGS)[intent, creative["framing"]]
                          + self._table("brightness", BRIGHTNESS)[intent, creative["brightness"]])
        out["background"] = self._table("background", BACKGROUNDS)[intent, creative["background"]]
        return out


@dataclass
class CreativeSimConfig:
    """Knobs of :func:`simulate_creatives` (see the module docstring)."""

    seed: int = 0
    n_products: int = 1500
    creatives_per_product: int = 4
    contexts_per_product: int = 2
    image_size: int = 128
    base_ctr: float = 0.03
    product_sd: float = 0.3
    creative_noise_sd: float = 0.1
    impressions_mean: float = 3000.0
    impressions_log_sd: float = 0.6
    alt_shown_prob: float = 0.3
    query_colour_probs: tuple[float, float, float] = (0.5, 0.2, 0.3)  # main, alt, none
    attractiveness: Attractiveness = field(default_factory=Attractiveness)


@dataclass
class CreativeWorld:
    """``products`` (one row per product), ``creatives`` (attributes and PNG ``image`` bytes),
    ``contexts`` (query, intent) and ``log`` (impressions and clicks per (context, creative), with
    the true CTR and the per-aspect utilities the click model used)."""

    products: pl.DataFrame
    creatives: pl.DataFrame
    contexts: pl.DataFrame
    log: pl.DataFrame
    config: CreativeSimConfig

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("products", "creatives", "contexts", "log"):
            getattr(self, name).write_parquet(out / f"{name}.parquet")
        return out


def _scene(size: int, rng: np.random.Generator) -> np.ndarray:
    """A lifestyle-scene background: a vertical wall gradient, a floor band and furniture blocks."""
    top, bottom = rng.uniform(120, 235, size=3), rng.uniform(70, 200, size=3)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    floor = int(size * rng.uniform(0.68, 0.8))
    arr[floor:] = rng.uniform(60, 160, size=3)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 16, size=2)
        w, h = rng.integers(10, size // 2, size=2)
        arr[y0:y0 + h, x0:x0 + w] = rng.uniform(40, 220, size=3)
    return arr


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def render_creative(category: int, rgb: np.ndarray, pattern: int, attrs: dict[str, str],
                    rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Render one creative of a product (category index, main RGB, pattern index) with the aspect
    levels in ``attrs`` (``framing``, ``background``, ``brightness``, ``clutter``, ``text``)."""
    bg = attrs["background"]
    if bg == "white":
        arr = np.full((size, size, 3), 248.0) + rng.uniform(-4, 4, size=3)
    elif bg == "colour":
        arr = np.broadcast_to(rng.uniform(60, 255, size=3) * 0.45 + 255 * 0.55, (size, size, 3)).copy()
    else:
        arr = _scene(size, rng)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    lo, hi = _FRAME_SCALE[attrs["framing"]]
    s = rng.uniform(lo, hi)
    shift = rng.uniform(-1, 1, size=2) * _FRAME_SHIFT[attrs["framing"]]
    img.paint_silhouette(arr, category, rgb, pattern, s, shift, rng)
    for _ in range(_N_PROPS[attrs["clutter"]]):  # props of other categories, possibly occluding
        other = int(rng.choice([c for c in range(len(img.CATEGORIES)) if c != category]))
        centre = rng.uniform(-0.38, 0.38, size=2)
        img.paint_silhouette(arr, other, img.shaded_rgb(int(rng.integers(len(img.COLOURS)))),
                             int(rng.integers(len(img.PATTERNS))), rng.uniform(0.2, 0.3), centre, rng)
    arr = np.clip(arr.astype(np.float64) * _BRIGHT[attrs["brightness"]], 0, 255).astype(np.uint8)
    out = Image.fromarray(arr, mode="RGB")
    text = attrs["text"]
    if text != "none":
        draw = ImageDraw.Draw(out)
        if text == "banner":
            h = int(size * 0.2)
            colour = (220, 30, 30) if rng.random() < 0.5 else (250, 210, 20)
            draw.rectangle([0, size - h, size, size], fill=colour)
            draw.text((size * 0.06, size - h * 0.85), str(rng.choice(_BANNERS)), fill=(255, 255, 255),
                      font=_font(max(8, int(h * 0.7))))
        else:
            font = _font(max(7, size // 12))
            lines = rng.choice(_COPY, size=4, replace=False)
            draw.rectangle([0, 0, size, int(size * 0.5)], fill=(20, 20, 20))
            for k, line in enumerate(lines):
                draw.text((3, 2 + k * size * 0.12), str(line), fill=(255, 255, 255), font=font)
    return out


def _title(cat: int, col: int, pat: int, shade: int) -> str:
    words = [img.SHADES[shade], img.COLOURS[col], img.PATTERN_WORDS[pat], img.CATEGORIES[cat]]
    return " ".join(w for w in words if w)


def simulate_creatives(cfg: CreativeSimConfig | None = None) -> CreativeWorld:
    """Products, their creatives (rendered), search contexts and the impression log."""
    cfg = cfg or CreativeSimConfig()
    if cfg.creatives_per_product < 2:
        raise ValueError("creatives_per_product must be at least 2 to form pairs")
    rng_prod, rng_crea, rng_img, rng_ctx, rng_log = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5))
    n, k, m = cfg.n_products, cfg.creatives_per_product, cfg.contexts_per_product
    n_col = len(img.COLOURS)

    cat = rng_prod.integers(len(img.CATEGORIES), size=n)
    col = rng_prod.integers(n_col, size=n)
    alt = (col + rng_prod.integers(1, n_col, size=n)) % n_col  # a different colour variant
    pat = rng_prod.integers(len(img.PATTERNS), size=n)
    shade = rng_prod.integers(len(img.SHADES), size=n)
    b_prod = rng_prod.normal(0.0, cfg.product_sd, size=n)
    products = pl.DataFrame({
        "product_id": np.arange(n), "category": [img.CATEGORIES[c] for c in cat],
        "colour": [img.COLOURS[c] for c in col], "alt_colour": [img.COLOURS[c] for c in alt],
        "pattern": [img.PATTERNS[p] for p in pat],
        "title": [_title(*a) for a in zip(cat, col, pat, shade)],
    })

    # creatives: independent aspect levels per creative
    nc = n * k
    levels = {name: rng_crea.integers(len(lv), size=nc) for name, lv in CREATIVE_LEVELS.items()}
    levels["shown"] = (rng_crea.random(nc) < cfg.alt_shown_prob).astype(np.int64)
    prod_of = np.repeat(np.arange(n), k)
    pngs = []
    for i in range(nc):
        p = prod_of[i]
        c = alt[p] if levels["shown"][i] else col[p]
        attrs = {a: CREATIVE_LEVELS[a][levels[a][i]] for a in ("framing", "background", "brightness", "clutter", "text")}
        pngs.append(img.encode_png(render_creative(int(cat[p]), img.shaded_rgb(int(c), int(shade[p])),
                                                   int(pat[p]), attrs, rng_img, cfg.image_size)))
    creatives = pl.DataFrame({
        "creative_id": np.arange(nc), "product_id": prod_of,
        **{a: [CREATIVE_LEVELS[a][v] for v in levels[a]] for a in CREATIVE_LEVELS},
        "shown_colour": [img.COLOURS[alt[p] if s else col[p]] for p, s in zip(prod_of, levels["shown"])],
        "image": pngs,
    })

    # contexts: m queries per product
    ctx_prod = np.repeat(np.arange(n), m)
    intent = rng_ctx.integers(len(INTENTS), size=n * m)
    qc = rng_ctx.choice(3, size=n * m, p=np.asarray(cfg.query_colour_probs) / np.sum(cfg.query_colour_probs))
    query_colour = np.where(qc == 2, -1, qc)
    queries = []
    for p, it, q in zip(ctx_prod, intent, query_colour):
        words = [] if q < 0 else [img.COLOURS[alt[p] if q == 1 else col[p]]]
        words.append(img.CATEGORIES[cat[p]])
        extra = str(rng_ctx.choice(_INTENT_WORDS[INTENTS[it]]))
        if extra:
            words = words + [extra] if rng_ctx.random() < 0.7 else [extra] + words
        queries.append(" ".join(words))
    contexts = pl.DataFrame({
        "context_id": np.arange(n * m), "product_id": ctx_prod, "intent": [INTENTS[i] for i in intent],
        "query_colour": ["none" if q < 0 else SHOWN[q] for q in query_colour], "query": queries,
    })

    # the log: every (context, creative of its product)
    ctx_rep = np.repeat(np.arange(n * m), k)
    crea = (ctx_prod[:, None] * k + np.arange(k)[None, :]).ravel()
    contrib = cfg.attractiveness.contributions({a: v[crea] for a, v in levels.items()},
                                               intent[ctx_rep], query_colour[ctx_rep])
    util = sum(contrib.values())
    noise = rng_log.normal(0.0, cfg.creative_noise_sd, size=len(crea))
    logit = np.log(cfg.base_ctr / (1 - cfg.base_ctr)) + b_prod[ctx_prod[ctx_rep]] + util + noise
    true_ctr = 1.0 / (1.0 + np.exp(-logit))
    mu = np.log(cfg.impressions_mean) - cfg.impressions_log_sd ** 2 / 2
    impressions = np.maximum(1, np.round(rng_log.lognormal(mu, cfg.impressions_log_sd, size=len(crea)))).astype(np.int64)
    clicks = rng_log.binomial(impressions, true_ctr)
    log = pl.DataFrame({
        "context_id": ctx_rep, "product_id": ctx_prod[ctx_rep], "creative_id": crea,
        "impressions": impressions, "clicks": clicks, "true_ctr": true_ctr, "utility": util,
        **{f"u_{a}": v for a, v in contrib.items()},
    })
    return CreativeWorld(products, creatives, contexts, log, cfg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Simulate ad creatives and their impression log.")
    p.add_argument("--out", required=True, help="output directory (parquet tables)")
    for f, v in asdict(CreativeSimConfig()).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    return p


def main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k != "out"}
    world = simulate_creatives(CreativeSimConfig(**kw))
    out = world.save(args.out)
    print(f"wrote {world.products.height} products, {world.creatives.height} creatives, "
          f"{world.log.height} log rows to {out}")
    return out


if __name__ == "__main__":
    main()
