"""``ds.layers``: the main matrix and named layers, as lazy dask-backed layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._indexing import normalize_key
from dask_loom._lazy import issparse
from dask_loom.loom._common import NamedMapping, check_name

if TYPE_CHECKING:
    import dask.array as da
    import scipy.sparse as sp

    from dask_loom.loom._layerhost import LayerHost
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["LayerManager", "LoomLayer", "MemoryLoomLayer", "as_layer_dict"]


class LoomLayer:
    """A layer of a Loom file: numpy-style reads, lazy ``.dask``, graph-backed ``map``/``sparse``.

    Reads return numpy arrays (as loompy does), computed through task graphs
    that touch only the stored chunks a selection needs.  Indexing follows
    numpy with outer semantics: slices with any step, ints, negative indices,
    bool masks, integer lists in any order with duplicates, and index arrays
    on both axes at once.

    Parameters
    ----------
    name
        The layer (``""``: the main matrix).
    ds
        The connection it belongs to (loompy's ``layer.ds``).
    host
        What the layer uses of the connection (:class:`~dask_loom.loom._layerhost.LayerHost`);
        by default the connection's own.
    """

    def __init__(self, name: str, ds: LoomConnectionLike, *, host: LayerHost | None = None) -> None:
        self.name = name
        self.ds = ds
        # Everything below goes through the host, which stays valid when a write replaces the file.
        self._host = host if host is not None else ds.__dask_loom_layer_host__()

    @property
    def shape(self) -> tuple[int, int]:
        return self._host.shape(self.name)

    @property
    def dtype(self) -> str:
        """The stored dtype, as a string (``"float32"``), as in loompy."""
        return str(self._host.dtype(self.name))

    @property
    def ndim(self) -> int:
        return 2

    def _source(self) -> Any:
        # Asked for on each use, never kept: the file's current chunks.
        return self._host.source(self.name)

    def _where(self) -> str:
        return f"{self._host.filename}: layer '{self.name}'"

    def __getitem__(self, key: Any) -> np.ndarray:
        from dask_loom.ops._select import read_selection

        self._host.check_open()
        if key == () or key is Ellipsis:
            key = (slice(None), slice(None))
        sels = normalize_key(key, self.shape, where=self._where())
        return read_selection(self._source(), sels, **self._host.compute_kwargs())

    def __setitem__(self, key: Any, value: Any) -> None:
        self._host.write_region(self.name, key, value)

    def to_dask(self, *, chunks: Any = None, band_axis: int | None = None, sparse: bool = False) -> da.Array:
        """This layer as a dask array whose blocks are whole stored chunks.

        Parameters
        ----------
        chunks
            Any dask chunk specification; boundaries that would split stored
            chunks are rounded out (with a warning).
        band_axis
            ``0`` for full-width row bands, ``1`` for full-height column bands.
        sparse
            Blocks are ``scipy.sparse.csr_matrix`` (built from the decoded
            chunks, never a dense copy of the block); the array's ``meta`` is
            a CSR matrix, so anndata and scanpy treat it as sparse.
        """
        from dask_loom.blocks import from_source

        self._host.check_open()
        source = self._source()
        if sparse:
            from dask_loom._csr import CSRView

            source = CSRView(source)
        return from_source(source, chunks=chunks, band_axis=band_axis)

    @property
    def dask(self) -> da.Array:
        """The layer as a lazy, chunk-aligned dask array (default block plan)."""
        return self.to_dask()

    def sparse(self, rows: Any = None, cols: Any = None, dtype: Any = None) -> sp.coo_matrix:
        """The layer (or a selection of it) as ``scipy.sparse.coo_matrix``, built blockwise in parallel."""
        from dask_loom.ops import sparse as _sparse

        return _sparse(self._source(), rows=rows, cols=cols, dtype=dtype, **self._host.compute_kwargs())

    def map(
        self,
        f_list: list[Callable[[np.ndarray], Any] | str],
        axis: int = 0,
        chunksize: int = 1000,
        selection: np.ndarray | None = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """Apply functions to every row (``axis=0``) or column (``axis=1``); see :meth:`LoomConnection.map`.

        A thin call into :func:`dask_loom.map`.
        """
        from dask_loom.ops import map as _map

        return _map(self, f_list, axis=axis, chunksize=chunksize, selection=selection, **kwargs)

    def __dask_loom_source__(self, layer: str | None = None) -> Any:
        """This layer as ``dask_loom.map``/``aggregate``/``scan``/``permute`` read it (format ``loom``)."""
        from dask_loom.errors import OperationError
        from dask_loom.ops._sources import SourceInfo

        host = self._host
        if layer is not None and layer != self.name:
            raise OperationError(
                f"{host.filename}: layer={layer!r} given with layer '{self.name}'; pass the connection instead"
            )
        host.check_open()
        return SourceInfo.from_source(
            self._source(),
            format="loom",
            label=self._where(),
            compute=host.compute_kwargs(),
            permute=host.permute,
            read_only=host.read_only,
        )

    def last_modified(self) -> str:
        """Timestamp of the last write to this layer (``"now"`` if it has none)."""
        return self._host.timestamp(self.name)

    def __repr__(self) -> str:
        return f"<LoomLayer '{self.name}' shape={self.shape} dtype={self.dtype}>"


class MemoryLoomLayer:
    """A layer held in memory (in views and scans), with numpy indexing."""

    def __init__(self, name: str, matrix: Any) -> None:
        self.name = name
        if isinstance(matrix, MemoryLoomLayer):
            matrix = matrix.values
        self.values = np.asarray(matrix)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self) -> str:
        return str(self.values.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        sels = normalize_key(key, self.values.shape, where=f"layer '{self.name}'")
        out = self.values
        for ax, s in enumerate(sels):
            if s.kind == "range":
                out = out[(slice(None),) * ax + (slice(s.start, s.stop),)]
            elif s.kind != "int":
                out = np.take(out, s.positions(), axis=ax)
        ints = tuple(s.start if s.kind == "int" else slice(None) for s in sels)
        return out[ints]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.values[key] = value

    def sparse(self, rows: Any = None, cols: Any = None) -> sp.coo_matrix:
        import scipy.sparse as sp

        m = self.values
        if rows is not None:
            m = m[rows, :]
        if cols is not None:
            m = m[:, cols]
        return sp.coo_matrix(m)

    def permute(self, ordering: np.ndarray, *, axis: int) -> None:
        self.values = np.take(self.values, ordering, axis=axis)

    def __repr__(self) -> str:
        return f"<MemoryLoomLayer '{self.name}' shape={self.shape} dtype={self.dtype}>"


class LayerManager(NamedMapping):
    """``ds.layers``: ``""`` (the main matrix) first, then named layers.

    ``ds.layers["x"]`` (or ``ds.layers.x``, ``ds["x"]``) is a lazy
    :class:`LoomLayer`; ``ds.layers[rows, cols]`` reads every layer's selection
    into an in-memory manager of :class:`MemoryLoomLayer`.  A file's manager
    (*ds* given) uses only the connection's :class:`~dask_loom.loom._layerhost.LayerHost`;
    an in-memory one (``ds=None``, in views and scans) holds *values*.
    """

    def __init__(
        self, ds: LoomConnectionLike | None, values: dict[str, MemoryLoomLayer] | None = None
    ) -> None:
        object.__setattr__(self, "ds", ds)
        object.__setattr__(self, "_layers", dict(values or {}))
        host = ds.__dask_loom_layer_host__() if ds is not None else None
        object.__setattr__(self, "_host", host)
        object.__setattr__(self, "_names", host.names() if host is not None else list(values or {}))

    def __getitem__(self, thing: Any) -> Any:
        host = self._host
        if isinstance(thing, str):
            if thing not in self._names:
                where = f" in {host.filename}" if host is not None else ""
                raise KeyError(f"Layer '{thing}' not found{where}")
            if host is None:
                return self._layers[thing]
            return LoomLayer(thing, self.ds, host=host)
        if isinstance(thing, tuple) and len(thing) == 2:
            if host is None:
                return LayerManager(None, {k: MemoryLoomLayer(k, v[thing]) for k, v in self._layers.items()})
            arrays = host.read(self.keys(), thing)
            return LayerManager(None, {k: MemoryLoomLayer(k, v) for k, v in arrays.items()})
        raise TypeError(
            f"cannot index layers with {type(thing).__name__}; use a name or a (rows, cols) tuple"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(str(exc)) from None

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            raise TypeError("layer names must be str")
        host = self._host
        check_name("Layer", name, host.filename if host is not None else None, allow_empty=True)
        if host is None:
            self._layers[name] = MemoryLoomLayer(name, value)
        else:
            host.write_layer(name, value)
        if name not in self._names:
            self._names.append(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delitem__(self, name: str) -> None:
        if name == "":
            raise ValueError("Cannot delete the main matrix (layer '')")
        if name not in self._names:
            raise KeyError(f"Layer '{name}' not found")
        if self._host is not None:
            self._host.delete_layer(name)
        else:
            del self._layers[name]
        self._names.remove(name)

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __repr__(self) -> str:
        return f"<Layers: {', '.join(repr(n) for n in self._names)}>"

    def _permute(self, ordering: np.ndarray, *, axis: int) -> None:
        for layer in self._layers.values():
            layer.permute(ordering, axis=axis)


def as_layer_dict(layers: Any) -> dict[str, Any]:
    """Normalise what loompy accepts as layers (array, dict, ``LayerManager``) to a dict.

    Values become numpy arrays, scipy.sparse matrices or (for file-backed
    layers and dask input) lazy dask arrays.
    """
    if isinstance(layers, LayerManager):
        layers = {k: layers[k] for k in layers.keys()}
    elif not isinstance(layers, dict):
        layers = {"": layers}
    out = {}
    for k, v in layers.items():
        if isinstance(v, MemoryLoomLayer):
            v = v.values
        elif isinstance(v, LoomLayer):
            v = v.to_dask()
        elif not (issparse(v) or hasattr(v, "dask")):
            v = np.asarray(v)
        out[k] = v
    return out
