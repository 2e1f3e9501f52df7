"""Reading rows of AnnData matrices: runs of rows, many at once, without h5py's lock.

h5ad dense arrays and the ``data``/``indices`` vectors of CSR groups are read
by byte range through :mod:`dask_loom.hdf5` (chunk index built once per
process, ``pread`` or parallel range requests, libdeflate outside h5py's
global lock); for an uncompressed chunked vector only the bytes a row needs
are read, not its whole chunk.  zarr arrays (v2, v3, sharded, zipped, remote)
are read by byte range too (:mod:`dask_loom.zarr._chunks`: cached shard
indexes, coalesced range reads, numcodecs decoding in the calling threads);
layouts that path does not handle go through zarr-python's async API, all
runs of a request gathered at once.  ``indptr`` is read once per process and
cached.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._handles import HandleCache
from dask_loom._threads import map_threads
from dask_loom.anndata._elems import MatrixMeta
from dask_loom.anndata._store import AnnStore
from dask_loom.blocks import split_by_chunk
from dask_loom.errors import AnnDataFormatError, CorruptChunkError
from dask_loom.hdf5._decode import decode_chunk
from dask_loom.hdf5._files import advise_ranges, read_ranges, read_ranges_into
from dask_loom.hdf5._source import HDF5Source, _chunk_offsets, dataset_layout

if TYPE_CHECKING:
    import scipy.sparse as sp

    from dask_loom.zarr._chunks import ZarrChunkReader

__all__ = [
    "coalesce",
    "map_threads",
    "read_csr_parts",
    "read_csr_rows",
    "read_dense_rows",
    "read_matrix_rows",
    "raw_vector_dtype",
    "read_vector",
    "will_need_csr",
]

# indptr vectors, zarr arrays and CSC-as-CSR matrices, made once per process and file.
_derived: HandleCache[Any] = HandleCache("anndata arrays")


def coalesce(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted unique rows into contiguous runs ``[starts, stops)``.

    Examples
    --------
    >>> coalesce(np.array([1, 2, 3, 7, 9, 10]))
    (array([1, 7, 9]), array([ 4,  8, 11]))
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return rows, rows
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate(([0], breaks))]
    stops = rows[np.concatenate((breaks - 1, [len(rows) - 1]))] + 1
    return starts, stops


def forget(store: AnnStore) -> None:
    """Drop what this process cached about *store* (indptr, zarr arrays, shard indexes)."""
    url = store.spec.url
    _derived.forget(lambda k: len(k) > 1 and k[1] == url)
    # Shard indexes exist only once the zarr reader is loaded: closing an h5ad collection must not import zarr.
    forget_shards = getattr(sys.modules.get("dask_loom.zarr._chunks"), "forget", None)
    if forget_shards is not None:
        forget_shards(url)


def _cached(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    return _derived.get(key, make)


# -- 1-D vectors ------------------------------------------------------------------


def _raw_ranges(
    spec: Any, lay: Any, starts: np.ndarray, stops: np.ndarray
) -> tuple[list[int], list[int]] | None:
    """File byte ranges (starts, sizes) of elements ``[starts[i], stops[i])`` where they are stored raw, else None."""
    isz = np.dtype(lay.dtype).itemsize
    if lay.layout == "contiguous":
        return (
            None
            if lay.offset is None
            else ((lay.offset + starts * isz).tolist(), ((stops - starts) * isz).tolist())
        )
    if lay.filters:
        return None
    c = int(lay.chunks[0])
    cid, lo, hi = split_by_chunk(starts, stops, c)
    offsets, _, _ = _chunk_offsets(spec, lay, cid[:, None])
    if not (offsets >= 0).all():
        return None  # a chunk never written: its fill value, not bytes of the file
    return (offsets + (lo - cid * c) * isz).tolist(), ((hi - lo) * isz).tolist()


def will_need_csr(store: AnnStore, meta: MatrixMeta, rows: np.ndarray) -> None:
    """Have the OS start reading *rows*' entries of a local uncompressed h5ad CSR matrix (see :func:`advise_ranges`)."""
    if store.kind != "h5ad" or not store.spec.is_local:
        return
    e0, e1, _ = _entry_ranges(store, meta, np.asarray(rows, dtype=np.int64))
    for name in ("data", "indices"):
        lay = dataset_layout(store.spec, f"{meta.path}/{name}")
        raw = _raw_ranges(store.spec, lay, e0, e1) if lay.fast and len(lay.shape) == 1 else None
        if raw is not None:
            advise_ranges(store.spec, *raw)


