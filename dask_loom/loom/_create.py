"""``new`` and ``create``: writing new Loom files as loompy does (spec 3.0.0 layout).

A file is created as one transaction: everything is written into a new
temporary file that replaces any old file of that name at the end, so a
failed or interrupted ``create`` never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from dask_loom._lazy import issparse
from dask_loom.loom._common import check_name
from dask_loom.loom._layers import as_layer_dict
from dask_loom.loom._store import init_layout, put_attr
from dask_loom.loom._tree import is_zarr_spec
from dask_loom.storage import FileSpec

__all__ = ["create", "creating"]


def creating(spec: FileSpec) -> contextlib.AbstractContextManager[Any]:
    """A writer for a brand-new container at *spec*: a Zarr group for ``*.zarr``, else HDF5."""
    if is_zarr_spec(spec):
        from dask_loom.loom._zarrtree import ZarrTree

        return ZarrTree.creating(spec)
    from dask_loom.loom._tree import HDF5Tree

    return HDF5Tree.creating(spec)


def _spec(filename: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> FileSpec:
    if not isinstance(filename, str) or "://" not in filename:
        filename = os.path.expanduser(os.fspath(filename))
    return FileSpec.from_path(filename, storage_options)


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
    scheduler: Any = None,
    client: Any = None,
) -> None:
    """Create a Loom file from a matrix (or dict of layers) and attributes.

    Parameters
    ----------
    filename
        Target ``.loom`` (or ``.loom.zarr``); an existing file is replaced.
    layers
        A 2-D numpy array, scipy.sparse matrix or dask array (the main
        matrix), or a dict / ``LayerManager`` of them (must include ``""``).
        Every layer goes through :func:`dask_loom.store`: sparse input is
        densified one band at a time in the tasks, never whole; tasks
        compress the chunks in parallel and the single writer stores them.
    row_attrs, col_attrs
        Dicts (or attribute managers) of arrays with one value per row/column.
    file_attrs
        Global attributes.
    chunks
        Chunk shape of the layers (default ``(64, 64)``, as loompy).
    storage_options, scheduler, client
        fsspec options for URLs; where graphs run.

    Examples
    --------
    >>> import dask_loom, numpy as np, scipy.sparse as sp, tempfile, os
    >>> fn = os.path.join(tempfile.mkdtemp(), "eye.loom")
    >>> dask_loom.create(fn, sp.eye(100, 10, format="csr"), {"g": np.arange(100)}, {"c": np.arange(10)})
    >>> with dask_loom.connect(fn, "r") as ds:
    ...     print(ds.shape, ds[:, :].sum())
    (100, 10) 10.0
    """
    from dask_loom.loom._write import check_dtype, create_layer_array, default_chunks, fill_layer

    lay = as_layer_dict(layers)
    ra = _as_attrs(row_attrs)
    ca = _as_attrs(col_attrs)
    if "" not in lay:
        raise ValueError("Data for default layer must be provided (a layer named '')")
    shape = tuple(int(s) for s in lay[""].shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"The main matrix must be 2-D and non-empty, got shape {shape}")
    for k, v in lay.items():
        check_name("Layer", k, str(filename), allow_empty=True)
        if tuple(v.shape) != shape:
            raise ValueError(
                f"Layer '{k}' has shape {tuple(v.shape)}, but all layers must have shape {shape}"
            )
        check_dtype(v.dtype, f"{filename}: layer '{k}'")
    for axis, attrs in ((0, ra), (1, ca)):
        for k, v in attrs.items():
            n = 1 if np.isscalar(v) else len(np.ravel(v.toarray()) if issparse(v) else v)
            if n != shape[axis]:
                kind = "Row" if axis == 0 else "Column"
                raise ValueError(
                    f"{kind} attribute '{k}' must have exactly {shape[axis]} values but {n} were given"
                )
    spec = _spec(filename, storage_options)
    from dask_loom.loom._tree import is_zarr_spec

    chunks = default_chunks(shape, chunks, zarr=is_zarr_spec(spec))
    kw = {"scheduler": scheduler, "client": client}  # create has no connection yet
    with creating(spec) as w:
        init_layout(w, file_attrs)
        for k in ["", *[k for k in lay if k != ""]]:
            v = lay[k]
            path = "matrix" if k == "" else f"layers/{k}"
            create_layer_array(w, path, shape, v.dtype, chunks, sample=v)
            fill_layer(kw, w, path, v, where=f"{filename}: layer '{k}'")
        for axis, attrs in ((0, ra), (1, ca)):
            for k, v in attrs.items():
                put_attr(w, axis, k, v.toarray().ravel() if issparse(v) else v, n=shape[axis])
