"""Blockwise passes of the streaming recipe as dask graphs.

Each pass is one ``blockwise`` layer over the AnnData matrix (one task per
stored block) followed by a tree sum of small partials.  Nothing but the
partials and the result is ever held whole.

The lazy steps (``normalize_total``'s scaling, ``log1p``, Seurat's
``expm1``) are dask arrays like any other, and also record what they owe
(:func:`chained`): a pass over such an array reads the untransformed source
and its kernel transforms each value as it reads it, instead of one
transformed copy of every block per step (which cost more than the pass).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_loom.pp import _kernels as K

__all__ = [
    "chained",
    "column_stats",
    "compute",
    "gram",
    "gram_keeping",
    "is_dask",
    "project",
    "project_kept",
    "row_sums_of",
    "transform",
]

_PENDING = "_dask_loom_pending"
_ORDER = {"scale": 0, "log1p": 1, "expm1": 2}


def is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.array") and hasattr(x, "dask")


def compute(*arrays: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Compute on the scheduler dask_loom picks (a Client, the configured address, or the embedded pool)."""
    from dask_loom.cluster import compute as _compute

    return _compute(*arrays, **kwargs)


def _last_step(p: K.Pending) -> int:
    return 2 if p.expm1 else 1 if p.log1p else 0 if p.scale else -1


def chained(
    out: Any, x: Any, step: str, *, base: float | None = None, factors: np.ndarray | None = None
) -> Any:
    """Record on *out* (the lazy result of *step* on *x*) the source and transforms a pass can fuse.

    *step* is ``"scale"`` (rows divided by *factors*), ``"log1p"`` (*base*) or
    ``"expm1"`` (after multiplying by *base*).  Steps in that order extend the
    record of *x*; any other order starts a new one from *x*.
    """
    from dataclasses import replace

    prev = getattr(x, _PENDING, None)
    if prev is not None and _last_step(prev[1]) < _ORDER[step]:
        source, p, f = prev
    else:
        source, p, f = x, K.Pending(), None
    if step == "scale":
        p, f = replace(p, scale=True), np.asarray(factors)
    elif step == "log1p":
        p = replace(p, log1p=True, log_base=base)
    else:
        p = replace(p, expm1=True, expm1_scale=base)
    setattr(out, _PENDING, (source, p, f))
    return out


def _unfold(x: Any) -> tuple[Any, K.Pending | None, Any]:
    """The source a pass reads, the transforms it owes and its row factors (a dask array, or None)."""
    import dask.array as da

    rec = getattr(x, _PENDING, None)
    if rec is None:
        return x, None, None
    source, p, f = rec
    if source.chunks[0] != x.chunks[0]:
        return x, None, None
    fd = None if f is None else da.from_array(f, chunks=(source.chunks[0],), name=False)
    return source, p, fd


def _row_args(f: Any) -> list[Any]:
    return [] if f is None else [f, "i"]


def _groups_array(groups: np.ndarray | None, x: Any) -> Any:
    import dask.array as da

    if groups is None:
        groups = np.zeros(x.shape[0], dtype=np.int64)
    return da.from_array(np.asarray(groups, dtype=np.int64), chunks=(x.chunks[0],), name=False)


def _stats_task(
    block: Any,
    groups: np.ndarray,
    col0: np.ndarray,
    factors: Any = None,
    *,
    n_groups: int,
    clip: np.ndarray | None,
    pending: Any,
) -> np.ndarray:
    c = None
    if clip is not None:
        # col0 carries this block's first column (a one-element block of a helper array).
        lo = int(col0[0])
        c = clip[:, lo : lo + block.shape[1]]
    return K.block_stats(block, groups=groups, n_groups=n_groups, clip=c, pending=pending, factors=factors)[
        None
    ]


def column_stats(
    x: Any, *, groups: np.ndarray | None = None, n_groups: int = 1, clip: np.ndarray | None = None
) -> Any:
    """Lazy ``(3, n_groups, n_cols)``: per group and column the sum, sum of squares and non-zero count."""
    import dask.array as da

    rec = getattr(x, _PENDING, None)
    x, pending, f = _unfold(x)
    factors = None if pending is None or rec is None else rec[2]
    streamed = _streamed_stats(x, groups, n_groups, clip, pending, factors)
    if streamed is not None:
        return streamed.sum(axis=0, split_every=8)
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
        *_row_args(f),
        n_groups=int(n_groups),
        clip=clip,
        pending=pending,
        new_axes={"a": 3, "b": int(n_groups)},
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
        name="pp-stats-" + _token(x, groups, n_groups, clip, pending, f),
        concatenate=False,
        align_arrays=False,
    )
    return parts.sum(axis=0, split_every=8)


