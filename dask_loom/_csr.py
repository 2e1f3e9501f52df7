"""Sparse blocks: decoded dense chunks to ``scipy.sparse.csr_matrix``, either orientation.

Decision 12 of the design: blocks may be CSR (what anndata and scanpy accept),
aligned to stored chunks like dense ones.  A Loom layer stores dense chunks;
here the decoded chunks, still in their grid layout ``(gi, gj, c0, c1)``, are
turned into CSR directly — in the stored orientation or transposed (cells as
rows, as AnnData wants) — without first assembling a row-major dense copy of
the block and without sorting: walking the grid in memory order visits the
entries of every output row in increasing column order, so a counting pass and
a fill pass give canonical CSR.

With numba (the ``analysis`` extra brings it) both passes are compiled and
release the GIL; without it (or with ``dask_loom.kernels = "numpy"``) the
same result comes from vectorised numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._config import get_config
from dask_loom.errors import MissingDependencyError, UnsupportedDtypeError

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["CSRView", "dense_to_csr", "numba_kernels", "sparse_dtype", "staged_to_csr", "use_numba"]


def use_numba() -> bool:
    """Whether per-block kernels are compiled with numba (``dask_loom.kernels``)."""
    mode = str(get_config("kernels")).lower()
    if mode == "numpy":
        return False
    if mode not in ("auto", "numba"):
        from dask_loom.errors import ConfigError

        raise ConfigError(f"dask_loom.kernels must be 'auto', 'numba' or 'numpy', not {mode!r}")
    try:
        import numba  # noqa: F401
    except ImportError:
        if mode == "numba":
            raise MissingDependencyError(
                "dask_loom.kernels='numba' needs numba: pip install 'dask_loom[analysis]'"
            ) from None
        return False
    return True


def sparse_dtype(dtype: Any, *, where: str = "the array") -> np.dtype:
    """The dtype a CSR block of *dtype* data holds (scipy has no float16; non-numeric is refused)."""
    dt = np.dtype(dtype)
    if dt.kind not in "biuf":
        raise UnsupportedDtypeError(
            f"{where}: dtype {dt} is not numeric; it cannot be read as a sparse matrix"
        )
    if dt == np.float16:
        return np.dtype(np.float32)
    return dt


@functools.cache
def numba_kernels() -> Any:
    """Compile (once per process; cached on disk by numba) the grid-to-CSR kernels.

    Counting is branch-free so it vectorises; the fill pass visits the grid in
    memory order, one branch per element, the orientation hoisted out of the loop.
    """
    import numba

    @numba.njit(nogil=True, cache=True)
    def count(staged, off0, off1, n0, n1, transpose):  # pragma: no cover - compiled
        gi, gj, c0, c1 = staged.shape
        counts = np.zeros((n1 if transpose else n0) + 1, np.int64)
        for i in range(gi):
            g_lo = max(0, off0 - i * c0)
            g_hi = min(c0, off0 + n0 - i * c0)
            for j in range(gj):
                c_lo = max(0, off1 - j * c1)
                c_hi = min(c1, off1 + n1 - j * c1)
                base = j * c1 - off1 + 1
                for g in range(g_lo, g_hi):
                    if transpose:
                        for c in range(c_lo, c_hi):
                            counts[base + c] += staged[i, j, g, c] != 0
                    else:
                        k = 0
                        for c in range(c_lo, c_hi):
                            k += staged[i, j, g, c] != 0
                        counts[i * c0 + g - off0 + 1] += k
        for k in range(len(counts) - 1):
            counts[k + 1] += counts[k]
        return counts

    @numba.njit(nogil=True, cache=True)
    def fill_t(staged, off0, off1, n0, n1, indptr, indices, data):  # pragma: no cover - compiled
        gi, gj, c0, c1 = staged.shape
        pos = indptr[:-1].copy()
        for i in range(gi):
            g_lo = max(0, off0 - i * c0)
            g_hi = min(c0, off0 + n0 - i * c0)
            for j in range(gj):
                c_lo = max(0, off1 - j * c1)
                c_hi = min(c1, off1 + n1 - j * c1)
                base = j * c1 - off1
                for g in range(g_lo, g_hi):
                    r = i * c0 + g - off0
                    for c in range(c_lo, c_hi):
                        v = staged[i, j, g, c]
                        if v != 0:
                            p = pos[base + c]
                            indices[p] = r
                            data[p] = v
                            pos[base + c] = p + 1

    @numba.njit(nogil=True, cache=True)
    def fill_n(staged, off0, off1, n0, n1, indptr, indices, data):  # pragma: no cover - compiled
        gi, gj, c0, c1 = staged.shape
        pos = indptr[:-1].copy()
        for i in range(gi):
            g_lo = max(0, off0 - i * c0)
            g_hi = min(c0, off0 + n0 - i * c0)
            for j in range(gj):
                c_lo = max(0, off1 - j * c1)
                c_hi = min(c1, off1 + n1 - j * c1)
                base = j * c1 - off1
                for g in range(g_lo, g_hi):
                    r = i * c0 + g - off0
                    p = pos[r]
                    for c in range(c_lo, c_hi):
                        v = staged[i, j, g, c]
                        if v != 0:
                            indices[p] = base + c
                            data[p] = v
                            p += 1
                    pos[r] = p

    return count, fill_t, fill_n


def _index_dtype(n: int) -> np.dtype:
    return np.dtype(np.int32) if n < 2**31 - 1 else np.dtype(np.int64)


def staged_to_csr(
    staged: np.ndarray,
    offsets: tuple[int, int],
    shape: tuple[int, int],
    *,
    transpose: bool = False,
) -> sp.csr_matrix:
    """CSR of a region of decoded chunks held in grid layout.

    Parameters
    ----------
    staged
        ``(gi, gj, c0, c1)``: chunk ``(i, j)`` of the grid holds rows
        ``i*c0 .. (i+1)*c0`` and columns ``j*c1 .. (j+1)*c1`` of the grid.
    offsets
        Where the region starts inside the grid (row, column).
    shape
        The region's shape (stored orientation); entries outside it (edge
        chunk padding, neighbours) are left out.
    transpose
        Return the CSR of the region's transpose (columns become rows).

    Examples
    --------
    >>> g = np.arange(16.0).reshape(2, 2, 2, 2) % 3   # 4 x 4 from 2 x 2 chunks
    >>> m = staged_to_csr(g, (0, 1), (3, 3), transpose=True)
    >>> m.toarray().tolist() == g.transpose(0, 2, 1, 3).reshape(4, 4)[:3, 1:].T.tolist()
    True
    """
    import scipy.sparse as sp

    staged = np.ascontiguousarray(staged)
    out_dtype = sparse_dtype(staged.dtype)
    if staged.dtype != out_dtype:
        staged = staged.astype(out_dtype)
    off0, off1 = (int(o) for o in offsets)
    n0, n1 = (int(n) for n in shape)
    out_shape = (n1, n0) if transpose else (n0, n1)
    if use_numba():
        count, fill_t, fill_n = numba_kernels()
        indptr = count(staged, off0, off1, n0, n1, transpose)
        nnz = int(indptr[-1])
        itype = _index_dtype(max(nnz, out_shape[1]))
        indices = np.empty(nnz, dtype=itype)
        data = np.empty(nnz, dtype=out_dtype)
        (fill_t if transpose else fill_n)(staged, off0, off1, n0, n1, indptr, indices, data)
        if itype == np.int32 and nnz < 2**31 - 1:
            indptr = indptr.astype(np.int32)
        return sp.csr_matrix((data, indices, indptr), shape=out_shape)
    return _staged_to_csr_numpy(staged, off0, off1, n0, n1, transpose, out_shape)


def _staged_to_csr_numpy(
    staged: np.ndarray, off0: int, off1: int, n0: int, n1: int, transpose: bool, out_shape: tuple[int, int]
) -> sp.csr_matrix:
    import scipy.sparse as sp

    gi, gj, c0, c1 = staged.shape
    if gi == 1 and gj == 1 and not transpose:
        # One dense 2-D block in memory order: rows come out in order, no counting sort needed.
        block = staged[0, 0, off0 : off0 + n0, off1 : off1 + n1]
        mask = block != 0
        counts = np.count_nonzero(mask, axis=1)
        indptr = np.zeros(n0 + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.nonzero(mask)[1].astype(_index_dtype(max(int(indptr[-1]), n1)))
        return sp.csr_matrix((block[mask], indices, indptr), shape=out_shape)
    mask = staged != 0
    i, j, g, c = np.nonzero(mask)
    data = staged[mask]
    r = i * c0 + g - off0
    q = j * c1 + c - off1
    if off0 or off1 or gi * c0 != n0 or gj * c1 != n1:
        keep = (r >= 0) & (r < n0) & (q >= 0) & (q < n1)
        r, q, data = r[keep], q[keep], data[keep]
    rows, cols = (q, r) if transpose else (r, q)
    # COO -> CSR is a stable counting sort: grid order already sorts each row's columns.
    return sp.coo_matrix((data, (rows, cols)), shape=out_shape).tocsr()


def dense_to_csr(block: np.ndarray, *, transpose: bool = False) -> sp.csr_matrix:
    """CSR of a dense 2-D block (or of its transpose), without densifying anything else.

    Examples
    --------
    >>> dense_to_csr(np.array([[0, 2.0], [3.0, 0]]), transpose=True).toarray().tolist()
    [[0.0, 3.0], [2.0, 0.0]]
    """
    block = np.asarray(block)
    if block.ndim != 2:
        raise ValueError(f"a sparse block must be 2-D, not {block.ndim}-D")
    if not block.flags.c_contiguous and block.T.flags.c_contiguous:
        # A transposed view: convert its C-ordered base the other way round.
        return dense_to_csr(block.T, transpose=not transpose)
    block = np.ascontiguousarray(block)
    return staged_to_csr(block.reshape(1, 1, *block.shape), (0, 0), block.shape, transpose=transpose)


def _read_csr(view: CSRView, region: tuple[slice, ...], *args: Any, **kwargs: Any) -> sp.csr_matrix:
    return view.read_block(region)


class CSRView:
    """A 2-D :class:`~dask_loom.blocks.ChunkSource` whose blocks are ``scipy.sparse.csr_matrix``.

    Parameters
    ----------
    source
        Any 2-D chunk source with dense blocks.  Sources that can hand out
        their decoded chunks (``read_sparse``, HDF5) are converted from the
        chunk grid; others are read dense, block by block, and converted.
    transpose
        Present the source transposed (a Loom layer's cells as rows): the CSR
        of each transposed block is built directly, no dense transpose is made.

    Examples
    --------
    >>> import dask_loom, tempfile, os
    >>> fn = os.path.join(tempfile.mkdtemp(), "x.loom")
    >>> dask_loom.create(fn, np.eye(3), {"g": np.arange(3)}, {"c": np.arange(3)})
    >>> with dask_loom.connect(fn, "r") as ds:
    ...     x = ds.layers[""].to_dask(sparse=True)
    ...     print(type(x._meta).__name__, x.compute(scheduler="sync").nnz)
    csr_matrix 3
    """

    def __init__(self, source: Any, *, transpose: bool = False) -> None:
        import scipy.sparse as sp

        if len(source.shape) != 2:
            raise ValueError(
                f"{getattr(source, 'label', 'the array')}: sparse blocks need a 2-D array, not shape {tuple(source.shape)}"
            )
        self.source = source
        self.transpose = bool(transpose)
        self.label = getattr(source, "label", getattr(source, "prefix", "array"))
        self.dtype = sparse_dtype(source.dtype, where=self.label)
        shape = tuple(int(s) for s in source.shape)
        chunk_shape = tuple(int(c) for c in source.chunk_shape)
        self.shape = shape[::-1] if self.transpose else shape
        self.chunk_shape = chunk_shape[::-1] if self.transpose else chunk_shape
        self.prefix = source.prefix
        self.meta = sp.csr_matrix((0, 0), dtype=self.dtype)

    @property
    def dense_source(self) -> Any:
        """The dense source, in its stored orientation, for operations that reduce its chunks directly."""
        return self.source

    @property
    def ndim(self) -> int:
        return 2

    def __dask_tokenize__(self) -> Hashable:
        from dask.base import tokenize

        return ("CSRView", tokenize(self.source), self.transpose)

    def read_block(self, region: tuple[slice, ...], out: Any = None) -> sp.csr_matrix:
        """The CSR of a region (in this view's orientation)."""
        region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape))
        src_region = region[::-1] if self.transpose else region
        reader = getattr(self.source, "read_sparse", None)
        if reader is not None:
            m = reader(src_region, transpose=self.transpose)
        else:
            m = dense_to_csr(self.source.read_block(src_region), transpose=self.transpose)
        if m.dtype != self.dtype:
            m = m.astype(self.dtype)
        return m

    def __repr__(self) -> str:
        return f"<CSRView of {self.label} shape={self.shape}{' (transposed)' if self.transpose else ''}>"
