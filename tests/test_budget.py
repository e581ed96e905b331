"""Training budgets that work on data we did not make (issue 15): steps with a floor instead of a fixed
number of epochs, early stopping, the collapsed plateau detected and acted on, divergence stopped."""

import json
import shutil

import pytest
import torch
from PIL import Image

from ctl_app.cli import main
from style_model.errors import RunError
from style_model.train import PRESETS, TrainConfig, load_run, plan_budget, resolve, train
from tests.conftest import TINY


def _budget(train_examples: int, **kwargs):
    cfg = TrainConfig(preset="offline", **kwargs)
    return plan_budget(cfg, resolve(cfg), train_examples)


def test_a_small_dataset_gets_the_step_floor_not_a_handful_of_epochs():
    """1.4k training examples at batch 64 made 176 steps in 8 epochs: the model never left the collapsed
    plateau. The default budget is now the preset's epochs with a floor of min_steps."""
    small = _budget(1400)
    assert small.steps == PRESETS["offline"]["min_steps"] == 2000
    assert "minimum" in small.reason and "only 168" in small.reason
    large = _budget(16_649)
    assert large.steps == 8 * (16_649 // 64) > 2000 and "8 epochs" in large.reason
    assert small.eval_every == 200 and large.eval_every == -(-large.steps // 10)


def test_explicit_steps_and_epochs_win_over_the_floor():
    assert _budget(1400, steps=300).steps == 300
    by_epochs = _budget(1400, epochs=3)
    assert by_epochs.steps == 3 * 21 and by_epochs.eval_every == 21  # --epochs: one validation per epoch
    assert _budget(1400, steps=50, eval_every=1000).eval_every == 50


@pytest.fixture(scope="module")
def flat_dir(synth_dir, tmp_path_factory):
    """Every image the same grey: nothing to learn, every embedding equal: the collapsed plateau itself."""
    data = tmp_path_factory.mktemp("flat") / "data"
    shutil.copytree(synth_dir, data)
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    for path in (data / "images").glob("*.jpg"):
        grey.save(path)
    return data


def test_a_run_stuck_on_the_collapsed_plateau_restarts_then_says_it_is_at_chance(flat_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = TrainConfig(**{**TINY, "epochs": None, "steps": 8, "eval_every": 2, "restarts": 1, "patience": 2})
    summary = train(cfg, flat_dir, tmp_path / "run")
    assert summary["attempts"] == 2 and summary["at_chance"] is True
    messages = [r.getMessage() for r in caplog.records]
    assert any("collapsed plateau" in m for m in messages)
    assert any("restarting with another seed" in m for m in messages)
    assert any(r.levelname == "ERROR" and "do not serve it" in r.getMessage() for r in caplog.records)
    rows = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rows["at_chance"] is True and rows["status"] == "done"
    load_run(tmp_path / "run")  # the model is still saved


def test_early_stop_in_the_second_half_when_validation_stops_improving(flat_dir, tmp_path):
    """FITB cannot move on grey images: after `patience` validations without gain, past half the budget,
    the run stops early and says so."""
    cfg = TrainConfig(**{**TINY, "epochs": None, "steps": 40, "eval_every": 2, "restarts": 0, "patience": 2})
    summary = train(cfg, flat_dir, tmp_path / "run")
    assert summary["stopped"].startswith("early stop") and 20 <= summary["steps_run"] < 40


def test_a_diverging_run_stops_with_a_clear_error(synth_dir, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": None, "steps": 30, "eval_every": 30, "lr": 1e30})
    with pytest.raises(RunError, match="diverged"):
        train(cfg, synth_dir, tmp_path / "run")
    assert not (tmp_path / "run" / "best.pt").exists()  # nothing diverged was kept as the best model


def test_a_nan_model_is_never_validated_as_a_good_one(synth_dir, tmp_path):
    """A model whose distances are NaN scored FITB 1.0 and would have been saved as best."""
    from style_model.train import build_model, prepare, validate

    cfg = TrainConfig(**TINY)
    resolved = resolve(cfg)
    model = build_model(resolved)
    prep = prepare(cfg, resolved, model, synth_dir, tmp_path)
    with torch.no_grad():
        model.heads.g.net[-1].weight.fill_(float("nan"))
    with pytest.raises(RunError, match="non-finite"):
        validate(model, prep)


def test_cli_takes_the_budget_flags(synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(synth_dir), "--out", str(out), "--preset", "offline", "--input-size", "64"]
    args += ["--grid", "2", "--embed-dim", "32", "--batch-size", "16", "--max-examples", "96"]
    args += ["--steps", "6", "--patience", "5", "--restarts", "0", "--max-minutes", "30"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps_run"] == 6 and printed["stopped"] == "budget"
    info = json.loads((out / "run.json").read_text())
    assert info["budget"]["steps"] == 6 and info["args"]["max_minutes"] == 30


def test_a_restart_keeps_the_best_model_of_every_attempt(flat_dir, tmp_path):
    """After a restart, the new attempt's first validation replaced best.pt even when it was worse."""
    cfg = TrainConfig(**{**TINY, "epochs": None, "steps": 8, "eval_every": 2, "restarts": 1, "patience": 9})
    summary = train(cfg, flat_dir, tmp_path / "run")
    assert summary["attempts"] == 2
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["attempt"] == 0  # grey images: every validation scores the same, so the first one stays


def test_no_restart_once_the_time_budget_is_spent(flat_dir, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": None, "steps": 2, "max_minutes": 0, "restarts": 5})
    summary = train(cfg, flat_dir, tmp_path / "run")
    assert summary["attempts"] == 1 and summary["steps_run"] == 1
    assert summary["stopped"].startswith("time budget")


def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(synth_dir, tmp_path):
    """The last checkpoint is written before run.json says done: a kill in between left a run that could
    never be resumed (the learning-rate schedule refused the extra step)."""
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    first = train(cfg, synth_dir, out)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "training"}))  # as if killed just before
    again = train(cfg, synth_dir, out)
    assert again["status"] == "done" and again["steps_run"] == first["steps_run"]
    assert again["best_val_fitb"] == first["best_val_fitb"]


def test_resuming_on_other_data_is_refused(synth_dir, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    train(cfg, synth_dir, out)
    (out / "run.json").unlink()  # not finished: it would resume
    other = tmp_path / "other"
    shutil.copytree(synth_dir, other)
    for path in sorted((other / "images").glob("*.jpg"))[::3]:
        path.unlink()  # more images fetched (or lost) since: other examples, another budget
    with pytest.raises(RunError, match="same examples"):
        train(cfg, other, out)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"steps": -3}, "steps=-3"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"epochs": 0}, "epochs=0"),
        ({"eval_every": 0}, "eval_every=0"),
        ({"max_minutes": -1}, "max_minutes=-1"),
        ({"restarts": -1}, "restarts=-1"),
    ],
)
def test_budget_settings_that_make_no_sense_are_refused_by_name(setting, message):
    from style_model.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve(TrainConfig(preset="offline", **setting))
