"""``scan``: bands along one axis, read as small graphs with read-ahead.

:func:`band_reads` is the band reading Loom's ``ds.scan`` shares: one band
of several sources, each split into tasks of whole stored chunks
(ops._select), assembled by one task.  :func:`scan_info` yields the bands of
any accepted object (a collection's files joined, CSR kept sparse on
request) through :func:`~dask_loom.ops._prefetch.prefetched`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from dask_loom._config import get_config
from dask_loom._indexing import AxisSel
from dask_loom._lazy import issparse
from dask_loom.ops._bandpool import BandPool
from dask_loom.ops._engine import _takes_out, read_part
from dask_loom.ops._prefetch import prefetched
from dask_loom.ops._select import _read_part, selection_tasks
from dask_loom.ops._sources import SourceInfo

__all__ = ["band_reads", "scan_info"]


def _read_pooled(
    source: Any, region: tuple[slice, ...], local: tuple[Any, ...], pool: BandPool
) -> np.ndarray:
    """Read the selected part of *region* into a buffer of *pool* (exactly the part: no copy after)."""
    if not (_takes_out(source) and all(isinstance(x, slice) for x in local)):
        return _read_part(source, region, local)
    exact = []
    for r, x in zip(region, local):
        lo, hi, _ = x.indices(r.stop - r.start)
        exact.append(slice(r.start + lo, r.start + hi))
    shape = tuple(s.stop - s.start for s in exact)
    return source.read_block(tuple(exact), out=pool.take(shape, source.dtype))


def band_reads(
    sources: list[Any], axis: int, start: int, stop: int, *, prefix: str, pool: BandPool | None = None
) -> tuple[list[Delayed], list[tuple[int, ...]], list[np.dtype], list[list[tuple[slice, ...]]]]:
    """Tasks reading ``[start, stop)`` along *axis* (everything else whole) of each source.

    Returns the tasks (all sources, in order), and per source the band's
    shape, dtype and where each task's result goes in it.  With *pool*, the
    tasks decode into its buffers (see :class:`~dask_loom.ops._bandpool.BandPool`).
    """
    tasks: list[Delayed] = []
    shapes, dtypes, places = [], [], []
    for src in sources:
        sels = [
            AxisSel("range", start, stop) if d == axis else AxisSel("range", 0, int(n))
            for d, n in enumerate(src.shape)
        ]
        if pool is None:
            t, pl, shape = selection_tasks(src, sels, prefix=prefix)
        else:
            t, pl, shape = selection_tasks(src, sels, prefix=prefix, func=_read_pooled, extra=(pool,))
        tasks.extend(t)
        shapes.append(shape)
        dtypes.append(np.dtype(src.dtype))
        places.append(pl)
    return tasks, shapes, dtypes, places


def fill_band(
    shape: tuple[int, ...],
    dtype: np.dtype,
    places: list[tuple[slice, ...]],
    parts: list[np.ndarray],
    pool: BandPool | None = None,
) -> np.ndarray:
    """One source's band from its tasks' results (no copy when one task read it all)."""
    if len(places) == 1:
        return parts[0]
    out = np.empty(shape, dtype=dtype) if pool is None else pool.take(shape, dtype)
    for place, p in zip(places, parts):
        out[place] = p
    return out


def _read_piece(source: Any, region: tuple[slice, ...], sparse: bool) -> Any:
    return read_part(source, region, sparse=sparse, reuse=False)


def _join(info_axes: tuple[int, ...] | None, layout: list[Any], sparse: bool, *results: Any) -> Any:
    """The band from its pieces: per piece either ``("dense", shape, dtype, places, n)`` or ``("one",)``."""
    it = iter(results)
    pieces = []
    for spec in layout:
        if spec[0] == "one":
            pieces.append(next(it))
        else:
            _, shape, dtype, places, n = spec
            pieces.append(fill_band(shape, dtype, places, [next(it) for _ in range(n)]))
    if sparse:
        import scipy.sparse as sp

        pieces = [p if issparse(p) else sp.csr_matrix(p) for p in pieces]
        block = pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
        return block.tocsr()
    pieces = [p.toarray() if issparse(p) else p for p in pieces]
    block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    if info_axes is None:
        return block
    rest = [a for a in range(block.ndim) if a not in info_axes]
    moved = np.transpose(block, (*info_axes, *rest))
    return moved.reshape(moved.shape[: len(info_axes)])


def _band_job(info: SourceInfo, axis: int, start: int, stop: int, sparse: bool, prefix: str) -> Any:
    """One band ``[start, stop)`` along source axis *axis* as one ``Delayed`` (or dask collection)."""
    tok = tokenize(info.parts or info.array.name, axis, sparse)
    batch = f"{info.format}-batch-{tok}-{start}"
    if info.array is not None:
        x = info.array
        band = x[tuple(slice(start, stop) if d == axis else slice(None) for d in range(x.ndim))]
        return delayed(_join, pure=True)(info.axes, [("one",)], sparse, band, dask_key_name=batch)
    layout: list[Any] = []
    args: list[Any] = []
    for src, off in zip(info.parts, info.offsets):
        n0 = int(src.shape[0])
        if axis == 0:
            lo, hi = max(start, off), min(stop, off + n0)
            if hi <= lo:
                continue
            region = tuple(
                slice(lo - off, hi - off) if d == 0 else slice(0, int(s)) for d, s in enumerate(src.shape)
            )
        else:
            if not n0:
                continue
            region = tuple(
                slice(start, stop) if d == axis else slice(0, int(s)) for d, s in enumerate(src.shape)
            )
        if getattr(src, "sparse", False) or not math.prod(src.shape):
            # A CSR file's rows come out of one read (its own reader splits it by byte range).
            args.append(
                delayed(_read_piece, pure=True)(
                    src, region, sparse, dask_key_name=f"{prefix}-{tokenize(src, region, sparse)}"
                )
            )
            layout.append(("one",))
        else:
            sels = [AxisSel("range", r.start, r.stop) for r in region]
            tasks, places, shape = selection_tasks(src, sels, prefix=prefix)
            args.extend(tasks)
            layout.append(("dense", shape, np.dtype(src.dtype), places, len(tasks)))
    return delayed(_join, pure=True)(info.axes, layout, sparse, *args, dask_key_name=batch)


def scan_info(
    info: SourceInfo,
    axis: int,
    *,
    batch_size: int,
    sparse: bool = False,
    prefetch: int | None = None,
    scheduler: Any = None,
    client: Any = None,
) -> Iterator[tuple[int, Any]]:
    """``(start, block)`` for bands of *batch_size* along source axis *axis*, read ahead."""
    n = info.source_shape[axis]
    prefix = f"{info.format}-scan"
    bands = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    depth = int(get_config("scan-prefetch") if prefetch is None else prefetch)

    def jobs() -> Iterator[Any]:
        for s, e in bands:
            yield lambda s=s, e=e: _band_job(info, axis, s, e, sparse, prefix)

    nbytes = int(np.prod(info.source_shape, dtype=np.float64)) * info.dtype.itemsize
    for (s, _), block in zip(
        bands, prefetched(jobs(), depth=depth, scheduler=scheduler, client=client, nbytes=nbytes)
    ):
        yield s, block
