"""Dataset reading, the CTL example builder (on the real STL metadata), and the synthetic generator."""

import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from style_model.data.examples import build_examples, largest_free_crop, split_of
from style_model.data.images import PAD_COLOUR, crop_box, draft, load_image, preprocess
from style_model.data.stl import load_dataset
from style_model.data.synth import CATEGORIES, COMPLEMENT, SynthConfig, generate
from style_model.errors import DatasetError


def test_real_stl_metadata_builds(stl_dir):
    start = time.perf_counter()
    dataset = load_dataset(stl_dir)
    examples, report = build_examples(dataset, check_images=False)
    # printed, not asserted: a test does not depend on the machine's speed
    print(f"{time.perf_counter() - start:.1f} s for 14k pairs (the upstream file has 72k)")
    assert dataset.domain == "fashion"  # home.json is absent, so fashion is the only domain
    assert len(dataset.pairs) == 14320 and len(dataset.categories) == 38111
    # every pair made an example or is listed with its reason
    assert len(examples) + len(report.skipped) == 14320
    assert set(report.skipped_by_reason) <= {"crop too small"}
    assert sum(report.examples_by_split.values()) == len(examples)
    assert report.examples_by_category.most_common(1)[0][0] == "Apparel & Accessories|Shoes"
    for e in examples[:2000]:
        assert e.negative != e.positive
        assert dataset.categories[e.negative] == e.category
        left, top, right, bottom = e.crop
        assert (right - left) * (bottom - top) >= 0.2


def test_real_stl_without_images_reports_every_missing_image(stl_dir, tmp_path):
    dataset = load_dataset(stl_dir)
    examples, report = build_examples(dataset)
    assert examples == []
    assert report.skipped_by_reason["missing image"] == 14320 - report.skipped_by_reason["crop too small"]
    assert len(report.missing_images) > 10000
    report.write(tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    assert len(written["skipped"]) == 14320


def test_negatives_never_come_from_the_scene(stl_dir):
    dataset = load_dataset(stl_dir)
    examples, _ = build_examples(dataset, check_images=False)
    in_scene = {}
    for p in dataset.pairs:
        in_scene.setdefault(p.scene, set()).add(p.product)
    assert all(e.negative not in in_scene[e.scene] for e in examples)


def test_split_is_by_scene_and_deterministic(stl_dir):
    dataset = load_dataset(stl_dir)
    a, _ = build_examples(dataset, check_images=False)
    b, _ = build_examples(dataset, check_images=False)
    assert a == b
    split_by_scene = {}
    for e in a:
        assert split_by_scene.setdefault(e.scene, e.split) == e.split
    shares = {s: sum(e.split == s for e in a) / len(a) for s in ("train", "val", "test")}
    assert 0.75 < shares["train"] < 0.85 and 0.07 < shares["test"] < 0.13
    assert split_of("abc") == split_of("abc")


@pytest.mark.parametrize(
    ("bbox", "crop"),
    [
        ((0.7, 0.1, 0.9, 0.3), (0.0, 0.0, 0.7, 1.0)),  # product on the right: keep the left
        ((0.1, 0.1, 0.3, 0.3), (0.3, 0.0, 1.0, 1.0)),
        ((0.0, 0.0, 1.0, 0.2), (0.0, 0.2, 1.0, 1.0)),  # a full-width band at the top: keep below
        ((0.2, 0.6, 0.8, 0.95), (0.0, 0.0, 1.0, 0.6)),
    ],
)
def test_largest_free_crop(bbox, crop):
    got = largest_free_crop(bbox)
    assert got == pytest.approx(crop)
    l, t, r, b = got
    bl, bt, br, bb = bbox
    assert r <= bl or l >= br or b <= bt or t >= bb  # no overlap with the product


def test_malformed_lines_are_kept_as_bad_records(tmp_path):
    (tmp_path / "home.json").write_text(
        '{"product": "p1", "scene": "s1", "bbox": [0.1, 0.1, 0.3, 0.3]}\n'
        "not json\n"
        '{"product": "p2", "scene": "s1", "bbox": [0.5, 0.5, 0.4, 0.9]}\n'
        '{"product": "p3", "scene": "s2"}\n'
    )
    (tmp_path / "home-cat.json").write_text('{"p1": "Furniture|Chairs"}')
    dataset = load_dataset(tmp_path)
    assert [p.product for p in dataset.pairs] == ["p1"]
    assert [b.line for b in dataset.bad_records] == [2, 3, 4]
    assert "left < right" in dataset.bad_records[1].reason
    _, report = build_examples(dataset, check_images=False)
    assert report.bad_records == [(b.line, b.reason) for b in dataset.bad_records]
    assert report.skipped_by_reason == {"no negative": 1}


def test_domain_choice(tmp_path):
    for domain in ("fashion", "home"):
        (tmp_path / f"{domain}.json").write_text("")
        (tmp_path / f"{domain}-cat.json").write_text("{}")
    with pytest.raises(DatasetError, match="fashion, home"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, "home").domain == "home"
    with pytest.raises(DatasetError, match="no domain 'garden'"):
        load_dataset(tmp_path, "garden")


def test_synthetic_dataset_has_the_stl_layout(synth_dir):
    dataset = load_dataset(synth_dir)
    assert dataset.domain == "fashion" and not dataset.bad_records
    assert set(dataset.categories.values()) == set(CATEGORIES)
    scenes = {p.scene for p in dataset.pairs}
    assert len(scenes) == 120
    for sig in list(scenes)[:5] + [p.product for p in dataset.pairs[:5]]:
        with Image.open(dataset.image_path(sig)) as im:
            assert im.format == "JPEG" and im.size == (192, 192)
    examples, report = build_examples(dataset)
    assert examples and not report.missing_images
    per_scene = {}
    for p in dataset.pairs:
        per_scene[p.scene] = per_scene.get(p.scene, 0) + 1
    assert min(per_scene.values()) >= 2 and max(per_scene.values()) <= 5


def test_synthetic_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, SynthConfig(scenes=4, seed=9))
    generate(b, SynthConfig(scenes=4, seed=9))
    assert (a / "fashion.json").read_text() == (b / "fashion.json").read_text()
    for f in (a / "images").iterdir():
        assert f.read_bytes() == (b / "images" / f.name).read_bytes()


