"""UpsertProducts' flow control, in process (RankerApp over a real embedded store, precomputed embeddings).

The embedded store's writes never yield to the event loop, which hides how many run at once; a remote
Qdrant's do. So the store's `upsert` is wrapped to take a while (an await, as a loaded server would):
a fault that cannot be caused otherwise with qdrant-edge. The store underneath is real.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator

import numpy as np
import pytest

from ctl.encoding import ModelInfo
from ctl.serving import Metrics
from ctl.tensors import product_to_proto
from ctl.v1 import ranker_pb2
from ranker_service.app import RankerApp
from ranker_service.config import RankerConfig
from ranker_service.encoder_client import EncoderClient
from ranker_service.service import RankerServicer
from ranker_service.store.edge import open_edge_store

VERSION, DIM = "m-1", 16


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_a_stream_has_at_most_upsert_concurrency_batches_in_flight(concurrency: int) -> None:
    """Review of issue 14 #6: ordering the writes moved them out of the concurrency gate, so a stream of
    precomputed embeddings (no encoder to wait for) read the whole stream at once and ran a store write
    per batch at the same time: 100 writes in flight for 3,200 records, instead of `upsert_concurrency`."""
    batch, records = 8, 400
    state = {"writing": 0, "most": 0, "read": 0, "read_at_first_write": None}
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((records, 2, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)

    async def requests() -> AsyncIterator[ranker_pb2.UpsertProductsRequest]:
        for i in range(records):
            state["read"] = i + 1
            embedding = product_to_proto(vectors[i, 0], vectors[i, 1], VERSION)
            # every 50th product again, to keep the ordering of writes in play
            pid = f"p{i - 25 if i % 50 == 49 else i}"
            yield ranker_pb2.UpsertProductsRequest(
                product=ranker_pb2.Product(product_id=pid, category="c", embedding=embedding)
            )
            await asyncio.sleep(0)

    async def scenario() -> ranker_pb2.UpsertProductsResponse:
        with tempfile.TemporaryDirectory() as tmp:
            store = await open_edge_store(tmp, VERSION, DIM)
            real_upsert = store.upsert

            async def slow_upsert(points):  # a store across the network: writes take a while
                if state["read_at_first_write"] is None:
                    state["read_at_first_write"] = state["read"]
                state["writing"] += 1
                state["most"] = max(state["most"], state["writing"])
                await asyncio.sleep(0.01)
                await real_upsert(points)
                state["writing"] -= 1

            store.upsert = slow_upsert
            config = RankerConfig(upsert_concurrency=concurrency, upsert_batch=batch)
            app = RankerApp(config, EncoderClient("127.0.0.1:9", 1.0, 1 << 20), Metrics("test"))
            await app.attach(ModelInfo(VERSION, 64, 1, 4, DIM, "test", max_batch_images=32), store)
            try:
                reply = await RankerServicer(app).upsert(requests(), None)
                assert await store.count() == reply.upserted
                return reply
            finally:
                await app.close()
                await store.close()
                await app.encoder.close()

    reply = asyncio.run(scenario())
    assert reply.received == records and not reply.failures
    assert reply.upserted == records - records // 50
    assert state["most"] <= concurrency, state
    # reading stops while `concurrency` batches are in flight: at most one more batch is read ahead
    assert state["read_at_first_write"] <= (concurrency + 1) * batch, state
