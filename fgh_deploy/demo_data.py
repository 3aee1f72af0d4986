"""A small, generated, licence-free fine-grained dataset: cartoon birds that differ by parts.

Real fine-grained benchmarks (CUB-200-2011, NABirds) cannot be shipped, so ``fgh`` draws its own
default dataset with Pillow in a few seconds. Every image is one bird — body, head, crest, wing,
tail, beak, eye and legs — on a cluttered background. A class is fixed by three part attributes:

* **crest** colour: red, blue, yellow or black (the feathers on top of the head);
* **wing** pattern: plain, barred or spotted;
* **tail** shape: fan, fork or pointed.

Everything else is drawn at random within every class: body colour (muted hues, so a red body
does not read as a red crest), wing and tail shades, beak length and colour, leg length, pose
(mirror, rotation), scale, position, background (gradient, noise, clutter shapes whose colours
include the crest colours) and lighting (brightness, contrast, colour cast). Many pairs of the
20 classes differ in one part only, so whole-image colour statistics do not separate them and
a model has to look at the right part, which is what fine-grained hashing is about.

Generation is deterministic: each image draws from its own generator seeded by
``(seed, class number, image number)``, and the JPEG encoder settings are fixed, so the same
seed gives byte-identical files (with the same Pillow build), in any order, on any run.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

from .errors import FghError

__all__ = [
    "CREST_COLOURS",
    "DEMO_CLASSES",
    "DEMO_VERSION",
    "TAIL_SHAPES",
    "WING_PATTERNS",
    "DemoClass",
    "demo_dataset_path",
    "generate_demo_dataset",
    "render_bird",
]

StrPath = Union[str, os.PathLike[str]]

#: Bumped whenever the drawing changes, so a cache never serves images of an older generator.
DEMO_VERSION = "demo-v1"

#: The crest colours (RGB); saturated, unlike the body colours, so the part stays legible.
CREST_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 35),
    "blue": (35, 80, 215),
    "yellow": (245, 205, 25),
    "black": (22, 22, 26),
}
WING_PATTERNS: tuple[str, ...] = ("plain", "barred", "spotted")
TAIL_SHAPES: tuple[str, ...] = ("fan", "fork", "pointed")

_JPEG_SETTINGS = {"format": "JPEG", "quality": 90, "subsampling": 2, "optimize": False, "progressive": False}
_OUTLINE = (38, 32, 30, 255)
# Clutter draws from these as often as from random colours, so a crest colour in the
# histogram says nothing about the crest.
_CLUTTER_PALETTE = np.array([*CREST_COLOURS.values(), (60, 120, 50), (120, 85, 50), (235, 235, 230)], dtype=float)
_MAX_CLUTTER = 9


@dataclass(frozen=True)
class DemoClass:
    """One class of the demo dataset: a crest colour, a wing pattern and a tail shape."""

    crest: str
    wing: str
    tail: str

    @property
    def name(self) -> str:
        """Folder and class name, e.g. ``red-crest_barred-wing_fork-tail``."""
        return f"{self.crest}-crest_{self.wing}-wing_{self.tail}-tail"

    def differs_from(self, other: DemoClass) -> list[str]:
        """The parts (``"crest"``, ``"wing"``, ``"tail"``) whose attribute differs from ``other``."""
        return [part for part in ("crest", "wing", "tail") if getattr(self, part) != getattr(other, part)]


def _classes(spec: str) -> tuple[DemoClass, ...]:
    return tuple(DemoClass(*line.split()) for line in spec.strip().splitlines())


#: The classes, in the order ``generate_demo_dataset(classes=n)`` takes the first ``n``. The
#: first four are a red/plain/fan bird and its three one-part neighbours, so even a tiny
#: version has pairs that differ in the crest, the wing or the tail alone; over all 20, every
#: class has at least one such neighbour and each attribute value is used 5–7 times.
DEMO_CLASSES: tuple[DemoClass, ...] = _classes("""
    red     plain    fan
    blue    plain    fan
    red     barred   fan
    red     plain    fork
    blue    spotted  pointed
    yellow  barred   fork
    black   spotted  fan
    yellow  plain    pointed
    black   barred   pointed
    blue    barred   fork
    yellow  spotted  fan
    black   plain    fork
    red     spotted  pointed
    blue    spotted  fork
    yellow  barred   pointed
    black   plain    fan
    red     barred   pointed
    blue    plain    pointed
    yellow  spotted  fork
    black   spotted  fork
