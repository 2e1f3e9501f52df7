"""The node tree a Loom connection reads and writes: HDF5 here, Zarr in ``_zarrtree``.

The Loom logic (managers, views, operations) is written once against this
small interface: groups with children and attributes, arrays with a
:class:`~dask_loom.blocks.ChunkSource` for reading data, a
:class:`~dask_loom.blocks.ChunkTarget` for writing it (through
:func:`dask_loom.store`) and a plain reader for small metadata arrays.  Writes happen inside ``with tree.writing() as w:``, which for
HDF5 holds the file open for writing only for the duration of the block.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from dask_loom.errors import LoomFormatError
from dask_loom.hdf5 import HDF5Source, dataset_layout, open_h5_read, open_h5_write
from dask_loom.hdf5._files import reading_values
from dask_loom.hdf5._source import remote_index
from dask_loom.hdf5._target import HDF5Target
from dask_loom.storage import FileSpec

__all__ = ["ArrayInfo", "HDF5Tree", "Tree", "TreeWriter", "is_zarr_spec"]


@dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype and storage facts of one array in a tree."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None
    compression: str | None
    compression_opts: Any
    kind: str = "plain"  # "plain", "string", "enum", "compound", "vlen"
    enum: dict[int, str] | None = None
    # The inner chunk shape of a sharded Zarr array (``chunks`` is then the shard, the write unit).
    inner_chunks: tuple[int, ...] | None = None

    @property
    def maxshape(self) -> tuple[int | None, ...] | None:
        return None


class Tree(ABC):
    """Read side of a Loom container."""

    spec: FileSpec
    #: Task-name prefix for layer reads.
    read_prefix = "loom-read"

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def is_group(self, path: str) -> bool: ...

    @abstractmethod
    def children(self, path: str) -> list[str]:
        """Names (not paths) of the members of a group, in storage order."""

    @abstractmethod
    def info(self, path: str) -> ArrayInfo: ...

    @abstractmethod
    def read(self, path: str, sel: Any = ()) -> np.ndarray:
        """Read (part of) a small array as stored (raw bytes for strings)."""

    @abstractmethod
    def attrs(self, path: str) -> dict[str, Any]:
        """Node attributes (HDF5 attributes / Zarr attributes), raw."""

    @abstractmethod
    def source(self, path: str, *, prefix: str | None = None) -> Any:
        """A chunk source for a (large) array."""

    def session(self) -> contextlib.AbstractContextManager[Any]:
        """Keep the container open across several reads (a no-op where opening is free)."""
        return contextlib.nullcontext()

    @abstractmethod
    def writing(self, *, atomic: bool = False, fresh: bool = False) -> contextlib.AbstractContextManager[TreeWriter]:
        """Hold the container for writing.

        ``atomic=True``: all changes made in the block become visible together
        at its end, or not at all (exception, crash, SIGKILL).  ``fresh=True``
        (with ``atomic``) starts from an empty container that replaces the
        old one at the end (for whole rewrites such as ``permute``).
        """

    def identity(self) -> Any:
        """Changes whenever the container is rewritten (for caches and tokens)."""
        return None


class TreeWriter(ABC):
    """Write side, valid inside ``Tree.writing()``."""

    @abstractmethod
    def create_group(self, path: str) -> None: ...

    @abstractmethod
    def create_array(
        self,
        path: str,
        *,
        data: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        chunks: tuple[int, ...] | None = None,
        maxshape: tuple[int | None, ...] | None = None,
        compression: str | None = "gzip",
        compression_opts: Any = 2,
        fillvalue: Any = None,
        strings: bool = False,
    ) -> None: ...

    @abstractmethod
    def write(self, path: str, sel: Any, data: np.ndarray) -> None: ...

    @abstractmethod
    def resize(self, path: str, shape: tuple[int, ...]) -> None: ...

    @abstractmethod
    def delete(self, path: str) -> None: ...

    @abstractmethod
    def move(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def set_attr(self, path: str, name: str, value: Any) -> None: ...

    @abstractmethod
    def del_attr(self, path: str, name: str) -> None: ...

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def is_group(self, path: str) -> bool: ...

    @abstractmethod
    def children(self, path: str) -> list[str]: ...

    @abstractmethod
    def read(self, path: str, sel: Any = ()) -> np.ndarray: ...

    @abstractmethod
    def info(self, path: str) -> ArrayInfo: ...

    @abstractmethod
    def target(self, path: str, *, prefix: str = "loom-write", label: str | None = None) -> Any:
        """The array at *path* as a chunk target (:class:`~dask_loom.blocks.ChunkTarget`) joined to this write.

        Tasks encode blocks of whole chunks; this writer stores what they
        return; the target commits and rolls back with the write it belongs to.
        """

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written so far durable."""


