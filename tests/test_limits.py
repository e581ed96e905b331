"""Resource limits of the ranker (issue 20 #5-#8, #16): requests that froze it or blew up its memory.

Each was reproduced on 2f75e5c: a 13 KB Recommend with 1,000 filter conditions blocked the ranker for 62 s
(every condition is a check per product of the category in an engine call that holds the GIL); exclusions
were turned into point ids per category and call; a caller's deadline was ignored; certify scored a whole
category of identical products; metadata and the number of categories had no bounds; UpsertProducts sent
the images of a batch in one encoder call however large. In process (RankerApp over a real embedded
store), except where the encoder takes part: then a real encoder server on loopback.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
import pytest
from PIL import Image

from ctl.encoding import ModelInfo
from ctl.serving import Metrics
from ctl.tensors import Scene, product_to_proto, scene_to_proto
from ctl.v1 import ranker_pb2
from ranker_service.app import RankerApp
from ranker_service.config import RankerConfig
from ranker_service.encoder_client import EncoderClient
from ranker_service.errors import ERROR_CODES, DeadlineExceeded, InvalidRequest, TooManyStreams
from ranker_service.service import RankerServicer
from ranker_service.store.edge import open_edge_store
from tests.servers import Encoder, encoder_config, wait_until

VERSION, DIM, REGIONS = "m-1", 16, 4
CERTIFY = ranker_pb2.RETRIEVAL_MODE_CERTIFY
KiB, MiB = 1024, 1024 * 1024


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def _product(pid: str, category: str, style, key, metadata=None) -> ranker_pb2.UpsertProductsRequest:
    return ranker_pb2.UpsertProductsRequest(
        product=ranker_pb2.Product(
            product_id=pid,
            category=category,
            metadata=metadata or {},
            embedding=product_to_proto(style, key, VERSION),
        )
    )


async def _stream(requests: Sequence[ranker_pb2.UpsertProductsRequest]) -> AsyncIterator:
    for r in requests:
        yield r


def _scene(seed: int = 0) -> ranker_pb2.RecommendRequest:
    rng = np.random.default_rng(seed)
    scene = Scene(
        _unit(rng.standard_normal(DIM)),
        _unit(rng.standard_normal((REGIONS, DIM))),
        _unit(rng.standard_normal((REGIONS, DIM))),
    )
    return ranker_pb2.RecommendRequest(scene_embedding=scene_to_proto(scene, VERSION))


async def _with_app(config: RankerConfig, scenario, encoder: str = "", real_encoder: bool = False):
    """Runs `scenario(app, store)` on a ranker app over a fresh embedded store (and the encoder at
    `encoder`, else none: precomputed embeddings only)."""
    with tempfile.TemporaryDirectory() as tmp:
        client = EncoderClient(
            encoder or "127.0.0.1:9", 10.0, config.max_message_bytes, products_timeout=30.0
        )
        info = (
            await client.model_info()
            if real_encoder
            else ModelInfo(VERSION, 64, 2, REGIONS, DIM, "test", max_batch_images=32)
        )
        store = await open_edge_store(tmp, info.model_version, info.embedding_dim)
        app = RankerApp(config, client, Metrics("test"))
        await app.attach(info, store)
        try:
            return await scenario(app, store)
        finally:
            await app.close()
            await store.close()
            await client.close()


async def _fill(app: RankerApp, categories: Sequence[str], per_category: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    requests = []
    for c in categories:
        styles, keys = (
            _unit(rng.standard_normal((per_category, DIM))),
            _unit(rng.standard_normal((per_category, DIM))),
        )
        requests += [
            _product(f"{c}-{i}", c, styles[i], keys[i], {"brand": f"b{i % 5}"}) for i in range(per_category)
        ]
    reply = await RankerServicer(app).upsert(_stream(requests), None)
    assert not reply.failures, reply.failures[:3]


# --- Recommend: bounded requests, work built once, the deadline honoured ---------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("conditions", "filters: at most 16 per call, got 1000"),
        ("values", "at most 1000 any_of + none_of values, got 1001"),
        ("long value", "filters[0].none_of[] is longer than 4096 bytes"),
        ("value bytes", "filters: at most 65,536 bytes of values per call, got 16,384,000"),
        ("exclusions", "exclude_product_ids: at most 10000 per call, got 10001"),
    ],
)
def test_recommend_refuses_requests_beyond_its_bounds(shape: str, expected: str) -> None:
    """#5: 1,000 filter conditions (13 KB) were accepted and blocked the ranker for 62 s at 100k products;
    1M exclusions over 32 categories took 183 s. Now each list is bounded and refused at once."""
    req = _scene()
    req.categories.append("shoes")
    if shape == "conditions":
        for i in range(1000):
            req.filters.add(key=f"k{i}", none_of=["v"])
    elif shape == "values":
        req.filters.add(
            key="brand", any_of=[f"b{i}" for i in range(600)], none_of=[f"x{i}" for i in range(401)]
        )
    elif shape == "long value":
        req.filters.add(key="brand", none_of=["x" * 4097])
    elif shape == "value bytes":  # review: 16 × 1,000 values of up to 4 KiB: a 61 MiB request froze it 12 s
        for i in range(16):
            req.filters.add(key=f"k{i}", any_of=[f"{j:04d}" + "x" * 1020 for j in range(1000)])
    else:
        req.exclude_product_ids.extend(f"p{i}" for i in range(10_001))

    async def scenario(app, store):
        await _fill(app, ["shoes"], 20)
        with pytest.raises(InvalidRequest) as error:
            await RankerServicer(app).recommend(req, None)
        return str(error.value)

    assert expected in asyncio.run(_with_app(RankerConfig(), scenario))
    assert ERROR_CODES[InvalidRequest] == grpc.StatusCode.INVALID_ARGUMENT


def test_exclusions_become_point_ids_once_per_call_not_per_category(monkeypatch) -> None:
    """#5: the exclusion list was rebuilt with uuid5 for every category and store call (32 categories ×
    10,000 ids × several calls); now once per Recommend, whatever the categories and mode."""
    categories = [f"c{i:02d}" for i in range(32)]
    excluded = [f"gone-{uuid.uuid4().hex}" for _ in range(500)]  # unique: no cache from another test
    req = _scene()
    req.categories.extend(categories)
    req.exclude_product_ids.extend(excluded)
    req.mode = CERTIFY
    calls = {"n": 0}
    real = uuid.uuid5

    def counting(namespace, name):  # a spy: the real function, counted
        calls["n"] += 1
        return real(namespace, name)

    async def scenario(app, store):
        await _fill(app, categories, 5)
        monkeypatch.setattr(uuid, "uuid5", counting)
        reply = await RankerServicer(app).recommend(req, None)
        monkeypatch.setattr(uuid, "uuid5", real)
        return reply

    reply = asyncio.run(_with_app(RankerConfig(), scenario))
    assert len(reply.results) == 32 and all(r.certified for r in reply.results)
    assert calls["n"] <= len(excluded), calls  # was 32 categories × (count + certify rounds) × 500


def test_a_recommend_past_its_deadline_stops_instead_of_working_for_nobody() -> None:
    """#5: a caller's deadline was not looked at for precomputed scenes: a call whose caller had given up
    went on through every category. Now the deadline is checked before every store call."""
    req = _scene()
    req.categories.extend(["a", "b"])

    async def scenario(app, store):
        await _fill(app, ["a", "b"], 10)
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await RankerServicer(app).recommend(req, -0.001)
        return await RankerServicer(app).recommend(req, 30.0)  # with time left, the same call is answered

    reply = asyncio.run(_with_app(RankerConfig(), scenario))
    assert [len(r.products) for r in reply.results] == [10, 10]
    assert ERROR_CODES[DeadlineExceeded] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_certify_on_identical_products_stops_at_the_work_cap_uncertified() -> None:
    """#8: a category of identical embeddings never certifies short of scoring all of it (100k products:
    20 s, 3.7 GB in one call). Now the bound queries stop at max_pool and the answer says uncertified."""
    rng = np.random.default_rng(3)
    style, key = _unit(rng.standard_normal(DIM)), _unit(rng.standard_normal(DIM))
    requests = [_product(f"p{i:04d}", "same", style, key) for i in range(400)]
    req = _scene()
    req.categories.append("same")
    req.mode = CERTIFY
    req.limit = 10

    async def scenario(app, store):
        reply = await RankerServicer(app).upsert(_stream(requests), None)
        assert reply.upserted == 400
        return await RankerServicer(app).recommend(req, None)

    result = asyncio.run(_with_app(RankerConfig(max_pool=64), scenario)).results[0]
    assert not result.certified
    assert result.candidates_scored <= 64
    assert len(result.products) == 10
    assert [p.product_id for p in result.products] == sorted(p.product_id for p in result.products)


# --- UpsertProducts: metadata and categories bounded ------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({f"k{i}": "v" for i in range(65)}, "metadata: at most 64 keys, got 65"),
        ({"story": "x" * 4097}, "the value is 4,097 bytes, at most 4,096"),
        ({f"k{i}": "x" * 4000 for i in range(5)}, "bytes of keys and values, at most 16,384"),
    ],
)
def test_metadata_beyond_its_bounds_fails_that_record_alone(metadata: dict, expected: str) -> None:
    """#8: a 40 MB metadata value made every Recommend of its category fail (RESOURCE_EXHAUSTED, which
    clients retry); a million keys stalled the server 5.6 s. Now such a record fails alone."""
    rng = np.random.default_rng(4)
    v = _unit(rng.standard_normal((3, DIM)))
    requests = [
        _product("ok-1", "shoes", v[0], v[0], {"brand": "b"}),
        _product("too-much", "shoes", v[1], v[1], metadata),
        _product("ok-2", "shoes", v[2], v[2]),
    ]

    async def scenario(app, store):
        return await RankerServicer(app).upsert(_stream(requests), None), await store.count()

    reply, stored = asyncio.run(_with_app(RankerConfig(), scenario))
    assert reply.upserted == 2 and stored == 2
    assert [(f.index, f.product_id, f.error.code) for f in reply.failures] == [
        (1, "too-much", "INVALID_ARGUMENT")
    ]
    assert expected in reply.failures[0].error.message


def test_a_new_category_beyond_the_catalog_cap_fails_alone_and_deletes_make_room() -> None:
    """#8: 139k categories made GetCatalogStats too large to send (and `ctl ingest`, which calls it first,
    could no longer start). Now a product of one category too many fails alone (RESOURCE_EXHAUSTED)."""
    rng = np.random.default_rng(5)
    v = _unit(rng.standard_normal((8, DIM)))
    first = [_product(f"p{i}", f"c{i}", v[i], v[i]) for i in range(5)]  # c0..c4, the cap is 3

    async def scenario(app, store):
        reply = await RankerServicer(app).upsert(_stream(first), None)
        known = [_product("p5", "c0", v[5], v[5])]  # a known category
        more = await RankerServicer(app).upsert(_stream(known), None)
        await RankerServicer(app).delete(
            ranker_pb2.DeleteProductsRequest(product_ids=["p1"])
        )  # c1 is empty now
        after = await RankerServicer(app).upsert(_stream([_product("p6", "c9", v[6], v[6])]), None)
        return reply, more, after, await app.stats()

    reply, more, after, stats = asyncio.run(_with_app(RankerConfig(max_catalog_categories=3), scenario))
    assert reply.upserted == 3
    assert [(f.product_id, f.error.code) for f in reply.failures] == [
        ("p3", "RESOURCE_EXHAUSTED"),
        ("p4", "RESOURCE_EXHAUSTED"),
    ]
    assert "CTL_RANKER_MAX_CATALOG_CATEGORIES" in reply.failures[0].error.message
    assert more.upserted == 1 and not more.failures
    assert after.upserted == 1 and not after.failures
    assert dict(stats.products_by_category) == {"c0": 2, "c2": 1, "c9": 1}


def test_a_too_long_stream_names_its_failed_records() -> None:
    """#16: a stream over max_stream_records ended with RESOURCE_EXHAUSTED whose message only counted the
    failures, so the caller could not tell which of the records processed had failed."""
    rng = np.random.default_rng(6)
    v = _unit(rng.standard_normal((6, DIM)))
    requests = [_product(f"p{i}", "shoes", v[i], v[i]) for i in range(6)]
    requests[1].product.ClearField("embedding")  # fails: no content

    async def scenario(app, store):
        with pytest.raises(Exception) as error:
            await RankerServicer(app).upsert(_stream(requests), None)
        return error.value

    error = asyncio.run(_with_app(RankerConfig(max_stream_records=4), scenario))
    assert ERROR_CODES[type(error)] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "#1 'p1': INVALID_ARGUMENT give the product's image or its embedding" in str(error)


# --- UpsertProducts with images: calls sized by bytes, oversized images fail alone ----------------------


def _noise_png(side: int, seed: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 × side² bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_legal_images_that_together_exceed_one_encoder_call_are_all_ingested(loop, exported_repo) -> None:
    """#6/#7: eight 9.7 MB PNGs (under the encoder's image limit) went to the encoder in one 64 MiB call:
    UNAVAILABLE for the whole stream, retried and failing the same way on every rerun. Scaled down here:
    an encoder that takes 1 MiB per call and 600 KB per image; six ~300 KB images in one batch. Now the
    calls are split by bytes, and an image over the limits fails alone, before any encoder call."""
    encoder = Encoder(loop, encoder_config(exported_repo, max_message_bytes=MiB, max_image_bytes=600 * KiB))
    try:
        encoder.wait_serving()
        address = f"127.0.0.1:{encoder.server.port}"
        images = [_noise_png(320, seed) for seed in range(6)]
        assert all(250 * KiB < len(b) < 600 * KiB for b in images) and sum(map(len, images)) > MiB
        too_large = _noise_png(460, 99)  # ~630 KB: over the encoder's image limit
        requests = [
            ranker_pb2.UpsertProductsRequest(
                product=ranker_pb2.Product(product_id=f"img-{i}", category="bags", image=b)
            )
            for i, b in enumerate([*images[:3], too_large, *images[3:]])
        ]

        async def scenario():
            client = EncoderClient(address, 10.0, 64 * MiB, products_timeout=60.0)
            info = await client.model_info()
            await client.close()

            async def upsert(app, store):
                return await RankerServicer(app).upsert(_stream(requests), None), await store.count()

            return info, await _with_app(RankerConfig(upsert_batch=32), upsert, address, real_encoder=True)

        info, (reply, stored) = loop.call(scenario(), timeout=120)
        assert info.max_request_bytes == MiB and info.max_image_bytes == 600 * KiB
        assert reply.upserted == 6 and stored == 6
        assert [(f.index, f.product_id, f.error.code) for f in reply.failures] == [
            (3, "img-3", "INVALID_ARGUMENT")
        ]
        assert "the encoder takes at most" in reply.failures[0].error.message
    finally:
        encoder.close()


def test_the_byte_budget_grants_in_order_lets_an_oversized_batch_go_alone_and_survives_cancels() -> None:
    """The budget behind #6 (UpsertProducts held 4.8 GB for 32 legal 20 MB images): bytes held at once
    never exceed it, except one batch larger than all of it, which waits until nothing else is held."""
    from ranker_service.byte_budget import ByteBudget

    async def scenario() -> list:
        budget = ByteBudget(100)
        log: list = []

        async def hold(name: str, size: int, release: asyncio.Event) -> None:
            granted = await budget.acquire(size)
            log.append((name, budget.used))
            await release.wait()
            budget.release(granted)

        events = {name: asyncio.Event() for name in "abcde"}
        tasks = {
            "a": asyncio.create_task(hold("a", 60, events["a"])),
            "b": asyncio.create_task(hold("b", 30, events["b"])),
            "c": asyncio.create_task(hold("c", 500, events["c"])),  # larger than the budget
            "d": asyncio.create_task(hold("d", 5, events["d"])),  # fits, but waits its turn behind c
            "e": asyncio.create_task(hold("e", 50, events["e"])),
        }
        await asyncio.sleep(0.01)
        assert log == [("a", 60), ("b", 90)]
        tasks["e"].cancel()  # a caller that goes away while waiting
        events["a"].set()
        events["b"].set()
        await asyncio.sleep(0.01)
        assert log[2] == ("c", 100) and budget.used == 100  # alone, granted the whole budget
        events["c"].set()
        await asyncio.sleep(0.01)
        events["d"].set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert budget.used == 0 and not budget._waiting
        return log

    log = asyncio.run(scenario())
    assert [name for name, _ in log] == ["a", "b", "c", "d"]
    assert all(used <= 100 for _, used in log)


def test_streams_together_hold_no_more_image_bytes_than_the_budget(loop, exported_repo) -> None:
    """#6: each stream bounded its batches by count, and all streams together by nothing: 32 legal 20 MB
    images took the ranker from 103 MB to 4.8 GB. Scaled down: three concurrent streams of ~300 KB images
    against a 700 KB budget; the encoder calls in flight (a spy around the real client) never hold more."""
    encoder = Encoder(loop, encoder_config(exported_repo))
    try:
        encoder.wait_serving()
        address = f"127.0.0.1:{encoder.server.port}"
        images = [_noise_png(320, seed) for seed in range(12)]
        state = {"now": 0, "most": 0}

        def stream(s: int) -> list[ranker_pb2.UpsertProductsRequest]:
            return [
                ranker_pb2.UpsertProductsRequest(
                    product=ranker_pb2.Product(product_id=f"s{s}-{i}", category="bags", image=b)
                )
                for i, b in enumerate(images[s * 4 : s * 4 + 4])
            ]

        async def scenario():
            async def upsert(app, store):
                real = app.encoder.encode_products

                async def spying(images, remaining_s=None):
                    size = sum(map(len, images))
                    state["now"] += size
                    state["most"] = max(state["most"], state["now"])
                    try:
                        return await real(images, remaining_s)
                    finally:
                        state["now"] -= size

                app.encoder.encode_products = spying
                replies = await asyncio.gather(
                    *(RankerServicer(app).upsert(_stream(stream(s)), None) for s in range(3))
                )
                return replies, await store.count()

            config = RankerConfig(upsert_batch=1, upsert_concurrency=4, upsert_bytes_in_flight=700 * KiB)
            return await _with_app(config, upsert, address, real_encoder=True)

        replies, stored = loop.call(scenario(), timeout=120)
        assert stored == 12 and all(r.upserted == 4 and not r.failures for r in replies)
        assert 0 < state["most"] <= 700 * KiB, state
    finally:
        encoder.close()


def test_a_stream_that_breaks_off_gives_back_every_byte_it_held() -> None:
    """Review of #6: the bytes a batch held were given back in its task's `finally`, which never runs
    for a task cancelled before it started: a caller whose stream broke off right after a batch was
    sent left those bytes taken for good, and enough such callers would stop every upload."""
    rng = np.random.default_rng(7)
    v = _unit(rng.standard_normal((4, DIM)))

    async def broken() -> AsyncIterator[ranker_pb2.UpsertProductsRequest]:
        yield _product("p0", "shoes", v[0], v[0])
        raise ConnectionResetError("the caller went away")  # as the stream's next read would fail

    async def scenario(app, store):
        for _ in range(3):
            with pytest.raises(ConnectionResetError):
                await RankerServicer(app).upsert(broken(), None)
            assert app.image_bytes.used == 0
        reply = await RankerServicer(app).upsert(
            _stream([_product(f"q{i}", "shoes", v[i], v[i]) for i in range(4)]), None
        )
        return reply, app.image_bytes.used

    reply, used = asyncio.run(_with_app(RankerConfig(upsert_batch=1), scenario))
    assert reply.upserted == 4 and used == 0


def test_get_products_whose_reply_would_not_fit_is_refused_as_such() -> None:
    """#8's sibling: 10,000 ids a call of products with up to 16 KiB of metadata each make a reply of up
    to 160 MB; gRPC failed its send with RESOURCE_EXHAUSTED, which callers (ctl ingest's journal check)
    retry as a passing error, again and again. Now INVALID_ARGUMENT, saying to ask for fewer ids."""
    rng = np.random.default_rng(8)
    v = _unit(rng.standard_normal((100, DIM)))
    requests = [_product(f"p{i}", "shoes", v[i], v[i], {"story": "x" * 4000}) for i in range(100)]

    async def scenario(app, store):
        assert (await RankerServicer(app).upsert(_stream(requests), None)).upserted == 100
        few = await RankerServicer(app).get_products(ranker_pb2.GetProductsRequest(product_ids=["p1", "p2"]))
        with pytest.raises(InvalidRequest, match="ask for fewer ids per call") as error:
            await RankerServicer(app).get_products(
                ranker_pb2.GetProductsRequest(product_ids=[f"p{i}" for i in range(100)])
            )
        return few, str(error.value)

    few, message = asyncio.run(_with_app(RankerConfig(max_message_bytes=200 * KiB), scenario))
    assert [p.product_id for p in few.products] == ["p1", "p2"]
    assert "the 100 products asked for make a reply of" in message


def test_a_stream_stops_reading_while_the_byte_budget_is_taken() -> None:
    """Review of #6: the budget was taken per batch sent, so a stream waiting for it still read and held a
    whole batch (16 streams of 1.7 MiB images: 1.2 GB, over the pod's 1 GiB). Now each record takes its
    bytes as it is read: with the budget taken, a stream reads one record and waits."""
    rng = np.random.default_rng(9)
    v = _unit(rng.standard_normal((40, DIM)))
    reads = {"n": 0}

    async def counted() -> AsyncIterator[ranker_pb2.UpsertProductsRequest]:
        for i in range(40):
            reads["n"] += 1
            yield _product(f"p{i}", "shoes", v[i], v[i])

    async def scenario(app, store):
        taken = await app.image_bytes.acquire(app.image_bytes.limit)  # other streams hold all of it
        upload = asyncio.create_task(RankerServicer(app).upsert(counted(), None))
        for _ in range(20):
            await asyncio.sleep(0)
        read_while_taken = reads["n"]
        app.image_bytes.release(taken)
        reply = await upload
        return read_while_taken, reply, app.image_bytes.used

    read_while_taken, reply, used = asyncio.run(_with_app(RankerConfig(upsert_batch=32), scenario))
    assert read_while_taken == 1
    assert reply.upserted == 40 and used == 0


def test_encoder_calls_follow_the_limits_of_an_encoder_restarted_with_smaller_ones(
    loop, exported_repo
) -> None:
    """Review of #7: the ranker sized its encoder calls by the ModelInfo read at start-up, so an encoder
    restarted with a smaller request size failed every stream of images (UNAVAILABLE, retried forever).
    The health probe reads ModelInfo again; the calls follow what it read."""
    from tests.test_faults import _free_port

    port = _free_port()
    images = [_noise_png(320, seed) for seed in range(4)]  # ~300 KB each, 1.2 MB together
    requests = [
        ranker_pb2.UpsertProductsRequest(
            product=ranker_pb2.Product(product_id=f"img-{i}", category="bags", image=b)
        )
        for i, b in enumerate(images)
    ]
    first = Encoder(loop, encoder_config(exported_repo, port=port, max_message_bytes=8 * MiB)).wait_serving()
    address = f"127.0.0.1:{port}"
    state: dict = {}

    async def start(app, store):
        state["app"] = app
        state["done"] = asyncio.get_running_loop().create_future()
        await state["done"]  # the app stays up while the encoder restarts
        return None

    try:
        runner = loop.submit(_with_app(RankerConfig(upsert_batch=32), start, address, real_encoder=True))
        wait_until(lambda: "app" in state, timeout=30)
        first.close()
        second = Encoder(loop, encoder_config(exported_repo, port=port, max_message_bytes=MiB)).wait_serving()
        try:
            app = state["app"]
            info = loop.call(app.encoder.model_info())  # what the health probe does every few seconds
            assert info.max_request_bytes == MiB
            reply = loop.call(RankerServicer(app).upsert(_stream(requests), None), timeout=120)
            assert reply.upserted == 4 and not reply.failures
        finally:
            loop.loop.call_soon_threadsafe(state["done"].set_result, None)
            runner.result(30)
            second.close()
    finally:
        first.close()


def test_an_idle_open_stream_does_not_hold_the_byte_budget_from_others() -> None:
    """Second review of #6: each record took its bytes as it was read, and a batch read so far kept them
    while its stream stayed open: two streams that sent a few records and went quiet stopped every other
    upload until their callers resumed. Now a stream that pauses has its batch sent (LINGER_S)."""
    rng = np.random.default_rng(10)
    v = _unit(rng.standard_normal((12, DIM)))
    resume = None

    async def idle_after(prefix: str, n: int) -> AsyncIterator[ranker_pb2.UpsertProductsRequest]:
        for i in range(n):
            yield _product(f"{prefix}{i}", "shoes", v[i], v[i])
        await resume.wait()  # open and quiet, as a stalled client

    async def scenario(app, store):
        nonlocal resume
        resume = asyncio.Event()
        record = _product("x", "shoes", v[0], v[0]).product.ByteSize()
        app.image_bytes.limit = 4 * record  # two idle streams of two records take all of it
        idle = [asyncio.create_task(RankerServicer(app).upsert(idle_after(p, 2), None)) for p in ("a", "b")]
        for _ in range(20):
            await asyncio.sleep(0)
        other = await asyncio.wait_for(
            RankerServicer(app).upsert(
                _stream([_product(f"c{i}", "shoes", v[i], v[i]) for i in range(6)]), None
            ),
            20,
        )
        resume.set()
        replies = await asyncio.gather(*idle)
        return other, replies, app.image_bytes.used

    other, replies, used = asyncio.run(_with_app(RankerConfig(upsert_batch=32), scenario))
    assert other.upserted == 6 and [r.upserted for r in replies] == [2, 2] and used == 0


def test_a_stream_beyond_max_upsert_streams_is_refused_at_once() -> None:
    """Second review of #6: each open stream holds records and gRPC's buffers (16 streams of 15 MiB
    images: 1.5 GB with the budget at 32 MiB), and gRPC takes in a queued stream's first records as well.
    One stream more than `max_upsert_streams` is refused at once (RESOURCE_EXHAUSTED: retried later)."""
    rng = np.random.default_rng(11)
    v = _unit(rng.standard_normal((3, DIM)))

    async def open_stream(
        prefix: str, release: asyncio.Event
    ) -> AsyncIterator[ranker_pb2.UpsertProductsRequest]:
        yield _product(f"{prefix}0", "shoes", v[0], v[0])
        await release.wait()

    async def scenario(app, store):
        release = asyncio.Event()
        first = [
            asyncio.create_task(RankerServicer(app).upsert(open_stream(f"s{k}-", release), None))
            for k in range(2)
        ]
        for _ in range(20):
            await asyncio.sleep(0)
        with pytest.raises(TooManyStreams, match="CTL_RANKER_MAX_UPSERT_STREAMS") as error:
            await RankerServicer(app).upsert(_stream([_product("late", "shoes", v[1], v[1])]), None)
        release.set()
        replies = await asyncio.gather(*first)
        after = await RankerServicer(app).upsert(_stream([_product("later", "shoes", v[2], v[2])]), None)
        return error.value, replies, after

    error, replies, after = asyncio.run(_with_app(RankerConfig(max_upsert_streams=2), scenario))
    assert ERROR_CODES[type(error)] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [r.upserted for r in replies] == [1, 1] and after.upserted == 1


def test_a_refused_records_id_is_echoed_shortened() -> None:
    """Second review: a record refused for its too-long id had the whole id copied into the reply, kept
    until the stream ended (60 records of 30 MiB ids: 8.2 GB, then a reply too large to send)."""
    rng = np.random.default_rng(12)
    v = _unit(rng.standard_normal((2, DIM)))
    requests = [_product("x" * 1_000_000, "shoes", v[0], v[0]), _product("ok", "shoes", v[1], v[1])]

    async def scenario(app, store):
        return await RankerServicer(app).upsert(_stream(requests), None)

    reply = asyncio.run(_with_app(RankerConfig(), scenario))
    assert reply.upserted == 1 and len(reply.failures) == 1
    failure = reply.failures[0]
    assert failure.index == 0 and len(failure.product_id) <= 257 and failure.product_id.startswith("xxx")
    assert "product_id is longer than 512 bytes" in failure.error.message


def test_concurrent_batches_cannot_admit_more_categories_than_the_cap() -> None:
    """Review of #8 (twice): a batch that refreshed the catalog's categories from the store forgot those
    another batch had admitted but not stored yet, so two streams together exceeded the cap. The store's
    writes are made to take a while (an await, as a remote Qdrant's do): the embedded store's never yield,
    which hides the interleaving; the store underneath is real."""
    rng = np.random.default_rng(13)
    v = _unit(rng.standard_normal((4, DIM)))

    async def scenario(app, store):
        await RankerServicer(app).upsert(
            _stream([_product(f"p{i}", f"c{i}", v[i], v[i]) for i in range(2)]), None
        )
        real = store.upsert

        async def slow(points):
            await asyncio.sleep(0.05)
            await real(points)

        store.upsert = slow
        replies = await asyncio.gather(
            *(
                RankerServicer(app).upsert(_stream([_product(f"q{i}", f"new{i}", v[i], v[i])]), None)
                for i in (2, 3)
            )
        )
        return replies, await store.counts_by_category()

    replies, counts = asyncio.run(_with_app(RankerConfig(max_catalog_categories=3), scenario))
    assert sorted(r.upserted for r in replies) == [0, 1]
    assert len(counts) == 3
