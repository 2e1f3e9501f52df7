"""Blockwise passes of the streaming recipe as dask graphs.

Each pass is one ``blockwise`` layer over the AnnData matrix (so dask fuses it
with the reads and the lazy normalise/log1p tasks before it: one task per
stored block) followed by a tree sum of small partials.  Nothing but the
partials and the result is ever held whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_loom.pp import _kernels as K

__all__ = ["column_stats", "compute", "gram", "is_dask", "project", "row_sums_of", "transform"]


def is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.array") and hasattr(x, "dask")


def compute(*arrays: Any) -> tuple[Any, ...]:
    """Compute on the scheduler dask_loom picks (a Client, the configured address, or the embedded pool)."""
    from dask_loom.cluster import compute as _compute

    return _compute(*arrays)


def _groups_array(groups: np.ndarray | None, x: Any) -> Any:
    import dask.array as da

    if groups is None:
        groups = np.zeros(x.shape[0], dtype=np.int64)
    return da.from_array(np.asarray(groups, dtype=np.int64), chunks=(x.chunks[0],), name=False)


def _stats_task(block: Any, groups: np.ndarray, col0: np.ndarray, *, n_groups: int, clip: np.ndarray | None) -> np.ndarray:
    c = None
    if clip is not None:
        # col0 carries this block's first column (a one-element block of a helper array).
        lo = int(col0[0])
        c = clip[:, lo : lo + block.shape[1]]
    return K.block_stats(block, groups=groups, n_groups=n_groups, clip=c)[None]


def column_stats(x: Any, *, groups: np.ndarray | None = None, n_groups: int = 1, clip: np.ndarray | None = None) -> Any:
    """Lazy ``(3, n_groups, n_cols)``: per group and column the sum, sum of squares and non-zero count."""
    import dask.array as da

    g = _groups_array(groups, x)
    starts = np.concatenate(([0], np.cumsum(x.chunks[1])[:-1])).astype(np.int64)
    col0 = da.from_array(starts, chunks=1, name=False)
    parts = da.blockwise(
        _stats_task,
        "iabj",
        x,
        "ij",
        g,
        "i",
        col0,
        "j",
        n_groups=int(n_groups),
        clip=clip,
        new_axes={"a": 3, "b": int(n_groups)},
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
        name="pp-stats-" + _token(x, groups, n_groups, clip),
        concatenate=False,
        align_arrays=False,
    )
    return parts.sum(axis=0, split_every=8)


def _token(*args: Any) -> str:
    from dask.base import tokenize

    return tokenize(*args)


def _row_sums_task(block: Any) -> np.ndarray:
    return K.row_sums(block)[:, None]


def row_sums_of(x: Any) -> Any:
    """Lazy float64 sum of every row."""
    import dask.array as da

    parts = da.blockwise(
        _row_sums_task,
        "ij",
        x,
        "ij",
        adjust_chunks={"j": 1},
        dtype=np.float64,
        meta=np.empty((0, 0), dtype=np.float64),
        name="pp-rowsums-" + _token(x),
    )
    return parts.sum(axis=1)


def transform(x: Any, fn: Any, *args: Any, name: str, dtype: Any = None, **kwargs: Any) -> Any:
    """``fn(block, *args)`` on every block, lazily, keeping chunks and meta (sparse stays sparse)."""
    out_dtype = x.dtype if dtype is None else np.dtype(dtype)
    meta = x._meta.astype(out_dtype) if hasattr(x._meta, "astype") else x._meta
    return x.map_blocks(fn, *args, dtype=out_dtype, meta=meta, name=f"{name}-{_token(x, fn, args, kwargs)}", **kwargs)


def _selected(x: Any, lut: np.ndarray) -> Any:
    # Several column blocks: cut to the selected columns before a task joins them.
    if x.numblocks[1] > 1:
        cols = np.flatnonzero(lut >= 0)[np.argsort(lut[lut >= 0])]
        return x[:, cols], np.arange(len(cols), dtype=np.int64)
    return x, lut


def _gram_task(block: Any, lut: np.ndarray, n_sel: int) -> np.ndarray:
    return K.gram_block(block, lut, n_sel)


def gram(x: Any, lut: np.ndarray) -> Any:
    """Lazy ``(n_sel + 1, n_sel)``: Gram matrix of the selected columns (``lut[col]`` = position or -1), then column sums."""
    import dask.array as da

    x, lut = _selected(x, lut)
    n_sel = int((lut >= 0).sum())
    parts = da.blockwise(
        _gram_task,
        "iab",
        x,
        "ij",
        lut=lut,
        n_sel=n_sel,
        new_axes={"a": n_sel + 1, "b": n_sel},
        adjust_chunks={"i": 1},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        name="pp-gram-" + _token(x, lut),
    )
    return parts.sum(axis=0, split_every=8)


def _project_task(block: Any, lut: np.ndarray, components: np.ndarray, offset: np.ndarray, out_dtype: Any) -> np.ndarray:
    return K.project_block(block, lut, components, offset, out_dtype)


def project(x: Any, lut: np.ndarray, components: np.ndarray, offset: np.ndarray, dtype: Any) -> Any:
    """Lazy ``x[:, selected] @ components.T - offset`` (cells x components), blockwise."""
    import dask.array as da

    x, lut = _selected(x, lut)
    k = components.shape[0]
    return da.blockwise(
        _project_task,
        "ik",
        x,
        "ij",
        lut=lut,
        components=components,
        offset=offset,
        out_dtype=np.dtype(dtype),
        dtype=np.dtype(dtype),
        new_axes={"k": k},
        concatenate=True,
        meta=np.empty((0, 0), dtype=np.dtype(dtype)),
        name="pp-project-" + _token(x, lut, components, offset),
    )
