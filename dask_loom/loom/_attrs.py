"""``ds.ra`` / ``ds.ca`` / ``ds.attrs``: attribute managers, file-backed or in memory."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.errors import LoomFormatError
from dask_loom.loom._common import AXIS_ATTRS, NamedMapping, check_name, scalar_text, timestamp
from dask_loom.loom._values import normalize_for_write

if TYPE_CHECKING:
    from dask_loom.loom._connection import LoomConnection

__all__ = ["AttributeManager", "GlobalAttributeManager"]

_INTERNAL = ("ds", "axis", "_names", "_cache", "_parent", "_index", "_length")


def _is_index(thing: Any) -> bool:
    """Slices, ints, integer/bool arrays and lists of them select positions (not names)."""
    if isinstance(thing, (slice, int, np.integer)) and not isinstance(thing, bool):
        return True
    if isinstance(thing, np.ndarray):
        return thing.dtype.kind in "biu"
    return isinstance(thing, list) and bool(thing) and all(isinstance(x, (int, np.integer, bool, np.bool_)) for x in thing)


def _take(values: np.ndarray, index: Any) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
        return values[[int(index)]]
    return values[index]


class AttributeManager(NamedMapping):
    """Row or column attributes: dict-like and attribute access.

    File-backed managers (``ds.ra``, ``ds.ca``) read each attribute on first
    access and cache it; in-memory managers (views, scans, ``ds.ca[10:20]``)
    hold arrays or slice a parent's attributes lazily, on first access.

    Indexing with a name returns the array; with a tuple of names, the found
    ones stacked as columns; with a slice, int, bool mask or integer array
    (or list), a new in-memory manager with every attribute sliced.
    """

    def __init__(self, ds: LoomConnection | None, *, axis: int, values: dict[str, np.ndarray] | None = None) -> None:
        object.__setattr__(self, "ds", ds)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "_cache", dict(values or {}))
        object.__setattr__(self, "_parent", None)
        object.__setattr__(self, "_index", None)
        object.__setattr__(self, "_length", None)
        names: list[str] = list(values or {})
        if ds is not None:
            names = ds._attr_names(axis)
        object.__setattr__(self, "_names", names)

    # -- construction of lazy slices ---------------------------------------------

    def _sliced(self, index: Any) -> AttributeManager:
        m = AttributeManager(None, axis=self.axis)
        object.__setattr__(m, "_names", list(self._names))
        object.__setattr__(m, "_parent", self)
        object.__setattr__(m, "_index", index)
        return m

    # -- mapping protocol -----------------------------------------------------------







    def get(self, name: str, default: Any = None) -> Any:
        """The attribute, or *default* (which, when given, must have one value per row/column)."""
        if name in self:
            return self[name]
        if default is not None and self.ds is not None:
            n = self.ds.shape[self.axis]
            if not isinstance(default, np.ndarray) or default.shape[:1] != (n,):
                raise ValueError(f"Default value for '{name}' must be an array of length {n}")
        return default

    def _load(self, name: str) -> np.ndarray:
        cache = self._cache
        if name in cache:
            return cache[name]
        if self._parent is not None:
            value = _take(self._parent[name], self._index)
        elif self.ds is not None:
            value = self.ds._read_attr(self.axis, name)
        else:
            raise AttributeError(f"'{name}' not found")
        cache[name] = value
        return value

    def __getitem__(self, thing: Any) -> Any:
        if isinstance(thing, str):
            if thing not in self._names:
                raise AttributeError(f"'{thing}' is not a {AXIS_ATTRS[self.axis][:3]} attribute{self._where()}")
            return self._load(thing)
        if isinstance(thing, (tuple, list)) and all(isinstance(x, str) for x in thing) and thing:
            found = [self._load(x) for x in thing if x in self._names]
            if not found:
                return None
            if len(found) == 1:
                return found[0]
            dtypes = {f.dtype for f in found}
            if len(dtypes) > 1:
                raise AttributeError(f"Attributes {thing} must all have the same dtype to be stacked (got {sorted(map(str, dtypes))})")
            return np.column_stack(found)
        if _is_index(thing):
            return self._sliced(np.asarray(thing) if isinstance(thing, list) else thing)
        raise TypeError(f"cannot index attributes with {type(thing).__name__}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except AttributeError:
            raise AttributeError(f"'{name}' not found{self._where()}") from None

    def _where(self) -> str:
        return f" in {self.ds.filename}" if self.ds is not None else ""

    # -- writes ------------------------------------------------------------------

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"attribute names must be str, not {type(name).__name__}")
        check_name("Attribute", name, self.ds.filename if self.ds is not None else None)
        if self.ds is None:
            arr, _ = normalize_for_write(value, name)
            n = self._n()
            if n is not None and arr.shape[0] != n:
                raise ValueError(f"Attribute '{name}' must have exactly {n} values but {arr.shape[0]} were given")
            self._cache[name] = arr
            if name not in self._names:
                self._names.append(name)
            return
        self.ds._write_attr(self.axis, name, value)
        if name not in self._names:
            self._names.append(name)
        self._cache.pop(name, None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _INTERNAL:
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            return
        if self.ds is not None:
            self.ds._delete_attr(self.axis, name)
        self._names.remove(name)
        self._cache.pop(name, None)

    def __delattr__(self, name: str) -> None:
        del self[name]

    def _n(self) -> int | None:
        if self.ds is not None:
            return self.ds.shape[self.axis]
        for v in self._cache.values():
            return len(v)
        if self._names:
            return len(self[self._names[0]])
        return None

    def __repr__(self) -> str:
        kind = "Row" if self.axis == 0 else "Column"
        return f"<{kind} attributes: {', '.join(self._names)}>"

    def _permute(self, ordering: np.ndarray) -> None:
        for name in self.keys():
            self._cache[name] = self[name][ordering]
        object.__setattr__(self, "_parent", None)


class GlobalAttributeManager(NamedMapping):
    """``ds.attrs``: file-wide attributes (``/attrs`` datasets in spec 3, root HDF5 attributes before)."""

    def __init__(self, ds: LoomConnection | None, values: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "ds", ds)
        object.__setattr__(self, "_cache", dict(values or {}))
        names = list(values or {}) if ds is None else ds._global_names()
        object.__setattr__(self, "_names", names)






    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default  # noqa: SIM401 - this is get()

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise AttributeError(f"File has no global attribute '{name}'")
        if name not in self._cache:
            assert self.ds is not None
            self._cache[name] = self.ds._read_global(name)
        return self._cache[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self[name]

    def __setitem__(self, name: str, value: Any) -> None:
        check_name("Global attribute", name, self.ds.filename if self.ds is not None else None)
        if self.ds is not None:
            self.ds._write_global(name, value)
        self._cache[name] = scalar_text(value) if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) == 0 else np.asarray(value)
        if self.ds is not None:
            self._cache.pop(name, None)
        if name not in self._names:
            self._names.append(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("ds", "_cache", "_names"):
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            raise AttributeError(f"File has no global attribute '{name}'")
        if self.ds is not None:
            self.ds._delete_global(name)
        self._names.remove(name)
        self._cache.pop(name, None)

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __repr__(self) -> str:
        return f"<Global attributes: {', '.join(self._names)}>"


def warn_skipped(filename: str, path: str, why: str) -> None:
    warnings.warn(f"{filename}: skipped '{path}' ({why})", UserWarning, stacklevel=4)


def check_length(filename: str, path: str, length: int, n: int) -> None:
    if length != n:
        raise LoomFormatError(f"{filename}: attribute '{path}' has {length} values, expected {n}")


__all__ += ["check_length", "warn_skipped", "timestamp"]
