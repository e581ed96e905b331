"""Recommend latency while the queried category keeps receiving products (a catalog being ingested).

    python -m bench.recommend_while_ingesting --products 100000 --rounds 300

In-process, on the embedded store: a synthetic catalog (10 categories), then `--rounds` times: upsert
`--batch` new products into category-00 (what one UpsertProducts batch does, including telling the
retriever that the category changed), then one pooled Recommend for that category, limit 10. Prints the
Recommend latency p50/p95/p99 and the wall time of the whole loop: the category's mean attention key
must be recomputed after changes, and this shows whether that lands on the queries.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, synthetic_catalog, synthetic_scenes, table
from ranker_service.retrieval import Ask, Retriever
from ranker_service.retrieval_mode import RetrievalMode
from ranker_service.store.base import ProductPoint, Query
from ranker_service.store.edge import open_edge_store

DIM, REGIONS, VERSION, LOAD_BATCH = 128, 16, "bench", 5000


def points(catalog, rows: np.ndarray, prefix: str = "") -> list[ProductPoint]:
    return [
        ProductPoint(
            prefix + catalog.ids[i],
            catalog.names[catalog.categories[i]],
            catalog.styles[i],
            catalog.keys[i],
            {},
            VERSION,
        )
        for i in rows
    ]


async def run(products: int, rounds: int, batch: int, work: Path) -> None:
    catalog = synthetic_catalog(products, DIM)
    arriving = synthetic_catalog(rounds * batch, DIM, categories=1, seed=7)  # all of category-00
    scenes = synthetic_scenes(20, DIM, REGIONS)
    store = await open_edge_store(work / "store", VERSION, DIM)
    retriever = Retriever(store)
    try:
        for start in range(0, products, LOAD_BATCH):
            await store.upsert(points(catalog, np.arange(start, min(start + LOAD_BATCH, products))))
        await retriever.warm()  # as a starting ranker does
        ask = Ask(Query(catalog.names[0]), limit=10, mode=RetrievalMode.POOLED)
        latencies = []
        began = time.perf_counter()
        for r in range(rounds):
            await store.upsert(points(arriving, np.arange(r * batch, (r + 1) * batch), prefix="new-"))
            retriever.forget({catalog.names[0]})
            await asyncio.sleep(0)  # the event loop runs what else is due between calls
            t = time.perf_counter()
            await retriever.recommend(scenes[r % len(scenes)], ask)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - began
    finally:
        await retriever.close()
        await store.close()
    p = percentiles(latencies)
    print(f"Machine: {machine()}")
    print(
        f"{products:,} products, {rounds} rounds of {batch} upserts into {catalog.names[0]} "
        f"({products // 10:,} products at the start) + one pooled Recommend:\n"
    )
    print(
        table(
            ["Recommend p50 ms", "p95 ms", "p99 ms", "max ms", "whole loop s"],
            [
                [
                    p["p50"],
                    p["p95"],
                    p["p99"],
                    max(latencies) * 1000,
                    f"{wall:.3g}",  # 3 significant digits: a fast loop is not printed as 0.0
                ]
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="products upserted before each Recommend")
    parser.add_argument("--work", type=Path, help="where the store goes (default: a temporary folder)")
    args = parser.parse_args()
    if args.work:
        asyncio.run(run(args.products, args.rounds, args.batch, args.work))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.products, args.rounds, args.batch, Path(tmp)))


if __name__ == "__main__":
    main()
