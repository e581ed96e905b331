"""The ranker end to end: a real encoder process, a real ranker (gRPC on loopback) on a real embedded
Qdrant, products ingested from generated images through UpsertProducts, rankings checked against a
brute-force exact hybrid ranking computed here from the encoder's own outputs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ctl.encoder_contract import ENCODERS, model_file
from ctl.tensors import (
    Scene,
    product_from_proto,
    product_to_proto,
    scene_from_proto,
    scene_to_proto,
    to_tensor,
)
from ctl.v1 import embeddings_pb2, encoder_pb2, encoder_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from ranker_service.config import RankerConfig
from ranker_service.errors import StoreError, StoreLocked, UnsupportedModel
from ranker_service.server import Ranker
from ranker_service.store.edge import open_edge_store
from style_model.distances import hybrid_distances
from tests.servers import LoopThread, Process, health, wait_serving, wait_until

CERTIFY = ranker_pb2.RETRIEVAL_MODE_CERTIFY
EXHAUSTIVE = ranker_pb2.RETRIEVAL_MODE_EXHAUSTIVE
POOLED = ranker_pb2.RETRIEVAL_MODE_POOLED
MAX_IMAGE_BYTES = 300_000


def start_encoder(repo: Path, *extra: str) -> Process:
    return Process(
        "serve-encoder",
        "--model-repo",
        str(repo),
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--max-image-bytes",
        str(MAX_IMAGE_BYTES),
        *extra,
    )


@pytest.fixture(scope="module")
def encoder(exported_repo):
    proc = start_encoder(exported_repo)
    wait_serving(proc.address)
    yield proc
    proc.stop()


def ranker_config(encoder_address: str, store: Path, **kw) -> RankerConfig:
    settings = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "probe_interval_s": 0.5,
        "startup_timeout_s": 20,
    }
    return RankerConfig(
        **{**settings, **kw},
        encoder=encoder_address,
        store_path=str(store / "{model_version}"),
    )


def start_ranker(loop: LoopThread, config: RankerConfig) -> Ranker:
    async def start():
        ranker = Ranker(config)
        await ranker.start()
        return ranker

    return loop.call(start())


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def ranker(loop, encoder, store_dir):
    r = start_ranker(loop, ranker_config(encoder.address, store_dir))
    yield r
    loop.call(r.stop(grace=1))


@pytest.fixture(scope="module")
def channel(ranker):
    with grpc.insecure_channel(f"127.0.0.1:{ranker.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return ranker_pb2_grpc.RankerServiceStub(channel)


@pytest.fixture(scope="module")
def encoder_stub(encoder):
    with grpc.insecure_channel(encoder.address) as ch:
        yield encoder_pb2_grpc.EncoderServiceStub(ch)


@pytest.fixture(scope="module")
def catalog(synth_dir):
    """Every product of the generated set: id, category, image bytes, and a metadata field to filter on."""
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    products = []
    for i, (sig, cat) in enumerate(sorted(categories.items())):
        data = (synth_dir / "images" / f"{sig}.jpg").read_bytes()
        products.append(
            ranker_pb2.Product(
                product_id=sig, category=cat, metadata={"parity": "even" if i % 2 == 0 else "odd"}, image=data
            )
        )
    return products


@pytest.fixture(scope="module")
def scenes(synth_dir) -> list[bytes]:
    pairs = [json.loads(line) for line in (synth_dir / "fashion.json").read_text().splitlines()]
    sigs = sorted({p["scene"] for p in pairs})[:5]
    return [(synth_dir / "images" / f"{s}.jpg").read_bytes() for s in sigs]


def stream(products):
    for p in products:
        yield ranker_pb2.UpsertProductsRequest(product=p)


@pytest.fixture(scope="module")
def ingested(stub, catalog):
    """The catalog ingested once, with two bad records in the middle of the stream."""
    bad = [
        ranker_pb2.Product(product_id="corrupt", category="Shoes", image=b"\xff\xd8\xff not a jpeg"),
        ranker_pb2.Product(product_id="no-category", image=catalog[0].image),
    ]
    records = [*catalog[:100], bad[0], *catalog[100:200], bad[1], *catalog[200:]]
    reply = stub.UpsertProducts(stream(records), timeout=300)
    return reply


@pytest.fixture(scope="module")
def brute_force(encoder_stub, catalog, scenes, ingested):
    """Exact rankings computed here: EncodeProducts/EncodeScene outputs and the numpy hybrid distance."""
    info = encoder_stub.GetModelInfo(encoder_pb2.GetModelInfoRequest())
    styles, keys = [], []
    for start in range(0, len(catalog), 32):
        reply = encoder_stub.EncodeProducts(
            encoder_pb2.EncodeProductsRequest(images=[p.image for p in catalog[start : start + 32]])
        )
        for r in reply.results:
            s, k = product_from_proto(r.embedding, info.embedding_dim)
            styles.append(s)
            keys.append(k)
    styles, keys = np.stack(styles), np.stack(keys)
    scene_embs = [encoder_stub.EncodeScene(encoder_pb2.EncodeSceneRequest(image=s)).embedding for s in scenes]

    def ranking(scene_index: int, category: str, exclude=(), parity=None):
        scene = scene_from_proto(scene_embs[scene_index], info.regions, info.embedding_dim)
        idx = [
            i
            for i, p in enumerate(catalog)
            if p.category == category
            and p.product_id not in exclude
            and (parity is None or p.metadata["parity"] == parity)
        ]
        d = hybrid_distances(scene.global_, scene.local, scene.attention, styles[idx], keys[idx]).hybrid
        order = np.argsort(d, kind="stable")
        return [catalog[idx[i]].product_id for i in order], d[order]

    return info, scene_embs, ranking


def categories_of(catalog) -> list[str]:
    return sorted({p.category for p in catalog})


def test_ingestion_stores_good_records_and_lists_bad_ones(stub, ingested, catalog):
    assert ingested.received == len(catalog) + 2
    assert ingested.upserted == len(catalog)
    failures = {f.product_id: f for f in ingested.failures}
    assert set(failures) == {"corrupt", "no-category"}
    assert failures["corrupt"].index == 100 and failures["corrupt"].error.code == "INVALID_ARGUMENT"
    assert "decode" in failures["corrupt"].error.message
    assert failures["no-category"].index == 201 and "category" in failures["no-category"].error.message
    stats = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest())
    expected = defaultdict(int)
    for p in catalog:
        expected[p.category] += 1
    assert dict(stats.products_by_category) == expected
    assert stats.total_products == len(catalog)
    assert stats.model_version == ingested.model_version != ""
    assert "qdrant-edge" in stats.store


@pytest.mark.parametrize("mode", [CERTIFY, EXHAUSTIVE])
def test_certify_and_exhaustive_equal_the_brute_force_ranking(stub, scenes, catalog, brute_force, mode):
    _, _, ranking = brute_force
    scored, sizes = 0, 0
    for s, scene in enumerate(scenes[:4]):
        # a small first width, so that certify has to prove its answer rather than score everything
        reply = stub.Recommend(
            ranker_pb2.RecommendRequest(
                scene_image=scene,
                categories=categories_of(catalog),
                limit=10,
                mode=mode,
                explain=True,
                pool_size=12 if mode == CERTIFY else 0,
            ),
            timeout=30,
        )
        assert [r.category for r in reply.results] == categories_of(catalog)
        for result in reply.results:
            ids, dist = ranking(s, result.category)
            got = [p.product_id for p in result.products]
            assert got == ids[:10], (s, result.category)
            np.testing.assert_allclose([p.distance for p in result.products], dist[:10], atol=1e-5)
            assert all(p.category == result.category for p in result.products)
            assert result.certified, (s, result.category, mode)
            assert result.category_size == len(ids)
            if mode == EXHAUSTIVE:
                assert result.candidates_scored == len(ids)
            scored += result.candidates_scored
            sizes += len(ids)
            for p in result.products:
                assert len(p.attention) == 4 and abs(sum(p.attention) - 1) < 1e-5
                assert abs((p.global_distance + p.local_distance) / 2 - p.distance) < 1e-5
    if mode == CERTIFY:
        print(f"certify scored {scored} of {sizes} products")
        assert scored < sizes


def test_default_mode_recall_against_the_exact_ranking(stub, scenes, catalog, brute_force):
    """The pooled query with a small pool (so that it does not simply score the whole category)."""
    _, _, ranking = brute_force
    recalls = []
    for s, scene in enumerate(scenes):
        reply = stub.Recommend(
            ranker_pb2.RecommendRequest(
                scene_image=scene, categories=categories_of(catalog), limit=10, pool_size=25
            )
        )
        for result in reply.results:
            ids, dist = ranking(s, result.category)
            got = [p.product_id for p in result.products]
            recalls.append(len(set(got) & set(ids[:10])) / 10)
            assert result.candidates_scored == 25 and result.mode == POOLED and not result.certified
            # whatever it returns is ranked by the exact distance
            exact = dict(zip(ids, dist))
            np.testing.assert_allclose(
                [p.distance for p in result.products], [exact[i] for i in got], atol=1e-5
            )
            assert [p.distance for p in result.products] == sorted(p.distance for p in result.products)
    print(f"pooled mode, pool 25: recall@10 {np.mean(recalls):.3f} over {len(recalls)} lists")
    assert np.mean(recalls) >= 0.9, recalls


def test_scene_embedding_gives_the_same_answer_as_the_image(stub, scenes, catalog, brute_force):
    _, scene_embs, _ = brute_force
    cats = categories_of(catalog)[:2]
    by_image = stub.Recommend(
        ranker_pb2.RecommendRequest(scene_image=scenes[1], categories=cats, mode=CERTIFY)
    )
    by_embedding = stub.Recommend(
        ranker_pb2.RecommendRequest(scene_embedding=scene_embs[1], categories=cats, mode=CERTIFY)
    )
    for a, b in zip(by_image.results, by_embedding.results):
        assert [p.product_id for p in a.products] == [p.product_id for p in b.products]


def test_exclusions_and_metadata_filters(stub, scenes, catalog, brute_force):
    _, _, ranking = brute_force
    category = categories_of(catalog)[0]
    top, _ = ranking(0, category)
    exclude = top[:3]
    reply = stub.Recommend(
        ranker_pb2.RecommendRequest(
            scene_image=scenes[0],
            categories=[category],
            limit=5,
            mode=CERTIFY,
            exclude_product_ids=exclude,
            filters=[ranker_pb2.MetadataCondition(key="parity", any_of=["odd"])],
        )
    )
    got = [p.product_id for p in reply.results[0].products]
    ids, _ = ranking(0, category, exclude=set(exclude), parity="odd")
    assert got == ids[:5]
    assert not set(got) & set(exclude)
    assert all(p.metadata["parity"] == "odd" for p in reply.results[0].products)


@pytest.mark.parametrize("mode", [POOLED, CERTIFY, EXHAUSTIVE])
def test_max_distance_leaves_out_exactly_the_products_farther_than_it(stub, scenes, catalog, mode):
    """max_distance cuts the answer found without it: every distance returned is at most max_distance, and
    the list is the uncut list filtered (the cut is inclusive, at float32, the precision returned)."""
    cats = categories_of(catalog)[:3]
    for s in range(3):
        ask = ranker_pb2.RecommendRequest(scene_image=scenes[s], categories=cats, limit=10, mode=mode)
        uncut = stub.Recommend(ask, timeout=30)
        for result in uncut.results:
            distances = [p.distance for p in result.products]
            for threshold in (distances[0], distances[4], (distances[6] + distances[7]) / 2, 4.0):
                cut_ask = ranker_pb2.RecommendRequest()
                cut_ask.CopyFrom(ask)
                cut_ask.categories[:] = [result.category]
                cut_ask.max_distance = threshold
                (cut,) = stub.Recommend(cut_ask, timeout=30).results
                limit = cut_ask.max_distance  # as sent: a float32
                assert all(p.distance <= limit for p in cut.products), (threshold, cut.products)
                kept = [(p.product_id, p.distance) for p in result.products if p.distance <= limit]
                assert [(p.product_id, p.distance) for p in cut.products] == kept, (s, result.category)
                assert kept, threshold  # the thresholds keep at least the best product
                assert (cut.certified, cut.category_size) == (result.certified, result.category_size)
    for bad in (-0.5, float("nan")):
        refused = ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=cats[:1], max_distance=bad)
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(refused, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "max_distance" in err.value.details(), err.value.details()


def test_reingesting_changes_nothing(stub, catalog, scenes):
    request = ranker_pb2.RecommendRequest(
        scene_image=scenes[2], categories=categories_of(catalog), mode=CERTIFY
    )
    before = stub.Recommend(request)
    stats = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest())
    reply = stub.UpsertProducts(stream(catalog[:150]), timeout=120)
    assert reply.upserted == 150 and not reply.failures
    assert stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest()) == stats
    after = stub.Recommend(request)
    for a, b in zip(before.results, after.results):
        assert [p.product_id for p in a.products] == [p.product_id for p in b.products]
        np.testing.assert_allclose(
            [p.distance for p in a.products], [p.distance for p in b.products], atol=1e-6
        )


def test_precomputed_embeddings_are_ingested_as_given(stub, encoder_stub, catalog, brute_force, scenes):
    info, _, _ = brute_force
    product = catalog[7]
    emb = encoder_stub.EncodeProducts(encoder_pb2.EncodeProductsRequest(images=[product.image])).results[0]
    twin = ranker_pb2.Product(
        product_id="twin-of-" + product.product_id,
        category="Twins",
        embedding=emb.embedding,
        metadata={"a": "b"},
    )
    wrong_version = ranker_pb2.Product(product_id="old", category="Twins")
    wrong_version.embedding.CopyFrom(emb.embedding)
    wrong_version.embedding.model_version = "0000"
    wrong_shape = ranker_pb2.Product(
        product_id="short",
        category="Twins",
        embedding=embeddings_pb2.ProductEmbedding(
            style=to_tensor(np.ones(3) / np.sqrt(3)),
            attention_key=emb.embedding.attention_key,
            model_version=info.model_version,
        ),
    )
    reply = stub.UpsertProducts(stream([twin, wrong_version, wrong_shape]))
    assert reply.upserted == 1
    codes = {f.product_id: f.error.code for f in reply.failures}
    assert codes == {"old": "FAILED_PRECONDITION", "short": "INVALID_ARGUMENT"}
    got = stub.Recommend(
        ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=["Twins"], explain=True)
    )
    (twin_result,) = got.results[0].products
    assert twin_result.product_id == twin.product_id and dict(twin_result.metadata) == {"a": "b"}
    deleted = stub.DeleteProducts(
        ranker_pb2.DeleteProductsRequest(product_ids=[twin.product_id, "never-was"])
    )
    assert deleted.deleted == 1 and list(deleted.not_found) == ["never-was"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=["Twins"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _at_cosine(c: float, axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine with the unit vector `axis` is `c`."""
    u = rng.standard_normal(axis.shape)
    u -= (u @ axis) * axis
    return (c * axis + np.sqrt(1 - c * c) * u / np.linalg.norm(u)).astype(np.float32)


