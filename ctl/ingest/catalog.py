"""Reading a product catalog: JSON lines or CSV, one product per record.

Columns (JSON keys): `product_id` (or `id`), `category`, `image` (a file path, relative to the images
folder), and metadata: a `metadata` object in JSON lines, `metadata.KEY` columns in CSV, or any column
named with `--metadata-columns`. Anything else is an unknown column. A record that cannot be read is
yielded with its `problem` set, so that the job reports it instead of dropping it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("jsonl", "csv")
ID_COLUMNS = ("product_id", "id")
REQUIRED = ("category", "image")
METADATA_PREFIX = "metadata."


@dataclass(frozen=True)
class CatalogRecord:
    """One product as the catalog gives it. `line`: where it starts in the file (1-based)."""

    line: int
    product_id: str
    category: str = ""
    image: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    problem: str = ""  # why it cannot be ingested; "" when it can


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, unknown format, no header)."""


def catalog_format(path: Path, given: str | None = None) -> str:
    if given:
        if given not in FORMATS:
            raise CatalogError(f"--format {given!r}: expected one of {', '.join(FORMATS)}")
        return given
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise CatalogError(f"{path}: cannot tell the format from the suffix {suffix!r}; give --format jsonl|csv")


def read_catalog(
    path: Path, fmt: str | None = None, metadata_columns: tuple[str, ...] = ()
) -> Iterator[CatalogRecord]:
    """The catalog's records in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: no such catalog file")
    if catalog_format(path, fmt) == "csv":
        yield from _read_csv(path, metadata_columns)
    else:
        yield from _read_jsonl(path, metadata_columns)


def _read_jsonl(path: Path, metadata_columns: tuple[str, ...]) -> Iterator[CatalogRecord]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield CatalogRecord(number, _guess_id(line), problem=f"not valid JSON: {exc.msg}")
                continue
            if not isinstance(row, dict):
                yield CatalogRecord(number, "", problem="not a JSON object")
                continue
            metadata = row.pop("metadata", {})
            if not isinstance(metadata, dict):
                product_id = _text(row.get("product_id", row.get("id")))
                yield CatalogRecord(number, product_id, problem="metadata: expected an object of strings")
                continue
            yield _record(number, row, dict(metadata), metadata_columns)


def _read_csv(path: Path, metadata_columns: tuple[str, ...]) -> Iterator[CatalogRecord]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [h.strip() for h in row]
                continue
            number = reader.line_num
            if len(row) != len(header):
                values = dict(zip(header, row))
                yield CatalogRecord(
                    number,
                    _text(values.get("product_id", values.get("id"))),
                    problem=f"{len(row)} fields where the header has {len(header)}",
                )
                continue
            values = dict(zip(header, row))
            metadata = {
                k[len(METADATA_PREFIX) :]: v for k, v in values.items() if k.startswith(METADATA_PREFIX)
            }
            plain = {k: v for k, v in values.items() if not k.startswith(METADATA_PREFIX)}
            yield _record(number, plain, metadata, metadata_columns)
        if header is None:
            raise CatalogError(f"{path}: empty CSV (expected a header: product_id,category,image,...)")


def _record(number: int, row: dict, metadata: dict, metadata_columns: tuple[str, ...]) -> CatalogRecord:
    product_id = _text(row.get("product_id", row.get("id")))
    for name in metadata_columns:
        if name in row:
            metadata[name] = row.pop(name)
    known = {*ID_COLUMNS, *REQUIRED}
    unknown = sorted(k for k in row if k not in known)
    problems = []
    if unknown:
        problems.append(
            f"unknown column {', '.join(map(repr, unknown))} (known: product_id, category, image; "
            "metadata goes in 'metadata' / 'metadata.KEY' or is named with --metadata-columns)"
        )
    if "product_id" in row and "id" in row:
        problems.append("both 'product_id' and 'id' given")
    if not product_id:
        problems.append("product_id is missing or empty")
    for name in REQUIRED:
        if not _text(row.get(name)):
            problems.append(f"{name} is missing or empty")
    bad_meta = sorted(k for k, v in metadata.items() if not isinstance(v, str | int | float | bool))
    if bad_meta:
        problems.append(f"metadata {', '.join(map(repr, bad_meta))}: values must be strings or numbers")
    image = _text(row.get("image"))
    if "://" in image:
        problems.append(f"image {image!r} is a URL: give a file path (images are not downloaded)")
    return CatalogRecord(
        line=number,
        product_id=product_id,
        category=_text(row.get("category")),
        image=image,
        metadata={str(k): _text(v) for k, v in metadata.items()},
        problem="; ".join(problems),
    )


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value).strip()
    return ""


def _guess_id(line: str) -> str:
    """A broken JSON line's product id, if one can be seen (for the error report)."""
    for key in ID_COLUMNS:
        marker = f'"{key}"'
        at = line.find(marker)
        if at >= 0:
            rest = line[at + len(marker) :].lstrip(" :")
            if rest.startswith('"'):
                return rest[1:].split('"', 1)[0]
    return ""
