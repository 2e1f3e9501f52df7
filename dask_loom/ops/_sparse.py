"""``sparse``: a layer (or selection) as a ``scipy.sparse.coo_matrix``, built blockwise."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._indexing import normalize_key
from dask_loom.blocks._readahead import reads_wait
from dask_loom.cluster import compute
from dask_loom.ops._map import interior_split, nbytes_of, read_into_buffer
from dask_loom.ops._select import selection_tasks

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["sparse"]


def _staged_nonzero(staged: np.ndarray, dtype: Any) -> tuple[np.ndarray, ...]:
    # Non-zeros straight from the decoded chunks (k0, k1, c0, c1): no copy
    # into row-major order; block coordinates follow from the flat index.
    _, k1, c0, c1 = staged.shape
    flat = staged.reshape(-1)
    idx = np.flatnonzero(flat)
    vals = flat[idx].astype(dtype)
    q, b = np.divmod(idx, c1)
    q, a = np.divmod(q, c0)
    i, j = np.divmod(q, k1)
    return (i * c0 + a).astype(np.int32), (j * c1 + b).astype(np.int32), vals


def _nonzero_task(source: Any, region: tuple[slice, ...], local: tuple[Any, ...], dtype: Any) -> tuple[np.ndarray, ...]:
    whole = all(isinstance(x, slice) and x == slice(0, r.stop - r.start) for x, r in zip(local, region))
    parts = interior_split(source, region) if whole else None
    if parts is not None:
        out: list[tuple[np.ndarray, ...]] = []
        for i, row in enumerate(parts):
            for j, (rs, cs) in enumerate(row):
                dr, dc = rs.start - region[0].start, cs.start - region[1].start
                pieces = source.staged_pieces((rs, cs)) if i == 0 and j == 0 and hasattr(source, "staged_pieces") else None
                if pieces is not None:  # a few rows of chunks at a time (see piece_spans)
                    for staged in pieces:
                        r, c, v = _staged_nonzero(staged, dtype)
                        out.append(((r + dr).astype(np.int32), (c + dc).astype(np.int32), v))
                        dr += staged.shape[0] * staged.shape[2]
                    continue
                staged = source.read_staged((rs, cs)) if i == 0 and j == 0 else None
                if staged is not None and staged.ndim == 4:
                    r, c, v = _staged_nonzero(staged, dtype)
                else:
                    blk = read_into_buffer(source, (rs, cs))
                    r, c = np.nonzero(blk)
                    v = blk[r, c].astype(dtype)
                out.append(((r + dr).astype(np.int32), (c + dc).astype(np.int32), v))
        return tuple(np.concatenate([o[k] for o in out]) for k in range(3))
    block = read_into_buffer(source, region)
    if not all(isinstance(x, slice) for x in local):
        block = block[np.ix_(*[np.arange(block.shape[i])[x] if isinstance(x, slice) else x for i, x in enumerate(local)])]
    else:
        block = block[local]
    r, c = np.nonzero(block)
    return r.astype(np.int32), c.astype(np.int32), block[r, c].astype(dtype)


def _index(thing: Any) -> Any:
    if thing is None:
        return slice(None)
    arr = np.asarray(thing)
    if arr.ndim == 0:
        return int(arr)
    return arr


def sparse(
    source: Any,
    *,
    rows: Any = None,
    cols: Any = None,
    dtype: Any = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> sp.coo_matrix:
    """Non-zero entries of a 2-D chunk source as ``coo_matrix``.

    Each task reads one band of whole chunks and returns only its non-zeros,
    so memory holds the result plus one band per worker.  ``rows``/``cols`` are
    int or bool arrays (any order, duplicates allowed).  The data keep the
    layer's dtype unless *dtype* is given (loompy always returns float64).
    """
    dtype = np.dtype(source.dtype if dtype is None else dtype)
    sels = normalize_key((_index(rows), _index(cols)), tuple(source.shape), where=getattr(source, "label", "layer"))
    for s in sels:
        if s.kind == "int":
            raise IndexError("sparse() takes arrays of rows/columns, not single integers")
    delayed, places, out_shape = selection_tasks(source, sels, prefix="loom-sparse", func=_nonzero_task, extra=(dtype,))
    # int32 indices whenever they fit (as scipy picks them): 12 bytes a non-zero.
    itype = np.int32 if max(out_shape, default=0) < 2**31 else np.int64
    results = []
    if delayed and math.prod(out_shape):
        results = list(compute(*delayed, scheduler=scheduler, client=client, progress=progress, nbytes=nbytes_of(source), waits=reads_wait(source)))
    nnz = sum(len(r[2]) for r in results)
    rows_out = np.empty(nnz, dtype=itype)
    cols_out = np.empty(nnz, dtype=itype)
    vals_out = np.empty(nnz, dtype=dtype)
    pos = 0
    for place in places[: len(results)]:
        r, c, v = results.pop(0)  # freed as soon as it is copied: memory stays near twice the result
        k = len(v)
        np.add(r, place[0].start, out=rows_out[pos : pos + k], casting="unsafe")
        np.add(c, place[1].start, out=cols_out[pos : pos + k], casting="unsafe")
        vals_out[pos : pos + k] = v
        pos += k
        del r, c, v
    import scipy.sparse as sp

    m = sp.coo_matrix((vals_out, (rows_out, cols_out)), shape=out_shape, copy=False)
    if any(s.kind == "array" and (len(s.inverse) != len(s.unique) or np.any(np.diff(s.inverse) < 0)) for s in sels):
        csr = m.tocsr()
        if sels[0].kind == "array":
            csr = csr[sels[0].inverse]
        if sels[1].kind == "array":
            csr = csr[:, sels[1].inverse]
        m = csr.tocoo()
    return m
