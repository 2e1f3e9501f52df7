"""A Zarr array as a chunk source, and turning zarr-python's errors into typed ones.

The source carries the store (a picklable spec), the node path and the
array's metadata document, so a worker builds the ``zarr.Array`` from it
without reading metadata again; it is cached per process.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_loom.errors import CorruptChunkError, DaskLoomError, FormatError, UnsupportedCodecError
from dask_loom.zarr._meta import _problem, check_safe_codecs, ensure_open, store_label

__all__ = ["ZarrSource", "build_array", "chunk_key", "ensure_open", "translate_read_error", "zarr_metadata"]

_cache_lock = threading.Lock()
_arrays: dict[Any, Any] = {}
_MAX_CACHED = 256


def build_array(store: Any, path: str, metadata: dict[str, Any], *, write_empty_chunks: bool = False) -> Any:
    """A ``zarr.Array`` for *metadata* at *path* of *store* (no I/O), cached per process."""
    from dask.base import tokenize

    check_safe_codecs(metadata, f"{store_label(store)}: array {path or '/'!r}")
    _check_sizes(metadata, f"{store_label(store)}: array {path or '/'!r}")

    key = (tokenize(store), path, json.dumps(metadata, sort_keys=True, default=str), write_empty_chunks)
    with _cache_lock:
        arr = _arrays.get(key)
    if arr is not None:
        return arr
    import zarr
    from zarr.core.array import AsyncArray
    from zarr.storage import StorePath

    ensure_open(store)
    try:
        async_arr = AsyncArray(
            metadata=zarr_metadata(metadata, f"{store_label(store)}: array {path or '/'!r}"),
            store_path=StorePath(store, path),
            config={"write_empty_chunks": write_empty_chunks},
        )
    except Exception as exc:
        raise translate_metadata_error(exc, store, path) from exc
    arr = zarr.Array(async_arr)
    _check_chunks(arr, store, path)
    with _cache_lock:
        if len(_arrays) >= _MAX_CACHED:
            _arrays.pop(next(iter(_arrays)))
        _arrays[key] = arr
    return arr


# simplezarr writes the "default" chunk key encoding with any separator, its chunks under
# "c/" + sep.join(index) ("c/0-0-0" with "-"); zarr-python accepts only "/" and ".".
# Such arrays get an encoding of ours that finds simplezarr's keys.
_SEPARATOR_ENCODING = "dask_loom.default_separator"
_SAFE_SEPARATORS = frozenset("-_~:,;+|!=^")
_registered = False


def _register_separator_encoding() -> None:
    global _registered
    if _registered:
        return
    from dataclasses import dataclass
    from typing import ClassVar

    from zarr.core.chunk_key_encodings import ChunkKeyEncoding
    from zarr.registry import register_chunk_key_encoding

    @dataclass(frozen=True)
    class DefaultAnySeparator(ChunkKeyEncoding):
        """simplezarr's "default" encoding with a separator other than "/" or ".": ``c/i-j-k``."""

        name: ClassVar[str] = _SEPARATOR_ENCODING
        separator: str = "-"

        def encode_chunk_key(self, chunk_coords: tuple[int, ...]) -> str:
            return "c/" + self.separator.join(map(str, chunk_coords)) if chunk_coords else "c"

        def decode_chunk_key(self, chunk_key: str) -> tuple[int, ...]:
            return () if chunk_key == "c" else tuple(map(int, chunk_key[2:].split(self.separator)))

    register_chunk_key_encoding(_SEPARATOR_ENCODING, DefaultAnySeparator)
    _registered = True


def zarr_metadata(metadata: dict[str, Any], where: str = "") -> dict[str, Any]:
    """*metadata* as zarr-python can parse it.

    A Zarr v3 "default" chunk key encoding whose separator is neither "/"
    nor "." (outside the spec; simplezarr writes such arrays, "-" in its own
    tests, with chunk keys ``c/0-0-0``) is swapped for an encoding registered
    here that finds those keys; zarr-python refuses the original.
    Separators that could make a key escape or be re-read differently are
    refused.
    """
    if metadata.get("zarr_format") != 3:
        return metadata
    cke = metadata.get("chunk_key_encoding")
    if not isinstance(cke, dict) or cke.get("name") != "default":
        return metadata
    sep = (cke.get("configuration") or {}).get("separator", "/")
    if sep in ("/", "."):
        return metadata
    if not isinstance(sep, str) or sep not in _SAFE_SEPARATORS:
        raise FormatError(
            f"{where + ': ' if where else ''}invalid metadata: chunk_key_encoding separator {sep!r} "
            f"(expected '/', '.' or one of {''.join(sorted(_SAFE_SEPARATORS))!r})"
        )
    _register_separator_encoding()
    return {**metadata, "chunk_key_encoding": {"name": _SEPARATOR_ENCODING, "configuration": {"separator": sep}}}


