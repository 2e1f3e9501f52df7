"""An HDF5 dataset as a chunk target: tasks compress whole chunks, the one writer stores them.

h5py cannot write one file from several processes or threads, so the two
halves of the target protocol split there: :meth:`HDF5Target.encode_block`
(in any task, any process) checks, casts and compresses whole chunks outside
h5py (:mod:`dask_loom.hdf5._encode`), and :meth:`HDF5Target.store_payload`
(in the caller, the single writer) stores a block's bytes in one call
(``H5Dwrite_chunk`` with the GIL released, :mod:`dask_loom.hdf5._direct`;
h5py's ``write_direct_chunk`` without the compiled module).  Datasets whose
filters cannot be encoded outside h5py (LZF, szip, plugins) or that are not
chunked are written through h5py by the writer instead, from the raw blocks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_loom.blocks._target import BlockTarget
from dask_loom.hdf5._direct import write_chunks
from dask_loom.hdf5._encode import ChunkEncoder, EncodedChunks
from dask_loom.storage import FileSpec

__all__ = ["HDF5Target"]


class _Raw:
    """A block the writer stores through h5py (filters h5py alone can apply)."""

    __slots__ = ("block", "region")

    def __init__(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        self.region = region
        self.block = block


def encoder_for(ds: Any) -> ChunkEncoder | None:
    """The out-of-h5py chunk encoder of an open dataset, or ``None`` where only h5py can write it."""
    from dask_loom.hdf5._layout import describe

    lay = describe(ds)
    if lay.chunks is None or not lay.fast:
        return None
    return ChunkEncoder(lay.shape, lay.chunks, ds.dtype, lay.filters, lay.fillvalue)


class HDF5Target(BlockTarget):
    """A chunked dataset of a local HDF5 file, written as a transaction.

    Parameters
    ----------
    file
        Path of the HDF5 file (created if missing; other content is kept).
    path
        Dataset path inside the file; an existing dataset is replaced.
    shape, dtype, chunks
        Of the new dataset.
    compression, compression_opts, shuffle, fillvalue, maxshape
        As for ``h5py.Group.create_dataset`` (default gzip level 2, loompy's).
    attrs
        HDF5 attributes of the new dataset.
    prefix
        Task-name prefix (default ``"hdf-write"``).

    Notes
    -----
    The transaction writes into a copy of the file (a new file when there is
    none) that replaces it by one atomic rename at commit, under the writer
    lock (:mod:`dask_loom.storage._locks`): a crash at any moment leaves the
    old file.  :meth:`on` makes a target of a dataset in a file already open
    for writing (inside a Loom transaction), which joins that transaction.

    Examples
    --------
    >>> import numpy as np, tempfile, os, h5py, dask_loom
    >>> from dask_loom.hdf5 import HDF5Target
    >>> fn = os.path.join(tempfile.mkdtemp(), "x.h5")
    >>> t = HDF5Target(fn, "x", shape=(100, 30), dtype="f4", chunks=(32, 16))
    >>> dask_loom.store(np.ones((100, 30), "f4"), t, scheduler="sync")
    >>> with h5py.File(fn, "r") as f:
    ...     float(f["x"][:].sum()), f["x"].chunks
    (3000.0, (32, 16))
    """

    def __init__(
        self,
        file: str | os.PathLike[str],
        path: str,
        *,
        shape: tuple[int, ...],
        dtype: Any,
        chunks: tuple[int, ...],
        compression: str | None = "gzip",
        compression_opts: Any = 2,
        shuffle: bool = False,
        fillvalue: Any = None,
        maxshape: tuple[int | None, ...] | None = None,
        attrs: dict[str, Any] | None = None,
        prefix: str = "hdf-write",
    ) -> None:
        self.spec = file if isinstance(file, FileSpec) else FileSpec.from_path(file)
        self.path = str(path).strip("/")
        if not self.path:
            raise ValueError(f"{self.spec.name}: an HDF5 target needs a dataset path")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if len(chunks) != len(self.shape):
            raise ValueError(f"{self.spec.name}: chunks {tuple(chunks)} do not match shape {self.shape}")
        self.chunk_shape = tuple(max(1, min(int(c), int(n) or 1)) for c, n in zip(chunks, self.shape))
        self.prefix = prefix
        self.label = f"{self.spec.name}: dataset '{self.path}'"
        self._create = {
            "compression": compression,
            "compression_opts": compression_opts if compression is not None else None,
            "shuffle": bool(shuffle),
            "fillvalue": fillvalue,
            "maxshape": maxshape,
        }
        self._attrs = dict(attrs or {})
        self._joined = False
        self._file: Any = None
        self._encoder: ChunkEncoder | None = None

    @classmethod
    def on(cls, f: Any, path: str, *, prefix: str = "hdf-write", label: str | None = None) -> HDF5Target:
        """A target of the existing dataset *path* of *f*, an h5py file open for writing.

        Its transaction is the one *f* belongs to (the caller's): it writes
        there and never commits or rolls back on its own.
        """
        ds = f[path]
        self = cls.__new__(cls)
        self.spec = FileSpec.from_path(f.filename)
        self.path = str(path).strip("/")
        self.shape = tuple(int(s) for s in ds.shape)
        self.dtype = ds.dtype
        self.chunk_shape = (
            tuple(int(c) for c in ds.chunks) if ds.chunks else tuple(max(1, n) for n in self.shape)
        )
        self.prefix = prefix
        self.label = label or f"{self.spec.name}: dataset '{self.path}'"
        self._create = {}
        self._attrs = {}
        self._joined = True
        self._file = f
        self._encoder = encoder_for(ds)
        return self

    def __dask_tokenize__(self) -> Any:
        return (
            "HDF5Target",
            self.spec.url,
            self.path,
            self.shape,
            self.dtype.str,
            self.chunk_shape,
            self.prefix,
        )

    def __reduce__(self) -> Any:
        # Tasks need the encoder only; the open file stays with the writer.
        return (
            _rebuild,
            (
                self.spec,
                self.path,
                self.shape,
                self.dtype,
                self.chunk_shape,
                self.prefix,
                self.label,
                self._encoder,
            ),
        )

    # -- the two halves ---------------------------------------------------------------------

    def encode_block(self, region: tuple[slice, ...], data: Any) -> Any:
        """Compress the whole chunks of one block (or hand the raw block to the writer)."""
        block = self.as_block(region, data)
        if self._encoder is None:
            return _Raw(region, block)
        return self._encoder(region, block)

    def encode_gathered(self, region: tuple[slice, ...], data: Any, index: np.ndarray, axis: int) -> Any:
        """:meth:`encode_block` of ``np.take(data, index, axis=axis)``, gathered while the chunks are cut."""
        if self._encoder is None or not isinstance(data, np.ndarray):
            return self.encode_block(region, np.take(np.asarray(data), index, axis=axis))
        self.check_region(region)
        return self._encoder.encode_gathered(region, data, index, axis)

    def store_payload(self, payload: Any) -> None:
        """Store one encoded block (in the writer, in order)."""
        if self._file is None:
            raise RuntimeError(f"{self.label}: payloads are stored inside the target's transaction")
        ds = self._file[self.path]
        if isinstance(payload, _Raw):
            ds[payload.region] = payload.block
            return
        if isinstance(payload, EncodedChunks):
            # One call per block, outside the GIL where the compiled loop is built.
            write_chunks(ds.id, payload.offsets, payload.raws)
            return
        dsid = ds.id
        for offset, data in payload:
            dsid.write_direct_chunk(offset, data, 0)

    # -- the transaction --------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._joined:
            yield  # the transaction of the file's writer decides
            return
        from dask_loom.hdf5._files import open_h5_write, write_open

        # A file being written by this process (a whole new AnnData) is joined, not recreated.
        mode = (
            "r+" if (self.spec.is_local and os.path.exists(self.spec.url)) or write_open(self.spec) else "w"
        )
        with open_h5_write(self.spec, mode=mode, atomic=True) as f:
            self._create_dataset(f)
            self._file = f
            try:
                yield
            finally:
                self._file = None

    def _create_dataset(self, f: Any) -> None:
        if self.path in f:
            del f[self.path]
        head = self.path.rpartition("/")[0]
        if head:
            f.require_group(head)
        kw = {k: v for k, v in self._create.items() if v is not None and k != "shuffle"}
        if self._create.get("shuffle"):
            kw["shuffle"] = True
        if 0 in self.shape and "maxshape" not in kw:
            # HDF5 refuses a chunk larger than a fixed empty extent: empty axes may grow.
            kw["maxshape"] = tuple(None if n == 0 else n for n in self.shape)
        ds = f.create_dataset(self.path, shape=self.shape, dtype=self.dtype, chunks=self.chunk_shape, **kw)
        for k, v in self._attrs.items():
            ds.attrs[k] = v
        self._encoder = encoder_for(ds)


def _rebuild(
    spec: FileSpec,
    path: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunk_shape: tuple[int, ...],
    prefix: str,
    label: str,
    encoder: ChunkEncoder | None,
) -> HDF5Target:
    self = HDF5Target.__new__(HDF5Target)
    self.spec = spec
    self.path = path
    self.shape = shape
    self.dtype = np.dtype(dtype)
    self.chunk_shape = chunk_shape
    self.prefix = prefix
    self.label = label
    self._create = {}
    self._attrs = {}
    self._joined = True  # a copy in a task never opens the file
    self._file = None
    self._encoder = encoder
    return self
