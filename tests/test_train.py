"""Training end to end on a small generated dataset: presets, resume after a kill, feature cache,
evaluation table and TorchScript export (real files, real processes)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctl import encoder_contract as contract
from style_model.errors import ConfigError, RunError
from style_model.train import TrainConfig, load_run, resolve, train
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny_run(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**TINY), synth_dir, out)
    return out


def test_run_folder_has_everything(tiny_run):
    info = json.loads((tiny_run / "run.json").read_text())
    steps_per_epoch = info["budget"]["steps_per_epoch"]
    assert info["status"] == "done" and info["steps_run"] == 2 * steps_per_epoch == info["budget"]["steps"]
    assert info["resolved"]["preset"] == "offline" and info["resolved"]["train_backbone"] is True
    rows = list(csv.DictReader((tiny_run / "metrics.csv").read_text().splitlines()))
    # --epochs: one validation per epoch
    assert [int(r["step"]) for r in rows] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(0.0 <= float(r["val_fitb"]) <= 1.0 for r in rows)
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tiny_run / "examples-report.json").read_text())["pairs"] > 0
    checkpoint = torch.load(tiny_run / "checkpoint.pt", weights_only=False)
    assert set(checkpoint) >= {"model", "optimizer", "lr_scheduler", "step", "args", "history", "rng"}
    model, _ = load_run(tiny_run)
    assert model.config.input_size == 64 and model.config.grid == 2


def test_auto_preset_falls_back_to_offline_and_says_why(monkeypatch):
    monkeypatch.setenv("CTL_OFFLINE", "1")
    resolved = resolve(TrainConfig())
    assert resolved.preset == "offline"
    assert resolved.model.backbone == "small" and resolved.train_backbone
    assert "no ImageNet weights" in resolved.reason


def test_auto_preset_takes_paper_with_a_weights_file(tmp_path):
    from style_model.backbones import resnet50

    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet50().state_dict(), path)
    resolved = resolve(TrainConfig(weights=str(path)))
    assert resolved.preset == "paper"
    assert resolved.model.backbone == "resnet50" and resolved.model.input_size == 224
    assert not resolved.train_backbone and resolved.weights_file == str(path)


def test_paper_preset_without_weights_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CTL_OFFLINE", "1")
    with pytest.raises(ConfigError, match="resnet50 needs ImageNet weights"):
        resolve(TrainConfig(preset="paper"))
    with pytest.raises(ConfigError, match="'small' has no ImageNet checkpoint"):
        resolve(TrainConfig(preset="offline", weights="imagenet"))
    with pytest.raises(ConfigError, match="preset='best'"):
        resolve(TrainConfig(preset="best"))


def test_frozen_backbone_caches_features(synth_dir, tmp_path, caplog):
    """Frozen ResNet-18 with torchvision-layout weights: features computed once, then read from the cache."""
    from style_model.backbones import resnet18

    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    cache = tmp_path / "cache"
    cfg = TrainConfig(
        **{
            **TINY,
            "preset": "paper",
            "backbone": "resnet18",
            "weights": str(weights),
            "epochs": 1,
            "cache_dir": str(cache),
        }
    )
    caplog.set_level("INFO")
    train(cfg, synth_dir, tmp_path / "a")
    assert len(list(cache.glob("features-*.npz"))) == 1
    first = [r.message for r in caplog.records if r.message.startswith("features:")]
    assert first and " 0 cached" in first[0]
    caplog.clear()
    train(cfg, synth_dir, tmp_path / "b")
    second = [r.message for r in caplog.records if r.message.startswith("features:")]
    assert ", 0 to compute" in second[0]
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["resolved"]["preset"] == "paper" and info["resolved"]["train_backbone"] is False


def test_resume_after_kill(synth_dir, tmp_path):
    """A real `ctl train` process is killed after its first epoch; the second run resumes there."""
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "ctl_app.cli",
        "train",
        "--data",
        str(synth_dir),
        "--out",
        str(out),
        "--preset",
        "offline",
        "--input-size",
        "64",
        "--grid",
        "2",
        "--embed-dim",
        "32",
        "--batch-size",
        "16",
        "--max-examples",
        "96",
        "--epochs",
        "4",
        "--restarts",
        "0",
    ]
    env = {**os.environ, "CTL_OFFLINE": "1", "CTL_PROGRESS": "0"}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.csv").exists():
            break
        time.sleep(0.01)  # killed within ~10 ms of the first epoch's row: three more epochs take far longer
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert 1 <= len(before) < 4, "the kill should land mid-run"
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming {out} at step {before[-1]['step']}" in result.stderr
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    steps_per_epoch = int(rows[0]["step"])
    assert [int(r["step"]) for r in rows] == [steps_per_epoch * k for k in (1, 2, 3, 4)]
    assert rows[: len(before)] == before  # resumed, not restarted
    assert json.loads((out / "run.json").read_text())["steps_run"] == 4 * steps_per_epoch


def test_resume_refuses_other_settings(tiny_run, synth_dir):
    with pytest.raises(RunError, match="other settings \\(lr\\)"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), synth_dir, tiny_run)


def test_evaluate_writes_the_table(tiny_run, synth_dir):
    from style_model.evaluate import evaluate, format_table

    result = evaluate(tiny_run, synth_dir, split="test", seed_variant=True)
    written = json.loads((tiny_run / "eval-test.json").read_text())
    assert written["fitb_accuracy"] == result["fitb_accuracy"]
    for key in ("fitb_accuracy", "hr@1", "hr@5", "hr@10"):
        assert 0.0 <= written[key] <= 1.0
    assert written["hr@1"] <= written["hr@5"] <= written["hr@10"]
    labels = set(written["rows"])
    assert {
        "random",
        "model: global distance only",
        "model: local distance only",
        "raw backbone features (cosine)",
        "colour histograms + heads",
        "seed attention (softmax of +distance)",
    } <= labels
    assert (tiny_run / "baselines" / "colorhist" / "best.pt").exists()
    seed_info = json.loads((tiny_run / "baselines" / "seed-attention" / "run.json").read_text())
    assert seed_info["resolved"]["model"]["attention"] == "seed"
    assert "FITB" in format_table(result)


def test_export_matches_eager_model(tiny_run, tmp_path):
    from style_model.data.images import preprocess
    from style_model.export import export, load_encoder
    from style_model.model import to_unit

    info = export(tiny_run, tmp_path / "repo")
    model, _ = load_run(tiny_run)
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    scene, meta = load_encoder(contract.model_file(tmp_path / "repo", contract.SCENE_ENCODER))
    product, meta_p = load_encoder(contract.model_file(tmp_path / "repo", contract.PRODUCT_ENCODER))
    assert meta["model_version"] == meta_p["model_version"] == info["model_version"]
    assert meta["config"]["input_size"] == 64
    with torch.inference_mode():
        eager_scene = model.encode_scene(to_unit(images))
        eager_product = model.encode_product(to_unit(images))
        for got, want in zip(scene(images), eager_scene):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for got, want in zip(product(images[:1]), eager_product):  # batch size other than the trace's
            torch.testing.assert_close(got, want[:1], atol=1e-5, rtol=0)
    assert preprocess  # the service decodes with this same function before calling the encoders
    config = contract.config_file(tmp_path / "repo", contract.SCENE_ENCODER).read_text()
    assert 'platform: "pytorch_libtorch"' in config and "KIND_GPU" in config and "dynamic_batching" in config
    assert "dims: [ 4, 32 ]" in config and "TYPE_UINT8" in config and info["model_version"] in config
    again = export(tiny_run, tmp_path / "repo2")
    assert again["model_version"] == info["model_version"]  # a content hash: same weights, same version


def test_unreadable_images_are_reported_not_fatal(synth_dir, tmp_path):
    import shutil

    from style_model.data.stl import load_dataset

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    from style_model.data.examples import split_of

    victim = next(p.scene for p in load_dataset(data).pairs if split_of(p.scene) == "train")
    (data / "images" / f"{victim}.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1, "max_examples": None}), data, out)
    report = json.loads((out / "examples-report.json").read_text())
    assert victim in report["unreadable_images"]
    reasons = {s["reason"] for s in report["skipped"] if s["record"].startswith(victim)}
    assert reasons == {f"unreadable image: {victim}"}


def test_finished_run_is_reused(tiny_run, synth_dir, caplog):
    caplog.set_level("INFO")
    before = (tiny_run / "best.pt").stat().st_mtime_ns
    summary = train(TrainConfig(**TINY), synth_dir, tiny_run)
    assert summary["status"] == "done"
    assert (tiny_run / "best.pt").stat().st_mtime_ns == before
    assert any("already trained" in r.message for r in caplog.records)


def test_demo_runs_the_whole_chain(tmp_path, capsys):
    from ctl_app.cli import main
    from tests.browser import images_loaded, open_page

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--scenes", "40", "--epochs", "1", "--max-examples", "48"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "preset: offline" in printed and "colour histograms + heads" in printed
    info = json.loads((out / "triton_repo" / contract.MODEL_INFO_FILE).read_text())
    assert info["preset"] == "offline" and info["config"]["backbone"] == "small"
    assert contract.model_file(out / "triton_repo", contract.SCENE_ENCODER).exists()
    assert json.loads((out / "run" / "eval-test.json").read_text())["examples"] > 0
    # served, ingested through ctl ingest's job, recommended for held-out scenes, reported
    catalog = [json.loads(line) for line in (out / "catalog.jsonl").read_text().splitlines()]
    assert re.search(rf"ingested now\s+{len(catalog)}\n", printed)
    assert f"report: {(out / 'report.html').resolve()}" in printed
    with open_page(out / "report.html") as page:
        sections = page.locator("section.scene-section").all()
        assert 1 <= len(sections) <= 4
        categories = sorted({r["category"] for r in catalog})
        for s in sections:
            shown = s.locator("h3.category").all_inner_texts()
            assert sorted(shown) == categories  # the whole look: every category, the hidden one first
            assert "hidden" in s.locator("li").all_inner_texts()[0]
            assert s.locator("tr.rec").count() == 5 * len(categories)
        assert all(images_loaded(page, "img.product")) and all(images_loaded(page, "img.scene"))
        ids = page.eval_on_selector_all("tr.rec", "rs => rs.map(r => r.dataset.productId)")
        assert set(ids) <= {r["product_id"] for r in catalog}
    # a second demo reuses the dataset, the trained run and the ingested catalog
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "model version" in again
    assert re.search(rf"already ingested\s+{len(catalog)}\s", again) and re.search(
        r"ingested now\s+0\n", again
    )


def test_training_on_stl_metadata_without_images_says_what_is_missing(stl_dir, tmp_path):
    with pytest.raises(RunError, match="missing image") as info:
        train(TrainConfig(**TINY), stl_dir, tmp_path / "run")
    assert "examples-report.json" in str(info.value)
    report = json.loads((tmp_path / "run" / "examples-report.json").read_text())
    assert len(report["missing_images"]) > 10000


def test_export_refuses_a_model_trained_with_the_seed_attention(synth_dir, tmp_path):
    """Issue 14 #3: the ranker ranks with the paper's attention (softmax of −distance); a model trained with
    `--attention seed` was exported anyway and served with the other attention. Export says so instead,
    and writes nothing."""
    from style_model.export import export

    run = tmp_path / "seed-run"
    train(TrainConfig(**{**TINY, "epochs": 1, "max_examples": 32, "attention": "seed"}), synth_dir, run)
    with pytest.raises(RunError, match=r"attention='seed'.*--attention paper"):
        export(run, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_ctl_train_flags_default_to_train_config_and_reach_it():
    """`ctl train`'s flags take TrainConfig's defaults (written once, in style_model.config) and each one
    given reaches its field."""
    from ctl_app.cli import _train_config, build_parser

    base = ["train", "--data", "d", "--out", "o"]
    assert _train_config(build_parser().parse_args(base)) == TrainConfig()
    given = [
        *("--preset", "offline", "--backbone", "resnet18", "--weights", "none", "--input-size", "64"),
        *("--no-train-backbone", "--steps", "7", "--epochs", "2", "--max-minutes", "1.5", "--patience", "0"),
        *("--restarts", "0", "--eval-every", "3", "--batch-size", "8", "--lr", "0.01", "--attention", "seed"),
        *("--grid", "2", "--embed-dim", "16", "--no-augment", "--min-crop", "0.3", "--seed", "5"),
        *("--domain", "home", "--max-examples", "9", "--cache-dir", "c"),
    ]
    assert _train_config(build_parser().parse_args([*base, *given])) == TrainConfig(
        preset="offline", backbone="resnet18", weights="none", input_size=64, train_backbone=False, steps=7,
        epochs=2, max_minutes=1.5, patience=0, restarts=0, eval_every=3, batch_size=8, lr=0.01,
        attention="seed", grid=2, embed_dim=16, augment=False, min_crop=0.3, seed=5, domain="home",
        max_examples=9, cache_dir="c",
    )  # fmt: skip


def test_ctl_train_reads_its_variables_when_it_runs_and_flags_win(monkeypatch):
    """CTL_TRAIN_* variables are read by `ctl train` when it runs (a malformed one never breaks parsing, so
    never another command); a flag wins over its variable."""
    from ctl_app.cli import _train_config, build_parser

    base = ["train", "--data", "d", "--out", "o"]
    monkeypatch.setenv("CTL_TRAIN_STEPS", "many")
    args = build_parser().parse_args([*base, "--steps", "4"])
    monkeypatch.setenv("CTL_TRAIN_STEPS", "9")
    monkeypatch.setenv("CTL_TRAIN_LR", "0.05")
    monkeypatch.setenv("CTL_TRAIN_AUGMENT", "false")
    monkeypatch.setenv("CTL_TRAIN_TRAIN_BACKBONE", "yes")
    config = _train_config(args)
    assert (config.steps, config.lr, config.augment, config.train_backbone) == (4, 0.05, False, True)
    assert _train_config(build_parser().parse_args([*base, "--augment"])).augment is True


def test_a_preset_fills_only_the_settings_not_given(monkeypatch):
    from ctl_app.cli import _train_config, build_parser
    from style_model.config import PRESETS

    monkeypatch.setenv("CTL_OFFLINE", "1")
    base = ["train", "--data", "d", "--out", "o", "--preset", "offline"]
    offline = PRESETS["offline"]
    resolved = resolve(_train_config(build_parser().parse_args(base), {}))
    assert (resolved.batch_size, resolved.lr, resolved.train_backbone) == (
        offline["batch_size"], offline["lr"], offline["train_backbone"],
    )  # fmt: skip
    given = build_parser().parse_args([*base, "--batch-size", "8", "--no-train-backbone"])
    resolved = resolve(_train_config(given, {"CTL_TRAIN_LR": "0.01"}))
    assert (resolved.batch_size, resolved.lr, resolved.train_backbone) == (8, 0.01, False)
    assert resolved.model.input_size == offline["input_size"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"CTL_TRAIN_STEPS": "0"}, "CTL_TRAIN_STEPS='0': expected 1 or more"),
        ([], {"CTL_TRAIN_STEPS": "1_0"}, "CTL_TRAIN_STEPS='1_0': expected int"),
        ([], {"CTL_TRAIN_LR": "nan"}, "CTL_TRAIN_LR='nan': expected a number above 0"),
        ([], {"CTL_TRAIN_PRESET": "best"}, "CTL_TRAIN_PRESET='best': expected one of auto, paper, offline"),
        ([], {"CTL_TRAIN_AUGMENT": "maybe"}, "CTL_TRAIN_AUGMENT='maybe': expected true or false"),
        (["--lr", "0"], {}, "--lr=0.0: expected a number above 0"),
        (["--min-crop", "1.5"], {}, "--min-crop=1.5: expected 0..1"),
        (["--patience", "-1"], {"CTL_TRAIN_PATIENCE": "2"}, "--patience=-1: expected 0 or more"),
        # the architecture's ranges (ModelConfig's), named by flag or variable before anything is made
        ([], {"CTL_TRAIN_GRID": "0"}, "CTL_TRAIN_GRID='0': expected 1..16"),
        (["--embed-dim", "1"], {}, "--embed-dim=1: expected 2..4096"),
        (["--input-size", "100"], {}, "--input-size=100: expected a multiple of 16 in [32, 1024]"),
        (
            ["--input-size", "32"],
            {},
            "grid=4 needs a stage-4 map of at least 4x4: input_size=32 gives 2x2 (--grid / --input-size)",
        ),
    ],
)
def test_ctl_train_refuses_a_bad_setting_with_exit_2_naming_it(
    monkeypatch, caplog, tmp_path, argv, env, message
):
    from ctl_app.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *argv]) == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == message
    assert not (tmp_path / "run").exists()  # refused before any work
