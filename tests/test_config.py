"""Settings of the services and of `ctl`'s commands: typed, checked, and read only by the command that uses
them. A malformed variable of one command never breaks another; a bad setting stops its command with exit
status 2 and one line naming the flag or the variable (issue 14, item 10)."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ctl_app.cli import build_parser
from ctl_app.cli import main as ctl_main
from ranker_service import config as ranker_config
from ranker_service import errors as ranker_errors

REPO = Path(__file__).resolve().parents[1]

# The ranker's settings as deploy/ manifests, docs and scripts know them: names and defaults must not change.
RANKER_DEFAULTS = {
    "host": "0.0.0.0",
    "port": 50052,
    "metrics_port": 9465,
    "encoder": "localhost:50051",
    "encoder_timeout_s": 10.0,
    "encoder_products_timeout_s": 300.0,
    "store_path": "ctl-store/{model_version}",
    "qdrant_url": "",
    "collection": "ctl_products_{model_version}",
    "qdrant_api_key": "",
    "qdrant_tls_ca": "",
    "qdrant_timeout_s": 10.0,
    "qdrant_shards": 0,
    "qdrant_replication_factor": 0,
    "max_message_bytes": 64 * 1024 * 1024,
    "max_limit": 1000,
    "max_categories": 32,
    "max_pool": 10_000,
    "max_filters": 16,
    "max_filter_values": 1000,
    "max_filter_bytes": 65_536,
    "max_exclude": 10_000,
    "max_catalog_categories": 10_000,
    "max_metadata_keys": 64,
    "max_metadata_value_bytes": 4096,
    "max_metadata_bytes": 16_384,
    "max_certify_width": 4096,
    "max_stream_records": 100_000,
    "max_concurrent_calls": 64,
    "exact_below": 200_000,
    "upsert_batch": 32,
    "upsert_batch_bytes": 16 * 1024 * 1024,
    "upsert_bytes_in_flight": 32 * 1024 * 1024,
    "max_upsert_streams": 8,
    "upsert_concurrency": 2,
    "probe_interval_s": 5.0,
    "startup_timeout_s": 120.0,
    "grace_s": 10.0,
    "tls_cert": "",
    "tls_key": "",
    "tls_client_ca": "",
    "read_tokens": "",
    "write_tokens": "",
    "protect_health": False,
    "health_port": -1,
    "encoder_token": "",
    "encoder_tls_ca": "",
    "encoder_tls_cert": "",
    "encoder_tls_key": "",
}

# Values that no setting may take: the service would hang (upsert_concurrency 0: a semaphore nobody can
# pass), flap (probe_interval_s 0: health checks with no time to answer), bind nothing, or wait forever.
BAD_VALUES = [
    ("port", -1),
    ("port", 65536),
    ("metrics_port", -2),
    ("metrics_port", 70000),
    ("health_port", -2),
    ("health_port", 65536),
    ("encoder_timeout_s", 0.0),
    ("encoder_timeout_s", -1.0),
    ("encoder_timeout_s", math.nan),
    ("encoder_timeout_s", math.inf),
    ("encoder_products_timeout_s", 0.0),
    ("qdrant_timeout_s", 0.0),
    ("probe_interval_s", 0.0),
    ("probe_interval_s", 0.01),
    ("startup_timeout_s", -1.0),
    ("startup_timeout_s", math.inf),
    ("grace_s", -1.0),
    ("qdrant_shards", -1),
    ("qdrant_replication_factor", -1),
    ("max_message_bytes", 0),
    ("max_limit", 0),
    ("max_categories", 0),
    ("max_pool", 0),
    ("max_stream_records", 0),
    ("max_concurrent_calls", -1),
    ("exact_below", -1),
    ("upsert_batch", 0),
    ("upsert_concurrency", 0),
    ("host", ""),
    ("encoder", ""),
    ("store_path", ""),
    ("collection", ""),
]

# Edge values that mean something (documented in the help): they stay accepted.
MEANINGFUL_EDGES = {
    "port": 0,
    "metrics_port": -1,
    "health_port": 0,
    "startup_timeout_s": 0.0,
    "grace_s": 0.0,
    "max_concurrent_calls": 0,
    "exact_below": 0,
    "qdrant_shards": 0,
    "qdrant_replication_factor": 0,
    "probe_interval_s": 0.5,  # what the tests use
}


def _ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTL_")}
    return subprocess.run(
        [sys.executable, "-m", "ctl_app.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "CTL_OFFLINE": "1", **(env or {})},
        check=False,
    )


def _ranker_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["serve-ranker", *argv])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _var(name: str) -> str:
    return "CTL_RANKER_" + name.upper()


@pytest.fixture(autouse=True)
def _no_ctl_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("CTL_RANKER", "CTL_ENCODER_", "CTL_INGEST_", "CTL_LOG_LEVEL")):
            monkeypatch.delenv(name)


# ---------------------------------------------------------------- one command's settings, not the others'


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CTL_RANKER_PORT", "abc"),
        ("CTL_RANKER_GRACE_S", "soon"),
        ("CTL_RANKER_PROTECT_HEALTH", "maybe"),
        ("CTL_INGEST_BATCH", "abc"),
        ("CTL_INGEST_STREAMS", "4.5"),
        ("CTL_INGEST_RETRIES", "many"),
        ("CTL_ENCODER_PORT", "abc"),
    ],
)
def test_a_malformed_variable_of_one_command_does_not_break_the_others(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    parser = build_parser()
    assert parser.parse_args(["synth", "--out", "x"]).scenes == 6000
    assert parser.parse_args(["health", "localhost:1"]).address == "localhost:1"
    assert "serve-ranker" in parser.format_help()


def test_ctl_subcommands_run_with_a_malformed_ranker_variable(tmp_path):
    env = {"CTL_RANKER_PORT": "abc", "CTL_INGEST_BATCH": "abc"}
    usage = _ctl("synth", "--help", env=env)
    assert usage.returncode == 0 and "Traceback" not in usage.stderr, usage.stderr
    missing = _ctl("snapshot", str(tmp_path / "no-store"), str(tmp_path / "x.tar.gz"), env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr


# ---------------------------------------------------------------- serve-ranker: exit 2, one line, named

# Start-up settings that make the old code fail fast instead of serving (it took the bad values as fine).
_QUICK = {"port": "0", "metrics_port": "-1", "startup_timeout_s": "1", "encoder": "127.0.0.1:9"}


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {"CTL_RANKER_PORT": "abc"}, "CTL_RANKER_PORT='abc'"),
        ([], {"CTL_RANKER_PORT": "70000"}, "CTL_RANKER_PORT='70000'"),
        ([], {"CTL_RANKER_PROTECT_HEALTH": "maybe"}, "CTL_RANKER_PROTECT_HEALTH='maybe'"),
        ([], {"CTL_RANKER_UPSERT_CONCURRENCY": "0"}, "CTL_RANKER_UPSERT_CONCURRENCY='0'"),
        (["--upsert-concurrency", "0"], {}, "--upsert-concurrency=0"),
        (["--probe-interval-s", "0"], {}, "--probe-interval-s=0"),
        (["--upsert-batch", "0"], {}, "--upsert-batch=0"),
    ],
)
def test_serve_ranker_refuses_a_bad_setting_with_one_line_naming_it(tmp_path, argv, env, named):
    quick = [
        part
        for name, value in _QUICK.items()
        if _flag(name) not in argv and _var(name) not in env  # the case's own setting is not overridden
        for part in (_flag(name), value)
    ]
    done = _ctl("serve-ranker", *quick, "--store-path", str(tmp_path / "s"), *argv, env=env)
    output = (done.stderr + done.stdout).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1 and named in output, output
    assert not (tmp_path / "s").exists()  # refused before anything started


def test_ranker_cli_main_returns_2_for_a_bad_setting(monkeypatch, caplog):
    from ranker_service.cli import main

    monkeypatch.setenv("CTL_RANKER_PROBE_INTERVAL_S", "0")
    assert main(_ranker_args([])) == 2
    (record,) = caplog.records
    assert "CTL_RANKER_PROBE_INTERVAL_S='0'" in record.getMessage()


# ---------------------------------------------------------------- RankerConfig: typed and checked


def test_names_and_defaults_are_unchanged():
    config = ranker_config.RankerConfig()
    assert {name: getattr(config, name) for name in RANKER_DEFAULTS} == RANKER_DEFAULTS
    assert set(RANKER_DEFAULTS) == {f.name for f in __import__("dataclasses").fields(config)}
    assert ranker_config.from_args(_ranker_args([]), {}) == config
    text = build_parser()._subparsers._group_actions[0].choices["serve-ranker"].format_help()
    for name in RANKER_DEFAULTS:
        assert _flag(name) in text and _var(name) in text, name


def test_flag_beats_environment_beats_default():
    args = _ranker_args(["--port", "7000", "--upsert-batch", "8", "--protect-health", "yes"])
    env = {"CTL_RANKER_PORT": "7001", "CTL_RANKER_MAX_POOL": "500", "CTL_RANKER_GRACE_S": "2.5"}
    config = ranker_config.from_args(args, env)
    assert (config.port, config.upsert_batch, config.protect_health) == (7000, 8, True)
    assert (config.max_pool, config.grace_s) == (500, 2.5)
    assert (config.metrics_port, config.upsert_concurrency) == (9465, 2)


def test_the_environment_is_read_when_the_command_runs_not_when_the_parser_is_built(monkeypatch):
    args = _ranker_args([])  # built and parsed with no CTL_RANKER_* set
    monkeypatch.setenv("CTL_RANKER_PORT", "7002")
    assert ranker_config.from_args(args).port == 7002  # os.environ by default


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("YES", True), ("on", True), ("1", True), ("false", False), ("no", False), ("", False)],
)
def test_booleans_read_like_words(text, expected):
    assert ranker_config.from_args(_ranker_args([]), {"CTL_RANKER_PROTECT_HEALTH": text}).protect_health is (
        expected
    )


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("port", "abc", "CTL_RANKER_PORT='abc': expected int"),
        ("port", "5.5", "CTL_RANKER_PORT='5.5': expected int"),
        ("grace_s", "soon", "CTL_RANKER_GRACE_S='soon': expected float"),
        ("protect_health", "maybe", "CTL_RANKER_PROTECT_HEALTH='maybe': expected true or false"),
    ],
)
def test_a_malformed_variable_is_named(name, text, expected):
    with pytest.raises(ranker_errors.ConfigError) as caught:
        ranker_config.from_args(_ranker_args([]), {_var(name): text})
    assert str(caught.value) == expected


def test_config_error_is_a_ranker_error_and_a_value_error():
    assert issubclass(ranker_errors.ConfigError, ranker_errors.RankerError)
    assert issubclass(ranker_errors.ConfigError, ValueError)


@pytest.mark.parametrize(("name", "bad"), BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_a_value_that_makes_no_sense_is_refused_wherever_it_comes_from(name, bad):
    with pytest.raises(ranker_errors.ConfigError, match=f"^{name}="):
        ranker_config.RankerConfig(**{name: bad})
    with pytest.raises(ranker_errors.ConfigError, match=f"^{_var(name)}="):
        ranker_config.from_args(_ranker_args([]), {_var(name): str(bad)})
    flagged = _ranker_args([f"{_flag(name)}={bad}"])  # `--port=-1`: a negative value, `--host=`: empty
    with pytest.raises(ranker_errors.ConfigError, match=f"^{_flag(name)}="):
        ranker_config.from_args(flagged, {})


@pytest.mark.parametrize(("name", "value"), sorted(MEANINGFUL_EDGES.items()))
def test_edge_values_that_mean_something_are_accepted(name, value):
    assert getattr(ranker_config.RankerConfig(**{name: value}), name) == value
    assert getattr(ranker_config.from_args(_ranker_args([]), {_var(name): str(value)}), name) == value


def test_help_shows_the_defaults_never_the_environment_or_a_secret(monkeypatch):
    secret = "qdrant-key-0123456789abcdef"
    monkeypatch.setenv("CTL_RANKER_QDRANT_API_KEY", secret)
    monkeypatch.setenv("CTL_RANKER_ENCODER_TOKEN", secret)
    monkeypatch.setenv("CTL_RANKER_PORT", "abc")
    parser = argparse.ArgumentParser(prog="ctl")
    ranker_config.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert secret not in text and "abc" not in text
    assert "(env CTL_RANKER_PORT; default 50052)" in text
    for name in RANKER_DEFAULTS:
        if "key" in name or "token" in name:
            assert f"(env {_var(name)})" in text, name  # no default shown


# ---------------------------------------------------------------- the encoder's config: the same mechanism


def test_the_encoder_reads_its_variables_the_same_way():
    from encoder_service.cli import add_parser
    from encoder_service.config import from_args
    from encoder_service.errors import ConfigError

    parser = argparse.ArgumentParser(prog="ctl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve-encoder", "--port", "7000"])
    config = from_args(args, {"CTL_ENCODER_PORT": "7001", "CTL_ENCODER_PROTECT_HEALTH": "on"})
    assert (config.port, config.protect_health) == (7000, True)
    with pytest.raises(ConfigError, match=r"^CTL_ENCODER_PROTECT_HEALTH='maybe': expected true or false$"):
        from_args(args, {"CTL_ENCODER_PROTECT_HEALTH": "maybe"})
    with pytest.raises(ConfigError, match=r"^CTL_ENCODER_MAX_BATCH='x': expected int$"):
        from_args(args, {"CTL_ENCODER_MAX_BATCH": "x"})
    with pytest.raises(ConfigError, match=r"^CTL_ENCODER_MAX_BATCH='0': expected 1 or more$"):
        from_args(args, {"CTL_ENCODER_MAX_BATCH": "0"})  # the same per-field checks as the ranker's


# ---------------------------------------------------------------- ctl ingest and ctl's own settings


def _ingest_refused(argv: list[str], caplog, capsys) -> str:
    """`ctl ingest ...` run in this process: it must exit 2 with one error line (no traceback); that line."""
    assert ctl_main(["ingest", "catalog.jsonl", *argv]) == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "Traceback" not in capsys.readouterr().err
    return record.getMessage()


@pytest.mark.parametrize(("name", "text"), [("BATCH", "abc"), ("STREAMS", "4.5"), ("RETRIES", "many")])
def test_ingest_names_a_malformed_variable_and_exits_2(monkeypatch, caplog, capsys, name, text):
    monkeypatch.setenv(f"CTL_INGEST_{name}", text)
    build_parser().parse_args(["ingest", "catalog.jsonl"])  # read when the command runs, not while parsing
    assert _ingest_refused([], caplog, capsys) == f"CTL_INGEST_{name}={text!r}: expected int"


def test_ingest_reads_its_variables_and_flags_still_win(monkeypatch):
    from ctl_app.ingest.cli import config_from_args

    monkeypatch.setenv("CTL_INGEST_BATCH", "16")
    monkeypatch.setenv("CTL_INGEST_STREAMS", "3")
    monkeypatch.setenv("CTL_INGEST_RANKER", "ranker:1")
    config = config_from_args(build_parser().parse_args(["ingest", "catalog.jsonl", "--streams", "5"]))
    assert (config.batch, config.streams, config.retries, config.ranker) == (16, 5, 5, "ranker:1")


def test_ingest_checks_its_token_against_the_ranker_its_variable_names(monkeypatch, caplog, capsys):
    """CTL_INGEST_RANKER is read when the command runs: the token's transport check sees that address."""
    monkeypatch.setenv("CTL_INGEST_RANKER", "10.255.255.1:1")
    monkeypatch.setenv("CTL_TOKEN", "secret-token-value")
    for name in ("CTL_ALLOW_INSECURE_TOKEN", "CTL_TLS_CA", "CTL_TLS_CERT", "CTL_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    message = _ingest_refused([], caplog, capsys)
    assert "--token would travel in plaintext to 10.255.255.1:1" in message, message


def test_a_bad_log_level_stops_any_command_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CTL_LOG_LEVEL", "chatty")
    assert ctl_main(["snapshot", str(tmp_path / "none"), str(tmp_path / "x.tar.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CTL_LOG_LEVEL" in err and "'chatty'" in err, err
    assert ctl_main(["--log-level", "loud", "snapshot", str(tmp_path / "n"), str(tmp_path / "x")]) == 2
    assert "--log-level" in capsys.readouterr().err


def test_restore_reads_the_ranker_store_path_when_it_runs(monkeypatch, tmp_path):
    parser = build_parser()
    monkeypatch.setenv("CTL_RANKER_STORE_PATH", str(tmp_path / "from-env"))
    args = parser.parse_args(["restore", "archive.tar.gz"])
    from ctl_app.cli import restore_target

    assert restore_target(args) == str(tmp_path / "from-env")
    monkeypatch.delenv("CTL_RANKER_STORE_PATH")
    assert restore_target(args) == "ctl-store/{model_version}"
    assert restore_target(parser.parse_args(["restore", "a", "b/{model_version}"])) == "b/{model_version}"


# ---------------------------------------------------------------- the encoder's values (review of issue 14)

# NaN and inf passed the encoder's `< 0` checks: max_wait_ms=inf made a lone EncodeScene wait for more
# images until its deadline while health said SERVING; nan made batching wait seconds.
ENCODER_BAD_VALUES = [
    ("max_wait_ms", math.nan),
    ("max_wait_ms", math.inf),
    ("max_wait_ms", -1.0),
    ("max_wait_ms", 3_600_001.0),
    ("grace_s", math.nan),
    ("grace_s", math.inf),
    ("grace_s", -1.0),
    ("triton_timeout_s", math.nan),
    ("triton_timeout_s", math.inf),
    ("triton_timeout_s", 0.0),
    ("port", -1),
    ("port", 65536),
    ("metrics_port", -2),
    ("health_port", -2),
    ("health_port", 65536),
    ("max_message_bytes", 0),
    ("max_message_bytes", 2**31),
    ("max_image_bytes", 0),
    ("max_image_pixels", 0),
    ("max_batch", 0),
    ("max_queue", 0),
    ("max_concurrent_calls", -1),
    ("inflight", -1),
    ("decode_threads", 0),
    ("torch_threads", -1),
    ("backend", "onnx"),
    ("host", ""),
    ("triton_url", ""),
]

ENCODER_EDGES = {
    "max_wait_ms": 0.0,
    "grace_s": 0.0,
    "port": 0,
    "metrics_port": -1,
    "health_port": 0,
    "max_concurrent_calls": 0,
    "inflight": 0,
    "torch_threads": 0,
}


def _encoder_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["serve-encoder", *argv])


@pytest.mark.parametrize(("name", "bad"), ENCODER_BAD_VALUES, ids=[f"{n}={v}" for n, v in ENCODER_BAD_VALUES])
def test_the_encoder_refuses_a_value_that_makes_no_sense_naming_where_it_came_from(name, bad):
    from encoder_service.config import EncoderConfig, from_args
    from encoder_service.errors import ConfigError

    var = "CTL_ENCODER_" + name.upper()
    with pytest.raises(ConfigError, match=f"^{name}="):
        EncoderConfig(**{name: bad})
    with pytest.raises(ConfigError, match=f"^{var}='{bad}': expected"):
        from_args(_encoder_args([]), {var: str(bad)})
    if name != "backend":  # argparse refuses a flag outside its choices itself
        with pytest.raises(ConfigError, match=f"^{_flag(name)}="):
            from_args(_encoder_args([f"{_flag(name)}={bad}"]), {})


@pytest.mark.parametrize(("name", "value"), sorted(ENCODER_EDGES.items()))
def test_the_encoders_edge_values_that_mean_something_are_accepted(name, value):
    from encoder_service.config import EncoderConfig, from_args

    assert getattr(EncoderConfig(**{name: value}), name) == value
    var = "CTL_ENCODER_" + name.upper()
    assert getattr(from_args(_encoder_args([]), {var: str(value)}), name) == value


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_serve_encoder_with_an_endless_batching_wait_exits_2_with_one_line(tmp_path, value):
    done = _ctl(
        "serve-encoder", "--model-repo", str(tmp_path), "--port", "0", "--metrics-port", "-1",
        env={"CTL_ENCODER_MAX_WAIT_MS": value},
    )  # fmt: skip
    output = (done.stderr + done.stdout).strip()
    assert done.returncode == 2, output
    assert len(output.splitlines()) == 1 and f"CTL_ENCODER_MAX_WAIT_MS='{value}'" in output, output


# ---------------------------------------------------------------- strict numbers

# Python's int() and float() take '5_6099' and ' 56099 ': a typo or a quoting slip became a port.
LENIENT = ["5_6099", " 56099 ", "56099\n", "\t1", "٥٦", "0x10", "1e3", "5.0", ""]


@pytest.mark.parametrize("text", LENIENT)
def test_an_integer_setting_takes_digits_with_an_optional_sign_only(text):
    with pytest.raises(ranker_errors.ConfigError, match=r"^CTL_RANKER_PORT=.*: expected int$"):
        ranker_config.from_args(_ranker_args([]), {"CTL_RANKER_PORT": text})
    from encoder_service.config import from_args
    from encoder_service.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^CTL_ENCODER_MAX_BATCH=.*: expected int$"):
        from_args(_encoder_args([]), {"CTL_ENCODER_MAX_BATCH": text})


@pytest.mark.parametrize("text", ["1_0.5", " 2.5", "2.5 ", "0x1p3", ""])
def test_a_float_setting_takes_no_underscores_or_spaces(text):
    with pytest.raises(ranker_errors.ConfigError, match=r"^CTL_RANKER_GRACE_S=.*: expected float$"):
        ranker_config.from_args(_ranker_args([]), {"CTL_RANKER_GRACE_S": text})


@pytest.mark.parametrize(("text", "port"), [("56099", 56099), ("+56099", 56099), ("056099", 56099), ("0", 0)])
def test_plain_integers_still_read(text, port):
    assert ranker_config.from_args(_ranker_args([]), {"CTL_RANKER_PORT": text}).port == port


@pytest.mark.parametrize(
    ("text", "value"), [("2.5", 2.5), ("-0", 0.0), ("3", 3.0), ("1e1", 10.0), (".5", 0.5)]
)
def test_plain_floats_still_read(text, value):
    assert ranker_config.from_args(_ranker_args([]), {"CTL_RANKER_GRACE_S": text}).grace_s == value


def test_a_flag_is_as_strict_as_its_variable(capsys):
    with pytest.raises(SystemExit):
        _ranker_args(["--port", "5_6099"])
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _encoder_args(["--max-wait-ms", "1_0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "c.jsonl", "--batch", "1_0"])


@pytest.mark.parametrize("name", ["BATCH", "STREAMS", "RETRIES"])
def test_ingest_counts_are_strict_integers(monkeypatch, caplog, capsys, name):
    monkeypatch.setenv(f"CTL_INGEST_{name}", "1_0")
    assert f"CTL_INGEST_{name}='1_0'" in _ingest_refused([], caplog, capsys)


# ---------------------------------------------------------------- ingest: a count out of range is named


@pytest.mark.parametrize(("name", "text"), [("BATCH", "0"), ("STREAMS", "0"), ("RETRIES", "-1")])
def test_ingest_names_the_variable_of_a_count_out_of_range(monkeypatch, caplog, capsys, name, text):
    monkeypatch.setenv(f"CTL_INGEST_{name}", text)
    message = _ingest_refused([], caplog, capsys)
    assert f"CTL_INGEST_{name}='{text}': expected" in message, message


@pytest.mark.parametrize(("flag", "text"), [("--batch", "0"), ("--streams", "0"), ("--retries", "-1")])
def test_ingest_names_the_flag_of_a_count_out_of_range(monkeypatch, caplog, capsys, flag, text):
    monkeypatch.setenv("CTL_INGEST_BATCH", "8")  # a fine variable: the flag's value is the one named
    message = _ingest_refused([f"{flag}={text}"], caplog, capsys)
    assert f"{flag}={text}: expected" in message and "CTL_INGEST" not in message, message


def test_ctl_ingest_with_batch_0_exits_2_naming_the_variable(tmp_path):
    done = _ctl("ingest", str(tmp_path / "c.jsonl"), env={"CTL_INGEST_BATCH": "0"})
    assert done.returncode == 2, done.stderr
    assert "CTL_INGEST_BATCH='0'" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_building_ctls_parser_loads_no_heavy_library():
    """`ctl --help` and `ctl health` (the images' health check, every 10 s) build the whole parser: it must
    load no numpy, no Qdrant engine or client, no torch, Pillow or httpx (each subcommand imports what it
    needs when it runs). After the package split it loaded numpy and qdrant-edge through the snapshot,
    model-config and retrieval-mode imports (issue 16 review: 0.22 s -> 0.36 s, 43 -> 60 MB)."""
    code = (
        "import sys, ctl_app.cli as c\n"
        "c.build_parser()\n"
        "heavy = {'numpy', 'qdrant_edge', 'qdrant_client', 'torch', 'PIL', 'httpx'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stdout