""")


# --------------------------------------------------------------------------- random nuisance


@dataclass(frozen=True)
class _Nuisance:
    """Everything about one image that is not its class, drawn before any drawing starts.

    Drawing the same numbers in the same order whatever the class means two classes
    rendered with the same seed differ only in the parts that define them (the tests
    rely on it).
    """

    body: np.ndarray  # RGB floats
    wing: np.ndarray
    tail: np.ndarray
    pattern: np.ndarray
    beak: np.ndarray
    legs: np.ndarray
    body_stretch: tuple[float, float]
    head_scale: float
    crest_heights: np.ndarray  # 3 spikes
    beak_length: float
    leg_length: float
    tail_length: float
    tail_angle: float  # degrees below horizontal
    bar_count: int
    bar_slant: float
    spot_count: int
    spots: np.ndarray  # (6, 2): how far towards its wing vertex, radius
    flip: bool
    angle: float
    scale: float
    offset: tuple[float, float]  # in units of the free margin, -1..1
    background: tuple[np.ndarray, np.ndarray, float]  # two colours, gradient direction (radians)
    clutter_count: int
    # (_MAX_CLUTTER, 8): kind, then in 0..1: x, y, size, aspect or direction, thickness,
    # palette-or-own colour, palette entry.
    clutter: np.ndarray
    clutter_colours: np.ndarray  # (_MAX_CLUTTER, 3)
    lighting: tuple[float, float, np.ndarray]  # brightness, contrast, per-channel cast
    noise_sigma: float


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """An HSV colour (all in 0..1) as RGB floats in 0..255."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _draw_nuisance(rng: np.random.Generator) -> _Nuisance:
    # Muted body colours (saturation <= 0.5, never black) keep the saturated crest the one
    # strongly coloured part of the bird, whatever hue the body gets.
    body = _hsv(rng.random(), rng.uniform(0.12, 0.5), rng.uniform(0.5, 0.9))
    own_wing = _hsv(rng.random(), rng.uniform(0.1, 0.45), rng.uniform(0.35, 0.75))
    darker_body = body * rng.uniform(0.55, 0.8)
    wing = own_wing if rng.random() < 0.35 else darker_body
    tail = body * rng.uniform(0.6, 0.9)
    # Bars and spots contrast with the wing: dark on a light wing, light on a dark one.
    light_wing = wing.mean() > 115
    shade = rng.uniform(15, 50) if light_wing else rng.uniform(215, 250)
    pattern = np.full(3, shade) + rng.normal(0, 8, 3)
    beak = np.array([(235, 150, 40), (120, 120, 120), (60, 55, 50), (220, 190, 90)][rng.integers(4)], dtype=float)
    legs = np.array([(90, 80, 70), (210, 130, 60)][rng.integers(2)], dtype=float)
    return _Nuisance(
        body=body,
        wing=wing,
        tail=tail,
        pattern=pattern,
        beak=beak,
        legs=legs,
        body_stretch=(rng.uniform(0.9, 1.1), rng.uniform(0.88, 1.1)),
        head_scale=rng.uniform(0.9, 1.12),
        crest_heights=rng.uniform(0.065, 0.105, 3),
        beak_length=rng.uniform(0.045, 0.095),
        leg_length=rng.uniform(0.09, 0.16),
        tail_length=rng.uniform(0.16, 0.22),
        tail_angle=rng.uniform(-8, 22),
        bar_count=int(rng.integers(3, 5)),
        bar_slant=rng.uniform(-0.4, 0.4),
        spot_count=int(rng.integers(4, 7)),
        spots=np.column_stack([rng.uniform(0.3, 0.62, 6), rng.uniform(0.015, 0.022, 6)]),
        flip=bool(rng.random() < 0.5),
        angle=rng.uniform(-30, 30),
        scale=rng.uniform(0.85, 1.1),
        offset=(rng.uniform(-1, 1), rng.uniform(-1, 1)),
        background=(rng.uniform(20, 235, 3), rng.uniform(20, 235, 3), rng.uniform(0, 2 * math.pi)),
        clutter_count=int(rng.integers(3, _MAX_CLUTTER + 1)),
        clutter=np.column_stack([rng.integers(0, 4, _MAX_CLUTTER), rng.random((_MAX_CLUTTER, 7))]),
        clutter_colours=rng.uniform(10, 245, (_MAX_CLUTTER, 3)),
        lighting=(rng.uniform(0.75, 1.2), rng.uniform(0.75, 1.2), rng.normal(1.0, 0.05, 3)),
        noise_sigma=rng.uniform(2, 9),
    )


