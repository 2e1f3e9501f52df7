"""Graph builders of ``dask_loom.map`` and ``dask_loom.aggregate`` for any source.

One engine for n-d arrays, collections of files (sources stacked along axis
0), CSR sources (blocks stay ``scipy.sparse``) and plain dask arrays (their
own blocks, as dependencies): each task reduces one block to small partial
statistics (ops._kernels), a tree of combine tasks merges the partials of
blocks covering the same output cells, and one task per output range turns
them into values.  Blocks are whole stored chunks (blocks.plan_blocks, or a
source's own ``plan_chunks`` where rows are not a regular grid).  The 2-D
fast paths of Loom-style layers (fused kernels over decoded chunks) live in
``_map`` and ``_aggregate`` and are chosen by ``_api``.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.base import tokenize

from dask_loom._config import block_size_bytes
from dask_loom._lazy import issparse
from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.cluster import compute
from dask_loom.ops._kernels import (
    GROUP_FUNCS,
    ROW_GROUP_NEEDS,
    Reduction,
    apply_vectors,
    csr_row_group_partials,
    finish,
    group_finish,
    group_partials,
    map_partials,
)
from dask_loom.ops._map import combine_tree, read_into_buffer
from dask_loom.ops._sources import SourceInfo

__all__ = ["Block", "blocks_of", "group_graph", "map_graph_nd", "plan_source", "read_part", "run_graph", "vector_graph"]


# -- blocks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One block: where it sits in the whole (source axes) and how a task gets it."""

    region: tuple[slice, ...]
    source: Any = None  # a chunk source read by the task ...
    local: tuple[slice, ...] = ()  # ... in its own coordinates
    key: Any = None  # or the dask key of a block of info.array


def plan_source(
    source: Any, *, band_axis: int | None = None, target_bytes: int | None = None, c_order: bool = False
) -> tuple[tuple[int, ...], ...]:
    """The dask chunks of a source: its own ``plan_chunks`` if it has one, else whole stored chunks (``plan_blocks``)."""
    own = getattr(source, "plan_chunks", None)
    if own is not None:
        return own(band_axis=band_axis, target_bytes=target_bytes)
    dt = np.dtype(source.dtype)
    itemsize = 8 if dt.kind == "O" else dt.itemsize
    return plan_blocks(source.shape, source.chunk_shape, itemsize, band_axis=band_axis, target_bytes=target_bytes, c_order=c_order)


def blocks_of(
    info: SourceInfo, *, band_axis: int | None = None, target_bytes: int | None = None, c_order: bool = False
) -> list[Block]:
    """Every block of the object, in C order per part.

    Several parts are stacked along axis 0, so their blocks are full-extent
    bands along axis 0 (``band_axis=0``): blocks of different parts then
    cover the same ranges of every other axis and their partials combine.
    *c_order*: blocks are runs of stored units in C order (``plan_blocks``).
    """
    out: list[Block] = []
    if info.array is not None:
        x = info.array
        bounds = [np.cumsum((0, *c)) for c in x.chunks]
        for idx in np.ndindex(*x.numblocks):
            region = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, idx))
            out.append(Block(region, key=(x.name, *idx)))
        return out
    if len(info.parts) > 1:
        band_axis = 0
    for src, off in zip(info.parts, info.offsets):
        if not math.prod(src.shape):
            continue
        for _, region in block_regions(plan_source(src, band_axis=band_axis, target_bytes=target_bytes, c_order=c_order)):
            glob = (slice(region[0].start + off, region[0].stop + off), *region[1:])
            out.append(Block(glob, src, region))
    return out


_TAKES_OUT: dict[type, bool] = {}


def _takes_out(source: Any) -> bool:
    t = type(source)
    if t not in _TAKES_OUT:
        try:
            _TAKES_OUT[t] = "out" in inspect.signature(t.read_block).parameters
        except (TypeError, ValueError):
            _TAKES_OUT[t] = False
    return _TAKES_OUT[t]


def read_part(source: Any, region: tuple[slice, ...], *, sparse: bool, reuse: bool = True) -> Any:
    """Read a region: CSR for a CSR source when *sparse*, else numpy (into this thread's buffer when *reuse*)."""
    if sparse and getattr(source, "sparse", False):
        return source.read_sparse(region)
    if reuse and _takes_out(source):
        return read_into_buffer(source, region)
    return np.asarray(source.read_block(region))


def _token(info: SourceInfo) -> str:
    return tokenize(*info.parts) if info.parts else info.array.name


# -- running ------------------------------------------------------------------------------


def run_graph(
    name: str,
    dsk: dict[Any, Any],
    keys: list[Any],
    *,
    dependencies: tuple[Any, ...] = (),
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
    nbytes: int | None = None,
) -> list[Any]:
    """Compute the values of *keys* of a graph (on top of the graphs of *dependencies*)."""
    if not keys:
        return []
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    hlg = HighLevelGraph.from_collections(name, dsk, dependencies=list(dependencies))
    return list(compute(*[Delayed(k, hlg, layer=name) for k in keys], scheduler=scheduler, client=client, progress=progress, nbytes=nbytes))