def _check_sizes(metadata: dict[str, Any], where: str) -> None:
    """Shape and chunk shape must be lists of non-negative integers: JSON ``true``/``false``
    would pass as 1/0 through Python's ``bool``-is-``int`` and read as another array."""
    grid = metadata.get("chunk_grid")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    fields = {"shape": metadata.get("shape"), "chunks": metadata.get("chunks")}
    if isinstance(conf, dict):
        fields["chunk_grid.configuration.chunk_shape"] = conf.get("chunk_shape")
    for name, value in fields.items():
        if value is None and name != "shape":
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in value):
            raise FormatError(f"{where}: invalid metadata: {name} is {value!r}, not a list of non-negative integers")


def _check_chunks(arr: Any, store: Any, path: str) -> None:
    """Refuse chunk shapes that are empty or whose decoded size is beyond ``dask_loom.max-chunk-bytes``."""
    from dask.utils import parse_bytes

    from dask_loom._config import get_config
    from dask_loom.errors import TooLargeError

    where = f"{store_label(store)}: array {path or '/'!r}"
    for shape in (arr.chunks, arr.shards):
        if shape is None:
            continue
        if any(int(c) < 1 for c in shape):
            raise FormatError(f"{where}: invalid metadata: chunk shape {tuple(shape)} has an empty axis")
        cap = get_config("max-chunk-bytes")
        cap = parse_bytes(cap) if isinstance(cap, str) else int(cap)
        n = math.prod(int(c) for c in shape) * max(1, _numpy_dtype(arr).itemsize)
        if n > cap:
            raise TooLargeError(f"{where}: chunk shape {tuple(shape)} means {n} bytes per chunk, more than dask_loom.max-chunk-bytes ({cap})")


def translate_metadata_error(exc: BaseException, store: Any, path: str) -> DaskLoomError:
    where = f"{store_label(store)}: array {path or '/'!r}"
    name = type(exc).__name__
    if name == "UnknownCodecError" or "codec not available" in str(exc):
        return UnsupportedCodecError(f"{where}: {exc} (install the package providing this codec)")
    if isinstance(exc, DaskLoomError):
        return exc
    return FormatError(f"{where}: invalid metadata: {name}: {exc}")


def chunk_key(arr: Any, coords: tuple[int, ...]) -> str:
    """The store key of stored chunk (or shard) *coords* of a ``zarr.Array``."""
    k = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    return f"{arr.path}/{k}" if arr.path else k


def translate_read_error(exc: BaseException, arr: Any, store: Any, region: tuple[slice, ...], chunk_shape: tuple[int, ...]) -> BaseException:
    """Name the chunk that fails to decode (re-reading the region chunk by chunk)."""
    if isinstance(exc, DaskLoomError):
        return exc
    if type(exc).__name__ == "UnknownCodecError":
        return translate_metadata_error(exc, store, arr.path)
    bad = None
    for coords, sub in _chunks_in(region, chunk_shape, arr.shape):
        try:
            arr[sub]
        except DaskLoomError as inner:
            return inner
        except Exception as inner:
            bad = (coords, inner)
            break
    coords, cause = bad if bad is not None else (None, exc)
    key = chunk_key(arr, coords) if coords is not None else "?"
    return CorruptChunkError(f"{store_label(store)}: array {arr.path or '/'!r}, chunk {key!r}: {_problem(cause)}")


def _chunks_in(region: tuple[slice, ...], chunk_shape: tuple[int, ...], shape: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, chunk_shape)]
    for coords in np.ndindex(*[len(r) for r in ranges]):
        cc = tuple(r[i] for r, i in zip(ranges, coords))
        yield cc, tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cc, chunk_shape, shape))


