"""The graph of an out-of-core permutation: read bands, reorder them, write them to a new array.

Each task reads a block spanning the whole permuted axis (whole stored
chunks or shards along every other axis), reorders it in memory and writes
it to the same region of the target, so memory holds one block per worker
and no two tasks write one stored object.  The ordering is one key of the
graph, shipped once to each worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from dask.base import tokenize

from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.ops._engine import run_graph

__all__ = ["permute_blocks"]


def _permute_task(source: Any, region: tuple[slice, ...], ordering: np.ndarray, axis: int, write: Callable[[tuple[slice, ...], np.ndarray], None]) -> int:
    block = np.asarray(source.read_block(region))
    write(region, np.take(block, ordering, axis=axis))
    return int(block.size)


def permute_blocks(
    source: Any,
    write: Callable[[tuple[slice, ...], np.ndarray], None],
    ordering: np.ndarray,
    axis: int,
    *,
    prefix: str,
    scheduler: Any = None,
    client: Any = None,
) -> None:
    """Write ``source`` reordered by *ordering* along *axis* through ``write(region, block)``."""
    shape = tuple(int(s) for s in source.shape)
    if not np.prod(shape, dtype=np.float64):
        return
    unit = list(source.chunk_shape)
    unit[axis] = max(1, shape[axis])  # every block spans the permuted axis
    dt = np.dtype(source.dtype)
    plan = plan_blocks(shape, unit, 8 if dt.kind == "O" else dt.itemsize)
    tok = tokenize(source, ordering, axis, write)
    name = f"{prefix}-{tok}"
    order_key = (name, "ordering")
    dsk: dict[Any, Any] = {order_key: np.asarray(ordering, dtype=np.int64)}
    keys = []
    for i, (_, region) in enumerate(block_regions(plan)):
        dsk[(name, i)] = (_permute_task, source, region, order_key, axis, write)
        keys.append((name, i))
    run_graph(name, dsk, keys, scheduler=scheduler, client=client, nbytes=int(np.prod(shape, dtype=np.float64)) * dt.itemsize)
