"""``map``: functions along rows or columns as one task graph.

Recognised reductions share one blockwise pass: each task reads one block
(whole stored chunks) into a reused buffer and returns small partial sums;
a tree of combine tasks merges the partials of blocks that cover the same
rows.  Other functions run per vector on full-width bands.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from dask_loom._config import block_size_bytes
from dask_loom.blocks import block_regions, plan_blocks
from dask_loom.blocks._readahead import read_ahead, reads_wait
from dask_loom.cluster import compute
from dask_loom.ops._graph import prefetch_later, read_later, task_name
from dask_loom.ops._kernels import (
    Reduction,
    apply_vectors,
    block_partials,
    combine_partials,
    finish,
    recognise,
    staged_partials,
)

__all__ = ["combine_tree", "map_graph", "map_source", "nbytes_of", "read_into_buffer", "staged_unit"]

_local = threading.local()


def read_into_buffer(source: Any, region: tuple[slice, ...]) -> np.ndarray:
    """Read a block into this thread's reusable buffer.

    Fresh memory is expensive (page faults on every new 64 MiB block); a
    per-thread buffer is touched once and reused by every block of a pass.
    The returned array is only valid until the thread's next call.
    """
    shape = tuple(r.stop - r.start for r in region)
    dtype = np.dtype(source.dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < n:
        buf = np.empty(max(n, 1), dtype=np.uint8)
        _local.buf = buf
    out = buf[:n].view(dtype).reshape(shape)
    res = read_ahead(source, region, out)
    return out if res is None else res


def _local_selection(sel: np.ndarray | None, start: int, stop: int) -> np.ndarray | slice | None:
    if sel is None:
        return None
    lo, hi = np.searchsorted(sel, [start, stop])
    local = sel[lo:hi] - start
    if len(local) == stop - start:
        return None
    return local


def staged_unit(source: Any) -> tuple[int, ...]:
    """The chunk shape *source* stages (``staged_chunk_shape``, else its stored chunk)."""
    return tuple(getattr(source, "staged_chunk_shape", None) or source.chunk_shape)


def interior_split(source: Any, region: tuple[slice, ...]) -> list[list[tuple[slice, slice]]] | None:
    """Split a 2-D block into its whole-chunk interior and the partial chunks at the array edge.

    Returns ``parts[r][c]`` (row part *r*, column part *c*, at most 2 x 2) or
    ``None`` when the source cannot hand out decoded chunks
    (``read_staged``).  Interior parts can be reduced on the decoded chunks
    directly; the thin edge parts are read the ordinary way.  Whole chunks
    are those the source stages (a sharded array's inner chunks).
    """
    if not hasattr(source, "read_staged") or len(region) != 2:
        return None
    cuts = []
    for r, c, n in zip(region, staged_unit(source), source.shape):
        if r.start % c:
            return None
        inner = min(r.stop, (n // c) * c) if r.stop == n else r.stop
        if r.stop != n and r.stop % c:
            return None
        cuts.append([slice(r.start, inner)] + ([slice(inner, r.stop)] if inner < r.stop else []))
    return [[(rs, cs) for cs in cuts[1] if cs.stop > cs.start] for rs in cuts[0] if rs.stop > rs.start]


def _partials_of(source: Any, region: tuple[slice, slice], red: int, needs: tuple[str, ...], interior: bool) -> dict[str, np.ndarray]:
    pieces = source.staged_pieces(region) if interior and hasattr(source, "staged_pieces") else None
    if pieces is not None:
        # Rows of chunks a few MiB at a time (see piece_spans): rows stack, columns add up.
        parts = [staged_partials(st, red, needs) for st in pieces]
        if red == 1:
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return combine_partials(parts)
    staged = source.read_staged(region) if interior else None
    if staged is not None and staged.ndim == 4:
        return staged_partials(staged, red, needs)
    return block_partials(read_into_buffer(source, region), red, needs)


def _partials_task(
    source: Any, region: tuple[slice, ...], red: int, needs: tuple[str, ...], local: Any, later: Any = None
) -> dict[str, np.ndarray]:
    prefetch_later(source, later)
    parts = interior_split(source, region) if local is None else None
    if parts is not None:
        # Reduce along `red` within each kept slab, then lay the slabs side by side.
        if red == 1:
            slabs = [combine_partials([_partials_of(source, rc, red, needs, i == 0 and j == 0) for j, rc in enumerate(row)]) for i, row in enumerate(parts)]
        else:
            cols = list(zip(*parts))
            slabs = [combine_partials([_partials_of(source, rc, red, needs, i == 0 and j == 0) for i, rc in enumerate(col)]) for j, col in enumerate(cols)]
        return {k: np.concatenate([sl[k] for sl in slabs]) for k in slabs[0]}
    block = read_into_buffer(source, region)
    if local is not None:
        block = block[:, local] if red == 1 else block[local, :]
    return block_partials(block, red, needs)


def _combine_task(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return combine_partials(list(parts))


def combine_tree(
    dsk: dict[Any, Any], groups: dict[Hashable, list[Any]], cname: str, split_every: int, *, until: int = 1
) -> dict[Hashable, list[Any]]:
    """Combine the partials (``combine_partials``) of each group's keys in a tree of fan-in *split_every*.

    Levels are added to *dsk* as ``(cname, depth, group ordinal, i)`` until a
    group has at most *until* keys; returns each group's remaining keys.
    """
    level = {o: list(keys) for o, keys in groups.items()}
    ordinal = {o: i for i, o in enumerate(sorted(level))}
    depth = 0
    while any(len(v) > until for v in level.values()):
        for o, keys in level.items():
            if len(keys) <= until:
                continue
            merged = []
            for g, k in enumerate(range(0, len(keys), split_every)):
                key = (cname, depth, ordinal[o], g)
                dsk[key] = (_combine_task, *keys[k : k + split_every])
                merged.append(key)
            level[o] = merged
        depth += 1
    return level


def _finish_task(parts: dict[str, np.ndarray], reductions: list[Reduction]) -> list[np.ndarray]:
    return finish(parts, reductions)


def _combine_finish_task(reductions: list[Reduction], *parts: dict[str, np.ndarray]) -> list[np.ndarray]:
    return finish(combine_partials(list(parts)), reductions)


def _band_task(
    source: Any,
    region: tuple[slice, ...],
    red: int,
    local: Any,
    funcs: list[Any],
) -> list[np.ndarray]:
    block = read_into_buffer(source, region)
    if local is not None:
        block = block[:, local] if red == 1 else block[local, :]
    out: list[np.ndarray | None] = [None] * len(funcs)
    recognised = [(i, r) for i, r in enumerate(recognise(f) for f in funcs) if r is not None]
    if recognised:
        needs = tuple(sorted({n for _, r in recognised for n in r.needs}))
        vals = finish(block_partials(block, red, needs), [r for _, r in recognised])
        for (i, _), v in zip(recognised, vals):
            out[i] = v
    others = [i for i in range(len(funcs)) if out[i] is None]
    if others:
        for i, v in zip(others, apply_vectors(block, red, [funcs[i] for i in others])):
            out[i] = v
    return out  # type: ignore[return-value]


def _normalise_selection(selection: Any, n: int, where: str) -> np.ndarray | None:
    if selection is None:
        return None
    sel = np.asarray(selection)
    if sel.dtype.kind == "b":
        if len(sel) != n:
            raise ValueError(f"{where}: selection mask has {len(sel)} entries, expected {n}")
        sel = np.flatnonzero(sel)
    elif sel.dtype.kind in "iu":
        sel = np.where(sel < 0, sel + n, sel).astype(np.int64)
        if len(sel) and (sel.min() < 0 or sel.max() >= n):
            raise IndexError(f"{where}: selection index out of range for size {n}")
        sel = np.unique(sel)
    else:
        raise TypeError(f"{where}: selection must be a bool mask or integer indices, not {sel.dtype}")
    return sel


def map_graph(
    source: Any,
    f_list: list[Callable[[np.ndarray], Any] | str],
    *,
    axis: int = 0,
    chunksize: int = 1000,
    selection: Any = None,
    prefix: str = "loom-map",
    split_every: int = 8,
) -> tuple[dict[Any, Any], list[Any], Any]:
    """The task graph of :func:`map_source`: ``(graph, output keys, assemble)``.

    ``assemble(results)`` turns the outputs' values into the list of arrays.
    Building it costs time in proportion to the number of blocks, never to the
    number of stored chunks.
    """
    if not isinstance(f_list, (list, tuple)):
        raise ValueError("f_list must be a list of functions, not a single function")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, not {axis!r}")
    shape = tuple(source.shape)
    where = getattr(source, "label", "layer")
    sel = _normalise_selection(selection, shape[1 - axis], where)
    red = 1 - axis
    n_out = shape[axis]
    funcs = list(f_list)
    reductions = [recognise(f) for f in funcs]
    dtype = np.dtype(source.dtype)
    if shape[red] == 0 and sel is None:
        sel = np.empty(0, dtype=np.int64)  # nothing to reduce: numpy's answer on an empty vector
    if n_out == 0 or not funcs or (sel is not None and len(sel) == 0):
        vals = _empty_results(funcs, n_out, dtype, sel)
        return {}, [], lambda results: vals

    if all(r is not None for r in reductions):
        # Sources that store their chunks in C order on an object store (a remote HDF5
        # .loom) prefer row bands: a band is then one run of bytes, read in few requests.
        plan = plan_blocks(shape, source.chunk_shape, dtype.itemsize, band_axis=getattr(source, "contiguous_axis", None))
        needs = tuple(sorted({n for r in reductions for n in r.needs}))  # type: ignore[union-attr]
        name = task_name(prefix, source, axis, needs, None if sel is None else sel.tobytes())
        dsk: dict[Any, Any] = {}
        level: dict[int, list[Any]] = {i: [] for i in range(len(plan[axis]))}
        reads = {}
        for idx, region in block_regions(plan):
            local = _local_selection(sel, region[red].start, region[red].stop)
            if sel is not None and local is not None and len(local) == 0:
                continue
            key = (name, *idx)
            dsk[key] = (_partials_task, source, region, red, needs, local)
            reads[key] = region
            level[idx[axis]].append(key)
        cname = name.replace(prefix, f"{prefix}-combine", 1)
        # Combine until a row's partials fit one task, which also finishes them: no task of its
        # own for the last combine (a few ms of scheduling each against tasks of tens of ms).
        level = combine_tree(dsk, level, cname, split_every, until=split_every)
        rname = name.replace(prefix, f"{prefix}-result", 1)
        outs = []
        for i in sorted(level):
            key = (rname, i)
            keys = level[i]
            dsk[key] = (_finish_task, keys[0], reductions) if len(keys) == 1 else (_combine_finish_task, reductions, *keys)
            outs.append(key)
        for key, later in read_later(source, dsk, reads).items():
            dsk[key] = (*dsk[key], later)
        return dsk, outs, lambda results: [np.concatenate([r[k] for r in results]) for k in range(len(funcs))]

    # Per-vector functions: full-width bands of about `chunksize` vectors.
    vec_bytes = shape[red] * dtype.itemsize
    target = min(block_size_bytes(), max(1, int(chunksize)) * vec_bytes)
    plan = plan_blocks(shape, source.chunk_shape, dtype.itemsize, target_bytes=max(target, 1), band_axis=axis)
    name = task_name(prefix, source, axis, funcs, None if sel is None else sel.tobytes())
    dsk = {}
    outs = []
    for idx, region in block_regions(plan):
        key = (name, idx[axis])
        dsk[key] = (_band_task, source, region, red, sel, funcs)
        outs.append(key)
    return dsk, outs, lambda results: [np.concatenate([r[k] for r in results]).astype(np.float64) for k in range(len(funcs))]


def _empty_results(funcs: list[Any], n_out: int, dtype: np.dtype, sel: Any) -> list[np.ndarray]:
    if n_out == 0 or sel is None:
        return [np.zeros(n_out, dtype=np.float64) for _ in funcs]
    # numpy's answer on an empty vector, computed once.
    empty = np.empty(0, dtype=dtype)
    vals = []
    for f in funcs:
        with np.errstate(all="ignore"):
            try:
                v = float(f(empty)) if not isinstance(f, str) else float(getattr(np, f)(empty))
            except ValueError:
                v = np.nan
        vals.append(np.full(n_out, v))
    return vals


def map_source(
    source: Any,
    f_list: list[Callable[[np.ndarray], Any] | str],
    *,
    axis: int = 0,
    chunksize: int = 1000,
    selection: Any = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
    prefix: str = "loom-map",
    split_every: int = 8,
) -> list[np.ndarray]:
    """Apply functions along *axis* of a 2-D chunk source (see ``LoomConnection.map``)."""
    dsk, outs, assemble = map_graph(source, f_list, axis=axis, chunksize=chunksize, selection=selection, prefix=prefix, split_every=split_every)
    results = _run(dsk, outs, scheduler, client, progress, nbytes=nbytes_of(source), waits=reads_wait(source)) if outs else []
    return assemble(results)


def nbytes_of(source: Any) -> int:
    """Bytes a full pass over a chunk source reads (decoded)."""
    return int(np.prod(source.shape, dtype=np.float64)) * np.dtype(source.dtype).itemsize


def _run(
    dsk: dict[Any, Any], keys: list[Any], scheduler: Any, client: Any, progress: bool, *, nbytes: int | None = None, waits: bool = False
) -> list[Any]:
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    hlg = HighLevelGraph.from_collections("map", dsk, dependencies=())
    delayed = [Delayed(k, hlg, layer="map") for k in keys]
    return list(compute(*delayed, scheduler=scheduler, client=client, progress=progress, nbytes=nbytes, waits=waits))