def _wrong_kind(where: str, path: str, *, want: str) -> LoomFormatError:
    """The error for a node of the wrong kind (a group where the spec wants a dataset, or the reverse)."""
    got = "dataset" if want == "group" else "group"
    return LoomFormatError(f"{where}: '/{path.strip('/')}' is an HDF5 {got} where the Loom spec wants a {want}")


def _h5_dataset(f: h5py.File, path: str) -> h5py.Dataset:
    """The dataset at *path*; a group (or other object) there is a :class:`LoomFormatError` naming file and path."""
    node = f[path]
    if not isinstance(node, h5py.Dataset):
        raise _wrong_kind(f.filename, path, want="dataset")
    return node


def _h5_info(ds: h5py.Dataset) -> ArrayInfo:
    if not isinstance(ds, h5py.Dataset):
        raise _wrong_kind(ds.file.filename, ds.name, want="dataset")
    dt = ds.dtype
    kind = "plain"
    enum = None
    if h5py.check_dtype(enum=dt) is not None:
        kind = "enum"
        enum = {int(v): k for k, v in h5py.check_dtype(enum=dt).items()}
    elif h5py.check_string_dtype(dt) is not None:
        kind = "string"
    elif dt.names is not None:
        kind = "compound"
    elif h5py.check_dtype(vlen=dt) is not None:
        kind = "vlen"
    return ArrayInfo(
        path=ds.name,
        shape=tuple(int(s) for s in ds.shape),
        dtype=dt,
        chunks=tuple(ds.chunks) if ds.chunks else None,
        compression=ds.compression,
        compression_opts=ds.compression_opts,
        kind=kind,
        enum=enum,
    )


def _h5_attrs(f: h5py.File, path: str) -> dict[str, Any]:
    from dask.utils import parse_bytes

    from dask_loom._config import get_config

    if path not in f:
        return {}
    node = f[path]
    cap = get_config("max-metadata-bytes")
    cap = parse_bytes(cap) if isinstance(cap, str) else int(cap)
    out = {}
    for k in node.attrs:
        try:
            aid = node.attrs.get_id(k)
            # Declared size, before h5py allocates the value.
            size = int(np.prod(aid.shape or (), dtype=object)) * max(1, aid.dtype.itemsize)
            if size > cap:
                raise LoomFormatError(
                    f"{f.filename}: HDF5 attribute '{k}' of '{path}' declares {size} bytes, "
                    f"larger than the {cap}-byte cap (dask_loom.max-metadata-bytes)"
                )
            with reading_values():
                out[k] = node.attrs[k]
        except (OSError, TypeError):  # attributes h5py cannot convert are skipped
            continue
    return out


class _H5Reads:
    """Read operations over an open h5py file, shared by the tree and its writer."""

    def _file(self) -> h5py.File:  # pragma: no cover - abstract
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        return path in self._file()

    def is_group(self, path: str) -> bool:
        f = self._file()
        return path in f and isinstance(f[path], h5py.Group)

    def children(self, path: str) -> list[str]:
        f = self._file()
        if path not in f or not isinstance(f[path], h5py.Group):
            return []
        return list(f[path].keys())

    def info(self, path: str) -> ArrayInfo:
        return _h5_info(self._file()[path])

    def read(self, path: str, sel: Any = ()) -> np.ndarray:
        # Raw values: vlen strings arrive as bytes and are decoded by the caller
        # (``_values.materialize``), so both trees share one decoding rule.
        ds = _h5_dataset(self._file(), path)
        with reading_values():
            return ds[sel]

    def attrs(self, path: str) -> dict[str, Any]:
        return _h5_attrs(self._file(), path)


