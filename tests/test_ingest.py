"""`ctl ingest` and `ctl recommend` as real processes against a real encoder and ranker (ctl_app.local: the
same servers, on loopback, embedded Qdrant): planted bad records, a job killed half-way and resumed,
CSV with metadata into the embedded store, and the HTML report opened in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from ctl_app.ingest.catalog import read_catalog
from ctl_app.ingest.job import IngestConfig, format_summary, ingest
from ctl_app.local import local_services
from tests.browser import images_loaded, open_page
from tests.servers import REPO, HoldingProxy

GOOD = 150  # products of the generated set in the catalog
MiB = 1 << 20  # also a catalog record's limit (ctl_app.ingest.catalog.MAX_RECORD_BYTES)


def ctl(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    return subprocess.run(
        [sys.executable, "-m", "ctl_app.cli", *args], cwd=REPO, capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="module")
def services(loop, exported_repo, tmp_path_factory):
    cm = local_services(exported_repo, str(tmp_path_factory.mktemp("store") / "{model_version}"))
    yield loop.call(cm.__aenter__())
    loop.call(cm.__aexit__(None, None, None))


@pytest.fixture(scope="module")
def stub(services):
    with grpc.insecure_channel(services.ranker_address) as channel:
        yield ranker_pb2_grpc.RankerServiceStub(channel)


def stats(stub) -> ranker_pb2.CatalogStats:
    return stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10)


@pytest.fixture(scope="module")
def catalog(synth_dir, tmp_path_factory):
    """A JSON-lines catalog of GOOD products with planted bad records; returns (path, good rows, bad)."""
    root = tmp_path_factory.mktemp("catalog")
    (root / "images").mkdir()
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    good = []
    for sig, category in sorted(categories.items())[:GOOD]:
        (root / "images" / f"{sig}.jpg").write_bytes((synth_dir / "images" / f"{sig}.jpg").read_bytes())
        good.append(
            {"product_id": sig, "category": category, "image": f"images/{sig}.jpg", "metadata": {"n": "1"}}
        )
    real = (root / "images" / f"{good[0]['product_id']}.jpg").read_bytes()
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (root / "images" / "truncated.jpg").write_bytes(real[: len(real) // 3])
    (root / "images" / "empty.jpg").write_bytes(b"")
    shoes = "Apparel & Accessories|Shoes"

    def row(pid: str, image: str, **extra) -> str:
        return json.dumps({"product_id": pid, "category": shoes, "image": image, **extra})

    bad = {  # product id -> (catalog line, expected status)
        "bad-corrupt": (row("bad-corrupt", "images/corrupt.jpg"), "INVALID_ARGUMENT"),
        "bad-truncated": (row("bad-truncated", "images/truncated.jpg"), "INVALID_ARGUMENT"),
        "bad-missing": (row("bad-missing", "images/nope.jpg"), "NOT_FOUND"),
        "bad-empty": (row("bad-empty", "images/empty.jpg"), "INVALID_ARGUMENT"),
        "bad-column": (row("bad-column", good[1]["image"], colour="red"), "INVALID_ARGUMENT"),
        "bad-url": (row("bad-url", "https://example.com/a.jpg"), "INVALID_ARGUMENT"),
        "bad-json": ('{"product_id": "bad-json", "category": ', "INVALID_ARGUMENT"),
    }
    lines = [json.dumps(r) for r in good]
    at = [20, 40, 60, 80, 100, 120, 140]
    for position, (line, _) in zip(at, bad.values()):
        lines.insert(position, line)
    # the same product again, identical (skipped), and with other data (an error)
    lines.insert(130, json.dumps(good[5]))
    lines.append(json.dumps({**good[7], "category": "Apparel & Accessories|Hats"}))
    path = root / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = {(pid, code) for pid, (_, code) in bad.items()} | {(good[7]["product_id"], "ALREADY_EXISTS")}
    return path, good, expected


def report(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def journaled(path: Path) -> int:
    """Records the journal says landed (the header and a torn last line do not count)."""
    count = 0
    for line in path.read_text().splitlines()[1:]:
        try:
            count += json.loads(line)["ok"] is True
        except (json.JSONDecodeError, KeyError):
            pass
    return count


def summary_number(output: str, label: str) -> int:
    found = re.search(rf"{label}\s+(\d+)", output)
    assert found, output
    return int(found.group(1))


def test_catalog_formats_and_problems(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        '{"id": "a", "category": "Shoes", "image": "a.jpg", "metadata": {"brand": "x", "size": 42}}\n'
        "\n"
        '{"product_id": "b", "category": "", "image": "b.jpg"}\n'
        '{"product_id": "c", "category": "Shoes", "image": "c.jpg", "colour": "red"}\n'
        "[1, 2]\n"
    )
    a, b, c, d = read_catalog(jsonl)
    assert (a.line, a.product_id, a.metadata, a.problem) == (1, "a", {"brand": "x", "size": "42"}, "")
    assert b.line == 3 and "category is missing" in b.problem
    assert "unknown column 'colour'" in c.problem
    assert d.problem == "not a JSON object"
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(
        "product_id,category,image,metadata.brand,colour\np1,Shoes,p1.jpg,x,red\np2,Bags,p2.jpg,y\n"
    )
    p1, p2 = read_catalog(csv_path, metadata_columns=("colour",))
    assert p1.metadata == {"brand": "x", "colour": "red"} and p1.problem == ""
    assert p2.line == 3 and "fields where the header has" in p2.problem
    (p1,) = list(read_catalog(csv_path))[:1]
    assert "unknown column 'colour'" in p1.problem


def test_killed_job_resumes_and_ends_with_exactly_the_catalog(loop, services, stub, catalog):
    path, good, expected = catalog
    journal = path.with_name(path.name + ".journal")
    args = ["ingest", str(path), "--ranker", services.ranker_address, "--batch", "4", "--streams", "1"]
    # The job's 4th UpsertProducts stream is held by a proxy in front of the ranker: the job is killed
    # there, half-way, however fast the machine is (no race between the job and the kill).
    proxy = HoldingProxy(loop, services.ranker_address, "/ctl.v1.RankerService/UpsertProducts", passes=3)
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "ctl_app.cli", *args[:2], "--ranker", proxy.address, *args[4:]],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not (journal.exists() and journaled(journal) >= 12):
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        proxy.close()
    landed = journaled(journal)
    assert first.returncode == -signal.SIGKILL and 12 <= landed < GOOD
    assert landed <= stats(stub).total_products < GOOD  # half-way: more may have landed than journaled

    second = ctl(*args)
    assert second.returncode == 1, second.stdout + second.stderr  # the planted records failed
    assert summary_number(second.stdout, "already ingested") == landed  # not sent again
    assert summary_number(second.stdout, "ingested now") == GOOD - landed
    assert summary_number(second.stdout, "identical duplicates") == 1
    errors = report(path.with_name(path.name + ".errors.jsonl"))
    assert {(e["product_id"], e["code"]) for e in errors} == expected
    assert all(e["reason"] for e in errors) and len(errors) == len(expected)
    after = stats(stub)
    assert after.total_products == GOOD
    assert dict(after.products_by_category) == dict(Counter(r["category"] for r in good))

    third = ctl(*args)  # a finished job: nothing is sent, nothing changes, the same failures are listed
    assert third.returncode == 1
    assert summary_number(third.stdout, "ingested now") == 0
    assert summary_number(third.stdout, "already ingested") == GOOD
    assert report(path.with_name(path.name + ".errors.jsonl")) == errors
    assert stats(stub) == after


def test_recommend_prints_the_ranking_and_writes_a_page_chromium_shows(
    services, stub, catalog, synth_dir, tmp_path
):
    path, good, _ = catalog
    ctl(
        "ingest", str(path), "--ranker", services.ranker_address
    )  # (already ingested when run after the test above)
    pairs = [json.loads(line) for line in (synth_dir / "fashion.json").read_text().splitlines()]
    scene = synth_dir / "images" / f"{sorted({p['scene'] for p in pairs})[0]}.jpg"
    category = good[0]["category"]
    page_path = tmp_path / "out.html"
    shown = ctl(
        "recommend", "--ranker", services.ranker_address, "--scene", str(scene), "--category", category,
        "--limit", "5", "--explain", "--html", str(page_path), "--catalog", str(path),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    direct = stub.Recommend(
        ranker_pb2.RecommendRequest(
            scene_image=scene.read_bytes(), categories=[category], limit=5, explain=True
        )
    ).results[0]
    ids = [p.product_id for p in direct.products]
    rows = [line.split() for line in shown.stdout.splitlines() if re.match(r"\s+\d+\s+\S+\s+\d\.\d{4}", line)]
    assert [r[1] for r in rows] == ids
    np.testing.assert_allclose([float(r[2]) for r in rows], [p.distance for p in direct.products], atol=1e-4)
    assert f"report: {page_path.resolve()}" in shown.stdout

    with open_page(page_path) as page:
        assert page.locator("h3.category").all_inner_texts() == [category]
        assert page.eval_on_selector_all("tr.rec", "rs => rs.map(r => r.dataset.productId)") == ids
        assert all(images_loaded(page, "img.scene")) and len(images_loaded(page, "img.scene")) == 1 + len(ids)
        assert images_loaded(page, "img.product") == [True] * len(ids)
        for row, product in zip(page.locator("tr.rec").all(), direct.products):
            weights = row.locator(".cell").evaluate_all("cs => cs.map(c => parseFloat(c.dataset.weight))")
            np.testing.assert_allclose(weights, product.attention, atol=1e-5)
            opacities = row.locator(".cell").evaluate_all(
                "cs => cs.map(c => parseFloat(getComputedStyle(c).opacity))"
            )
            assert int(np.argmax(opacities)) == int(np.argmax(product.attention))
        box = page.locator(".heat").first.bounding_box()
        assert box["width"] == box["height"] == 320  # the letterboxed square the regions refer to
        page.screenshot(path=str(tmp_path / "out.png"))


def test_csv_catalog_into_the_embedded_store(exported_repo, synth_dir, tmp_path):
    """--embedded: the encoder and the ranker in the ingest process; the store then holds the catalog."""
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    rows = sorted(categories.items())[:20]
    lines = ["product_id,category,image,metadata.brand,season"]
    lines += [
        f"{sig},{cat},{synth_dir / 'images' / f'{sig}.jpg'},b{i % 3},summer"
        for i, (sig, cat) in enumerate(rows)
    ]
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store" / "{model_version}"
    common = ["--embedded", "--model-repo", str(exported_repo), "--store-path", str(store)]
    common += ["--images", str(synth_dir)]  # the paths are absolute, under it
    done = ctl("ingest", str(path), *common, "--metadata-columns", "season")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary_number(done.stdout, "ingested now") == 20
    again = ctl("ingest", str(path), *common, "--metadata-columns", "season")
    assert again.returncode == 0 and summary_number(again.stdout, "already ingested") == 20

    import asyncio

    from ranker_service.store.edge import open_edge_store

    version = json.loads((exported_repo / "model_info.json").read_text())["model_version"]
    dim = json.loads((exported_repo / "model_info.json").read_text())["config"]["embed_dim"]

    async def read_back():
        s = await open_edge_store(str(store).replace("{model_version}", version), version, dim)
        try:
            return await s.counts_by_category(), await s.retrieve([rows[4][0]])
        finally:
            await s.close()

    async def ingest_while_held():
        s = await open_edge_store(str(store).replace("{model_version}", version), version, dim)
        try:
            start = time.monotonic()
            held = await asyncio.to_thread(ctl, "ingest", str(path), *common, "--fresh")
            return held, time.monotonic() - start
        finally:
            await s.close()

    counts, (point,) = asyncio.run(read_back())
    assert counts == dict(Counter(cat for _, cat in rows))
    assert point.metadata == {"brand": "b1", "season": "summer"} and point.category == rows[4][1]
    # a command does not wait for a store that a running ranker holds: it says so and exits 1
    held, took = asyncio.run(ingest_while_held())
    assert held.returncode == 1 and "already open in another process" in held.stdout + held.stderr
    assert "gave up after 1 s" in held.stdout + held.stderr  # it waited its one second, no more
    print(f"ctl ingest on a held store: exit 1 after {took:.1f} s")


def test_a_missing_catalog_is_a_usage_error(tmp_path):
    result = ctl("ingest", str(tmp_path / "nope.jsonl"), "--ranker", "127.0.0.1:1")
    assert result.returncode == 2
    assert "nope.jsonl: no such catalog file" in result.stderr


# --- the journal against the store it describes (issue 14, item 7) ----------------------------------------


@contextlib.contextmanager
def ranker_on(loop, exported_repo, store: Path):
    """An encoder and a ranker on loopback with the embedded store in `store` (per model version)."""
    cm = local_services(exported_repo, str(store / "{model_version}"))
    services = loop.call(cm.__aenter__())
    try:
        yield services
    finally:
        loop.call(cm.__aexit__(None, None, None))


def small_catalog(synth_dir: Path, path: Path, first: int, n: int) -> list[dict]:
    """`n` products of the generated set (from the `first`-th), image paths absolute (ingest them with
    `--images synth_dir`), as JSON lines."""
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    rows = [
        {"product_id": sig, "category": cat, "image": str(synth_dir / "images" / f"{sig}.jpg")}
        for sig, cat in sorted(categories.items())[first : first + n]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def by_category(rows: list[dict]) -> dict[str, int]:
    return dict(Counter(r["category"] for r in rows))


def test_a_wiped_store_gets_the_whole_catalog_again(loop, exported_repo, synth_dir, tmp_path):
    """The store is deleted with the ranker stopped and a fresh ranker starts on the same path: the
    journal (same target, same model) says everything landed, the store holds nothing; the rerun sends it
    all again and says why."""
    path = tmp_path / "catalog.jsonl"
    rows = small_catalog(synth_dir, path, 0, 24)
    store = tmp_path / "store"
    with ranker_on(loop, exported_repo, store) as services:
        first = ctl("ingest", str(path), "--ranker", services.ranker_address, "--images", str(synth_dir))
        assert first.returncode == 0, first.stdout + first.stderr
        assert summary_number(first.stdout, "ingested now") == 24
    shutil.rmtree(store)
    with (
        ranker_on(loop, exported_repo, store) as services,
        grpc.insecure_channel(services.ranker_address) as channel,
    ):
        assert stats(ranker_pb2_grpc.RankerServiceStub(channel)).total_products == 0
        again = ctl("ingest", str(path), "--ranker", services.ranker_address, "--images", str(synth_dir))
        after = stats(ranker_pb2_grpc.RankerServiceStub(channel))
    out = again.stdout + again.stderr
    assert after.total_products == 24, out
    assert dict(after.products_by_category) == by_category(rows)
    assert again.returncode == 0, out
    assert summary_number(again.stdout, "ingested now") == 24
    assert summary_number(again.stdout, "already ingested") == 0
    assert summary_number(again.stdout, "re-sent") == 24
    assert (
        "the store lacks 24 products the journal recorded as ingested (wiped, restored from an older copy, "
        "deleted): sending them again" in out
    )


def test_products_deleted_from_the_store_are_sent_again(loop, exported_repo, synth_dir, tmp_path):
    """DeleteProducts through the ranker, then a rerun: the deleted ones, and only they, are sent again.
    Products of the same categories from another catalog (more in the store than the journal recorded) and
    products taken out of both the catalog and the store are no reason to distrust the journal."""
    path = tmp_path / "catalog.jsonl"
    rows = small_catalog(synth_dir, path, 0, 24)
    with (
        ranker_on(loop, exported_repo, tmp_path / "store") as services,
        grpc.insecure_channel(services.ranker_address) as channel,
    ):
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        args = ["--ranker", services.ranker_address, "--images", str(synth_dir)]
        assert ctl("ingest", str(path), *args).returncode == 0
        counts = by_category(rows)
        big = max(counts, key=counts.get)
        others = [r["product_id"] for r in rows if r["category"] != big]
        gone = [*[r["product_id"] for r in rows if r["category"] == big][:3], others[0]]
        deleted = stub.DeleteProducts(ranker_pb2.DeleteProductsRequest(product_ids=gone), timeout=10)
        assert deleted.deleted == 4 and stats(stub).total_products == 20

        again = ctl("ingest", str(path), *args)
        out = again.stdout + again.stderr
        assert stats(stub).total_products == 24, out
        assert dict(stats(stub).products_by_category) == counts
        assert again.returncode == 0, out
        assert summary_number(again.stdout, "re-sent") == 4
        assert summary_number(again.stdout, "ingested now") == 4
        assert summary_number(again.stdout, "already ingested") == 20
        assert "the store lacks 4 products the journal recorded as ingested" in out
        assert ", ".join(repr(i) for i in sorted(gone, key=[r["product_id"] for r in rows].index)) in out

        # now trusted again: nothing is sent
        third = ctl("ingest", str(path), *args)
        assert third.returncode == 0 and summary_number(third.stdout, "ingested now") == 0, third.stdout
        assert summary_number(third.stdout, "already ingested") == 24

        # another catalog in the same categories: the store holds more than this journal recorded
        other = tmp_path / "other.jsonl"
        extra = small_catalog(synth_dir, other, 24, 12)
        assert ctl("ingest", str(other), *args).returncode == 0
        assert stats(stub).total_products == 36
        fourth = ctl("ingest", str(path), *args)
        assert summary_number(fourth.stdout, "ingested now") == 0, fourth.stdout + fourth.stderr
        assert summary_number(fourth.stdout, "re-sent") == 0

        # products taken out of the catalog and deleted from the store: not sent, nothing re-sent
        kept = [r for r in rows if r["product_id"] not in gone]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        stub.DeleteProducts(ranker_pb2.DeleteProductsRequest(product_ids=gone), timeout=10)
        fifth = ctl("ingest", str(path), *args)
        out = fifth.stdout + fifth.stderr
        assert fifth.returncode == 0, out
        assert summary_number(fifth.stdout, "ingested now") == 0, out
        assert summary_number(fifth.stdout, "already ingested") == len(kept)
        assert stats(stub).total_products == len(kept) + len(extra)


class _DeleteAfterTheFirstStream(grpc.aio.StreamUnaryClientInterceptor):
    """Deletes `ids` through another channel once the job's first UpsertProducts stream is answered."""

    def __init__(self, address: str, ids: list[str]):
        self.address, self.ids, self.done = address, ids, False

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        call = await continuation(client_call_details, request_iterator)
        await call
        if not self.done:
            self.done = True
            async with grpc.aio.insecure_channel(self.address) as side:
                request = ranker_pb2.DeleteProductsRequest(product_ids=self.ids)
                await ranker_pb2_grpc.RankerServiceStub(side).DeleteProducts(request, timeout=10)
        return call


