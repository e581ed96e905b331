"""ctl/defaults.py: one embedded store path and one variable naming it, for every command that opens it."""

import logging

from ctl import defaults
from ctl_app.cli import build_parser, restore_target
from ctl_app.ingest.cli import embedded_store_path
from ranker_service.config import RankerConfig


def test_every_command_opens_the_same_store_by_default(monkeypatch):
    for name in ("CTL_RANKER_STORE_PATH", "CTL_INGEST_STORE_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert RankerConfig().store_path == defaults.STORE_PATH == "ctl-store/{model_version}"
    assert embedded_store_path(None) == defaults.STORE_PATH
    assert restore_target(build_parser().parse_args(["restore", "a.tar.gz"])) == defaults.STORE_PATH


def test_ingest_embedded_reads_the_rankers_variable_and_its_flag_wins(monkeypatch, caplog):
    monkeypatch.delenv("CTL_INGEST_STORE_PATH", raising=False)
    monkeypatch.setenv("CTL_RANKER_STORE_PATH", "shared/{model_version}")
    with caplog.at_level(logging.WARNING):
        assert embedded_store_path(None) == "shared/{model_version}"
        assert embedded_store_path("flag/{model_version}") == "flag/{model_version}"
    assert not caplog.records


def test_the_old_ingest_variable_still_works_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("CTL_RANKER_STORE_PATH", raising=False)
    monkeypatch.setenv("CTL_INGEST_STORE_PATH", "old/{model_version}")
    with caplog.at_level(logging.WARNING):
        assert embedded_store_path(None) == "old/{model_version}"
    assert "CTL_INGEST_STORE_PATH is deprecated: set CTL_RANKER_STORE_PATH" in caplog.text
    caplog.clear()
    monkeypatch.setenv("CTL_RANKER_STORE_PATH", "new/{model_version}")
    with caplog.at_level(logging.WARNING):
        assert embedded_store_path(None) == "new/{model_version}"
    assert "CTL_INGEST_STORE_PATH is ignored" in caplog.text
