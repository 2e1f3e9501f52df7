"""``ds.row_graphs`` / ``ds.col_graphs``: graphs as ``scipy.sparse.coo_matrix``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.errors import LoomFormatError
from dask_loom.loom._common import NamedMapping, check_name

if TYPE_CHECKING:
    import scipy.sparse as sp

    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["GraphManager", "graph_matrix", "slice_graph"]


def slice_graph(g: sp.coo_matrix, index: Any, n: int) -> sp.coo_matrix:
    """Keep the edges between selected nodes, numbered by position in *index*.

    Vectorised (sparse fancy indexing), and consistent with the sliced
    attributes for any order of *index*, duplicates included.  For sorted
    indices this equals loompy's result; loompy renumbers by sorted order even
    when *index* is not sorted.
    """
    if isinstance(index, slice):
        idx = np.arange(n)[index]
    elif isinstance(index, (int, np.integer)):
        idx = np.array([int(index)])
    else:
        idx = np.asarray(index)
        if idx.dtype.kind == "b":
            idx = np.flatnonzero(idx)
    m = g.tocsr()[idx][:, idx]
    return m.tocoo()


class GraphManager(NamedMapping):
    """Dict-like access to the graphs along one axis (file-backed or in memory)."""

    def __init__(self, ds: LoomConnectionLike | None, *, axis: int, values: dict[str, sp.coo_matrix] | None = None) -> None:
        object.__setattr__(self, "ds", ds)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "_cache", dict(values or {}))
        object.__setattr__(self, "_parent", None)
        object.__setattr__(self, "_index", None)
        object.__setattr__(self, "_n", None)
        names = list(values or {}) if ds is None else ds._graph_names(axis)
        object.__setattr__(self, "_names", names)






    def _load(self, name: str) -> sp.coo_matrix:
        if name not in self._cache:
            if self._parent is not None:
                self._cache[name] = slice_graph(self._parent[name], self._index, self._parent._size())
            elif self.ds is not None:
                self._cache[name] = self.ds._read_graph(self.axis, name)
            else:
                raise AttributeError(f"'{name}' not found")
        return self._cache[name]

    def _size(self) -> int:
        if self.ds is not None:
            return self.ds.shape[self.axis]
        if self._n is not None:
            return self._n
        for name in self._names:
            return self[name].shape[0]
        return 0

    def __getitem__(self, thing: Any) -> Any:
        if isinstance(thing, str):
            if thing not in self._names:
                raise AttributeError(f"'{thing}' is not a {'row' if self.axis == 0 else 'column'} graph")
            return self._load(thing)
        if isinstance(thing, tuple) and all(isinstance(x, str) for x in thing):
            for x in thing:
                if x in self._names:
                    return self._load(x)
            return None
        if isinstance(thing, (slice, int, np.integer, np.ndarray, list)):
            m = GraphManager(None, axis=self.axis)
            object.__setattr__(m, "_names", list(self._names))
            object.__setattr__(m, "_parent", self)
            object.__setattr__(m, "_index", np.asarray(thing) if isinstance(thing, list) else thing)
            n = len(np.arange(self._size())[thing]) if not isinstance(thing, (int, np.integer)) else 1
            object.__setattr__(m, "_n", n)
            return m
        raise TypeError(f"cannot index graphs with {type(thing).__name__}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except AttributeError:
            raise AttributeError(f"'{name}' not found") from None

    def __setitem__(self, name: str, value: Any) -> None:
        import scipy.sparse as sp

        check_name("Graph", name, self.ds.filename if self.ds is not None else None)
        g = sp.coo_matrix(value)
        n = self._size()
        if g.shape != (n, n):
            raise ValueError(f"Adjacency matrix shape for graph '{name}' must be ({n},{n}) but shape was {g.shape}")
        if self.ds is not None:
            self.ds._write_graph(self.axis, name, g)
            self._cache.pop(name, None)
        else:
            self._cache[name] = g
        if name not in self._names:
            self._names.append(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            return
        if self.ds is not None:
            self.ds._delete_graph(self.axis, name)
        self._names.remove(name)
        self._cache.pop(name, None)

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __repr__(self) -> str:
        return f"<{'Row' if self.axis == 0 else 'Column'} graphs: {', '.join(self._names)}>"

    def _permute(self, ordering: np.ndarray) -> None:
        for name in self.keys():
            self._cache[name] = slice_graph(self[name], ordering, self._size())


def graph_matrix(filename: str, path: str, a: np.ndarray, b: np.ndarray, w: np.ndarray, n: int) -> sp.coo_matrix:
    """The graph stored at *path* (its ``a``, ``b``, ``w`` vectors) as an ``n`` x ``n`` COO matrix, checked.

    Float node indices holding integers are read as int64 with a warning (some
    writers store them so); anything else outside the spec is a
    :class:`~dask_loom.errors.LoomFormatError` naming the file.
    """
    import scipy.sparse as sp

    if not (len(a) == len(b) == len(w)):
        raise LoomFormatError(f"{filename}: graph '{path}' has a, b, w of different lengths ({len(a)}, {len(b)}, {len(w)})")
    out = []
    for k, v in (("a", a), ("b", b)):
        if v.dtype.kind == "f":
            if len(v) and (not np.all(np.isfinite(v)) or np.any(v != np.round(v))):
                raise LoomFormatError(f"{filename}: graph index '{path}/{k}' is {v.dtype} with non-integer values")
            warnings.warn(
                f"{filename}: graph index '{path}/{k}' is stored as {v.dtype} (the spec requires integers); read as int64",
                UserWarning,
                stacklevel=5,
            )
            v = v.astype(np.int64)
        elif v.dtype.kind not in "iu":
            raise LoomFormatError(f"{filename}: graph index '{path}/{k}' has dtype {v.dtype}, not integer")
        if len(v) and (v.min() < 0 or v.max() >= n):
            hint = " (they look 1-based, as some R writers store them)" if v.min() >= 1 and v.max() == n else ""
            raise LoomFormatError(f"{filename}: graph '{path}/{k}' holds node indices outside 0..{n - 1}{hint}")
        out.append(v)
    return sp.coo_matrix((w, (out[0], out[1])), shape=(n, n))
