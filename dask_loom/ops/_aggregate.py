"""``aggregate``: group the columns of a 2-D source by label, as a task graph.

Each task reads one full-width row band (whole stored chunks, about the
target block size), reduces its columns group by group (ops._kernels), and
returns ``(rows, n_groups)`` float64; nothing but the result is ever held
whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.cluster import compute
from dask_loom.ops._graph import task_name, tasks
from dask_loom.ops._kernels import GroupPlan, check_group_func, group_reduce
from dask_loom.ops._map import nbytes_of, read_into_buffer

__all__ = ["aggregate_columns"]


def _band(source: Any, region: tuple[slice, ...], plan: GroupPlan, func: str, select: np.ndarray | None) -> np.ndarray:
    band = read_into_buffer(source, region)
    if select is not None:
        band = band[:, select]
    return group_reduce(band, plan, func)


def aggregate_columns(
    source: Any,
    group_index: np.ndarray,
    n_groups: int,
    func: str,
    *,
    select: np.ndarray | None = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> np.ndarray:
    """``out[i, g] = func(source[i, columns of group g])`` for every row.

    Parameters
    ----------
    group_index
        Group of each (selected) column, ``0..n_groups-1``.
    select
        Indices of the columns taking part (default all).
    """
    func = check_group_func(func)
    shape = tuple(source.shape)
    plan = GroupPlan(group_index, n_groups)
    if len(plan.idx) != (shape[1] if select is None else len(select)):
        raise ValueError(f"{len(plan.idx)} group labels for {shape[1] if select is None else len(select)} columns")
    itemsize = np.dtype(source.dtype).itemsize
    bands = plan_blocks(shape, source.chunk_shape, itemsize, band_axis=0)
    regions = [r for _, r in block_regions(bands)]
    name = task_name("loom-aggregate", source, func, plan, None if select is None else select.tobytes())
    delayed = tasks(name, _band, [(source, r, plan, func, select) for r in regions])
    parts = compute(*delayed, scheduler=scheduler, client=client, progress=progress, nbytes=nbytes_of(source)) if delayed else []
    if not parts:
        return np.zeros((shape[0], n_groups))
    return np.concatenate(parts, axis=0)