class HDF5Tree(Tree):
    """A ``.loom`` HDF5 file, read through the per-process handle cache."""

    def __init__(self, spec: FileSpec) -> None:
        self.spec = spec
        # HDF5 on an object store is read through range requests only (no writer).
        self.read_only = not spec.is_local

    # Every read opens the file for the duration of the call only (see open_h5_read).
    def exists(self, path: str) -> bool:
        with open_h5_read(self.spec) as f:
            return path in f

    def is_group(self, path: str) -> bool:
        with open_h5_read(self.spec) as f:
            return path in f and isinstance(f[path], h5py.Group)

    def children(self, path: str) -> list[str]:
        with open_h5_read(self.spec) as f:
            if path not in f or not isinstance(f[path], h5py.Group):
                return []
            return list(f[path].keys())

    def info(self, path: str) -> ArrayInfo:
        with open_h5_read(self.spec) as f:
            return _h5_info(f[path])

    def read(self, path: str, sel: Any = ()) -> np.ndarray:
        with open_h5_read(self.spec) as f:
            return _h5_dataset(f, path)[sel]

    def attrs(self, path: str) -> dict[str, Any]:
        with open_h5_read(self.spec) as f:
            return _h5_attrs(f, path)

    def session(self) -> contextlib.AbstractContextManager[Any]:
        # Nested open_h5_read calls reuse the handle this one opens.
        return open_h5_read(self.spec)

    def source(self, path: str, *, prefix: str | None = None) -> HDF5Source:
        layout = dataset_layout(self.spec, path)
        src = HDF5Source(self.spec, layout, prefix=prefix or self.read_prefix, index=remote_index(self.spec, layout))
        if src.dtype is None:
            src.dtype = self.info(path).dtype
        return src

    def identity(self) -> Any:
        from dask_loom.hdf5._files import file_identity

        return file_identity(self.spec)

    @contextlib.contextmanager
    def writing(self, *, atomic: bool = False, fresh: bool = False) -> Iterator[HDF5Writer]:
        with open_h5_write(self.spec, atomic=atomic, fresh=fresh) as f:
            yield HDF5Writer(f)

    @classmethod
    @contextlib.contextmanager
    def creating(cls, spec: FileSpec) -> Iterator[HDF5Writer]:
        """Create (truncate) the file and write its first content."""
        with open_h5_write(spec, mode="w") as f:
            yield HDF5Writer(f)

    def __reduce__(self) -> Any:
        return (HDF5Tree, (self.spec,))


class HDF5Writer(_H5Reads, TreeWriter):
    """Writes into an HDF5 file held open for one write."""

    def __init__(self, f: h5py.File) -> None:
        self.f = f

    def _file(self) -> h5py.File:
        return self.f

    def create_group(self, path: str) -> None:
        self.f.require_group(path)

    def create_array(
        self,
        path: str,
        *,
        data: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        chunks: tuple[int, ...] | None = None,
        maxshape: tuple[int | None, ...] | None = None,
        compression: str | None = "gzip",
        compression_opts: Any = 2,
        fillvalue: Any = None,
        strings: bool = False,
    ) -> None:
        if path in self.f:
            del self.f[path]
        kw: dict[str, Any] = {}
        if strings:
            dtype = h5py.string_dtype("utf-8")
            if data is not None:
                data = np.asarray(data, dtype=object)
        if data is not None and np.ndim(data) == 0:
            self.f.create_dataset(path, data=data, dtype=dtype)
            return
        if compression is not None:
            kw["compression"] = compression
            kw["compression_opts"] = compression_opts
        if chunks is not None:
            kw["chunks"] = chunks
        if maxshape is not None:
            kw["maxshape"] = maxshape
        if fillvalue is not None:
            kw["fillvalue"] = fillvalue
        self.f.create_dataset(path, data=data, shape=shape, dtype=dtype, **kw)

    def write(self, path: str, sel: Any, data: np.ndarray) -> None:
        ds = self.f[path]
        ds[sel] = data

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        self.f[path].resize(shape)

    def delete(self, path: str) -> None:
        if path in self.f:
            del self.f[path]

    def move(self, src: str, dst: str) -> None:
        if dst in self.f:
            del self.f[dst]
        self.f.move(src, dst)

    def set_attr(self, path: str, name: str, value: Any) -> None:
        self.f[path].attrs[name] = value

    def del_attr(self, path: str, name: str) -> None:
        node = self.f[path]
        if name in node.attrs:
            del node.attrs[name]

    def target(self, path: str, *, prefix: str = "loom-write", label: str | None = None) -> HDF5Target:
        # Tasks compress whole chunks outside h5py; this (single) writer stores them.
        return HDF5Target.on(self.f, path, prefix=prefix, label=label)

    def flush(self) -> None:
        self.f.flush()


def is_zarr_spec(spec: FileSpec) -> bool:
    """True for ``*.zarr`` paths/URLs and for directories (or prefixes) holding Zarr metadata."""
    url = spec.url.rstrip("/")
    if url.endswith(".zarr"):
        return True
    if url.endswith((".loom", ".h5", ".hdf5")):
        return False
    if spec.is_local:
        return os.path.isdir(url) and any(os.path.exists(os.path.join(url, n)) for n in ("zarr.json", ".zgroup"))
    try:
        from dask_loom.storage._rangefile import RemoteFile

        return any(RemoteFile(f"{url}/{n}", spec.storage_options).is_file() for n in ("zarr.json", ".zgroup"))
    except Exception:
        return False