def test_products_deleted_during_the_job_are_reported_and_a_rerun_sends_them(
    loop, exported_repo, synth_dir, tmp_path
):
    path = tmp_path / "catalog.jsonl"
    rows = small_catalog(synth_dir, path, 0, 12)
    config = IngestConfig(catalog=path, images=synth_dir, batch=4, streams=1)
    gone = [r["product_id"] for r in rows[:2]]  # in the first stream
    with ranker_on(loop, exported_repo, tmp_path / "store") as services:
        deleting = _DeleteAfterTheFirstStream(services.ranker_address, gone)

        async def job():
            async with grpc.aio.insecure_channel(services.ranker_address, interceptors=[deleting]) as ch:
                return await ingest(config, ch)

        summary = loop.call(job())
        assert deleting.done and summary.ingested == 12 and not summary.failures
        assert summary.short == gone
        assert not summary.ok and "STORE SHORT" in format_summary(config, summary)

        again = ctl("ingest", str(path), "--ranker", services.ranker_address, "--images", str(synth_dir))
        assert again.returncode == 0, again.stdout + again.stderr
        assert summary_number(again.stdout, "re-sent") == 2
        assert summary_number(again.stdout, "already ingested") == 10
        with grpc.insecure_channel(services.ranker_address) as channel:
            after = stats(ranker_pb2_grpc.RankerServiceStub(channel))
        assert dict(after.products_by_category) == by_category(rows)


