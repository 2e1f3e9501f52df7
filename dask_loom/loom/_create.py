"""``new`` and ``create``: writing new Loom files as loompy does (spec 3.0.0 layout)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import scipy.sparse as sp

from dask_loom.loom._common import timestamp
from dask_loom.loom._connection import LoomConnection
from dask_loom.storage import FileSpec

__all__ = ["create", "new"]

LOOM_SPEC_VERSION = "3.0.0"


def _creator(spec: FileSpec) -> Any:
    from dask_loom.loom._connection import TREE_OPENERS

    for matches, factory in TREE_OPENERS:
        if matches(spec):
            return factory.creating(spec)  # type: ignore[attr-defined]
    from dask_loom.loom._tree import HDF5Tree

    return HDF5Tree.creating(spec)


def new(
    filename: str | os.PathLike[str],
    *,
    file_attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LoomConnection:
    """Create an empty Loom file and return an ``r+`` connection to it (shape ``(0, 0)``).

    Writes loompy's layout: ``/attrs`` (``LOOM_SPEC_VERSION = "3.0.0"``,
    ``CreationDate``), and the empty groups ``/layers``, ``/row_attrs``,
    ``/col_attrs``, ``/row_graphs``, ``/col_graphs``.  An existing file is
    replaced.  Use it as a context manager and fill it with
    :meth:`LoomConnection.add_columns`.
    """
    if not isinstance(filename, str) or "://" not in filename:
        filename = os.path.expanduser(os.fspath(filename))
    spec = FileSpec.from_path(filename, storage_options)
    with _creator(spec) as w:
        for g in ("attrs", "layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs"):
            w.create_group(g)
        w.create_array("attrs/LOOM_SPEC_VERSION", data=np.array(LOOM_SPEC_VERSION, dtype=object), strings=True, compression=None)
        w.create_array("attrs/CreationDate", data=np.array(timestamp(), dtype=object), strings=True, compression=None)
    ds = LoomConnection(filename, "r+", validate=False, storage_options=storage_options)
    ds._created = True
    for k, v in (file_attrs or {}).items():
        ds.attrs[k] = "None" if v is None else v
    return ds


def _as_layers(layers: Any) -> dict[str, Any]:
    from dask_loom.loom._layers import LayerManager

    if isinstance(layers, LayerManager):
        return {k: layers[k] for k in layers.keys()}
    if isinstance(layers, dict):
        return dict(layers)
    return {"": layers}


def _as_attrs(attrs: Any) -> dict[str, Any]:
    if attrs is None:
        return {}
    if hasattr(attrs, "items") and not isinstance(attrs, dict):
        return dict(attrs.items())
    return dict(attrs)


def create(
    filename: str | os.PathLike[str],
    layers: Any,
    row_attrs: Any,
    col_attrs: Any,
    *,
    file_attrs: dict[str, Any] | None = None,
    chunks: tuple[int, int] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Create a Loom file from a matrix (or dict of layers) and attributes.

    Parameters
    ----------
    filename
        Target ``.loom`` (or ``.loom.zarr``); an existing file is replaced.
    layers
        A 2-D numpy array, scipy.sparse matrix or dask array (the main
        matrix), or a dict / ``LayerManager`` of them (must include ``""``).
        Sparse input is written one column band at a time, never densified
        whole; dask input is written as a graph.
    row_attrs, col_attrs
        Dicts (or attribute managers) of arrays with one value per row/column.
    file_attrs
        Global attributes.
    chunks
        Chunk shape of the layers (default ``(64, 64)`` as loompy).

    Examples
    --------
    >>> import dask_loom, numpy as np, scipy.sparse as sp, tempfile, os
    >>> fn = os.path.join(tempfile.mkdtemp(), "eye.loom")
    >>> dask_loom.create(fn, sp.eye(100, 10, format="csr"), {"g": np.arange(100)}, {"c": np.arange(10)})
    >>> with dask_loom.connect(fn, "r") as ds:
    ...     print(ds.shape, ds[:, :].sum())
    (100, 10) 10.0
    """
    lay = _as_layers(layers)
    ra = _as_attrs(row_attrs)
    ca = _as_attrs(col_attrs)
    if "" not in lay:
        raise ValueError("Data for default layer must be provided (a layer named '')")
    main = lay[""]
    shape = tuple(int(s) for s in (main.shape if hasattr(main, "shape") else np.shape(main)))
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"The main matrix must be 2-D and non-empty, got shape {shape}")
    for k, v in lay.items():
        s = tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
        if tuple(s) != shape:
            raise ValueError(f"Layer '{k}' has shape {tuple(s)}, but all layers must have shape {shape}")
    for axis, attrs in ((0, ra), (1, ca)):
        for k, v in attrs.items():
            n = len(v) if not np.isscalar(v) else 1
            if n != shape[axis]:
                kind = "Row" if axis == 0 else "Column"
                raise ValueError(f"{kind} attribute '{k}' must have exactly {shape[axis]} values but {n} were given")
    ds = new(filename, file_attrs=file_attrs, storage_options=storage_options)
    try:
        from dask_loom.loom._write import write_layer

        write_layer(ds, "", lay[""], chunks=chunks)
        for k, v in lay.items():
            if k != "":
                write_layer(ds, k, v, chunks=chunks)
        for k, v in ra.items():
            ds.ra[k] = _values(v)
        for k, v in ca.items():
            ds.ca[k] = _values(v)
        ds.close(True)
    except BaseException:
        ds.close(True)
        spec = FileSpec.from_path(os.fspath(filename), storage_options)
        if spec.is_local:
            with contextlib.suppress(OSError):
                if os.path.isdir(spec.url):
                    import shutil

                    shutil.rmtree(spec.url)
                else:
                    os.remove(spec.url)
        raise


def _values(v: Any) -> Any:
    if sp.issparse(v):
        return v.toarray().ravel()
    return v
