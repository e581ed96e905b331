"""ctl.settings on a config of its own: optional values, switches (`--x` / `--no-x`), comma-separated lists
and fields that are not settings, read from flags and variables as the commands' configs are."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctl import settings
from ctl.settings import at_least, in_range, setting

PREFIX = "CTL_TEST_"


class Bad(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    source: Path  # not a setting: the caller passes it (a positional argument)
    steps: int | None = field(
        default=None, metadata=setting("steps (default: the preset's)", check=at_least(1))
    )
    rate: float | None = field(default=None, metadata=setting("a rate", check=in_range(0, 1)))
    kind: str | None = field(default=None, metadata=setting("a kind", choices=("a", "b")))
    augment: bool = field(default=True, metadata=setting("augment the images", switch=True))
    trainable: bool | None = field(
        default=None, metadata=setting("train it (default: the preset's)", switch=True)
    )
    verbose: bool = field(default=False, metadata=setting("say more (true/false)"))
    names: tuple[str, ...] = field(default=(), metadata=setting("comma-separated names"))

    def __post_init__(self) -> None:
        settings.check_fields(self, Bad)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    settings.add_arguments(parser, Example, PREFIX)
    return parser


def _config(argv: list[str], environ: dict[str, str] | None = None) -> Example:
    return settings.from_args(
        Example, _parser().parse_args(argv), environ or {}, PREFIX, Bad, source=Path("s")
    )


def test_unset_optional_values_stay_none_and_the_fixed_field_is_passed_through():
    assert _config([]) == Example(Path("s"))
    assert _config([]).steps is None and _config([]).trainable is None


def test_an_optional_value_reads_its_inner_type_from_a_flag_or_a_variable():
    assert _config(["--steps", "7", "--rate", "0.5", "--kind", "b"]) == Example(
        Path("s"), steps=7, rate=0.5, kind="b"
    )
    assert _config([], {"CTL_TEST_STEPS": "9", "CTL_TEST_KIND": "a"}) == Example(Path("s"), steps=9, kind="a")
    assert _config(["--steps", "3"], {"CTL_TEST_STEPS": "9"}).steps == 3  # the flag wins


def test_an_optional_value_is_checked_when_set_and_none_passes():
    with pytest.raises(Bad, match=r"^--steps=0: expected 1 or more$"):
        _config(["--steps", "0"])
    with pytest.raises(Bad, match=r"^CTL_TEST_STEPS='x': expected int$"):
        _config([], {"CTL_TEST_STEPS": "x"})
    with pytest.raises(Bad, match=r"^CTL_TEST_RATE='2': expected 0..1$"):
        _config([], {"CTL_TEST_RATE": "2"})
    with pytest.raises(Bad, match=r"^CTL_TEST_KIND='c': expected one of a, b$"):
        _config([], {"CTL_TEST_KIND": "c"})
    with pytest.raises(Bad, match=r"^steps=0: expected 1 or more$"):
        Example(Path("s"), steps=0)
    assert Example(Path("s"), steps=None, kind=None).kind is None


def test_none_is_refused_where_the_type_does_not_allow_it():
    with pytest.raises(Bad, match=r"^augment=None: expected a value$"):
        Example(Path("s"), augment=None)  # type: ignore[arg-type]


def test_a_switch_is_two_flags_and_its_variable_reads_true_or_false():
    assert _config(["--no-augment"]).augment is False
    assert _config(["--augment"], {"CTL_TEST_AUGMENT": "no"}).augment is True  # the flag wins
    assert _config([], {"CTL_TEST_AUGMENT": "off"}).augment is False
    assert _config(["--trainable"]).trainable is True
    assert _config(["--no-trainable"]).trainable is False
    assert _config([], {"CTL_TEST_TRAINABLE": "yes"}).trainable is True
    with pytest.raises(Bad, match=r"^CTL_TEST_AUGMENT='maybe': expected true or false$"):
        _config([], {"CTL_TEST_AUGMENT": "maybe"})


def test_a_plain_bool_still_takes_a_value():
    assert _config(["--verbose", "yes"]).verbose is True
    with pytest.raises(SystemExit):
        _parser().parse_args(["--verbose", "perhaps"])


def test_a_list_reads_comma_separated_names():
    assert _config(["--names", " a, b,,c "]).names == ("a", "b", "c")
    assert _config([], {"CTL_TEST_NAMES": "x"}).names == ("x",)
    assert _config([], {"CTL_TEST_NAMES": ""}).names == ()


def test_a_field_without_setting_has_no_flag_and_no_variable():
    with pytest.raises(SystemExit):
        _parser().parse_args(["--source", "x"])
    assert _config([], {"CTL_TEST_SOURCE": "elsewhere"}).source == Path("s")


def test_the_help_names_each_variable_and_shows_only_defaults_that_say_something():
    text = " ".join(_parser().format_help().split())  # argparse wraps lines
    assert "--augment, --no-augment" in text and "--trainable, --no-trainable" in text
    assert "(env CTL_TEST_AUGMENT; default True)" in text
    assert "(env CTL_TEST_STEPS)" in text and "(env CTL_TEST_NAMES)" in text  # None and () are not shown


def test_a_long_variable_is_cut_in_the_message():
    with pytest.raises(Bad, match=r"^CTL_TEST_STEPS='x{40}'…: expected int$"):
        _config([], {"CTL_TEST_STEPS": "x" * 5000})


def test_an_integer_range_reads_as_integers():
    assert in_range(1, 1 << 40)(0) == "expected 1..1099511627776"
    assert in_range(0, 3_600_000.0)(-1) == "expected 0..3.6e+06"


@pytest.mark.parametrize("name", ["STEPS", "RATE", "KIND", "TRAINABLE"])
def test_an_empty_variable_of_an_optional_setting_leaves_it_unset(name):
    """`CTL_TRAIN_TRAIN_BACKBONE=` (set but empty, as a manifest or a shell often leaves it) is no value:
    the preset decides, as when the variable is absent. It read as False before (parse_bool("") is False),
    freezing a backbone the preset trains; an empty path became '.' (issue 16 review)."""
    assert _config([], {PREFIX + name: ""}) == _config([])
    assert _config([], {PREFIX + name: "   "}) == _config([])


def test_an_empty_variable_of_a_required_setting_is_still_read():
    """Where a setting has no 'unset' (a plain bool, a list), an empty variable is a value, as before:
    false, no names."""
    assert _config([], {PREFIX + "VERBOSE": ""}).verbose is False
    assert _config([], {PREFIX + "NAMES": ""}).names == ()
