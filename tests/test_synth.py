"""`ctl synth` options: each changes what it says, the defaults still make the datasets they always made."""

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from style_model.data.examples import build_examples
from style_model.data.stl import load_dataset
from style_model.data.synth import (
    CATEGORIES,
    COMPLEMENT,
    PATTERNS,
    SynthConfig,
    add_arguments,
    config_from_args,
    generate,
    looks,
)
from style_model.errors import ConfigError


def _config(*flags: str) -> SynthConfig:
    """The config `ctl synth` would build from these flags."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(flags)))


def _make(tmp_path: Path, *flags: str) -> tuple[Path, list[dict], dict]:
    out = tmp_path / "d"
    generate(out, _config(*flags))
    pairs = [json.loads(line) for line in (out / "fashion.json").read_text().splitlines()]
    return out, pairs, json.loads((out / "synth-truth.json").read_text())


def test_defaults_make_the_dataset_they_made_before_the_options(tmp_path):
    # the hashes of the files SynthConfig(scenes=50, seed=0) wrote before the options existed; images are not
    # pinned (their bytes belong to Pillow's JPEG encoder), but they follow the same draws as these
    out = tmp_path / "d"
    generate(out, _config("--scenes", "50"))
    digest = {
        f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("fashion.json", "fashion-cat.json")
    }
    assert digest == {
        "fashion.json": "b2e6e16286b8100a05561d9f67dc4a8ae72a87129e7d633764f06b55e038dfd0",
        "fashion-cat.json": "11f387c870fcd29781721d1dc9a69b5eaafad054b0dfa58b37a1dc0221251ae7",
    }


def test_same_seed_same_bytes_and_the_config_is_written(tmp_path):
    flags = ("--scenes", "20", "--seed", "4", "--products-per-category", "16", "--rule", "shifted")
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, _config(*flags))
    generate(b, _config(*flags))
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    saved = json.loads((a / "synth.json").read_text())
    assert SynthConfig(**{**saved, "clutter": tuple(saved["clutter"])}) == _config(*flags)
    assert load_dataset(a).domain == "fashion"  # the sidecars are not taken for a domain


def test_items_and_clutter(tmp_path):
    _, pairs, truth = _make(tmp_path, "--scenes", "30", "--items", "2,2", "--clutter", "0,0")
    assert set(Counter(p["scene"] for p in pairs).values()) == {2}
    assert {s["clutter"] for s in truth["scenes"].values()} == {0}
    _, pairs, truth = _make(tmp_path / "x", "--scenes", "30", "--items", "1", "--clutter", "2,3")
    assert set(Counter(p["scene"] for p in pairs).values()) == {1}
    assert {s["clutter"] for s in truth["scenes"].values()} == {2, 3}


@pytest.mark.parametrize("n", [3, 8, 24])
def test_looks(tmp_path, n):
    _, _, truth = _make(tmp_path, "--scenes", "120", "--looks", str(n), "--items", "1", "--clutter", "0")
    used = {tuple(s["look"]) for s in truth["scenes"].values()}
    assert used == set(looks(n)) and len(used) == n
    assert {period for _, period in used} == ({12, 22, 32} if n == 24 else {12})


@pytest.mark.parametrize("rule", ["complement", "same", "shifted"])
def test_rule_decides_what_bottoms_wear(tmp_path, rule):
    _, pairs, truth = _make(tmp_path, "--scenes", "40", "--rule", rule)
    cat = json.loads((tmp_path / "d" / "fashion-cat.json").read_text())
    bottoms = 0
    for p in pairs:
        pattern, period = truth["scenes"][p["scene"]]["look"]
        wears = truth["products"][p["product"]]
        if CATEGORIES[cat[p["product"]]] == "top":
            expected = (pattern, period)
        else:
            bottoms += 1
            expected = {
                "complement": (COMPLEMENT[pattern], period),
                "same": (pattern, period),
                "shifted": (PATTERNS[(PATTERNS.index(pattern) + 3) % 8], {12: 22, 22: 12}[period]),
            }[rule]
        assert (wears["pattern"], wears["period"]) == expected
    assert bottoms > 20


def _share_of_colours(image: Image.Image, box, colours) -> float:
    """Share of the pixels in box (normalised) near one of the colours (JPEG moves them a little)."""
    w, h = image.size
    px = np.asarray(image.crop((box[0] * w, box[1] * h, box[2] * w, box[3] * h)), dtype=float).reshape(-1, 3)
    near = [np.abs(px - np.array(c)).max(axis=1) < 40 for c in colours]
    return float(np.mean(np.logical_or(*near)))


def test_catalogue_products_recur_and_look_the_same_everywhere(tmp_path):
    out, pairs, truth = _make(tmp_path, "--scenes", "60", "--products-per-category", "16")
    cat = json.loads((out / "fashion-cat.json").read_text())
    assert max(Counter(cat.values()).values()) <= 16 and set(cat.values()) == set(CATEGORIES)
    scenes_of = Counter(p["product"] for p in pairs)
    assert scenes_of.most_common(1)[0][1] >= 2
    assert sum(n for n in scenes_of.values() if n > 1) > len(pairs) / 3  # most showings are re-uses
    # a re-used product is drawn in its colours in every scene, as in its own image
    product = scenes_of.most_common(1)[0][0]
    colours = truth["products"][product]["colours"]
    for p in (p for p in pairs if p["product"] == product):
        scene = Image.open(out / "images" / f"{p['scene']}.jpg").convert("RGB")
        assert _share_of_colours(scene, p["bbox"], colours) > 0.5
    own = Image.open(out / "images" / f"{product}.jpg").convert("RGB")
    assert _share_of_colours(own, (0.3, 0.3, 0.7, 0.7), colours) > 0.8


def test_a_variant_reads_like_any_dataset(tmp_path):
    flags = ("--scenes", "60", "--products-per-category", "24", "--looks", "24", "--rule", "shifted")
    out, pairs, _ = _make(tmp_path, *flags, "--items", "2,4", "--clutter", "0,3", "--size", "160")
    dataset = load_dataset(out)
    assert not dataset.bad_records and len(dataset.pairs) == len(pairs)
    examples, report = build_examples(dataset)
    assert examples and not report.missing_images
    assert set(report.skipped_by_reason) <= {"crop too small"}
    with Image.open(dataset.image_path(pairs[0]["scene"])) as im:
        assert im.size == (160, 160)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--items", "0,2"], "items 0,2"),
        (["--items", "4,3"], "items 4,3"),
        (["--items", "7"], "items 7,7"),
        (["--clutter", "2,1"], "clutter 2,1"),
        (["--looks", "0"], "looks 0"),
        (["--looks", "25"], "looks 25: need 1..24"),
        (["--products-per-category", "0"], "products per category 0"),
        (["--products-per-category", "8"], r"need at least looks \(16\)"),
        (["--scenes", "0"], "scenes 0"),
        (["--domain", "synth"], "domain 'synth'"),
        (["--size", "32"], "size"),
    ],
)
def test_bad_values_are_named(flags, message):
    with pytest.raises(ConfigError, match=message):
        _config(*flags)


@pytest.mark.parametrize("flags", [["--items", "3-5"], ["--clutter", "1,2,3"], ["--rule", "opposite"]])
def test_malformed_flags_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit):
        _config(*flags)
    assert "error: argument" in capsys.readouterr().err