def test_complement_is_an_involution_without_fixed_points():
    assert all(COMPLEMENT[COMPLEMENT[p]] == p and COMPLEMENT[p] != p for p in COMPLEMENT)


def test_missing_and_corrupt_images_are_reported(synth_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    dataset = load_dataset(data)
    victim = dataset.pairs[0].product
    (data / "images" / f"{victim}.jpg").unlink()
    examples, report = build_examples(load_dataset(data))
    assert victim in report.missing_images
    assert any(victim in why for _, why in report.skipped)
    assert all(victim not in (e.positive, e.negative) for e in examples)


def test_preprocess_letterboxes_and_crops():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    out = preprocess(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[0, 32]) == PAD_COLOUR and tuple(out[32, 32]) == (255, 0, 0)
    image.paste((0, 0, 255), (100, 0, 200, 100))
    right = preprocess(image, 32, crop=(0.5, 0.0, 1.0, 1.0))  # the right half, square: no padding
    assert tuple(right[16, 16]) == (0, 0, 255)
    gray = preprocess(Image.new("L", (10, 10), 128), 16)
    assert gray.shape == (16, 16, 3)


def test_load_image_honours_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "x.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "x.jpg", 40)
    # displayed upright the image is 20 wide and 40 tall: red on top, letterboxed left and right
    assert tuple(out[20, 0]) == PAD_COLOUR
    assert out[5, 20, 0] > 200 and out[35, 20, 1] > 200


def _photo(width: int, height: int) -> Image.Image:
    """A smooth colourful image (JPEG's DCT scaling is exact on flat colour, so use gradients)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 17.0)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("crop", "orientation"), [(None, 1), ((0.5, 0.0, 1.0, 1.0), 1), ((0.0, 0.0, 1.0, 0.25), 6)]
)
def test_large_jpegs_decode_at_a_reduced_scale_that_keeps_the_input_size(tmp_path, crop, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _photo(1600, 800).save(tmp_path / "big.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "big.jpg") as image:
        draft(image, 96, crop)
        image.load()
        assert image.size[0] <= 400 and image.size[0] * 800 == image.size[1] * 1600  # decoded at 1/4 or less
        upright = image.size[::-1] if orientation == 6 else image.size
        left, top, right, bottom = crop_box(upright, crop or (0, 0, 1, 1))
        assert min(right - left, bottom - top) >= 96  # the model's input is never upsampled
    with Image.open(tmp_path / "big.jpg") as image:
        image.load()  # full-scale decode
        full = preprocess(image, 96, crop).astype(int)
    reduced = load_image(tmp_path / "big.jpg", 96, crop).astype(int)
    assert np.abs(reduced - full).mean() < 3  # the same picture, resampled differently


def test_examples_command_plans_the_real_stl_folder(stl_dir, tmp_path, capsys):
    from ctl_app.cli import main

    needed = tmp_path / "needed.txt"
    assert (
        main(
            [
                "examples",
                "--data",
                str(stl_dir),
                "--needed",
                str(needed),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "14320 pairs" in out and "no images/ folder yet" in out
    assert "Apparel & Accessories|Shoes" in out and "crops:" in out
    signatures = needed.read_text().split()
    assert len(signatures) > 20000 and all(len(s) == 32 for s in signatures[:100])


def test_synth_command(tmp_path, capsys):
    from ctl_app.cli import main

    assert main(["synth", "--out", str(tmp_path / "d"), "--scenes", "3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["scenes"] == 3 and counts["pairs"] == len(
        (tmp_path / "d" / "fashion.json").read_text().splitlines()
    )
