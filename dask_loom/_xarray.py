"""Loom files, OME-Arrow views and their chunk sources as ``xarray.Dataset`` objects.

Two routes build the same Dataset layout:

* ``xr.open_dataset(path, engine="loom")`` (see :mod:`dask_loom.xarray_backend`):
  layers are wrapped in :class:`LoomBackendArray`, xarray's lazily indexed
  backend arrays; ``chunks={}`` turns them into dask arrays whose blocks are
  exactly the stored chunks (``encoding["preferred_chunks"]``);
* :meth:`LoomConnection.to_xarray` puts the layers' own chunk-aligned dask
  arrays (task prefix ``loom-read``) in the Dataset directly.

Layout: one data variable per layer over ``(row_dim, col_dim)`` (the main
matrix is called ``"matrix"``), 1-D row/column attributes as coordinates,
multi-dimensional attributes as variables with extra dims
``"<name>_dim1"``…, compound (structured) attributes as a variable over
``"<name>_field"`` when every field has one dtype (else one coordinate per
field, ``"<name>.<field>"``), and the global attributes as ``Dataset.attrs``.
Names that would clash (a layer and an attribute, a row and a column
attribute, an attribute named like a dimension) get a ``row_``/``col_``
prefix.  Graphs are not part of the Dataset (read them with
``ds.row_graphs``/``ds.col_graphs``).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from xarray.backends.common import BackendArray
from xarray.core import indexing

from dask_loom._doors import provides

if TYPE_CHECKING:
    from dask_loom.loom._connection import LoomConnection

__all__ = [
    "LoomBackendArray",
    "MAIN_LAYER",
    "can_open",
    "loom_to_xarray",
    "open_loom_dataset",
    "tensor_to_xarray",
]

#: Variable name of the main matrix (loompy's layer ``""``).
MAIN_LAYER = "matrix"

_SUFFIXES = (".loom", ".loom.zarr")


def can_open(filename_or_obj: Any) -> bool:
    """True for a path or URL ending in ``.loom`` or ``.loom.zarr`` (or an open connection).

    Examples
    --------
    >>> can_open("cortex.loom"), can_open("s3://bucket/x.loom.zarr/"), can_open("x.zarr"), can_open(3)
    (True, True, False, False)
    """
    from dask_loom.loom._connection import LoomConnection

    if isinstance(filename_or_obj, LoomConnection):
        return True
    if isinstance(filename_or_obj, (str, os.PathLike)):
        name = os.fspath(filename_or_obj)
        if isinstance(name, bytes):
            return False
        return name.rstrip("/").lower().endswith(_SUFFIXES)
    return False


# --------------------------------------------------------------------------- lazy backend array


def _in_worker_thread() -> bool:
    # dask runs tasks (threaded scheduler and distributed workers alike) off
    # the main thread; a read there must not start another parallel compute.
    return threading.current_thread() is not threading.main_thread()


class LoomBackendArray(BackendArray):
    """A Loom layer as xarray's lazily indexed backend array.

    Holds only the layer's chunk source (a small picklable spec: file URL,
    dataset path, chunk index), never an open handle, so Datasets pickle to
    distributed workers.  Reads support outer indexing (ints, slices with any
    step, and 1-D integer arrays in any order on every axis) and touch only
    the stored chunks a selection needs.

    Parameters
    ----------
    source
        A chunk source (see :mod:`dask_loom.blocks`).
    """

    __slots__ = ("dtype", "shape", "source")

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shape = tuple(int(s) for s in source.shape)
        self.dtype = np.dtype(source.dtype)

    def __getitem__(self, key: Any) -> Any:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem
        )

    def _raw_getitem(self, key: tuple[Any, ...]) -> np.ndarray:
        return read_outer(self.source, key)

    def __reduce__(self) -> Any:
        return (LoomBackendArray, (self.source,))

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("LoomBackendArray", tokenize(self.source))

    def __repr__(self) -> str:
        return (
            f"LoomBackendArray({getattr(self.source, 'label', '?')}, shape={self.shape}, dtype={self.dtype})"
        )


def read_outer(source: Any, key: tuple[Any, ...]) -> np.ndarray:
    """Read an outer selection (ints, slices, 1-D integer arrays per axis) from a chunk source.

    A selection of plain slices and ints that fits one block is read with
    one ``read_block`` call here; anything else goes through
    :func:`dask_loom.ops._select.read_selection`, which reads only the
    stored chunks holding selected positions (in parallel, unless this
    already runs inside a dask task).
    """
    from dask_loom._config import block_size_bytes
    from dask_loom._indexing import normalize_key
    from dask_loom.ops._select import read_selection

    shape = tuple(int(s) for s in source.shape)
    dtype = np.dtype(source.dtype)
    plain = all(
        isinstance(k, (int, np.integer)) or (isinstance(k, slice) and k.step in (None, 1)) for k in key
    )
    if plain:
        region = []
        for k, n in zip(key, shape):
            if isinstance(k, slice):
                start, stop, _ = k.indices(n)
                region.append(slice(start, max(start, stop)))
            else:
                i = int(k) % n
                region.append(slice(i, i + 1))
        sizes = [r.stop - r.start for r in region]
        nbytes = math.prod(sizes) * max(1, dtype.itemsize)
        if 0 in sizes:
            out = np.empty(sizes, dtype=dtype)
        elif _in_worker_thread() or nbytes <= block_size_bytes():
            out = np.asarray(source.read_block(tuple(region)))
        else:
            out = None
        if out is not None:
            drop = tuple(i for i, k in enumerate(key) if not isinstance(k, slice))
            return out.squeeze(axis=drop) if drop else out
    sels = normalize_key(tuple(key), shape, where=getattr(source, "label", "loom layer"))
    kw: dict[str, Any] = {"scheduler": "sync"} if _in_worker_thread() else {}
    return np.asarray(read_selection(source, sels, **kw))


# --------------------------------------------------------------------------- Dataset building


def _unique(name: str, taken: set[str], prefix: str) -> str:
    out = name
    while out in taken:
        out = f"{prefix}_{out}"
    taken.add(out)
    return out


def _attr_variables(
    name: str, values: np.ndarray, dim: str, taken: set[str], prefix: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(coords, data_vars)`` for one row or column attribute."""
    coords: dict[str, Any] = {}
    data_vars: dict[str, Any] = {}
    values = np.asarray(values)
    if values.dtype.names:  # compound dtype (SCope's Embedding, RegulonsAUC …)
        fields = list(values.dtype.names)
        kinds = {values.dtype.fields[f][0] for f in fields}
        if len(kinds) == 1 and values.ndim == 1:
            from numpy.lib import recfunctions

            key = _unique(name, taken, prefix)
            fdim = _unique(f"{key}_field", taken, prefix)
            data_vars[key] = ((dim, fdim), recfunctions.structured_to_unstructured(values))
            coords[fdim] = (fdim, np.array(fields, dtype=object))
        else:
            for f in fields:
                sub = values[f]
                c, d = _attr_variables(f"{name}.{f}", sub, dim, taken, prefix)
                coords.update(c)
                data_vars.update(d)
        return coords, data_vars
    if values.dtype.kind == "O" and values.size and all(isinstance(v, str) for v in values.flat):
        # Fixed-width text: dask can size it, so chunks="auto" works on these coordinates too.
        values = values.astype(str)
    key = _unique(name, taken, prefix)
    if values.ndim == 1:
        coords[key] = (dim, values)
    else:
        extra = tuple(_unique(f"{key}_dim{i}", taken, prefix) for i in range(1, values.ndim))
        data_vars[key] = ((dim, *extra), values)
    return coords, data_vars


