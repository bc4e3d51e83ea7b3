"""Real product catalogues for the visual-search traffic simulator.

:func:`load_catalogue` samples ``n_items`` real products, with their original photos, from one of
two image catalogues under ``$CTR_DATA_DIR`` and maps their metadata onto the simulator's four
visual attributes (category, colour, pattern, shade):

============  ==========================================  ==========================================
attribute     ``hm`` (``hm_fashion_images_sample/``)       ``fashion`` (``fashion_product_images_small/``)
============  ==========================================  ==========================================
category      ``product_type_name`` (Trousers, Dress, ..)  ``articleType`` (Tshirts, Shirts, Watches, ..)
colour        ``colour_group_name``                        ``baseColour``
pattern       ``graphical_appearance_name``                ``usage`` (Casual, Sports, Ethnic, ..)
shade         ``perceived_colour_value_name``              ``season``
title         ``prod_name`` + first sentence of            ``productDisplayName``
              ``detail_desc``
image         192x288 JPEG                                 60x80 JPEG
============  ==========================================  ==========================================

Levels. The ``K`` most frequent values of each attribute are kept (ties by name): categories are
counted over the whole catalogue, colours/patterns/shades over the products of the kept categories
(never over the sample), so the level names depend neither on the seed nor on ``n_items``. Only
products whose category is among the kept ones are sampled; other (or null) colour/pattern/shade
values map to an extra ``"other"`` level, present when the eligible products have any.

Colour similarity. Each colour level gets the mean RGB of the centre region of its sampled items'
photos (decoded at reduced resolution, background pixels left out); ``csim`` is the procedural
palette's Gaussian kernel (:func:`ctr.data.sources.images.colour_similarity`) on those means. A
level with no sampled item has similarity 0 to every other level.

Sampling is deterministic: the eligible products are sorted by id and ``n_items`` of them are drawn
without replacement with the caller's generator (in random order). The JPEG bytes are returned
untouched.

Bad photos (:mod:`encoders.images`: null, empty, undecodable, truncated, over ``max_pixels``; any
decodable mode is converted to RGB) follow ``bad_images``: ``"fail"`` raises a
:class:`ContractError` naming ``images.parquet``, its ``jpeg`` column and row, and the product id;
``"skip"`` replaces each such product by a further draw from the products not drawn yet (the
sample keeps ``n_items`` products), logs a warning and reports them in
``Catalogue.image_failures``. Without a bad photo the draws are the same under both policies.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from ctr.data.contract import ContractError

log = logging.getLogger(__name__)
#: The real catalogues :func:`load_catalogue` knows.
CATALOGUES: tuple[str, ...] = ("hm", "fashion")
#: Default numbers of kept levels per attribute (plus an "other" level for colour/pattern/shade).
DEFAULT_LEVELS: dict[str, int] = {"category": 12, "colour": 12, "pattern": 6, "shade": 4}
OTHER = "other"
_ATTRS = ("category", "colour", "pattern", "shade")


@dataclass(frozen=True)
class _Spec:
    subdir: str
    images: str
    meta: str
    id_col: str
    id_dtype: pl.DataType
    columns: dict[str, str]  # attribute -> metadata column
    title_cols: tuple[str, ...]


_SPECS: dict[str, _Spec] = {
    "hm": _Spec(
        subdir="hm_fashion_images_sample", images="images.parquet", meta="articles.csv",
        id_col="article_id", id_dtype=pl.Utf8,
        columns={"category": "product_type_name", "colour": "colour_group_name",
                 "pattern": "graphical_appearance_name", "shade": "perceived_colour_value_name"},
        title_cols=("prod_name", "detail_desc"),
    ),
    "fashion": _Spec(
        subdir="fashion_product_images_small", images="images.parquet", meta="styles.csv",
        id_col="id", id_dtype=pl.Int64,
        columns={"category": "articleType", "colour": "baseColour", "pattern": "usage",
                 "shade": "season"},
        title_cols=("productDisplayName",),
    ),
}


@dataclass
class Catalogue:
    """``n_items`` sampled real products: attribute indices, level names, titles, JPEG bytes."""

    name: str
    source_ids: list[str]  # the original article_id / id, as strings
    cat: np.ndarray  # int64 [n] indices into ``categories``
    col: np.ndarray  # int64 [n] indices into ``colours``
    pat: np.ndarray  # int64 [n] indices into ``patterns``
    sh: np.ndarray  # int64 [n] indices into ``shades``
    categories: list[str]
    colours: list[str]
    patterns: list[str]
    shades: list[str]
    titles: list[str]
    images: list[bytes]  # the original JPEG bytes
    csim: np.ndarray  # [n_colours, n_colours] colour similarity in [0, 1], ones on the diagonal
    colour_rgb: np.ndarray  # [n_colours, 3] mean centre RGB per colour level (NaN: no sampled item)
    image_size: tuple[int, int]  # (width, height) of the catalogue's photos
    n_available: int  # eligible products (kept categories, with a photo) the sample was drawn from
    # products whose photo was bad, replaced under bad_images="skip" (ImageFailures.summary())
    image_failures: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_ids)


def catalogue_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The catalogue's folder: ``data_dir/<subdir>`` (``data_dir`` defaults to ``$CTR_DATA_DIR``),
    or ``data_dir`` itself when it is already that folder."""
    spec = _spec(name)
    if data_dir is None:
        base = os.environ.get("CTR_DATA_DIR")
        if not base:
            raise RuntimeError(f"CTR_DATA_DIR is not set: point it at the folder holding {spec.subdir}/ "
                               f"(e.g. ../shared/data), or pass data_dir=")
        data_dir = base
    d = Path(data_dir)
    if (d / spec.meta).is_file() and not (d / spec.subdir).is_dir():
        return d  # already the catalogue's own folder
    return d / spec.subdir


