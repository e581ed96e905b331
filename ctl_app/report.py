"""Recommendations as one self-contained HTML page: the scene, the attention over it, the products.

Images are embedded as data URIs, so the page can be mailed or archived. The scene is shown letterboxed
in a square (`object-fit: contain`), exactly as the model sees it, so the grid × grid attention cells
lie over the regions they weigh. No image library is needed (the ranker's side has no torch or Pillow).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

MIME = {
    b"\xff\xd8\xff": "image/jpeg",
    b"\x89PNG": "image/png",
    b"GIF8": "image/gif",
    b"RIFF": "image/webp",
    b"BM": "image/bmp",
}


@dataclass
class ShownProduct:
    rank: int
    product_id: str
    distance: float
    global_distance: float
    local_distance: float
    attention: list[float]
    image: bytes | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    note: str = ""  # e.g. "held-out true product"


@dataclass
class SceneSection:
    title: str
    scene: bytes
    grid: int
    categories: dict[str, list[ShownProduct]]  # category -> ranked products
    notes: list[str] = field(default_factory=list)


def data_uri(image: bytes) -> str:
    mime = next((m for magic, m in MIME.items() if image.startswith(magic)), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def _heatmap(scene_uri: str, grid: int, attention: list[float], size: int, label: str) -> str:
    """The scene in a square with one cell per region, shaded from clear (the least weighted region) to
    red (the most); all clear when the attention is uniform."""
    low, high = (min(attention), max(attention)) if attention else (0.0, 0.0)
    span = high - low if high - low > 1e-4 else 0.0
    shade = [((w - low) / span if span else 0.0) * 0.7 for w in attention]
    cells = "".join(
        f'<div class="cell" data-weight="{w:.6f}" style="opacity:{s:.3f}"></div>'
        for w, s in zip(attention, shade)
    )
    return (
        f'<div class="heat" style="width:{size}px;height:{size}px" aria-label="{html.escape(label)}">'
        f'<img class="scene" src="{scene_uri}" alt="scene">'
        f'<div class="grid" style="grid-template-columns:repeat({grid},1fr)">{cells}</div></div>'
    )


def _product_row(p: ShownProduct, scene_uri: str, grid: int) -> str:
    image = (
        f'<img class="product" src="{data_uri(p.image)}" alt="{html.escape(p.product_id)}">'
        if p.image
        else '<span class="noimage">no image</span>'
    )
    meta = ", ".join(f"{html.escape(k)}={html.escape(v)}" for k, v in sorted(p.metadata.items()))
    heat = _heatmap(scene_uri, grid, p.attention, 96, f"attention of {p.product_id}") if p.attention else ""
    note = f'<div class="note">{html.escape(p.note)}</div>' if p.note else ""
    return (
        f'<tr class="rec" data-product-id="{html.escape(p.product_id)}">'
        f'<td class="rank">{p.rank}</td><td>{image}</td>'
        f'<td><div class="pid">{html.escape(p.product_id)}</div>{note}<div class="meta">{meta}</div></td>'
        f'<td class="num">{p.distance:.4f}</td><td class="num">{p.global_distance:.4f}</td>'
        f'<td class="num">{p.local_distance:.4f}</td><td>{heat}</td></tr>'
    )


def _section(s: SceneSection) -> str:
    scene_uri = data_uri(s.scene)
    first = next((ps[0] for ps in s.categories.values() if ps), None)
    main = (
        _heatmap(scene_uri, s.grid, first.attention, 320, "attention of the best product")
        if first and first.attention
        else f'<img class="scene-only" src="{scene_uri}" alt="scene">'
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in s.notes)
    tables = []
    for category, products in s.categories.items():
        rows = "".join(_product_row(p, scene_uri, s.grid) for p in products)
        tables.append(
            f'<h3 class="category">{html.escape(category)}</h3>'
            "<table><thead><tr><th>#</th><th>product</th><th>id</th><th>distance</th><th>global</th>"
            f"<th>local</th><th>attention</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return (
        f'<section class="scene-section"><h2>{html.escape(s.title)}</h2>'
        f'<div class="layout"><div class="left">{main}'
        '<p class="caption">Scene as the model sees it (letterboxed); shading: attention of the best '
        f"product over the {s.grid}×{s.grid} regions, clear = least weighted, red = most.</p>"
        f"<ul>{notes}</ul></div>"
        f'<div class="right">{"".join(tables)}</div></div></section>'
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:32px} h3{font-size:15px;margin:16px 0 4px}
.layout{display:flex;gap:24px;align-items:flex-start}
.heat{position:relative;background:#7c7468;flex:none}
.heat img.scene{width:100%;height:100%;object-fit:contain;display:block}
.grid{position:absolute;inset:0;display:grid}
.cell{background:#ff3b1f;outline:1px solid rgba(255,255,255,.25)}
table{border-collapse:collapse} td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}
td.num{font-variant-numeric:tabular-nums;text-align:right}
img.product{width:96px;height:96px;object-fit:contain;background:#eee}
.scene-only{max-width:320px} .meta{color:#777;font-size:12px} .note{color:#0a7a2f;font-size:12px}
.caption{font-size:12px;color:#666;max-width:320px}
"""


def write_report(path: Path, title: str, sections: list[SceneSection], footer: str = "") -> Path:
    """Writes the page; returns its path."""
    body = "".join(_section(s) for s in sections)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f'<p class="footer">{html.escape(footer)}</p></body></html>\n'
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
