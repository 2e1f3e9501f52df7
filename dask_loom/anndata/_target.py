"""AnnData matrix elements (``X``, ``layers/<name>``, ``obsm/<key>``) as chunk targets: dense, CSR or CSC.

A dense element is an HDF5 dataset or Zarr array with anndata's encoding
attributes (``encoding-type: array``): :class:`~dask_loom.hdf5.HDF5Target` or
:class:`~dask_loom.zarr.ZarrTarget` with those attributes.  A sparse element
is a group of ``data``, ``indices`` and ``indptr`` (``csr_matrix``: row
bands; ``csc_matrix``: column bands): its write unit is a full-width row band
(full-height column band), tasks turn each block into its compressed-sparse
pieces (a sparse input is never densified), and the single writer appends
them in order.  Every write is a transaction: the h5ad file is written as a
copy renamed over it, a local Zarr store's element is swapped in with one
directory exchange, and on object stores the element's encoding attributes
are written last (an interrupted write leaves a group anndata does not read
as the element, never a wrong matrix).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_loom.blocks._target import BlockTarget
from dask_loom.storage import FileSpec

__all__ = ["SparseTarget", "anndata_target"]

_DENSE = {"encoding-type": "array", "encoding-version": "0.2.0"}
_SPARSE = {"csr": "csr_matrix", "csc": "csc_matrix"}
_PREFIX = "anndata-write"
_LENGTH = 1 << 16  # values per chunk of a sparse element's data / indices / indptr


def _is_zarr(spec: FileSpec) -> bool:
    url = spec.url.rstrip("/")
    if url.endswith(".zarr"):
        return True
    return spec.is_local and os.path.isdir(url)


def _zarr_format(store: Any, given: int | None) -> int:
    """*given*, else the store's own format (its root metadata), else 3.

    A new store is Zarr v3 so that its arrays can be sharded (anndata reads
    both formats); an existing v2 store stays v2 (and unsharded).
    """
    if given is not None:
        return int(given)
    from dask_loom.zarr._nodes import NodeNotFoundError, read_node_metadata

    try:
        _, meta = read_node_metadata(store, "")
    except (NodeNotFoundError, OSError):
        return 3
    return int(meta.get("zarr_format", 2))


def _default_band(n: int, other: int, itemsize: int) -> int:
    # About 1 MiB of decoded values per band: rows read by a MappedCollection item stay small.
    return max(1, min(max(1, n), (1 << 20) // max(1, other * itemsize)))


def anndata_target(
    path: str | os.PathLike[str],
    elem: str = "X",
    *,
    shape: tuple[int, int],
    dtype: Any,
    encoding: str = "dense",
    chunks: int | tuple[int, int] | None = None,
    compression: str | None = "gzip",
    zarr_format: int | None = None,
    shard_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> BlockTarget:
    """A chunk target for an AnnData matrix element in an ``.h5ad`` file or an AnnData Zarr store.

    Parameters
    ----------
    path
        The ``.h5ad`` file or the Zarr store (``*.zarr`` or a directory; a URL
        with *storage_options*); other elements already there are kept.
    elem
        The element's path (``"X"``, ``"layers/counts"``, ``"obsm/X_pca"``).
    shape, dtype
        Of the matrix.
    encoding
        ``"dense"``, ``"csr"`` or ``"csc"`` (anndata's ``array``,
        ``csr_matrix``, ``csc_matrix``).
    chunks
        Dense: the stored chunk shape (default: full rows, about 1 MiB).
        Sparse: rows (CSR) or columns (CSC) per band, an int.
    compression
        ``"gzip"`` (h5ad) or the Zarr default codecs (``"auto"``) when given;
        ``None`` stores uncompressed.
    zarr_format
        Zarr format of a new store (default: the store's own, else 2, anndata's default).
    shard_bytes
        Sparse elements in a Zarr v3 store: about this many bytes per shard of
        ``data`` / ``indices`` / ``indptr`` (whole chunks of 65,536 values);
        ``None`` (default) about ``dask_loom.block-size``, ``0`` unsharded chunks.

    Returns
    -------
    BlockTarget
        An :class:`~dask_loom.hdf5.HDF5Target`, :class:`~dask_loom.zarr.ZarrTarget`
        or :class:`SparseTarget`, with task-name prefix ``"anndata-write"``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, tempfile, os, h5py, anndata, dask_loom
    >>> from dask_loom.anndata import anndata_target
    >>> fn = os.path.join(tempfile.mkdtemp(), "a.h5ad")
    >>> m = sp.random(100, 20, density=0.1, format="csr", random_state=0, dtype="f4")
    >>> dask_loom.store(m, anndata_target(fn, "X", shape=m.shape, dtype="f4", encoding="csr"), scheduler="sync")
    >>> with h5py.File(fn, "r") as f:
    ...     x = anndata.io.read_elem(f["X"])
    >>> type(x).__name__, bool((x != m).nnz == 0)
    ('csr_matrix', True)
    """
    enc = str(encoding).lower()
    if enc not in ("dense", "csr", "csc"):
        raise ValueError(f"encoding must be 'dense', 'csr' or 'csc', not {encoding!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"an AnnData matrix is 2-D, not shape {shape}")
    dt = np.dtype(dtype)
    if enc != "dense":
        band = int(chunks if isinstance(chunks, (int, np.integer)) else (chunks or (None,))[0] or 0) or None
        return SparseTarget(
            path,
            elem,
            shape=shape,
            dtype=dt,
            encoding=enc,
            band=band,
            compression=compression,
            zarr_format=zarr_format,
            shard_bytes=shard_bytes,
            storage_options=storage_options,
        )
    if chunks is None:
        chunks = (_default_band(shape[0], shape[1], dt.itemsize), max(1, shape[1]))
    spec = FileSpec.from_path(path, storage_options)
    if _is_zarr(spec):
        from dask_loom.storage._objectstore import open_store
        from dask_loom.zarr._target import ZarrTarget, default_shards

        store = open_store(spec.url, **spec.storage_options)
        fmt = _zarr_format(store, zarr_format)
        # Zarr v3: shards of about dask_loom.block-size made of the row-band chunks (the read unit of
        # a MappedCollection item), so a dask block is one object.
        shards = default_shards(shape, tuple(chunks), dt.itemsize) if fmt == 3 else None
        return ZarrTarget(store, elem, shape=shape, dtype=dt, chunks=tuple(chunks), shards=shards, attributes=dict(_DENSE),
                          compressors="auto" if compression is not None else None,
                          zarr_format=fmt, prefix=_PREFIX)
    from dask_loom.hdf5._target import HDF5Target

    return HDF5Target(
        spec,
        elem,
        shape=shape,
        dtype=dt,
        chunks=tuple(chunks),
        compression=compression,
        compression_opts=4 if compression == "gzip" else None,
        attrs=dict(_DENSE),
        prefix=_PREFIX,
    )


class SparseTarget(BlockTarget):
    """A CSR (row bands) or CSC (column bands) AnnData element, written in order by one writer.

    Made by :func:`anndata_target`.  Blocks are full-width row bands (CSR) or
    full-height column bands (CSC) of whole *band*-sized units; tasks return
    each block's ``data``, ``indices`` and per-row (per-column) counts, and
    the writer appends them in order.  Bands written out of order are refused;
    rows (columns) never written are empty.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        elem: str = "X",
        *,
        shape: tuple[int, int],
        dtype: Any,
        encoding: str = "csr",
        band: int | None = None,
        compression: str | None = "gzip",
        zarr_format: int | None = None,
        shard_bytes: int | None = None,
        joined: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from dask_loom.storage._stores import check_node_path

        self.spec = path if isinstance(path, FileSpec) else FileSpec.from_path(path, storage_options)
        self.elem = check_node_path(elem, self.spec.name)
        if not self.elem:
            raise ValueError(f"{self.spec.name}: a sparse element needs a path (such as 'X')")
        self.encoding = encoding
        self.axis = 0 if encoding == "csr" else 1
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        n, other = self.shape[self.axis], self.shape[1 - self.axis]
        b = int(band) if band else _default_band(n, other, self.dtype.itemsize)
        b = max(1, min(b, max(1, n)))
        self.chunk_shape = (b, max(1, other)) if self.axis == 0 else (max(1, other), b)
        self.index_dtype = np.dtype("int32") if other < 2**31 else np.dtype("int64")
        self.compression = compression
        self.zarr = _is_zarr(self.spec)
        self.zarr_format = zarr_format
        # Bytes per shard (Zarr v3); each array's shards hold a whole number of chunks.
        if shard_bytes is None:  # sharded by default (Zarr v3): a dask block reads one object
            from dask_loom._config import block_size_bytes

            shard_bytes = block_size_bytes()
        self.shard_bytes = int(shard_bytes) or None
        # A Zarr store written whole inside a transaction of the caller's (write_anndata's
        # new directory): no transaction of its own, no lock file beside the temporary copy.
        self.joined = bool(joined)
        self.prefix = _PREFIX
        self.label = f"{self.spec.name}: element '{self.elem}' ({_SPARSE[encoding]})"
        self._arrays: dict[str, Any] | None = None
        self._group: Any = None
        self._pos = 0
        self._nnz = 0
        self._buf: dict[str, np.ndarray] = {}
        self._fill: dict[str, int] = {}
        self._written: dict[str, int] = {}

    def __dask_tokenize__(self) -> Any:
        return (
            "SparseTarget",
            self.spec.url,
            self.elem,
            self.encoding,
            self.shape,
            self.dtype.str,
            self.chunk_shape,
        )

    def __reduce__(self) -> Any:
        return (
            _rebuild,
            (
                self.spec,
                self.elem,
                self.shape,
                self.dtype,
                self.encoding,
                self.chunk_shape[self.axis],
                self.label,
            ),
        )

    # -- the two halves ---------------------------------------------------------------------

    def encode_block(
        self, region: tuple[slice, ...], data: Any
    ) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        """``(start, stop, data, indices, counts)`` of one band, ``start:stop`` along the compressed axis."""
        import scipy.sparse as sp

        from dask_loom._lazy import issparse

        self.check_region(region)
        expect = tuple(r.stop - r.start for r in region)
        if tuple(data.shape) != expect:
            raise ValueError(
                f"{self.label}: a block of shape {tuple(data.shape)} does not fit region {region}"
            )
        if issparse(data):
            m = data.tocsr() if self.axis == 0 else data.tocsc()
        else:
            arr = np.asarray(data)
            m = sp.csr_matrix(arr) if self.axis == 0 else sp.csc_matrix(arr)
        m.sum_duplicates()
        m.sort_indices()
        m.eliminate_zeros()
        r = region[self.axis]
        return (
            int(r.start),
            int(r.stop),
            m.data.astype(self.dtype, copy=False),
            m.indices.astype(self.index_dtype, copy=False),
            np.diff(m.indptr).astype(np.int64),
        )

    def store_payload(self, payload: tuple[int, int, np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Append one band (in the writer, in order)."""
        start, stop, values, indices, counts = payload
        if self._arrays is None:
            raise RuntimeError(f"{self.label}: payloads are stored inside the target's transaction")
        if start != self._pos:
            raise ValueError(
                f"{self.label}: bands are written in order: expected the band at {self._pos}, got {start}"
            )
        self._append("data", values)
        self._append("indices", indices)
        ends = self._nnz + np.cumsum(counts)
        if self.zarr:
            self._append("indptr", ends)
        else:
            self._arrays["indptr"][start + 1 : stop + 1] = ends
        self._nnz += int(counts.sum())
        self._pos = stop

    def _append(self, name: str, values: np.ndarray) -> None:
        if not len(values):
            return
        arr = self._arrays[name]  # type: ignore[index]
        if self.zarr:
            self._buffered(name, arr, np.asarray(values))
            return
        n = arr.shape[0]
        arr.resize((n + len(values),))
        arr[n:] = values

    def _unit(self, arr: Any) -> int:
        """Values per write: a whole shard (about *shard_bytes*), else a whole chunk."""
        if not self.shard_bytes:
            return _LENGTH
        return max(1, self.shard_bytes // (np.dtype(arr.dtype).itemsize * _LENGTH)) * _LENGTH

    def _buffered(self, name: str, arr: Any, values: np.ndarray) -> None:
        # Whole chunks (shards) only: a write that ends inside a chunk or shard would make
        # the next one read, merge and rewrite it.  One preallocated unit per array waits here.
        buf = self._buf.get(name)
        if buf is None:
            size = self._unit(arr)
            if name == "indptr":  # its length is known: no bigger buffer than what is left of it
                size = max(1, min(size, self.shape[self.axis] + 1 - self._written.get(name, 0)))
            buf = self._buf[name] = np.empty(size, dtype=arr.dtype)
            self._fill[name] = 0
        pos = 0
        while pos < len(values):
            fill = self._fill[name]
            take = min(len(buf) - fill, len(values) - pos)
            buf[fill : fill + take] = values[pos : pos + take]
            self._fill[name] = fill + take
            pos += take
            if self._fill[name] == len(buf):
                self._flush(name)

    def _flush(self, name: str) -> None:
        buf, fill = self._buf.get(name), self._fill.get(name, 0)
        if buf is None or not fill:
            return
        arr = self._arrays[name]  # type: ignore[index]
        at = self._written.get(name, 0)
        arr.resize((at + fill,))
        arr[at : at + fill] = buf[:fill]
        self._written[name] = at + fill
        self._fill[name] = 0

    # -- the transaction --------------------------------------------------------------------

    def _attrs(self) -> dict[str, Any]:
        return {
            "encoding-type": _SPARSE[self.encoding],
            "encoding-version": "0.1.0",
            "shape": list(self.shape),
        }

    def _finish(self) -> None:
        # Rows (columns) never written are empty; the indptr closes at the element's end.
        n = self.shape[self.axis]
        if self.zarr:
            if self._pos < n:
                self._append("indptr", np.full(n - self._pos, self._nnz, dtype=np.int64))
            for name in ("data", "indices", "indptr"):
                self._flush(name)
            return
        if self._pos < n:
            self._arrays["indptr"][self._pos + 1 : n + 1] = self._nnz  # type: ignore[index]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._pos = 0
        self._nnz = 0
        self._buf, self._fill, self._written = {}, {}, {}
        try:
            if self.zarr:
                with self._zarr_transaction():
                    yield
            else:
                with self._h5_transaction():
                    yield
        finally:
            self._arrays = None
            self._group = None
            self._buf = {}

    @contextlib.contextmanager
    def _h5_transaction(self) -> Iterator[None]:
        from dask_loom.hdf5._files import open_h5_write, write_open

        # A file being written by this process (a whole new AnnData) is joined, not recreated.
        mode = "r+" if os.path.exists(self.spec.url) or write_open(self.spec) else "w"
        with open_h5_write(self.spec, mode=mode, atomic=True) as f:
            if self.elem in f:
                del f[self.elem]
            g = f.create_group(self.elem)
            kw: dict[str, Any] = {"compression": self.compression} if self.compression else {}
            length = 1 << 16
            self._arrays = {
                "data": g.create_dataset(
                    "data", shape=(0,), maxshape=(None,), chunks=(length,), dtype=self.dtype, **kw
                ),
                "indices": g.create_dataset(
                    "indices", shape=(0,), maxshape=(None,), chunks=(length,), dtype=self.index_dtype, **kw
                ),
                "indptr": g.create_dataset(
                    "indptr", shape=(self.shape[self.axis] + 1,), dtype=np.int64, **kw
                ),
            }
            yield
            self._finish()
            for k, v in self._attrs().items():
                g.attrs[k] = v

    @contextlib.contextmanager
    def _zarr_transaction(self) -> Iterator[None]:
        from dask_loom.storage._atomic import local_transaction
        from dask_loom.storage._objectstore import open_store
        from dask_loom.storage._stores import LocalStore

        store = open_store(self.spec.url, **self.spec.storage_options)
        fmt = _zarr_format(store, self.zarr_format)
        if self.joined:
            # The caller's transaction holds the whole (new) store: write the element in it.
            self._zarr_begin(store, fmt)
            yield
            self._zarr_commit()
            return
        if type(store) is LocalStore:
            with local_transaction(store.path, label=self.label, base="empty", node=self.elem) as copy:
                self._zarr_begin(copy, fmt)
                yield
                self._zarr_commit()
            return
        # No rename on object stores: the old element goes first, the encoding attributes come last.
        with contextlib.suppress(OSError):
            store.erase_prefix(f"{self.elem}/")
        try:
            self._zarr_begin(store, fmt)
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                store.erase_prefix(f"{self.elem}/")
            raise
        self._zarr_commit()

    def _zarr_begin(self, store: Any, fmt: int) -> None:
        import zarr

        self._group = zarr.open_group(store, path=self.elem, mode="w", zarr_format=fmt)
        comp: Any = "auto" if self.compression is not None else None
        kw: dict[str, Any] = {"chunks": (_LENGTH,), "compressors": comp}
        sharded = bool(self.shard_bytes) and fmt >= 3
        if not sharded:
            self.shard_bytes = None  # Zarr v2 has no shards: write whole chunks

        def create(name: str, dtype: Any, **extra: Any) -> Any:
            more = {"shards": (self._unit(np.empty(0, dtype)),)} if sharded else {}
            return self._group.create_array(name, shape=(0,), dtype=dtype, **kw, **more, **extra)

        self._arrays = {
            "data": create("data", self.dtype),
            "indices": create("indices", self.index_dtype),
            "indptr": create("indptr", np.int64, fill_value=0),
        }
        self._append("indptr", np.zeros(1, dtype=np.int64))

    def _zarr_commit(self) -> None:
        self._finish()
        self._group.attrs.update(self._attrs())


def _rebuild(
    spec: FileSpec, elem: str, shape: tuple[int, int], dtype: Any, encoding: str, band: int, label: str
) -> SparseTarget:
    t = SparseTarget(spec, elem, shape=shape, dtype=dtype, encoding=encoding, band=band)
    t.label = label
    return t