# --------------------------------------------------------------------------------- drawing


def _rgba(colour: np.ndarray | Sequence[float]) -> tuple[int, int, int, int]:
    r, g, b = (int(round(min(max(c, 0.0), 255.0))) for c in colour)
    return r, g, b, 255


def _polar(cx: float, cy: float, r: float, degrees: float) -> tuple[float, float]:
    """The point at ``degrees`` (clockwise from east, as Pillow counts) on a circle."""
    a = math.radians(degrees)
    return cx + r * math.cos(a), cy + r * math.sin(a)


def _draw_tail(draw: ImageDraw.ImageDraw, shape: str, n: _Nuisance, base: tuple[float, float], c: float,
               outline: int) -> None:
    bx, by = base
    heading = 180.0 - n.tail_angle  # pointing back (west), tilted down by tail_angle
    length = n.tail_length * c
    half = 0.045 * c
    up, down = _polar(bx, by, half, heading + 90), _polar(bx, by, half, heading - 90)
    fill = _rgba(n.tail)
    if shape == "fan":
        arc = [_polar(bx, by, length, heading + a) for a in np.linspace(-38, 38, 9)]
        draw.polygon([(bx, by), *arc], fill=fill, outline=_OUTLINE, width=outline)
        for point in arc[1:-1:2]:  # feather shafts show it is a spread fan, not a blob
            draw.line([(bx, by), point], fill=_OUTLINE, width=outline)
    elif shape == "fork":
        tips = _polar(bx, by, length * 1.1, heading - 17), _polar(bx, by, length * 1.1, heading + 17)
        notch = _polar(bx, by, length * 0.5, heading)
        draw.polygon([down, tips[0], notch, tips[1], up], fill=fill, outline=_OUTLINE, width=outline)
    else:  # pointed
        tip = _polar(bx, by, length * 1.3, heading)
        draw.polygon([down, tip, up], fill=fill, outline=_OUTLINE, width=outline)


def _wing_polygon(cx: float, cy: float, c: float) -> list[tuple[float, float]]:
    offsets = [(0.11, -0.06), (0.0, -0.085), (-0.12, -0.05), (-0.22, 0.02), (-0.06, 0.065), (0.08, 0.04)]
    return [(cx + dx * c, cy + dy * c) for dx, dy in offsets]


