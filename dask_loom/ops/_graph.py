"""Small helpers to turn lists of tasks into dask collections with readable names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

__all__ = ["prefetch_later", "read_later", "task_name", "tasks"]


def task_name(prefix: str, *token_parts: Any) -> str:
    """``f"{prefix}-{tokenize(...)}"``: groups under *prefix* in the dashboard."""
    return f"{prefix}-{tokenize(*token_parts)}"


def tasks(name: str, func: Callable[..., Any], arg_lists: Sequence[tuple[Any, ...]]) -> list[Delayed]:
    """One task per argument tuple, keyed ``(name, i)``; returns their ``Delayed``s.

    Arguments may themselves be dask keys of other layers given through
    ``Delayed`` objects; here they are plain (picklable) values.
    """
    dsk = {(name, i): (func, *args) for i, args in enumerate(arg_lists)}
    hlg = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return [Delayed((name, i), hlg, layer=name) for i in range(len(arg_lists))]


def read_later(source: Any, dsk: dict[Any, Any], reads: dict[Any, Any]) -> dict[Any, Any]:
    """For read tasks ``{key: region}`` of *dsk*, the region each starts fetching for a task to come.

    On an object store, every task of a local run used to ask for its block
    as it started and wait a round trip: with as many tasks running as
    threads, all of them waited together, then decoded together, so the cores
    stood idle once per wave of tasks.  A task now also starts fetching the
    block of the read task one pool's width after it in the order the
    threaded scheduler runs them (``dask.order``), whose bytes then arrive
    while this wave decodes: a warm ``map`` of a 74 MB ``.loom`` behind 80 ms
    per request took 0.80 s and takes 0.68 s (docs/performance.md).  Empty
    for a source whose reads do not wait or that cannot fetch ahead.
    """
    from dask.order import order

    from dask_loom.blocks._readahead import reads_wait
    from dask_loom.cluster import _pool_size

    if not reads or not hasattr(source, "prefetch") or not reads_wait(source):
        return {}
    priority = order(dsk)
    seq = sorted(reads, key=priority.__getitem__)
    k = _pool_size(waits=True)
    return {key: reads[seq[i + k]] for i, key in enumerate(seq[:-k])}


def prefetch_later(source: Any, region: Any) -> None:
    """Start fetching *region* of *source* for a task to come (see :func:`read_later`).

    Only on dask_loom's own threads, which run ready tasks in priority order; a
    worker of a distributed cluster would run that task elsewhere, and its bytes
    would be fetched twice.
    """
    from dask_loom.cluster import _in_pool

    if region is not None and _in_pool():
        source.prefetch(region)
