"""``dask_loom.store``: the one graph builder every writer uses (design decisions 1, 4 and 10).

Loom layer writes (HDF5 and ``.loom.zarr``), ``permute``, ``add_columns``,
``add_loom``/``combine``, ``convert``, :func:`dask_loom.to_zarr` and the
OME-Arrow dataset writer all hand an array and a chunk target to
:func:`store`, which

* rounds the array's blocks out to unions of whole target chunks (or shards)
  with :func:`~dask_loom.blocks.align_chunks` (a user chunking that splits
  stored chunks is rounded with a :class:`~dask_loom.errors.ChunkAlignmentWarning`),
  so no two tasks ever write one stored chunk;
* builds one task per block, named ``<target.prefix>-<token>`` (deterministic
  for a dask input);
* computes the tasks a batch at a time through :func:`dask_loom.cluster.compute`
  and stores their payloads in block order in the caller, while the next
  batch computes: memory holds at most two batches of encoded blocks
  (:func:`batch_size` blocks each), never the array;
* does all of it inside the target's transaction: committed at the end,
  aborted on any error, so nothing half-written is ever visible.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_loom.blocks._plan import align_chunks, block_regions, plan_blocks
from dask_loom.blocks._target import ChunkTarget, check_region

__all__ = ["batch_size", "computed_in_batches", "store"]


def _encode(target: ChunkTarget, region: tuple[slice, ...], block: Any) -> Any:
    """Task body: one block of whole chunks, encoded by the target."""
    return target.encode_block(region, block)


def _parallelism(scheduler: Any, client: Any) -> int:
    from dask_loom._config import get_config
    from dask_loom.cluster import resolve_scheduler

    where = resolve_scheduler(scheduler, client)
    if hasattr(where, "nthreads"):
        with contextlib.suppress(Exception):
            return max(1, sum(where.nthreads().values()))
    if where in ("sync", "synchronous", "single-threaded"):
        return 1
    return max(1, int(get_config("threads") or os.cpu_count() or 1))


def batch_size(parallelism: int) -> int:
    """Blocks computed per batch: two per thread of the scheduler (at least two).

    :func:`store` holds at most two batches of payloads at once (one being
    stored, the next computing), whatever the size of the array.
    """
    return max(2, 2 * int(parallelism))


def _is_dask(x: Any) -> bool:
    import dask

    return dask.is_dask_collection(x) and hasattr(x, "chunks")


def _is_sparse(x: Any) -> bool:
    from dask_loom._lazy import issparse

    return issparse(x)


def store(
    x: Any,
    target: ChunkTarget,
    *,
    at: tuple[int, ...] | None = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> None:
    """Write *x* into *target*, one task per block of whole target chunks, as one transaction.

    Parameters
    ----------
    x
        A dask array, a numpy array, a scipy.sparse matrix (densified one
        band of whole chunks at a time, in the tasks) or any array-like with
        ``shape``, ``dtype`` and slicing (read a block at a time).
    target
        A :class:`~dask_loom.blocks.ChunkTarget`.
    at
        Where *x* goes in the target (default: *x* is the whole target).  The
        window must start on chunk boundaries and end on them or at the
        target's edge.
    scheduler, client, progress
        Where the graph runs (:func:`dask_loom.cluster.compute`) and whether
        to show progress.

    Raises
    ------
    ChunkAlignmentError
        If the window *at* splits stored chunks.
    ValueError
        If *x* does not fit the target.

    Notes
    -----
    The target's transaction is opened here (or joined, when the caller
    holds it open): at a normal end everything written becomes visible at
    once; on any error, the target is rolled back after the batch in flight
    has finished, and nothing of the write is visible.

    Examples
    --------
    >>> import dask.array as da, numpy as np, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> from dask_loom.zarr import ZarrTarget
    >>> s = MemoryStore()
    >>> t = ZarrTarget(s, "x", shape=(100,), dtype="i8", chunks=(10,))
    >>> dask_loom.store(da.arange(100, chunks=20), t, scheduler="sync")
    >>> int(dask_loom.open_zarr(s)["x"].to_dask().sum().compute(scheduler="sync"))
    4950
    """
    label = getattr(target, "label", target.prefix)
    if not _is_dask(x) and not isinstance(x, np.ndarray) and hasattr(x, "to_dask"):
        x = x.to_dask()  # a Loom layer, a Zarr node, a tensor view
    dask_input = _is_dask(x)
    if not dask_input and not _is_sparse(x) and not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")):
        x = np.asarray(x)
    shape = tuple(int(s) for s in x.shape)
    tshape = tuple(int(s) for s in target.shape)
    if len(shape) != len(tshape):
        raise ValueError(f"{label}: cannot store a {len(shape)}-D array into a {len(tshape)}-D one")
    if at is None:
        if shape != tshape:
            raise ValueError(f"{label}: cannot store an array of shape {shape} into one of shape {tshape}")
        origin = (0,) * len(shape)
    else:
        origin = tuple(int(a) for a in at)
        if len(origin) != len(shape):
            raise ValueError(f"{label}: at={tuple(at)} does not match a {len(shape)}-D array")
    # The window itself must be whole chunks: decision 1 holds for the write as a whole.
    check_region(tuple(slice(o, o + n) for o, n in zip(origin, shape)), tshape, tuple(target.chunk_shape), label)
    kw = {"scheduler": scheduler, "client": client, "progress": progress}
    size = batch_size(_parallelism(scheduler, client))
    with target.transaction():
        if dask_input:
            batches = _dask_batches(x, target, origin, size, label)
        else:
            batches = _memory_batches(x, target, origin, size)
        with contextlib.closing(_pipeline(batches, kw)) as results:
            for payloads in results:
                for payload in payloads:
                    target.store_payload(payload)


def _shift(region: tuple[slice, ...], origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(r.start + o, r.stop + o) for r, o in zip(region, origin))


def _nonempty(region: tuple[slice, ...]) -> bool:
    return all(r.stop > r.start for r in region)


def _dask_batches(x: Any, target: ChunkTarget, origin: tuple[int, ...], size: int, label: str) -> Iterator[list[Any]]:
    from dask.base import tokenize
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    shape = tuple(int(s) for s in x.shape)
    plan = align_chunks(tuple(x.chunks), shape, tuple(target.chunk_shape), target.dtype, what=label, stacklevel=5)
    if plan != tuple(tuple(int(c) for c in cs) for cs in x.chunks):
        x = x.rechunk(plan)
    name = f"{target.prefix}-{tokenize(target, x.name, origin)}"
    dsk = {
        (name, *idx): (_encode, target, _shift(region, origin), (x.name, *idx))
        for idx, region in block_regions(plan)
        if _nonempty(region)
    }
    if not dsk:
        return
    hlg = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    keys = list(dsk)
    for i in range(0, len(keys), size):
        yield [Delayed(k, hlg, layer=name) for k in keys[i : i + size]]


def _memory_blocks(x: Any, target: ChunkTarget) -> Iterator[tuple[tuple[slice, ...], Any]]:
    """Aligned blocks of in-memory input: numpy views, sparse bands (densified in the task), array-like slices."""
    shape = tuple(int(s) for s in x.shape)
    dtype = np.dtype(target.dtype)
    itemsize = 8 if dtype.kind == "O" else dtype.itemsize
    cap = getattr(target, "block_bytes", None)
    if _is_sparse(x):
        # Row bands of CSR (cheap row slices), column bands of CSC; a target whose
        # write unit spans a whole axis (an AnnData CSR/CSC element) picks the format.
        cs = tuple(int(c) for c in target.chunk_shape)
        if len(shape) == 2 and cs[1] >= shape[1] > 0 and cs[0] < shape[0]:
            fmt = "csr"
        elif len(shape) == 2 and cs[0] >= shape[0] > 0 and cs[1] < shape[1]:
            fmt = "csc"
        else:
            fmt = x.format if x.format in ("csr", "csc") else "csr"
        if x.format != fmt:
            x = x.asformat(fmt)
        axis = 0 if fmt == "csr" else 1
        plan = plan_blocks(shape, target.chunk_shape, itemsize, band_axis=axis, target_bytes=cap)
        for _, region in block_regions(plan):
            if _nonempty(region):
                yield region, x[region[0]] if axis == 0 else x[:, region[1]]
        return
    plan = plan_blocks(shape, target.chunk_shape, itemsize, target_bytes=cap)
    for _, region in block_regions(plan):
        if _nonempty(region):
            yield region, x[region] if isinstance(x, np.ndarray) else np.asarray(x[region])


def _memory_batches(x: Any, target: ChunkTarget, origin: tuple[int, ...], size: int) -> Iterator[list[Any]]:
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    # In-memory data are not hashed for a token (that would read all of it): a fresh name per write.
    name = f"{target.prefix}-{uuid.uuid4().hex}"
    batch: dict[Any, Any] = {}

    def emit() -> list[Any]:
        hlg = HighLevelGraph.from_collections(name, dict(batch), dependencies=())
        return [Delayed(k, hlg, layer=name) for k in batch]

    for n, (region, block) in enumerate(_memory_blocks(x, target)):
        batch[(name, n)] = (_encode, target, _shift(region, origin), block)
        if len(batch) >= size:
            yield emit()
            batch.clear()
    if batch:
        yield emit()


def _pipeline(batches: Iterator[list[Any]], kw: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    """Computed batches in order; the next batch computes while the caller stores the last one."""
    from dask_loom.cluster import _in_pool, compute

    if _in_pool():
        # Called from a task of the embedded pool: its threads may all be
        # busy waiting, so batches run here, one after another.
        for batch in batches:
            yield compute(*batch, **{**kw, "scheduler": "sync", "client": None})
        return
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    # The executor waits for the batch in flight on any exit, so a rollback
    # never races tasks of this write still running.
    with ThreadPoolExecutor(1, thread_name_prefix="dask-loom-store") as ex:
        fut = ex.submit(compute, *first, **kw)
        for batch in it:
            done = fut.result()
            fut = ex.submit(compute, *batch, **kw)
            yield done
        yield fut.result()


def computed_in_batches(
    collections: Any, *, scheduler: Any = None, client: Any = None, progress: bool = False
) -> Iterator[Any]:
    """Results of dask collections, in order, computed under :func:`store`'s batching policy.

    For writers whose output is not a chunk target (the single OME-Parquet
    record): the same batches, the same bound on memory.
    """
    kw = {"scheduler": scheduler, "client": client, "progress": progress}
    size = batch_size(_parallelism(scheduler, client))
    it = iter(collections)

    def batches() -> Iterator[list[Any]]:
        while True:
            part = [c for _, c in zip(range(size), it)]
            if not part:
                return
            yield part

    with contextlib.closing(_pipeline(batches(), kw)) as results:
        for values in results:
            yield from values
