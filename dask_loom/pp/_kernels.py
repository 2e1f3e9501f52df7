"""Per-block kernels of the streaming recipe: numpy / scipy.sparse in, small numpy out.

Every kernel takes one block (``scipy.sparse`` CSR, any other sparse format is
converted to CSR, or a dense numpy array) and returns partial sums that add up
across blocks; none densifies a sparse block to reduce it.  With numba (which
scanpy brings) the loops are compiled and release the GIL; with
``dask_loom.kernels = "numpy"`` the same sums come from numpy/scipy.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from dask_loom._csr import use_numba

__all__ = ["block_stats", "gram_block", "project_block", "row_sums", "scale_rows", "as_csr"]


def as_csr(block: Any) -> Any:
    """*block* as CSR if it is sparse (any scipy format), else as a numpy array."""
    import scipy.sparse as sp

    if sp.issparse(block):
        return block if block.format == "csr" else block.tocsr()
    return np.asarray(block)


def _is_csr(block: Any) -> bool:
    return getattr(block, "format", None) == "csr"


@functools.cache
def _numba() -> Any:
    import numba

    @numba.njit(nogil=True, cache=True)
    def stats(data, indices, indptr, groups, n_groups, n_cols, clip, has_clip):  # pragma: no cover - compiled
        out = np.zeros((3, n_groups, n_cols), np.float64)
        for r in range(len(indptr) - 1):
            g = groups[r]
            if g < 0:
                continue
            for p in range(indptr[r], indptr[r + 1]):
                j = indices[p]
                v = np.float64(data[p])
                if has_clip:
                    c = clip[g, j]
                    if v > c:
                        v = c
                out[0, g, j] += v
                out[1, g, j] += v * v
                out[2, g, j] += data[p] != 0
        return out

    @numba.njit(nogil=True, cache=True)
    def scatter(data, indices, indptr, lut, n_sel, dense, sums):  # pragma: no cover - compiled
        for r in range(len(indptr) - 1):
            for p in range(indptr[r], indptr[r + 1]):
                k = lut[indices[p]]
                if k >= 0:
                    v = data[p]
                    dense[r, k] = v
                    sums[k] += v

    return stats, scatter


def row_sums(block: Any) -> np.ndarray:
    """Sum of every row (float64), as scanpy's counts per cell."""
    block = as_csr(block)
    if _is_csr(block):
        out = np.zeros(block.shape[0], dtype=np.float64)
        if block.nnz:
            rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
            out = np.bincount(rows, weights=block.data.astype(np.float64, copy=False), minlength=block.shape[0])
        return out
    return np.asarray(block, dtype=np.float64).sum(axis=1)


def scale_rows(block: Any, factors: np.ndarray) -> Any:
    """Divide every row by its factor (a zero factor leaves the row as is), in the block's dtype.

    The arithmetic is scanpy's: the factors are cast to the data's dtype
    first, so float32 data are divided in float32.
    """
    block = as_csr(block)
    f = np.asarray(factors).reshape(-1)
    f = f + (f == 0)
    if _is_csr(block):
        import scipy.sparse as sp

        data = block.data / np.repeat(f.astype(block.dtype, copy=False), np.diff(block.indptr))
        return sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
    return block / f.astype(block.dtype, copy=False)[:, None]


