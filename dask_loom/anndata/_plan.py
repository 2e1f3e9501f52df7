"""One layer of one file as rows of a joined collection, and the collection as its helpers see it.

Below :mod:`dask_loom.anndata._mapped`: the dask view (``_dask``), the chunk
source (``_source``) and the batch loader (``_loader``) import this module,
never the collection's own, so the collection can delegate to them without an
import cycle.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dask_loom._lazy import isna, issparse
from dask_loom.anndata._elems import Column, MatrixMeta
from dask_loom.anndata._read import (
    indptr_of,
    raw_vector_dtype,
    read_csr_parts,
    read_csr_values,
    read_matrix_rows,
    will_need_csr,
)
from dask_loom.anndata._store import AnnStore

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

__all__ = ["FILL_VALUES", "MISSING_CODE", "CollectionLike"]

#: Fill of an element a file lacks: matrices get NaN rows (0 for integer dtypes),
#: obs labels ``np.nan`` (as lamindb gives for a missing label).
FILL_VALUES = {"float": np.nan, "int": 0, "label": np.nan}

# Internal code of a missing label in the encoded label vectors; items give
# ``np.nan`` (as lamindb does) and batches NaN.  ``-1`` is the ``unknown_label`` code.
MISSING_CODE = -2


def _as_list(keys: str | Sequence[str] | None) -> list[str] | None:
    if keys is None:
        return None
    return [keys] if isinstance(keys, str) else list(keys)


def _is_missing(v: Any) -> bool:
    try:
        return bool(isna(v))
    except (TypeError, ValueError):
        return False


#: A piece of a block's CSR rows: ``(lo, hi, data, indices, indptr)`` for ``rows[lo:hi]``.
Part = tuple[int, int, np.ndarray, np.ndarray, np.ndarray]


class _LayerPlan:
    """How one layer key of one file turns into rows of the joined collection."""

    __slots__ = ("dtype", "fill", "item_dtype", "join", "meta", "n_out", "store", "var_idx")

    def __init__(
        self,
        store: AnnStore,
        meta: MatrixMeta | None,
        *,
        join: str | None,
        var_idx: np.ndarray | None,
        n_out: int,
        dtype: np.dtype,
        item_dtype: np.dtype | None = None,
    ) -> None:
        self.store = store
        self.meta = meta
        self.join = join
        self.var_idx = var_idx
        self.n_out = n_out
        self.dtype = np.dtype(dtype)
        # Items (``mc[i]``) keep the file's own dtype, as lamindb's do; batches
        # and dask blocks span files and use the common ``dtype``.
        self.item_dtype = self.dtype if item_dtype is None else np.dtype(item_dtype)
        self.fill = FILL_VALUES["float"] if self.dtype.kind in "fc" else FILL_VALUES["int"]

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return (
            "LayerPlan",
            self.store,
            self.meta,
            self.join,
            tokenize(self.var_idx),
            self.n_out,
            self.dtype.str,
            self.item_dtype.str,
        )

    def __getstate__(self) -> Any:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: Any) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def read(
        self, rows: np.ndarray, *, sparse: bool | None = False, dtype: np.dtype | None = None
    ) -> np.ndarray | sp.csr_matrix:
        """Sorted unique local *rows*, in joined var space: dense, CSR, or (``None``) as stored.

        Values are cast to *dtype* (default: the collection's common dtype).
        """
        n = len(rows)
        if self.meta is None:
            out = np.full((n, self.n_out), self.fill, dtype=self.dtype)
            return _csr(out) if sparse else out
        block = read_matrix_rows(self.store, self.meta, rows)
        return self.to_joint(block, sparse=sparse, dtype=dtype)

    def read_parts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Sorted unique local *rows* of a CSR file as ``(data, indices, indptr)`` in joined var space.

        Values in the collection's dtype, as :meth:`read` gives them; a join
        leaves the indices of a row unsorted: for kernels that only add
        entries up (no scipy import).  ``None`` for any other file (dense,
        CSC, or lacking the layer) and for float16, which scipy has not.
        """
        meta = self.meta
        if meta is None or meta.fmt != "csr" or (self.dtype.kind == "f" and self.dtype.itemsize == 2):
            return None
        data, indices, indptr = self._joined(*read_csr_parts(self.store, meta, rows), width=meta.shape[1])
        return data.astype(self.dtype, copy=False), indices, indptr

    def iter_parts(self, rows: np.ndarray, *, piece_bytes: int) -> Iterator[Part] | None:
        """:meth:`read_parts` of *rows* in pieces of about *piece_bytes* of stored entries.

        Yields ``(lo, hi, data, indices, indptr)`` for ``rows[lo:hi]``.  Where
        a range of the file's vectors costs only its own bytes (uncompressed
        HDF5), every piece is read into the same two buffers: a pass over a
        block then works on a few MiB that stay in cache, where a block-sized
        read is a copy the kernel reads back from memory, into pages faulted
        in anew for every block.  Elsewhere (compressed chunks, whose cuts
        would be decoded twice) the block is one piece.  A piece's arrays
        are valid until the next one is read.  ``None`` where
        :meth:`read_parts` gives ``None``.
        """
        meta = self.meta
        if meta is None or meta.fmt != "csr" or (self.dtype.kind == "f" and self.dtype.itemsize == 2):
            return None
        rows = np.asarray(rows, dtype=np.int64)
        dts = [raw_vector_dtype(self.store, f"{meta.path}/{name}") for name in ("data", "indices")]
        if dts[0] is None or dts[1] is None or not len(rows):
            return self._whole(rows)
        return self._pieces(rows, dts[0], dts[1], max(1, piece_bytes // (dts[0].itemsize + dts[1].itemsize)))

    def _whole(self, rows: np.ndarray) -> Iterator[Part]:
        parts = self.read_parts(rows)
        assert parts is not None  # iter_parts checked what read_parts needs
        yield (0, len(rows), *parts)

    def _pieces(self, rows: np.ndarray, d_dt: np.dtype, i_dt: np.dtype, per: int) -> Iterator[Part]:
        meta = self.meta
        assert meta is not None
        ip = indptr_of(self.store, meta)
        ends = np.cumsum(ip[rows + 1] - ip[rows])
        cuts = [0]
        while cuts[-1] < len(rows):
            lo = cuts[-1]
            done = int(ends[lo - 1]) if lo else 0
            # Whole rows, at least one, up to `per` entries.
            cuts.append(max(lo + 1, int(np.searchsorted(ends, done + per, side="right"))))
        most = max(
            int(ends[hi - 1]) - (int(ends[lo - 1]) if lo else 0) for lo, hi in itertools.pairwise(cuts)
        )
        bufs = (np.empty(most, dtype=d_dt), np.empty(most, dtype=i_dt))
        # Small reads one after the other would wait on the disk each time: it reads the block ahead.
        will_need_csr(self.store, meta, rows)
        for lo, hi in itertools.pairwise(cuts):
            data, indices, indptr = self._joined(
                *read_csr_parts(self.store, meta, rows[lo:hi], bufs=bufs), width=meta.shape[1]
            )
            yield lo, hi, data.astype(self.dtype, copy=False), indices, indptr

    def read_row_values(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Sorted unique local *rows* of a CSR file as their values and row pointers, ``(data, indptr)``.

        Each row's values are those it has in joined var space, so a row's sum
        is its sum in the joined matrix; the column indices are not read.
        ``None`` where that needs them (an inner join that drops columns) and
        wherever :meth:`read_parts` gives ``None``.
        """
        meta = self.meta
        if meta is None or meta.fmt != "csr" or (self.dtype.kind == "f" and self.dtype.itemsize == 2):
            return None
        if self.join == "inner" and len(np.unique(self.var_idx)) < meta.shape[1]:  # type: ignore[arg-type]
            return None
        data, indptr = read_csr_values(self.store, meta, rows)
        return data.astype(self.dtype, copy=False), indptr

    def _joined(
        self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, *, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of a file's CSR rows moved to joined var space (columns an inner join drops go)."""
        if self.join == "inner":
            lut = np.full(width, -1, dtype=np.int64)
            lut[self.var_idx] = np.arange(len(self.var_idx))  # type: ignore[arg-type]
            new = lut[indices]
            keep = new >= 0
            if not keep.all():
                kept = np.concatenate(([0], np.cumsum(keep)))
                indptr = kept[indptr]
                data, new = data[keep], new[keep]
            indices = new
        elif self.join == "outer":
            indices = self.var_idx[indices]  # type: ignore[index]
        return data, indices, indptr

    def to_joint(
        self, block: np.ndarray | sp.csr_matrix, *, sparse: bool | None, dtype: np.dtype | None = None
    ) -> np.ndarray | sp.csr_matrix:
        dtype = self.dtype if dtype is None else dtype
        n = block.shape[0]
        if issparse(block):
            import scipy.sparse as sp

            width = block.shape[1]
            data, indices, indptr = self._joined(block.data, block.indices, block.indptr, width=width)
            if not sparse and dtype.kind == "f" and dtype.itemsize == 2:
                # scipy.sparse has no float16: scatter the entries straight into the dense rows
                dense = np.zeros((n, self.n_out), dtype=dtype)
                np.add.at(
                    dense, (np.repeat(np.arange(n), np.diff(indptr)), indices), data.astype(dtype, copy=False)
                )
                return dense
            out = sp.csr_matrix((data.astype(dtype, copy=False), indices, indptr), shape=(n, self.n_out))
            if sparse:
                if self.join is not None:
                    out.has_sorted_indices = False
                    out.sort_indices()
                return out
            return out if sparse is None else out.toarray()
        if self.join == "inner":
            out = block[:, self.var_idx].astype(dtype, copy=False)
        elif self.join == "outer":
            out = np.zeros((n, self.n_out), dtype=dtype)
            out[:, self.var_idx] = block
        else:
            out = block.astype(dtype, copy=False)
        return _csr(out) if sparse else out


def _csr(dense: np.ndarray) -> sp.csr_matrix:
    import scipy.sparse as sp

    return sp.csr_matrix(dense)


class CollectionLike(Protocol):
    """What the helpers of :class:`~dask_loom.anndata.MappedCollection` read from it.

    ``MappedCollection`` is the one implementation; the protocol lets its
    helper modules name the type without importing the collection.
    """

    storages: list[AnnStore]
    n_obs_list: list[int]
    indices_list: list[np.ndarray]
    storage_idx: np.ndarray
    obs_keys: list[str] | None
    layers_keys: list[str]
    var_joint: pd.Index | None
    _n_obs_full: list[int]
    _offsets: np.ndarray
    _plans: dict[str, list[_LayerPlan]]
    _columns: dict[str, list[Column | None]]
    _cache_obs_keys: list[Any]
    _codes: dict[str, list[np.ndarray]]
    _nan_coded: dict[str, Any]

    def get_merged_categories(self, label_key: str) -> list[Any]: ...

    def _read_columns(self, key: str, *, required: bool) -> list[Column | None]: ...

    def _read_rows(
        self, file_rows: dict[int, np.ndarray], *, sparse: bool | None, items: bool = False
    ) -> dict[tuple[int, str], Any]: ...
