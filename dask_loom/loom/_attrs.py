"""``ds.ra`` / ``ds.ca`` / ``ds.attrs``: attribute managers, file-backed or in memory."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from dask_loom.errors import LoomFormatError
from dask_loom.loom._common import (
    AXIS_ATTRS,
    NamedMapping,
    check_name,
    global_value,
    is_spec3,
    read_spec_version,
    scalar_text,
    timestamp,
)
from dask_loom.loom._values import materialize, normalize_for_write

if TYPE_CHECKING:
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["AttributeManager", "GlobalAttributeManager", "hold_in_memory"]

_INTERNAL = ("ds", "axis", "_names", "_cache", "_parent", "_index", "_length")


def _is_index(thing: Any) -> bool:
    """Slices, ints, integer/bool arrays and lists of them select positions (not names)."""
    if isinstance(thing, (slice, int, np.integer)) and not isinstance(thing, bool):
        return True
    if isinstance(thing, np.ndarray):
        return thing.dtype.kind in "biu"
    return (
        isinstance(thing, list)
        and bool(thing)
        and all(isinstance(x, (int, np.integer, bool, np.bool_)) for x in thing)
    )


def _take(values: np.ndarray, index: Any) -> Any:
    """*values* at *index*; an integer drops the axis (numpy's rule, and loompy's ``ds.ra[5]["Gene"]``)."""
    out = values[index]
    if isinstance(out, str) and not isinstance(out, np.str_):
        # Our string attributes are object arrays; loompy's are unicode arrays,
        # whose elements are numpy.str_ (a str subclass).
        return np.str_(out)
    return out


class AttributeManager(NamedMapping):
    """Row or column attributes: dict-like and attribute access.

    File-backed managers (``ds.ra``, ``ds.ca``) read each attribute on first
    access and cache it; in-memory managers (views, scans, ``ds.ca[10:20]``)
    hold arrays or slice a parent's attributes lazily, on first access.

    Indexing with a name returns the array; with a tuple of names, the found
    ones stacked as columns; with a slice, int, bool mask or integer array
    (or list), a new in-memory manager with every attribute sliced.
    """

    def __init__(
        self, ds: LoomConnectionLike | None, *, axis: int, values: dict[str, np.ndarray] | None = None
    ) -> None:
        object.__setattr__(self, "ds", ds)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "_cache", dict(values or {}))
        object.__setattr__(self, "_parent", None)
        object.__setattr__(self, "_index", None)
        object.__setattr__(self, "_length", None)
        if ds is not None and not hasattr(ds, "_attr_names"):
            ds = _LoompyOwner(ds)  # loompy's contract: any object with ``_file`` and ``shape``
            object.__setattr__(self, "ds", ds)
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

    def get(self, name: str, default: np.ndarray) -> Any:
        """The attribute *name*, or *default* when there is none.

        As in loompy, *default* is required and must be a numpy array with one
        value per row (column): anything else, ``None`` included, raises
        ``ValueError``.
        """
        if name in self:
            return self[name]
        n = self._n()
        if not isinstance(default, np.ndarray):
            raise ValueError(f"Default must be an np.ndarray with exactly {n} values")
        if n is not None and (default.ndim == 0 or default.shape[0] != n):
            got = default.shape[0] if default.ndim else 0
            raise ValueError(f"Default must be an np.ndarray with exactly {n} values but {got} were given")
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
                raise AttributeError(
                    f"'{thing}' is not a {AXIS_ATTRS[self.axis][:3]} attribute{self._where()}"
                )
            return self._load(thing)
        if isinstance(thing, (tuple, list)) and all(isinstance(x, str) for x in thing) and thing:
            found = [self._load(x) for x in thing if x in self._names]
            if not found:
                return None
            if len(found) == 1:
                return found[0]
            dtypes = {f.dtype for f in found}
            if len(dtypes) > 1:
                raise AttributeError(
                    f"Attributes {thing} must all have the same dtype to be stacked (got {sorted(map(str, dtypes))})"
                )
            return np.column_stack(found)
        if _is_index(thing):
            return self._sliced(np.asarray(thing) if isinstance(thing, list) else thing)
        raise TypeError(f"cannot index attributes with {type(thing).__name__}")

    def __getattr__(self, name: str) -> Any:
        if (
            name.startswith("__") or name in _INTERNAL
        ):  # internals not set yet (a failed __init__): no recursion
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
                raise ValueError(
                    f"Attribute '{name}' must have exactly {n} values but {arr.shape[0]} were given"
                )
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
        if isinstance(self._index, (int, np.integer)):
            return None  # one row (column): the values are scalars
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


def hold_in_memory(attrs: AttributeManager, name: str, values: np.ndarray) -> None:
    """Give *attrs* an attribute *name* with *values* in memory only, without writing it to the file.

    ``add_loom`` uses it to show the file's differing global attributes as
    columns before it merges.  A function rather than a method: a method name
    would hide an attribute of that name from ``ds.ca.<name>``.
    """
    attrs._cache[name] = values
    if name not in attrs._names:
        attrs._names.append(name)


class GlobalAttributeManager(NamedMapping):
    """``ds.attrs``: file-wide attributes (``/attrs`` datasets in spec 3, root HDF5 attributes before).

    Built by a connection, from a dict of values (in memory), or, as loompy's
    ``GlobalAttributeManager(f)``, from an open ``h5py.File`` (reads and
    writes go to that file).
    """

    def __init__(
        self, ds: LoomConnectionLike | h5py.Group | None, values: dict[str, Any] | None = None
    ) -> None:
        if isinstance(ds, h5py.Group):  # loompy's constructor takes the open h5py file
            ds = _H5Globals(ds)
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
        if name.startswith("__") or name in ("ds", "_cache", "_names"):
            raise AttributeError(name)
        return self[name]

    def __setitem__(self, name: str, value: Any) -> None:
        check_name("Global attribute", name, self.ds.filename if self.ds is not None else None)
        if self.ds is not None:
            self.ds._write_global(name, value)
        self._cache[name] = (
            scalar_text(value)
            if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) == 0
            else np.asarray(value)
        )
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


class _H5Backed:
    """Reads and writes of loompy's managers over an open h5py file (the objects loompy's constructors take)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.filename = str(getattr(f, "filename", "") or "")

    def _h5(self) -> h5py.Group:
        if not isinstance(self._f, h5py.Group):
            raise TypeError(
                f"cannot write through a {type(self._f).__name__}; loompy-style managers write to an h5py.File"
            )
        return self._f

    def _spec(self) -> str:
        if not isinstance(self._f, h5py.Group):
            return "3.0.0"
        from dask_loom.loom._tree import HDF5Writer

        return read_spec_version(HDF5Writer(self._f))

    @contextlib.contextmanager
    def _writer(self) -> Iterator[Any]:
        from dask_loom.loom._tree import HDF5Writer

        f = self._h5()
        yield HDF5Writer(f)
        f.flush()


