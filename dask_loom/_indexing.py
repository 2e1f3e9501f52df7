"""Normalising index expressions to per-axis selections (numpy, outer semantics).

Every axis is selected independently, as h5py and zarr's ``oindex`` do:
``ds[[3, 1, 1], mask]`` picks rows 3, 1, 1 and the masked columns.  Slices
may have any step, including negative ones.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AxisSel", "normalize_key"]


@dataclass(frozen=True)
class AxisSel:
    """One axis of a selection.

    ``kind`` is ``"int"`` (axis dropped), ``"range"`` (``start:stop``, step 1)
    or ``"array"`` (arbitrary positions: ``unique`` sorted positions and
    ``inverse`` such that ``unique[inverse]`` is the requested order).
    """

    kind: str
    start: int = 0
    stop: int = 0
    unique: np.ndarray | None = None
    inverse: np.ndarray | None = None

    @property
    def count(self) -> int:
        if self.kind == "int":
            return 1
        if self.kind == "range":
            return self.stop - self.start
        assert self.inverse is not None
        return len(self.inverse)

    @property
    def n_unique(self) -> int:
        if self.kind == "array":
            assert self.unique is not None
            return len(self.unique)
        return self.count

    def positions(self) -> np.ndarray:
        """Requested positions, in requested order."""
        if self.kind == "int":
            return np.array([self.start])
        if self.kind == "range":
            return np.arange(self.start, self.stop)
        assert self.unique is not None
        assert self.inverse is not None
        return self.unique[self.inverse]


def _from_positions(pos: np.ndarray) -> AxisSel:
    if len(pos) and np.all(np.diff(pos) == 1):
        return AxisSel("range", int(pos[0]), int(pos[-1]) + 1)
    unique, inverse = np.unique(pos, return_inverse=True)
    return AxisSel("array", unique=unique.astype(np.int64), inverse=inverse.astype(np.int64).ravel())


def _axis(key: Any, n: int, axis: int, where: str) -> AxisSel:
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        if step == 1:
            return AxisSel("range", start, max(start, stop))
        return _from_positions(np.arange(start, stop, step, dtype=np.int64))
    if isinstance(key, (numbers.Integral, np.integer)) and not isinstance(key, (bool, np.bool_)):
        i = int(key)
        if i < -n or i >= n:
            raise IndexError(f"{where}: index {i} is out of bounds for axis {axis} with size {n}")
        return AxisSel("int", i % n, i % n + 1)
    arr = np.asarray(key)
    if arr.dtype == object and arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "b":
        if arr.ndim != 1 or len(arr) != n:
            raise IndexError(f"{where}: boolean index of shape {arr.shape} does not match axis {axis} of size {n}")
        return _from_positions(np.flatnonzero(arr))
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise IndexError(f"{where}: cannot index axis {axis} with {type(key).__name__} of dtype {arr.dtype}")
    if arr.ndim != 1:
        raise IndexError(f"{where}: index arrays must be 1-D (axis {axis} got shape {arr.shape})")
    arr = arr.astype(np.int64)
    if len(arr) and (arr.min() < -n or arr.max() >= n):
        bad = arr[(arr < -n) | (arr >= n)][0]
        raise IndexError(f"{where}: index {bad} is out of bounds for axis {axis} with size {n}")
    return _from_positions(np.where(arr < 0, arr + n, arr))


def normalize_key(key: Any, shape: tuple[int, ...], *, where: str = "array") -> list[AxisSel]:
    """One :class:`AxisSel` per axis for an index expression.

    Examples
    --------
    >>> [s.kind for s in normalize_key((slice(None), [3, 1]), (5, 4))]
    ['range', 'array']
    """
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"{where}: too many indices ({len(key)}) for an array of {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    return [_axis(k, n, i, where) for i, (k, n) in enumerate(zip(key, shape))]
