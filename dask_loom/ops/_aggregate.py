"""``aggregate``: group the columns of a 2-D source by label, as a task graph.

Each task reads one full-width row band (whole stored chunks, about the
target block size), reduces its columns group by group (ops._kernels), and
returns ``(rows, n_groups)`` float64; nothing but the result is ever held
whole.  Where a band one stored unit tall is wider than a block (an atlas
of millions of cells: a row of 7,424 x 4,096 shards across 3.3 M cells is
49 GB), the functions whose partials combine exactly (sums, means,
variances, extremes, products, argmax/argmin, first/last and their
nan-aware forms; ops._aggregate_tiles) are taken over blocks of about the
block size and combined a row band at a time, in a tree; where such a band
is wider than four blocks, the others (median, nunique, quantiles, skew,
kurtosis, trapezoid) shuffle each band's values by group into gathers of
about the block size (ops._aggregate_shuffle).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_loom._config import block_size_bytes
from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.blocks._readahead import reads_wait
from dask_loom.cluster import compute
from dask_loom.ops._aggregate_shuffle import shuffle_graph
from dask_loom.ops._aggregate_tiles import PICKS, TILED, ColumnMap, tile_partials, tiled_finish
from dask_loom.ops._graph import prefetch_later, read_later, task_name, tasks
from dask_loom.ops._kernels import GROUP_FUNCS, GroupPlan, check_group_func, group_partials, group_reduce
from dask_loom.ops._map import combine_tree, nbytes_of, read_into_buffer, staged_unit

__all__ = ["aggregate_columns"]


def _sum_dtype(dtype: np.dtype, width: int) -> np.dtype | None:
    """The float type a chunk of *width* columns is summed in exactly, or ``None`` (not staged).

    Floats as they are.  Integers in float32 where every partial sum of a
    chunk row, at most ``width`` values, stays below 2**24 (uint16 counts in
    chunks up to 256 wide: BLAS's sgemm, twice dgemm's speed, gives the exact
    integers); else float64 for up to 32 bits.  64-bit integers are left to
    the band path.
    """
    if dtype in (np.float32, np.float64):
        return dtype
    if dtype.kind not in "iu" or dtype.itemsize > 4:
        return None
    info = np.iinfo(dtype)
    return np.dtype(np.float32) if max(abs(info.min), info.max) * width < 2**24 else np.dtype(np.float64)


def _staged_sums(source: Any, region: tuple[slice, ...], plan: GroupPlan) -> np.ndarray | None:
    """Group sums of a band from its decoded chunks, without assembling the band (or ``None``).

    The chunks stay in grid layout ``(gi, gj, c0, c1)``; one batched matrix
    product with the one-hot group matrix cut into chunk-wide pieces replaces
    the copy into row-major order (a pass over the whole band) and the
    product.  Integer chunks are cast a row of chunks at a time (a few MiB,
    never the band).  Columns past the last whole chunk are read and added
    apart.
    """
    read_staged = getattr(source, "read_staged", None)
    dt = np.dtype(source.dtype)
    if read_staged is None or _sum_dtype(dt, 1) is None:
        return None
    rows, cols = region
    c1 = staged_unit(source)[1]
    inner = cols.start + (cols.stop - cols.start) // c1 * c1
    if inner == cols.start:
        return None
    region = (rows, slice(cols.start, inner))
    staged_pieces = getattr(source, "staged_pieces", None)
    # A few rows of chunks at a time where the source can (see piece_spans), else the whole band.
    runs = staged_pieces(region) if staged_pieces is not None else None
    if runs is None:
        staged = read_staged(region)
        if staged is None:
            return None
        runs = iter([staged])
    bands: list[np.ndarray] = []
    onehot = None
    for staged in runs:
        # The staged chunks may be smaller than the storage unit (a shard's inner chunks).
        gi, gj, c0, cw = staged.shape
        if onehot is None:
            work = _sum_dtype(dt, cw)
            if work is None:
                return None
            # plan describes the region's columns: its rows of the one-hot matrix count from cols.start;
            # cut into chunk-wide pieces for the batched product.
            onehot = plan.onehot(work)[: inner - cols.start].reshape(gj, cw, plan.n_groups)
        if work == dt:
            bands.append(np.matmul(staged, onehot[None]).sum(axis=1, dtype=np.float64).reshape(gi * c0, plan.n_groups))
        else:
            sums = np.empty((gi, c0, plan.n_groups))
            for i in range(gi):
                np.matmul(staged[i].astype(work), onehot).sum(axis=0, dtype=np.float64, out=sums[i])
            bands.append(sums.reshape(gi * c0, plan.n_groups))
    sums = bands[0] if len(bands) == 1 else np.concatenate(bands)
    if inner < cols.stop:  # the staged buffer is reused by the next read: done with it above
        edge = read_into_buffer(source, (rows, slice(inner, cols.stop)))
        sums += edge.astype(np.float64) @ plan.onehot(np.float64)[inner - cols.start :]
    return sums


def _band(
    source: Any, region: tuple[slice, ...], plan: GroupPlan, func: str, select: np.ndarray | None, later: Any = None
) -> np.ndarray:
    prefetch_later(source, later)  # see ops._graph.read_later
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


def _tile(
    source: Any,
    region: tuple[slice, ...],
    plan: GroupPlan,
    select: np.ndarray | None,
    func: str,
    positions: np.ndarray | int = 0,
    later: Any = None,
) -> dict[str, np.ndarray]:
    """Partials of *func* over one block (*select*: its block-local selected columns, in position order)."""
    prefetch_later(source, later)
    if func in ("sum", "mean"):
        return {"s1": _band(source, region, plan, "sum", select)}
    if func == "nanmean" and np.dtype(source.dtype).kind != "f":  # no NaN: the mean's sums, from the decoded chunks
        s1 = _band(source, region, plan, "sum", select)
        return {"nn": np.repeat(plan.counts[None, :].astype(np.float64), len(s1), axis=0), "ns1": s1}
    block = read_into_buffer(source, region)
    if select is not None:
        block = block[:, select]
    if func in GROUP_FUNCS:
        return group_partials(block, 1, plan.idx, plan.n_groups, GROUP_FUNCS[func])
    return tile_partials(block, plan, func, positions)


def _tiled_sums(source: Any, plan: GroupPlan, select: np.ndarray | None, name: str, cname: str, func: str, split_every: int = 8) -> list[Any]:
    """*func* by group of each row band from blocks of about the block size: one ``Delayed`` per row band.

    For the functions of :data:`~dask_loom.ops._aggregate_tiles.TILED`.
    Each block reduces its own selected columns (sums on its staged chunks
    where it can) with the groups of those columns alone, so no task holds
    more than a block and a few ``(rows, n_groups)`` partials; a band's
    partials are combined in a tree of *split_every*
    (:func:`~dask_loom.ops._map.combine_tree`), then finished.
    """
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    shape = tuple(source.shape)
    cmap = ColumnMap(select, plan.idx)
    dsk: dict[Any, Any] = {}
    reads: dict[Any, tuple[slice, ...]] = {}
    bands: dict[int, list[Any]] = {}  # every band has blocks: some column takes part (the caller checks)
    # One plan per column block, shared by its row bands: a graph is pickled whole, so it travels once.
    per_cols: dict[tuple[int, int], tuple[Any, GroupPlan, Any]] = {}
    # Runs of chunks along the rows (one unit tall here): in a file's C order each tile's bytes lie
    # together.  Square tiles of a row-major HDF5 file read 26x their bytes from an object store
    # (its holes, other tiles' chunks, are read through).
    tiles = plan_blocks(shape, source.chunk_shape, np.dtype(source.dtype).itemsize, c_order=True)
    for i, ((ri, _), (rows, cols)) in enumerate(block_regions(tiles)):
        if (cols.start, cols.stop) not in per_cols:
            local, gids, positions = cmap.block(cols)
            per_cols[cols.start, cols.stop] = (local, GroupPlan(gids, plan.n_groups), positions)
        local, bplan, positions = per_cols[cols.start, cols.stop]
        if len(bplan.idx):
            # Positions only where a pick (argmax, first ...) needs them, and then an int where they run on.
            dsk[(name, i)] = (_tile, source, (rows, cols), bplan, local, func, positions if func in PICKS else 0)
            reads[(name, i)] = (rows, cols)
            bands.setdefault(ri, []).append((name, i))
    # A band's last at most split_every partials are combined by its result task.
    finals = combine_tree(dsk, bands, cname, split_every, until=split_every)
    outs = []
    rname = cname.replace("-combine", "-result", 1)  # <format>-aggregate-result, as map's results
    for ri in sorted(finals):
        key = (rname, ri)
        dsk[key] = (tiled_finish, plan.counts, func, *finals[ri])
        outs.append(key)
    for key, later in read_later(source, dsk, reads).items():
        dsk[key] = (*dsk[key], later)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return [Delayed(key, graph, layer=name) for key in outs]


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
    name = task_name(prefix, source, func, plan, None if select is None else select.tobytes())
    band_bytes = max(bands[0]) * shape[1] * itemsize if len(plan.idx) else 0
    # A band task saves a combine only while it reads about a block: on two workers, 8 band tasks
    # of two blocks each ran 5 on one and 3 on the other (docs/scale.md).  A shuffle moves every
    # value between workers, so it waits until a band could not be held at all.
    if func in TILED and band_bytes > block_size_bytes():
        delayed = _tiled_sums(source, plan, select, name, f"{prefix}-combine-{name.rpartition('-')[2]}", func)
    elif band_bytes > 4 * block_size_bytes():
        delayed = shuffle_graph(source, plan, select, name, func, target_bytes=block_size_bytes())
    else:
        regions = [r for _, r in block_regions(bands)]
        args = [(source, r, plan, func, select) for r in regions]
        later = read_later(source, {(name, i): (_band, *a) for i, a in enumerate(args)}, {(name, i): r for i, r in enumerate(regions)})
        delayed = tasks(name, _band, [(*a, later[name, i]) if (name, i) in later else a for i, a in enumerate(args)])
    parts = compute(*delayed, scheduler=scheduler, client=client, progress=progress, nbytes=nbytes_of(source), waits=reads_wait(source)) if delayed else []
    if not parts:
        return np.zeros((shape[0], n_groups))
    return np.concatenate(parts, axis=0)