def _global_value(v: Any) -> Any:
    if isinstance(v, np.ndarray) and v.dtype.kind == "O":
        return [str(x) for x in v.ravel()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def build_dataset(
    conn: LoomConnection,
    *,
    row_dim: str = "gene",
    col_dim: str = "cell",
    layers: Iterable[str] | None = None,
    drop_variables: Iterable[str] | None = None,
    lazy: str = "backend",
    chunks: Any = None,
) -> xr.Dataset:
    """The Dataset of an open connection.

    ``lazy="backend"`` wraps layers in :class:`LoomBackendArray` (for xarray's
    ``open_dataset``); ``lazy="dask"`` uses the layers' chunk-aligned dask
    arrays with *chunks*.
    """
    from dask_loom.errors import ElementNotFoundError

    if row_dim == col_dim:
        raise ValueError(f"row_dim and col_dim must differ, both are {row_dim!r}")
    host = conn.__dask_loom_layer_host__()
    host.check_open()
    drop = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
    names = conn.layers.keys()
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in wanted if n not in names and not (n == MAIN_LAYER and "" in names)]
        if missing:
            raise ElementNotFoundError(f"{conn.filename}: no layer {missing[0]!r} (layers: {names})")
        names = [n for n in names if n in wanted or (n == "" and MAIN_LAYER in wanted)]
    taken: set[str] = {row_dim, col_dim}
    data_vars: dict[str, Any] = {}
    for layer in names:
        vname = MAIN_LAYER if layer == "" else layer
        if vname in drop:
            continue
        vname = _unique(vname, taken, "layer")
        source = host.source(layer)
        unit = tuple(
            max(1, min(int(c), int(s))) if s else 1 for c, s in zip(source.chunk_shape, source.shape)
        )
        encoding = {"preferred_chunks": {row_dim: unit[0], col_dim: unit[1]}}
        if lazy == "dask":
            data: Any = conn.layers[layer].to_dask(chunks=chunks)
        else:
            data = indexing.LazilyIndexedArray(LoomBackendArray(source))
        var = xr.Variable((row_dim, col_dim), data, attrs={"loom_layer": layer}, encoding=encoding)
        data_vars[vname] = var
    coords: dict[str, Any] = {}
    for axis, dim, prefix in ((0, row_dim, "row"), (1, col_dim, "col")):
        attrs = conn.ra if axis == 0 else conn.ca
        for name in attrs.keys():
            if name in drop:
                continue
            c, d = _attr_variables(name, attrs[name], dim, taken, prefix)
            coords.update(c)
            data_vars.update(d)
    gattrs = {k: _global_value(conn.attrs[k]) for k in conn.attrs.keys()}
    gattrs["loom_file"] = conn.filename
    return xr.Dataset(data_vars, coords=coords, attrs=gattrs)


