"""``aggregate`` of a layer too wide for full-width bands, for functions needing a group's values together.

Medians, quantiles, unique counts, skew, kurtosis and trapezoids do not
combine from per-block partials.  Inside each row band the values are
shuffled by group instead: each block task cuts its selected columns into one
piece per *gather* (a set of groups, and a range of the band's rows where
one group alone is larger than the block size); each gather task
concatenates its pieces from every block of the band, puts the columns back
in the band path's order (their positions among the selected columns) and
reduces them with the band path's kernel (``group_reduce``).  A gather
holds about the block size of values, never the band; the band's result is
assembled from its gathers.
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any

import numpy as np

from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.ops._aggregate_tiles import ColumnMap, positions_of
from dask_loom.ops._kernels import GroupPlan, group_reduce
from dask_loom.ops._map import read_into_buffer

__all__ = ["gather_plan", "shuffle_graph"]


def gather_plan(
    counts: np.ndarray, n_rows: int, itemsize: int, target_bytes: int
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, ...]]]:
    """Sets of groups whose values in *n_rows* rows make about *target_bytes* each.

    Groups are taken in order and a set is closed before it would pass the
    target; a group larger than the target alone is a set whose rows are
    split into as many ranges as it takes.

    Returns
    -------
    set_of_group
        The set of each group (``-1`` for a group without columns).
    groups
        Each set's groups, sorted.
    row_bounds
        Each set's row ranges as bounds ``(0, ..., n_rows)``.
    """
    set_of_group = np.full(len(counts), -1, dtype=np.int64)
    groups: list[list[int]] = []
    held = 0
    for g in np.flatnonzero(counts).tolist():
        size = n_rows * int(counts[g]) * itemsize
        if not groups or held + size > target_bytes:
            groups.append([])
            held = 0
        groups[-1].append(g)
        held += size
        set_of_group[g] = len(groups) - 1
    bounds = []
    for gs in groups:
        size = n_rows * int(counts[gs].sum()) * itemsize
        step = -(-n_rows // max(1, math.ceil(size / target_bytes)))
        bounds.append((*range(0, n_rows, max(step, 1)), n_rows))
    return set_of_group, [np.asarray(gs, dtype=np.int64) for gs in groups], bounds


def _cut(
    source: Any,
    region: tuple[slice, ...],
    local: np.ndarray | None,
    gids: np.ndarray,
    positions: np.ndarray | int,
    set_of_group: np.ndarray,
    bounds: dict[int, tuple[int, ...]],
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One block's selected columns cut into ``{(set, row range): (values, positions, groups)}``."""
    block = read_into_buffer(source, region)  # this thread's buffer: the pieces below are copies
    pos = positions_of(positions, len(gids))
    sets = set_of_group[gids]
    order = np.argsort(sets, kind="stable")  # stable: each set's columns stay in position order
    edges = np.flatnonzero(np.diff(sets[order])) + 1
    out = {}
    for cols in np.split(order, edges):
        s = int(sets[cols[0]])
        values = block[:, cols if local is None else local[cols]]
        b = bounds[s]
        for k, (r0, r1) in enumerate(itertools.pairwise(b)):
            piece = values if len(b) == 2 else np.ascontiguousarray(values[r0:r1])
            out[(s, k)] = (piece, pos[cols], gids[cols])
    return out


def _gather(func: str, groups: np.ndarray, *pieces: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """*func* of *groups* over their pieces from every block of a band: ``(rows, len(groups))``."""
    values = np.concatenate([p[0] for p in pieces], axis=1) if len(pieces) > 1 else pieces[0][0]
    pos = np.concatenate([p[1] for p in pieces])
    gids = np.concatenate([p[2] for p in pieces])
    if len(pos) > 1 and not (np.diff(pos) > 0).all():  # an unsorted select: the band path's column order
        order = np.argsort(pos, kind="stable")
        values, gids = values[:, order], gids[order]
    return group_reduce(values, GroupPlan(np.searchsorted(groups, gids), len(groups)), func)


def _assemble(n_rows: int, n_groups: int, specs: list[tuple[np.ndarray, int, int]], *results: np.ndarray) -> np.ndarray:
    """A band's ``(rows, n_groups)`` result from its gathers'; groups without columns hold 0 (numpy-groupies' fill)."""
    out = np.zeros((n_rows, n_groups))
    for (groups, r0, r1), res in zip(specs, results, strict=True):
        out[r0:r1, groups] = res
    return out


def shuffle_graph(
    source: Any, plan: GroupPlan, select: np.ndarray | None, name: str, func: str, *, target_bytes: int
) -> list[Any]:
    """*func* by group of each row band through a shuffle by group: one ``Delayed`` per row band.

    Block tasks ``(name-cut, i)`` read blocks of about the block size;
    ``(name-piece, i, set, range)`` take one piece of a block's output (so a
    distributed gather fetches only its piece); gather tasks
    ``(name-gather, band, set, range)`` reduce a set of groups over about
    *target_bytes* of values; ``(name, band)`` assembles the band.
    """
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    shape = tuple(source.shape)
    itemsize = np.dtype(source.dtype).itemsize
    cmap = ColumnMap(select, plan.idx)
    dsk: dict[Any, Any] = {}
    bands: dict[int, list[tuple[int, slice, slice]]] = {}
    for i, ((ri, _), (rows, cols)) in enumerate(block_regions(plan_blocks(shape, source.chunk_shape, itemsize))):
        bands.setdefault(ri, []).append((i, rows, cols))
    outs = []
    per_cols: dict[tuple[int, int], Any] = {}  # one column map per column block, shared by its row bands
    for ri in sorted(bands):
        rows = bands[ri][0][1]
        n_rows = rows.stop - rows.start
        set_of_group, groups, bounds = gather_plan(plan.counts, n_rows, itemsize, target_bytes)
        inputs: dict[tuple[int, int], list[Any]] = {}
        for i, _, cols in bands[ri]:
            if (cols.start, cols.stop) not in per_cols:
                per_cols[cols.start, cols.stop] = cmap.block(cols)
            local, gids, positions = per_cols[cols.start, cols.stop]
            if not len(gids):
                continue
            here = np.unique(set_of_group[gids]).tolist()
            dsk[(f"{name}-cut", i)] = (_cut, source, (rows, cols), local, gids, positions, set_of_group, {s: bounds[s] for s in here})
            for s in here:
                for k in range(len(bounds[s]) - 1):
                    key = (f"{name}-piece", i, s, k)
                    dsk[key] = (operator.getitem, (f"{name}-cut", i), (s, k))
                    inputs.setdefault((s, k), []).append(key)
        specs, gathers = [], []
        for (s, k), keys in sorted(inputs.items()):
            key = (f"{name}-gather", ri, s, k)
            dsk[key] = (_gather, func, groups[s], *keys)
            specs.append((groups[s], bounds[s][k], bounds[s][k + 1]))
            gathers.append(key)
        dsk[(name, ri)] = (_assemble, n_rows, plan.n_groups, specs, *gathers)
        outs.append((name, ri))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return [Delayed(key, graph, layer=name) for key in outs]
