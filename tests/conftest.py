"""Shared fixtures: the real STL metadata beside the checkout, small generated datasets, an event loop
thread for servers run in the test process."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# No test depends on how fast the machine is: hypothesis's per-example deadline (200 ms by default) failed
# test_mutated_images_decode_or_raise_image_error on a loaded CI-sized machine (a GIF took 7 s to decode
# there). Property tests assert properties; how fast decoding is lives in bench/hostile.py.
settings.register_profile("ctl", deadline=None)
settings.load_profile("ctl")

os.environ.setdefault("CTL_OFFLINE", "1")  # nothing may be downloaded during tests
os.environ.setdefault("CTL_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]
STL = REPO.parent / "shared" / "data" / "stl"

# a tiny, quick training run (64 px, 2x2 regions, 32-d); restarts=0: a run this small may well sit at
# chance, which is not what the tests using it are about (test_budget.py is)
TINY = dict(
    preset="offline",
    input_size=64,
    grid=2,
    embed_dim=32,
    batch_size=16,
    max_examples=96,
    epochs=2,
    restarts=0,
)


@pytest.fixture(scope="session")
def stl_dir() -> Path:
    if not (STL / "fashion.json").exists():
        pytest.fail(f"the real STL metadata is expected at {STL} (../shared/data/stl beside the checkout)")
    return STL


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small generated dataset (120 scenes), shared by the tests that only read it."""
    from style_model.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(scenes=120, seed=3))
    return out


@pytest.fixture(scope="session")
def exported_repo(synth_dir, tmp_path_factory) -> Path:
    """A tiny trained model (64 px, 2×2 regions, 32-d), exported as the services load it."""
    from style_model.export import export
    from style_model.train import TrainConfig, train

    run = tmp_path_factory.mktemp("served-run")
    train(TrainConfig(**TINY), synth_dir, run)
    repo = tmp_path_factory.mktemp("served-repo")
    export(run, repo)
    return repo


@pytest.fixture(scope="module")
def loop() -> Iterator:
    """An asyncio loop on its own thread (tests.servers.LoopThread), one per test module, for servers
    built in the test process."""
    from tests.servers import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()
