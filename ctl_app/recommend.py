"""`ctl recommend`: ask a running ranker, print the ranking as a table, optionally write it as HTML."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ctl.terminal import printable
from ctl.v1 import ranker_pb2
from ctl_app.ingest.catalog import ImageFileError, read_catalog, read_image
from ctl_app.report import SceneSection, ShownProduct
from ranker_service.retrieval_mode import RetrievalMode
from ranker_service.service import mode_from_proto, mode_to_proto

log = logging.getLogger(__name__)


def request(
    scene: bytes,
    categories: list[str],
    limit: int = 10,
    explain: bool = False,
    mode: str = RetrievalMode.POOLED.value,
) -> ranker_pb2.RecommendRequest:
    """`mode`: a RetrievalMode's value (`ctl recommend --mode`)."""
    return ranker_pb2.RecommendRequest(
        scene_image=scene,
        categories=categories,
        limit=limit,
        explain=explain,
        mode=mode_to_proto(RetrievalMode(mode)),
    )


def format_table(reply: ranker_pb2.RecommendResponse, explain: bool) -> str:
    """One block per category: rank, product id, distance (and its global/local parts with explain). Ids,
    categories and the model version are the catalog's data: their control characters are escaped."""
    out = [f"model {printable(reply.model_version)}"]
    for result in reply.results:
        mode = mode_from_proto(result.mode).value
        out.append(
            f"\n{printable(result.category)}: {len(result.products)} of {result.category_size} products "
            f"({mode}, {result.candidates_scored} scored{', certified exact' if result.certified else ''})"
        )
        ids = [printable(p.product_id) for p in result.products]
        width = max([10, *map(len, ids)])
        head = f"{'rank':>4}  {'product':<{width}}  {'distance':>8}"
        out.append(head + (f"  {'global':>8}  {'local':>8}" if explain else ""))
        for rank, (shown, p) in enumerate(zip(ids, result.products), 1):
            line = f"{rank:>4}  {shown:<{width}}  {p.distance:>8.4f}"
            out.append(line + (f"  {p.global_distance:>8.4f}  {p.local_distance:>8.4f}" if explain else ""))
    return "\n".join(out)


def catalog_images(
    catalog: Path, images: Path | None = None, fmt: str | None = None, allow_outside: bool = False
) -> Callable[[str], bytes | None]:
    """Product id -> its image's bytes, from an ingestion catalog (for showing the products), read as the
    job reads them (`read_image`: under `images`, by default the catalog's folder, unless `allow_outside`;
    regular files within the encoder's limit). None for a product with no readable image, with a warning
    naming the file and the reason."""
    root = images or Path(catalog).parent
    found: dict[str, str] = {}
    for record in read_catalog(Path(catalog), fmt):
        if not record.problem and record.product_id not in found:
            found[record.product_id] = record.image

    def read(product_id: str) -> bytes | None:
        if product_id not in found:
            return None
        try:
            return read_image(root, found[product_id], allow_outside=allow_outside)
        except ImageFileError as exc:
            log.warning("product %r: not shown: %s", product_id, exc)
            return None

    return read


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
