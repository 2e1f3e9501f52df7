"""The direct Zarr chunk reader: chunks read by byte range and decoded outside zarr-python's pipeline.

One decoder for every Zarr read that can bypass zarr-python: the blocks of a
:class:`~dask_loom.zarr.ZarrSource` (Zarr arrays, ``.loom.zarr`` layers) and
the rows of AnnData Zarr elements (:mod:`dask_loom.anndata._read`).

zarr-python costs about 0.5-1 ms per chunk in its async codec pipeline (and a
shard-index lookup per inner chunk of a sharded array), which dominates with
small chunks.  Here, as on the HDF5 path (:mod:`dask_loom.hdf5._source`),
zarr only describes the array; the needed chunks are located through the
shard indexes (read once per shard and cached, re-read when a local shard
file changes), fetched with coalesced byte-range reads and decoded with
numcodecs' implementations of the array's codecs in the calling thread:

* a local directory is read with ``pread``, one open per shard;
* any other store (object stores, memory, zip) with ranged requests issued
  concurrently: adjacent inner chunks of a shard are merged into requests of
  up to ``dask_loom.coalesce-bytes`` (4 MiB), reading through holes of up to
  ``dask_loom.coalesce-gap`` (1 MiB), so a task that reads a whole 64 MiB
  shard sends one index request and sixteen data requests at once.

Every answer is checked against the length asked for: a short answer (a
proxy or cache that cut the body) is retried, then refused with a
:class:`~dask_loom.errors.CorruptChunkError` naming the object and byte range;
a shard index that is truncated, fails its checksum or points outside its
object is refused the same way.  A block is never silently short.

Handled: zarr v2 (any numcodecs compressor, no filters) and v3 (``bytes``
plus bytes-to-bytes codecs numcodecs provides, optionally inside
``sharding_indexed`` with a ``bytes``/``crc32c`` index at either end) arrays
of numeric dtypes on a regular grid.  For anything else :func:`layout_of`
returns ``None`` and the caller reads through zarr-python.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dask_loom._config import get_config
from dask_loom._threads import piece_spans, scratch
from dask_loom.blocks._plan import grid_coords, split_by_chunk
from dask_loom.errors import CorruptChunkError
from dask_loom.zarr._objects import (
    STATS,
    ChunkLayout,
    _count,
    _LocalDir,
    _Objects,
    _StoreObjects,
    layout_of,
)

__all__ = [
    "STATS",
    "ChunkLayout",
    "ZarrChunkReader",
    "chunk_reader",
    "forget",
    "layout_of",
    "objects_for_store",
    "split_by_chunk",
]


_NO_READER = object()

_lock = threading.Lock()
_readers: dict[tuple[Any, ...], Any] = {}


def _reset_after_fork() -> None:
    # Readers hold store objects (event loops, sessions): a forked child
    # builds its own.  The parent's stay referenced, never closed here.
    global _lock, _readers
    _inherited.append(_readers)
    _lock = threading.Lock()
    _readers = {}


_inherited: list[Any] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# -- the reader -----------------------------------------------------------------------


def _serial(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


class ZarrChunkReader:
    """Decoded chunks of one zarr array, and regions, 1-D ranges and rows of it.

    Parameters
    ----------
    objects
        Byte access to the store's objects.
    path
        The array's path in the store.
    layout
        Its :class:`ChunkLayout`.
    encode_key
        ``coords -> key`` of a stored object (chunk, or shard), as zarr names it.
    mapper
        ``mapper(fn, items) -> list``: how many chunks are decoded at once
        (default: one after the other, in the calling thread, as dask tasks
        already run in parallel).
    """

    def __init__(
        self,
        objects: _Objects,
        path: str,
        layout: ChunkLayout,
        encode_key: Callable[[tuple[int, ...]], str],
        *,
        mapper: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]] | None = None,
    ) -> None:
        self.objects = objects
        self.path = path
        self.layout = layout
        self._encode = encode_key
        self._mapper = mapper
        self.label = f"{objects.label}: array {path!r}"
        # Regions' stored bytes on their way (prefetch), each taken once by the read of that region,
        # with the process that fetches them: a forked child's copy would wait for a thread it lacks.
        self._ahead: dict[bytes, tuple[int, Any]] = {}
        self._ahead_lock = threading.Lock()

    def key(self, coords: Sequence[int]) -> str:
        k = self._encode(tuple(int(c) for c in coords))
        return f"{self.path}/{k}" if self.path else k

    def _name(self, coords: tuple[int, ...]) -> str:
        """The stored object holding chunk *coords* (and the inner chunk, when sharded), for messages."""
        per = self.layout.per_shard
        if per is None:
            return f"chunk {self.key(coords)!r}"
        shard = tuple(c // p for c, p in zip(coords, per))
        return f"shard {self.key(shard)!r}, inner chunk {tuple(c % p for c, p in zip(coords, per))}"

    def _decode(self, raw: Any, coords: tuple[int, ...]) -> np.ndarray:
        from numcodecs.compat import ensure_contiguous_ndarray

        lay = self.layout
        data: Any = raw
        if self._is_blosc() and not 0 <= _blosc_sizes(raw)[1] <= len(raw):
            # blosc reads as many bytes as its header says: a cut chunk would be read past its end.
            # Bytes after those are ignored, as numcodecs does (z5py pads its chunks with 16).
            raise CorruptChunkError(
                f"{self.label}, {self._name(coords)}: {len(raw)} bytes, fewer than its blosc header gives"
            )
        try:
            for decode in reversed(lay.decoders):
                data = decode(data)
            if isinstance(data, (bytes, bytearray, memoryview)):
                buf = np.frombuffer(data, dtype=np.uint8)
            else:
                buf = ensure_contiguous_ndarray(data).reshape(-1).view(np.uint8)
        except Exception as exc:
            raise CorruptChunkError(f"{self.label}, {self._name(coords)}: {_problem(exc)}") from None
        if buf.nbytes != lay.chunk_nbytes:
            raise CorruptChunkError(
                f"{self.label}, {self._name(coords)}: decoded to {buf.nbytes} bytes, expected {lay.chunk_nbytes}"
            )
        return buf.view(lay.disk_dtype).reshape(lay.chunks)

    def _decode_into(self, raw: Any, coords: tuple[int, ...], dst: np.ndarray, *, direct: bool) -> None:
        """Decode the whole chunk *raw* into *dst* (contiguous, the array's dtype).

        With *direct* (blosc, stored in the array's dtype) a chunk whose header
        gives exactly its size is decompressed in place, with no decoded copy;
        any other goes through :meth:`_decode`, which refuses a damaged chunk
        naming it.
        """
        if direct and _blosc_sizes(raw) == (self.layout.chunk_nbytes, len(raw)):
            from numcodecs import blosc

            try:
                blosc.decompress(raw, dst)
            except Exception as exc:
                raise CorruptChunkError(f"{self.label}, {self._name(coords)}: {_problem(exc)}") from None
            return
        dst[...] = self._decode(raw, coords).reshape(dst.shape)

    def read_chunks(self, coords: np.ndarray) -> list[np.ndarray | None]:
        """Decoded chunks at grid *coords* (``(k, ndim)``; inner chunks when sharded); ``None`` = fill."""
        lay = self.layout
        coords = np.asarray(coords, dtype=np.int64).reshape(len(coords), len(lay.chunks))
        if not len(coords):
            return []
        raws = self._raws(coords)
        present = [j for j, r in enumerate(raws) if r is not None]
        tuples = [tuple(c) for c in coords.tolist()]
        decode = self._decode
        if self._mapper is not None and len(present) > 16 and sum(len(raws[j]) for j in present) > (1 << 18):
            decoded = self._mapper(lambda j: decode(raws[j], tuples[j]), present)
        else:
            decoded = [decode(raws[j], tuples[j]) for j in present]
        out: list[np.ndarray | None] = [None] * len(coords)
        for j, d in zip(present, decoded):
            out[j] = d
        _count("direct_reads")
        _count("chunks_decoded", len(present))
        return out

    #: Regions fetched ahead and not yet read, at most (the oldest is dropped past it).
    AHEAD = 16

    def prefetch(self, region: tuple[slice, ...]) -> None:
        """Start fetching the stored bytes of *region* (whole chunks) in the background, for a staged read of it soon.

        The read of the same region then takes them (once) instead of asking
        the store; it asks the store itself if the fetch failed.  A region of
        partial chunks is left alone.
        """
        coords = self._whole_coords(region)
        if coords is None:
            return
        from concurrent.futures import Future

        key = coords.tobytes()
        fut: Future[list[Any]] = Future()
        with self._ahead_lock:
            if key in self._ahead:
                return
            self._ahead[key] = (os.getpid(), fut)
            while len(self._ahead) > self.AHEAD:
                del self._ahead[next(iter(self._ahead))]

        def fetch() -> None:
            try:
                fut.set_result(self._fetch_raws(coords))
            except BaseException as exc:  # the read asks again, and reports
                fut.set_exception(exc)

        # A thread of its own: the store's reads may wait on the I/O pool themselves.
        threading.Thread(target=fetch, name="dask-loom-prefetch", daemon=True).start()

    def _raws(self, coords: np.ndarray) -> list[Any]:
        """The stored bytes of the chunks at grid *coords* (``None``: never written), fetched together."""
        with self._ahead_lock:
            pid, fut = self._ahead.pop(coords.tobytes(), (None, None)) if self._ahead else (None, None)
        if fut is not None and pid == os.getpid():
            try:
                return fut.result()
            except Exception:
                pass  # fetched again below: retried and reported as any read
        return self._fetch_raws(coords)

    def _fetch_raws(self, coords: np.ndarray) -> list[Any]:
        lay = self.layout
        if lay.per_shard is None:
            return self.objects.whole([self.key(c) for c in coords.tolist()])
        per = np.array(lay.per_shard, dtype=np.int64)
        shards = [tuple(sc) for sc in (coords // per).tolist()]
        linear = np.ravel_multi_index(tuple((coords % per).T), lay.per_shard).tolist()
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, sc in enumerate(shards):
            groups.setdefault(sc, []).append(j)
        keys = {sc: self.key(sc) for sc in groups}
        got = self.objects.shard_chunks(lay, {keys[sc]: [linear[j] for j in js] for sc, js in groups.items()})
        raws: list[Any] = [None] * len(coords)
        for sc, js in groups.items():
            for j, raw in zip(js, got[keys[sc]]):
                raws[j] = raw
        return raws

    def read_staged(self, region: tuple[slice, ...]) -> np.ndarray | None:
        """The decoded chunks of *region* in grid layout ``(*grid, *chunks)``, in a per-thread buffer.

        For a region of whole (inner) chunks inside the array, else ``None``.
        Reductions run on the chunks as they are (no copy into row-major
        order), and a blosc chunk stored in the array's dtype is decompressed
        straight into its slot (no decoded copy, no fresh buffer per chunk).
        The array is valid until the thread's next staged read (HDF5 or Zarr).
        """
        runs = self.staged_pieces(region, whole=True)
        return None if runs is None else next(runs)

    def staged_pieces(self, region: tuple[slice, ...], *, whole: bool = False) -> Iterator[np.ndarray] | None:
        """:meth:`read_staged` a few rows of chunks at a time (see :func:`~dask_loom._threads.piece_spans`; *whole*: one piece).

        The region's chunks are fetched before the first piece, in the same
        requests as :meth:`read_staged`; each piece is decoded when asked for,
        into a per-thread buffer valid until the next.
        """
        lay = self.layout
        cs = lay.chunks
        coords = self._whole_coords(region)
        if coords is None:
            return None
        grid = [(r.stop - r.start) // c for r, c in zip(region, cs)]
        raws = self._raws(coords)
        _count("direct_reads")
        per_row = math.prod(grid[1:])
        row_bytes = per_row * math.prod(cs) * np.dtype(lay.dtype).itemsize
        spans = [(0, grid[0])] if whole else piece_spans(grid[0], row_bytes)
        return self._decode_pieces(raws, coords, grid, spans)

    def _whole_coords(self, region: tuple[slice, ...]) -> np.ndarray | None:
        """The grid coordinates of *region*'s chunks, in C order, if it is made of whole chunks inside the array."""
        cs = self.layout.chunks
        if len(region) != len(cs):
            return None
        for r, c, n in zip(region, cs, self.layout.shape):
            if r.start % c or r.stop % c or r.stop > n or r.stop <= r.start:
                return None
        return grid_coords([(r.start // c, r.stop // c) for r, c in zip(region, cs)])

    def _decode_pieces(self, raws: list[Any], coords: np.ndarray, grid: list[int], spans: list[tuple[int, int]]) -> Iterator[np.ndarray]:
        lay = self.layout
        per_row = math.prod(grid[1:])
        into = lay.disk_dtype == lay.dtype and self._is_blosc()
        for a, b in spans:
            lo, hi = a * per_row, b * per_row
            flat = scratch((hi - lo) * math.prod(lay.chunks), lay.dtype)
            slots = flat.reshape(hi - lo, -1)
            decoded = 0
            for j in range(lo, hi):
                if raws[j] is None:
                    slots[j - lo] = lay.fill
                    continue
                decoded += 1
                self._decode_into(raws[j], tuple(int(c) for c in coords[j]), slots[j - lo], direct=into)
            _count("chunks_decoded", decoded)
            yield flat.reshape(b - a, *grid[1:], *lay.chunks)

    @property
    def streams(self) -> bool:
        """Whether a region's chunks are decoded as they arrive (unsharded, on a store whose requests wait)."""
        return self.layout.per_shard is None and self.objects.streams

    def _chunks_as_they_come(self, coords: np.ndarray) -> Any:
        """``(j, decoded chunk or None)`` for every row of *coords*, in the order they arrive where that streams."""
        if not self.streams or len(coords) < 2:
            yield from enumerate(self.read_chunks(coords))
            return
        keys = [self.key(c) for c in coords.tolist()]
        n = 0
        for j, raw in self.objects.stream_whole(keys):
            if raw is None:
                yield j, None
                continue
            n += 1
            yield j, self._decode(raw, tuple(int(c) for c in coords[j]))
        _count("direct_reads")
        _count("chunks_decoded", n)

    # -- consumers ----------------------------------------------------------------

    def read_region(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        """The array's values in *region* (non-empty ``slice(start, stop)`` per axis, inside the array)."""
        lay = self.layout
        cs = lay.chunks
        shape = tuple(r.stop - r.start for r in region)
        if out is None:
            out = np.empty(shape, dtype=lay.dtype)
        ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, cs)]
        coords = np.array(list(np.ndindex(*[len(r) for r in ranges])), dtype=np.int64).reshape(-1, len(cs))
        coords += np.array([r.start for r in ranges], dtype=np.int64)
        listed = coords.tolist()
        for j, chunk in self._chunks_as_they_come(coords):
            cc = listed[j]
            src, dst = [], []
            for ax, c in enumerate(cc):
                lo = c * cs[ax]
                a = max(lo, region[ax].start)
                b = min(lo + cs[ax], region[ax].stop)
                src.append(slice(a - lo, b - lo))
                dst.append(slice(a - region[ax].start, b - region[ax].start))
            if chunk is None:
                out[tuple(dst)] = lay.fill
            else:
                out[tuple(dst)] = chunk[tuple(src)]
        return out

    def read_ranges(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Elements ``[starts[i], stops[i])`` of a 1-D array, concatenated (ranges clipped to the array)."""
        lay = self.layout
        n = lay.shape[0]
        starts = np.minimum(np.asarray(starts, dtype=np.int64), n)
        stops = np.minimum(np.asarray(stops, dtype=np.int64), n)
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        if not len(starts):
            return np.empty(0, dtype=lay.dtype)
        c = lay.chunks[0]
        cid, lo, hi = split_by_chunk(starts, stops, c)
        uniq, inv = np.unique(cid, return_inverse=True)
        if self._blosc_into() and (self._mapper is None or len(uniq) <= 16):
            return self._ranges_into(cid, lo, hi, uniq, inv)
        chunks = self.read_chunks(uniq[:, None])
        fill = None
        parts = []
        base = (lo - cid * c).tolist()
        top = (hi - cid * c).tolist()
        for j, k in enumerate(inv.tolist()):
            ch = chunks[k]
            if ch is None:
                if fill is None:
                    fill = np.full(c, lay.fill, dtype=lay.disk_dtype)
                ch = fill
            parts.append(ch[base[j] : top[j]])
        out = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        return out.astype(lay.dtype, copy=False)

    def _is_blosc(self) -> bool:
        """Whether the one codec is blosc (anndata's default for Zarr v2)."""
        from numcodecs import blosc

        return len(self.layout.decoders) == 1 and self.layout.decoders[0] is blosc.decompress

    def _blosc_into(self) -> bool:
        """Whether chunks decode straight into a result: blosc, stored in the result's dtype, unsharded."""
        lay = self.layout
        return lay.per_shard is None and lay.disk_dtype == lay.dtype and self._is_blosc()

    def _ranges_into(
        self, cid: np.ndarray, lo: np.ndarray, hi: np.ndarray, uniq: np.ndarray, inv: np.ndarray
    ) -> np.ndarray:
        """:meth:`read_ranges` of a :meth:`_blosc_into` array: whole chunks decoded into the result.

        A chunk wholly inside the result is decompressed in place (no decoded
        copy, no join: that copy cost a fifth of the read); the partial chunks
        at the ends go through :meth:`_decode`.
        """
        lay = self.layout
        c = lay.chunks[0]
        raws = self.objects.whole([self.key((u,)) for u in uniq.tolist()])
        lens = (hi - lo).tolist()
        base = (lo - cid * c).tolist()
        out = np.empty(sum(lens), dtype=lay.dtype)
        pos = 0
        decoded = 0
        parts: dict[int, np.ndarray] = {}  # chunks read in part, decoded once
        for j, k in enumerate(inv.tolist()):
            raw, n, dst = raws[k], lens[j], out[pos : pos + lens[j]]
            pos += n
            if raw is None:
                dst[:] = lay.fill
                continue
            coords = (int(uniq[k]),)
            if n < c:
                if k not in parts:
                    parts[k] = self._decode(raw, coords)
                    decoded += 1
                dst[:] = parts[k][base[j] : base[j] + n]
                continue
            decoded += 1
            self._decode_into(raw, coords, dst, direct=True)
        _count("direct_reads")
        _count("chunks_decoded", decoded)
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted, unique) of an N-D array: every column, as ``(len(rows), *shape[1:])``."""
        lay = self.layout
        rows = np.asarray(rows, dtype=np.int64)
        rest = lay.shape[1:]
        out = np.empty((len(rows), *rest), dtype=lay.dtype)
        if not len(rows):
            return out
        rc = lay.chunks[0]
        rchunk = rows // rc
        ruq = np.unique(rchunk)
        other = [range(-(-s // c)) for s, c in zip(rest, lay.chunks[1:])]
        other_coords = list(np.ndindex(*[len(r) for r in other])) if rest else [()]
        coords = np.array(
            [(int(r), *oc) for r in ruq.tolist() for oc in other_coords], dtype=np.int64
        ).reshape(-1, len(lay.chunks))
        chunks = self.read_chunks(coords)
        per_row_chunk = len(other_coords)
        # rows are sorted: those of one row chunk are a contiguous slice of out.
        bounds = [*np.searchsorted(rchunk, ruq, side="left").tolist(), len(rows)]
        for i, r in enumerate(ruq.tolist()):
            a, b = bounds[i], bounds[i + 1]
            local = rows[a:b] - r * rc
            dst = out[a:b]
            for j, oc in enumerate(other_coords):
                ch = chunks[i * per_row_chunk + j]
                region = tuple(slice(o * c, min((o + 1) * c, s)) for o, c, s in zip(oc, lay.chunks[1:], rest))
                if ch is None:
                    dst[(slice(None), *region)] = lay.fill
                else:
                    trim = tuple(slice(0, sl.stop - sl.start) for sl in region)
                    dst[(slice(None), *region)] = ch[(local, *trim)]
        return out


def _blosc_sizes(raw: Any) -> tuple[int, int]:
    """A blosc chunk's decoded and stored sizes, from its 16-byte header (``(-1, -1)``: too short for one)."""
    if len(raw) < 16:
        return -1, -1
    head = bytes(raw[:16])
    return int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")


def _problem(exc: BaseException) -> str:
    from dask_loom.zarr._meta import _problem as describe

    return describe(exc)


def objects_for_store(store: Any) -> _Objects:
    """Byte access to the objects of a dask_loom store (:mod:`dask_loom.storage`).

    A local directory is read with ``pread`` (shard indexes cached and
    re-validated by file identity); an object store with concurrent ranged
    requests (indexes cached for the reader's life); other stores (memory)
    with ranged reads and no index cache, as their shards may change under
    the reader.
    """
    from dask_loom.storage._objectstore import ObjectStore
    from dask_loom.storage._stores import LocalStore
    from dask_loom.zarr._meta import store_label

    label = store_label(store)
    if type(store) is LocalStore:
        return _LocalDir(str(store.path), label)
    remote = isinstance(store, ObjectStore)
    objects = _StoreObjects(store, label, remote=remote, cache_indexes=remote)
    from dask_loom.blocks._readahead import store_waits

    objects.streams = store_waits(store)
    return objects


def _objects_for(store: Any) -> _Objects:
    """Byte access for an :class:`~dask_loom.anndata.AnnStore` holding a zarr store."""
    spec = store.spec
    if store.kind == "zarr" and spec.is_local:
        return _LocalDir(spec.url, spec.name)
    return _StoreObjects(store.root().store, spec.name, remote=not spec.is_local)


def chunk_reader(
    store: Any,
    path: str,
    array: Callable[[], Any],
    *,
    mapper: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]] | None = None,
) -> ZarrChunkReader | None:
    """The per-process :class:`ZarrChunkReader` of array *path* of an AnnData *store*, or ``None``.

    ``None`` when the array's layout needs zarr-python (or the direct path is
    switched off with ``dask_loom.anndata-zarr-direct``).
    """
    if not get_config("anndata-zarr-direct"):
        return None
    key = (store.spec.url, path)
    reader = _readers.get(key)
    if reader is None:
        arr = array()
        lay = layout_of(arr)
        if lay is None:
            _count("fallback_arrays")
            reader = _NO_READER
        else:
            with _lock:
                objects = next(
                    (
                        r.objects
                        for (url, _), r in _readers.items()
                        if url == store.spec.url and r is not _NO_READER
                    ),
                    None,
                )
            objects = objects or _objects_for(store)
            reader = ZarrChunkReader(objects, arr.path, lay, arr.metadata.encode_chunk_key, mapper=mapper)
        with _lock:
            reader = _readers.setdefault(key, reader)
    return None if reader is _NO_READER else reader


def forget(url: str) -> None:
    """Drop this process's readers (and cached shard indexes) of store *url*."""
    with _lock:
        for key in [k for k in _readers if k[0] == url]:
            del _readers[key]