def _h5_ranges(
    store: AnnStore, path: str, starts: np.ndarray, stops: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    spec = store.spec
    lay = dataset_layout(spec, path)
    if not lay.fast or len(lay.shape) != 1:
        with store.locked() as f:
            ds = f[path]
            parts = [ds[int(a) : int(b)] for a, b in zip(starts, stops)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=ds.dtype)
    dt = np.dtype(lay.dtype)
    isz = dt.itemsize
    lens = stops - starts
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=dt)
    if lay.layout == "contiguous" and lay.offset is None:
        return np.full(total, lay.fillvalue, dtype=dt)
    raw = _raw_ranges(spec, lay, starts, stops)
    if raw is not None:
        # Raw bytes (contiguous, or unfiltered chunks): exactly the elements needed, straight
        # into the result (a join of pieces would copy again, holding the GIL), or into the
        # caller's buffer where it fits (a pass reusing one buffer pays no page faults per read).
        buf = out[:total] if out is not None and out.dtype == dt and len(out) >= total else None
        out = np.empty(total, dtype=dt) if buf is None else buf
        read_ranges_into(spec, raw[0], raw[1], out)
        return out
    c = int(lay.chunks[0])  # type: ignore[index]
    cid, lo, hi = split_by_chunk(starts, stops, c)
    offsets, sizes, masks = _chunk_offsets(spec, lay, cid[:, None])
    out = np.empty(total, dtype=dt)
    uniq, inv = np.unique(cid, return_inverse=True)
    first_of = np.zeros(len(uniq), dtype=np.int64)
    first_of[inv[::-1]] = np.arange(len(cid))[::-1]
    u_off, u_size, u_mask = offsets[first_of], sizes[first_of], masks[first_of]
    present = np.flatnonzero(u_off >= 0)
    raws = read_ranges(spec, u_off[present].tolist(), u_size[present].tolist())
    nbytes = c * isz
    where = f"{spec.name}:{path}"
    decoded: dict[int, np.ndarray] = {}
    for k, raw in zip(present.tolist(), raws):
        data = (
            decode_chunk(raw, lay.filters, int(u_mask[k]), nbytes, isz, where=where) if lay.filters else raw
        )
        if len(data) != nbytes:
            raise CorruptChunkError(
                f"{where}: chunk {int(uniq[k])} holds {len(data)} bytes, expected {nbytes}"
            )
        decoded[k] = np.frombuffer(data, dtype=dt)
    pos = 0
    for j in range(len(cid)):
        k = int(inv[j])
        n = int(hi[j] - lo[j])
        base = int(uniq[k]) * c
        chunk = decoded.get(k)
        if chunk is None:
            out[pos : pos + n] = lay.fillvalue
        else:
            out[pos : pos + n] = chunk[int(lo[j]) - base : int(hi[j]) - base]
        pos += n
    return out


async def _gather(coros: list[Any]) -> list[Any]:
    import asyncio  # zarr reads only: an h5ad collection never pays for it (with ssl, 30 ms)

    return list(await asyncio.gather(*coros))


def _zarr_sync(coros: list[Any]) -> list[Any]:
    from zarr.core.sync import sync

    return sync(_gather(coros))


def _zarr_array(store: AnnStore, path: str) -> Any:
    # Building a zarr Array object costs a metadata lookup: once per process.
    return _cached(("zarr", store.spec.url, path), lambda: store.root()[path])


def _direct(store: AnnStore, path: str) -> ZarrChunkReader | None:
    from dask_loom.zarr._chunks import chunk_reader  # zarr-python (0.3 s to import) only for Zarr stores

    return chunk_reader(store, path, lambda: _zarr_array(store, path), mapper=map_threads)


