"""The one registry pattern behind every extension point (heads, prompts, deploy targets, adapters, dense modes,
pruning importances, losses).

A registry maps a name to an entry (a factory, a class or a small record). Each plug-in registers itself in its own
module with the registry's decorator; the registry imports every module of its plug-in package the first time it
is asked for its names, so adding a plug-in is one new file::

    TARGETS = Registry("deploy target", plugins="opentrans.deploy.targets")

    @TARGETS.register("onnx")
    class OnnxTarget: ...

    TARGETS.names()        # ['jetson', 'nvidia', 'onnx', 'openvino']
    TARGETS.get("onnx")    # the entry; an unknown name raises OpenTransError listing the known ones

The CLI takes its ``click.Choice`` lists and the recipe its checks from :meth:`Registry.names`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

from opentrans.errors import OpenTransError

T = TypeVar("T")


def import_submodules(package: str) -> None:
    """Import every module directly inside ``package`` (a dotted name), so their registration decorators run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """Name -> entry, filled by :meth:`register` decorators in plug-in modules.

    Args:
        kind: what an entry is, for messages ("deploy target", "adapter", ...).
        plugins: dotted package names whose modules are imported (once) before the names are listed or an entry
            is looked up, so that plug-ins in their own files register themselves.
    """

    def __init__(self, kind: str, plugins: str | tuple[str, ...] = ()):
        self.kind = kind
        self._plugins = (plugins,) if isinstance(plugins, str) else tuple(plugins)
        self._entries: dict[str, T] = {}
        self._loaded = not self._plugins

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``.

        Raises:
            OpenTransError: ``name`` is already registered to a different object.
        """

        def deco(entry: T) -> T:
            self.add(name, entry)
            return entry

        return deco

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name`` (the non-decorator form of :meth:`register`)."""
        old = self._entries.get(name)
        if old is not None and old is not entry and getattr(old, "__qualname__", None) != getattr(
                entry, "__qualname__", object()):
            raise OpenTransError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for package in self._plugins:
                import_submodules(package)

    def names(self) -> list[str]:
        """Every registered name, sorted (plug-in packages imported first)."""
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry registered under ``name``.

        Raises:
            OpenTransError: no such name (the message lists the known ones).
        """
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise OpenTransError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}") from None

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A package's ``__getattr__`` (PEP 562) that imports each public name of ``exports`` (name -> module) from its
    module on first use, so importing the package (or its light ``options`` module, as the CLI does) loads nothing
    heavy. Use as ``__getattr__ = lazy_exports(__name__, _EXPORTS)``; an unknown name is an AttributeError."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