class _LoompyOwner(_H5Backed):
    """A loompy-style attribute owner: an object with ``_file`` (an h5py file, or a mapping laid out as one) and ``shape``."""

    def __init__(self, owner: Any) -> None:
        if not hasattr(owner, "_file") or not hasattr(owner, "shape"):
            raise TypeError(
                f"AttributeManager needs a Loom connection (an object with '_file' and 'shape'), not {type(owner).__name__}"
            )
        super().__init__(owner._file)
        self._owner = owner
        self.filename = self.filename or str(getattr(owner, "filename", "") or "")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._owner.shape)  # type: ignore[return-value]

    def _group(self, axis: int) -> Any:
        return self._f[f"/{AXIS_ATTRS[axis]}/"]

    def _attr_names(self, axis: int) -> list[str]:
        return list(self._group(axis).keys())

    def _read_attr(self, axis: int, name: str) -> np.ndarray:
        node = self._group(axis)[name]
        if isinstance(node, h5py.Dataset):
            from dask_loom.loom._tree import _h5_info

            info = _h5_info(node)
            return materialize(node[()], kind=info.kind, enum=info.enum, spec=self._spec())
        return materialize(np.asarray(node[:]), spec=self._spec())

    def _write_attr(self, axis: int, name: str, value: Any) -> None:
        from dask_loom.loom._store import put_attr

        with self._writer() as w:
            spec = self._spec()
            put_attr(w, axis, name, value, n=self.shape[axis], spec3=is_spec3(spec) or spec == "0.0.0")

    def _delete_attr(self, axis: int, name: str) -> None:
        with self._writer() as w:
            w.delete(f"{AXIS_ATTRS[axis]}/{name}")


class _H5Globals(_H5Backed):
    """Global attributes of an open h5py file: ``/attrs`` datasets (spec 3) or root HDF5 attributes."""

    def _in_group(self) -> bool:
        return isinstance(self._f.get("attrs"), h5py.Group)

    def _global_names(self) -> list[str]:
        return list(self._f["attrs"].keys()) if self._in_group() else list(self._f.attrs.keys())

    def _read_global(self, name: str) -> Any:
        if self._in_group():
            from dask_loom.loom._tree import _h5_dataset

            value = _h5_dataset(self._f, f"attrs/{name}")[()]
        else:
            value = self._f.attrs[name]
        return global_value(value, self._spec())

    def _write_global(self, name: str, value: Any) -> None:
        from dask_loom.loom._store import put_global

        in_group = self._in_group() or is_spec3(self._spec())
        with self._writer() as w:
            put_global(w, name, value, in_group=in_group)

    def _delete_global(self, name: str) -> None:
        in_group = self._in_group()
        with self._writer() as w:
            if in_group:
                w.delete(f"attrs/{name}")
            else:
                w.del_attr("/", name)


def warn_skipped(filename: str, path: str, why: str) -> None:
    warnings.warn(f"{filename}: skipped '{path}' ({why})", UserWarning, stacklevel=4)


def check_length(filename: str, path: str, length: int, n: int) -> None:
    if length != n:
        raise LoomFormatError(f"{filename}: attribute '{path}' has {length} values, expected {n}")


__all__ += ["check_length", "warn_skipped", "timestamp"]