def _draw_wing(bird: Image.Image, pattern: str, n: _Nuisance, cx: float, cy: float, c: float, outline: int) -> None:
    polygon = _wing_polygon(cx, cy, c)
    layer = Image.new("RGBA", bird.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.polygon(polygon, fill=_rgba(n.wing))
    colour = _rgba(n.pattern)
    xs = [x for x, _ in polygon]
    if pattern == "barred":
        # Slanted stripes across the whole wing; the mask below trims them to its outline.
        for x in np.linspace(min(xs), max(xs), n.bar_count + 2)[1:-1]:
            slant = n.bar_slant * 0.1 * c
            draw.line([(x - slant, cy - 0.12 * c), (x + slant, cy + 0.12 * c)], fill=colour, width=int(0.022 * c))
    elif pattern == "spotted":
        centre = (sum(xs) / len(xs), sum(y for _, y in polygon) / len(polygon))
        # One spot towards each vertex of the wing, so spots never merge into one blob.
        for (vx, vy), (spread, radius) in zip(polygon[: n.spot_count], n.spots):
            x, y = centre[0] + spread * (vx - centre[0]), centre[1] + spread * (vy - centre[1])
            r = radius * c
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    mask = Image.new("L", bird.size, 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    bird.paste(layer, (0, 0), mask)
    ImageDraw.Draw(bird).polygon(polygon, outline=_OUTLINE, width=outline)


def _draw_bird_layer(cls: DemoClass, n: _Nuisance, c: int) -> Image.Image:
    """The bird on a transparent ``c``×``c`` canvas, facing east, inside a circle of radius 0.45c."""
    bird = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    draw = ImageDraw.Draw(bird)
    outline = max(1, c // 150)
    cx, cy = 0.46 * c, 0.53 * c
    rx, ry = 0.2 * c * n.body_stretch[0], 0.13 * c * n.body_stretch[1]

    for dx in (0.0, 0.06):  # legs first: the body hides their tops
        top = (cx + dx * c, cy + ry * 0.8)
        foot = (top[0] - 0.01 * c, top[1] + n.leg_length * c)
        draw.line([top, foot], fill=_rgba(n.legs), width=max(2, c // 90))
        draw.line([foot, (foot[0] + 0.04 * c, foot[1])], fill=_rgba(n.legs), width=max(2, c // 90))
    _draw_tail(draw, cls.tail, n, (cx - rx * 0.85, cy - 0.01 * c), c, outline)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_rgba(n.body), outline=_OUTLINE, width=outline)
    _draw_wing(bird, cls.wing, n, cx, cy, c, outline)
    draw = ImageDraw.Draw(bird)

    hr = 0.085 * c * n.head_scale
    hx, hy = cx + rx * 0.85, cy - ry - 0.03 * c
    crest = _rgba(CREST_COLOURS[cls.crest])
    for angle, height in zip((215.0, 242.0, 269.0), n.crest_heights):
        # Spikes lean back, like a real crest; drawn before the head so their bases tuck under it.
        base_l, base_r = _polar(hx, hy, hr * 0.9, angle - 13), _polar(hx, hy, hr * 0.9, angle + 13)
        tip = _polar(*_polar(hx, hy, hr, angle), height * c, angle - 28)
        draw.polygon([base_l, tip, base_r], fill=crest, outline=_OUTLINE, width=outline)
    beak_top, beak_bottom = _polar(hx, hy, hr * 0.92, -20), _polar(hx, hy, hr * 0.92, 16)
    draw.polygon([beak_top, (hx + hr + n.beak_length * c, hy + 0.15 * hr), beak_bottom],
                 fill=_rgba(n.beak), outline=_OUTLINE, width=outline)
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=_rgba(n.body), outline=_OUTLINE, width=outline)
    # The cap: the crest colour over the top of the head.
    draw.pieslice([hx - hr, hy - hr, hx + hr, hy + hr], 185, 325, fill=crest, outline=_OUTLINE, width=outline)
    ex, ey = _polar(hx, hy, hr * 0.45, 15)
    for radius, colour in ((0.24, (250, 250, 245)), (0.13, (10, 10, 10))):
        r = radius * hr
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=colour + (255,))
    return bird


def _background(n: _Nuisance, size: int, noise: np.ndarray) -> Image.Image:
    first, second, direction = n.background
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = ramp[None, :] * np.float32(math.cos(direction)) + ramp[:, None] * np.float32(math.sin(direction))
    t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
    pixels = first.astype(np.float32) * (1 - t) + second.astype(np.float32) * t + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for (kind, *f), own in zip(n.clutter[: n.clutter_count], n.clutter_colours[: n.clutter_count]):
        colour = tuple(int(v) for v in (_CLUTTER_PALETTE[int(f[6] * len(_CLUTTER_PALETTE))] if f[5] < 0.5 else own))
        x, y, extent = f[0] * size, f[1] * size, (0.06 + 0.22 * f[2]) * size
        if kind == 0:
            draw.ellipse([x - extent, y - extent * (0.4 + f[3]), x + extent, y + extent * (0.4 + f[3])], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + extent, y + extent * (0.3 + f[3])], fill=colour)
        elif kind == 2:  # a branch
            end = _polar(x, y, extent * 2.5, 360 * f[3])
            draw.line([(x, y), end], fill=colour, width=max(2, int(size * (0.015 + 0.03 * f[4]))))
        else:  # a leaf-like triangle
            points = [_polar(x, y, extent * (0.6 + 0.4 * f[4]), 360 * f[3] + k * 120) for k in range(3)]
            draw.polygon(points, fill=colour)
    return image


def _placement(n: _Nuisance, c: int) -> tuple[float, ...]:
    """Coefficients of the inverse affine map (output → canvas) that poses the bird."""
    scale = n.scale
    # The bird fits a circle of radius 0.45c around the canvas centre; move it at most so
    # that circle stays (nearly) in the frame, or the crest or tail could be cut off.
    margin = max(0.0, 0.5 - 0.43 * scale) * c
    tx, ty = c / 2 + n.offset[0] * margin, c / 2 + n.offset[1] * margin
    a = math.radians(n.angle)
    flip = -1.0 if n.flip else 1.0
    # forward: p_out = R·S·F·(p_in - centre) + t
    forward = np.array([
        [scale * math.cos(a) * flip, -scale * math.sin(a), 0.0],
        [scale * math.sin(a) * flip, scale * math.cos(a), 0.0],
        [0.0, 0.0, 1.0],
    ]) @ np.array([[1.0, 0.0, -c / 2], [0.0, 1.0, -c / 2], [0.0, 0.0, 1.0]])
    forward[:2, 2] += (tx, ty)
    inverse = np.linalg.inv(forward)
    return tuple(float(v) for v in inverse[:2].ravel())


def render_bird(
    crest: str, wing: str, tail: str, *, size: int = 160, seed: int | Sequence[int] = 0
) -> Image.Image:
    """Draw one demo image: a bird with the given parts on a random background.

    The class attributes choose the parts; ``seed`` alone chooses everything else (colours,
    pose, background, lighting, noise), so the same seed with another attribute gives the
    same picture with only that part changed.

    Args:
        crest: a key of :data:`CREST_COLOURS`.
        wing: one of :data:`WING_PATTERNS`.
        tail: one of :data:`TAIL_SHAPES`.
        size: width and height in pixels.
        seed: seed of the image's ``numpy.random.Generator`` (an int or a sequence of ints).

    Returns:
        An RGB image of ``size``×``size``.

    Raises:
        ValueError: an unknown attribute or ``size`` < 32.
    """
    if crest not in CREST_COLOURS or wing not in WING_PATTERNS or tail not in TAIL_SHAPES:
        raise ValueError(
            f"unknown attributes crest={crest!r} wing={wing!r} tail={tail!r}; crest is one of "
            f"{sorted(CREST_COLOURS)}, wing of {list(WING_PATTERNS)}, tail of {list(TAIL_SHAPES)}"
        )
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    rng = np.random.default_rng(seed)
    n = _draw_nuisance(rng)
    background_noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(6.0)
    sensor_noise = rng.standard_normal((size, size, 3), dtype=np.float32)

    # Drawn and posed at twice the output size, then box-filtered down: the 2×2 average of
    # nearest samples anti-aliases the edges well enough, 25 times faster than bilinear
    # resampling (which would also bleed the transparent black into the outlines).
    c = 2 * size
    bird = _draw_bird_layer(DemoClass(crest, wing, tail), n, c)
    posed = bird.transform((c, c), Image.Transform.AFFINE, _placement(n, c), resample=Image.Resampling.NEAREST)
    posed = posed.reduce(2)
    image = _background(n, size, background_noise).convert("RGBA")
    image.alpha_composite(posed)

    brightness, contrast, cast = n.lighting
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * np.float32(contrast) + mean
    pixels = pixels * (brightness * cast).astype(np.float32) + sensor_noise * np.float32(n.noise_sigma)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------- dataset


def _query_count(per_class: int, fraction: float) -> int:
    # int(x + 0.5) rounds halves up (round() would round them to even); every class keeps at
    # least one image in each split.
    return min(max(int(fraction * per_class + 0.5), 1), per_class - 1)


def _readme(classes: Sequence[DemoClass], per_class: int, size: int, seed: int, n_query: int) -> str:
    lines = [
        f"fgh demo dataset ({DEMO_VERSION})",
        "",
        "Generated cartoon birds for fine-grained retrieval demos and tests, drawn by",
        "fgh_deploy.demo_data.generate_demo_dataset. A class is fixed by three parts: the crest",
        "colour, the wing pattern and the tail shape. Body colour, pose, scale, position,",
        "background, clutter and lighting vary at random inside every class, and many classes",
        "differ from another in one part only.",
        "",
        f"classes: {len(classes)}   images per class: {per_class}   size: {size}x{size} JPEG   seed: {seed}",
        f"split (splits.tsv): {n_query} query and {per_class - n_query} database images per class",
        "",
        "class\tcrest\twing\ttail",
        *(f"{cls.name}\t{cls.crest}\t{cls.wing}\t{cls.tail}" for cls in classes),
        "",
        "Licence: generated by a program, no third-party content. Dedicated to the public",
        "domain under CC0 1.0 (https://creativecommons.org/publicdomain/zero/1.0/).",
        "",
    ]
    return "\n".join(lines)


def generate_demo_dataset(
    out_dir: StrPath,
    *,
    classes: int = 20,
    per_class: int = 40,
    size: int = 160,
    seed: int = 0,
    query_fraction: float = 0.25,
) -> Path:
    """Write the demo dataset: ``<class>/<NNNN>.jpg``, ``splits.tsv`` and ``README.txt``.

    ``splits.tsv`` (read by :func:`train.data.load_dataset`) puts the same number of images of
    every class in the query split, drawn with the seed; the rest form the database.

    Args:
        out_dir: the dataset folder; created if missing, and must be empty if it exists.
        classes: how many classes, the first ones of :data:`DEMO_CLASSES` (2 to 20).
        per_class: images per class (at least 2: one query, one database image).
        size: image width and height in pixels (at least 32).
        seed: the seed every image and the split derive from.
        query_fraction: share of each class in the query split, ``0 < f < 1`` (at least
            one image of each class goes to each split).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: an argument out of range.
        FghError: ``out_dir`` is a file or a non-empty folder.
    """
    if not 2 <= classes <= len(DEMO_CLASSES):
        raise ValueError(f"classes must be in 2..{len(DEMO_CLASSES)}, got {classes}")
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2, got {per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    root = Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FghError(f"{root}: exists and is not an empty folder; refusing to write the demo dataset into it")
    root.mkdir(parents=True, exist_ok=True)

    chosen = DEMO_CLASSES[:classes]
    n_query = _query_count(per_class, query_fraction)
    split_rng = np.random.default_rng([seed, len(DEMO_CLASSES)])  # apart from every image's stream
    rows = ["relative_path\tclass\tsplit"]
    for number, cls in enumerate(chosen):
        (root / cls.name).mkdir()
        queries = set(split_rng.permutation(per_class)[:n_query].tolist())
        for i in range(per_class):
            image = render_bird(cls.crest, cls.wing, cls.tail, size=size, seed=[seed, number, i])
            relpath = f"{cls.name}/{i:04d}.jpg"
            image.save(root / relpath, **_JPEG_SETTINGS)
            rows.append(f"{relpath}\t{cls.name}\t{'query' if i in queries else 'database'}")
    (root / "splits.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "README.txt").write_text(_readme(chosen, per_class, size, seed, n_query), encoding="utf-8")
    return root


def _default_cache_root() -> Path:
    override = os.environ.get("FGH_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "fgh"


def demo_dataset_path(cache_dir: StrPath | None = None) -> Path:
    """The default demo dataset in the cache, generated there on first use.

    The dataset is generated into a temporary folder next to its final place and renamed
    into place, so an interrupted generation never leaves a partial dataset; when two
    processes race, the first rename wins and the other's copy is discarded.

    Args:
        cache_dir: the cache folder; ``None`` uses ``$FGH_CACHE``, else ``~/.cache/fgh``.

    Returns:
        ``<cache>/demo-v1``, holding the default :func:`generate_demo_dataset` output.
    """
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    final = cache / DEMO_VERSION
    if (final / "splits.tsv").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}.", suffix=".tmp", dir=cache))
    try:
        generate_demo_dataset(staging)
        # mkdtemp made the folder private (0700); give it the permissions mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        try:
            os.rename(staging, final)
        except OSError as exc:
            # Another process renamed its copy into place first (the target is a non-empty
            # folder now): use that one. Anything else is a real error.
            if not (final / "splits.tsv").is_file():
                raise FghError(f"{final}: cannot create the demo dataset there ({exc.strerror or exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final
