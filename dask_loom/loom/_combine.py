"""``combine`` and ``combine_faster``: new Loom files from several (loompy's functions).

Above the connection: both open the inputs with :func:`connect` and build the
output through a connection (``add_loom``) or the layer targets directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from typing import Any

import numpy as np

from dask_loom.blocks import from_source, plan_blocks, store
from dask_loom.loom._connection import connect
from dask_loom.loom._create import _spec, creating
from dask_loom.loom._modify import _put_attr_any, _take_rows
from dask_loom.loom._store import init_layout
from dask_loom.loom._write import LayerTarget, create_layer_array, default_chunks, is_zarr_writer
from dask_loom.storage._urls import check_scheme

__all__ = ["combine", "combine_faster"]


def combine(
    files: list[str | os.PathLike[str]],
    output_file: str | os.PathLike[str],
    key: str | None = None,
    file_attrs: dict[str, Any] | None = None,
    batch_size: int = 1000,
    convert_attrs: bool = False,
) -> None:
    """Concatenate Loom files along columns (loompy's ``combine``): a copy of the first file,
    then every other file appended with :func:`add_loom`.  Column attributes not present in
    every file are dropped; rows keep the first file's order (matched on *key*)."""
    if not files:
        raise ValueError("combine needs at least one input file")
    output_file = os.fspath(output_file)
    for f in (*files, output_file):
        check_scheme(os.fspath(f))  # combine copies local files: no URL of any scheme gets this far
    tmp = output_file + ".dask-loom-combine.tmp"
    try:
        shutil.copyfile(os.fspath(files[0]), tmp)
        with connect(tmp, "r+", validate=False) as ds:
            for f in files[1:]:
                ds.add_loom(f, key=key, batch_size=batch_size, convert_attrs=convert_attrs)
            for k, v in (file_attrs or {}).items():
                ds.attrs[k] = v
        from dask_loom.hdf5 import invalidate

        invalidate(tmp)
        os.replace(tmp, output_file)
        from dask_loom.storage import FileSpec
        from dask_loom.storage._locks import lock_path

        with contextlib.suppress(OSError):
            os.remove(lock_path(FileSpec.from_path(tmp)))
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def combine_faster(
    files: list[str | os.PathLike[str]],
    output_file: str | os.PathLike[str],
    file_attrs: dict[str, Any] | None = None,
    selections: list[np.ndarray | None] | None = None,
    key: str | None = None,
    skip_attrs: list[str] | None = None,
) -> None:
    """Combine Loom files with the same rows into a new file in one pass (loompy's ``combine_faster``).

    Layers missing from a file contribute zeros; column attributes missing from
    a file are filled with zeros (``"0"`` for strings, as loompy); rows are
    sorted by *key* when given; no graphs are copied.  Unlike loompy the
    inputs need not fit in memory.
    """
    skip = set(skip_attrs or [])
    conns = [connect(f, "r", validate=False) for f in files]
    try:
        if not conns:
            raise ValueError("combine_faster needs at least one input file")
        n = conns[0].shape[0]
        for c in conns:
            if c.shape[0] != n:
                raise ValueError(f"{c.filename} has {c.shape[0]} rows; all files must have {n}")
        sels = []
        for i, c in enumerate(conns):
            s = None if selections is None else selections[i]
            if s is None:
                s = np.arange(c.shape[1])
            else:
                s = np.asarray(s)
                s = np.flatnonzero(s) if s.dtype.kind == "b" else s.astype(np.int64)
            sels.append(s)
        total = sum(len(s) for s in sels)
        layer_dtypes: dict[str, Any] = {}
        for c in conns:
            for ln in c.layers.keys():
                dt = c.__dask_loom_layer_host__().dtype(ln)
                if ln in layer_dtypes and np.dtype(layer_dtypes[ln]) != np.dtype(dt):
                    raise ValueError(
                        f"{c.filename}: layer '{ln}' has dtype {dt}, another file {layer_dtypes[ln]}"
                    )
                layer_dtypes.setdefault(ln, dt)
        orders = [np.argsort(c.ra[key]) if key is not None else None for c in conns]
        ca_vals: dict[str, list[np.ndarray]] = {}
        ca_first: dict[str, np.ndarray] = {}
        for c in conns:
            for k in c.ca.keys():
                if k in skip:
                    continue
                v = c.ca[k]
                if k in ca_first and v.dtype.kind != ca_first[k].dtype.kind:
                    raise ValueError(
                        f"{c.filename}: column attribute '{k}' has dtype {v.dtype}, another file {ca_first[k].dtype}"
                    )
                ca_first.setdefault(k, v)
        for c, s in zip(conns, sels):
            for k, first in ca_first.items():
                if k in c.ca:
                    ca_vals.setdefault(k, []).append(np.asarray(c.ca[k])[s])
                else:
                    filler = np.full(
                        (len(s), *first.shape[1:]),
                        "0" if first.dtype.kind in "OUS" else 0,
                        dtype=object if first.dtype.kind in "OUS" else first.dtype,
                    )
                    ca_vals.setdefault(k, []).append(filler)
        ra: dict[str, np.ndarray] = {}
        for c, o in zip(conns, orders):
            for k in c.ra.keys():
                if k not in skip and k not in ra:
                    v = c.ra[k]
                    ra[k] = v if o is None else v[o]
        spec = _spec(output_file, None)
        with creating(spec) as w:
            init_layout(w, file_attrs)
            chunks = default_chunks((n, total), zarr=is_zarr_writer(w))
            for ln, dt in layer_dtypes.items():
                path = "matrix" if ln == "" else f"layers/{ln}"
                create_layer_array(w, path, (n, total), dt, chunks, fill=True)
                target = LayerTarget.on(w, path, f"{output_file}: layer '{ln}'")
                x = _combined_columns(conns, sels, orders, ln, dt, n)
                # Full-height column bands of whole chunks of the new layer.
                x = x.rechunk(plan_blocks((n, total), target.chunk_shape, target.dtype.itemsize, band_axis=1))
                store(x, target)
            for k, v in ra.items():
                _put_attr_any(w, 0, k, np.asarray(v), n=n)
            for k, parts in ca_vals.items():
                _put_attr_any(w, 1, k, np.concatenate(parts), n=total)
    finally:
        for c in conns:
            c.close(True)


def _combined_columns(
    conns: list[Any], sels: list[np.ndarray], orders: list[Any], layer: str, dtype: Any, n: int
) -> Any:
    """The selected columns of one layer of every file side by side, lazily (zeros where a file lacks the layer)."""
    import dask.array as da

    parts = []
    for conn, s, o in zip(conns, sels, orders):
        if layer not in conn.layers:
            parts.append(da.zeros((n, len(s)), dtype=dtype, chunks=(n, max(1, min(len(s), 4096)))))
            continue
        x = from_source(conn.__dask_loom_layer_host__().source(layer), band_axis=1)
        if not (len(s) == x.shape[1] and np.array_equal(s, np.arange(x.shape[1]))):
            x = x[:, s]
        if o is not None:
            x = x.map_blocks(functools.partial(_take_rows, order=np.asarray(o)), dtype=x.dtype)
        parts.append(x.astype(dtype))
    return da.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
