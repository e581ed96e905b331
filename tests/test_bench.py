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
    assert int(cells[0].replace(",", "")) > 0 and cells[5] == "none"


def test_recommend_while_ingesting_benchmark_prints_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.recommend_while_ingesting", "--products", "2000", "--rounds", "10",
         "--work", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 rounds of 32 upserts into category-00" in done.stdout
    row = done.stdout.strip().splitlines()[-1].strip("| ").split(" | ")
    assert len(row) == 5 and all(float(cell) > 0 for cell in row)
