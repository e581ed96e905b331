"""`ctl recommend`: ask a running ranker, print the ranking as a table, optionally write it as HTML."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ctl.ingest.catalog import read_catalog
from ctl.report import SceneSection, ShownProduct
from ctl.v1 import ranker_pb2

MODES = {
    "pooled": ranker_pb2.RETRIEVAL_MODE_POOLED,
    "exhaustive": ranker_pb2.RETRIEVAL_MODE_EXHAUSTIVE,
    "certify": ranker_pb2.RETRIEVAL_MODE_CERTIFY,
}


def request(
    scene: bytes, categories: list[str], limit: int = 10, explain: bool = False, mode: str = "pooled"
) -> ranker_pb2.RecommendRequest:
    return ranker_pb2.RecommendRequest(
        scene_image=scene, categories=categories, limit=limit, explain=explain, mode=MODES[mode]
    )


def format_table(reply: ranker_pb2.RecommendResponse, explain: bool) -> str:
    """One block per category: rank, product id, distance (and its global/local parts with explain)."""
    out = [f"model {reply.model_version}"]
    for result in reply.results:
        mode = ranker_pb2.RetrievalMode.Name(result.mode).removeprefix("RETRIEVAL_MODE_").lower()
        out.append(
            f"\n{result.category}: {len(result.products)} of {result.category_size} products "
            f"({mode}, {result.candidates_scored} scored{', certified exact' if result.certified else ''})"
        )
        width = max([10, *(len(p.product_id) for p in result.products)])
        head = f"{'rank':>4}  {'product':<{width}}  {'distance':>8}"
        out.append(head + (f"  {'global':>8}  {'local':>8}" if explain else ""))
        for rank, p in enumerate(result.products, 1):
            line = f"{rank:>4}  {p.product_id:<{width}}  {p.distance:>8.4f}"
            out.append(line + (f"  {p.global_distance:>8.4f}  {p.local_distance:>8.4f}" if explain else ""))
    return "\n".join(out)


def catalog_images(catalog: Path, images: Path | None = None, fmt: str | None = None) -> dict[str, Path]:
    """Product id -> image file, from an ingestion catalog (for showing the products)."""
    root = images or Path(catalog).parent
    found: dict[str, Path] = {}
    for record in read_catalog(Path(catalog), fmt):
        if not record.problem and record.product_id not in found:
            path = Path(record.image)
            found[record.product_id] = path if path.is_absolute() else root / path
    return found


def section(
    title: str,
    scene: bytes,
    reply: ranker_pb2.RecommendResponse,
    image_of: Callable[[str], bytes | None] = lambda _: None,
    notes: list[str] | None = None,
    note_of: Callable[[str], str | None] = lambda _: None,
) -> SceneSection:
    """The reply as a report section (asked with explain, for the attention)."""
    categories = {
        result.category: [
            ShownProduct(
                rank=rank,
                product_id=p.product_id,
                distance=p.distance,
                global_distance=p.global_distance,
                local_distance=p.local_distance,
                attention=list(p.attention),
                image=image_of(p.product_id),
                metadata=dict(p.metadata),
                note=note_of(p.product_id) or "",
            )
            for rank, p in enumerate(result.products, 1)
        ]
        for result in reply.results
    }
    return SceneSection(title, scene, reply.grid, categories, notes or [])


def file_reader(paths: dict[str, Path]) -> Callable[[str], bytes | None]:
    def read(product_id: str) -> bytes | None:
        path = paths.get(product_id)
        try:
            return path.read_bytes() if path else None
        except OSError:
            return None

    return read
