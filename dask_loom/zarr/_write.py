"""``to_zarr``: a dask (or numpy) array into a new Zarr array, one task per stored object.

Writing part of a shard is a read-modify-write of the whole shard key, so two
tasks writing into one shard at once lose data (zarr-python #3682, dask
#12583).  :func:`to_zarr` hands the array to :func:`dask_loom.store` with a
:class:`~dask_loom.zarr.ZarrTarget`, which rounds every block out to a union
of whole shards (chunks when unsharded): each stored object is written by
exactly one task, inside the target's transaction.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dask_loom.storage._objectstore import open_store
from dask_loom.storage._stores import check_node_path

__all__ = ["to_zarr"]


def _default_chunks(array: Any) -> tuple[int, ...]:
    """The input's largest block along each axis (dask's ``"auto"`` blocks for in-memory input)."""
    chunks = getattr(array, "chunks", None)
    if chunks is None or not isinstance(chunks, tuple) or not all(isinstance(c, tuple) for c in chunks):
        from dask.array.core import normalize_chunks

        chunks = normalize_chunks("auto", tuple(array.shape), dtype=array.dtype)
    return tuple(max(1, max(c)) for c in chunks)


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
    same key.  Input blocks that split stored objects are rounded out, with a
    :class:`~dask_loom.errors.ChunkAlignmentWarning`.

    Parameters
    ----------
    array
        dask or numpy array (or scipy.sparse matrix, densified a band at a time).
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
    crash leaves the old array or the new one, never a mixture.  On object
    stores the array's metadata document is written last: an interrupted
    write leaves no array.  A root whose consolidated metadata dask_loom keeps
    (a ``.loom.zarr``) is brought up to date after the write.

    Examples
    --------
    >>> import warnings, dask.array as da, numpy as np, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> x = da.arange(100, chunks=7)  # blocks cut across the shards below: rounded out
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     z = dask_loom.to_zarr(x, s, "x", chunks=(5,), shards=(20,), scheduler="sync")
    >>> z.chunk_shape, int(z.to_dask().sum().compute(scheduler="sync"))
    ((20,), 4950)
    """
    from dask_loom._lazy import issparse
    from dask_loom.blocks import store as store_blocks
    from dask_loom.zarr._nodes import ZarrArray
    from dask_loom.zarr._target import ZarrTarget

    if not (hasattr(array, "dask") or issparse(array) or isinstance(array, np.ndarray)):
        array = np.asarray(array)
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store, **(storage_options or {}))
    # Refused here, naming the store (zarr's own check names neither, and a local write goes through a copy).
    check_node_path(path, getattr(store, "name", None) or repr(store))
    target = ZarrTarget(
        store,
        path,
        shape=tuple(int(s) for s in array.shape),
        dtype=np.dtype(dtype) if dtype is not None else array.dtype,
        chunks=tuple(int(c) for c in chunks) if chunks is not None else _default_chunks(array),
        shards=shards,
        compressors=compressors,
        fill_value=fill_value,
        attributes=attributes,
        dimension_names=dimension_names,
        zarr_format=zarr_format,
        write_empty_chunks=write_empty_chunks,
        overwrite=overwrite,
    )
    store_blocks(array, target, scheduler=scheduler, client=client, progress=progress)
    if target.path:
        # Into a hierarchy whose root dask_loom consolidates (a .loom.zarr layer): kept current.
        from dask_loom.zarr._consolidated import refresh_consolidated

        refresh_consolidated(store)
    return ZarrArray(store, target.path, target.metadata)
