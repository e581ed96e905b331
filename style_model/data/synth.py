"""`ctl synth`: a generated outfit dataset in Shop The Look's own on-disk layout.

The hidden compatibility rule, learnable but not a colour-matching game:
- A scene shows one *look*: a pattern family (stripes at four angles, checks, dots, plaid, rings) at
  one scale. `looks` picks how many: the first N of every pattern at 12 px, then at 22 px, then at 32 px
  (8 = one scale, 16 = two, the default; 24 = three). A scene draws its pattern, then one of its scales.
- Tops and accessories wear the look itself; what bottoms (pants, skirts, shoes) wear is the `rule`:
  `complement` (default) its complement pattern (a fixed pairing of pattern families) at the same scale;
  `same` the look itself; `shifted` the pattern three places on (in PATTERNS order) at the next scale, so
  a model trained under one rule has learned something else under another.
- Colours are drawn independently for every item, in every rule, so a colour histogram says nothing
  about the look.
- Scenes hold `items` products of different categories plus `clutter` objects (patterns that nobody in
  the scene wears, so they belong to no look), at random places and sizes, on a textured background.
- By default every product is new, unique to its scene. With `products_per_category` N there is a fixed
  catalogue instead: product k of a category wears what that category wears in look k mod looks, with its
  own colours and shape, so N >= looks gives every look a product in every category (a smaller N is
  refused rather than leaving scenes short of products). A scene picks among the catalogue products that
  fit its look, so popular products recur across scenes as in real Shop The Look.
- Every product in a scene is a record `{"product", "scene", "bbox"}`; its catalogue image shows the
  same item (shape, pattern, scale, colours) alone. Images are JPEG files named by signature.
Everything downstream reads this folder exactly as it reads a real STL folder. Beside it, `synth.json`
holds the SynthConfig that made it and `synth-truth.json` the hidden answers: each scene's look and
number of clutter objects, each product's pattern, scale and colours.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Pillow is imported where images are drawn: `ctl --help` and the ranker's image stay without it
if TYPE_CHECKING:
    from PIL import Image

from style_model.errors import ConfigError

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
PERIODS = (12, 22, 32)  # pattern scales in pixels at the generated resolution; 16 looks use the first two
RULES = ("complement", "same", "shifted")
SIDECARS = ("synth", "synth-truth")  # synth.json, synth-truth.json: no domain may take these names
Look = tuple[str, int]  # (pattern, period)


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
    looks: int = 16
    products_per_category: int | None = None  # None: every product is unique to its scene
    rule: str = "complement"

    def __post_init__(self) -> None:
        """Refuse settings that would fail halfway through a long run, or quietly make something else."""
        most = len(PATTERNS) * len(PERIODS)
        problems = [
            (self.scenes < 1, f"scenes {self.scenes}: need at least 1"),
            (
                not 1 <= self.min_items <= self.max_items <= len(CATEGORIES),
                f"items {self.min_items},{self.max_items}: need 1 <= MIN <= MAX <= {len(CATEGORIES)} "
                "(one product per category in a scene)",
            ),
            (
                not 0 <= self.clutter[0] <= self.clutter[1],
                f"clutter {self.clutter[0]},{self.clutter[1]}: need 0 <= MIN <= MAX",
            ),
            (
                not 1 <= self.looks <= most,
                f"looks {self.looks}: need 1..{most} ({len(PATTERNS)} patterns x {len(PERIODS)} scales)",
            ),
            (self.rule not in RULES, f"rule {self.rule!r}: expected one of {', '.join(RULES)}"),
            (
                self.products_per_category is not None and self.products_per_category < self.looks,
                f"products per category {self.products_per_category}: need at least looks ({self.looks}) "
                "so that every look has a product in every category",
            ),
            (min(self.scene_size, self.product_size) < 64, "size: need at least 64 pixels"),
            (
                not self.domain or "/" in self.domain or self.domain in SIDECARS,
                f"domain {self.domain!r}: need a file name other than {', '.join(SIDECARS)}",
            ),
        ]
        bad = [message for failed, message in problems if failed]
        if bad:
            raise ConfigError("synth: " + "; ".join(bad))


def _min_max(text: str) -> tuple[int, int]:
    """`MIN,MAX` or one number for both; the values are checked by SynthConfig."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN,MAX (two whole numbers) or one number")
    return values[0], values[-1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every `ctl synth` flag but --out; `config_from_args` turns them into a SynthConfig."""
    d = SynthConfig()
    p.add_argument("--scenes", type=int, default=d.scenes)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--domain", default=d.domain)
    p.add_argument(
        "--items",
        type=_min_max,
        default=(d.min_items, d.max_items),
        metavar="MIN,MAX",
        help=f"products per scene (default {d.min_items},{d.max_items})",
    )
    p.add_argument(
        "--clutter",
        type=_min_max,
        default=d.clutter,
        metavar="MIN,MAX",
        help=f"objects of no look per scene; 0,0 for none (default {d.clutter[0]},{d.clutter[1]})",
    )
    p.add_argument(
        "--looks",
        type=int,
        default=d.looks,
        help="distinct looks: 8 patterns at 12 px, then at 22 px, then at 32 px (1..24, default %(default)s)",
    )
    p.add_argument(
        "--products-per-category",
        type=int,
        metavar="N",
        help="a fixed catalogue of N products per category (N >= --looks) that scenes re-use; "
        "default: every product unique to its scene",
    )
    p.add_argument(
        "--rule",
        choices=RULES,
        default=d.rule,
        help="what bottoms wear: complement (the paired pattern, same scale; default), same (the look), "
        "shifted (the pattern 3 on, the next scale)",
    )
    p.add_argument("--size", type=int, default=d.scene_size, help="scene and product image side in pixels")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The SynthConfig of parsed `add_arguments` flags; ConfigError names a bad value."""
    return SynthConfig(
        scenes=args.scenes,
        seed=args.seed,
        domain=args.domain,
        min_items=args.items[0],
        max_items=args.items[1],
        clutter=tuple(args.clutter),
        looks=args.looks,
        products_per_category=args.products_per_category,
        rule=args.rule,
        scene_size=args.size,
        product_size=args.size,
    )


def looks(n: int) -> list[Look]:
    """The first n looks, one scale after another: 8 = every pattern at the finest scale."""
    return [(pattern, period) for period in PERIODS for pattern in PATTERNS][:n]


def worn(rule: str, category: str, look: Look, n_looks: int = 16) -> Look:
    """The (pattern, period) a product of `category` wears in a scene of `look` under `rule`."""
    pattern, period = look
    if CATEGORIES[category] == "top" or rule == "same":
        return look
    if rule == "complement":
        return COMPLEMENT[pattern], period
    # shifted: the scales used by n_looks looks (at least two, so there is always a next one) form a cycle
    scales = PERIODS[: max(2, math.ceil(n_looks / len(PATTERNS)))]
    return (
        PATTERNS[(PATTERNS.index(pattern) + 3) % len(PATTERNS)],
        scales[(scales.index(period) + 1) % len(scales)],
    )


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
    from PIL import Image, ImageDraw

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
    from PIL import Image, ImageDraw

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
    from PIL import Image, ImageDraw

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
    from PIL import Image

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


def _catalogue(config: SynthConfig, n: int) -> dict[tuple[str, Look], list[_Item]]:
    """(category, what it wears) -> the catalogue products that fit; product k of a category wears what the
    category wears in look k mod looks, so every look has ⌊N / looks⌋ or more products in every category."""
    rng = random.Random(f"ctl-synth-catalogue:{config.seed}")
    all_looks = looks(config.looks)
    out: dict[tuple[str, Look], list[_Item]] = defaultdict(list)
    for category in CATEGORIES:
        for k in range(n):
            wears = worn(config.rule, category, all_looks[k % len(all_looks)], config.looks)
            signature = _signature(f"catalogue:{category}", k, config.seed)
            out[category, wears].append(
                _Item(category, *wears, *_colour_pair(rng), rng.uniform(0.75, 1.33), signature)
            )
    return out


def _fit(box: tuple[float, float, float, float], aspect: float) -> tuple[float, float, float, float]:
    """The largest box of height / width `aspect` centred in `box`: a catalogue product keeps its shape."""
    l, t, r, b = box
    w, h = r - l, b - t
    w, h = min(w, h / aspect), min(h, w * aspect)
    cx, cy = (l + r) / 2, (t + b) / 2
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def generate(out: Path, config: SynthConfig = SynthConfig(), progress=None) -> dict[str, int]:
    """Write `<domain>.json`, `<domain>-cat.json`, `images/` and the sidecars under `out`; returns counts."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    categories = list(CATEGORIES)
    scales_of: dict[str, list[int]] = defaultdict(list)  # pattern -> its scales among the looks
    for pattern, period in looks(config.looks):
        scales_of[pattern].append(period)
    patterns = list(scales_of)
    clutter_scales = sorted(
        {worn(config.rule, c, look, config.looks)[1] for c in categories for look in looks(config.looks)}
    )
    n_catalogue = config.products_per_category
    catalogue = _catalogue(config, n_catalogue) if n_catalogue else None
    pairs: list[dict] = []
    cat_of: dict[str, str] = {}
    truth: dict[str, dict] = {"scenes": {}, "products": {}}
    product_index = 0
    for scene_index in range(config.scenes):
        look_pattern = rng.choice(patterns)
        look = (look_pattern, rng.choice(scales_of[look_pattern]))
        n = rng.randint(config.min_items, config.max_items)
        chosen = rng.sample(categories, n)
        size = config.scene_size
        scene = _background(size, rng)
        boxes = _place(rng, size, n, 0.28, 0.4, [])
        clutter_boxes = _place(rng, size, rng.randint(*config.clutter), 0.18, 0.3, boxes)
        in_scene = {worn(config.rule, c, look, config.looks)[0] for c in categories}
        for box in clutter_boxes:  # clutter first: it belongs to no look
            pattern = rng.choice([p for p in PATTERNS if p not in in_scene])
            _draw_item(
                scene,
                _clutter_shape(rng.randrange(3), box),
                pattern,
                rng.choice(clutter_scales),
                *_colour_pair(rng),
                rng,
            )
        scene_sig = _signature("scene", scene_index, config.seed)
        truth["scenes"][scene_sig] = {"look": list(look), "clutter": len(clutter_boxes)}
        for category, box in zip(chosen, boxes):
            wears = worn(config.rule, category, look, config.looks)
            if catalogue is None:
                item = _Item(
                    category,
                    *wears,
                    *_colour_pair(rng),
                    (box[3] - box[1]) / (box[2] - box[0]),
                    _signature("product", product_index, config.seed),
                )
                product_index += 1
                render_rng = rng
            else:
                item = rng.choice(catalogue[category, wears])
                box = _fit(box, item.aspect)
                render_rng = random.Random(item.signature)  # the same image whichever scene shows it first
            _draw_item(scene, _silhouette(category, box), item.pattern, item.period, item.fg, item.bg, rng)
            if item.signature not in cat_of:
                _render_product(item, config.product_size, render_rng).save(
                    images / f"{item.signature}.jpg", quality=config.quality
                )
                cat_of[item.signature] = category
                truth["products"][item.signature] = {
                    "pattern": item.pattern,
                    "period": item.period,
                    "colours": [item.fg, item.bg],
                }
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
    (out / "synth.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    (out / "synth-truth.json").write_text(json.dumps(truth))
    return {"scenes": config.scenes, "products": len(cat_of), "pairs": len(pairs)}
