"""Procedural product images for the visual-search traffic simulator.

Every item is drawn from three true visual attributes (plus an optional shade):

* ``category``: a silhouette polygon (t-shirt, dress, trousers, ...), see :data:`CATEGORIES`;
* ``colour``: one of :data:`COLOURS` (named RGB palette), modified by ``shade`` (dark/normal/light);
* ``pattern``: plain, stripes, dots, checks or diagonal stripes, see :data:`PATTERNS`.

:func:`render_item` draws the silhouette with ``PIL.ImageDraw`` as a mask, fills it with the colour,
overlays the pattern in a contrasting secondary colour, outlines it, and places it on a light,
slightly tinted background. Position, scale, vertex positions, background tint, colour and pattern
phase/period are jittered from the caller's generator, so two items with identical attributes are
never pixel-identical while staying clearly recognisable. Rendering plus PNG encoding of a 64x64
image takes well under a millisecond.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# Silhouettes in unit coordinates (x right, y down), roughly centred on (0.5, 0.5).
# Extra strokes (bag handle, jacket zip, shoe sole, ...) are listed separately.
_SHAPES: dict[str, list[tuple[float, float]]] = {
    "tshirt": [
        (0.30, 0.15), (0.42, 0.12), (0.50, 0.19), (0.58, 0.12), (0.70, 0.15), (0.91, 0.33),
        (0.81, 0.44), (0.72, 0.37), (0.72, 0.88), (0.28, 0.88), (0.28, 0.37), (0.19, 0.44),
        (0.09, 0.33),
    ],
    "dress": [
        (0.40, 0.07), (0.46, 0.07), (0.50, 0.12), (0.54, 0.07), (0.60, 0.07), (0.62, 0.30),
        (0.57, 0.42), (0.82, 0.93), (0.18, 0.93), (0.43, 0.42), (0.38, 0.30),
    ],
    "trousers": [
        (0.29, 0.07), (0.71, 0.07), (0.77, 0.93), (0.58, 0.93), (0.50, 0.36), (0.42, 0.93),
        (0.23, 0.93),
    ],
    "skirt": [(0.35, 0.24), (0.65, 0.24), (0.67, 0.31), (0.87, 0.76), (0.13, 0.76), (0.33, 0.31)],
    "jacket": [
        (0.30, 0.11), (0.43, 0.09), (0.50, 0.17), (0.57, 0.09), (0.70, 0.11), (0.88, 0.30),
        (0.95, 0.81), (0.84, 0.83), (0.76, 0.43), (0.75, 0.91), (0.25, 0.91), (0.24, 0.43),
        (0.16, 0.83), (0.05, 0.81), (0.12, 0.30),
    ],
    "bag": [(0.18, 0.40), (0.82, 0.40), (0.87, 0.88), (0.13, 0.88)],
    "shoe": [
        (0.08, 0.56), (0.13, 0.38), (0.33, 0.38), (0.44, 0.54), (0.80, 0.60), (0.93, 0.69),
        (0.92, 0.80), (0.08, 0.80),
    ],
    "hat": [
        (0.30, 0.62), (0.32, 0.32), (0.42, 0.25), (0.58, 0.25), (0.68, 0.32), (0.70, 0.62),
        (0.93, 0.66), (0.91, 0.74), (0.09, 0.74), (0.07, 0.66),
    ],
}

#: Category names in index order (``category_idx`` indexes this tuple).
CATEGORIES: tuple[str, ...] = tuple(_SHAPES)

#: Named palette in index order (``colour_idx`` indexes this tuple).
COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown", "black",
)
#: RGB of each palette colour (normal shade).
COLOUR_RGB: np.ndarray = np.array(
    [
        (205, 35, 40),    # red
        (240, 130, 25),   # orange
        (240, 205, 35),   # yellow
        (45, 150, 60),    # green
        (25, 150, 150),   # teal
        (35, 80, 200),    # blue
        (120, 50, 170),   # purple
        (235, 110, 170),  # pink
        (125, 75, 35),    # brown
        (30, 30, 35),     # black
    ],
    dtype=np.float64,
)

#: Pattern names in index order (``pattern_idx`` indexes this tuple).
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks", "diagonal")
#: Adjective used in product titles for each pattern.
PATTERN_WORDS: tuple[str, ...] = ("plain", "striped", "polka-dot", "checked", "diagonal-striped")

#: Shade names in index order (``shade_idx``); "" is the normal shade (no title word).
SHADES: tuple[str, ...] = ("dark", "", "light")

# Extra strokes per category, drawn into the mask: (kind, unit coordinates, width as fraction).
_STROKES: dict[str, list[tuple[str, tuple[float, ...], float]]] = {
    "bag": [("arc", (0.30, 0.16, 0.70, 0.64), 0.06)],
}
# Detail lines drawn after the fill in the outline colour.
_DETAILS: dict[str, list[tuple[float, ...]]] = {
    "jacket": [(0.50, 0.17, 0.50, 0.91)],
    "shoe": [(0.08, 0.74, 0.92, 0.74)],
    "hat": [(0.30, 0.58, 0.70, 0.58)],
    "trousers": [(0.29, 0.14, 0.71, 0.14)],
}


def shaded_rgb(colour_idx: int, shade_idx: int = 1) -> np.ndarray:
    """RGB (float, 0..255) of a palette colour at a shade: 0 dark, 1 normal, 2 light."""
    base = COLOUR_RGB[colour_idx]
    if shade_idx == 0:
        return base * 0.62
    if shade_idx == 2:
        return base + (255.0 - base) * 0.45
    return base.copy()


def colour_similarity(scale: float = 60.0) -> np.ndarray:
    """Palette similarity in [0, 1]: ``exp(-||rgb_a - rgb_b||^2 / (2 scale^2))``; 1 on the diagonal."""
    d2 = ((COLOUR_RGB[:, None, :] - COLOUR_RGB[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2.0 * scale * scale))


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = _GRID_CACHE.get(size)
    if g is None:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        g = _GRID_CACHE[size] = (xx, yy)
    return g


def _pattern_mask(pattern_idx: int, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Boolean mask of the pattern's secondary-colour pixels (None for plain)."""
    name = PATTERNS[pattern_idx]
    if name == "plain":
        return None
    xx, yy = _grid(size)
    period = size * rng.uniform(0.11, 0.15)
    phase_x, phase_y = rng.uniform(0.0, period, size=2)
    if name == "stripes":
        return ((yy + phase_y) % period) < period * 0.45
    if name == "diagonal":
        return ((xx + yy + phase_x) % (period * 1.2)) < period * 0.55
    if name == "checks":
        cx = ((xx + phase_x) // period).astype(np.int32)
        cy = ((yy + phase_y) // period).astype(np.int32)
        return ((cx + cy) & 1) == 1
    if name == "dots":
        dx = (xx + phase_x) % period - period / 2
        dy = (yy + phase_y) % period - period / 2
        return dx * dx + dy * dy < (period * 0.28) ** 2
    raise ValueError(f"unknown pattern {name!r}")


def _unit_to_px(scale: float, shift: np.ndarray, size: int):
    def to_px(pts: np.ndarray) -> np.ndarray:
        return ((pts - 0.5) * scale + 0.5 + shift) * (size - 1)
    return to_px


def _silhouette_mask(shape: str, to_px, poly: np.ndarray, size: int, scale: float) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a silhouette (polygon plus its extra strokes)."""
    pts = [tuple(p) for p in to_px(poly)]
    mask_img = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask_img)
    mdraw.polygon(pts, fill=255)
    for kind, coords, width in _STROKES.get(shape, ()):
        c = to_px(np.asarray(coords).reshape(2, 2)).ravel().tolist()
        w = max(1, round(width * size * scale))
        if kind == "arc":
            mdraw.arc(c, start=180, end=360, fill=255, width=w)
    return np.asarray(mask_img) > 127


def _secondary(main: np.ndarray) -> np.ndarray:
    """The pattern's contrasting colour for a main colour."""
    lum = 0.299 * main[0] + 0.587 * main[1] + 0.114 * main[2]
    return main + (250.0 - main) * 0.75 if lum < 150 else main * 0.35


def _outline(img: Image.Image, shape: str, to_px, poly: np.ndarray, main: np.ndarray, size: int) -> None:
    """Outline and detail strokes of a painted silhouette, in a darker main colour."""
    draw = ImageDraw.Draw(img)
    outline = tuple(int(v) for v in main * 0.5)
    draw.polygon([tuple(p) for p in to_px(poly)], outline=outline)
    for line in _DETAILS.get(shape, ()):
        c = to_px(np.asarray(line).reshape(2, 2)).ravel().tolist()
        draw.line(c, fill=outline, width=max(1, size // 40))


def render_item(
    category_idx: int,
    colour_idx: int,
    pattern_idx: int,
    rng: np.random.Generator,
    size: int = 64,
    shade_idx: int = 1,
) -> Image.Image:
    """Draw one product image (RGB, ``size`` x ``size``) from its true visual attributes.

    ``rng`` supplies the jitter (placement, scale, vertex wobble, background tint, colour and pattern
    phase); the same generator state gives the same image.
    """
    shape = CATEGORIES[category_idx]
    # Placement jitter: scale about the centre, then shift; a small wobble per vertex.
    scale = rng.uniform(0.82, 1.0)
    shift = rng.uniform(-0.06, 0.06, size=2)
    poly = np.asarray(_SHAPES[shape], dtype=np.float64)
    poly = poly + rng.uniform(-0.012, 0.012, size=poly.shape)
    to_px = _unit_to_px(scale, shift, size)
    mask = _silhouette_mask(shape, to_px, poly, size, scale)

    # Colours: item colour with a small jitter; a contrasting secondary colour for the pattern.
    main = np.clip(shaded_rgb(colour_idx, shade_idx) + rng.uniform(-8, 8, size=3), 0, 255)
    second = _secondary(main)
    bg = np.clip(243.0 + rng.uniform(-9, 9, size=3), 0, 255)

    arr = np.empty((size, size, 3), dtype=np.uint8)
    arr[...] = bg.astype(np.uint8)
    arr[mask] = main.astype(np.uint8)
    pat = _pattern_mask(pattern_idx, size, rng)
    if pat is not None:
        arr[mask & pat] = second.astype(np.uint8)

    img = Image.fromarray(arr, mode="RGB")
    _outline(img, shape, to_px, poly, main, size)
    return img


def paint_silhouette(arr: np.ndarray, category_idx: int, rgb: np.ndarray, pattern_idx: int,
                     scale: float, shift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint one patterned, outlined silhouette onto ``arr`` (``uint8 [size, size, 3]``, changed in
    place and returned) at ``scale`` about the centre, shifted by ``shift`` (unit coordinates).
    ``rng`` gives the vertex wobble and the pattern phase. Used for ad creatives, where the caller
    chooses the framing and the background."""
    size = arr.shape[0]
    shape = CATEGORIES[category_idx]
    poly = np.asarray(_SHAPES[shape], dtype=np.float64)
    poly = poly + rng.uniform(-0.012, 0.012, size=poly.shape)
    to_px = _unit_to_px(scale, np.asarray(shift, dtype=np.float64), size)
    mask = _silhouette_mask(shape, to_px, poly, size, scale)
    main = np.clip(np.asarray(rgb, dtype=np.float64), 0, 255)
    arr[mask] = main.astype(np.uint8)
    pat = _pattern_mask(pattern_idx, size, rng)
    if pat is not None:
        arr[mask & pat] = _secondary(main).astype(np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    _outline(img, shape, to_px, poly, main, size)
    arr[...] = np.asarray(img)
    return arr


def encode_png(img: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes of an image (deterministic for a given Pillow/zlib build)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def render_catalogue(
    category_idx: np.ndarray,
    colour_idx: np.ndarray,
    pattern_idx: np.ndarray,
    shade_idx: np.ndarray | None,
    rng: np.random.Generator,
    size: int = 64,
) -> list[bytes]:
    """PNG bytes for every item, drawn in item order from one generator (deterministic)."""
    n = len(category_idx)
    shades = np.ones(n, dtype=np.int64) if shade_idx is None else np.asarray(shade_idx)
    out = []
    for c, col, p, s in zip(
        np.asarray(category_idx).tolist(),
        np.asarray(colour_idx).tolist(),
        np.asarray(pattern_idx).tolist(),
        shades.tolist(),
    ):
        out.append(encode_png(render_item(c, col, p, rng, size=size, shade_idx=s)))
    return out


def decode_png(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
