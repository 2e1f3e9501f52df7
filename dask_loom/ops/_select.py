"""Orthogonal selections read as task graphs, touching only the chunks they need."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from dask_loom._indexing import AxisSel
from dask_loom.blocks import selection_bands, units_per_block
from dask_loom.blocks._readahead import reads_wait
from dask_loom.cluster import compute
from dask_loom.ops._graph import task_name, tasks

__all__ = ["read_selection", "read_selections", "selection_tasks"]


def _bands_for(sel: AxisSel, n: int, unit: int, max_units: int) -> list[tuple[int, int, Any, int, int]]:
    """Per axis: (band_start, band_stop, local index, out_start, out_stop) in sorted-unique space."""
    out = []
    if sel.kind in ("int", "range"):
        if sel.stop <= sel.start:
            return []
        needed = np.arange(sel.start // unit, (sel.stop - 1) // unit + 1)
        pos = 0
        for b0, b1 in selection_bands(n, unit, needed, max_units):
            a, b = max(b0, sel.start), min(b1, sel.stop)
            out.append((b0, b1, slice(a - b0, b - b0), pos, pos + (b - a)))
            pos += b - a
        return out
    assert sel.unique is not None
    u = sel.unique
    for b0, b1 in selection_bands(n, unit, u // unit, max_units):
        lo, hi = np.searchsorted(u, [b0, b1])
        local = u[lo:hi] - b0
        if len(local) and np.all(np.diff(local) == 1):
            local = slice(int(local[0]), int(local[-1]) + 1)
        out.append((b0, b1, local, int(lo), int(hi)))
    return out


def _read_part(source: Any, region: tuple[slice, ...], local: tuple[Any, ...]) -> np.ndarray:
    block = source.read_block(region)
    if all(isinstance(x, slice) for x in local):
        return np.ascontiguousarray(block[local])
    return block[np.ix_(*[np.arange(block.shape[i])[x] if isinstance(x, slice) else x for i, x in enumerate(local)])]


def selection_tasks(
    source: Any,
    sels: list[AxisSel],
    *,
    prefix: str | None = None,
    func: Any = None,
    extra: tuple[Any, ...] = (),
) -> tuple[list[Any], list[tuple[slice, ...]], tuple[int, ...]]:
    """Tasks reading a selection in sorted-unique space, and where each result goes.

    Each task calls ``func(source, region, local, *extra)`` (default: read the
    band and keep the selected positions).
    """
    func = func or _read_part
    shape = tuple(source.shape)
    dtype = np.dtype(source.dtype)
    unit = [max(1, min(c, s) if s else c) for c, s in zip(source.chunk_shape, shape)]
    # Budget the blocks on the selected extent, so a sparse selection still
    # gets blocks of about the target size.
    sel_shape = tuple(max(1, s.n_unique) for s in sels)
    m = units_per_block(sel_shape, [min(u, s) for u, s in zip(unit, sel_shape)], 8 if dtype.kind == "O" else dtype.itemsize)
    per_axis = [_bands_for(s, n, u, k) for s, n, u, k in zip(sels, shape, unit, m)]
    out_shape = tuple(s.n_unique for s in sels)
    name = task_name(prefix or f"{source.prefix}", source, getattr(func, "__name__", ""), extra, [(s.kind, s.start, s.stop, None if s.unique is None else s.unique.tobytes()) for s in sels])
    args = []
    places = []
    for combo in itertools.product(*per_axis):
        region = tuple(slice(b0, b1) for b0, b1, *_ in combo)
        local = tuple(c[2] for c in combo)
        args.append((source, region, local, *extra))
        places.append(tuple(slice(c[3], c[4]) for c in combo))
    return tasks(name, func, args), places, out_shape


def _finish(out: np.ndarray, sels: list[AxisSel]) -> Any:
    # Back from sorted-unique space to the requested order, then drop int axes.
    for ax, s in enumerate(sels):
        if s.kind == "array":
            out = np.take(out, s.inverse, axis=ax)
    squeeze = tuple(i for i, s in enumerate(sels) if s.kind == "int")
    if squeeze:
        out = out.squeeze(axis=squeeze)
        if out.ndim == 0:
            return out[()]
    return out


def read_selections(
    sources: list[Any],
    sels: list[AxisSel],
    *,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> list[Any]:
    """Read the same orthogonal selection from several sources in one graph.

    Only bands holding selected positions are read; each task reads one band
    and keeps just the selected rows/columns, so memory stays near the size of
    the result.  A selection that fits one task runs in this thread.
    """
    jobs = [selection_tasks(src, sels) for src in sources]
    outs = [np.empty(shape, dtype=np.dtype(src.dtype)) for src, (_, _, shape) in zip(sources, jobs)]
    flat = [d for delayed, _, shape in jobs if math.prod(shape) for d in delayed]
    if flat:
        if len(flat) == 1 and scheduler is None and client is None:
            results = [flat[0].compute(scheduler="sync")]
        else:
            nbytes = sum(int(np.prod(shape, dtype=np.float64)) * np.dtype(src.dtype).itemsize for src, (_, _, shape) in zip(sources, jobs))
            waits = any(reads_wait(src) for src in sources)
            results = list(compute(*flat, scheduler=scheduler, client=client, progress=progress, nbytes=nbytes, waits=waits))
        it = iter(results)
        for out, (_delayed, places, shape) in zip(outs, jobs):
            if not math.prod(shape):
                continue
            for place in places:
                out[place] = next(it)
    return [_finish(out, sels) for out in outs]


def read_selection(source: Any, sels: list[AxisSel], **kwargs: Any) -> Any:
    """Read an orthogonal selection of one chunk source into numpy (see :func:`read_selections`)."""
    return read_selections([source], sels, **kwargs)[0]
