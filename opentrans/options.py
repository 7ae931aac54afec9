"""Typed stage options: one dataclass per stage holds every option's name, default, type, help and check.

The same class serves every layer that speaks of a stage's options, so an option is written once:

* the CLI generates its ``--flags`` from the fields (:func:`cli_options`),
* a recipe's stage section is parsed into it (:func:`from_mapping`: unknown keys, wrong types and non-finite
  numbers are one-line errors),
* the stage function takes it, and
* the manifest records it (:func:`as_record`).

A field is declared with :func:`option`::

    @dataclass
    class PruneOptions(StageOptions):
        sparsity: float = option(0.5, "fraction of prunable channels to remove, in (0, 1)", type=FiniteFloat())
        importance: str = option("magnitude", "...", choices=IMPORTANCES.names)

``choices`` may be a callable returning the names (a registry's ``names``), read when the CLI is built, so a
plug-in registered in its own file shows up in ``--help`` and in the recipe's check without a second list.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Iterable

import click

from opentrans.errors import OpenTransError


@dataclass(frozen=True)
class CliSpec:
    """How one option field appears on the command line (see :func:`option`)."""

    help: str
    flag: str | None = None
    type: Any = None
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None
    metavar: str | None = None
    secondary: str | None = None
    cli: bool = True
    show_default: bool = True


def option(default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None,
           flag: str | None = None, type: Any = None, choices=None, metavar: str | None = None,
           secondary: str | None = None, cli: bool = True, show_default: bool = True) -> Any:
    """A dataclass field with its command-line description.

    Args:
        default: the default value (or give ``default_factory`` for lists/dicts).
        help: the ``--help`` text (one or two sentences; units named).
        flag: the long flag (default ``--`` + the field name with ``_`` -> ``-``).
        type: a click parameter type (``click.IntRange(min=1)``, :class:`opentrans.cli.FiniteFloat`, ...);
            default: click's type for the default's Python type.
        choices: allowed values, or a callable returning them (a registry's ``names``).
        metavar: the metavar in ``--help``.
        secondary: for a bool, the negative flag (``--no-freeze-heavy-tail``); without it a bool is a flag.
        cli: False for an option only a recipe or the API sets.
        show_default: show the default in ``--help``.
    """
    spec = CliSpec(help=help, flag=flag, type=type, choices=choices, metavar=metavar, secondary=secondary, cli=cli,
                   show_default=show_default)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"cli": spec})
    return dataclasses.field(default=default, metadata={"cli": spec})


def choice_names(choices) -> list[str]:
    """The allowed values of an option's ``choices`` (calls it when it is a registry's ``names``)."""
    return list(choices() if callable(choices) else choices)


@dataclass
class StageOptions:
    """Base of every stage's options: :meth:`check` validates the values that a type alone cannot."""

    def check(self) -> None:
        """Raise :class:`OpenTransError` (one line) for a value out of its range or a bad combination.

        The base checks every field with ``choices`` against them; subclasses extend it (and call ``super()``).
        """
        for f in fields(self):
            spec = f.metadata.get("cli")
            value = getattr(self, f.name)
            if spec is None or spec.choices is None or value is None:
                continue
            allowed = choice_names(spec.choices)
            if value not in allowed:
                raise OpenTransError(f"{f.name}: '{value}' is not one of {', '.join(allowed)}")

    def replace(self, **changes) -> "StageOptions":
        """A checked copy with ``changes`` applied."""
        new = dataclasses.replace(self, **changes)
        new.check()
        return new


def as_record(options: StageOptions) -> dict:
    """The options as a JSON-able dict, for a manifest's ``options`` (tuples become lists, paths strings)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value):
            return as_record(value)
        if hasattr(value, "__fspath__"):
            return str(value)
        return value

    return {f.name: plain(getattr(options, f.name)) for f in fields(options)}


def _allowed_python_types(annotation: Any) -> tuple[type, ...] | None:
    """Python types a recipe value for a field of this annotation may have (``None`` where not checked)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        allowed: list[type] = []
        for arg in args:
            sub = _allowed_python_types(arg)
            if sub is None:
                return None
            allowed.extend(sub)
        return tuple(allowed)
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    if annotation is int:
        return (int,)
    if annotation is bool:
        return (bool,)
    if annotation is str:
        return (str,)
    if origin in (list, tuple) or annotation in (list, tuple):
        return (list, tuple)
    if origin is dict or annotation is dict:
        return (dict,)
    return None