def block_stats(
    block: Any,
    *,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    clip: np.ndarray | None = None,
) -> np.ndarray:
    """``(3, n_groups, n_cols)`` float64: per group and column, the sum, sum of squares and non-zero count.

    Parameters
    ----------
    groups
        Group of every row of the block (``-1``: left out); default all in group 0.
    clip
        ``(n_groups, n_cols)`` upper bounds applied to values before summing
        (Seurat v3's clipped variance); counts are of the stored non-zeros.
    """
    block = as_csr(block)
    n_rows, n_cols = block.shape
    if groups is None:
        groups = np.zeros(n_rows, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if _is_csr(block) and use_numba():
        stats, _ = _numba()
        c = np.zeros((1, 1)) if clip is None else np.ascontiguousarray(clip, dtype=np.float64)
        return stats(block.data, block.indices, block.indptr, groups, int(n_groups), int(n_cols), c, clip is not None)
    out = np.zeros((3, n_groups, n_cols), dtype=np.float64)
    if _is_csr(block):
        rows = np.repeat(groups, np.diff(block.indptr))
        keep = rows >= 0
        cols = block.indices[keep]
        rows = rows[keep]
        v = block.data[keep].astype(np.float64)
        nz = (block.data[keep] != 0).astype(np.float64)
        if clip is not None:
            v = np.minimum(v, np.asarray(clip, dtype=np.float64)[rows, cols])
        flat = rows * n_cols + cols
        size = n_groups * n_cols
        out[0] = np.bincount(flat, weights=v, minlength=size).reshape(n_groups, n_cols)
        out[1] = np.bincount(flat, weights=v * v, minlength=size).reshape(n_groups, n_cols)
        out[2] = np.bincount(flat, weights=nz, minlength=size).reshape(n_groups, n_cols)
        return out
    dense = np.asarray(block)
    for g in range(n_groups):
        sel = dense[groups == g].astype(np.float64)
        nz = sel != 0
        if clip is not None:
            sel = np.minimum(sel, np.asarray(clip, dtype=np.float64)[g][None, :])
        out[0, g] = sel.sum(axis=0)
        out[1, g] = (sel * sel).sum(axis=0)
        out[2, g] = nz.sum(axis=0)
    return out


def _dense_selection(block: Any, lut: np.ndarray, n_sel: int) -> tuple[np.ndarray, np.ndarray]:
    """The selected columns of a block, dense (rows x n_sel, the block's float dtype), and their sums."""
    block = as_csr(block)
    dtype = np.result_type(block.dtype, np.float32)
    if _is_csr(block):
        dense = np.zeros((block.shape[0], n_sel), dtype=dtype)
        sums = np.zeros(n_sel, dtype=np.float64)
        if use_numba():
            _, scatter = _numba()
            scatter(block.data, block.indices, block.indptr, lut, n_sel, dense, sums)
            return dense, sums
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        k = lut[block.indices]
        keep = k >= 0
        dense[rows[keep], k[keep]] = block.data[keep]
        return dense, dense.sum(axis=0, dtype=np.float64)
    sel = np.flatnonzero(lut >= 0)
    order = np.argsort(lut[sel])
    dense = np.ascontiguousarray(np.asarray(block)[:, sel[order]], dtype=dtype)
    return dense, dense.sum(axis=0, dtype=np.float64)


def gram_block(block: Any, lut: np.ndarray, n_sel: int) -> np.ndarray:
    """``(1, n_sel + 1, n_sel)`` float64: the Gram matrix ``B.T @ B`` of the selected columns, then their sums.

    The selected columns are scattered into a dense ``rows x n_sel`` buffer
    (the selection is small: 2,000 variable genes) and multiplied with one
    BLAS call; the product is summed in float64 across blocks.
    """
    dense, sums = _dense_selection(block, lut, n_sel)
    out = np.empty((1, n_sel + 1, n_sel), dtype=np.float64)
    out[0, :n_sel] = dense.T @ dense
    out[0, n_sel] = sums
    return out


def project_block(block: Any, lut: np.ndarray, components: np.ndarray, offset: np.ndarray, dtype: Any) -> np.ndarray:
    """``(B[:, selected] @ components.T) - offset`` for one block, as *dtype*."""
    n_sel = components.shape[1]
    block = as_csr(block)
    if _is_csr(block) and block.shape[0]:
        sel = block[:, np.flatnonzero(lut >= 0)[np.argsort(lut[lut >= 0])]]
        out = np.asarray(sel @ components.T, dtype=np.float64)
    else:
        dense, _ = _dense_selection(block, lut, n_sel)
        out = dense.astype(np.float64) @ components.T
    out -= offset[None, :]
    return out.astype(dtype, copy=False)
