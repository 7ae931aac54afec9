"""opentrans.options: one dataclass per stage's options drives the CLI flags, the recipe check and the record."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from opentrans.errors import OpenTransError
from opentrans.options import StageOptions, as_record, cli_options, from_mapping, option, options_from_kwargs
from opentrans.registry import Registry

COLOURS = Registry("colour")
COLOURS.add("red", object())
COLOURS.add("blue", object())


@dataclass
class _Opts(StageOptions):
    steps: int = option(40, "optimizer steps", type=click.IntRange(min=1))
    lr: float = option(1e-3, "learning rate")
    colour: str = option("red", "a colour", choices=COLOURS.names)
    freeze: bool = option(True, "freeze", secondary="--no-freeze")
    sharp: bool = option(False, "a flag")
    limit: int | None = option(None, "first N images")
    ops: list[str] = option(default_factory=list, help="repeatable")
    secret: str = option("x", "not on the CLI", cli=False)

    def check(self) -> None:
        super().check()
        if self.lr <= 0:
            raise OpenTransError(f"lr: {self.lr} must be > 0")


def _command():
    seen = {}

    @click.command()
    @cli_options(_Opts)
    def cmd(**kwargs):
        seen["options"] = options_from_kwargs(_Opts, kwargs)
        seen["rest"] = kwargs

    return cmd, seen


def test_cli_defaults_equal_the_dataclass_defaults():
    cmd, seen = _command()
    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 0, result.output
    assert seen["options"] == _Opts()
    assert seen["rest"] == {}


def test_cli_flags_reach_the_options():
    cmd, seen = _command()
    result = CliRunner().invoke(cmd, ["--steps", "7", "--colour", "blue", "--no-freeze", "--sharp", "--limit", "3",
                                      "--ops", "a", "--ops", "b"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == _Opts(steps=7, colour="blue", freeze=False, sharp=True, limit=3, ops=["a", "b"])


def test_cli_refuses_a_choice_outside_the_registry_and_hides_non_cli_fields():
    cmd, _ = _command()
    result = CliRunner().invoke(cmd, ["--colour", "green"])
    assert result.exit_code == 2 and "green" in result.output
    assert "--secret" not in CliRunner().invoke(cmd, ["--help"]).output


def test_a_plugin_registered_later_is_a_choice():
    COLOURS.add("green", object())
    try:
        cmd, seen = _command()
        assert CliRunner().invoke(cmd, ["--colour", "green"]).exit_code == 0
        assert seen["options"].colour == "green"
    finally:
        COLOURS._entries.pop("green")


@pytest.mark.parametrize("raw, message", [
    ({"stepz": 3}, "unknown key(s) stepz"),
    ({"steps": "3"}, "steps: '3' is a str, expected int"),
    ({"steps": True}, "steps: True is a bool"),
    ({"lr": float("nan")}, "not a finite number"),
    ({"lr": -1.0}, "lr: -1.0 must be > 0"),
    ({"colour": "green"}, "colour: 'green' is not one of blue, red"),
    ([1, 2], "expected a mapping"),
])
def test_recipe_sections_are_checked(raw, message):
    with pytest.raises(OpenTransError, match="^where: ") as err:
        from_mapping(_Opts, raw, "where")
    assert message in str(err.value)


def test_recipe_section_and_record():
    opts = from_mapping(_Opts, {"steps": 5, "lr": 1, "limit": None, "ops": ["x"]}, "where")
    assert opts == _Opts(steps=5, lr=1, ops=["x"])
    assert as_record(opts) == {"steps": 5, "lr": 1, "colour": "red", "freeze": True, "sharp": False, "limit": None,
                               "ops": ["x"], "secret": "x"}


def test_registry_lookup_errors_list_the_known_names():
    with pytest.raises(OpenTransError, match="unknown colour 'green'; known: blue, red"):
        COLOURS.get("green")
    with pytest.raises(OpenTransError, match="registered twice"):
        COLOURS.add("red", object())
    assert "red" in COLOURS and list(COLOURS) == ["blue", "red"]