def from_mapping(cls: type, raw: Any, where: str):
    """Build options of ``cls`` from a recipe section ``raw`` (a mapping; ``None`` = all defaults), checked.

    Raises:
        OpenTransError: ``raw`` is not a mapping, has unknown keys, a value of the wrong type or a non-finite
            number, or :meth:`StageOptions.check` refuses the result.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OpenTransError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise OpenTransError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():  # YAML reads .nan and .inf as floats; no option means either
        if isinstance(value, float) and not math.isfinite(value):
            raise OpenTransError(f"{where}: {key}: {value} is not a finite number")
        allowed = _allowed_python_types(hints.get(key))
        if allowed is not None and not isinstance(value, allowed) or (
                isinstance(value, bool) and allowed is not None and bool not in allowed):
            raise OpenTransError(f"{where}: {key}: {value!r} is a {type(value).__name__}, expected "
                                 f"{' or '.join(t.__name__ for t in allowed)}")
    try:
        options = cls(**raw)
    except TypeError as exc:  # a required field missing
        raise OpenTransError(f"{where}: {exc}") from None
    if isinstance(options, StageOptions):
        try:
            options.check()
        except OpenTransError as exc:
            raise OpenTransError(f"{where}: {exc}") from None
    return options


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose values are read when first needed (a value to check, ``--help`` to show), not when
    the command is built: a registry's ``names`` imports its plug-in modules (torch among them), and building the
    CLI must not (``opentrans --help`` stays fast)."""

    def __init__(self, choices: Iterable[str] | Callable[[], Iterable[str]], case_sensitive: bool = True):
        self._source = choices
        self._resolved: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        if self._resolved is None:
            self._resolved = tuple(choice_names(self._source))
        return self._resolved

    @choices.setter
    def choices(self, value) -> None:
        self._source, self._resolved = value, None


def _click_type(annotation: Any):
    """click's parameter type for a field annotation without an explicit ``type`` (floats refuse nan/inf)."""
    allowed = _allowed_python_types(annotation) or ()
    if float in allowed:
        return FiniteFloat()
    if int in allowed and bool not in allowed:
        return click.INT
    return None


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and +-inf (``float("nan")`` passes every range comparison), optionally
    within a range like :class:`click.FloatRange`; a usage error (exit status 2) otherwise."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, **kwargs):
        super().__init__(min, max, **kwargs)

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv

    def _describe_range(self) -> str:
        return super()._describe_range() if (self.min is not None or self.max is not None) else ""


def cli_options(cls: type, *, exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None):
    """A decorator adding one ``click.option`` per field of ``cls`` (those with ``cli=True``, minus ``exclude``),
    in field order, each with the field's default, type, choices and help. ``defaults`` overrides a field's
    default for this command only."""
    exclude = set(exclude)
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)

    def deco(f):
        for fld in reversed(fields(cls)):
            spec: CliSpec | None = fld.metadata.get("cli")
            if spec is None or not spec.cli or fld.name in exclude:
                continue
            default = defaults.get(fld.name, fld.default if fld.default is not MISSING else None)
            if fld.default_factory is not MISSING and fld.name not in defaults:
                default = fld.default_factory()
            flag = spec.flag or "--" + fld.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": spec.help, "show_default": spec.show_default and default is not None}
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            if isinstance(default, bool) and spec.type is None:
                decls = [f"{flag}/{spec.secondary}"] if spec.secondary else [flag]
                kwargs.update(is_flag=True, default=default)
                if not spec.secondary and not default:
                    kwargs["show_default"] = False
            else:
                decls = [flag]
                kwargs["default"] = list(default) if isinstance(default, (list, tuple)) and default else default
                if spec.choices is not None:
                    kwargs["type"] = LazyChoice(spec.choices)
                elif spec.type is not None:
                    kwargs["type"] = spec.type
                elif not isinstance(default, (list, tuple)) and _click_type(hints[fld.name]) is not None:
                    kwargs["type"] = _click_type(hints[fld.name])
                if isinstance(default, (list, tuple)):
                    kwargs["multiple"] = True
                    kwargs["default"] = tuple(default)
                    kwargs["show_default"] = False
            f = click.option(*decls, fld.name, **kwargs)(f)
        return f

    return deco


def options_from_kwargs(cls: type, kwargs: dict[str, Any]):
    """Pop the fields of ``cls`` out of a click command's ``kwargs`` and build the (checked) options."""
    names = {f.name for f in fields(cls)}
    values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    for k, v in values.items():
        if isinstance(v, tuple):
            values[k] = list(v)
    options = cls(**values)
    if isinstance(options, StageOptions):
        options.check()
    return options
