"""A collection's layer as chunk sources: one per file, rows stacked in collection order.

:class:`AnnDataSource` is one file's share of a ``MappedCollection`` layer
(the rows the collection keeps, in the joined var space) as a
:class:`~dask_loom.blocks.ChunkSource`.  Reads go through the collection's own
readers (``_LayerPlan.read``: h5ad by byte range, zarr through the direct
chunk reader); CSR and CSC files also hand out ``scipy.sparse.csr_matrix``
blocks (``read_sparse``).  Blocks follow the file's storage: whole chunks
(shards) of a dense matrix, row ranges of about the target size of a CSR
matrix (``plan_chunks``, the same bands as ``MappedCollection.to_dask``).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._config import block_size_bytes
from dask_loom.anndata._read import indptr_of
from dask_loom.blocks import plan_blocks
from dask_loom.errors import CollectionError, ElementNotFoundError

if TYPE_CHECKING:
    import scipy.sparse as sp

    from dask_loom.anndata._plan import CollectionLike, _LayerPlan

__all__ = ["AnnDataSource", "collection_info", "label_codes", "row_bands"]


def row_bands(plan: _LayerPlan, n_rows: int, target: int) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of one file, on storage boundaries, about *target* bytes each."""
    meta = plan.meta
    if n_rows == 0:
        return []
    if meta is None:
        per_row = max(1, plan.n_out * plan.dtype.itemsize)
        step = max(1, target // per_row)
        return [(a, min(n_rows, a + step)) for a in range(0, n_rows, step)]
    if meta.fmt == "csr":
        # Rows per band from the stored entries, rounded to whole row units of
        # the data vector's chunks is impossible (chunks cut rows); bands follow
        # the entry budget instead, so each band reads about *target* bytes.
        ip = indptr_of(plan.store, meta)
        isz = np.dtype(meta.dtype).itemsize + 8
        budget = max(1, target // isz)
        bounds = [0]
        while bounds[-1] < n_rows:
            lo = bounds[-1]
            hi = int(np.searchsorted(ip, ip[lo] + budget, side="right")) - 1
            bounds.append(min(n_rows, max(hi, lo + 1)))
        return list(itertools.pairwise(bounds))
    # A CSC matrix's rows are read from the whole matrix (cached per process): its
    # data vector's chunks say nothing about rows, any row band will do.
    unit = max(1, meta.chunk_rows) if meta.fmt != "csc" else 1
    width = max(1, meta.shape[1])
    chunks = plan_blocks((n_rows, width), (unit, width), np.dtype(meta.dtype).itemsize, target_bytes=target, band_axis=0)[0]
    edges = np.concatenate(([0], np.cumsum(chunks))).tolist()
    return list(itertools.pairwise(edges))


_PREFIX = {"h5ad": "h5ad-read", "zarr": "zarr-read", "zarr-zip": "zarr-read"}


class AnnDataSource:
    """The rows *rows* (sorted local row numbers) of one file's layer, as a chunk source.

    Parameters
    ----------
    plan
        The collection's plan for this file and layer (join, dtype, fill).
    rows
        Local rows kept, sorted and unique.
    n_full
        Rows of the file.
    layer
        The layer's name (for messages).
    """

    def __init__(self, plan: _LayerPlan, rows: np.ndarray, n_full: int, *, layer: str = "X") -> None:
        self.layer_plan = plan
        self.rows = np.asarray(rows, dtype=np.int64)
        self.n_full = int(n_full)
        self.layer = layer
        meta = plan.meta
        self.shape = (len(self.rows), int(plan.n_out))
        self.dtype = np.dtype(plan.dtype)
        self.prefix = _PREFIX.get(plan.store.kind, "mapped-read")
        self.fmt = "missing" if meta is None else meta.fmt
        self.sparse = self.fmt in ("csr", "csc")
        whole = len(self.rows) == self.n_full
        # Dense files: a block is whole chunks (shards) of rows; CSR rows are cut anywhere.
        unit = meta.chunk_rows if (meta is not None and self.fmt == "dense" and whole) else 1
        self.chunk_shape = (max(1, int(unit)), max(1, self.shape[1]))
        self.label = f"{plan.store.name}:{meta.path if meta is not None else layer}"

    @property
    def ndim(self) -> int:
        return 2

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("AnnDataSource", tokenize(self.layer_plan), tokenize(self.rows), self.n_full, self.prefix)

    def __repr__(self) -> str:
        return f"AnnDataSource({self.label!r}, {self.fmt}, shape={self.shape}, dtype={self.dtype})"

    def plan_chunks(self, *, band_axis: int | None = None, target_bytes: int | str | None = None) -> tuple[tuple[int, ...], ...]:
        """Row bands on the file's storage boundaries (whole chunks, or about *target_bytes* of CSR entries), full width."""
        n_rows, n_cols = self.shape
        if n_rows == 0:
            return ((0,), (n_cols,))
        bounds = row_bands(self.layer_plan, self.n_full, block_size_bytes(target_bytes))
        edges = np.array([lo for lo, _ in bounds] + [bounds[-1][1]], dtype=np.int64)
        sizes = np.diff(np.searchsorted(self.rows, edges))
        return (tuple(int(s) for s in sizes if s) or (0,), (n_cols,))

    def _local(self, rows: slice) -> np.ndarray:
        return self.rows[rows]

    def read_sparse(self, region: tuple[slice, ...]) -> sp.csr_matrix:
        """A region as ``scipy.sparse.csr_matrix`` (never densified for a CSR file)."""
        rows, cols = region
        m = self.layer_plan.read(self._local(rows), sparse=True)
        return m if (cols.start, cols.stop) == (0, self.shape[1]) else m[:, cols].tocsr()

    def read_csr_parts(self, region: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A full-width region of a CSR file as ``(data, indices, indptr)``, for kernels that add entries up.

        Indices may be unsorted within a row (a join); ``None`` where the
        region is not full width or the file is not CSR (then read
        :meth:`read_sparse`).
        """
        rows, cols = region
        if (cols.start, cols.stop) != (0, self.shape[1]):
            return None
        return self.layer_plan.read_parts(self._local(rows))

    def read_block(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        """A region as a dense array."""
        rows, cols = region
        m = self.layer_plan.read(self._local(rows), sparse=False)
        block = m if (cols.start, cols.stop) == (0, self.shape[1]) else m[:, cols]
        if out is not None:
            out[...] = block
            return out
        return np.asarray(block)


def label_codes(mc: CollectionLike, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, categories)`` of obs column *key* over the collection's rows: sorted categories, ``-1`` where missing.

    Categorical columns map their codes through one small table per file;
    other columns are matched by value.  A file without the column gives
    ``-1`` for its rows.
    """
    from dask_loom.anndata._elems import map_labels

    cats = mc.get_merged_categories(key)
    encoder = {c: i for i, c in enumerate(cats)}
    cols = mc._columns.get(key)
    if cols is None:
        cols = mc._read_columns(key, required=True)
    parts = []
    for i, col in enumerate(cols):
        rows = mc.indices_list[i]
        if col is None:
            parts.append(np.full(len(rows), -1, dtype=np.int64))
            continue
        if col.kind == "categorical":
            lut = np.array([encoder.get(c, -1) for c in col.categories] + [-1], dtype=np.int64)  # type: ignore[union-attr]
            codes = np.asarray(col.codes)[rows]
            parts.append(lut[np.where(codes < 0, len(lut) - 1, codes)])
        else:
            parts.append(map_labels(col.labels()[rows], encoder, -1))
    codes = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return codes, (np.asarray(cats) if cats else np.empty(0, dtype=object))


def collection_info(mc: CollectionLike, layer: str | None = None) -> Any:
    """The :class:`~dask_loom.ops._sources.SourceInfo` of a collection's layer (default ``X``)."""
    from dask_loom.ops._sources import SourceInfo

    key = "X" if layer is None else layer
    plans = mc._plans.get(key) or mc._plans.get(f"obsm_{key}")
    if plans is None:
        raise ElementNotFoundError(
            f"layer '{key}' was not requested: the collection holds layers {mc.layers_keys} (pass it in layers_keys)"
        )
    widths = {p.n_out for p in plans}
    if len(widths) > 1:
        raise CollectionError(
            f"layer '{key}': files have different widths {sorted(widths)} (join=None with different var, or raw.X); "
            "operations need one width: use join='inner' or 'outer'"
        )
    parts = tuple(AnnDataSource(p, rows, n, layer=key) for p, rows, n in zip(plans, mc.indices_list, mc._n_obs_full))
    formats = {p.prefix[: -len("-read")] for p in parts}
    names = [s.name for s in mc.storages]
    label = f"MappedCollection of {len(names)} file(s) ({names[0]}{', ...' if len(names) > 1 else ''}), layer '{key}'"
    return SourceInfo(
        parts=parts,
        format=formats.pop() if len(formats) == 1 else "mapped",
        label=label,
        labels=lambda k: label_codes(mc, k),
        read_only="a MappedCollection is read-only",
    )
