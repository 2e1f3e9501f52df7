"""Conversions offered as methods of format objects but built by a door.

``LoomConnection.to_xarray``/``to_anndata``, ``TensorView.to_xarray`` and
``MappedCollection.to_anndata`` are methods of the objects users hold, but the
code that builds an ``xarray`` or ``anndata`` object belongs to the doors
(:mod:`dask_loom._xarray`, :mod:`dask_loom.analysis`), which import the
formats -- never the reverse (``docs/architecture.md``).  A door registers
each converter here with :func:`provides`; a format method asks
:func:`converter` for one by ``(source kind, target)`` and never names the
door's module.  :data:`DOORS` says which door module provides which target, so
the first call loads it (as xarray finds its backends through entry points).

This module sits below every format and imports nothing of the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["DOORS", "converter", "provides"]

#: Target -> the door module whose import registers its converters.
DOORS: dict[str, str] = {"xarray": "dask_loom._xarray", "anndata": "dask_loom.analysis"}

_CONVERTERS: dict[tuple[str, str], Callable[..., Any]] = {}

F = Callable[..., Any]


def provides(source: str, target: str) -> Callable[[F], F]:
    """Register the decorated function as the converter of *source* objects into *target*.

    Parameters
    ----------
    source
        What the function converts: ``"loom"``, ``"tensor"``, ``"mapped"``.
    target
        What it returns: a key of :data:`DOORS` (``"xarray"``, ``"anndata"``).
    """
    if target not in DOORS:
        raise ValueError(f"no door provides {target!r}; known: {', '.join(sorted(DOORS))}")

    def deco(fn: F) -> F:
        _CONVERTERS[(source, target)] = fn
        return fn

    return deco


def converter(source: str, target: str) -> F:
    """The function converting *source* objects into *target*, loading its door on first use.

    Raises
    ------
    LookupError
        No converter for the pair (a bug: every method that asks names a pair a door registers).
    ImportError
        The door's optional dependency (xarray, anndata) is missing; raised by the door's import.
    """
    fn = _CONVERTERS.get((source, target))
    if fn is None:
        importlib.import_module(DOORS[target])
        fn = _CONVERTERS.get((source, target))
    if fn is None:
        raise LookupError(f"{DOORS[target]} provides no conversion of {source!r} into {target!r}")
    return fn