class ZarrSource:
    """A Zarr array as a :class:`~dask_loom.blocks.ChunkSource` (storage unit: shard, else chunk).

    Parameters
    ----------
    store
        A picklable zarr ``Store`` (every dask_loom store is).
    path
        Array path inside the store.
    metadata
        The array's metadata document (``zarr.Array.metadata.to_dict()``).
    prefix
        Task-name prefix (``"zarr-read"``, ``"loom-read"`` …).
    """

    def __init__(self, store: Any, path: str, metadata: dict[str, Any], *, prefix: str = "zarr-read") -> None:
        self.store = store
        self.path = path
        self.metadata = metadata
        self.prefix = prefix
        arr = self.array()
        self.shape = tuple(int(s) for s in arr.shape)
        self.dtype = _numpy_dtype(arr)
        self.chunk_shape = tuple(int(c) for c in (arr.shards or arr.chunks))
        self.label = f"{store_label(store)}:{path}"
        self._reader: Any = None
        self._direct = self._direct_possible(arr)
        self._doc_path = self._local_doc_path()
        self._doc_seen: tuple[int, int, int] | None = None
        self._refresh_lock = threading.Lock()

    def _direct_possible(self, arr: Any) -> bool:
        """Whether blocks are read by the direct chunk reader (:mod:`dask_loom.zarr._chunks`)."""
        from dask_loom.storage._stores import BaseStore
        from dask_loom.zarr._chunks import layout_of

        return isinstance(self.store, BaseStore) and layout_of(arr) is not None

    def reader(self) -> Any:
        """This source's :class:`~dask_loom.zarr._chunks.ZarrChunkReader` (shard indexes cached for its life)."""
        if self._reader is None:
            from dask_loom.zarr._chunks import ZarrChunkReader, layout_of, objects_for_store

            arr = self.array()
            lay = layout_of(arr)
            assert lay is not None
            self._reader = ZarrChunkReader(objects_for_store(self.store), arr.path, lay, arr.metadata.encode_chunk_key)
        return self._reader

    @property
    def staged_chunk_shape(self) -> tuple[int, ...]:
        """The unit :meth:`read_staged` decodes: the inner chunk of a sharded array (else the stored chunk).

        Reductions stage every whole one of these in a block and read only the
        partial ones at the array's edge the ordinary way (a shard cut by the
        edge still holds whole inner chunks).
        """
        if self._direct:
            return tuple(int(c) for c in self.reader().layout.chunks)
        return tuple(self.chunk_shape)

    @property
    def streams_chunks(self) -> bool:
        """Whether a block's chunks are requested at once and decoded as they arrive (no sub-block read-ahead)."""
        return bool(self._direct) and bool(self.reader().streams)

    def array(self) -> Any:
        return build_array(self.store, self.path, self.metadata)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("ZarrSource", tokenize(self.store), self.path, json.dumps(self.metadata, sort_keys=True, default=str))

    def __reduce__(self) -> Any:
        return (_rebuild_source, (self.store, self.path, self.metadata, self.prefix, self._doc_seen))

    # -- an array replaced under the reader -----------------------------------------------

    def _local_doc_path(self) -> str | None:
        """The file of the array's metadata document, for a local directory store (else ``None``)."""
        from dask_loom.storage._stores import LocalStore

        if type(self.store) is not LocalStore:
            return None
        doc = "zarr.json" if self.metadata.get("zarr_format", 3) == 3 else ".zarray"
        return os.path.join(str(self.store.path), *[p for p in self.path.split("/") if p], doc)

    def _doc_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._doc_path)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _adopt(self, seen: tuple[int, int, int] | None) -> None:
        """Take the metadata document now on disk if it is not the one this source reads with.

        A writer replaces a ``.loom.zarr`` layer (or any local array) by
        exchanging its directory, possibly with other inner chunks or shards;
        reading the new shards with the old layout would misplace every byte.
        The new layout is adopted when shape and dtype are unchanged (the
        block grid of graphs already built stays valid: any region reads);
        otherwise the array cannot be read as the one that was opened.
        """
        from dask_loom.errors import FileBeingWrittenError
        from dask_loom.zarr._docs import NodeNotFoundError, read_node_metadata, readable_metadata

        with self._refresh_lock:
            if seen == self._doc_seen:
                return
            try:
                kind, doc = read_node_metadata(self.store, self.path)
            except NodeNotFoundError:
                kind, doc = "missing", {}
            if kind != "array":
                raise FileBeingWrittenError(f"{self.label}: the array was removed while it was read")
            doc = readable_metadata(doc)
            if doc != self.metadata:
                arr = build_array(self.store, self.path, doc)
                if tuple(int(s) for s in arr.shape) != self.shape or _numpy_dtype(arr) != self.dtype:
                    raise FileBeingWrittenError(
                        f"{self.label}: the array was replaced by one of shape {tuple(arr.shape)} and dtype "
                        f"{_numpy_dtype(arr)} (opened as {self.shape}, {self.dtype}) while it was read; open it again"
                    )
                self.metadata = doc
                self._reader = None
                self._direct = self._direct_possible(arr)
            self._doc_seen = seen

    def read_block(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        """Read a region (edges on stored-chunk boundaries read each chunk once).

        On a local directory the array's metadata document is checked before
        and after the read (a ``stat`` each): a read that overlapped the
        array's replacement is repeated with the new layout.
        """
        return self._consistent(lambda: self._read_block(region, out))

    def read_staged(self, region: tuple[slice, ...]) -> np.ndarray | None:
        """The region's decoded chunks in grid layout ``(*grid, *chunks)``, without assembling them.

        Only where the direct reader serves the array and the region is made
        of whole (inner) chunks inside it (``None`` otherwise): reductions
        then run on the decoded chunks (see
        :meth:`~dask_loom.zarr._chunks.ZarrChunkReader.read_staged`).  The
        array is a view of a per-thread buffer, valid until the thread's next
        staged read.
        """
        region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape))
        return self._consistent(lambda: self._staged(region))

    def prefetch(self, region: tuple[slice, ...]) -> None:
        """Start fetching *region*'s stored bytes in the background, for a staged read of it soon in this process.

        See :meth:`~dask_loom.zarr._chunks.ZarrChunkReader.prefetch`; nothing
        where the direct reader does not serve the array.
        """
        if self._direct:
            reader = self.reader()
            if reader.layout.dtype == self.dtype:
                reader.prefetch(tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape)))

    def staged_pieces(self, region: tuple[slice, ...]) -> Iterator[np.ndarray] | None:
        """:meth:`read_staged` a few rows of chunks at a time: fetched together, decoded piece by piece.

        See :meth:`~dask_loom.zarr._chunks.ZarrChunkReader.staged_pieces`;
        the fetch is checked against a concurrent replacement like
        :meth:`read_staged`.  ``None`` where :meth:`read_staged` is.
        """
        region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape))

        def fetch() -> Iterator[np.ndarray] | None:
            if not self._direct:
                return None
            reader = self.reader()
            return reader.staged_pieces(region) if reader.layout.dtype == self.dtype else None

        return self._consistent(fetch)

    def _staged(self, region: tuple[slice, ...]) -> np.ndarray | None:
        if not self._direct:
            return None
        reader = self.reader()
        return reader.read_staged(region) if reader.layout.dtype == self.dtype else None

    def _consistent(self, read: Any) -> Any:
        """``read()``, repeated if a local array's metadata document changed while it ran."""
        if self._doc_path is None:
            return read()
        from dask_loom.errors import FileBeingWrittenError

        attempts = 20
        for attempt in range(attempts):
            seen = self._doc_identity()
            if seen != self._doc_seen:
                self._adopt(seen)
            try:
                data = read()
            except Exception:
                if self._doc_identity() == seen:
                    raise
            else:
                if self._doc_identity() == seen:
                    return data
            time.sleep(min(0.001 * 2**attempt, 0.1))
        raise FileBeingWrittenError(
            f"{self.label}: the array was replaced {attempts} times while a block was read (it is being written); read again later"
        )

    def _read_block(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape))
        if self._direct and region and all(r.stop > r.start for r in region):
            data = self.reader().read_region(region, out)
            return data if data.dtype == self.dtype else data.astype(self.dtype)
        arr = self.array()
        if not region:
            data = np.asarray(arr[()])
        elif any(r.stop <= r.start for r in region):
            data = np.empty(tuple(max(0, r.stop - r.start) for r in region), dtype=self.dtype)
        else:
            try:
                data = arr[region]
            except Exception as exc:
                raise translate_read_error(exc, arr, self.store, region, self.chunk_shape) from exc
        data = np.asarray(data)
        if data.dtype != self.dtype:
            data = data.astype(self.dtype)
        if out is not None:
            out[...] = data
            return out
        return data


def _rebuild_source(
    store: Any, path: str, metadata: dict[str, Any], prefix: str, seen: tuple[int, int, int] | None = None
) -> ZarrSource:
    source = ZarrSource(store, path, metadata, prefix=prefix)
    source._doc_seen = seen  # the document *metadata* was checked against, on this machine's disk
    return source


def _numpy_dtype(arr: Any) -> np.dtype:
    dt = arr.dtype
    # Variable-length strings come back as numpy's StringDType: dask and the
    # Loom code work with object arrays of str.
    if getattr(dt, "kind", None) == "T" or not isinstance(dt, np.dtype):
        return np.dtype(object)
    return dt


def region_size(region: tuple[slice, ...]) -> int:
    return math.prod(r.stop - r.start for r in region)