def test_near_unit_embeddings_are_normalised_so_certify_stays_exact(stub, brute_force):
    """Issue 14 #2. A product of norm 0.9991 is accepted (within the 1e-3 tolerance). Stored as given, its
    computed distance 1 + n² − n·S(p) is 0.0018 lower than 2 − S(p), which the certificate assumes: certify
    stopped after the first round with A "certified" while the exhaustive ranking put the shrunken Q first.
    Built so that every region's local embedding is the same (then S(p) = U(p) = (f_s + f_L)·f_p): A scores
    1.0008, 140 unit fillers 0.9992..1.0007, Q (unit: 1.0) only 0.9991 once shrunk."""
    info, _, _ = brute_force
    rng = np.random.default_rng(14)
    dim, version = info.embedding_dim, info.model_version
    e1 = np.zeros(dim, np.float32)
    e1[0] = 1
    scene = scene_to_proto(
        Scene(
            e1,
            np.tile(e1, (info.regions, 1)),
            np.stack([_at_cosine(0, e1, rng) for _ in range(info.regions)]),
        ),
        version,
    )
    key = _at_cosine(0.0, e1, rng)

    def product(pid: str, style: np.ndarray) -> ranker_pb2.Product:
        emb = product_to_proto(style, key, version)
        return ranker_pb2.Product(product_id=pid, category="NearUnit", embedding=emb)

    fillers = [
        product(f"f{i}", _at_cosine(c / 2, e1, rng)) for i, c in enumerate(np.linspace(0.9993, 1.0006, 140))
    ]
    a = product("A", _at_cosine(0.5004, e1, rng))
    q = product("Q", 0.9991 * _at_cosine(0.5, e1, rng))
    reply = stub.UpsertProducts(stream([a, *fillers, q]))
    assert reply.upserted == 142 and not reply.failures
    try:
        answers = {}
        for mode in (CERTIFY, EXHAUSTIVE):
            got = stub.Recommend(
                ranker_pb2.RecommendRequest(
                    scene_embedding=scene, categories=["NearUnit"], limit=1, mode=mode
                )
            ).results[0]
            answers[mode] = ([p.product_id for p in got.products], got.certified, got.candidates_scored)
        assert answers[EXHAUSTIVE][0] == ["A"], answers  # Q, normalised, scores 1.0 < A's 1.0008
        assert answers[CERTIFY][:2] == (["A"], True), answers
        assert answers[CERTIFY][2] < 142, answers  # it did stop early, with a sound certificate
        # Q is stored as a unit vector: its distance with the scene is exactly 2 - 1.0
        stored = stub.Recommend(
            ranker_pb2.RecommendRequest(
                scene_embedding=scene, categories=["NearUnit"], limit=142, mode=EXHAUSTIVE
            )
        ).results[0]
        by_id = {p.product_id: p.distance for p in stored.products}
        assert abs(by_id["Q"] - 1.0) < 1e-5, by_id["Q"]
    finally:
        stub.DeleteProducts(
            ranker_pb2.DeleteProductsRequest(product_ids=["A", "Q", *(f.product_id for f in fillers)])
        )