# -- map: recognised reductions -------------------------------------------------------------


def _map_read(source: Any, region: tuple[slice, ...], axis: int, needs: tuple[str, ...]) -> dict[str, np.ndarray]:
    return map_partials(read_part(source, region, sparse=True), axis, needs)


def _map_block(block: Any, axis: int, needs: tuple[str, ...]) -> dict[str, np.ndarray]:
    return map_partials(block, axis, needs)


def _map_finish(parts: dict[str, np.ndarray], reductions: list[Reduction]) -> list[np.ndarray]:
    return finish(parts, reductions)


def map_graph_nd(
    info: SourceInfo, reductions: list[Reduction], axis: int, *, prefix: str, split_every: int = 8
) -> tuple[dict[Any, Any], list[Any], Callable[[list[Any]], list[np.ndarray]]]:
    """One pass of recognised reductions along source axis *axis*: ``(graph, output keys, assemble)``."""
    needs = tuple(sorted({n for r in reductions for n in r.needs}))
    tok = tokenize(_token(info), axis, needs)
    name = f"{prefix}-{tok}"
    dsk: dict[Any, Any] = {}
    groups: dict[Hashable, list[Any]] = defaultdict(list)
    for i, b in enumerate(blocks_of(info)):
        key = (name, i)
        dsk[key] = (_map_read, b.source, b.local, axis, needs) if b.source is not None else (_map_block, b.key, axis, needs)
        groups[(b.region[axis].start, b.region[axis].stop)].append(key)
    finals = {o: keys[0] for o, keys in combine_tree(dsk, groups, f"{prefix}-combine-{tok}", split_every).items()}
    outs = []
    for j, o in enumerate(sorted(finals)):
        key = (f"{prefix}-result-{tok}", j)
        dsk[key] = (_map_finish, finals[o], reductions)
        outs.append(key)
    n = len(reductions)
    return dsk, outs, lambda results: [np.concatenate([r[k] for r in results]) for k in range(n)]


# -- map: any function, called per vector ---------------------------------------------------


def _vectors(block: Any, axis: int, funcs: list[Any]) -> list[np.ndarray]:
    if issparse(block):
        block = block.toarray()  # an arbitrary function gets dense vectors, as loompy gives them
    block = np.asarray(block)
    k = block.shape[axis]
    vecs = np.moveaxis(block, axis, 0).reshape(k, -1)
    return apply_vectors(vecs, 1, funcs)


def _vector_read(source: Any, region: tuple[slice, ...], axis: int, funcs: list[Any]) -> list[np.ndarray]:
    return _vectors(read_part(source, region, sparse=False), axis, funcs)


def _slab(source: Any, region: tuple[slice, ...]) -> np.ndarray:
    return read_part(source, region, sparse=False, reuse=False)


def _vector_gather(axis: int, funcs: list[Any], *slabs: np.ndarray) -> list[np.ndarray]:
    return _vectors(np.concatenate(slabs, axis=0), axis, funcs)


