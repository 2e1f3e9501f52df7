"""Reading a block from a store with per-request latency: sub-blocks whose fetches overlap decoding.

A source reads a block by fetching all its stored chunks concurrently, then
decoding them.  On a store where each request waits (an object store, or
``SlowStore``), the decoding of a whole block then runs after the last
request, with nothing in flight: with 256 chunks of 32 KiB behind 50 ms
that was 0.06 s on top of the 0.4 s the requests need at 32 at a time.
Here the block is cut into sub-blocks of whole stored chunks that a few
threads read at once, each at most ``async.concurrency / readers`` chunks, so
while one thread decodes, the others' requests are in flight, and the
requests in flight for the block never exceed ``async.concurrency`` (the
limit one read had before).

A source that streams its chunks (``streams_chunks``: unsharded Zarr chunks,
each decoded as it arrives while ``async.concurrency`` requests stay in
flight) is read in one call: sub-blocks would only put back the waves of
requests it avoids.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_loom._allocator import tune_allocator_once

__all__ = ["latency_bound", "read_ahead", "reads_wait", "store_waits", "sub_blocks"]


def _concurrency() -> int:
    import zarr

    return max(1, int(zarr.config.get("async.concurrency") or 10))


def _readers() -> int:
    from dask_loom._config import get_config

    return max(1, int(get_config("read-ahead")))


@functools.lru_cache(maxsize=64)
def _takes_out(cls: type) -> bool:
    try:
        return "out" in inspect.signature(cls.read_block).parameters
    except (TypeError, ValueError):
        return False


def store_waits(store: Any) -> bool:
    """Whether *store* is a dask_loom store whose requests wait (neither local nor in memory)."""
    if store is None or "dask_loom.storage._stores" not in sys.modules:
        return False  # no dask_loom store exists yet: do not import one (zarr-python, 0.3 s) to ask
    from dask_loom.storage._stores import BaseStore, LocalStore, MemoryStore

    return isinstance(store, BaseStore) and type(store) not in (LocalStore, MemoryStore)


def reads_wait(source: Any) -> bool:
    """Whether reading *source* waits on an object store (a remote file, or a dask_loom store that is neither local nor in memory).

    Graphs over such sources run on more threads than cores (see
    :func:`dask_loom.cluster.thread_pool`).
    """
    waits = getattr(source, "waits", None)
    if isinstance(waits, bool):  # the source knows (a remote HDF5 file whose chunks are held)
        return waits
    spec = getattr(source, "spec", None)
    if spec is not None and isinstance(getattr(spec, "is_local", None), bool):
        return not spec.is_local and not str(getattr(spec, "url", "")).startswith("memory://")
    return store_waits(getattr(source, "store", None))


def latency_bound(source: Any) -> bool:
    """Whether *source* reads through a dask_loom store whose requests wait (neither local nor in memory)."""
    return store_waits(getattr(source, "store", None)) and _takes_out(type(source))


def sub_blocks(region: tuple[slice, ...], unit: tuple[int, ...], per_tile: int) -> list[tuple[slice, ...]]:
    """Cut *region* (starting on stored-chunk boundaries) into tiles of at most *per_tile* whole chunks.

    Tiles grow along the last axis first (C order: contiguous in the block),
    then whole last-axis rows of chunks stack along the axes before it.

    Examples
    --------
    >>> sub_blocks((slice(0, 4), slice(0, 6)), (2, 2), 2)
    [(slice(0, 2, None), slice(0, 4, None)), (slice(0, 2, None), slice(4, 6, None)), (slice(2, 4, None), slice(0, 4, None)), (slice(2, 4, None), slice(4, 6, None))]
    >>> sub_blocks((slice(0, 4), slice(0, 6)), (2, 2), 6)
    [(slice(0, 4, None), slice(0, 6, None))]
    """
    counts = [max(1, math.ceil((r.stop - r.start) / u)) for r, u in zip(region, unit)]
    tile = [1] * len(region)
    budget = max(1, per_tile)
    for ax in reversed(range(len(region))):
        tile[ax] = min(counts[ax], budget)
        if tile[ax] < counts[ax]:
            break
        budget //= tile[ax]
    starts = [range(r.start, r.stop, t * u) for r, t, u in zip(region, tile, unit)]
    return [
        tuple(slice(s, min(r.stop, s + t * u)) for s, r, t, u in zip(corner, region, tile, unit))
        for corner in itertools.product(*starts)
    ]


def read_ahead(source: Any, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
    """``source.read_block(region, out=out)``, as overlapping sub-block reads where that hides latency.

    Blocks of one stored chunk, and sources on local or in-memory stores,
    are read in one call as before.  The first block a process reads lifts
    a nanny's pin of glibc's mmap threshold (:func:`~dask_loom._allocator.tune_allocator_once`).
    """
    tune_allocator_once()
    readers = _readers()
    if readers < 2 or not region or not latency_bound(source) or getattr(source, "streams_chunks", False):
        # A source that decodes chunks as they arrive keeps its requests in flight itself.
        return source.read_block(region, out=out) if out is not None else source.read_block(region)
    limit = _concurrency()
    per_tile = max(1, limit // readers)
    region = tuple(slice(*r.indices(int(n))[:2]) for r, n in zip(region, source.shape))
    tiles = sub_blocks(region, tuple(int(c) for c in source.chunk_shape), per_tile)
    if len(tiles) < 2:
        return source.read_block(region, out=out) if out is not None else source.read_block(region)
    shape = tuple(r.stop - r.start for r in region)
    if out is None:
        out = np.empty(shape, dtype=source.dtype)

    def one(tile: tuple[slice, ...]) -> None:
        view = out[tuple(slice(t.start - r.start, t.stop - r.start) for t, r in zip(tile, region))]
        got = source.read_block(tile, out=view)
        if got is not None and got is not view:
            view[...] = got

    # As many readers as keep `limit` chunks in flight (10 // 4 -> tiles of 2, 5 readers).
    with ThreadPoolExecutor(
        max_workers=min(len(tiles), max(1, limit // per_tile)), thread_name_prefix="dask-loom-read-ahead"
    ) as pool:
        # list(): every tile finishes (or fails) before the block is handed on; the first error is raised.
        list(pool.map(one, tiles))
    return out
