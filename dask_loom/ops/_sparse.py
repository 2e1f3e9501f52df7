"""``sparse``: a layer (or selection) as a ``scipy.sparse.coo_matrix``, built blockwise."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from dask_loom._indexing import normalize_key
from dask_loom.cluster import compute
from dask_loom.ops._map import read_into_buffer
from dask_loom.ops._select import selection_tasks

__all__ = ["sparse"]


def _nonzero_task(source: Any, region: tuple[slice, ...], local: tuple[Any, ...], dtype: Any) -> tuple[np.ndarray, ...]:
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
    rr, cc, vv = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, dtype)]
    if delayed and math.prod(out_shape):
        results = compute(*delayed, scheduler=scheduler, client=client, progress=progress)
        for place, (r, c, v) in zip(places, results):
            rr.append(r.astype(np.int64) + place[0].start)
            cc.append(c.astype(np.int64) + place[1].start)
            vv.append(v)
    m = sp.coo_matrix((np.concatenate(vv), (np.concatenate(rr), np.concatenate(cc))), shape=out_shape)
    if any(s.kind == "array" and (len(s.inverse) != len(s.unique) or np.any(np.diff(s.inverse) < 0)) for s in sels):
        csr = m.tocsr()
        if sels[0].kind == "array":
            csr = csr[sels[0].inverse]
        if sels[1].kind == "array":
            csr = csr[:, sels[1].inverse]
        m = csr.tocoo()
    return m
