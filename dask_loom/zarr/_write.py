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

from dask_loom._config import get_config
from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.storage._objectstore import open_store
from dask_loom.storage._stores import LocalStore, check_node_path
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

    Notes
    -----
    In a local store the array is written beside the store and swapped in
    with one atomic directory exchange (under the store's writer lock), so a
    crash leaves the old array or the new one, never a mixture.

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
    if not isinstance(array, da.Array):
        array = da.from_array(np.asarray(array), chunks=chunks or "auto")
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store, **(storage_options or {}))
    # Refused here, naming the store (zarr's own check names neither, and a local write goes through a copy).
    check_node_path(path, getattr(store, "name", None) or repr(store))
    kw = {
        "chunks": chunks,
        "shards": shards,
        "dtype": dtype,
        "compressors": compressors,
        "fill_value": fill_value,
        "attributes": attributes,
        "dimension_names": dimension_names,
        "zarr_format": zarr_format,
        "write_empty_chunks": write_empty_chunks,
        "overwrite": overwrite,
        "compute_kw": {"scheduler": scheduler, "client": client, "progress": progress},
    }
    if type(store) is LocalStore:
        metadata = _write_local_transaction(array, store, path, **kw)
    else:
        metadata = _write(array, store, path, **kw)
    from dask_loom.zarr._nodes import ZarrArray

    return ZarrArray(store, path, metadata)


def _write_local_transaction(array: Any, store: LocalStore, path: str, **kw: Any) -> dict[str, Any]:
    """Write the array beside the store and swap it in at the end (a crash leaves the old array)."""
    import shutil

    from dask_loom.hdf5._files import _exclusive
    from dask_loom.storage import FileSpec
    from dask_loom.storage._atomic import (
        TransactionStore,
        abort,
        disk_full,
        no_space,
        remove_stale,
        replace_dir,
        temp_sibling,
    )

    root = str(store.path)
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    with _exclusive(FileSpec.from_path(root), float(get_config("write-timeout"))):
        remove_stale(root, all_of_them=True)
        tmp = temp_sibling(root)
        try:
            metadata = _write(array, TransactionStore(tmp), path, **kw)
            p = path.strip("/")
            if not p:
                replace_dir(tmp, root)
                return metadata
            # Groups above the array that the store lacks come along first (zarr wrote them in the copy).
            parts = p.split("/")[:-1]
            for i in range(len(parts) + 1):
                sub = "/".join(parts[:i])
                for doc in ("zarr.json", ".zgroup", ".zattrs"):
                    src = os.path.join(tmp, sub, doc)
                    dst = os.path.join(root, sub, doc)
                    if os.path.exists(src) and not os.path.exists(dst) and not (
                        doc != "zarr.json" and os.path.exists(os.path.join(root, sub, "zarr.json"))
                    ):
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        shutil.copy2(src, dst)
            replace_dir(os.path.join(tmp, p), os.path.join(root, p))
            return metadata
        except BaseException as exc:
            abort(tmp)  # tasks still running cannot recreate the copy
            if no_space(exc):
                raise disk_full(str(store.path), exc, "store") from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write(
    array: Any,
    store: Any,
    path: str,
    *,
    chunks: Any,
    shards: Any,
    dtype: Any,
    compressors: Any,
    fill_value: Any,
    attributes: Any,
    dimension_names: Any,
    zarr_format: int,
    write_empty_chunks: bool,
    overwrite: bool,
    compute_kw: dict[str, Any],
) -> dict[str, Any]:
    import zarr

    from dask_loom.cluster import compute
    from dask_loom.ops._graph import task_name

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
    compute(*[Delayed(k, hlg, layer=name) for k in dsk], **compute_kw)
    return metadata
