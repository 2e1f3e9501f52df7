"""Per-block kernels of the streaming recipe: numpy / scipy.sparse in, small numpy out.

Every kernel takes one block (``scipy.sparse`` CSR, any other sparse format is
converted to CSR, or a dense numpy array) and returns partial sums that add up
across blocks; none densifies a sparse block to reduce it.  With numba (which
scanpy brings) the loops are compiled and release the GIL; with
``dask_loom.kernels = "numpy"`` the same sums come from numpy/scipy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom._csr import use_numba

__all__ = [
    "Pending",
    "Selected",
    "as_csr",
    "block_stats",
    "csr_row_sums",
    "expm1_block",
    "gram_block",
    "gram_selected",
    "log1p_block",
    "parts_stats",
    "project_block",
    "project_selected",
    "row_sums",
    "scale_rows",
    "select_block",
    "stream_stats",
    "symmetric",
]


def as_csr(block: Any) -> Any:
    """*block* as CSR if it is sparse (any scipy format), else as a numpy array."""
    import scipy.sparse as sp

    if sp.issparse(block):
        return block if block.format == "csr" else block.tocsr()
    return np.asarray(block)


def _is_csr(block: Any) -> bool:
    return getattr(block, "format", None) == "csr"


# Value transforms the fused kernels apply to every stored value on the way in (bit flags).
SCALE, LOG1P, LOG_DIV, EXPM1, EXP_MUL = 1, 2, 4, 8, 16


@functools.cache
def _numba() -> Any:
    from dask_loom.pp import _compiled

    return _compiled


@dataclass(frozen=True)
class Pending:
    """Value transforms still owed to a block: what ``normalize_total``, ``log1p`` and Seurat's ``expm1`` left lazy.

    In order: divide every row by its factor (``scale``), ``log1p`` (then
    divide by ``log(log_base)``), ``expm1`` (after multiplying by
    ``expm1_scale``).  The fused kernels apply them to each stored value as
    they read it, instead of building a transformed copy of the block per step.
    """

    scale: bool = False
    log1p: bool = False
    log_base: float | None = None
    expm1: bool = False
    expm1_scale: float | None = None

    def mode(self) -> tuple[int, float, float]:
        """Flags and constants for the compiled kernels."""
        log_div = float(np.log(self.log_base)) if self.log_base is not None else 1.0
        exp_mul = float(self.expm1_scale) if self.expm1_scale is not None else 1.0
        log1p, expm1 = self.log1p, self.expm1
        if log1p and expm1 and (self.log_base is None) == (self.expm1_scale is None) and log_div == exp_mul:
            # expm1(log1p(v)) is v again (to the float32 rounding of the round trip): skip both.
            log1p = expm1 = False
        mode = (SCALE if self.scale else 0) | (LOG1P if log1p else 0) | (EXPM1 if expm1 else 0)
        mode |= (LOG_DIV if log1p and self.log_base is not None else 0) | (
            EXP_MUL if expm1 and self.expm1_scale is not None else 0
        )
        return mode, log_div, exp_mul

    def apply(self, block: Any, factors: np.ndarray | None) -> Any:
        """The transformed block (any format), step by step as the lazy graph would."""
        if self.scale:
            block = scale_rows(block, factors)
        if self.log1p:
            block = log1p_block(block, self.log_base)
        if self.expm1:
            block = expm1_block(block, self.expm1_scale)
        return block


def _fused(block: Any, pending: Pending | None) -> bool:
    """Whether a compiled kernel can read *block* raw and apply *pending* itself."""
    if not (_is_csr(block) and use_numba()):
        return False
    return pending is None or block.dtype in (np.float32, np.float64)


def _params(block: Any, pending: Pending | None, factors: np.ndarray | None) -> tuple[Any, ...]:
    # *block*: anything with the values' dtype (a CSR block or its data vector).
    if pending is None:
        return np.ones(1), 0, False, 1.0, 1.0
    mode, log_div, exp_mul = pending.mode()
    fac = (
        np.ones(1)
        if factors is None
        else _adjusted(factors).astype(block.dtype, copy=False).astype(np.float64)
    )
    return fac, mode, block.dtype == np.float32, log_div, exp_mul


def _adjusted(factors: np.ndarray) -> np.ndarray:
    # A zero factor leaves its row as is (scanpy's rule).
    f = np.asarray(factors).reshape(-1)
    return f + (f == 0)


def log1p_block(block: Any, base: float | None) -> Any:
    """``log1p`` of every value (divided by ``log(base)``), sparse blocks staying sparse."""
    block = as_csr(block)
    if _is_csr(block):
        import scipy.sparse as sp

        data = np.log1p(block.data)
        if base is not None:
            data /= np.log(base)
        return sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
    out = np.log1p(block)
    if base is not None:
        out /= np.log(base)
    return out


def expm1_block(block: Any, scale: float | None) -> Any:
    """``expm1`` of every value (multiplied by *scale* first), sparse blocks staying sparse."""
    block = as_csr(block)
    if _is_csr(block):
        import scipy.sparse as sp

        data = block.data * scale if scale is not None else block.data
        return sp.csr_matrix((np.expm1(data), block.indices, block.indptr), shape=block.shape)
    b = np.asarray(block)
    return np.expm1(b * scale if scale is not None else b)


def row_sums(block: Any) -> np.ndarray:
    """Sum of every row (float64), as scanpy's counts per cell."""
    block = as_csr(block)
    if _is_csr(block):
        return csr_row_sums(block.data, block.indptr)
    return np.asarray(block, dtype=np.float64).sum(axis=1)


