"""Complete-The-Look examples from Shop-The-Look pairs.

For each pair: the scene is cropped to the largest part that does not overlap the product's box (so
the product is not visible), the pair's product is the positive, and a random product of the same
category that does not appear in that scene is the negative. The split is by scene, deterministic
(a hash of the scene signature), so one scene never feeds two splits. Everything left out is counted
with its reason and can be written to a report file: nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from style_model.data.stl import Dataset

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Example:
    scene: str
    crop: Box  # normalised (left, top, right, bottom) of the scene part shown
    positive: str
    negative: str
    category: str
    split: str


@dataclass
class BuildReport:
    """Counts and reasons; `skipped` lists (record, reason) for every pair that made no example."""

    pairs: int = 0
    examples_by_split: Counter = field(default_factory=Counter)
    examples_by_category: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    negatives_redrawn: int = 0  # examples whose first-drawn negative had no usable image
    bad_records: list[tuple[int, str]] = field(default_factory=list)

    @property
    def skipped_by_reason(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.skipped)

    def to_dict(self) -> dict:
        return {
            "pairs": self.pairs,
            "examples_by_split": dict(self.examples_by_split),
            "examples_by_category": dict(self.examples_by_category.most_common()),
            "skipped_by_reason": dict(self.skipped_by_reason),
            "negatives_redrawn": self.negatives_redrawn,
            "skipped": [{"record": r, "reason": why} for r, why in self.skipped],
            "missing_images": self.missing_images,
            "unreadable_images": self.unreadable_images,
            "bad_records": [{"line": n, "reason": why} for n, why in self.bad_records],
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def largest_free_crop(bbox: Box) -> Box:
    """The largest axis-aligned strip of the unit square that does not overlap bbox."""
    left, top, right, bottom = bbox
    strips = [
        ((0.0, 0.0, left, 1.0), left),
        ((right, 0.0, 1.0, 1.0), 1.0 - right),
        ((0.0, 0.0, 1.0, top), top),
        ((0.0, bottom, 1.0, 1.0), 1.0 - bottom),
    ]
    return max(strips, key=lambda s: s[1])[0]


def split_of(scene: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Deterministic split by scene signature: the same scene lands in the same split on every machine."""
    u = int.from_bytes(hashlib.sha256(scene.encode()).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def seeded_rng(seed: int, *parts: str) -> random.Random:
    """A generator fixed by the seed and the parts (scene, product...): draws do not shift when records are
    added elsewhere."""
    return random.Random(hashlib.sha256(":".join((str(seed), *parts)).encode()).digest())


def build_examples(
    dataset: Dataset,
    min_crop: float = 0.2,
    seed: int = 0,
    check_images: bool = True,
    unreadable: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[Example], BuildReport]:
    """One example per usable pair; see the module docstring. `min_crop` is the smallest crop kept,
    as a fraction of the scene (a strip spans the scene, so this is both its area and narrow side).

    With `check_images`, an image is usable when its file exists and it is not in `unreadable` (files
    that failed to decode). A pair whose scene or product has no usable image is skipped; a negative
    without one is drawn again among the products that have one (counted in `negatives_redrawn`), so a
    partial image folder loses only the pairs it must. Without missing images the draws are the same."""
    report = BuildReport(
        pairs=len(dataset.pairs), bad_records=[(b.line, b.reason) for b in dataset.bad_records]
    )
    in_scene, by_category = dataset.products_in_scene, dataset.products_by_category

    present: dict[str, bool] = {}

    def has_image(sig: str) -> bool:
        if not check_images:
            return True
        if sig not in present:
            if sig in unreadable:
                present[sig] = False
                report.unreadable_images.append(sig)
            else:
                present[sig] = dataset.image_path(sig).is_file()
                if not present[sig]:
                    report.missing_images.append(sig)
        return present[sig]

    examples: list[Example] = []
    for p in dataset.pairs:
        record = f"{p.scene}/{p.product}"
        category = dataset.categories.get(p.product)
        if category is None:
            report.skipped.append((record, f"no category: product {p.product} is not in the category file"))
            continue
        crop = largest_free_crop(p.bbox)
        share = (crop[2] - crop[0]) * (crop[3] - crop[1])
        if share < min_crop:
            report.skipped.append((record, f"crop too small: {share:.2f} of the scene < min_crop {min_crop}"))
            continue
        if not (has_image(p.scene) and has_image(p.product)):
            missing = [s for s in (p.scene, p.product) if not has_image(s)]
            what = "unreadable image" if set(missing) & unreadable else "missing image"
            report.skipped.append((record, f"{what}: {', '.join(missing)}"))
            continue
        pool = by_category[category]
        rng = seeded_rng(seed, p.scene, p.product)
        negative, redrawn = None, False
        for _ in range(20):  # rejection sampling: scenes hold few products, so this ends fast
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in in_scene[p.scene]:
                if has_image(candidate):
                    negative = candidate
                    break
                redrawn = True
        if negative is None:
            outside = [c for c in pool if c not in in_scene[p.scene] and has_image(c)]
            if not outside:
                report.skipped.append(
                    (record, f"no negative: no {category!r} product outside this scene has an image")
                )
                continue
            negative = outside[rng.randrange(len(outside))]
        report.negatives_redrawn += redrawn
        split = split_of(p.scene)
        examples.append(Example(p.scene, crop, p.product, negative, category, split))
        report.examples_by_split[split] += 1
        report.examples_by_category[category] += 1
    return examples, report


def images_needed(dataset: Dataset, min_crop: float = 0.2, seed: int = 0) -> list[str]:
    """Signatures of every image the examples of `dataset` can use, whether present or not: the scene and
    the product of every usable pair, and every product of their categories (a possible negative).
    What `ctl examples --needed` writes and `ctl fetch-images` fetches."""
    examples, _ = build_examples(dataset, min_crop=min_crop, seed=seed, check_images=False)
    # when a negative's image is missing another product of its category is drawn: any can be needed
    pool = {p for c in {e.category for e in examples} for p in dataset.products_by_category[c]}
    return sorted({s for e in examples for s in (e.scene, e.positive, e.negative)} | pool)