def test_delete_removes_products_from_results_and_stats(stub, scenes, catalog, brute_force):
    _, _, ranking = brute_force
    category = categories_of(catalog)[1]
    top, _ = ranking(3, category)
    before = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest())
    reply = stub.DeleteProducts(ranker_pb2.DeleteProductsRequest(product_ids=top[:2]))
    assert reply.deleted == 2
    after = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest())
    assert after.products_by_category[category] == before.products_by_category[category] - 2
    got = stub.Recommend(
        ranker_pb2.RecommendRequest(scene_image=scenes[3], categories=[category], mode=CERTIFY)
    )
    assert [p.product_id for p in got.results[0].products] == top[2:12]
    # put them back for the other tests
    back = stub.UpsertProducts(stream([p for p in catalog if p.product_id in top[:2]]))
    assert back.upserted == 2


def bad_requests(scenes, scene_emb, version):
    good = dict(categories=["Apparel & Accessories|Shoes"])
    wrong_shape = embeddings_pb2.SceneEmbedding()
    wrong_shape.CopyFrom(scene_emb)
    del wrong_shape.local.values[-5:]
    other_version = embeddings_pb2.SceneEmbedding()
    other_version.CopyFrom(scene_emb)
    other_version.model_version = "not-" + version
    truncated = scenes[0][: len(scenes[0]) // 3]
    return {
        "missing scene": (ranker_pb2.RecommendRequest(**good), grpc.StatusCode.INVALID_ARGUMENT, "scene"),
        "empty image": (
            ranker_pb2.RecommendRequest(scene_image=b"", **good),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scene",
        ),
        "corrupt image": (
            ranker_pb2.RecommendRequest(scene_image=b"GIF89a garbage", **good),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image",
        ),
        "truncated image": (
            ranker_pb2.RecommendRequest(scene_image=truncated, **good),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image",
        ),
        "oversized image": (
            ranker_pb2.RecommendRequest(scene_image=b"\x89PNG" + bytes(MAX_IMAGE_BYTES), **good),
            grpc.StatusCode.INVALID_ARGUMENT,
            str(MAX_IMAGE_BYTES),
        ),
        "unknown category": (
            ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=["Spaceships"]),
            grpc.StatusCode.NOT_FOUND,
            "Spaceships",
        ),
        "no category": (
            ranker_pb2.RecommendRequest(scene_image=scenes[0]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "categor",
        ),
        "limit too large": (
            ranker_pb2.RecommendRequest(scene_image=scenes[0], limit=5000, **good),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit",
        ),
        "embedding of the wrong shape": (
            ranker_pb2.RecommendRequest(scene_embedding=wrong_shape, **good),
            grpc.StatusCode.INVALID_ARGUMENT,
            "local",
        ),
        "embedding of another model": (
            ranker_pb2.RecommendRequest(scene_embedding=other_version, **good),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not-" + version,
        ),
        "repeated category": (
            ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=["a", "a"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "once",
        ),
        "empty filter": (
            ranker_pb2.RecommendRequest(
                scene_image=scenes[0], filters=[ranker_pb2.MetadataCondition(key="parity")], **good
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "parity",
        ),
    }


def test_bad_requests_get_their_status_and_the_server_keeps_serving(stub, scenes, brute_force, catalog):
    info, scene_embs, _ = brute_force
    cases = bad_requests(scenes, scene_embs[0], info.model_version)
    good = ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=categories_of(catalog)[:1], limit=3)
    for name, (request, code, words) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(request, timeout=10)
        assert err.value.code() == code, (name, err.value.details())
        assert words in err.value.details(), (name, err.value.details())
        assert len(stub.Recommend(good, timeout=10).results[0].products) == 3, name
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteProducts(ranker_pb2.DeleteProductsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_metrics(channel, ranker, encoder):
    assert health(f"127.0.0.1:{ranker.port}") == health_pb2.HealthCheckResponse.SERVING
    assert (
        health(f"127.0.0.1:{ranker.port}", "ctl.v1.RankerService") == health_pb2.HealthCheckResponse.SERVING
    )
    names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"ctl.v1.RankerService", "grpc.health.v1.Health"} <= names
    with grpc.insecure_channel(encoder.address) as ch:
        assert "ctl.v1.EncoderService" in set(ProtoReflectionDescriptorDatabase(ch).get_services())
    from prometheus_client import generate_latest

    text = generate_latest(ranker.metrics.registry).decode()
    assert 'ctl_grpc_requests_total{code="OK",method="Recommend",service="ctl.v1.RankerService"}' in text
    assert 'code="NOT_FOUND",method="Recommend"' in text
    assert 'ctl_ranker_candidates_scored_count{mode="certify"}' in text


def test_ctl_health_command(ranker):
    """`ctl health` (the containers' health check) exits 0 only for SERVING."""
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctl_app.cli",
            "health",
            f"127.0.0.1:{ranker.port}",
            "--service",
            "ctl.v1.RankerService",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "ctl_app.cli", "health", f"127.0.0.1:{ranker.port}", "--service", "no.Such"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout


def test_restart_on_the_same_store_keeps_the_catalog(loop, encoder, store_dir, tmp_path, ranker, stub):
    """A second ranker on the same directory gives up after its start-up timeout while the first holds it;
    after the first stops, a new one serves the same catalog. (Runs last among the tests that use the
    module's ranker; tests/test_faults.py has the one that waits and takes over.)"""
    before = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest())
    with pytest.raises(StoreLocked, match=r"gave up after 1 s: .*already open in another process"):
        start_ranker(loop, ranker_config(encoder.address, store_dir, startup_timeout_s=1))
    loop.call(ranker.stop(grace=1))
    again = start_ranker(loop, ranker_config(encoder.address, store_dir))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{again.port}") as ch:
            after = ranker_pb2_grpc.RankerServiceStub(ch).GetCatalogStats(ranker_pb2.GetCatalogStatsRequest())
        assert after == before and after.total_products > 0
    finally:
        loop.call(again.stop(grace=1))


def test_readiness_follows_the_store(loop, encoder, tmp_path):
    """A store that stops answering (a Qdrant server gone) turns readiness NOT_SERVING, liveness stays
    SERVING, and it comes back by itself. The fault is injected into the real store's check(): this
    machine has no Qdrant server to stop (tests/test_faults.py has the real unreachable URL at start-up)."""
    r = start_ranker(loop, ranker_config(encoder.address, tmp_path))
    address = f"127.0.0.1:{r.port}"
    try:
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        real_check = r.store.check

        async def unreachable() -> None:
            raise StoreError("cannot reach Qdrant at http://qdrant:6333 (check the collection): refused")

        r.store.check = unreachable
        wait_until(lambda: health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        assert health(address, "liveness") == health_pb2.HealthCheckResponse.SERVING
        r.store.check = real_check
        wait_until(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING, timeout=10)
    finally:
        loop.call(r.stop(grace=1))


def test_encoder_down_gives_unavailable_quickly_and_recovers(loop, exported_repo, tmp_path, scenes):
    enc = start_encoder(exported_repo)
    wait_serving(enc.address)
    port = enc.port
    r = start_ranker(loop, ranker_config(enc.address, tmp_path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as ch:
            stub = ranker_pb2_grpc.RankerServiceStub(ch)
            stub.UpsertProducts(stream([ranker_pb2.Product(product_id="p", category="c", image=scenes[0])]))
            request = ranker_pb2.RecommendRequest(scene_image=scenes[1], categories=["c"])
            assert stub.Recommend(request).results[0].products[0].product_id == "p"
            enc.stop(kill=True)
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(request, timeout=5)
            # UNAVAILABLE, not DEADLINE_EXCEEDED: it did not wait for a dead encoder until the deadline
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            deadline = time.monotonic() + 10
            while health(f"127.0.0.1:{r.port}") != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health did not turn NOT_SERVING"
                time.sleep(0.1)
            # readiness follows the encoder; liveness does not (no restart can bring the encoder back)
            assert health(f"127.0.0.1:{r.port}", "liveness") == health_pb2.HealthCheckResponse.SERVING
            enc = start_encoder(exported_repo, "--port", str(port))
            wait_serving(f"127.0.0.1:{r.port}", timeout=30)
            assert stub.Recommend(request, timeout=10).results[0].products[0].product_id == "p"
    finally:
        loop.call(r.stop(grace=1))
        enc.stop()


RANKER_IMAGE = """
import importlib.abc, sys

class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "PIL", "torchvision"):
            raise ImportError(f"{name} is not in the ranker's image")

sys.meta_path.insert(0, NotInTheImage())
"""


def test_the_ranker_and_the_ingest_client_run_without_torch_or_pillow():
    """As in the ranker's container image (base install: no torch, no Pillow): the `ctl` parser, the ranker,
    `ctl ingest`, `ctl recommend` and its report import, and `ctl serve-ranker`'s flags parse."""
    code = RANKER_IMAGE + (
        "import ranker_service.server, ranker_service.cli, ctl_app.cli\n"
        "import ctl_app.ingest.cli, ctl_app.recommend, ctl_app.report\n"
        "ctl_app.cli.build_parser().parse_args(['serve-ranker', '--port', '0'])\n"
        "assert not {'torch', 'PIL'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    blocked = subprocess.run(
        [sys.executable, "-c", RANKER_IMAGE + "import encoder_service.decode"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert "not in the ranker's image" in blocked.stderr  # the blocker works


def test_serve_ranker_command_drains_in_flight_calls_on_sigterm(encoder, tmp_path, scenes):
    """The real `ctl serve-ranker` process, configured by environment variables: an UpsertProducts stream
    still open when SIGTERM arrives completes and is stored; the process then exits 0."""
    proc = Process(
        "serve-ranker",
        env={
            "CTL_RANKER_PORT": "0",
            "CTL_RANKER_METRICS_PORT": "-1",
            "CTL_RANKER_ENCODER": encoder.address,
            "CTL_RANKER_STORE_PATH": str(tmp_path / "store-{model_version}"),
            "CTL_RANKER_GRACE_S": "20",
        },
    )
    try:
        wait_serving(proc.address)

        def stored() -> int:
            with grpc.insecure_channel(proc.address) as other:
                stub = ranker_pb2_grpc.RankerServiceStub(other)
                return stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10).total_products

        def slow_stream():
            for i in range(6):
                if i == 2:
                    # the call is in the ranker's hands (its first records stored: a paused stream has
                    # what it sent written) before SIGTERM, whatever the machine's speed: a call gRPC has
                    # not handed to the ranker yet is CANCELLED at shutdown (grpc/grpc#41785)
                    wait_until(lambda: stored() == 2, timeout=60)
                    proc.proc.send_signal(signal.SIGTERM)
                    time.sleep(0.5)
                yield ranker_pb2.UpsertProductsRequest(
                    product=ranker_pb2.Product(
                        product_id=f"p{i}", category="c", image=scenes[i % len(scenes)]
                    )
                )

        with grpc.insecure_channel(proc.address) as ch:
            reply = ranker_pb2_grpc.RankerServiceStub(ch).UpsertProducts(slow_stream(), timeout=30)
        assert reply.received == 6 and reply.upserted == 6
        assert proc.proc.wait(30) == 0
        assert "shutting down" in proc.output()
    finally:
        proc.stop()
    (store,) = tmp_path.glob("store-*")
    meta = json.loads((store / "ctl_store.json").read_text())

    async def count():
        opened = await open_edge_store(store, meta["model_version"], meta["dim"])
        try:
            return await opened.count("c")
        finally:
            await opened.close()

    assert asyncio.run(count()) == 6  # the drained call's products are on disk


def test_calls_over_the_concurrency_limit_are_refused_at_once(loop, encoder, tmp_path, catalog):
    """Two UpsertProducts streams held open fill a limit of 2: a third call is refused RESOURCE_EXHAUSTED
    at once (not queued), health still answers, and once the streams end calls go through again."""
    limited = start_ranker(loop, ranker_config(encoder.address, tmp_path / "store", max_concurrent_calls=2))
    release = threading.Event()

    def held_open():
        yield ranker_pb2.UpsertProductsRequest(product=catalog[0])
        release.wait(30)  # the stream stays in flight until the test lets it end

    try:
        with grpc.insecure_channel(f"127.0.0.1:{limited.port}") as ch:
            stub = ranker_pb2_grpc.RankerServiceStub(ch)
            streams = [stub.UpsertProducts.future(held_open(), timeout=60) for _ in range(2)]
            stats = ranker_pb2.GetCatalogStatsRequest()
            deadline = time.monotonic() + 10
            while True:  # until both streams are in flight
                try:
                    stub.GetCatalogStats(stats, timeout=5)
                except grpc.RpcError as exc:
                    refusal = exc
                    break
                assert time.monotonic() < deadline, "the limit was never reached"
                time.sleep(0.05)
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
            assert "limit of 2 concurrent calls" in refusal.details()
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetCatalogStats(stats, timeout=5)
            # refused, not queued: a queued call would have waited for the held streams past its deadline
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            release.set()
            assert [s.result(timeout=30).upserted for s in streams] == [1, 1]
            assert stub.GetCatalogStats(stats, timeout=5).total_products == 1
    finally:
        release.set()
        loop.call(limited.stop(grace=1))


def test_a_stream_over_the_record_limit_is_refused_after_the_first_ones_are_stored(
    loop, encoder, tmp_path, catalog
):
    short = start_ranker(loop, ranker_config(encoder.address, tmp_path / "store", max_stream_records=3))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{short.port}") as ch:
            stub = ranker_pb2_grpc.RankerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as refused:
                stub.UpsertProducts(stream(catalog[:5]), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (
                "at most 3 products: the first 3 were processed (3 stored, 0 failed)"
                in refused.value.details()
            )
            stats = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10)
            assert stats.total_products == 3  # exactly the first three: nothing half-written
            assert stub.UpsertProducts(stream(catalog[3:5]), timeout=60).upserted == 2  # the rest, resent
            assert stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10).total_products == 5
    finally:
        loop.call(short.stop(grace=1))


def test_ingestion_has_its_own_encoder_deadline(loop, exported_repo, tmp_path, catalog, scenes):
    """An encoder that holds every pass 0.5 s (a slow model): the interactive deadline (0.3 s) fails
    Recommend with UNAVAILABLE, while UpsertProducts' encoder calls get encoder_products_timeout_s."""
    slow = start_encoder(exported_repo, "--max-wait-ms", "500")
    wait_serving(slow.address)
    ranker = start_ranker(loop, ranker_config(slow.address, tmp_path / "store", encoder_timeout_s=0.3))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranker.port}") as ch:
            stub = ranker_pb2_grpc.RankerServiceStub(ch)
            assert stub.UpsertProducts(stream(catalog[:3]), timeout=60).upserted == 3
            request = ranker_pb2.RecommendRequest(scene_image=scenes[0], categories=[catalog[0].category])
            with pytest.raises(grpc.RpcError) as late:
                stub.Recommend(request, timeout=30)
            assert late.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "DEADLINE_EXCEEDED" in late.value.details()
    finally:
        loop.call(ranker.stop(grace=1))
        slow.stop()


def test_the_last_record_of_a_product_in_a_stream_wins(loop, encoder, encoder_stub, tmp_path, catalog):
    """Issue 14 #6. One stream sends product X twice: first as an image in category Old (its batch waits for
    the encoder), later as a precomputed embedding in category New (its batch needs no encoder, so it was
    written first, and the older record landed over it). Sent in order, the last record must win, also
    within one batch (embeddings were written before images), and `upserted` counts X once."""
    ranker = start_ranker(loop, ranker_config(encoder.address, tmp_path / "store", upsert_batch=4))
    emb = encoder_stub.EncodeProducts(encoder_pb2.EncodeProductsRequest(images=[catalog[9].image]))
    embedding = emb.results[0].embedding

    def product(pid: str, category: str, image: bytes | None = None) -> ranker_pb2.Product:
        if image is not None:
            return ranker_pb2.Product(product_id=pid, category=category, image=image, metadata={"v": "old"})
        return ranker_pb2.Product(
            product_id=pid, category=category, embedding=embedding, metadata={"v": "new"}
        )

    across_batches = [
        product("X", "Old", catalog[0].image),
        *(product(f"o{i}", "Old", catalog[i].image) for i in range(1, 4)),
        product("X", "New"),
        *(product(f"n{i}", "New") for i in range(3)),
    ]
    within_a_batch = [product("Y", "Old", catalog[5].image), product("Y", "New")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranker.port}") as ch:
            stub = ranker_pb2_grpc.RankerServiceStub(ch)
            reply = stub.UpsertProducts(stream(across_batches + within_a_batch), timeout=120)
            assert reply.received == 10 and not reply.failures
            assert reply.upserted == 8  # X and Y once each
            stats = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10)
            assert dict(stats.products_by_category) == {"Old": 3, "New": 5}
            new = stub.Recommend(
                ranker_pb2.RecommendRequest(
                    scene_embedding=_any_scene(stub, encoder_stub, catalog), categories=["New"], limit=10
                ),
                timeout=30,
            ).results[0]
            metadata = {p.product_id: dict(p.metadata) for p in new.products}
            assert metadata["X"] == metadata["Y"] == {"v": "new"}
    finally:
        loop.call(ranker.stop(grace=1))


def _any_scene(stub, encoder_stub, catalog) -> embeddings_pb2.SceneEmbedding:
    return encoder_stub.EncodeScene(encoder_pb2.EncodeSceneRequest(image=catalog[0].image)).embedding


def test_the_ranker_refuses_a_model_trained_with_another_attention(loop, exported_repo, tmp_path):
    """Issue 14 #3, the sibling of export's refusal: an encoder serving a model whose config says
    attention='seed' (exported before export refused them) is not served with the paper's attention: the
    ranker stops at start-up, naming the attention, instead of answering with another model's ranking."""
    import shutil

    import torch

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    for name in ENCODERS:
        path = model_file(repo, name)
        extra = {"model_version": "", "model_config": ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        config = json.loads(extra["model_config"])
        extra["model_config"] = json.dumps({**config, "attention": "seed"}, sort_keys=True)
        torch.jit.save(module, str(path), _extra_files=extra)
    seed_encoder = start_encoder(repo)
    try:
        wait_serving(seed_encoder.address)
        with pytest.raises(UnsupportedModel, match="attention='seed'"):
            start_ranker(loop, ranker_config(seed_encoder.address, tmp_path / "store"))
    finally:
        seed_encoder.stop()


def test_get_products_lists_what_the_store_holds_in_the_order_asked(loop, encoder, tmp_path, catalog):
    """GetProducts: the products held among the ids asked (id, category, metadata; no vectors), in the order
    asked, each once, and the ids not held, each once; 1 to 10,000 ids per call, each a valid id."""
    ranker = start_ranker(loop, ranker_config(encoder.address, tmp_path / "store"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranker.port}") as ch:
            stub = ranker_pb2_grpc.RankerServiceStub(ch)
            held = catalog[:6]
            assert stub.UpsertProducts(stream(held), timeout=120).upserted == 6
            a, b, c = held[4].product_id, held[0].product_id, held[2].product_id

            def get(ids):
                return stub.GetProducts(ranker_pb2.GetProductsRequest(product_ids=ids), timeout=30)

            reply = get([a, "nope", b, a, "gone", "nope", c])
            assert [p.product_id for p in reply.products] == [a, b, c]
            assert list(reply.not_found) == ["nope", "gone"]
            by_id = {p.product_id: p for p in held}
            for p in reply.products:
                assert (p.category, dict(p.metadata)) == (
                    by_id[p.product_id].category,
                    dict(by_id[p.product_id].metadata),
                )

            stub.DeleteProducts(ranker_pb2.DeleteProductsRequest(product_ids=[b]), timeout=10)
            reply = get([b, a])
            assert [p.product_id for p in reply.products] == [a] and list(reply.not_found) == [b]

            most = [f"x{i}" for i in range(10_000)]
            reply = get([*most[:-1], c])
            assert [p.product_id for p in reply.products] == [c] and len(reply.not_found) == 9_999
            refused = {
                "no ids": ([], "at least one"),
                "too many": ([*most, c], "at most 10000"),
                "an empty id": ([a, ""], "empty"),
                "a long id": ([a, "x" * 513], "longer than 512 bytes"),
            }
            for name, (ids, words) in refused.items():
                with pytest.raises(grpc.RpcError) as err:
                    get(ids)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert words in err.value.details(), (name, err.value.details())
            assert [p.product_id for p in get([a]).products] == [a]  # still serving
    finally:
        loop.call(ranker.stop(grace=1))
