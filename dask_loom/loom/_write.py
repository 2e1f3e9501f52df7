"""Writing layers: whole layers (numpy, scipy.sparse, dask) and regions.

Whole-layer writes are transactions (``Tree.writing(atomic=True)``): a crash
at any moment leaves the old file.  Data move in blocks of whole stored
chunks; the blocks are encoded (compressed) in parallel — in a local thread
pool for in-memory input, as tasks of a graph for dask input — and the single
writer only stores the encoded chunks.  scipy.sparse input is densified one
column band at a time, never whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._config import get_config
from dask_loom._indexing import normalize_key
from dask_loom._lazy import issparse
from dask_loom.blocks import block_regions, plan_blocks, selection_bands
from dask_loom.loom._common import check_name

if TYPE_CHECKING:
    from dask_loom.loom._connection import LoomConnection

__all__ = [
    "check_values",
    "default_chunks",
    "encode_checked",
    "store_blocks",
    "store_dask",
    "write_layer",
    "write_layer_region",
]


def default_chunks(shape: tuple[int, ...], chunks: Any = None) -> tuple[int, ...]:
    """``(min(64, N), min(64, M))`` as loompy, or the configured/given chunk shape."""
    c = chunks if chunks is not None else get_config("loom-chunks")
    return tuple(max(1, min(int(k), int(n))) for k, n in zip(c, shape))


def check_dtype(dtype: Any, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "iuf":
        raise ValueError(f"{where}: matrix elements must be integer or float, not {dt}")
    return dt


def check_values(block: Any, where: str) -> None:
    """Refuse NaN and Inf (the Loom spec forbids them in matrices)."""
    data = block.data if issparse(block) else np.asarray(block)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError(f"{where}: INF and NaN not allowed in loom matrix")


def encode_checked(encoder: Any, region: tuple[slice, ...], block: Any, where: str, dtype: Any) -> Any:
    """Task body: check one block, cast it to the layer dtype, encode it."""
    if issparse(block):
        block = block.toarray()
    block = np.asarray(block)
    check_values(block, where)
    return encoder(region, block.astype(dtype, copy=False))


def store_blocks(w: Any, path: str, blocks: Iterable[tuple[tuple[slice, ...], Any]], *, where: str, dtype: Any) -> None:
    """Encode in-memory blocks in a local thread pool and store them (bounded look-ahead)."""
    encoder = w.encoder(path)
    workers = max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Any] = []
        for region, block in blocks:
            pending.append(pool.submit(encode_checked, encoder, region, block, where, dtype))
            if len(pending) > 2 * workers:
                w.store_chunks(path, pending.pop(0).result())
        for fut in pending:
            w.store_chunks(path, fut.result())


def dense_blocks(value: Any, shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> Iterator[tuple[tuple[slice, ...], Any]]:
    """Aligned blocks of a numpy array or scipy.sparse matrix.

    Sparse input is densified one band at a time, never whole: full-width row
    bands for CSR (row slices of CSR are cheap), full-height column bands for
    CSC; other sparse formats are converted to CSR first.
    """
    if issparse(value):
        if value.format not in ("csr", "csc"):
            value = value.tocsr()
        axis = 0 if value.format == "csr" else 1
        plan = plan_blocks(shape, chunks, itemsize, band_axis=axis)
        for _, region in block_regions(plan):
            yield region, value[region[0]].toarray() if axis == 0 else value[:, region[1]].toarray()
        return
    plan = plan_blocks(shape, chunks, itemsize)
    for _, region in block_regions(plan):
        yield region, value[region]


def store_dask(ds: Any, w: Any, path: str, x: Any, *, where: str, dtype: Any, chunks: tuple[int, ...]) -> None:
    """Write a dask array as a graph: aligned blocks encoded by tasks, stored by this writer.

    Blocks are rechunked to unions of whole stored chunks first, so no two
    tasks ever touch the same chunk.  Results are gathered a batch at a time,
    so memory holds a few encoded blocks, not the layer.
    """
    from dask.base import tokenize
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    from dask_loom.blocks import align_chunks
    from dask_loom.cluster import compute

    dt = np.dtype(dtype)
    plan = plan_blocks(tuple(x.shape), chunks, dt.itemsize)
    plan = align_chunks(plan, tuple(x.shape), chunks, dt)
    x = x.rechunk(plan)
    encoder = w.encoder(path)
    name = f"loom-write-{tokenize(x.name, path, where)}"
    keys = []
    dsk: dict[Any, Any] = {}
    for idx, region in block_regions(plan):
        key = (name, *idx)
        dsk[key] = (encode_checked, encoder, region, (x.name, *idx), where, dt)
        keys.append(key)
    hlg = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    batch = max(4, 4 * (os.cpu_count() or 1))
    for i in range(0, len(keys), batch):
        part = [Delayed(k, hlg, layer=name) for k in keys[i : i + batch]]
        for payload in compute(*part, nbytes=int(x.nbytes), **ds._compute_kwargs()):
            w.store_chunks(path, payload)


def _prepare(ds: LoomConnection, name: str, value: Any) -> tuple[Any, tuple[int, ...], np.dtype]:
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
    if not (issparse(value) or hasattr(value, "dask")):
        value = np.asarray(value)
    if value.ndim != 2:
        raise ValueError(f"{where}: a layer must be 2-D, got shape {value.shape}")
    dt = check_dtype(value.dtype, where)
    shape = tuple(int(s) for s in value.shape)
    if ds.shape != (0, 0) and shape != ds.shape:
        others = [k for k in ds.layers.keys() if k != name]
        if name != "" or others:
            raise ValueError(f"{where}: all layers must have same shape {ds.shape}, got {shape}")
    return value, shape, dt


def create_layer_array(w: Any, path: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], *, fill: bool = False) -> None:
    """Create a layer dataset with loompy's settings (gzip 2, columns resizable)."""
    w.create_array(
        path,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        maxshape=(shape[0], None),
        compression="gzip",
        compression_opts=2,
        fillvalue=0 if fill else None,
    )


