"""``dask_loom.permute`` for Zarr arrays: a permuted copy written beside the array, then swapped in.

The copy is a new array (same metadata: dtype, chunks, shards, codecs,
attributes) at a hidden name in the same group, ``.dlpart-<name>.permute-…``,
written by one graph (ops._permute: bands spanning the permuted axis, whole
chunks or shards along every other axis, so no two tasks write one stored
object).  At the end the two names are swapped: on a local disk by one atomic
directory exchange (storage._atomic), so a killed process leaves the old or
the new array, whole, and the next writer removes the hidden leftover; in
memory under the store's lock.  On object stores (no rename) the new chunks
are copied over with the metadata document removed first and written last:
an interrupted swap leaves an array that does not open, with the complete
permuted copy still at the hidden name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dask_loom.errors import MissingKeyError, ReadOnlyError
from dask_loom.zarr._source import ZarrSource, build_array, store_label

__all__ = ["permute_array"]

_META = ("zarr.json", ".zarray", ".zattrs")


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


class _RegionWriter:
    """Writes whole-chunk regions of one array (a picklable task argument: store, path, metadata)."""

    def __init__(self, store: Any, path: str, metadata: dict[str, Any]) -> None:
        self.store = store
        self.path = path
        self.metadata = metadata

    def __call__(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        build_array(self.store, self.path, self.metadata, write_empty_chunks=False)[region] = block

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("ZarrRegionWriter", tokenize(self.store), self.path)


@contextlib.contextmanager
def _locked(store: Any) -> Iterator[None]:
    """The writer lock of a local store (the lock file beside its root, as ``.loom.zarr`` writers take)."""
    from dask_loom.storage._stores import LocalStore

    if not isinstance(store, LocalStore):
        yield
        return
    from dask_loom._config import get_config
    from dask_loom.hdf5._files import _exclusive
    from dask_loom.storage import FileSpec

    with _exclusive(FileSpec.from_path(str(store.path)), float(get_config("write-timeout"))):
        yield


def _copy_metadata(src_store: Any, src: str, dst_store: Any, dst: str) -> None:
    for name in _META:
        with contextlib.suppress(MissingKeyError):
            dst_store._set(_join(dst, name), src_store._get(_join(src, name)))


def _swap_prefix(store: Any, tmp: str, path: str) -> None:
    """Put the array at key prefix *tmp* at *path* in the same store (see the module docstring)."""
    from dask_loom.storage._stores import LocalStore, MemoryStore

    if isinstance(store, LocalStore):
        from dask_loom.storage._atomic import replace_dir

        replace_dir(store.path.joinpath(*tmp.split("/")), store.path.joinpath(*path.split("/")))
        return
    if isinstance(store, MemoryStore):
        store._move_prefix(tmp, path)
        return
    tmp_p, dst_p = f"{tmp}/", f"{path}/"
    new_keys = [k[len(tmp_p) :] for k in store._keys(tmp_p)]
    for name in _META:  # the old array stops opening first ...
        with contextlib.suppress(MissingKeyError):
            store._erase(dst_p + name)
    for k in new_keys:
        if k not in _META:
            store._set(dst_p + k, store._get(tmp_p + k))
    for k in set(store._keys(dst_p)) - {dst_p + n for n in new_keys}:
        store._erase(k)
    for name in _META:  # ... and the new one opens only once whole
        if name in new_keys:
            store._set(dst_p + name, store._get(tmp_p + name))
    for k in store._keys(tmp_p):
        store._erase(k)


def _discard(store: Any, tmp: str) -> None:
    from dask_loom.storage._stores import LocalStore

    if isinstance(store, LocalStore):
        import shutil

        shutil.rmtree(store.path.joinpath(*tmp.split("/")) if tmp else store.path, ignore_errors=True)
        return
    with contextlib.suppress(Exception):
        for k in list(store._keys(f"{tmp}/" if tmp else "")):
            store._erase(k)


def _copy_target(store: Any, path: str) -> tuple[Any, str, Callable[[], None]]:
    """Where the permuted copy goes (store, path) and how it replaces the array at the end."""
    from dask_loom.storage._atomic import replace_dir, temp_sibling
    from dask_loom.storage._stores import LocalStore, MemoryStore

    where = f"{store_label(store)}: array {path or '/'!r}"
    if path:
        head, _, name = path.rpartition("/")
        tmp = _join(head, temp_sibling(name, "permute"))  # hidden, and removable once its writer is gone
        return store, tmp, lambda: _swap_prefix(store, tmp, path)
    # The array is the whole store: the copy is a store of its own.
    if isinstance(store, LocalStore):
        tmp_dir = temp_sibling(store.path, "permute")
        return LocalStore(tmp_dir), "", lambda: replace_dir(tmp_dir, store.path)
    if isinstance(store, MemoryStore):
        new = MemoryStore()

        def swap() -> None:
            with store._lock:
                store._dict.clear()
                store._dict.update(new._dict)

        return new, "", swap
    raise ReadOnlyError(f"{where}: an array at the root of this store cannot be replaced in place (no rename); keep it in a group")


def _remove_stale(store: Any, path: str) -> None:
    """Hidden copies of this array left by permutes that died (we hold the writer lock)."""
    from dask_loom.storage._atomic import remove_stale
    from dask_loom.storage._stores import LocalStore

    if isinstance(store, LocalStore):
        remove_stale(store.path.joinpath(*path.split("/")) if path else store.path, all_of_them=True)


def permute_array(array: Any, ordering: np.ndarray, axis: int, *, scheduler: Any = None, client: Any = None) -> None:
    """Permute a ``ZarrArray`` along *axis* in place (a checked permutation; see :func:`dask_loom.permute`)."""
    from dask_loom.ops._permute import permute_blocks
    from dask_loom.storage._stores import BaseStore

    store, path = array.store, array.path
    where = f"{store_label(store)}: array {path or '/'!r}"
    if getattr(store, "read_only", False):
        raise ReadOnlyError(f"{where}: the store is read-only")
    if not isinstance(store, BaseStore):
        raise ReadOnlyError(f"{where}: permuting in place needs a dask_loom store (open it with dask_loom.open_zarr(path))")
    with _locked(store):
        _remove_stale(store, path)
        target, tmp, swap = _copy_target(store, path)
        try:
            _copy_metadata(store, path, target, tmp)
            source = ZarrSource(store, path, array.metadata, prefix="zarr-read")
            permute_blocks(source, _RegionWriter(target, tmp, array.metadata), ordering, axis, prefix="zarr-permute", scheduler=scheduler, client=client)
        except BaseException:
            _discard(target, tmp)
            raise
        swap()
