"""Aligned writes: a dask array into Zarr, one task per stored object (shard or chunk).

Writing part of a shard is a read-modify-write of the whole shard key, so two
tasks writing into one shard at once lose data (zarr-python #3682, dask
#12583).  :func:`to_zarr` rechunks so that every block is a union of whole
shards (chunks when unsharded) and each stored object is written by exactly
one task.
"""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np

from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.storage._objectstore import open_store
from dask_loom.zarr._source import build_array

__all__ = ["to_zarr"]


class _Target:
    """Picklable handle on an array to write: store spec, path, metadata."""

    def __init__(self, store: Any, path: str, metadata: dict[str, Any], write_empty_chunks: bool) -> None:
        self.store = store
        self.path = path
        self.metadata = metadata
        self.write_empty_chunks = write_empty_chunks

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("ZarrTarget", tokenize(self.store), self.path, repr(sorted(self.metadata.items())))


def _write_block(target: _Target, region: tuple[slice, ...], block: np.ndarray) -> int:
    arr = build_array(target.store, target.path, target.metadata, write_empty_chunks=target.write_empty_chunks)
    arr[region] = block
    return 1


def to_zarr(
    array: Any,
    store: Any,
    path: str = "",
    *,
    chunks: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    dtype: Any = None,
    compressors: Any = "auto",
    fill_value: Any = None,
    attributes: dict[str, Any] | None = None,
    dimension_names: tuple[str, ...] | None = None,
    zarr_format: int = 3,
    write_empty_chunks: bool = False,
    overwrite: bool = True,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Write a dask (or numpy) array to a new Zarr array, one task per shard.

    The input is rechunked so that every block is a union of whole stored
    objects (shards, or chunks when unsharded): no two tasks ever write the
    same key, whatever the input's blocks are.

    Parameters
    ----------
    array
        dask or numpy array.
    store
        A store, local path or URL.
    path
        Array path inside the store.
    chunks, shards
        Stored chunk shape and (optional) shard shape; default chunks: the
        input's largest block along each axis.
    dtype, compressors, fill_value, attributes, dimension_names, zarr_format
        As for ``zarr.create_array``.
    scheduler, client, progress
        Where the write graph runs (see :func:`dask_loom.cluster.compute`).

    Returns
    -------
    ZarrArray
        The written array.

    Examples
    --------
    >>> import dask.array as da, numpy as np, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> x = da.arange(100, chunks=7)  # blocks cut across the shards below
    >>> z = dask_loom.to_zarr(x, s, "x", chunks=(5,), shards=(20,), scheduler="sync")
    >>> z.chunk_shape, int(z.to_dask().sum().compute(scheduler="sync"))
    ((20,), 4950)
    """
    import zarr

    from dask_loom.cluster import compute
    from dask_loom.ops._graph import task_name
    from dask_loom.zarr._nodes import ZarrArray

    if not isinstance(array, da.Array):
        array = da.from_array(np.asarray(array), chunks=chunks or "auto")
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store, **(storage_options or {}))
    dt = np.dtype(dtype) if dtype is not None else array.dtype
    shape = tuple(int(s) for s in array.shape)
    if chunks is None:
        chunks = tuple(max(1, max(c)) for c in array.chunks)
    chunks = tuple(int(c) for c in chunks)
    kw: dict[str, Any] = {}
    if zarr_format == 3:
        kw["dimension_names"] = dimension_names
    z = zarr.create_array(
        store,
        name=path or None,
        shape=shape,
        dtype=dt,
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        fill_value=fill_value,
        attributes=attributes,
        zarr_format=zarr_format,
        overwrite=overwrite,
        **kw,
    )
    metadata = z.metadata.to_dict()
    unit = tuple(int(c) for c in (z.shards or z.chunks))
    plan = plan_blocks(shape, unit, dt.itemsize)
    x = array.astype(dt).rechunk(plan)
    target = _Target(store, path, metadata, write_empty_chunks)
    name = task_name("zarr-write", target, x.name)
    dsk = {(name, i): (_write_block, target, region, (x.name, *idx)) for i, (idx, region) in enumerate(block_regions(plan))}
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    hlg = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    compute(*[Delayed(k, hlg, layer=name) for k in dsk], scheduler=scheduler, client=client, progress=progress)
    return ZarrArray(store, path, metadata)
