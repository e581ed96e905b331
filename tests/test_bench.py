"""The benchmarks keep running (tiny sizes): they print their tables. Timing is never asserted."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import REPO


def test_recommend_benchmark_prints_every_strategy(exported_repo, synth_dir, tmp_path):
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.recommend", "--sizes", "1000", "--queries", "5", "--requests", "20",
            "--concurrency", "1,4", "--model-repo", str(exported_repo), "--seed-images",
            str(synth_dir / "images"), "--work", str(tmp_path), "--hnsw",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for row in (
        "(b) brute force",
        "(a) pooled query, pool 200",
        "(a) pooled query via HNSW, pool 200",
        "(a') certify",
        "(c) global vector, rerank",
        "(c) global vector via HNSW",
        "(d) seed",
    ):
        assert f"| {row}" in out, row
    assert "qdrant-client adapter, local mode" in out and "Ranker memory:" in out
    # certify and brute force agree exactly; the recall column is a number in [0, 1]
    certify = next(line for line in out.splitlines() if line.startswith("| (a') certify"))
    assert certify.split("|")[2].strip() == "1.000"


def test_load_benchmark_runs_clients_for_a_bounded_time_without_errors(exported_repo, tmp_path):
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.load", "--products", "2000", "--clients", "8", "--seconds", "4",
            "--model-repo", str(exported_repo), "--work", str(tmp_path),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # 1: some call failed
    row = next(line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit())
    cells = [c.strip() for c in row.strip("|").split("|")]
    # how many calls fit in 4 s depends on the machine: only that the count is a count, and no errors
    assert int(cells[0].replace(",", "")) >= 0 and cells[5] == "none"


def test_recommend_while_ingesting_benchmark_prints_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.recommend_while_ingesting", "--products", "2000", "--rounds", "10",
         "--work", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 rounds of 32 upserts into category-00" in done.stdout
    row = done.stdout.strip().splitlines()[-1].strip("| ").split(" | ")
    # numbers, in order; never "more than 0": a fast machine may print a time that rounds to 0
    p50, p95, p99, most, wall = (float(cell) for cell in row)
    assert 0 <= p50 <= p95 <= p99 <= most and wall >= 0


def _cells(out: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    line = next(line for line in out.splitlines() if line.startswith(f"| {first} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_soak_benchmark_recovers_and_leaves_nothing_behind(exported_repo, tmp_path):
    """A short soak (short deadlines, cancelled and dropped clients, a burst 8x over the encoder's queue):
    every ordinary call after the burst succeeds, the queue gauges are back to 0 and the servers' asyncio
    tasks back near where they started. Outcomes only: how many calls fit in the time is never asserted."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "6", "--products", "500", "--clients", "8",
         "--max-queue", "16", "--max-batch", "8", "--burst", "8", "--model-repo", str(exported_repo),
         "--work", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]  # 1: the soak's own verdict failed
    assert "Result: PASS" in out
    calls, ok = _cells(out, "recovery")[2:4]
    assert int(calls.replace(",", "")) >= 20 and calls == ok  # --min-recovery-calls, all OK
    assert _cells(out, "recovery")[6] == "none"
    burst = next(line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit())
    assert burst.strip("|").split("|")[4].strip() == "0"  # recovery failures
    assert _cells(out, "encoder")[4] == "product 0, scene 0"  # queue images at the end
    for server in ("encoder", "ranker"):
        start, end = (int(n) for n in _cells(out, server)[3].split(" / "))
        assert end <= start + 10, f"the {server}: {start} asyncio tasks at the start, {end} at the end"


def test_hostile_benchmark_answers_or_refuses_every_request(exported_repo, tmp_path):
    """Issue 20's hostile requests, small: each gets the status it should (a refusal, or an answer with the
    oversized records failed alone) within its deadline; the bench's own verdict. Health and memory are
    printed, not asserted (they depend on the machine)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.hostile", "--products", "2000", "--identical", "500", "--big-images",
         "2", "--keys", "100000", "--new-categories", "10100", "--exclusions", "20000", "--streams", "4",
         "--model-repo", str(exported_repo), "--work", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "Result: PASS" in out
    assert _cells(out, "Recommend, 1,000 filter conditions")[1] == "INVALID_ARGUMENT"
    assert _cells(out, "Recommend, 16 filters of 1,000 values of 4 KB (61 MiB)")[1] == "INVALID_ARGUMENT"
    assert _cells(out, "UpsertProducts, 4 streams of 10 images of 2 MB at once")[2].startswith("4 answered")
    assert _cells(out, "UpsertProducts, 2 images of 60 MB")[2] == "0 stored, 2 failed (INVALID_ARGUMENT)"
    new = _cells(out, "UpsertProducts, 10,100 new categories")[2]
    assert new.endswith("failed (RESOURCE_EXHAUSTED)") and not new.startswith("10,100 stored")
    assert _cells(out, "GetCatalogStats after that")[2] == "10,000 categories"
