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
from dask_loom.blocks._readahead import reads_wait
from dask_loom.cluster import compute
from dask_loom.ops._graph import task_name, tasks
from dask_loom.ops._kernels import GroupPlan, check_group_func, group_reduce
from dask_loom.ops._map import nbytes_of, read_into_buffer

__all__ = ["aggregate_columns"]


def _staged_sums(source: Any, region: tuple[slice, ...], plan: GroupPlan) -> np.ndarray | None:
    """Group sums of a band from its decoded chunks, without assembling the band (or ``None``).

    The chunks stay in grid layout ``(gi, gj, c0, c1)``; one batched matrix
    product with the one-hot group matrix cut into chunk-wide pieces replaces
    the copy into row-major order (a pass over the whole band) and the
    product.  Columns past the last whole chunk are read and added apart.
    """
    read_staged = getattr(source, "read_staged", None)
    if read_staged is None or np.dtype(source.dtype) not in (np.float32, np.float64):
        return None
    rows, cols = region
    c1 = source.chunk_shape[1]
    inner = cols.start + (cols.stop - cols.start) // c1 * c1
    if inner == cols.start:
        return None
    staged = read_staged((rows, slice(cols.start, inner)))
    if staged is None:
        return None
    # The staged chunks may be smaller than the storage unit (a shard's inner chunks).
    gi, gj, c0, cw = staged.shape
    oh = plan.onehot(staged.dtype)
    pieces = oh[cols.start : inner].reshape(gj, cw, plan.n_groups)
    sums = np.matmul(staged, pieces[None]).sum(axis=1, dtype=np.float64).reshape(gi * c0, plan.n_groups)
    if inner < cols.stop:  # the staged buffer is reused by the next read: done with it above
        edge = read_into_buffer(source, (rows, slice(inner, cols.stop)))
        sums += edge.astype(staged.dtype, copy=False) @ oh[inner : cols.stop]
    return sums


def _band(source: Any, region: tuple[slice, ...], plan: GroupPlan, func: str, select: np.ndarray | None) -> np.ndarray:
    if select is None and func in ("sum", "mean"):
        sums = _staged_sums(source, region, plan)
        if sums is not None and np.isfinite(sums).all():  # NaN/inf: the band is reduced group by group below
            if func == "sum":
                return sums
            with np.errstate(invalid="ignore", divide="ignore"):  # an empty group's mean is NaN, as below
                return sums / plan.counts
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
    prefix: str = "loom-aggregate",
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
    prefix
        Task-name prefix (``<format>-aggregate``).
    """
    func = check_group_func(func)
    shape = tuple(source.shape)
    plan = GroupPlan(group_index, n_groups)
    if len(plan.idx) != (shape[1] if select is None else len(select)):
        raise ValueError(f"{len(plan.idx)} group labels for {shape[1] if select is None else len(select)} columns")
    itemsize = np.dtype(source.dtype).itemsize
    bands = plan_blocks(shape, source.chunk_shape, itemsize, band_axis=0)
    regions = [r for _, r in block_regions(bands)]
    name = task_name(prefix, source, func, plan, None if select is None else select.tobytes())
    delayed = tasks(name, _band, [(source, r, plan, func, select) for r in regions])
    parts = compute(*delayed, scheduler=scheduler, client=client, progress=progress, nbytes=nbytes_of(source), waits=reads_wait(source)) if delayed else []
    if not parts:
        return np.zeros((shape[0], n_groups))
    return np.concatenate(parts, axis=0)
