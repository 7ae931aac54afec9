"""Checks for values read from files anyone may have written (``model.json``, ``build.json``, ``manifest.json``).

Every check raises :class:`~opentrans.errors.OpenTransError` with one line naming the file and the field, so a
damaged or hand-edited artifact is refused before anything is built from it (no ``KeyError``/``TypeError`` from
deep inside, no tensor of a size the file made up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from opentrans.errors import OpenTransError

#: Largest network input side (pixels) an artifact may declare; far above any CLIP model's native size.
MAX_IMAGE_SIDE = 4096


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def mapping(value: Any, where: str, required: Iterable[str] = (), optional: Iterable[str] | None = ()) -> dict:
    """``value`` as a dict with every ``required`` key and, unless ``optional`` is None, no key outside
    ``required`` and ``optional``.

    Raises:
        OpenTransError: not an object, a missing key, or an unknown key.
    """
    if not isinstance(value, dict):
        raise OpenTransError(f"{where}: expected an object, found {_kind(value)}")
    required = list(required)
    missing = [k for k in required if k not in value]
    if missing:
        raise OpenTransError(f"{where}: missing key {missing[0]!r}")
    if optional is not None:
        known = set(required) | set(optional)
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise OpenTransError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return value


def string(value: Any, where: str, choices: Iterable[str] | None = None, empty: bool = False) -> str:
    """``value`` as a string (non-empty unless ``empty``), one of ``choices`` when given.

    Raises:
        OpenTransError: not a string, empty, or not one of ``choices``.
    """
    if not isinstance(value, str):
        raise OpenTransError(f"{where}: expected a string, found {_kind(value)}")
    if not value and not empty:
        raise OpenTransError(f"{where}: empty")
    if choices is not None:
        choices = list(choices)
        if value not in choices:
            raise OpenTransError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def integer(value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (booleans are not integers here).

    Raises:
        OpenTransError: not an integer or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpenTransError(f"{where}: expected an integer, found {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise OpenTransError(f"{where}: {value} is outside [{'-inf' if lo is None else lo}, "
                             f"{'inf' if hi is None else hi}]")
    return value


def number(value: Any, where: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``).

    Raises:
        OpenTransError: not a number, NaN/infinite, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OpenTransError(f"{where}: expected a number, found {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise OpenTransError(f"{where}: {value} is not a finite number")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        raise OpenTransError(f"{where}: {value:g} is outside {'(' if lo_open else '['}"
                             f"{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
    return value


def boolean(value: Any, where: str) -> bool:
    """``value`` as a bool.

    Raises:
        OpenTransError: not true/false.
    """
    if not isinstance(value, bool):
        raise OpenTransError(f"{where}: expected true or false, found {_kind(value)}")
    return value


def sequence(value: Any, where: str, length: int | None = None, max_length: int | None = None) -> list:
    """``value`` as a list (of exactly ``length`` items, or at most ``max_length``).

    Raises:
        OpenTransError: not a list, or of the wrong length.
    """
    if not isinstance(value, list):
        raise OpenTransError(f"{where}: expected a list, found {_kind(value)}")
    if length is not None and len(value) != length:
        raise OpenTransError(f"{where}: expected {length} items, found {len(value)}")
    if max_length is not None and len(value) > max_length:
        raise OpenTransError(f"{where}: {len(value)} items, at most {max_length} allowed")
    return value


def image_size(value: Any, where: str) -> tuple[int, int]:
    """``[H, W]`` in pixels, each in ``[1, MAX_IMAGE_SIDE]``.

    Raises:
        OpenTransError: not two integers in range.
    """
    h, w = sequence(value, where, length=2)
    return integer(h, f"{where}[0]", 1, MAX_IMAGE_SIDE), integer(w, f"{where}[1]", 1, MAX_IMAGE_SIDE)


def rgb_constants(value: Any, where: str, positive: bool = False) -> tuple[float, float, float]:
    """Three finite numbers (each > 0 with ``positive``), e.g. a normalisation mean or std.

    Raises:
        OpenTransError: not three finite numbers (or one not positive).
    """
    items = sequence(value, where, length=3)
    return tuple(number(v, f"{where}[{i}]", lo=0.0 if positive else None, lo_open=positive) for i, v in enumerate(items))


def relative_file(value: Any, where: str) -> str:
    """A path relative to the artifact directory that stays inside it (no absolute path, no ``..``).

    Raises:
        OpenTransError: not a string, absolute, or escaping the directory.
    """
    value = string(value, where)
    for flavour in (PurePosixPath(value), PureWindowsPath(value)):
        if flavour.is_absolute() or flavour.anchor or ".." in flavour.parts:
            raise OpenTransError(f"{where}: {value!r} must be a path inside the artifact directory")
    return value