def open_loom_dataset(
    filename_or_obj: Any,
    *,
    drop_variables: Iterable[str] | None = None,
    row_dim: str = "gene",
    col_dim: str = "cell",
    layers: Iterable[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    validate: bool = False,
) -> xr.Dataset:
    """What ``xr.open_dataset(..., engine="loom")`` runs (see :class:`~dask_loom.xarray_backend.LoomBackendEntrypoint`)."""
    from dask_loom.loom._connection import LoomConnection, connect

    if isinstance(filename_or_obj, LoomConnection):
        return build_dataset(
            filename_or_obj, row_dim=row_dim, col_dim=col_dim, layers=layers, drop_variables=drop_variables
        )
    if not isinstance(filename_or_obj, (str, os.PathLike)):
        raise TypeError(
            f"engine='loom' opens a path or URL of a .loom / .loom.zarr (or a LoomConnection), not {type(filename_or_obj).__name__}"
        )
    conn = connect(filename_or_obj, "r", validate=validate, storage_options=storage_options)
    try:
        ds = build_dataset(
            conn, row_dim=row_dim, col_dim=col_dim, layers=layers, drop_variables=drop_variables
        )
    except BaseException:
        conn.close(True)
        raise
    ds.set_close(_Closer(conn))
    return ds


class _Closer:
    """``Dataset.close()`` closes the connection; a pickled copy (on a worker) closes nothing."""

    def __init__(self, conn: LoomConnection | None) -> None:
        self.conn = conn

    def __call__(self) -> None:
        if self.conn is not None:
            self.conn.close(True)

    def __reduce__(self) -> Any:
        return (_Closer, (None,))


@provides("loom", "xarray")
def loom_to_xarray(
    conn: LoomConnection,
    *,
    row_dim: str = "gene",
    col_dim: str = "cell",
    layers: Iterable[str] | None = None,
    chunks: Any = None,
) -> xr.Dataset:
    """See :meth:`dask_loom.LoomConnection.to_xarray`."""
    return build_dataset(conn, row_dim=row_dim, col_dim=col_dim, layers=layers, lazy="dask", chunks=chunks)


# --------------------------------------------------------------------------- OME-Arrow views

_DIM_NAMES = {"T": "t", "Z": "z", "C": "c", "H": "y", "W": "x"}


@provides("tensor", "xarray")
def tensor_to_xarray(view: Any, *, chunks: Any = None, name: str | None = None) -> xr.DataArray:
    """See :meth:`dask_loom.TensorView.to_xarray`."""
    data = view.to_dask(chunks=chunks)
    meta = view.meta
    sel = view._sel
    x0, y0, w, h = sel.roi
    phys = dict(meta.physical_size)
    names = meta.channel_names
    channels = list(view._channels())

    def spatial(axis: str, start: int, n: int) -> tuple[np.ndarray, dict[str, Any]]:
        idx = np.arange(start, start + n)
        size = phys.get(f"physical_size_{axis}")
        if size is None:
            return idx, {"units": "pixel"}
        unit = phys.get(f"physical_size_{axis}_unit")
        return idx * float(size), {"units": str(unit) if unit else "", "physical_size": float(size)}

    per_axis: dict[str, tuple[Any, dict[str, Any]]] = {
        "T": (np.asarray(sel.t, dtype=np.int64), {}),
        "Z": (np.asarray(sel.z, dtype=np.int64), {}),
        "C": (np.array([names[c] if c < len(names) else f"C{c}" for c in channels], dtype=object), {}),
        "H": spatial("y", y0, h),
        "W": spatial("x", x0, w),
    }
    zsize = phys.get("physical_size_z")
    if zsize is not None:
        unit = phys.get("physical_size_z_unit")
        per_axis["Z"] = (
            np.asarray(sel.z, dtype=np.int64) * float(zsize),
            {"units": str(unit) if unit else "", "physical_size": float(zsize)},
        )
    layout = view.layout
    dims = tuple(_DIM_NAMES[d] for d in layout)
    coords: dict[str, Any] = {}
    for letter, (values, attrs) in per_axis.items():
        dim = _DIM_NAMES[letter]
        if letter in layout:
            coords[dim] = xr.Variable((dim,), values, attrs=attrs)
        elif len(values) == 1:  # a dropped singleton axis stays as a scalar coordinate
            coords[dim] = xr.Variable((), values[0], attrs=attrs)
    if "c" in coords and "C" in layout:
        coords["c_index"] = (("c",), np.asarray(channels, dtype=np.int64))
    attrs = {
        k: v
        for k, v in {
            "name": meta.name,
            "image_id": meta.image_id,
            "source": view.image.label,
            "layout": layout,
            "dimension_order": meta.dimension_order,
        }.items()
        if v is not None
    }
    return xr.DataArray(data, dims=dims, coords=coords, attrs=attrs, name=name or meta.name or "image")