def _zarr_ranges(store: AnnStore, path: str, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    reader = _direct(store, path)
    if reader is not None and len(reader.layout.shape) == 1:
        return reader.read_ranges(starts, stops)
    arr = _zarr_array(store, path)
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if not len(starts):
        return np.empty(0, dtype=arr.dtype)
    if len(starts) == 1:
        return np.asarray(arr[int(starts[0]) : int(stops[0])])
    lens = stops - starts
    if len(starts) > 4 and lens.mean() < 4096:
        # Many short runs: one orthogonal selection decodes each chunk once
        # (far cheaper than one zarr request per run).
        pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        return np.asarray(arr.get_orthogonal_selection(pos))
    aa = arr._async_array
    parts = _zarr_sync([aa.getitem(slice(int(a), int(b))) for a, b in zip(starts, stops)])
    return np.concatenate([np.asarray(p) for p in parts])


def read_vector(
    store: AnnStore, path: str, starts: np.ndarray, stops: np.ndarray, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Elements ``[starts[i], stops[i])`` of 1-D array *path*, concatenated in order.

    *out*, a buffer the result may be read into (then a view of it is
    returned), where the file's bytes are the values (uncompressed HDF5).
    """
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    if store.kind == "h5ad":
        return _h5_ranges(store, path, starts, stops, out)
    return _zarr_ranges(store, path, starts, stops)


def raw_vector_dtype(store: AnnStore, path: str) -> np.dtype | None:
    """The dtype of 1-D array *path* where any range of it costs only its own bytes (local uncompressed HDF5), else None.

    Elsewhere a range decodes the whole chunks it touches, so a pass that
    splits a block into pieces would decode the chunks at the cuts twice; on
    an object store each piece would wait for its own round trip.
    """
    if store.kind != "h5ad" or not store.spec.is_local:
        return None
    lay = dataset_layout(store.spec, path)
    if not (lay.fast and len(lay.shape) == 1 and not lay.filters):
        return None
    return np.dtype(lay.dtype)


def read_whole(store: AnnStore, path: str) -> np.ndarray:
    if store.kind == "h5ad":
        with store.locked() as f:
            n = int(f[path].shape[0])
    else:
        n = int(_zarr_array(store, path).shape[0])
    return read_vector(store, path, np.array([0]), np.array([n]))


def indptr_of(store: AnnStore, meta: MatrixMeta) -> np.ndarray:
    """The ``indptr`` of a sparse matrix, read once per process (and checked against ``data``)."""

    def make() -> np.ndarray:
        ip = read_whole(store, f"{meta.path}/indptr").astype(np.int64)
        n_data = _length(store, f"{meta.path}/data")
        if len(ip) and (ip[0] < 0 or ip[-1] > n_data or bool(np.any(np.diff(ip) < 0))):
            raise AnnDataFormatError(
                f"{store.name}: {meta.path}/indptr is not a valid CSR row pointer for {n_data} stored values "
                f"(it must rise from >= 0 to <= {n_data}; it runs {int(ip.min())}..{int(ip.max())})"
            )
        return ip

    return _cached(("indptr", store.spec.url, meta.path), make)


def _length(store: AnnStore, path: str) -> int:
    if store.kind == "h5ad":
        with store.locked() as f:
            return int(f[path].shape[0])
    return int(_zarr_array(store, path).shape[0])


# -- rows of matrices ---------------------------------------------------------------


def read_dense_rows(store: AnnStore, meta: MatrixMeta, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, unique) of a dense matrix as a 2-D array."""
    rows = np.asarray(rows, dtype=np.int64)
    ncol = meta.shape[1]
    dt = np.dtype(meta.dtype)
    if meta.fmt == "field":
        starts, stops = coalesce(rows)
        with store.locked() as f:
            ds = f[meta.path]
            parts = [ds[int(a) : int(b)][meta.field] for a, b in zip(starts, stops)]
        out = np.concatenate(parts) if parts else np.empty((0, ncol), dtype=dt)
        return out.reshape(len(rows), ncol)
    if store.kind == "h5ad":
        lay = dataset_layout(store.spec, meta.path)
        out = np.empty((len(rows), ncol), dtype=dt)
        starts, stops = coalesce(rows)
        bounds = np.concatenate(([0], np.cumsum(stops - starts)))
        if lay.fast:
            src = HDF5Source(store.spec, lay)
            one_d = len(lay.shape) == 1

            def one(j: int) -> None:
                region = (
                    (slice(int(starts[j]), int(stops[j])),)
                    if one_d
                    else (slice(int(starts[j]), int(stops[j])), slice(None))
                )
                view = out[bounds[j] : bounds[j + 1]]
                src.read_block(region, out=view.reshape(-1) if one_d else view)

            map_threads(one, range(len(starts)))
        else:
            with store.locked() as f:
                ds = f[meta.path]
                for j in range(len(starts)):
                    out[bounds[j] : bounds[j + 1]] = ds[int(starts[j]) : int(stops[j])].reshape(-1, ncol)
        return out
    if not len(rows):
        return np.empty((0, ncol), dtype=dt)
    reader = _direct(store, meta.path)
    if reader is not None:
        return reader.read_rows(rows).reshape(len(rows), ncol)
    arr = _zarr_array(store, meta.path)
    starts, stops = coalesce(rows)
    if len(starts) == 1:
        block = np.asarray(arr[int(starts[0]) : int(stops[0])])
    elif len(starts) <= 4 or (stops - starts).mean() >= 64:
        aa = arr._async_array
        block = np.concatenate(
            [
                np.asarray(p)
                for p in _zarr_sync([aa.getitem(slice(int(a), int(b))) for a, b in zip(starts, stops)])
            ]
        )
    else:
        sel = (rows,) if arr.ndim == 1 else (rows, slice(None))
        block = np.asarray(arr.get_orthogonal_selection(sel))
    return block.reshape(len(rows), ncol)


def read_csr_rows(store: AnnStore, meta: MatrixMeta, rows: np.ndarray) -> sp.csr_matrix:
    """Rows (sorted, unique) of a CSR (or CSC) matrix as a scipy CSR matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    if meta.fmt == "csc":
        return _csc_as_csr(store, meta)[rows]
    import scipy.sparse as sp

    return sp.csr_matrix(read_csr_parts(store, meta, rows), shape=(len(rows), meta.shape[1]))


def read_csr_parts(
    store: AnnStore,
    meta: MatrixMeta,
    rows: np.ndarray,
    *,
    bufs: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (sorted, unique) of a CSR matrix as its ``(data, indices, indptr)`` (no scipy import).

    The indices are checked against the width, so a matrix built from them
    (scipy trusts indices) never reads out of bounds.  *bufs*: buffers for
    ``data`` and ``indices`` (see :func:`read_vector`).
    """
    rows = np.asarray(rows, dtype=np.int64)
    e0, e1, new_ptr = _entry_ranges(store, meta, rows)
    b_data, b_idx = bufs if bufs is not None else (None, None)
    if len(e0) > 1:
        data, indices = map_threads(
            lambda nb: read_vector(store, f"{meta.path}/{nb[0]}", e0, e1, out=nb[1]),
            [("data", b_data), ("indices", b_idx)],
        )
    else:
        data = read_vector(store, f"{meta.path}/data", e0, e1, out=b_data)
        indices = read_vector(store, f"{meta.path}/indices", e0, e1, out=b_idx)
    if len(data) != new_ptr[-1] or len(indices) != new_ptr[-1]:
        raise CorruptChunkError(
            f"{store.name}: {meta.path} data/indices hold fewer entries than indptr promises"
        )
    if len(indices) and _out_of_range(indices, meta.shape[1]):
        # scipy trusts indices: out-of-range ones would crash the process later.
        raise CorruptChunkError(
            f"{store.name}: {meta.path}/indices holds column numbers outside 0..{meta.shape[1] - 1}"
        )
    return data, indices, new_ptr


def read_csr_values(store: AnnStore, meta: MatrixMeta, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (sorted, unique) of a CSR matrix as their stored values and row pointers: ``(data, indptr)``.

    The column indices are not read: half the bytes of :func:`read_csr_parts`,
    for what needs only each row's values (the counts per cell).
    """
    rows = np.asarray(rows, dtype=np.int64)
    e0, e1, new_ptr = _entry_ranges(store, meta, rows)
    data = read_vector(store, f"{meta.path}/data", e0, e1)
    if len(data) != new_ptr[-1]:
        raise CorruptChunkError(f"{store.name}: {meta.path}/data holds fewer entries than indptr promises")
    return data, new_ptr


def _entry_ranges(
    store: AnnStore, meta: MatrixMeta, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where *rows*' entries lie in ``data``/``indices`` (runs of adjacent rows joined) and their new row pointers."""
    indptr = indptr_of(store, meta)
    starts, stops = coalesce(rows)
    counts = indptr[rows + 1] - indptr[rows]
    new_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_ptr[1:])
    return indptr[starts], indptr[stops], new_ptr


def _out_of_range(indices: np.ndarray, width: int) -> bool:
    """Whether any index is negative or at least *width*: one pass (a negative one is huge as unsigned)."""
    if indices.dtype.kind == "i":
        return int(indices.view(indices.dtype.str.replace("i", "u")).max()) >= width
    return int(indices.max()) >= width or int(indices.min()) < 0


def _csc_as_csr(store: AnnStore, meta: MatrixMeta) -> sp.csr_matrix:
    # CSC stores columns: every row touches every column's entries, so the
    # matrix is read once per process and kept as CSR for row access.
    def make() -> sp.csr_matrix:
        import scipy.sparse as sp

        indptr = read_whole(store, f"{meta.path}/indptr").astype(np.int64)
        data = read_whole(store, f"{meta.path}/data")
        indices = read_whole(store, f"{meta.path}/indices")
        return sp.csc_matrix((data, indices, indptr), shape=meta.shape).tocsr()

    return _cached(("csc", store.spec.url, meta.path), make)


def read_matrix_rows(store: AnnStore, meta: MatrixMeta, rows: np.ndarray) -> np.ndarray | sp.csr_matrix:
    if meta.fmt in ("csr", "csc"):
        return read_csr_rows(store, meta, rows)
    return read_dense_rows(store, meta, rows)