class _HeldImages(grpc.aio.StreamUnaryClientInterceptor):
    """Counts the image bytes the job holds: read (read_image, wrapped) and not yet answered for (each
    UpsertProducts stream's, once the ranker has answered it). Measures only; the job reads and sends as
    it would. `peak`: the most held at once; `streams`: (records, image bytes) of each stream."""

    def __init__(self):
        self.held = self.peak = 0
        self.streams: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        with self._lock:
            self.held += size
            self.peak = max(self.peak, self.held)

    def read_image(self, *args, **kw) -> bytes:
        from ctl_app.ingest.catalog import read_image

        data = read_image(*args, **kw)
        self.add(len(data))
        return data

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        sizes: list[int] = []

        def counted():
            for request in request_iterator:
                sizes.append(len(request.product.image))
                yield request

        call = await continuation(client_call_details, counted())
        await call
        self.streams.append((len(sizes), sum(sizes)))
        self.add(-sum(sizes))
        return call


def test_the_images_the_job_holds_are_bounded_by_bytes(loop, services, synth_dir, tmp_path, monkeypatch):
    """Only a batch's record count bounded the job, and it read up to 9 batches ahead (the review: 700
    images of 6 MiB, 2.1 GB resident). Now the images held (the batch being made, queued, in flight) are
    at most --max-bytes-in-flight besides the one being read, a stream carries at most --batch-bytes, and
    an image larger than either still goes, alone."""
    images = tmp_path / "images"
    images.mkdir()
    categories = sorted(json.loads((synth_dir / "fashion-cat.json").read_text()).items())[:21]
    rows = []
    for i, (sig, category) in enumerate(categories):
        jpeg = (synth_dir / "images" / f"{sig}.jpg").read_bytes()
        size = 3 * MiB if i == 10 else MiB
        (images / f"{sig}.jpg").write_bytes(jpeg + bytes(size - len(jpeg)))  # bytes after the image's end
        rows.append({"product_id": sig, "category": category, "image": f"{sig}.jpg"})
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = IngestConfig(
        catalog=path, images=images, batch=64, batch_bytes=2 * MiB, streams=2, max_bytes_in_flight=3 * MiB
    )
    held = _HeldImages()
    monkeypatch.setattr("ctl_app.ingest.job.read_image", held.read_image)

    async def job():
        async with grpc.aio.insecure_channel(
            services.ranker_address,
            interceptors=[held],
            options=[("grpc.max_send_message_length", 64 * MiB)],
        ) as channel:
            return await ingest(config, channel)

    summary = loop.call(job())
    assert summary.ok and summary.ingested == 21, format_summary(config, summary)
    assert held.held == 0 and sum(n for n, _ in held.streams) == 21
    assert held.peak <= 3 * MiB + 3 * MiB, held.peak  # the budget, and the largest image being read
    assert all(size <= 2 * MiB or n == 1 for n, size in held.streams), held.streams
    assert (1, 3 * MiB) in held.streams  # the large one went alone


