"""`ctl ingest` and `ctl recommend` as real processes against a real encoder and ranker (ctl.local: the
same servers, on loopback, embedded Qdrant): planted bad records, a job killed half-way and resumed,
CSV with metadata into the embedded store, and the HTML report opened in headless Chromium."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

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
    first = subprocess.Popen(
        [sys.executable, "-m", "ctl.cli", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not (journal.exists() and journaled(journal) >= 12):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    first.send_signal(signal.SIGKILL)
    first.wait()
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
    assert took < 30, took


def test_a_missing_catalog_is_a_usage_error(tmp_path):
    result = ctl("ingest", str(tmp_path / "nope.jsonl"), "--ranker", "127.0.0.1:1")
    assert result.returncode == 2
    assert "nope.jsonl: no such catalog file" in result.stderr
