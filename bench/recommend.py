"""Recommend: speed, scale and quality of the retrieval strategies, side by side on the same queries.

    python -m bench.recommend --sizes 10000,100000 --model-repo runs/demo/triton_repo

For each catalog size (synthetic clustered unit embeddings over 10 categories, so the encoder is out of the
measurement): build the embedded store (qdrant-edge) and time it; then on the same queries, in-process:
  (a)  ours: one filtered query with the attention-pooled scene vector + exact rerank, at several pool sizes
       (the query is exact for categories up to the ranker's `exact_below`; `--hnsw` builds the HNSW index,
       as an offline optimize step would, and adds (a) and (c) through it)
  (a') ours, certify: bounded retrieval that proves the top 10 exact
  (b)  brute force: the exact hybrid distance over the whole category in numpy (the ground truth)
  (c)  the common "retrieve by the global vector, rerank the top N exactly"
  (d)  the seed tutorial's: run the product encoder on every product of the category for each scene
       (measured at 1k products with real images, extrapolated linearly)
with recall@10 against (b); then through the real gRPC server (`ctl serve-ranker` as a subprocess, scene
embeddings in): latency p50/p95/p99 and throughput at several concurrencies, and the ranker's memory.
The qdrant-client adapter is measured in-process on qdrant-client's local mode at the smallest size only:
local mode is brute force in Python, a stand-in for a server, not a measure of one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import (
    Catalog,
    Timer,
    machine,
    percentiles,
    rss_mib,
    serve_encoder,
    serve_ranker,
    synthetic_catalog,
    synthetic_scenes,
    table,
)
from ctl.encoder_contract import MODEL_INFO_FILE, PRODUCT_ENCODER, model_file
from ctl.tensors import Scene, scene_to_proto
from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_service.rerank import rank
from ranker_service.retrieval import Ask, Retriever
from ranker_service.retrieval_mode import RetrievalMode
from ranker_service.store.base import ProductPoint, Query
from ranker_service.store.client import open_client_store
from ranker_service.store.edge import open_edge_store

K = 10
POOLS = (50, 100, 200, 500)  # 200 = the default for limit 10: max(100, 20 × limit)


def points(cat: Catalog, version: str, start: int, stop: int) -> list[ProductPoint]:
    return [
        ProductPoint(cat.ids[i], cat.names[cat.categories[i]], cat.styles[i], cat.keys[i], {}, version)
        for i in range(start, stop)
    ]


async def fill(store, cat: Catalog, version: str, batch: int = 4096) -> float:
    """Upserts the catalog; products per second."""
    with Timer() as t:
        for start in range(0, len(cat.ids), batch):
            await store.upsert(points(cat, version, start, min(start + batch, len(cat.ids))))
    return len(cat.ids) / t.seconds


def exact(cat: Catalog, scene: Scene, category: int) -> tuple[list[str], float]:
    """(b): the exact top K over the whole category, and the seconds it took."""
    with Timer() as t:
        idx = cat.of(category)
        ranked = rank(scene, cat.styles[idx], cat.keys[idx], K)
    return [cat.ids[idx[i]] for i in ranked.order], t.seconds


async def strategies(
    store, cat: Catalog, scenes: list[Scene], asked: list[int], modes: bool = True, hnsw: bool = False
) -> list[dict]:
    """Recall@10 against (b) and latency of each strategy on the same queries. Candidate queries are exact
    (the ranker's default for categories up to `exact_below` products); with `hnsw`, (a) and (c) are also
    measured through the store's HNSW index (exact_below=0)."""
    truth = [exact(cat, s, c) for s, c in zip(scenes, asked)]
    rows = [
        {"strategy": "(b) brute force, numpy", "recall": 1.0, "times": [t for _, t in truth], "scored": None}
    ]
    indexes = [("", Retriever(store))] + ([(" via HNSW", Retriever(store, exact_below=0))] if hnsw else [])
    plans = [
        (f"(a) pooled query{via}, pool {p}", retriever, RetrievalMode.POOLED, p)
        for via, retriever in indexes
        for p in POOLS
    ]
    if modes:
        plans.append(("(a') certify", indexes[0][1], RetrievalMode.CERTIFY, 0))
    for name, retriever, mode, pool in plans:
        recalls, times, scored = [], [], []
        for scene, category, (want, _) in zip(scenes, asked, truth):
            ask = Ask(Query(cat.names[category]), K, mode, pool)
            with Timer() as t:
                result = await retriever.recommend(scene, ask)
            times.append(t.seconds)
            scored.append(result.candidates_scored)
            recalls.append(len({p.product_id for p in result.products} & set(want)) / K)
        rows.append(
            {
                "strategy": name,
                "recall": float(np.mean(recalls)),
                "times": times,
                "scored": float(np.mean(scored)),
            }
        )
    # (c): retrieve by the global vector alone, rerank the top 200 exactly
    for via, retriever in indexes:
        recalls, times = [], []
        for scene, category, (want, _) in zip(scenes, asked, truth):
            query = Query(cat.names[category])
            with Timer() as t:
                size = await store.count(query.category)
                (hits,) = await store.search(
                    scene.global_[None, :], query, 200, exact=size <= retriever.exact_below
                )
                ranked = rank(scene, hits.styles, hits.attention_keys, K)
            times.append(t.seconds)
            recalls.append(len({hits.points[i].product_id for i in ranked.order} & set(want)) / K)
        rows.append(
            {
                "strategy": f"(c) global vector{via}, rerank top 200",
                "recall": float(np.mean(recalls)),
                "times": times,
                "scored": 200.0,
            }
        )
    return rows


def seed_approach(images_dir: Path | None, model_repo: Path, per_category: int) -> dict | None:
    """(d): the product encoder over 1000 product images per scene (TorchScript, batches of 32), timed on 3
    scenes; extrapolated linearly to `per_category` products."""
    if images_dir is None or not images_dir.is_dir():
        return None
    import torch

    from style_model.data.images import load_image
    from style_model.export import load_encoder

    encoder, _ = load_encoder(model_file(model_repo, PRODUCT_ENCODER))
    size = json.loads((model_repo / MODEL_INFO_FILE).read_text())["config"]["input_size"]
    files = sorted(images_dir.glob("*.jpg"))[:1000]
    pixels = np.stack([load_image(f, size) for f in files])
    times = []
    for _ in range(3):
        with Timer() as t, torch.inference_mode():
            for start in range(0, len(pixels), 32):
                encoder(torch.from_numpy(pixels[start : start + 32]))
        times.append(t.seconds)
    per_product = float(np.median(times)) / len(files)
    return {
        "products": len(files),
        "seconds": float(np.median(times)),
        "extrapolated_s": per_product * per_category,
    }


async def load(
    address: str, requests: list[ranker_pb2.RecommendRequest], concurrency: int, total: int
) -> dict:
    """`total` Recommend calls, `concurrency` in flight; latency percentiles and calls per second."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        await stub.Recommend(requests[0], timeout=30)  # warm
        counter = iter(range(total))

        async def worker() -> None:
            nonlocal errors
            for i in counter:
                start = time.perf_counter()
                try:
                    await stub.Recommend(requests[i % len(requests)], timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - start)

        with Timer() as t:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**percentiles(latencies), "qps": total / t.seconds, "errors": errors}


def model_of(model_repo: Path) -> tuple[str, int, int]:
    info = json.loads((model_repo / MODEL_INFO_FILE).read_text())
    cfg = info["config"]
    return info["model_version"], cfg["embed_dim"], cfg["grid"] ** 2


async def run_size(n: int, args, work: Path) -> str:
    version, dim, regions = model_of(args.model_repo)
    cat = synthetic_catalog(n, dim)
    rng = np.random.default_rng(7)
    scenes = synthetic_scenes(args.queries, dim, regions)
    asked = [int(c) for c in rng.integers(0, 10, args.queries)]
    store_dir = work / f"store-{n}" / version
    out = [f"\n### {n:,} products (10 categories of {n // 10:,})\n"]

    store = await open_edge_store(store_dir, version, dim)
    rate = await fill(store, cat, version)
    built = ""
    if args.hnsw:
        with Timer() as opt:
            await store.optimize()
        built = f"; HNSW built by optimize() in {opt.seconds:.1f} s"
    out.append(f"Embedded store: {rate:,.0f} upserts/s{built}.\n")
    rows = await strategies(store, cat, scenes, asked, hnsw=args.hnsw)
    await store.close()
    brute_p50 = percentiles(rows[0]["times"])["p50"]
    d = seed_approach(args.seed_images, args.model_repo, n // 10)
    table_rows = [
        [
            r["strategy"],
            f"{r['recall']:.3f}",
            f"{percentiles(r['times'])['p50']:.2f}",
            f"{percentiles(r['times'])['p99']:.2f}",
            "-" if r["scored"] is None else f"{r['scored']:.0f}",
            f"{brute_p50 / percentiles(r['times'])['p50']:.1f}×",
        ]
        for r in rows
    ]
    if d:
        table_rows.append(
            [
                "(d) seed: product encoder over the category",
                "1.000 (exact)",
                f"{d['extrapolated_s'] * 1000:,.0f}",
                "-",
                f"{n // 10:,}",
                f"{brute_p50 / (d['extrapolated_s'] * 1000):.4f}×",
            ]
        )
    out.append(
        "In-process, the same queries (one category each), limit 10; speed-up against (b):\n\n"
        + table(["strategy", "recall@10 vs (b)", "p50 ms", "p99 ms", "scored", "speed-up vs (b)"], table_rows)
    )
    if d:
        out.append(
            f"\n(d) measured: {d['products']} product images through the exported product encoder in "
            f"{d['seconds']:.2f} s (batches of 32), extrapolated linearly to {n // 10:,} products per query."
        )

    if n <= args.client_max:
        client = await open_client_store(None, version, dim, path=work / f"client-{n}")
        rate = await fill(client, cat, version, batch=1024)
        rows = await strategies(client, cat, scenes[:10], asked[:10], modes=False)
        await client.close()
        out.append(
            f"\nqdrant-client adapter, local mode (brute force in Python; {rate:,.0f} upserts/s), "
            "10 queries:\n\n"
            + table(
                ["strategy", "recall@10", "p50 ms"],
                [
                    [r["strategy"], f"{r['recall']:.3f}", f"{percentiles(r['times'])['p50']:.1f}"]
                    for r in rows
                ],
            )
        )

    # through the real servers
    enc, encoder = serve_encoder(args.model_repo, work)
    ranker, address = serve_ranker(encoder, str(work / f"store-{n}" / "{model_version}"), work)
    try:
        requests = [
            ranker_pb2.RecommendRequest(
                scene_embedding=scene_to_proto(s, version), categories=[cat.names[c]], limit=K
            )
            for s, c in zip(scenes, asked)
        ]
        rows = []
        for concurrency in args.concurrency:
            r = await load(address, requests, concurrency, args.requests)
            rows.append(
                [
                    concurrency,
                    f"{r['p50']:.2f}",
                    f"{r['p95']:.2f}",
                    f"{r['p99']:.2f}",
                    f"{r['qps']:.0f}",
                    r["errors"],
                ]
            )
        rss, peak = rss_mib(ranker.pid)
        out.append(
            "\nThrough gRPC (`ctl serve-ranker`, scene embedding in, default pooled mode, limit 10; the load "
            "generator shares the 2 cores):\n\n"
            + table(["concurrency", "p50 ms", "p95 ms", "p99 ms", "calls/s", "errors"], rows)
            + f"\n\nRanker memory: {rss:,.0f} MiB resident ({peak:,.0f} MiB peak)."
        )
    finally:
        for p in (ranker, enc):
            p.terminate()
            p.wait(30)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--model-repo", type=Path, default=Path("runs/demo/triton_repo"))
    parser.add_argument("--seed-images", type=Path, default=Path("runs/demo/data/images"))
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400, help="gRPC calls per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--client-max", type=int, default=10000, help="largest size for the qdrant-client adapter"
    )
    parser.add_argument(
        "--hnsw",
        action="store_true",
        help="also build the HNSW index (optimize(): ~30 min at 1M) and measure (a) and (c) through it",
    )
    parser.add_argument("--work", type=Path, help="where stores go (default: a temporary folder)")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not (args.model_repo / MODEL_INFO_FILE).exists():
        sys.exit(f"{args.model_repo}: no exported model (run `make demo`, or give --model-repo)")
    print(
        f"# bench/recommend.py — {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}. Command: "
        f"`python -m bench.recommend {' '.join(sys.argv[1:])}`"
    )
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            print(asyncio.run(run_size(n, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