def test_the_byte_bounds_are_flags_and_variables(monkeypatch, caplog):
    from ctl_app.cli import build_parser, main
    from ctl_app.ingest.cli import config_from_args

    config = config_from_args(build_parser().parse_args(["ingest", "c.jsonl"]))
    assert (config.batch_bytes, config.max_bytes_in_flight) == (32 * MiB, 256 * MiB)
    monkeypatch.setenv("CTL_INGEST_MAX_BYTES_IN_FLIGHT", "1000")
    config = config_from_args(build_parser().parse_args(["ingest", "c.jsonl", "--batch-bytes", "500"]))
    assert (config.batch_bytes, config.max_bytes_in_flight) == (500, 1000)
    monkeypatch.setenv("CTL_INGEST_BATCH_BYTES", "0")
    assert main(["ingest", "c.jsonl"]) == 2  # read when the command runs: exit 2, one line naming it
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "CTL_INGEST_BATCH_BYTES='0': expected 1.." in record.getMessage()


def test_the_journal_lists_the_catalogs_ingested_products_with_their_listings(tmp_path):
    from ctl_app.ingest.journal import Journal, Outcome

    path = tmp_path / "c.journal"
    journal = Journal(path, "store A", "v1")
    journal.record([("a", Outcome("d1", True, 1, listing="l1")), ("b", Outcome("d2", True, 2, listing="l2"))])
    journal.record([("c", Outcome("d3", False, 3, "INVALID_ARGUMENT", "corrupt"))])
    journal.close()
    with path.open("a") as f:  # a journal written before listings were recorded (it had categories)
        f.write(json.dumps({"id": "old", "digest": "d4", "ok": True, "line": 4, "category": "Shoes"}) + "\n")
    again = Journal(path, "store A", "v1")
    assert again.get("a").listing == "l1" and again.get("old").listing == ""
    # in the order asked; c failed; new is not journaled; d is not asked for
    assert again.ingested(["old", "b", "c", "new", "a"]) == {"old": "", "b": "l2", "a": "l1"}
    assert again.ingested(["a"]) == {"a": "l1"}
    again.close()


def test_the_checks_ask_for_at_most_10000_ids_and_about_a_mebibyte_per_call():
    from ctl_app.ingest.job import CHECK_BYTES, _chunks

    ids = [f"p{i}" for i in range(25_000)]
    assert [len(c) for c in _chunks(ids, {i: 40 for i in ids})] == [10_000, 10_000, 5_000]
    big = {i: 1000 for i in ids}  # long metadata: the reply would pass gRPC's default 4 MiB
    chunks = list(_chunks(ids, big))
    assert [i for c in chunks for i in c] == ids
    assert all((1000 + 16) * len(c) <= CHECK_BYTES for c in chunks) and len(chunks[0]) > 1000
    assert [len(c) for c in _chunks(["huge", "x"], {"huge": 2 * CHECK_BYTES})] == [1, 1]


def _csv(path: Path, rows: list[dict]) -> None:
    path.write_text(
        "product_id,category,image\n"
        + "".join(f"{r['product_id']},{r['category']},{r['image']}\n" for r in rows)
    )