def catalogue_files(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The two files a catalogue is read from (for fingerprints), checked to exist."""
    spec = _spec(name)
    d = catalogue_dir(name, data_dir)
    files = [d / spec.meta, d / spec.images]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: file not found (catalogue {name!r} needs {spec.subdir}/{f.name}; "
                                    f"set CTR_DATA_DIR to the folder holding {spec.subdir}/)")
    return files


def load_catalogue(
    name: str, n_items: int, rng: np.random.Generator, data_dir: str | os.PathLike | None = None, *,
    levels: dict[str, int] | None = None, colour_sim_scale: float = 60.0, bad_images: str = "fail",
    max_pixels: int | None = None,
) -> Catalogue:
    """Sample ``n_items`` products of the real catalogue ``name`` (``"hm"`` or ``"fashion"``).

    ``levels`` overrides :data:`DEFAULT_LEVELS` (numbers of kept values per attribute);
    ``colour_sim_scale`` is the RGB scale of the colour-similarity kernel. ``bad_images``
    (``"fail"`` / ``"skip"``) and ``max_pixels`` (default :data:`encoders.images.MAX_PIXELS`):
    what a product with a bad photo does (see the module's docstring).
    """
    from encoders.images import MAX_PIXELS, check_image_settings

    max_pixels = max_pixels or MAX_PIXELS
    check_image_settings(bad_images, max_pixels)
    spec = _spec(name)
    k_levels = {**DEFAULT_LEVELS, **(levels or {})}
    meta_path, images_path = catalogue_files(name, data_dir)

    # ---- metadata joined to the ids that have a photo ----
    need_meta = [spec.id_col, *spec.columns.values(), *spec.title_cols]
    _require_columns(meta_path, pl.read_csv(meta_path, n_rows=0, infer_schema=False).columns, need_meta)
    _require_columns(images_path, list(pl.read_parquet_schema(images_path)), [spec.id_col, "jpeg"])
    meta = pl.read_csv(meta_path, columns=need_meta, infer_schema=False)  # all Utf8
    try:
        meta = meta.with_columns(pl.col(spec.id_col).cast(spec.id_dtype))
    except pl.exceptions.InvalidOperationError as e:
        raise ContractError(str(meta_path), spec.id_col, f"ids are not {spec.id_dtype}: {e}") from None
    # each id with a photo and its (first) photo's parquet row, from the id column alone
    ids_with_image = (pl.read_parquet(images_path, columns=[spec.id_col]).with_row_index("__row")
                      .with_columns(pl.col(spec.id_col).cast(spec.id_dtype))
                      .unique(spec.id_col, keep="first"))
    attr = {a: spec.columns[a] for a in _ATTRS}
    pool = (meta.join(ids_with_image, on=spec.id_col, how="inner")
            .unique(spec.id_col, keep="first")
            .filter(pl.col(attr["category"]).is_not_null()))

    # ---- kept levels (categories over the catalogue, the rest over kept categories), pool ----
    categories = _top_values(pool[attr["category"]], k_levels["category"], allow_other=False)
    pool = pool.filter(pl.col(attr["category"]).is_in(categories)).sort(spec.id_col)
    names = {"category": categories}
    for a in ("colour", "pattern", "shade"):
        kept = _top_values(pool[attr[a]], k_levels[a], allow_other=True)
        if (~pool[attr[a]].is_in(kept) | pool[attr[a]].is_null()).any():
            kept = [*kept, OTHER]
        names[a] = kept

    n_avail = pool.height
    if not 1 <= n_items <= n_avail:
        raise ValueError(f"catalogue {name!r} has {n_avail} products in its {len(categories)} kept "
                         f"categories ({meta_path.parent}); n_items={n_items} must be between 1 and "
                         f"{n_avail}")
    take = rng.choice(n_avail, size=n_items, replace=False)
    # ---- the sampled photos, in sample order, and each one's mean centre colour ----
    images, item_rgb, failures = _sample_photos(pool, take, spec, images_path, rng, bad_images, max_pixels)
    sample = pool[take]
    ids = sample[spec.id_col]

    codes = {}
    for a in _ATTRS:
        lookup = {v: j for j, v in enumerate(names[a])}
        other = lookup.get(OTHER, -1)
        codes[a] = np.array([lookup.get(v, other) for v in sample[attr[a]].to_list()], dtype=np.int64)

    titles = _titles(name, sample, spec, names, codes)

    # ---- colour similarity from the photos ----
    with Image.open(io.BytesIO(images[0])) as first:  # the header only: the photos' stored size
        size = first.size
    n_col = len(names["colour"])
    cnt = np.bincount(codes["colour"], minlength=n_col).astype(np.float64)
    sums = np.stack([np.bincount(codes["colour"], weights=item_rgb[:, c], minlength=n_col)
                     for c in range(3)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        colour_rgb = sums / cnt[:, None]
    csim = _kernel(colour_rgb, colour_sim_scale)

    return Catalogue(
        name=name, source_ids=[str(x) for x in ids.to_list()],
        cat=codes["category"], col=codes["colour"], pat=codes["pattern"], sh=codes["shade"],
        categories=names["category"], colours=names["colour"], patterns=names["pattern"],
        shades=names["shade"], titles=titles, images=images, csim=csim, colour_rgb=colour_rgb,
        image_size=size, n_available=n_avail, image_failures=failures.summary() if failures else {},
    )


# ----------------------------------------------------------------------------------------------
# helpers


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown catalogue {name!r}; choose from {list(CATALOGUES)}")
    return _SPECS[name]


def _require_columns(path: Path, found: list[str], need: list[str]) -> None:
    for c in need:
        if c not in found:
            raise ContractError(str(path), c, f"missing column; found {found}")


def _top_values(s: pl.Series, k: int, allow_other: bool) -> list[str]:
    """The ``k`` most frequent non-null values (count desc, then name); a value spelled like the
    ``other`` level is left out when an ``other`` level may be added."""
    vc = s.drop_nulls().value_counts(name="n")
    col = s.name
    if allow_other:
        vc = vc.filter(pl.col(col).str.to_lowercase() != OTHER)
    vc = vc.sort(["n", col], descending=[True, False])
    return vc[col].head(k).to_list()


_SENTENCE = re.compile(r"(?<=[.!?])\s")


def _first_sentence(text: str, max_chars: int = 140) -> str:
    s = _SENTENCE.split(text.strip(), maxsplit=1)[0].strip()
    if len(s) > max_chars:
        cut = s[:max_chars].rsplit(" ", 1)[0].rstrip(",;:")
        s = cut + "..."
    return s


def _titles(name: str, sample: pl.DataFrame, spec: _Spec, names: dict, codes: dict) -> list[str]:
    """H&M: ``prod_name`` + first sentence of ``detail_desc``; Fashion: ``productDisplayName``.
    Nulls fall back to the product's colour and category names."""
    n = sample.height
    fallback = [
        (f"{names['colour'][codes['colour'][j]]} " if names["colour"][codes["colour"][j]] != OTHER else "")
        + names["category"][codes["category"][j]]
        for j in range(n)
    ]
    out = []
    if name == "hm":
        for j, (pn, dd) in enumerate(zip(sample["prod_name"].to_list(), sample["detail_desc"].to_list())):
            head = " ".join((pn or "").split()) or fallback[j]
            desc = _first_sentence(" ".join(dd.split())) if dd and dd.strip() else ""
            out.append(f"{head}. {desc}" if desc else head)
    else:
        for j, t in enumerate(sample["productDisplayName"].to_list()):
            out.append(" ".join((t or "").split()) or fallback[j])
    return out


def _sample_photos(pool: pl.DataFrame, take: np.ndarray, spec: _Spec, path: Path, rng: np.random.Generator,
                   bad_images: str, max_pixels: int):
    """The photos of the products ``pool[take]`` (``pool["__row"]``: each one's parquet row) and
    their mean centre colours (:func:`_centre_rgb`).

    A bad photo raises under ``"fail"`` (a :class:`ContractError` naming ``path``, ``jpeg``, the
    parquet row and the product id); under ``"skip"`` its product is replaced in ``take`` (in
    place) by a draw from the products not drawn yet, until every photo decodes. Returns (bytes per
    product, RGB [n, 3], the replaced products as ``ImageFailures``)."""
    from encoders.images import BadImage, ImageFailures, log_skipped, policy_error

    images: list = [None] * len(take)
    rgb = np.empty((len(take), 3), dtype=np.float64)
    failures = ImageFailures(str(path), "jpeg", bad_images, item_ids=[])
    drawn = np.zeros(pool.height, bool)
    drawn[take] = True
    todo = np.arange(len(take))
    while len(todo):
        ids = pool[spec.id_col].gather(take[todo])
        rows = pool["__row"].gather(take[todo]).to_list()
        jpeg = _read_photos(path, spec, ids)
        bad = []
        for j, b, row, pid in zip(todo, jpeg, rows, ids.to_list()):
            try:
                rgb[j], images[j] = _centre_rgb(b, max_pixels), b
            except BadImage as e:
                if bad_images == "fail":
                    raise policy_error(str(path), "jpeg", [(0, e)], [pid], id_name=spec.id_col, rows=[row],
                                       skip_does="replaces such products") from None
                bad.append(j)
                failures.add(row, e, str(pid))
        rest = np.flatnonzero(~drawn)
        if len(rest) < len(bad):
            raise ContractError(str(path), "jpeg", f"too few products with a usable photo: {len(failures)} bad "
                                f"({failures.summary()['reasons']}), n_items={len(take)} of {pool.height}")
        todo = np.asarray(bad, dtype=np.int64)
        if len(todo):
            take[todo] = rng.choice(rest, size=len(todo), replace=False)
            drawn[take[todo]] = True
    if failures:
        log_skipped(failures, f"{len(failures)} sampled products have a bad photo and were replaced by "
                              f"other products", spec.id_col, log)
    return images, rgb, failures


def _read_photos(path: Path, spec: _Spec, ids: pl.Series) -> list:
    """The photo bytes of ``ids`` (each id's first photo in the parquet; None where it has none).
    No row index in the scan, so the id filter is pushed into the parquet reader and only the
    matching rows' ``jpeg`` values are read."""
    photos = (pl.scan_parquet(path).select(spec.id_col, "jpeg")
              .with_columns(pl.col(spec.id_col).cast(spec.id_dtype))
              .filter(pl.col(spec.id_col).is_in(ids.implode()))
              .unique(spec.id_col, keep="first", maintain_order=True)
              .collect())
    return ids.to_frame().join(photos, on=spec.id_col, how="left", maintain_order="left")["jpeg"].to_list()


def _centre_rgb(photo: bytes | None, max_pixels: int) -> np.ndarray:
    """Mean RGB of the product in the centre half (each dimension) of a photo, decoded at ~1/4
    resolution. Pixels within 20 RGB units of the background (the median of the image border: white
    or light grey in both catalogues) are left out when at least 5 % of the centre remains, so small
    products (watches, shoes, socks) are not washed out by the background. Raises
    :class:`encoders.images.BadImage` for a photo that cannot be used."""
    from encoders.images import open_rgb

    a = np.asarray(open_rgb(photo, max_pixels=max_pixels, reduce=4), dtype=np.float64)
    hh, ww = a.shape[:2]
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    c = a[hh // 4: hh - hh // 4 or None, ww // 4: ww - ww // 4 or None].reshape(-1, 3)
    fg = ((c - bg) ** 2).sum(1) > 20.0 ** 2
    return c[fg].mean(0) if fg.mean() >= 0.05 else c.mean(0)


def _kernel(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``exp(-||a - b||^2 / (2 scale^2))``; levels with no RGB (NaN) get 0 off the diagonal."""
    d2 = ((rgb[:, None, :] - rgb[None, :, :]) ** 2).sum(-1)
    s = np.exp(-d2 / (2.0 * scale * scale))
    s = np.nan_to_num(s, nan=0.0)
    np.fill_diagonal(s, 1.0)
    return s