#: Stored entries (values and column indices) a streamed pass reads at a time: a few MiB
#: stay in the core's share of the cache while the kernel sums them (measured on a
#: 45 MB h5ad block of raw counts: 5.1-5.8 ns per value read whole, 3.7 in pieces of 4 MiB).
PIECE_BYTES = 4 << 20


def _streamed_stats(
    x: Any,
    groups: np.ndarray | None,
    n_groups: int,
    clip: np.ndarray | None,
    pending: K.Pending | None,
    factors: np.ndarray | None,
) -> Any:
    """:func:`column_stats`' partials read piece by piece from a collection's files, or None.

    For a collection's matrix (:func:`dask_loom.anndata._dask.layer_to_dask`)
    in one column block: each task reads its rows in pieces of about
    :data:`PIECE_BYTES` into the same buffers and sums every piece as it
    arrives (:meth:`~dask_loom.anndata._plan._LayerPlan.iter_parts`).
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    from dask_loom.anndata._dask import ROW_VALUES

    reads = getattr(x, ROW_VALUES, None)
    if (
        reads is None
        or len(reads) != x.numblocks[0]
        or x.numblocks[1] != 1
        or not K.stream_stats(x.dtype, pending)
    ):
        return None
    if pending is not None and pending.scale and factors is None:
        return None
    n_cols = int(x.shape[1])
    g = None if groups is None else np.asarray(groups, dtype=np.int64)
    name = "pp-stats-" + _token(x, groups, n_groups, clip, pending, factors)
    dsk: dict[Any, Any] = {}
    lo = 0
    for i, ((plan, rows), n) in enumerate(zip(reads, x.chunks[0])):
        hi = lo + n
        dsk[(name, i, 0, 0, 0)] = (
            _streamed_stats_task, plan, rows, None if g is None else g[lo:hi],
            None if factors is None else np.asarray(factors).reshape(-1)[lo:hi],
            int(n_groups), n_cols, clip, pending,
        )  # fmt: skip
        lo = hi
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    chunks = ((1,) * len(reads), (3,), (int(n_groups),), (n_cols,))
    return da.Array(graph, name, chunks, dtype=np.float64, meta=np.empty((0, 0, 0, 0), dtype=np.float64))


def _streamed_stats_task(
    plan: Any,
    rows: np.ndarray,
    groups: np.ndarray | None,
    factors: np.ndarray | None,
    n_groups: int,
    n_cols: int,
    clip: np.ndarray | None,
    pending: K.Pending | None,
) -> np.ndarray:
    parts = plan.iter_parts(rows, piece_bytes=PIECE_BYTES)
    if parts is None:
        # Not a CSR file (dense, CSC, absent from this file): its whole block.
        block = plan.read(rows, sparse=True)
        out = K.block_stats(
            block, groups=groups, n_groups=n_groups, clip=clip, pending=pending, factors=factors
        )
    else:
        out = K.parts_stats(
            parts, n_rows=len(rows), n_cols=n_cols, groups=groups, n_groups=n_groups,
            clip=clip, pending=pending, factors=factors,
        )  # fmt: skip
    return out[None]


def _token(*args: Any) -> str:
    from dask.base import tokenize

    return tokenize(*args)


def _row_sums_task(block: Any) -> np.ndarray:
    return K.row_sums(block)[:, None]


def _row_values_sums_task(plan: Any, rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    read = plan.read_row_values(rows)
    if read is None:
        # A file whose rows need their columns (an inner join): the whole block.
        return K.row_sums(plan.read(rows, sparse=True, dtype=dtype))
    data, indptr = read
    return K.csr_row_sums(data.astype(dtype, copy=False), indptr)


def row_sums_of(x: Any, *, dtype: Any = None) -> Any:
    """Lazy float64 sum of every row (of its values cast to *dtype* first, if given).

    On a collection's matrix (:func:`dask_loom.anndata._dask.layer_to_dask`)
    the tasks read each block's values and row pointers only, not its column
    indices: half the bytes of a CSR matrix.
    """
    import dask.array as da

    from dask_loom.anndata._dask import ROW_VALUES

    dtype = x.dtype if dtype is None else np.dtype(dtype)
    reads = getattr(x, ROW_VALUES, None)
    if reads is not None and len(reads) == x.numblocks[0] and x.numblocks[1] == 1:
        name = "pp-rowsums-" + _token(x, dtype)
        dsk = {(name, i): (_row_values_sums_task, plan, rows, dtype) for i, (plan, rows) in enumerate(reads)}
        return da.Array(dsk, name, (x.chunks[0],), dtype=np.float64, meta=np.empty((0,), dtype=np.float64))
    if dtype != x.dtype:
        x = x.astype(dtype)
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
    return x.map_blocks(
        fn, *args, dtype=out_dtype, meta=meta, name=f"{name}-{_token(x, fn, args, kwargs)}", **kwargs
    )


def _selected(x: Any, lut: np.ndarray) -> Any:
    # Several column blocks: cut to the selected columns before a task joins them.
    if x.numblocks[1] > 1:
        cols = np.flatnonzero(lut >= 0)[np.argsort(lut[lut >= 0])]
        return x[:, cols], np.arange(len(cols), dtype=np.int64)
    return x, lut


def _joined(blocks: Any) -> Any:
    """The column blocks of one row of blocks (``concatenate=False``: a list), as one block.

    dask's own concatenation (``concatenate=True``) copies even a lone block,
    twice for a sparse one (``hstack``, then ``vstack``): for a matrix stored in
    one column block, as AnnData's, that copy was a quarter of a Gram pass.
    """
    if not isinstance(blocks, (list, tuple)):
        return blocks
    if len(blocks) == 1:
        return _joined(blocks[0])
    import scipy.sparse as sp

    parts = [_joined(b) for b in blocks]
    if all(sp.issparse(b) for b in parts):
        return sp.hstack(parts, format="csr")
    return np.concatenate([b.toarray() if sp.issparse(b) else np.asarray(b) for b in parts], axis=1)


def _gram_task(block: Any, factors: Any = None, *, lut: np.ndarray, n_sel: int, pending: Any) -> np.ndarray:
    return K.gram_block(_joined(block), lut, n_sel, pending=pending, factors=factors)


def gram(x: Any, lut: np.ndarray) -> Any:
    """Lazy ``(n_sel + 1, n_sel)``: Gram matrix of the selected columns (``lut[col]`` = position or -1), then column sums."""
    import dask.array as da

    # Pending transforms act value by value, so selecting columns first gives the same values.
    x, pending, f = _unfold(x)
    x, lut = _selected(x, lut)
    n_sel = int((lut >= 0).sum())
    parts = da.blockwise(
        _gram_task,
        "iab",
        x,
        "ij",
        *_row_args(f),
        lut=lut,
        n_sel=n_sel,
        pending=pending,
        new_axes={"a": n_sel + 1, "b": n_sel},
        adjust_chunks={"i": 1},
        concatenate=False,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        name="pp-gram-" + _token(x, lut, pending, f),
    )
    # Blocks store each pair once; the symmetric matrix is made once, after the sum.
    total = _tree_sum(parts, name="pp-gram-sum-" + _token(parts.name))
    return total.map_blocks(K.symmetric, dtype=np.float64)


def _select_task(block: Any, factors: Any = None, *, lut: np.ndarray, n_sel: int, pending: Any) -> K.Selected:
    return K.select_block(_joined(block), lut, n_sel, pending=pending, factors=factors)


def _gram_selected_task(sel: K.Selected) -> np.ndarray:
    return K.gram_selected(sel)


def gram_keeping(x: Any, lut: np.ndarray) -> tuple[Any, list[Any]] | None:
    """:func:`gram`, and the :class:`~dask_loom.pp._kernels.Selected` values of every block as delayed objects.

    Computed together (``optimize_graph=False``, so each block is read and
    selected once), they give the Gram matrix and what :func:`project_kept`
    projects without reading the matrix again.  ``None`` where the compiled
    kernels do not read *x* (not CSR blocks, no numba).
    """
    import dask.array as da

    x, pending, f = _unfold(x)
    if not K._fused(x._meta, pending):
        return None
    x, lut = _selected(x, lut)
    n_sel = int((lut >= 0).sum())
    tok = _token(x, lut, pending, f)
    sel = da.blockwise(
        _select_task,
        "i",
        x,
        "ij",
        *_row_args(f),
        lut=lut,
        n_sel=n_sel,
        pending=pending,
        concatenate=False,
        dtype=object,
        meta=np.empty((0,), dtype=object),
        name="pp-select-" + tok,
    )
    parts = da.blockwise(
        _gram_selected_task,
        "iab",
        sel,
        "i",
        new_axes={"a": n_sel + 1, "b": n_sel},
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        name="pp-gram-" + tok,
    )
    total = _tree_sum(parts, name="pp-gram-sum-" + _token(parts.name))
    return total.map_blocks(K.symmetric, dtype=np.float64), list(sel.to_delayed(optimize_graph=False).ravel())


def _project_kept_task(sel: K.Selected, components: np.ndarray, offset: np.ndarray, dtype: Any) -> np.ndarray:
    return K.project_selected(sel, components, offset, dtype)


def project_kept(
    kept: list[K.Selected], components: np.ndarray, offset: np.ndarray, dtype: Any, *, token: str
) -> Any:
    """Lazy ``x[:, selected] @ components.T - offset`` from the blocks :func:`gram_keeping` kept (in memory)."""
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    dtype = np.dtype(dtype)
    name = "pp-project-" + _token(token, components, offset, dtype.str)
    dsk = {(name, i, 0): (_project_kept_task, s, components, offset, dtype) for i, s in enumerate(kept)}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    chunks = (tuple(s.n_rows for s in kept), (components.shape[0],))
    return da.Array(graph, name, chunks, meta=np.empty((0, 0), dtype=dtype))


def _flat(parts: Any) -> list[np.ndarray]:
    if isinstance(parts, (list, tuple)):
        return [a for p in parts for a in _flat(p)]
    return [parts]


def _add_into_first(parts: Any, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    arrays = _flat(parts)
    # In place: every partial is an intermediate of this tree alone.
    acc = arrays[0]
    for a in arrays[1:]:
        acc += a
    return acc if keepdims else acc.reshape(acc.shape[1:])


def _as_is(block: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return block


def _tree_sum(parts: Any, *, name: str) -> Any:
    """Sum over axis 0 of per-block partials, eight at a time, adding in place.

    ``Array.sum`` copies every partial (its chunk step, then concatenating
    eight before summing them): for partials of 16 MB, as a Gram pass's, that
    was most of the pass after its kernels.
    """
    import dask.array as da

    return da.reduction(
        parts,
        chunk=_as_is,
        combine=_add_into_first,
        aggregate=_add_into_first,
        axis=0,
        concatenate=False,
        split_every=8,
        dtype=parts.dtype,
        meta=np.empty((0,) * (parts.ndim - 1), dtype=parts.dtype),
        name=name,
    )


def _project_task(
    block: Any,
    factors: Any = None,
    *,
    lut: np.ndarray,
    components: np.ndarray,
    offset: np.ndarray,
    out_dtype: Any,
    pending: Any,
) -> np.ndarray:
    return K.project_block(
        _joined(block), lut, components, offset, out_dtype, pending=pending, factors=factors
    )


def project(x: Any, lut: np.ndarray, components: np.ndarray, offset: np.ndarray, dtype: Any) -> Any:
    """Lazy ``x[:, selected] @ components.T - offset`` (cells x components), blockwise."""
    import dask.array as da

    x, pending, f = _unfold(x)
    x, lut = _selected(x, lut)
    k = components.shape[0]
    return da.blockwise(
        _project_task,
        "ik",
        x,
        "ij",
        *_row_args(f),
        lut=lut,
        pending=pending,
        components=components,
        offset=offset,
        out_dtype=np.dtype(dtype),
        dtype=np.dtype(dtype),
        new_axes={"k": k},
        concatenate=False,
        meta=np.empty((0, 0), dtype=np.dtype(dtype)),
        name="pp-project-" + _token(x, lut, components, offset, pending, f),
    )
