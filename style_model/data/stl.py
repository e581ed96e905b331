"""Reading a dataset folder in Shop The Look's own layout.

    DIR/<domain>.json        scene-product pairs, JSON lines: {"product", "scene", "bbox": [l, t, r, b]}
    DIR/<domain>-cat.json    {product signature: category}
    DIR/images/<sig>.jpg     scene and product images, named by signature (may be absent)

`ctl synth` writes the same layout, so every command runs unchanged on real STL data or generated data.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from style_model.errors import DatasetError


@dataclass(frozen=True)
class Pair:
    product: str
    scene: str
    bbox: tuple[float, float, float, float]  # left, top, right, bottom, normalised, origin top-left


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str


@dataclass
class Dataset:
    root: Path
    domain: str
    pairs: list[Pair]
    categories: dict[str, str]
    bad_records: list[BadRecord]

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, signature: str) -> Path:
        return self.images_dir / f"{signature}.jpg"

    @cached_property
    def products_in_scene(self) -> dict[str, set[str]]:
        """scene signature -> the products paired with it (never negatives for that scene)."""
        out: dict[str, set[str]] = defaultdict(set)
        for p in self.pairs:
            out[p.scene].add(p.product)
        return out

    @cached_property
    def products_by_category(self) -> dict[str, list[str]]:
        """category -> the categorised products that appear in pairs (they have images), sorted."""
        out: dict[str, list[str]] = defaultdict(list)
        for product in sorted({p.product for p in self.pairs}):
            if product in self.categories:
                out[self.categories[product]].append(product)
        return out


def domains(root: Path) -> list[str]:
    """Domains present in a folder: every `<domain>.json` that has a `<domain>-cat.json` beside it."""
    root = Path(root)
    return sorted(
        p.stem
        for p in root.glob("*.json")
        if not p.stem.endswith("-cat") and (root / f"{p.stem}-cat.json").exists()
    )


def _parse_pair(line: str) -> Pair:
    rec = json.loads(line)
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    product, scene, bbox = rec.get("product"), rec.get("scene"), rec.get("bbox")
    if not isinstance(product, str) or not product or not isinstance(scene, str) or not scene:
        raise ValueError("missing 'product' or 'scene' signature")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
        raise ValueError("'bbox' must be four numbers [left, top, right, bottom]")
    left, top, right, bottom = (float(v) for v in bbox)
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise ValueError(f"'bbox' {bbox} is not a normalised box with left < right and top < bottom")
    return Pair(product, scene, (left, top, right, bottom))


def load_dataset(root: Path | str, domain: str | None = None) -> Dataset:
    """Read pairs and categories; malformed lines are kept in `bad_records`, never silently dropped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found = domains(root)
    if domain is None:
        if len(found) != 1:
            what = ", ".join(found) if found else "none"
            raise DatasetError(
                f"{root}: expected exactly one <domain>.json with a <domain>-cat.json beside it, "
                f"found: {what}; pick one with --domain"
            )
        domain = found[0]
    elif domain not in found:
        raise DatasetError(
            f"{root}: no domain {domain!r} (need {domain}.json and {domain}-cat.json); found: {found}"
        )
    try:
        with open(root / f"{domain}-cat.json") as f:
            categories = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{root / f'{domain}-cat.json'}: cannot read: {exc}") from exc
    if not isinstance(categories, dict):
        raise DatasetError(f"{root / f'{domain}-cat.json'}: expected one JSON object {{signature: category}}")
    pairs: list[Pair] = []
    bad: list[BadRecord] = []
    with open(root / f"{domain}.json") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pairs.append(_parse_pair(line))
            except (ValueError, TypeError) as exc:
                bad.append(BadRecord(number, str(exc)))
    return Dataset(root, domain, pairs, {str(k): str(v) for k, v in categories.items()}, bad)