def vector_graph(
    info: SourceInfo, funcs: list[Any], axis: int, *, prefix: str, chunksize: int = 1000
) -> tuple[dict[Any, Any], list[Any], Callable[[list[Any]], list[np.ndarray]], tuple[Any, ...]]:
    """Functions called on every vector along source axis *axis*: ``(graph, keys, assemble, dependencies)``.

    Each task holds a band of about *chunksize* vectors, whole along every
    other axis (whole stored chunks; for a collection and ``axis != 0``, one
    read per file and one task joining them).
    """
    shape = info.source_shape
    tok = tokenize(_token(info), axis, funcs, chunksize)
    name = f"{prefix}-{tok}"
    dsk: dict[Any, Any] = {}
    outs: list[Any] = []
    deps: tuple[Any, ...] = ()
    itemsize = info.dtype.itemsize
    vec_bytes = max(1, math.prod(s for i, s in enumerate(shape) if i != axis) * itemsize)
    target = max(1, min(block_size_bytes(), max(1, int(chunksize)) * vec_bytes))
    if info.array is not None:
        y = info.array.rechunk({i: -1 for i in range(len(shape)) if i != axis})
        deps = (y,)
        for j in range(y.numblocks[axis]):
            idx = [0] * len(shape)
            idx[axis] = j
            key = (name, j)
            dsk[key] = (_vector_block, (y.name, *idx), axis, funcs)
            outs.append(key)
    elif len(info.parts) == 1 or axis == 0:
        for src in info.parts:
            if not math.prod(src.shape):
                continue
            for _, region in block_regions(plan_source(src, band_axis=axis, target_bytes=target)):
                key = (name, len(outs))
                dsk[key] = (_vector_read, src, region, axis, funcs)
                outs.append(key)
    else:
        width = max(1, target // max(1, shape[0] * itemsize * math.prod(s for i, s in enumerate(shape) if i not in (0, axis))))
        gname = f"{prefix}-result-{tok}"
        for j, start in enumerate(range(0, shape[axis], width)):
            stop = min(shape[axis], start + width)
            slabs = []
            for p, src in enumerate(info.parts):
                if not src.shape[0]:
                    continue
                region = tuple(slice(start, stop) if i == axis else slice(0, s) for i, s in enumerate(src.shape))
                dsk[(name, j, p)] = (_slab, src, region)
                slabs.append((name, j, p))
            dsk[(gname, j)] = (_vector_gather, axis, funcs, *slabs)
            outs.append((gname, j))
    n = len(funcs)
    return dsk, outs, lambda results: [np.concatenate([r[k] for r in results]).astype(np.float64) for k in range(n)], deps


def _vector_block(block: Any, axis: int, funcs: list[Any]) -> list[np.ndarray]:
    return _vectors(block, axis, funcs)


# -- aggregate ------------------------------------------------------------------------------


def _group_read(source: Any, region: tuple[slice, ...], axis: int, idx: np.ndarray, n_groups: int, needs: tuple[str, ...]) -> dict[str, np.ndarray]:
    idx = idx.astype(np.intp, copy=False)  # it travelled in the smallest integer type
    if axis == 0 and ROW_GROUP_NEEDS.issuperset(needs) and hasattr(source, "read_csr_parts"):
        # Sums of CSR rows by group (pseudobulk) straight from the stored arrays: no scipy matrix.
        parts = source.read_csr_parts(region)
        if parts is not None and parts[0].dtype.kind in "biuf":
            return csr_row_group_partials(*parts, source.shape[1], idx, n_groups, needs)
    return group_partials(read_part(source, region, sparse=True), axis, idx, n_groups, needs)


def _group_block(block: Any, axis: int, idx: np.ndarray, n_groups: int, needs: tuple[str, ...]) -> dict[str, np.ndarray]:
    return group_partials(block, axis, idx.astype(np.intp, copy=False), n_groups, needs)


def _group_finish(parts: dict[str, np.ndarray], funcs: list[str]) -> list[np.ndarray]:
    return group_finish(parts, funcs)


def group_graph(
    info: SourceInfo,
    idx: np.ndarray,
    n_groups: int,
    funcs: list[str],
    axis: int,
    *,
    prefix: str,
    split_every: int = 8,
) -> tuple[dict[Any, Any], list[Any], Callable[[list[Any]], list[np.ndarray]]]:
    """Group source axis *axis* by ``idx`` (``0..n_groups-1`` per index): ``(graph, keys, assemble)``.

    ``assemble`` returns one float64 array per function, of the source's
    shape with *axis* replaced by ``n_groups``.
    """
    shape = info.source_shape
    needs = tuple(sorted({n for f in funcs for n in GROUP_FUNCS[f]}))
    # 2-D: blocks spanning the whole grouped axis need no combining, unless such a band is more
    # than a block (a band of shards across many cells): then blocks of about the block size,
    # combined, so that no task is bigger than the rest (ops._aggregate says why).
    band = (1 - axis) if (len(shape) == 2 and len(info.parts) == 1) else None
    blocks = blocks_of(info, band_axis=band)
    if band is not None:
        itemsize = np.dtype(info.parts[0].dtype).itemsize
        if max(math.prod(r.stop - r.start for r in b.region) for b in blocks) * itemsize > block_size_bytes():
            blocks = blocks_of(info, c_order=True)  # each block's bytes together in the file
    tok = tokenize(_token(info), axis, needs, idx, n_groups)
    name = f"{prefix}-{tok}"
    dsk: dict[Any, Any] = {}
    groups: dict[Hashable, list[Any]] = defaultdict(list)
    # Each span of the grouped axis carries its labels once, shared by every block over it (a graph
    # is pickled whole), in the smallest integer type: an atlas's labels travel as 3.3 MB, not 26 per band.
    small = np.asarray(idx).astype(np.min_scalar_type(max(n_groups - 1, 0)))
    spans: dict[tuple[int, int], np.ndarray] = {}
    for i, b in enumerate(blocks):
        span = b.region[axis]
        local = spans.get((span.start, span.stop))
        if local is None:
            local = spans[span.start, span.stop] = np.ascontiguousarray(small[span])
        key = (name, i)
        if b.source is not None:
            dsk[key] = (_group_read, b.source, b.local, axis, local, n_groups, needs)
        else:
            dsk[key] = (_group_block, b.key, axis, local, n_groups, needs)
        groups[tuple((r.start, r.stop) for d, r in enumerate(b.region) if d != axis)].append(key)
    finals = {o: keys[0] for o, keys in combine_tree(dsk, groups, f"{prefix}-combine-{tok}", split_every).items()}
    order = sorted(finals)
    outs = []
    for j, o in enumerate(order):
        key = (f"{prefix}-result-{tok}", j)
        dsk[key] = (_group_finish, finals[o], funcs)
        outs.append(key)
    out_shape = tuple(n_groups if d == axis else s for d, s in enumerate(shape))

    def assemble(results: list[Any]) -> list[np.ndarray]:
        out = [np.zeros(out_shape) for _ in funcs]
        for o, res in zip(order, results):
            it = iter(o)
            place = tuple(slice(None) if d == axis else slice(*next(it)) for d in range(len(shape)))
            for f, v in enumerate(res):
                out[f][place] = v
        return out

    return dsk, outs, assemble