def test_products_missing_from_a_store_restored_after_the_catalog_evolved_are_sent_again(
    loop, exported_repo, synth_dir, tmp_path
):
    """The review's case, which per-category counts cannot see: the catalog replaced 10 products of one
    category by new ids (ingest never deletes, so the old ones stay in the store), then the store lost the
    new ones (restored from an older copy; here deleted). The store still holds as many products of that
    category as the journal recorded, but not these: the rerun sends them, and says why."""
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    by_cat: dict[str, list[str]] = {}
    for sig, cat in sorted(categories.items()):
        by_cat.setdefault(cat, []).append(sig)
    three = sorted(by_cat)[:3]
    image = lambda sig: str(synth_dir / "images" / f"{sig}.jpg")  # noqa: E731
    rows = [{"product_id": s, "category": c, "image": image(s)} for c in three for s in by_cat[c][:20]]
    replaced = three[0]
    new = [
        {"product_id": f"q{i + 1}", "category": replaced, "image": image(s)}
        for i, s in enumerate(by_cat[replaced][20:30])
    ]
    cat, cat2 = tmp_path / "cat.csv", tmp_path / "cat2.csv"
    _csv(cat, rows)
    _csv(cat2, new + rows[10:])  # the first 10 of `replaced` are gone from the catalog
    with (
        ranker_on(loop, exported_repo, tmp_path / "store") as services,
        grpc.insecure_channel(services.ranker_address) as channel,
    ):
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        args = ["--ranker", services.ranker_address, "--images", str(synth_dir)]
        assert ctl("ingest", str(cat), *args).returncode == 0
        second = ctl("ingest", str(cat2), *args)
        assert second.returncode == 0 and summary_number(second.stdout, "ingested now") == 60, second.stdout
        assert stats(stub).total_products == 70
        ids = [r["product_id"] for r in new]
        assert (
            stub.DeleteProducts(ranker_pb2.DeleteProductsRequest(product_ids=ids), timeout=10).deleted == 10
        )
        assert stats(stub).products_by_category[replaced] == 20  # as many as cat2.csv has: counts see nothing

        again = ctl("ingest", str(cat2), *args)
        out = again.stdout + again.stderr
        assert again.returncode == 0, out
        assert summary_number(again.stdout, "ingested now") == 10, out
        assert summary_number(again.stdout, "already ingested") == 50, out
        assert summary_number(again.stdout, "re-sent") == 10, out
        assert stats(stub).total_products == 70
        assert (
            "the store lacks 10 products the journal recorded as ingested (wiped, restored from an older "
            "copy, deleted): sending them again" in out
        )


