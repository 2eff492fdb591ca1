"""Lazy exports for a room's `__init__` (PEP 562): `mumic <command> --help` reads a room's options module
without importing Ray and torch through the rest of the room."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module


def exports(package: str, modules: Mapping[str, tuple[str, ...]]) -> Callable[[str], object]:
    """A module `__getattr__`: `modules` maps each submodule to the names it exports; a name's submodule
    is imported on its first use."""
    names = {name: module for module, exported in modules.items() for name in exported}

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{names[name]}", package), name)

    return __getattr__
