"""``ds.row_graphs`` / ``ds.col_graphs``: graphs as ``scipy.sparse.coo_matrix``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.loom._common import NamedMapping, check_name

if TYPE_CHECKING:
    import scipy.sparse as sp

    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["GraphManager", "slice_graph"]


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
