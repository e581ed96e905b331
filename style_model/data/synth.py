"""`ctl synth`: a generated outfit dataset in Shop The Look's own on-disk layout.

The hidden compatibility rule, learnable but not a colour-matching game:
- A scene shows one *look*: a pattern family (stripes at four angles, checks, dots, plaid, rings) at
  one of two scales. Tops and accessories wear the look's pattern; bottoms (pants, skirts, shoes) wear
  its *complement* (a fixed pairing of pattern families), so matching is learned, not pixel identity.
- Colours are drawn independently for every item, so a colour histogram says nothing about the look.
- Scenes hold several products of different categories plus clutter (objects with random patterns
  that belong to no look), at random places and sizes, on a textured background.
- Every product in a scene is a record `{"product", "scene", "bbox"}`; its catalogue image shows the
  same item (shape, pattern, colours) alone. Images are JPEG files named by signature.
Everything downstream reads this folder exactly as it reads a real STL folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES: dict[str, str] = {
    # name -> (silhouette, group); the group decides whether the look or its complement is worn
    "Apparel & Accessories|Clothing|Shirts & Tops": "top",
    "Apparel & Accessories|Handbags": "top",
    "Apparel & Accessories|Hats": "top",
    "Apparel & Accessories|Clothing|Pants": "bottom",
    "Apparel & Accessories|Clothing|Skirts": "bottom",
    "Apparel & Accessories|Shoes": "bottom",
}
PATTERNS = ("stripes0", "stripes90", "stripes45", "stripes135", "checks", "dots", "plaid", "rings")
# complement[p]: the pattern that bottoms wear in a look of pattern p (an involution without fixed points)
COMPLEMENT = {
    "stripes0": "dots",
    "dots": "stripes0",
    "stripes90": "rings",
    "rings": "stripes90",
    "stripes45": "plaid",
    "plaid": "stripes45",
    "stripes135": "checks",
    "checks": "stripes135",
}
PERIODS = (12, 22)  # pattern scales in pixels at the generated resolution


@dataclass(frozen=True)
class SynthConfig:
    scenes: int = 6000
    scene_size: int = 192
    product_size: int = 192
    min_items: int = 3
    max_items: int = 5
    clutter: tuple[int, int] = (1, 2)
    seed: int = 0
    domain: str = "fashion"
    quality: int = 90


def _signature(kind: str, index: int, seed: int) -> str:
    return hashlib.md5(f"ctl-synth:{seed}:{kind}:{index}".encode()).hexdigest()


def _random_colour(rng: random.Random, value: tuple[float, float] = (0.35, 1.0)) -> tuple[int, int, int]:
    h, s, v = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(*value)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _colour_pair(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Foreground and background of a pattern: random hues, one dark and one light, so the pattern shows."""
    dark, light = _random_colour(rng, (0.15, 0.45)), _random_colour(rng, (0.75, 1.0))
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def _pattern_tile(pattern: str, period: int, size: tuple[int, int], fg, bg, phase: tuple[int, int]):
    """A full-size image of the pattern; shapes are cut out of it with a mask."""
    w, h = size
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    half = max(1, period // 2)
    ox, oy = phase
    if pattern.startswith("stripes"):
        angle = math.radians(int(pattern[7:]))
        # stripes perpendicular to the angle's normal: draw wide lines across the whole image
        nx, ny = math.cos(angle), math.sin(angle)
        reach = w + h
        for k in range(-reach // period - 2, reach // period + 2):
            cx, cy = ox + k * period * ny, oy - k * period * nx
            # a line through (cx, cy) in direction (nx, ny)
            d.line(
                [(cx - nx * reach, cy - ny * reach), (cx + nx * reach, cy + ny * reach)],
                fill=fg,
                width=half,
            )
    elif pattern == "checks":
        for y in range(-period + oy % period, h, period):
            for x in range(-period + ox % period, w, period):
                if ((x - ox) // half + (y - oy) // half) % 2 == 0:
                    d.rectangle([x, y, x + half - 1, y + half - 1], fill=fg)
                    d.rectangle([x + half, y + half, x + period - 1, y + period - 1], fill=fg)
    elif pattern == "dots":
        r = max(1, period // 4 + 1)
        for y in range(oy % period - period, h + period, period):
            for x in range(ox % period - period, w + period, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    elif pattern == "plaid":
        t = max(1, period // 4)
        for y in range(oy % period - period, h + period, period):
            d.rectangle([0, y, w, y + t], fill=fg)
        for x in range(ox % period - period, w + period, period):
            d.rectangle([x, 0, x + t, h], fill=fg)
    elif pattern == "rings":
        r = max(2, period // 2)
        t = max(1, period // 6 + 1)
        for y in range(oy % period - period, h + period, period):
            for x in range(ox % period - period, w + period, period):
                d.ellipse([x - r + 1, y - r + 1, x + r - 1, y + r - 1], outline=fg, width=t)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return img


def _silhouette(category: str, box: tuple[float, float, float, float]) -> list[list[tuple[float, float]]]:
    """Polygons (in image pixels) that draw a category's shape inside box = (l, t, r, b)."""
    l, t, r, b = box
    w, h = r - l, b - t

    def P(u: float, v: float) -> tuple[float, float]:
        return (l + u * w, t + v * h)

    name = category.rsplit("|", 1)[-1]
    if name == "Shirts & Tops":
        return [
            [
                P(0.3, 0),
                P(0.7, 0),
                P(1, 0.25),
                P(0.85, 0.4),
                P(0.78, 0.32),
                P(0.78, 1),
                P(0.22, 1),
                P(0.22, 0.32),
                P(0.15, 0.4),
                P(0, 0.25),
            ]
        ]
    if name == "Handbags":
        return [
            [P(0, 0.35), P(1, 0.35), P(0.9, 1), P(0.1, 1)],
            [
                P(0.3, 0.35),
                P(0.35, 0.05),
                P(0.65, 0.05),
                P(0.7, 0.35),
                P(0.6, 0.35),
                P(0.57, 0.15),
                P(0.43, 0.15),
                P(0.4, 0.35),
            ],
        ]
    if name == "Hats":
        return [
            [
                P(0, 0.75),
                P(0.2, 0.6),
                P(0.25, 0.1),
                P(0.75, 0.1),
                P(0.8, 0.6),
                P(1, 0.75),
                P(1, 0.9),
                P(0, 0.9),
            ]
        ]
    if name == "Pants":
        return [[P(0.15, 0), P(0.85, 0), P(0.95, 1), P(0.6, 1), P(0.5, 0.35), P(0.4, 1), P(0.05, 1)]]
    if name == "Skirts":
        return [[P(0.3, 0), P(0.7, 0), P(1, 1), P(0, 1)]]
    if name == "Shoes":
        return [
            [P(0, 0.45), P(0.35, 0.45), P(0.45, 0.2), P(0.6, 0.2), P(0.65, 0.55), P(1, 0.7), P(1, 1), P(0, 1)]
        ]
    raise ValueError(f"no silhouette for {category!r}")


def _clutter_shape(kind: int, box: tuple[float, float, float, float]) -> list[list[tuple[float, float]]]:
    l, t, r, b = box
    if kind == 0:  # a round plant / lamp
        cx, cy, rx, ry = (l + r) / 2, (t + b) / 2, (r - l) / 2, (b - t) / 2
        return [
            [(cx + rx * math.cos(a / 10 * math.pi), cy + ry * math.sin(a / 10 * math.pi)) for a in range(20)]
        ]
    if kind == 1:  # a framed picture
        return [[(l, t), (r, t), (r, b), (l, b)]]
    return [[((l + r) / 2, t), (r, b), (l, b)]]  # a pennant / triangle


@dataclass
class _Item:
    category: str
    pattern: str
    period: int
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]
    aspect: float
    signature: str


def _draw_item(canvas: Image.Image, polys, pattern: str, period: int, fg, bg, rng: random.Random) -> None:
    tile = _pattern_tile(pattern, period, canvas.size, fg, bg, (rng.randrange(period), rng.randrange(period)))
    mask = Image.new("L", canvas.size, 0)
    md = ImageDraw.Draw(mask)
    for poly in polys:
        md.polygon(poly, fill=255)
    canvas.paste(tile, (0, 0), mask)
    outline = tuple(max(0, c - 90) for c in bg)
    d = ImageDraw.Draw(canvas)
    for poly in polys:
        d.polygon(poly, outline=outline)


def _background(size: int, rng: random.Random) -> Image.Image:
    base = tuple(rng.randint(150, 235) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # soft blotches so the background is not a flat colour
        c = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in base)
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(size // 6, size // 2)
        d.ellipse([x - r, y - r, x + r, y + r], fill=c)
    return img


def _place(rng: random.Random, size: int, n: int, lo: float, hi: float, taken: list) -> list:
    """Non-overlapping boxes (l, t, r, b) in pixels; fewer than n when the canvas is full."""
    boxes = []
    for _ in range(n):
        for _attempt in range(60):
            s = rng.uniform(lo, hi) * size
            w, h = s * rng.uniform(0.8, 1.2), s * rng.uniform(0.8, 1.2)
            l, t = rng.uniform(2, size - w - 2), rng.uniform(2, size - h - 2)
            box = (l, t, l + w, t + h)
            if all(
                box[2] + 3 < o[0] or o[2] + 3 < box[0] or box[3] + 3 < o[1] or o[3] + 3 < box[1]
                for o in taken + boxes
            ):
                boxes.append(box)
                break
    return boxes


def _render_product(item: _Item, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(225, 250) for _ in range(3)))
    s = rng.uniform(0.6, 0.8) * size
    w, h = s, s * item.aspect
    if h > 0.9 * size:
        w, h = w * 0.9 * size / h, 0.9 * size
    l, t = (size - w) / 2 + rng.uniform(-0.05, 0.05) * size, (size - h) / 2 + rng.uniform(-0.05, 0.05) * size
    _draw_item(
        img,
        _silhouette(item.category, (l, t, l + w, t + h)),
        item.pattern,
        item.period,
        item.fg,
        item.bg,
        rng,
    )
    return img


def generate(out: Path, config: SynthConfig = SynthConfig(), progress=None) -> dict[str, int]:
    """Write `<domain>.json`, `<domain>-cat.json` and `images/` under `out`; returns counts."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    categories = list(CATEGORIES)
    pairs: list[dict] = []
    cat_of: dict[str, str] = {}
    product_index = 0
    for scene_index in range(config.scenes):
        look, period = rng.choice(PATTERNS), rng.choice(PERIODS)
        n = rng.randint(config.min_items, config.max_items)
        chosen = rng.sample(categories, n)
        size = config.scene_size
        scene = _background(size, rng)
        boxes = _place(rng, size, n, 0.28, 0.4, [])
        clutter_boxes = _place(rng, size, rng.randint(*config.clutter), 0.18, 0.3, boxes)
        for box in clutter_boxes:  # clutter first: it belongs to no look
            pattern = rng.choice([p for p in PATTERNS if p not in (look, COMPLEMENT[look])])
            _draw_item(
                scene,
                _clutter_shape(rng.randrange(3), box),
                pattern,
                rng.choice(PERIODS),
                *_colour_pair(rng),
                rng,
            )
        scene_sig = _signature("scene", scene_index, config.seed)
        for category, box in zip(chosen, boxes):
            pattern = look if CATEGORIES[category] == "top" else COMPLEMENT[look]
            item = _Item(
                category,
                pattern,
                period,
                *_colour_pair(rng),
                (box[3] - box[1]) / (box[2] - box[0]),
                _signature("product", product_index, config.seed),
            )
            product_index += 1
            _draw_item(scene, _silhouette(category, box), pattern, period, item.fg, item.bg, rng)
            _render_product(item, config.product_size, rng).save(
                images / f"{item.signature}.jpg", quality=config.quality
            )
            cat_of[item.signature] = category
            bbox = [
                round(box[0] / size, 6),
                round(box[1] / size, 6),
                round(box[2] / size, 6),
                round(box[3] / size, 6),
            ]
            pairs.append({"product": item.signature, "scene": scene_sig, "bbox": bbox})
        scene.save(images / f"{scene_sig}.jpg", quality=config.quality)
        if progress is not None:
            progress(1)
    with open(out / f"{config.domain}.json", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    with open(out / f"{config.domain}-cat.json", "w") as f:
        json.dump(cat_of, f)
    return {"scenes": config.scenes, "products": len(cat_of), "pairs": len(pairs)}