def fill_layer(ds: Any, w: Any, path: str, value: Any, *, where: str, dtype: Any, chunks: tuple[int, ...]) -> None:
    """Write *value* (numpy, sparse or dask) into an existing, empty layer dataset."""
    dt = np.dtype(dtype)
    if hasattr(value, "dask"):
        store_dask(ds, w, path, value, where=where, dtype=dt, chunks=chunks)
    else:
        store_blocks(w, path, dense_blocks(value, tuple(value.shape), chunks, dt.itemsize), where=where, dtype=dt)


def write_layer(ds: LoomConnection, name: str, value: Any, *, chunks: Any = None) -> None:
    """Create or replace a whole layer (``ds.layers[name] = value``), as one transaction."""
    ds._check_writable()
    check_name("Layer", name, ds.filename, allow_empty=True)
    value, shape, dt = _prepare(ds, name, value)
    where = f"{ds.filename}: layer '{name}'"
    path = ds._layer_path(name)
    head, _, tail = path.rpartition("/")
    tmp = f"{head}/.tmp-{tail}" if head else f".tmp-{tail}"
    chunks = default_chunks(shape, chunks)
    with ds._writing(atomic=True) as w:
        if head:
            w.create_group(head)
        w.delete(tmp)
        create_layer_array(w, tmp, shape, dt, chunks, fill=value is None)
        if value is not None:
            fill_layer(ds, w, tmp, value, where=where, dtype=dt, chunks=chunks)
        w.move(tmp, path)
        ds._touch(w)
    ds._refresh_shape()


def write_layer_region(ds: LoomConnection, name: str, key: Any, value: Any) -> None:
    """``ds.layers[name][rows, cols] = value`` with numpy (outer) semantics.

    Each band of whole stored chunks that the selection touches is read,
    updated in memory and written back once, in place (as loompy does).
    """
    ds._check_writable()
    where = f"{ds.filename}: layer '{name}'"
    layer_shape = ds._layer_shape(name)
    dt = np.dtype(ds._layer_dtype(name))
    sels = normalize_key(key, layer_shape, where=where)
    target_shape = tuple(s.count for s in sels if s.kind != "int")
    values = np.broadcast_to(np.asarray(value), target_shape)
    check_values(values, where)
    full = values.reshape(tuple(s.count for s in sels))
    uniq_vals = full
    for ax, s in enumerate(sels):
        if s.kind == "array":
            # Last write wins for duplicated positions, as in numpy.
            last = np.zeros(len(s.unique), dtype=np.int64)
            last[s.inverse] = np.arange(len(s.inverse))
            uniq_vals = np.take(uniq_vals, last, axis=ax)
    chunks = ds._layer_source(name).chunk_shape
    per_axis = []
    for s, n, c in zip(sels, layer_shape, chunks):
        pos = np.arange(s.start, s.stop) if s.kind in ("int", "range") else s.unique
        per_axis.append((pos, selection_bands(n, c, np.unique(pos // c), 64)))
    path = ds._layer_path(name)
    with ds._writing() as w:
        rows, cols = per_axis[0][0], per_axis[1][0]
        for b0r, b1r in per_axis[0][1]:
            ri = np.flatnonzero((rows >= b0r) & (rows < b1r))
            for b0c, b1c in per_axis[1][1]:
                ci = np.flatnonzero((cols >= b0c) & (cols < b1c))
                if not len(ri) or not len(ci):
                    continue
                region = (slice(b0r, b1r), slice(b0c, b1c))
                block = np.array(w.read(path, region), dtype=dt)
                block[np.ix_(rows[ri] - b0r, cols[ci] - b0c)] = uniq_vals[np.ix_(ri, ci)]
                w.write(path, region, block)
        ds._touch(w, path)
