"""Writing layers: whole layers (numpy, scipy.sparse, dask) and regions.

A whole layer is written beside the old one (``layers/.tmp-<name>``) and the
names are swapped at the end, so a crash leaves the old layer (decision 4).
Data arrive in bands of whole stored chunks: scipy.sparse input is densified
one column band at a time, dask input is computed block by block and written
by tasks that hold the file's write lock one at a time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from dask_loom._config import block_size_bytes, get_config
from dask_loom._indexing import normalize_key
from dask_loom.blocks import plan_blocks, selection_bands

if TYPE_CHECKING:
    from dask_loom.loom._connection import LoomConnection

__all__ = ["check_values", "default_chunks", "write_layer", "write_layer_region"]


def default_chunks(shape: tuple[int, int], chunks: Any = None) -> tuple[int, int]:
    """``(min(64, N), min(64, M))`` as loompy, or the configured/given chunk shape."""
    c = chunks if chunks is not None else get_config("loom-chunks")
    return tuple(max(1, min(int(k), int(n))) for k, n in zip(c, shape))  # type: ignore[return-value]


def check_dtype(dtype: Any, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "iuf":
        raise ValueError(f"{where}: matrix elements must be integer or float, not {dt}")
    return dt


def check_values(block: Any, where: str) -> None:
    """Refuse NaN and Inf (the Loom spec forbids them in matrices)."""
    data = block.data if sp.issparse(block) else np.asarray(block)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError(f"{where}: INF and NaN not allowed in loom matrix")


def _column_bands(shape: tuple[int, int], chunks: tuple[int, int], itemsize: int) -> list[tuple[int, int]]:
    plan = plan_blocks(shape, chunks, itemsize, band_axis=1)
    bounds = np.cumsum((0, *plan[1]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _prepare(ds: LoomConnection, name: str, value: Any) -> tuple[Any, tuple[int, int], np.dtype]:
    from dask_loom.loom._layers import LoomLayer, MemoryLoomLayer

    where = f"{ds.filename}: layer '{name}'"
    if isinstance(value, MemoryLoomLayer):
        value = value.values
    if isinstance(value, LoomLayer):
        value = value.to_dask()
    if isinstance(value, str):
        dt = check_dtype(value, where)
        if 0 in ds.shape:
            raise ValueError(f"{where}: cannot create an empty layer in a file without a main matrix")
        return None, ds.shape, dt
    if not (sp.issparse(value) or hasattr(value, "dask")):
        value = np.asarray(value)
    if value.ndim != 2:
        raise ValueError(f"{where}: a layer must be 2-D, got shape {value.shape}")
    dt = check_dtype(value.dtype, where)
    shape = tuple(int(s) for s in value.shape)
    if ds.shape != (0, 0) and shape != ds.shape:
        others = [k for k in ds.layers.keys() if k != name]
        if name != "" or others:
            raise ValueError(f"{where}: all layers must have same shape {ds.shape}, got {shape}")
    return value, shape, dt  # type: ignore[return-value]


def write_layer(ds: LoomConnection, name: str, value: Any, *, chunks: Any = None) -> None:
    """Create or replace a whole layer (``ds.layers[name] = value``)."""
    ds._check_writable()
    value, shape, dt = _prepare(ds, name, value)
    where = f"{ds.filename}: layer '{name}'"
    path = ds._layer_path(name)
    head, _, tail = path.rpartition("/")
    tmp = f"{head}/.tmp-{tail}" if head else f".tmp-{tail}"
    chunks = default_chunks(shape, chunks)
    create = {
        "shape": shape,
        "dtype": dt,
        "chunks": chunks,
        "maxshape": (shape[0], None),
        "compression": "gzip",
        "compression_opts": 2,
        "fillvalue": 0 if value is None else None,
    }
    if value is not None and hasattr(value, "dask"):
        _write_dask(ds, name, tmp, path, value, create)
        return
    with ds._writing() as w:
        if head:
            w.create_group(head)
        w.delete(tmp)
        w.create_array(tmp, **create)
        if value is not None:
            csc = value.tocsc() if sp.issparse(value) else None
            for c0, c1 in _column_bands(shape, chunks, dt.itemsize):
                band = csc[:, c0:c1].toarray() if csc is not None else value[:, c0:c1]
                check_values(band, where)
                w.write(tmp, (slice(None), slice(c0, c1)), np.asarray(band, dtype=dt))
        w.move(tmp, path)
        ds._touch(w)
    ds._refresh_shape()
    if name == "" and ds._shape == (0, 0):
        ds._shape = shape


def _write_block(tree: Any, path: str, region: tuple[slice, ...], block: np.ndarray, where: str) -> int:
    check_values(block, where)
    with tree.writing() as w:
        w.write(path, region, block)
    return 1


def _write_dask(ds: LoomConnection, name: str, tmp: str, path: str, x: Any, create: dict[str, Any]) -> None:
    """Write a dask array as a graph: aligned blocks, one writer at a time per file."""
    from dask_loom.blocks import align_chunks
    from dask_loom.cluster import compute
    from dask_loom.ops._graph import task_name

    where = f"{ds.filename}: layer '{name}'"
    head = tmp.rpartition("/")[0]
    with ds._writing() as w:
        if head:
            w.create_group(head)
        w.delete(tmp)
        w.create_array(tmp, **create)
    dt = np.dtype(create["dtype"])
    plan = align_chunks(
        plan_blocks(create["shape"], create["chunks"], dt.itemsize), create["shape"], create["chunks"], dt
    )
    x = x.astype(dt).rechunk(plan)
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    wname = task_name("loom-write", ds.filename, name, x.name)
    dsk = {}
    bounds = [np.cumsum((0, *c)) for c in plan]
    for idx in np.ndindex(*x.numblocks):
        region = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, idx))
        dsk[(wname, *idx)] = (_write_block, ds._tree, tmp, region, (x.name, *idx), where)
    hlg = HighLevelGraph.from_collections(wname, dsk, dependencies=[x])
    keys = list(dsk)
    done = [Delayed(k, hlg, layer=wname) for k in keys]
    try:
        compute(*done, **ds._compute_kwargs())
    except BaseException:
        with ds._writing() as w:
            w.delete(tmp)
        raise
    with ds._writing() as w:
        w.move(tmp, path)
        ds._touch(w)
    ds._refresh_shape()


def write_layer_region(ds: LoomConnection, name: str, key: Any, value: Any) -> None:
    """``ds.layers[name][rows, cols] = value`` with numpy (outer) semantics.

    Each band of whole stored chunks that the selection touches is read,
    updated in memory and written back once.
    """
    ds._check_writable()
    where = f"{ds.filename}: layer '{name}'"
    layer_shape = ds._layer_shape(name)
    dt = np.dtype(ds._layer_dtype(name))
    sels = normalize_key(key, layer_shape, where=where)
    target_shape = tuple(s.count for s in sels if s.kind != "int")
    values = np.broadcast_to(np.asarray(value), target_shape)
    check_values(values, where)
    # Expand back to 2-D in requested order, then map onto sorted-unique positions.
    full = values.reshape(tuple(s.count for s in sels))
    uniq_vals = full
    for ax, s in enumerate(sels):
        if s.kind == "array":
            # Last write wins for duplicated positions, as in numpy.
            last = np.zeros(len(s.unique), dtype=np.int64)
            last[s.inverse] = np.arange(len(s.inverse))
            uniq_vals = np.take(uniq_vals, last, axis=ax)
    source = ds._layer_source(name)
    chunks = source.chunk_shape
    per_axis = []
    for s, n, c in zip(sels, layer_shape, chunks):
        pos = np.arange(s.start, s.stop) if s.kind in ("int", "range") else s.unique
        bands = selection_bands(n, c, np.unique(pos // c), max(1, block_size_bytes() // (c * dt.itemsize * max(1, layer_shape[0]))))
        per_axis.append((pos, bands))
    path = ds._layer_path(name)
    with ds._writing() as w:
        for (b0r, b1r) in per_axis[0][1]:
            for (b0c, b1c) in per_axis[1][1]:
                rows, cols = per_axis[0][0], per_axis[1][0]
                ri = np.flatnonzero((rows >= b0r) & (rows < b1r))
                ci = np.flatnonzero((cols >= b0c) & (cols < b1c))
                if not len(ri) or not len(ci):
                    continue
                region = (slice(b0r, b1r), slice(b0c, b1c))
                block = np.array(w.read(path, region), dtype=dt)
                block[np.ix_(rows[ri] - b0r, cols[ci] - b0c)] = uniq_vals[np.ix_(ri, ci)]
                w.write(path, region, block)
        ts_paths = [path]
        ds._touch(w, *ts_paths)
    ds._cache.clear()



