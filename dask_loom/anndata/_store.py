"""Where an AnnData file lives and how each process opens it (h5ad or zarr).

An :class:`AnnStore` is a small picklable spec (a :class:`~dask_loom.storage.FileSpec`
plus the container kind).  The open root group is cached per process and per
``fork`` (decision 2): a forked DataLoader worker never reuses its parent's
HDF5 or zarr handles, and a spawned one opens its own on first use.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from dask_loom._handles import HandleCache
from dask_loom.errors import AnnDataFormatError
from dask_loom.hdf5._files import open_h5_read, reading_values
from dask_loom.storage import FileSpec

__all__ = ["AnnStore", "attr", "child", "forget_root", "is_group", "keys_of", "open_store", "to_str_array"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"

# Root groups of zarr stores, opened once per process (a forked child opens its own).
_roots: HandleCache[Any] = HandleCache("anndata zarr roots")


@dataclass(frozen=True)
class AnnStore:
    """An AnnData container: ``kind`` is ``"h5ad"``, ``"zarr"`` or ``"zarr-zip"``."""

    spec: FileSpec
    kind: str

    @property
    def name(self) -> str:
        return self.spec.name

    def root(self) -> Any:
        """The root group of a zarr store, opened once per process (h5ad: use :meth:`locked`)."""
        if self.kind == "h5ad":
            raise TypeError(f"{self.name}: h5ad handles are held per use; use AnnStore.locked()")
        return _roots.get(self.spec.url, lambda: _open_zarr_root(self))

    @contextlib.contextmanager
    def locked(self) -> Iterator[Any]:
        """The root group for the ``with`` block (h5py access serialised per file)."""
        if self.kind == "h5ad":
            with open_h5_read(self.spec) as f:
                yield f
        else:
            yield self.root()

    def __dask_tokenize__(self) -> Any:
        return ("AnnStore", self.kind, self.spec.__dask_tokenize__())


def forget_root(store: AnnStore) -> None:
    """Drop this process's root group of a zarr *store* (the next :meth:`AnnStore.root` reopens it)."""
    _roots.discard(store.spec.url)


def _remote_head(spec: FileSpec) -> tuple[bool, bytes]:
    remote = spec.remote()
    # One HEAD answers for a file; a prefix (a zarr store) costs one listing more.
    try:
        kind = remote.kind()
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, f"AnnData file or store '{spec.name}' not found", spec.name
        ) from None
    if kind == "directory":
        return True, b""
    size = remote.size()
    return False, bytes(remote.read_ranges([0], [min(8, size)])[0]) if size else b""


def open_store(path: Any, storage_options: dict[str, Any] | None = None) -> AnnStore:
    """Resolve a path or URL to an :class:`AnnStore`, detecting h5ad vs zarr by content.

    A directory is a zarr store, a file starting with the HDF5 signature an
    h5ad, a ZIP file a zipped zarr store; anything else is refused.
    """
    if isinstance(path, AnnStore):
        return path
    spec = FileSpec.from_path(os.fspath(path) if not isinstance(path, str) else path, storage_options)
    if spec.is_local:
        if not os.path.exists(spec.url):
            raise FileNotFoundError(errno.ENOENT, f"AnnData file or store '{spec.url}' not found", spec.url)
        if os.path.isdir(spec.url):
            return AnnStore(spec, "zarr")
        with open(spec.url, "rb") as fh:
            head = fh.read(8)
        is_dir = False
    else:
        is_dir, head = _remote_head(spec)
        if is_dir:
            return AnnStore(spec, "zarr")
    if head.startswith(_HDF5_MAGIC) or (spec.is_local and not is_dir and h5py.is_hdf5(spec.url)):
        return AnnStore(spec, "h5ad")
    if head.startswith(_ZIP_MAGIC):
        return AnnStore(spec, "zarr-zip")
    raise AnnDataFormatError(
        f"{spec.name}: not an AnnData file (neither HDF5/.h5ad, a zarr directory nor a zipped zarr store; "
        f"first bytes {head!r})"
    )


def _open_zarr_root(store: AnnStore) -> Any:
    import zarr
    from zarr.storage import FsspecStore, LocalStore, ZipStore

    spec = store.spec
    if store.kind == "zarr-zip":
        if spec.is_local:
            zstore: Any = ZipStore(spec.url, mode="r")
        else:
            import fsspec
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            zfs = fsspec.filesystem("zip", fo=spec.remote().open())
            zstore = FsspecStore(AsyncFileSystemWrapper(zfs, asynchronous=True), read_only=True, path="")
    elif spec.is_local:
        zstore = LocalStore(spec.url, read_only=True)
    else:
        from dask_loom.storage._objectstore import open_store as open_object_store

        zstore = open_object_store(spec.url, read_only=True, **spec.storage_options)
    try:
        if not spec.is_local and store.kind == "zarr":
            # Remotely, asking for v3 first spares the concurrent probes of the
            # v2 documents (.zgroup, .zattrs, .zmetadata: six requests); a v2
            # store costs one failed GET more.
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError, KeyError, LookupError):
                return zarr.open_group(zstore, mode="r", zarr_format=3)
        return zarr.open_group(zstore, mode="r")
    except (ValueError, TypeError, KeyError) as first:
        # Consolidated metadata zarr cannot parse (e.g. a struct dtype in uns):
        # the per-node metadata is still readable.
        try:
            return zarr.open_group(zstore, mode="r", use_consolidated=False)
        except Exception:
            raise AnnDataFormatError(f"{spec.name}: cannot open as a zarr group ({first})") from first
    except FileNotFoundError as exc:
        raise AnnDataFormatError(f"{spec.name}: no zarr group metadata at the store root ({exc})") from None
    except Exception as exc:
        if type(exc).__name__ in ("GroupNotFoundError", "NodeNotFoundError", "ContainsArrayError"):
            raise AnnDataFormatError(f"{spec.name}: not an AnnData zarr store ({exc})") from None
        raise


# -- node helpers (h5py and zarr groups answer the same questions) -------------


def is_group(node: Any) -> bool:
    if isinstance(node, h5py.Group):
        return True
    if isinstance(node, h5py.Dataset):
        return False
    return not hasattr(node, "dtype")


def child(node: Any, key: str) -> Any:
    """``node[key]`` or ``None`` when absent."""
    try:
        if key not in node:
            return None
        return node[key]
    except (KeyError, ValueError):
        return None


def keys_of(node: Any) -> list[str]:
    return [str(k) for k in node] if is_group(node) else []


def attr(node: Any, key: str, default: Any = None) -> Any:
    """An attribute as a plain Python value (``str`` for strings, lists for arrays)."""
    try:
        attrs = node.attrs
        if key not in attrs:
            return default
        with reading_values():  # h5py string attributes: see hdf5._files.reading_values
            v = attrs[key]
    except (KeyError, OSError):
        return default
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "SO":
            return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.tolist()]
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def to_str_array(values: Any) -> np.ndarray:
    """Decode bytes / StringDType / fixed-width strings to an object array of ``str``."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8").astype(object)
    if arr.dtype.kind == "U" or arr.dtype.kind == "T":
        return arr.astype(object)
    if arr.dtype == object and arr.size and any(isinstance(x, bytes) for x in arr.reshape(-1)[:1]):
        return _decode(arr)
    return arr


_decode = np.frompyfunc(lambda x: x.decode("utf-8") if isinstance(x, bytes) else x, 1, 1)
