"""`ctl ingest` and `ctl recommend` as real processes against a real encoder and ranker (ctl.local: the
same servers, on loopback, embedded Qdrant): planted bad records, a job killed half-way and resumed,
CSV with metadata into the embedded store, and the HTML report opened in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from ctl.ingest import IngestConfig, format_summary, ingest
from ctl.ingest.catalog import read_catalog
from ctl.local import local_services
from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from tests.browser import images_loaded, open_page
from tests.servers import REPO

GOOD = 150  # products of the generated set in the catalog


def ctl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctl.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300, **kw
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


def test_killed_job_resumes_and_ends_with_exactly_the_catalog(services, stub, catalog):
    path, good, expected = catalog
    journal = path.with_name(path.name + ".journal")
    args = ["ingest", str(path), "--ranker", services.ranker_address, "--batch", "4", "--streams", "1"]
    # The 31st product's image is a named pipe: reading it blocks the job there, so it is killed half-way
    # however fast the machine is (no race between the job and the kill).
    blocking = path.parent / good[30]["image"]
    real = blocking.read_bytes()
    blocking.unlink()
    os.mkfifo(blocking)
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "ctl.cli", *args],
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
        blocking.unlink()
        blocking.write_bytes(real)
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
    done = ctl("ingest", str(path), *common, "--metadata-columns", "season")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary_number(done.stdout, "ingested now") == 20
    again = ctl("ingest", str(path), *common, "--metadata-columns", "season")
    assert again.returncode == 0 and summary_number(again.stdout, "already ingested") == 20

    import asyncio

    from ranker_service.store import open_edge_store

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
    """`n` products of the generated set (from the `first`-th), image paths absolute, as JSON lines."""
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
        first = ctl("ingest", str(path), "--ranker", services.ranker_address)
        assert first.returncode == 0, first.stdout + first.stderr
        assert summary_number(first.stdout, "ingested now") == 24
    shutil.rmtree(store)
    with (
        ranker_on(loop, exported_repo, store) as services,
        grpc.insecure_channel(services.ranker_address) as channel,
    ):
        assert stats(ranker_pb2_grpc.RankerServiceStub(channel)).total_products == 0
        again = ctl("ingest", str(path), "--ranker", services.ranker_address)
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
        args = ["--ranker", services.ranker_address]
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
    config = IngestConfig(catalog=path, batch=4, streams=1)
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

        again = ctl("ingest", str(path), "--ranker", services.ranker_address)
        assert again.returncode == 0, again.stdout + again.stderr
        assert summary_number(again.stdout, "re-sent") == 2
        assert summary_number(again.stdout, "already ingested") == 10
        with grpc.insecure_channel(services.ranker_address) as channel:
            after = stats(ranker_pb2_grpc.RankerServiceStub(channel))
        assert dict(after.products_by_category) == by_category(rows)


def test_the_journal_lists_the_catalogs_ingested_products_with_their_listings(tmp_path):
    from ctl.ingest.journal import Journal, Outcome

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
    from ctl.ingest.job import CHECK_BYTES, _chunks

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
        args = ["--ranker", services.ranker_address]
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
        args = ["--ranker", services.ranker_address]
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