def test_products_the_store_holds_in_an_older_version_are_sent_again(
    loop, exported_repo, synth_dir, tmp_path
):
    """A store restored from an older copy can hold a product as it was before the catalog changed it (its
    price, its category): present, but not as the journal recorded it. The rerun sends it again, and only
    it."""
    path = tmp_path / "catalog.jsonl"
    rows = small_catalog(synth_dir, path, 0, 8)
    rows = [{**r, "metadata": {"price": "10"}} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (
        ranker_on(loop, exported_repo, tmp_path / "store") as services,
        grpc.insecure_channel(services.ranker_address) as channel,
    ):
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        args = ["--ranker", services.ranker_address, "--images", str(synth_dir)]
        assert ctl("ingest", str(path), *args).returncode == 0
        older = [  # what an older copy of the store held: another price, another category
            ranker_pb2.Product(
                product_id=r["product_id"],
                category=category,
                metadata=metadata,
                image=Path(r["image"]).read_bytes(),
            )
            for r, category, metadata in [
                (rows[2], rows[2]["category"], {"price": "9"}),
                (rows[5], "Apparel & Accessories|Hats", {"price": "10"}),
            ]
        ]
        requests = (ranker_pb2.UpsertProductsRequest(product=p) for p in older)
        assert stub.UpsertProducts(requests, timeout=60).upserted == 2

        again = ctl("ingest", str(path), *args)
        out = again.stdout + again.stderr
        assert again.returncode == 0, out
        assert summary_number(again.stdout, "re-sent") == 2, out
        assert summary_number(again.stdout, "already ingested") == 6, out
        assert (
            "the store holds 2 products the journal recorded as ingested with another category or metadata "
            "(restored from an older copy, or written by another source): sending them again "
            f"({rows[2]['product_id']!r}, {rows[5]['product_id']!r})" in out
        )
        request = ranker_pb2.GetProductsRequest(product_ids=[r["product_id"] for r in rows])
        held = stub.GetProducts(request, timeout=10).products
        assert [(p.product_id, p.category, dict(p.metadata)) for p in held] == [
            (r["product_id"], r["category"], r["metadata"]) for r in rows
        ]
        third = ctl("ingest", str(path), *args)
        assert summary_number(third.stdout, "ingested now") == 0, third.stdout + third.stderr


# --- catalog files: image paths, strict records, what is printed (issue 20, items 13-16) ------------------

SECRET = "TOPSECRET-CANARY-7f3a"  # what a file outside the images folder holds
ENV_CANARY = "SECRETXY"  # the first variable of the job's environment: /proc/self/environ starts with it
SHOES = "Apparel & Accessories|Shoes"


def _two_good(synth_dir: Path, images: Path) -> list[dict]:
    """Two products of the generated set with their images copied into `images`."""
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    rows = []
    for sig, category in sorted(categories.items())[:2]:
        shutil.copyfile(synth_dir / "images" / f"{sig}.jpg", images / f"{sig}.jpg")
        rows.append({"product_id": sig, "category": category, "image": f"{sig}.jpg"})
    return rows


def _limited_memory() -> None:
    """The job runs in 4 GiB of address space: reading /dev/zero to its end (as it did) fails, fast. (Runs
    in the forked child before exec: nothing to import there.) Not 2 GiB: a gRPC client with numpy already
    reserves ~1 GiB of address space (thread stacks, malloc arenas, more with more cores), and at 2 GiB the
    job itself aborted once in a clean-clone CI run (gRPC's poller: epoll_wait EBADF, then SIGABRT)."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _hostile(kind: str, root: Path, images: Path) -> tuple[str, str, str]:
    """Plants one hostile image reference of `kind`: (the catalog's image value, status, reason)."""
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_text(SECRET)
    away = "is outside the images folder"
    if kind == "absolute":
        return str(outside / "secret.jpg"), "PERMISSION_DENIED", away
    if kind == "dotdot":
        return "../outside/secret.jpg", "PERMISSION_DENIED", away
    if kind == "symlink":
        (images / "link.jpg").symlink_to(outside / "secret.jpg")
        return "link.jpg", "PERMISSION_DENIED", away
    if kind == "symlinked-folder":  # a link in the middle of the path: O_NOFOLLOW alone would follow it
        (images / "sub").symlink_to(outside, target_is_directory=True)
        return "sub/secret.jpg", "PERMISSION_DENIED", away
    if kind == "dev-zero":
        (images / "zero.jpg").symlink_to("/dev/zero")
        return "zero.jpg", "PERMISSION_DENIED", away
    if kind == "fifo":  # opening it to read would wait for a writer forever
        os.mkfifo(images / "pipe.jpg")
        return "pipe.jpg", "INVALID_ARGUMENT", "is a named pipe, not a regular file"
    if kind == "proc-environ":
        return "/proc/self/environ", "PERMISSION_DENIED", away
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["absolute", "dotdot", "symlink", "symlinked-folder", "dev-zero", "fifo", "proc-environ"]
)
def test_an_image_path_that_leaves_the_images_folder_fails_its_record_alone_and_leaks_nothing(
    services, synth_dir, tmp_path, kind
):
    images = tmp_path / "images"
    images.mkdir()
    good = _two_good(synth_dir, images)
    image, code, reason = _hostile(kind, tmp_path, images)
    bad_id = "bad\x1b[31m-" + kind  # printed nowhere raw either
    rows = [good[0], {"product_id": bad_id, "category": SHOES, "image": image}, good[1]]
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {ENV_CANARY: "the-token-value", **os.environ}  # first, so /proc/self/environ starts with it
    done = ctl(
        "ingest", str(path), "--ranker", services.ranker_address, "--images", str(images),
        env=env, preexec_fn=_limited_memory, timeout=120,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # one record failed; not a crash
    assert summary_number(done.stdout, "ingested now") == 2, out  # the job went on with the good ones
    (failure,) = report(path.with_name(path.name + ".errors.jsonl"))
    assert (failure["line"], failure["product_id"], failure["code"]) == (2, bad_id, code)
    assert reason in failure["reason"] and repr(str(images / image)) in failure["reason"], failure
    text = out + path.with_name(path.name + ".errors.jsonl").read_text()
    assert SECRET[:8] not in text and ENV_CANARY not in text and "the-token" not in text
    assert "\x1b" not in out


def test_images_outside_the_folder_are_read_when_allowed_but_never_devices_or_oversized_files(
    services, synth_dir, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    sig, category = sorted(categories.items())[3]
    (images / "zero.jpg").symlink_to("/dev/zero")
    big = images / "big.jpg"
    big.write_bytes((synth_dir / "images" / f"{sig}.jpg").read_bytes() + bytes(2000))
    rows = [
        {"product_id": "outside", "category": category, "image": str(synth_dir / "images" / f"{sig}.jpg")},
        {"product_id": "zero", "category": SHOES, "image": "zero.jpg"},
        {"product_id": "big", "category": SHOES, "image": "big.jpg"},
    ]
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    limit = big.stat().st_size - 1
    args = ["ingest", str(path), "--ranker", services.ranker_address, "--images", str(images)]
    refused = ctl(*args, "--max-image-bytes", str(limit), preexec_fn=_limited_memory, timeout=120)
    assert refused.returncode == 1 and summary_number(refused.stdout, "ingested now") == 0
    codes = {
        f["product_id"]: (f["code"], f["reason"]) for f in report(tmp_path / "catalog.jsonl.errors.jsonl")
    }
    assert codes["outside"][0] == "PERMISSION_DENIED" and "--allow-images-outside" in codes["outside"][1]

    allowed = ctl(
        *args,
        "--allow-images-outside",
        "--max-image-bytes",
        str(limit),
        preexec_fn=_limited_memory,
        timeout=120,
    )
    assert allowed.returncode == 1, allowed.stdout + allowed.stderr
    assert summary_number(allowed.stdout, "ingested now") == 1  # the image outside, by its real path
    failures = {
        f["product_id"]: (f["code"], f["reason"]) for f in report(tmp_path / "catalog.jsonl.errors.jsonl")
    }
    assert failures == {
        "zero": (
            "INVALID_ARGUMENT",
            f"image {str(images / 'zero.jpg')!r} is a character device, not a regular file",
        ),
        "big": (
            "INVALID_ARGUMENT",
            f"image {str(big)!r} is {limit + 1} bytes, over the limit of {limit} bytes (the encoder's "
            "--max-image-bytes)",
        ),
    }
    # the same switch from the environment; a malformed value is named, exit 2
    env_allowed = ctl(*args, env={**os.environ, "CTL_INGEST_ALLOW_IMAGES_OUTSIDE": "yes"}, timeout=120)
    assert summary_number(env_allowed.stdout, "already ingested") == 1, (
        env_allowed.stdout + env_allowed.stderr
    )
    bad = ctl(*args, env={**os.environ, "CTL_INGEST_ALLOW_IMAGES_OUTSIDE": "perhaps"}, timeout=120)
    assert (
        bad.returncode == 2
        and "CTL_INGEST_ALLOW_IMAGES_OUTSIDE='perhaps': expected true or false" in bad.stderr
    )


def test_read_image_reads_regular_files_under_the_root_within_the_limit(tmp_path):
    from ctl_app.ingest.catalog import ImageFileError, read_image

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"12345")
    (root / "inner.jpg").symlink_to(root / "a" / "x.jpg")  # a link that stays inside is fine
    assert read_image(root, "a/x.jpg", max_bytes=5) == b"12345"
    assert read_image(root, "inner.jpg") == b"12345"
    assert read_image(root, str(root / "a" / "x.jpg")) == b"12345"  # absolute, but under the root
    assert read_image(root, "a/../a/x.jpg") == b"12345"
    for reference, code, says in [
        ("a/x.jpg", "INVALID_ARGUMENT", "is 5 bytes, over the limit of 4 bytes"),
        ("a", "INVALID_ARGUMENT", "is a directory, not a regular file"),
        ("nope.jpg", "NOT_FOUND", "No such file or directory"),
        ("a/x.jpg/y", "NOT_FOUND", "Not a directory"),
        ("bad\0.jpg", "INVALID_ARGUMENT", "not a valid path"),
    ]:
        _refused(root, reference, code, says, max_bytes=4)
    (root / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageFileError, match="is an empty file"):
        read_image(root, "empty.jpg")


def test_read_image_walks_the_path_under_the_root_and_follows_links_itself(tmp_path, monkeypatch):
    """read_image checked realpath() and then opened the path: a folder swapped for a link to the outside
    in between was followed (O_NOFOLLOW guards the last name only). Now the path is walked name by name from
    the root, links read and walked by read_image itself; links that stay inside still work."""
    from ctl_app.ingest.catalog import read_image

    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    outside.mkdir()
    (root / "a" / "x.jpg").write_bytes(b"12345")
    (root / "b" / "y.jpg").write_bytes(b"67890")
    (outside / "secret.jpg").write_text(SECRET)
    links = {
        "la": "a", "lb": str(root / "b"), "up": "../images/a", "a/lx": "../b/y.jpg", "chain": "la",
        "loop1": "loop2", "loop2": "loop1", "dangling": "nope", "out": str(outside),
        "a/esc": "../../outside/secret.jpg",
    }  # fmt: skip
    for name, target in links.items():
        (root / name).symlink_to(target)
    (tmp_path / "via").symlink_to(root)  # --images given through a link
    for reference, data in [
        ("la/x.jpg", b"12345"),
        ("lb/y.jpg", b"67890"),
        ("up/x.jpg", b"12345"),  # out of the root and back in by its own name
        ("a/lx", b"67890"),
        ("chain/x.jpg", b"12345"),
        ("la/../b/y.jpg", b"67890"),  # '..' after a link: from the folder the link leads to, as realpath
        ("../images/a/x.jpg", b"12345"),
    ]:
        assert read_image(root, reference) == data, reference
    via = tmp_path / "via"
    for reference in ["a/x.jpg", str(via / "a" / "x.jpg"), str(root / "a" / "x.jpg")]:
        assert read_image(via, reference) == b"12345", reference
    for reference, code, says in [
        ("out/secret.jpg", "PERMISSION_DENIED", repr(str(outside / "secret.jpg"))),  # names where it leads
        ("a/esc", "PERMISSION_DENIED", "is outside the images folder"),
        ("../outside/secret.jpg", "PERMISSION_DENIED", "is outside the images folder"),
        ("la/../../outside/secret.jpg", "PERMISSION_DENIED", "is outside the images folder"),
        ("loop1", "INVALID_ARGUMENT", "Too many levels of symbolic links"),
        ("dangling", "NOT_FOUND", "No such file or directory"),
        ("a/", "INVALID_ARGUMENT", "is a directory"),
    ]:
        _refused(root, reference, code, says)
    # The swap, made deterministic: realpath() answers as if 'out' were still a real folder when checked;
    # the link is there when the path is opened (realpath is replaced: the race itself cannot be caused on
    # demand). read_image opened it through the link and read the secret.
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    _refused(root, "out/secret.jpg", "PERMISSION_DENIED", "is outside the images folder")


def _refused(root: Path, reference: str, code: str, says: str, **kw) -> None:
    """read_image refuses `reference` with status `code` and a reason that holds `says`."""
    from ctl_app.ingest.catalog import ImageFileError, read_image

    with pytest.raises(ImageFileError) as caught:
        read_image(root, reference, **kw)
    assert caught.value.code == code and says in str(caught.value), (reference, str(caught.value))


def _two_ingested(path: Path, ranker: str, images: Path) -> list[dict]:
    """Runs `ctl ingest` on a catalog of two good records and bad ones: it must end (exit 1, no traceback)
    with the two ingested; returns its error report."""
    done = ctl("ingest", str(path), "--ranker", ranker, "--images", str(images), timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    assert summary_number(done.stdout, "ingested now") == 2, out
    return report(path.with_name(path.name + ".errors.jsonl"))


def test_a_csv_record_that_cannot_be_read_fails_alone_at_its_first_line(services, synth_dir, tmp_path):
    """A field over csv's 128 KiB limit aborted the whole job with a traceback; bytes that are not UTF-8
    were replaced, so two Latin-1 ids became one; a record over several lines was reported at its last."""
    images = tmp_path / "images"
    images.mkdir()
    a, b = _two_good(synth_dir, images)
    lines = [
        b"product_id,category,image,metadata.note",
        f'{a["product_id"]},{a["category"]},{a["image"]},"two\nlines"'.encode(),  # lines 2-3
        b"huge,Shoes," + a["image"].encode() + b"," + b"x" * (200 * 1024),  # line 4
        b"caf\xe9,Shoes," + a["image"].encode() + b",latin-1",  # line 5
        b"caf\xe8,Shoes," + b["image"].encode() + b",latin-1 too",  # line 6
        b"nocat,," + b["image"].encode() + b',"over\nthree\nlines"',  # lines 7-9
        f"{b['product_id']},{b['category']},{b['image']},ok".encode(),  # line 10
    ]
    path = tmp_path / "catalog.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    failures = _two_ingested(path, services.ranker_address, images)
    assert [(f["line"], f["product_id"], f["code"]) for f in failures] == [
        (4, "", "INVALID_ARGUMENT"),
        (5, "", "INVALID_ARGUMENT"),
        (6, "", "INVALID_ARGUMENT"),
        (7, "nocat", "INVALID_ARGUMENT"),
    ]
    reasons = [f["reason"] for f in failures]
    assert "field larger than field limit (131072)" in reasons[0]
    assert "not valid UTF-8 (byte 0xe9 at line 5, byte 4)" in reasons[1]
    assert "not valid UTF-8 (byte 0xe8 at line 6, byte 4)" in reasons[2]
    assert "category is missing or empty" in reasons[3]


def test_json_lines_are_decoded_strictly_and_bounded(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    row = '{"product_id": "%s", "category": "Shoes", "image": "a.jpg"}\n'
    jsonl.write_bytes(
        (row % "a").encode()
        + (row % "caf\xe9").encode("latin-1")  # not UTF-8
        + (row % "caf\xe8").encode("latin-1")  # another id: replaced, both became 'caf\ufffd'
        + (row % "\\ud800").encode()  # valid JSON, but no UTF-8 for it
        + b'{"product_id": "long", "metadata": {"x": "' + b"y" * 2 * MiB + b'"}}\n'
        + (row % "last").encode()
    )  # fmt: skip
    records = [(r.line, r.product_id, r.problem) for r in read_catalog(jsonl)]
    assert [(line, pid) for line, pid, _ in records] == [
        (1, "a"), (2, ""), (3, ""), (4, "\ud800"), (5, ""), (6, "last"),
    ]  # fmt: skip
    assert "not valid UTF-8 (byte 0xe9 at line 2, byte 20)" in records[1][2]
    assert "not valid UTF-8 (byte 0xe8 at line 3, byte 20)" in records[2][2]
    assert "lone surrogate" in records[3][2]
    assert f"record over {MiB} bytes (line 5)" in records[4][2]
    assert records[0][2] == records[5][2] == ""


def test_a_json_line_pythons_reader_refuses_fails_alone(services, synth_dir, tmp_path):
    """json.loads raises ValueError for a number of over 4,300 digits and RecursionError for 200,000 '[':
    only JSONDecodeError was caught, so one such record ended the whole job (exit 2, or a traceback), and
    `ctl recommend --html --catalog` read the catalog the same way."""
    images = tmp_path / "images"
    images.mkdir()
    a, b = _two_good(synth_dir, images)
    lines = [
        json.dumps(a),
        '{"product_id": "big", "category": "Shoes", "image": "x.jpg", "metadata": {"n": %s}}' % ("1" * 5000),
        "[" * 200_000,
        '{"product_id": "deep", "category": "Shoes", "image": "x.jpg", "metadata": %s}' % ("[" * 100_000),
        json.dumps(b),
    ]
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = [(r.line, r.product_id, r.problem) for r in read_catalog(path)]
    assert [(line, pid) for line, pid, _ in records] == [
        (1, a["product_id"]), (2, "big"), (3, ""), (4, "deep"), (5, b["product_id"]),
    ]  # fmt: skip
    assert records[1][2] == "JSON not read: a number has more than 4300 digits"
    assert records[2][2] == records[3][2] == "JSON not read: arrays or objects nested too deeply"
    failures = _two_ingested(path, services.ranker_address, images)
    assert [(f["line"], f["product_id"], f["code"]) for f in failures] == [
        (2, "big", "INVALID_ARGUMENT"),
        (3, "", "INVALID_ARGUMENT"),
        (4, "deep", "INVALID_ARGUMENT"),
    ]
    # a journal line damaged the same way is ignored like any unreadable line, not a crash
    journal = tmp_path / "catalog.jsonl.journal"
    with journal.open("a") as f:
        f.write("[" * 200_000 + "\n" + '{"id": %s}\n' % ("9" * 5000) + "\n")
    again = ctl(
        "ingest", str(path), "--ranker", services.ranker_address, "--images", str(images), timeout=120
    )
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stdout + again.stderr
    assert summary_number(again.stdout, "already ingested") == 2, again.stdout + again.stderr
    assert again.stderr.count("unreadable: ignored") == 2, again.stderr


def test_csv_records_are_decoded_strictly_bounded_and_placed_at_their_first_line(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbfproduct_id,category,image\r\n"  # Excel's byte order mark
        b'a"b,Shoes,a.jpg\r\n'  # a quote inside an unquoted field is a character
        b'q,"He said ""hi""",a.jpg\r\n'
        b"caf\xe9,Shoes,a.jpg\r\n"
        b"caf\xe8,Shoes,a.jpg\r\n"
        b'multi,,"one\ntwo\nthree"\r\n'  # lines 6-8, no category: reported at 6
        b"huge,Shoes," + b"x" * 200_000 + b"\r\n"  # a field over csv's 128 KiB
        b'big,"' + (b"z" * 999 + b"\n") * 1100 + b'",a.jpg\n'  # over 1 MiB: held nowhere, skipped
        b"after,Shoes,a.jpg\n"
        b'open,"never closed,a.jpg\nlost,Shoes,a.jpg\n'
    )
    records = [(r.line, r.product_id, r.category, r.problem) for r in read_catalog(csv_path)]
    assert [r[:2] for r in records] == [
        (2, 'a"b'), (3, "q"), (4, ""), (5, ""), (6, "multi"), (9, ""), (10, ""), (1111, "after"), (1112, ""),
    ]  # fmt: skip
    assert records[0][2:] == ("Shoes", "") and records[1][2:] == ('He said "hi"', "")
    assert "not valid UTF-8 (byte 0xe9 at line 4, byte 4)" in records[2][3]
    assert "not valid UTF-8 (byte 0xe8 at line 5, byte 4)" in records[3][3]
    assert "category is missing or empty" in records[4][3]
    assert "field larger than field limit (131072)" in records[5][3]
    assert f"record over {MiB} bytes (lines 10-1110)" in records[6][3]
    assert records[7][3] == "" and "not closed" in records[8][3]


def test_recommend_escapes_what_it_prints_and_shows_only_images_under_the_folder(
    services, stub, synth_dir, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    sigs = sorted(categories)[:2]
    category = "Escapes\x1b]0;title\x07|Shoes"
    evil, peek = "evil\x1b[31m", "peek\x9b2J"
    products = [
        ranker_pb2.Product(
            product_id=pid, category=category, image=(synth_dir / "images" / f"{s}.jpg").read_bytes()
        )
        for pid, s in zip([evil, peek], sigs)
    ]
    requests = (ranker_pb2.UpsertProductsRequest(product=p) for p in products)
    assert stub.UpsertProducts(requests, timeout=60).upserted == 2
    shutil.copyfile(synth_dir / "images" / f"{sigs[0]}.jpg", images / "evil.jpg")
    (images / "peek.jpg").symlink_to(tmp_path / "secret.txt")  # shown by the page, before
    shown_catalog = tmp_path / "shown.jsonl"
    shown_catalog.write_text(
        json.dumps({"product_id": evil, "category": category, "image": "evil.jpg"})
        + "\n"
        + json.dumps({"product_id": peek, "category": category, "image": "peek.jpg"})
        + "\n"
    )
    pairs = [json.loads(line) for line in (synth_dir / "fashion.json").read_text().splitlines()]
    scene = synth_dir / "images" / f"{sorted({p['scene'] for p in pairs})[0]}.jpg"
    page_path = tmp_path / "page.html"
    shown = ctl(
        "recommend", "--ranker", services.ranker_address, "--scene", str(scene), "--category", category,
        "--html", str(page_path), "--catalog", str(shown_catalog), "--images", str(images),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout + shown.stderr
    assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out
    assert "evil\\x1b[31m" in shown.stdout and "peek\\x9b2J" in shown.stdout
    assert "Escapes\\x1b]0;title\\x07|Shoes: 2 of 2 products" in shown.stdout
    page = page_path.read_text()
    assert page.count('<img class="product"') == 1 and page.count('<span class="noimage">') == 1  # evil's
    import base64

    assert base64.b64encode(SECRET.encode())[:12].decode() not in page and SECRET not in page
    assert (
        "'peek\\x9b2J': not shown: image" in shown.stderr and "is outside the images folder" in shown.stderr
    )


def test_ctl_health_escapes_a_servers_error_details(loop):
    """A sibling: `ctl health` printed a server's error details as they came."""

    async def start():
        async def check(request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down\x1b[31m\x9b2J")

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(check)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.call(start())
    try:
        checked = ctl("health", f"127.0.0.1:{port}", timeout=60)
    finally:
        loop.call(server.stop(0))
    assert checked.returncode == 1
    assert checked.stdout.strip() == f"127.0.0.1:{port}: UNAVAILABLE: down\\x1b[31m\\x9b2J", checked.stdout


def test_a_stream_write_failing_in_grpc_core_is_retried_like_unavailable():
    """Seen in test_faults' killed-ranker run: a stream written while the ranker died failed with
    INTERNAL "Internal error from Core" (grpc/grpc#36066) and stopped the job instead of retrying. The
    ranker never answered such a call; an INTERNAL that the ranker itself sent is not retried."""
    from grpc.aio import AioRpcError, Metadata

    from ctl_app.ingest.job import _transient

    def error(code: grpc.StatusCode, details: str) -> AioRpcError:
        return AioRpcError(code, Metadata(), Metadata(), details)

    assert _transient(error(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    assert _transient(error(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert not _transient(error(grpc.StatusCode.INTERNAL, "the store's vectors are corrupt"))
    assert not _transient(error(grpc.StatusCode.INVALID_ARGUMENT, "bad"))
