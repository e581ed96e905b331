"""Training and evaluation on an image folder with holes (issue 15): a real Shop The Look folder always
misses images (dead URLs), and some that are there do not decode.

Negatives and evaluation candidates are drawn only among products with a usable image, an example whose
negative is missing draws another, and every skip and redraw is counted in the run's reports."""

import json
import random
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from style_model.data.examples import build_examples
from style_model.data.stl import load_dataset
from style_model.evaluate import evaluate, popularity
from style_model.protocol import fitb_accuracy, hit_rates, sample_candidates
from style_model.train import TrainConfig, train
from tests.conftest import TINY


@pytest.fixture(scope="module")
def holey_dir(synth_dir, tmp_path_factory):
    """The shared synthetic set with 20% of its images deleted and a few more made undecodable."""
    data = tmp_path_factory.mktemp("holey") / "data"
    shutil.copytree(synth_dir, data)
    images = sorted((data / "images").glob("*.jpg"))
    rng = random.Random(5)
    gone = rng.sample(images, len(images) // 5)
    for path in gone:
        path.unlink()
    left = sorted(set(images) - set(gone))
    broken = rng.sample(left, 5)
    for path in broken:
        path.write_bytes(b"<html>404 Not Found</html>")  # an error page saved as .jpg
    return data, {p.stem for p in gone}, {p.stem for p in broken}


def test_a_missing_negative_is_drawn_again_not_the_example_dropped(holey_dir, synth_dir):
    data, gone, _ = holey_dir
    full, _ = build_examples(load_dataset(synth_dir))
    holey, report = build_examples(load_dataset(data))
    assert report.negatives_redrawn > 0
    for e in holey:
        assert e.negative not in gone and e.scene not in gone and e.positive not in gone
    # a pair is lost only when its own scene or product is missing; with all images the draws are the same
    kept = {(e.scene, e.positive) for e in holey}
    should = {(e.scene, e.positive) for e in full if e.scene not in gone and e.positive not in gone}
    assert kept == should
    by_pair = {(e.scene, e.positive): e.negative for e in full}
    redrawn = sum(1 for e in holey if by_pair[(e.scene, e.positive)] != e.negative)
    assert redrawn == report.negatives_redrawn
    skipped = report.skipped_by_reason
    assert skipped["missing image"] == len(full) - len(holey)


def test_candidates_are_drawn_only_among_usable_products(holey_dir):
    data, gone, _ = holey_dir
    dataset = load_dataset(data)
    examples, _ = build_examples(dataset)
    lists = sample_candidates(examples, dataset, 99, 0, "hr", lambda p: p not in gone).products
    assert all(p not in gone for c in lists for p in c)
    assert all(len(set(c)) == len(c) for c in lists)


def test_training_and_evaluation_run_on_a_folder_with_holes_and_count_them(holey_dir, tmp_path):
    data, gone, broken = holey_dir
    run = tmp_path / "run"
    summary = train(TrainConfig(**{**TINY, "max_examples": None, "epochs": 1}), data, run)
    gaps = summary["data_gaps"]
    report = json.loads((run / "examples-report.json").read_text())
    assert set(report["missing_images"]) <= gone and len(report["missing_images"]) > 0
    assert set(report["unreadable_images"]) <= broken
    assert gaps["missing_images"] == len(report["missing_images"])
    assert gaps["negatives_redrawn"] == report["negatives_redrawn"] > 0
    assert gaps["skipped_by_reason"]["missing image"] > 0
    result = evaluate(run, data, split="test")
    assert result["examples"] > 0 and 0.0 <= result["fitb_accuracy"] <= 1.0
    eval_gaps = result["data_gaps"]
    assert eval_gaps["missing_images"] > 0 and eval_gaps["skipped_by_reason"]["missing image"] > 0
    # an unreadable file is found when decoding, treated as missing, and whatever drew it is drawn again
    assert eval_gaps["unreadable_images"] + gaps["unreadable_images"] > 0


def test_ranks_never_count_a_non_finite_distance_as_a_hit():
    """A NaN model scored FITB 1.0: NaN comparisons are false, so nothing ranked 'better' than the truth."""
    nan = [np.array([np.nan, np.nan, np.nan, np.nan]) for _ in range(10)]
    assert fitb_accuracy(nan) == 0.0
    assert hit_rates(nan, ks=(1, 10)) == {"hr@1": 0.0, "hr@10": 0.0}
    partly = [np.array([0.1, np.inf, 0.5, 0.7]), np.array([0.1, 0.2, np.nan, 0.7])]
    assert fitb_accuracy(partly) == 0.0


def test_popularity_baseline_and_product_disjoint_rows(tmp_path):
    """A catalogue that scenes re-use (like Shop The Look, where a third of the test positives are also
    training positives): the evaluation adds the popularity scorer and the rows of the examples whose
    true product is never a training positive."""
    from style_model.data.synth import SynthConfig, generate

    data = tmp_path / "data"
    generate(data, SynthConfig(scenes=150, seed=4, products_per_category=20))
    examples, _ = build_examples(load_dataset(data))
    seen = popularity(examples)
    assert sum(seen.values()) == sum(1 for e in examples if e.split == "train")
    test = [e for e in examples if e.split == "test"]
    disjoint = [e for e in test if e.positive not in seen]
    assert len(disjoint) < len(test), "the catalogue re-use should put training products in the test split"
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1}), data, run)
    result = evaluate(run, data, split="test", baselines=False)  # the quick check: nothing trained
    assert "colour histograms + heads" not in result["rows"] and not (run / "baselines").exists()
    assert result["examples"] == len(test)
    assert result["product_disjoint_examples"] == len(disjoint)
    assert "training popularity" in result["rows"]
    assert set(result["rows_product_disjoint"]) == set(result["rows"])
    if not disjoint:  # nothing to score: null in the JSON file, never NaN (which is not JSON)
        assert all(m["fitb_accuracy"] is None for m in result["rows_product_disjoint"].values())
    json.loads((run / "eval-test.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_build_examples_invariants_under_any_set_of_unusable_images(synth_dir, data):
    """Whatever images are unusable: every example's three images are usable, a pair is kept exactly when
    its own scene and product are, negatives stay same-category products outside the scene, and the
    report accounts for every pair."""
    dataset = load_dataset(synth_dir)
    signatures = sorted({s for p in dataset.pairs for s in (p.scene, p.product)})
    bad = set(data.draw(st.lists(st.sampled_from(signatures), max_size=len(signatures) // 2, unique=True)))
    examples, report = build_examples(dataset, unreadable=bad)
    for e in examples:
        assert not {e.scene, e.positive, e.negative} & bad
        assert dataset.categories[e.negative] == e.category
        assert e.negative not in dataset.products_in_scene[e.scene]
    kept = {(e.scene, e.positive) for e in examples}
    for p in dataset.pairs:
        if p.scene not in bad and p.product not in bad and (p.scene, p.product) not in kept:
            assert any(r == f"{p.scene}/{p.product}" for r, _ in report.skipped)  # e.g. no negative left
    assert len(examples) + len(report.skipped) == len(dataset.pairs)
    assert report.negatives_redrawn <= len(examples)


def test_images_needed_lists_every_product_a_redrawn_negative_can_be(tmp_path):
    """A product whose only pair is unusable (crop too small) can still be drawn as another pair's negative
    once the first-drawn negative is missing: fetch-images must have fetched it (it was not listed)."""
    from PIL import Image

    from style_model.data.examples import images_needed

    pairs = [{"product": f"p{i}", "scene": f"s{i}", "bbox": [0.5, 0.5, 0.6, 0.6]} for i in range(40)]
    pairs += [{"product": f"small{i}", "scene": f"t{i}", "bbox": [0, 0, 1, 0.95]} for i in range(40)]
    (tmp_path / "fashion.json").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "fashion-cat.json").write_text(json.dumps({p["product"]: "Shoes" for p in pairs}))
    (tmp_path / "images").mkdir()
    needed = images_needed(load_dataset(tmp_path))
    for sig in needed:
        if sig not in {f"p{i}" for i in range(20)}:  # half the pairs' products are missing
            Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "images" / f"{sig}.jpg")
    _, report = build_examples(load_dataset(tmp_path))
    assert report.negatives_redrawn > 0
    assert set(report.missing_images) <= set(needed)
    assert set(report.missing_images) == {f"p{i}" for i in range(20)} & set(report.missing_images)