def csr_row_sums(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sum of every row (float64) of a CSR matrix given by its values and row pointers alone."""
    if use_numba():
        return _numba().row_sums(data, indptr)
    out = np.zeros(len(indptr) - 1, dtype=np.float64)
    if len(data):
        rows = np.repeat(np.arange(len(out)), np.diff(indptr))
        out = np.bincount(rows, weights=data.astype(np.float64, copy=False), minlength=len(out))
    return out


def scale_rows(block: Any, factors: np.ndarray) -> Any:
    """Divide every row by its factor (a zero factor leaves the row as is), in the block's dtype.

    The arithmetic is scanpy's: the factors are cast to the data's dtype
    first, so float32 data are divided in float32.
    """
    block = as_csr(block)
    f = _adjusted(factors)
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
    pending: Pending | None = None,
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """``(3, n_groups, n_cols)`` float64: per group and column, the sum, sum of squares and non-zero count.

    Parameters
    ----------
    groups
        Group of every row of the block (``-1``: left out); default all in group 0.
    clip
        ``(n_groups, n_cols)`` upper bounds applied to values before summing
        (Seurat v3's clipped variance); counts are of the stored non-zeros.
    pending, factors
        Transforms to apply to the values first (and the row factors they divide by).
    """
    block = as_csr(block)
    n_rows, n_cols = block.shape
    if _fused(block, pending):
        return parts_stats(
            [(0, n_rows, block.data, block.indices, block.indptr)], n_rows=n_rows, n_cols=n_cols,
            groups=groups, n_groups=n_groups, clip=clip, pending=pending, factors=factors,
        )  # fmt: skip
    if groups is None:
        groups = np.zeros(n_rows, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if pending is not None:
        block = as_csr(pending.apply(block, factors))
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


class _StatsSums:
    """The accumulators of :func:`block_stats`' compiled loop, for a block given whole or in pieces of rows."""

    def __init__(self, n_groups: int, n_cols: int, n_rows: int, clip: np.ndarray | None) -> None:
        self.shape = (int(n_groups), int(n_cols))
        size = self.shape[0] * self.shape[1]
        self.clip = (
            np.zeros(1) if clip is None else np.ascontiguousarray(clip, dtype=np.float64).reshape(size)
        )
        self.has_clip = clip is not None
        self.ss = np.zeros((size, 2), dtype=np.float64)
        # A count is at most the block's rows.
        self.cnt = np.zeros(size, dtype=np.int32 if n_rows < 2**31 else np.int64)

    def add(
        self,
        data: np.ndarray,
        indices: np.ndarray,
        indptr: np.ndarray,
        groups: np.ndarray,
        pending: Pending | None,
        factors: np.ndarray | None,
    ) -> None:
        fac, *mode = _params(data, pending, factors)
        _numba().stats(
            data, indices, indptr, groups, self.shape[1], self.clip, self.has_clip, fac, *mode, self.ss, self.cnt
        )  # fmt: skip

    def result(self) -> np.ndarray:
        out = np.empty((3, *self.shape), dtype=np.float64)
        out[:2] = self.ss.T.reshape(2, *self.shape)
        out[2] = self.cnt.reshape(self.shape)
        return out


def parts_stats(
    parts: Any,
    *,
    n_rows: int,
    n_cols: int,
    groups: np.ndarray | None = None,
    n_groups: int = 1,
    clip: np.ndarray | None = None,
    pending: Pending | None = None,
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`block_stats` of a CSR block of *n_rows* rows given in pieces of rows.

    *parts* yields ``(lo, hi, data, indices, indptr)`` for rows ``lo:hi``
    (:meth:`~dask_loom.anndata._plan._LayerPlan.iter_parts`); *groups* and
    *factors* are the whole block's.  Compiled kernels only (:func:`stream_stats`).
    """
    groups = np.zeros(n_rows, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    f = None if factors is None else np.asarray(factors).reshape(-1)
    acc = _StatsSums(n_groups, n_cols, n_rows, clip)
    for lo, hi, data, indices, indptr in parts:
        acc.add(data, indices, indptr, groups[lo:hi], pending, None if f is None else f[lo:hi])
    return acc.result()


def stream_stats(dtype: Any, pending: Pending | None) -> bool:
    """Whether :func:`parts_stats` can sum a CSR block of *dtype* with *pending* owed."""
    return use_numba() and (pending is None or np.dtype(dtype) in (np.float32, np.float64))


def _dense_selection(block: Any, lut: np.ndarray, n_sel: int) -> tuple[np.ndarray, np.ndarray]:
    """The selected columns of a block, dense (rows x n_sel, the block's float dtype), and their sums."""
    block = as_csr(block)
    dtype = np.result_type(block.dtype, np.float32)
    if _is_csr(block):
        dense = np.zeros((block.shape[0], n_sel), dtype=dtype)
        sums = np.zeros(n_sel, dtype=np.float64)
        if use_numba():
            _numba().scatter(block.data, block.indices, block.indptr, lut, n_sel, dense, sums)
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


#: Columns stored in at least this fraction of a block's rows go into the dense BLAS product.
DENSE_FRACTION = 0.1


def gram_block(
    block: Any,
    lut: np.ndarray,
    n_sel: int,
    *,
    pending: Pending | None = None,
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """``(1, n_sel + 1, n_sel)`` float64: the Gram matrix ``B.T @ B`` of the selected columns, each pair once, then their sums.

    Each product of two different columns is in one of its two places (the
    other is zero): :func:`symmetric` makes the matrix of the sum of all
    blocks.  Sparse blocks: the columns stored in at least
    :data:`DENSE_FRACTION` of the rows are scattered into a dense buffer and
    multiplied with one BLAS call (a symmetric rank-k update); the products
    that involve a sparser column, most columns but a small part of the
    work, are summed over the stored values only.
    """
    block = as_csr(block)
    if _fused(block, pending):
        return gram_selected(select_block(block, lut, n_sel, pending=pending, factors=factors))
    out = np.zeros((1, n_sel + 1, n_sel), dtype=np.float64)
    if pending is not None:
        block = pending.apply(block, factors)
    dense, sums = _dense_selection(block, lut, n_sel)
    out[0, :n_sel] = np.triu(np.dot(dense.T, dense))
    out[0, n_sel] = sums
    return out


def symmetric(summed: np.ndarray) -> np.ndarray:
    """The summed :func:`gram_block` output (each pair in one place) as the symmetric Gram matrix, then the sums."""
    out = np.array(summed, dtype=np.float64).reshape(summed.shape[-2:])
    n = out.shape[1]
    g = out[:n]
    diag = g.diagonal().copy()
    g += g.T.copy()
    g[np.diag_indices(n)] = diag
    return out


def project_block(
    block: Any,
    lut: np.ndarray,
    components: np.ndarray,
    offset: np.ndarray,
    dtype: Any,
    *,
    pending: Pending | None = None,
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """``(B[:, selected] @ components.T) - offset`` for one block, as *dtype*."""
    n_sel = components.shape[1]
    block = as_csr(block)
    if _fused(block, pending):
        return project_selected(
            select_block(block, lut, n_sel, pending=pending, factors=factors), components, offset, dtype
        )
    if pending is not None:
        block = as_csr(pending.apply(block, factors))
    if _is_csr(block) and block.shape[0]:
        sel = block[:, np.flatnonzero(lut >= 0)[np.argsort(lut[lut >= 0])]]
        out = np.asarray(sel @ components.T, dtype=np.float64)
    else:
        dense, _ = _dense_selection(block, lut, n_sel)
        out = dense.astype(np.float64) @ components.T
    out -= offset[None, :]
    return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class Selected:
    """The selected columns of one block, transformed, as a compact CSR: what a Gram pass and a projection read.

    ``rp`` row pointers, ``ck`` positions among the selected columns (int16
    when they fit), ``cv`` values (float32 when the block is float32: the
    transforms round every value to it), ``cnt`` rows storing each selected
    column.  A tenth of the block or less for a few thousand variable genes,
    so :func:`dask_loom.pp.pca` can keep it from the Gram pass for the projection.
    """

    rp: np.ndarray
    ck: np.ndarray
    cv: np.ndarray
    cnt: np.ndarray
    n_sel: int

    @property
    def n_rows(self) -> int:
        return len(self.rp) - 1

    @property
    def nbytes(self) -> int:
        return self.rp.nbytes + self.ck.nbytes + self.cv.nbytes + self.cnt.nbytes


def select_block(
    block: Any,
    lut: np.ndarray,
    n_sel: int,
    *,
    pending: Pending | None = None,
    factors: np.ndarray | None = None,
) -> Selected:
    """The selected columns (``lut[col]`` = position or -1) of a CSR block, *pending* applied (compiled kernels only)."""
    block = as_csr(block)
    nb = _numba()
    indptr = block.indptr
    base, nnz = int(indptr[0]), int(indptr[-1] - indptr[0])
    mask = (np.asarray(lut) >= 0).view(np.uint8)
    pos = np.empty(nnz, dtype=np.int32 if nnz <= np.iinfo(np.int32).max else np.int64)
    unsigned = block.indices.view(np.uint32 if block.indices.dtype.itemsize == 4 else np.uint64)
    q = nb.select_scan(unsigned, mask, base, pos)
    vt = np.float32 if block.dtype == np.float32 else np.float64
    kt = np.int16 if n_sel <= np.iinfo(np.int16).max else np.int32
    rp = np.zeros(block.shape[0] + 1, dtype=np.int64)
    ck, cv, cnt = np.empty(q, dtype=kt), np.empty(q, dtype=vt), np.zeros(n_sel, dtype=np.int64)
    nb.select_fill(
        block.data, block.indices, indptr, pos, np.asarray(lut, dtype=np.int32),
        *_params(block, pending, factors), rp, ck, cv, cnt,
    )  # fmt: skip
    return Selected(rp, ck, cv, cnt, int(n_sel))


def gram_selected(sel: Selected) -> np.ndarray:
    """:func:`gram_block` of a block's :class:`Selected` values."""
    nb = _numba()
    n_sel = sel.n_sel
    # float32 values: float32 sums within the block (a few thousand rows), as
    # BLAS's product of the dense part; the partials are float64 (a float32
    # one saved its zeroing but cost more where the tree turned it into float64).
    vt = np.result_type(sel.cv.dtype, np.float32)
    out = np.zeros((1, n_sel + 1, n_sel), dtype=np.float64)
    hcols = np.flatnonzero(sel.cnt >= max(1.0, DENSE_FRACTION * sel.n_rows))
    hpos = np.full(n_sel, -1, dtype=np.int64)
    hpos[hcols] = np.arange(len(hcols))
    dense = np.zeros((sel.n_rows, len(hcols)), dtype=vt)
    nb.gram_sparse(sel.rp, sel.ck, sel.cv, sel.cnt, hpos, hcols, dense, out[0, :n_sel], out[0, n_sel])
    if len(hcols):
        # np.dot of a matrix with its own transpose is BLAS's symmetric rank-k update.
        nb.merge_dense(out[0, :n_sel], np.dot(dense.T, dense), hcols)
    return out


def project_selected(sel: Selected, components: np.ndarray, offset: np.ndarray, dtype: Any) -> np.ndarray:
    """:func:`project_block` of a block's :class:`Selected` values."""
    comps_t = np.ascontiguousarray(np.asarray(components, dtype=np.float64).T)
    out = _numba().project(sel.rp, sel.ck, sel.cv, comps_t)
    out -= offset[None, :]
    return out.astype(dtype, copy=False)
