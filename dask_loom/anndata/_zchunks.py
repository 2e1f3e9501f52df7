"""Zarr chunks read by byte range and decoded outside zarr-python's pipeline.

Random rows of a sharded CSR matrix touch one or two small inner chunks of
``data`` and of ``indices`` each.  Through zarr-python every such chunk costs
a shard-index lookup and a trip through the async codec pipeline (about
1 ms), which made a 256-row batch cost ~300 ms of CPU.  Here, as on the HDF5
path (:mod:`dask_loom.hdf5._source`), zarr only describes the array; the
needed chunks are located through the shard indexes (read once per shard and
cached, re-read when a local shard file changes), fetched with one coalesced
set of byte-range reads (``pread`` for local directories, concurrent range
requests through the zarr store otherwise: object stores, zip files), and
decoded with numcodecs' implementations of the array's codecs in the calling
threads.

Handled: zarr v2 (any numcodecs compressor, no filters) and v3 (``bytes``
plus bytes-to-bytes codecs numcodecs provides, optionally inside
``sharding_indexed`` with a ``bytes``/``crc32c`` index at either end) arrays
of numeric dtypes on a regular grid.  Anything else returns ``None`` from
:func:`chunk_reader` and is read through zarr as before.
"""

from __future__ import annotations

import abc
import asyncio
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom._config import get_config
from dask_loom.errors import CorruptChunkError, StoreError

__all__ = ["STATS", "ChunkLayout", "ZarrChunkReader", "chunk_reader", "forget", "layout_of", "split_by_chunk"]

# Counters the tests use to prove which path served a read (per process).
STATS = {"direct_reads": 0, "chunks_decoded": 0, "index_reads": 0, "fallback_arrays": 0}


def split_by_chunk(starts: np.ndarray, stops: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut element ranges ``[starts[i], stops[i])`` of a 1-D array at chunk boundaries (chunk size *c*).

    Returns, for every piece in order, its chunk id and its ``[lo, hi)`` in
    array coordinates (non-empty ranges assumed).

    Examples
    --------
    >>> split_by_chunk(np.array([1, 8]), np.array([6, 9]), 4)
    (array([0, 1, 2]), array([1, 4, 8]), array([4, 6, 9]))
    """
    first = starts // c
    counts = (stops - 1) // c - first + 1
    if (counts == 1).all():
        return first, starts, stops
    rep = np.repeat(np.arange(len(starts)), counts)
    step = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cid = first[rep] + step
    return cid, np.maximum(starts[rep], cid * c), np.minimum(stops[rep], (cid + 1) * c)


_stats_lock = threading.Lock()

_EMPTY = np.uint64(2**64 - 1)  # offset and size of an absent inner chunk
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


def _count(key: str, n: int = 1) -> None:
    with _stats_lock:
        STATS[key] += n


# -- what an array looks like on disk ------------------------------------------------


_V3_CODECS = {"blosc": "Blosc", "zstd": "Zstd", "gzip": "GZip", "crc32c": "CRC32C"}


def _v3_decoder(codec: dict[str, Any]) -> Any:
    import numcodecs

    name = codec.get("name", "")
    config = dict(codec.get("configuration") or {})
    if name in _V3_CODECS:
        # Decoding needs none of the options (they describe how to encode).
        return getattr(numcodecs, _V3_CODECS[name])()
    if name.startswith("numcodecs."):
        return numcodecs.get_codec({"id": name.split(".", 1)[1], **config})
    raise ValueError(f"codec {name!r}")


def _bytes_order(codec: dict[str, Any]) -> str:
    if codec.get("name") != "bytes":
        raise ValueError(f"array-to-bytes codec {codec.get('name')!r}")
    endian = (codec.get("configuration") or {}).get("endian", "little")
    return "<" if endian == "little" else ">"


@dataclass(frozen=True)
class ChunkLayout:
    """Storage facts of one zarr array, enough to read its chunks without zarr.

    ``chunks`` is the decode unit (the inner chunk of a sharded array),
    ``per_shard`` the inner-chunk grid of one shard (``None`` when unsharded).
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    per_shard: tuple[int, ...] | None
    disk_dtype: np.dtype
    dtype: np.dtype
    decoders: tuple[Any, ...]
    fill: Any
    index_at_end: bool = True
    index_crc: bool = False
    index_order: str = "<"

    @property
    def index_nbytes(self) -> int:
        assert self.per_shard is not None
        return 16 * math.prod(self.per_shard) + (4 if self.index_crc else 0)

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunks) * self.disk_dtype.itemsize


def layout_of(arr: Any) -> ChunkLayout | None:
    """The :class:`ChunkLayout` of a ``zarr.Array``, or ``None`` if zarr must read it."""
    try:
        return _layout(arr)
    except (ValueError, TypeError, KeyError, ImportError):
        return None


def _layout(arr: Any) -> ChunkLayout:
    from dask_loom.zarr._source import check_safe_codecs

    meta = arr.metadata.to_dict()
    check_safe_codecs(meta, f"array {arr.path or '/'!r}")  # numcodecs.get_codec below would build any codec
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf" or not arr.shape:
        raise ValueError("dtype")
    fill = arr.metadata.fill_value
    fill = 0 if fill is None else fill
    if meta.get("zarr_format") == 2:
        import numcodecs

        if meta.get("filters"):
            raise ValueError("filters")
        chunks = tuple(int(c) for c in meta["chunks"])
        if len(arr.shape) > 1 and meta.get("order", "C") != "C":
            raise ValueError("order")
        comp = meta.get("compressor")
        decoders = (numcodecs.get_codec(dict(comp)),) if comp else ()
        disk = np.dtype(meta["dtype"])
        return ChunkLayout(tuple(arr.shape), chunks, None, disk, dtype, decoders, fill)
    grid = meta.get("chunk_grid") or {}
    if grid.get("name") != "regular" or meta.get("storage_transformers"):
        raise ValueError("grid")
    outer = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
    codecs = list(meta.get("codecs") or [])
    if not codecs:
        raise ValueError("codecs")
    if codecs[0].get("name") == "sharding_indexed":
        if len(codecs) != 1:
            raise ValueError("codecs after sharding")
        conf = codecs[0]["configuration"]
        chunks = tuple(int(c) for c in conf["chunk_shape"])
        if any(o % c for o, c in zip(outer, chunks)):
            raise ValueError("shard not a multiple of chunks")
        per_shard: tuple[int, ...] | None = tuple(o // c for o, c in zip(outer, chunks))
        inner = list(conf["codecs"])
        index_codecs = list(conf.get("index_codecs") or [])
        index_order = _bytes_order(index_codecs[0])
        names = [c.get("name") for c in index_codecs[1:]]
        if names not in ([], ["crc32c"]):
            raise ValueError("index codecs")
        index_crc = names == ["crc32c"]
        at_end = conf.get("index_location", "end") == "end"
    else:
        chunks, per_shard, inner = outer, None, codecs
        index_order, index_crc, at_end = "<", False, True
    order = _bytes_order(inner[0])
    decoders = tuple(_v3_decoder(c) for c in inner[1:])
    disk = dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype
    return ChunkLayout(
        tuple(arr.shape), chunks, per_shard, disk, dtype, decoders, fill,
        index_at_end=at_end, index_crc=index_crc, index_order=index_order,
    )


# -- fetching bytes -------------------------------------------------------------------


def _coalesce(spans: list[tuple[int, int, int]], gap: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Group byte spans ``(start, stop, slot)`` into runs no further apart than *gap*.

    Returns ``(run_start, run_stop, members)``.  Plain Python: a request
    usually holds a few spans per object, where numpy's call overhead dominates.

    Examples
    --------
    >>> _coalesce([(100, 150, 1), (0, 50, 0), (5000, 5010, 2)], 64)
    [(0, 150, [(0, 50, 0), (100, 150, 1)]), (5000, 5010, [(5000, 5010, 2)])]
    """
    runs: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    for span in sorted(spans):
        if runs and span[0] - runs[-1][1] <= gap:
            r0, r1, members = runs[-1]
            members.append(span)
            runs[-1] = (r0, max(r1, span[1]), members)
        else:
            runs.append((span[0], span[1], [span]))
    return runs


def _spans(entries: list[tuple[int, int] | None], ids: list[int]) -> list[tuple[int, int, int]]:
    """Byte spans ``(start, stop, slot)`` of the present inner chunks *ids* of one shard."""
    out = []
    for slot, i in enumerate(ids):
        e = entries[i]
        if e is not None:
            out.append((e[0], e[0] + e[1], slot))
    return out


class _Objects(abc.ABC):
    """Byte ranges of the objects (chunks, shards) of one zarr store."""

    gap = 1 << 16

    def __init__(self, label: str) -> None:
        self.label = label
        # shard key -> (identity, [(offset, nbytes) or None per inner chunk]) or None (absent shard)
        self.indexes: dict[str, tuple[Any, list[tuple[int, int] | None]] | None] = {}

    @abc.abstractmethod
    def whole(self, keys: list[str]) -> list[Any]:
        """Whole objects (``None`` where absent)."""

    @abc.abstractmethod
    def shard_chunks(self, lay: ChunkLayout, groups: dict[str, list[int]]) -> dict[str, list[Any]]:
        """Raw inner chunks ``groups[key]`` (linear ids) of each shard (``None`` where absent)."""

    def _index(self, lay: ChunkLayout, key: str, raw: Any, size: int | None = None) -> list[tuple[int, int] | None]:
        """Parse (and check) a shard index read from object *key*: ``(offset, nbytes)`` or ``None`` per inner chunk."""
        _count("index_reads")
        n = math.prod(lay.per_shard or ())
        where = f"{self.label}: shard {key!r}"
        if raw is None or len(raw) != lay.index_nbytes:
            got = 0 if raw is None else len(raw)
            raise CorruptChunkError(f"{where}: shard index holds {got} bytes, expected {lay.index_nbytes}")
        if lay.index_crc:
            import numcodecs

            try:
                raw = numcodecs.CRC32C().decode(raw)
            except (RuntimeError, ValueError) as exc:
                raise CorruptChunkError(f"{where}: shard index checksum mismatch ({exc})") from None
        index = np.frombuffer(raw, dtype=f"{lay.index_order}u8").reshape(n, 2).astype(np.uint64)
        present = index[:, 0] != _EMPTY
        if size is not None and present.any():
            ends = index[present, 0] + index[present, 1]
            if int(ends.max()) > size:
                raise CorruptChunkError(f"{where}: shard index points past the end of the shard ({int(ends.max())} > {size} bytes)")
        empty = int(_EMPTY)
        return [None if o == empty else (o, n) for o, n in index.tolist()]


class _LocalDir(_Objects):
    """A zarr directory on the local disk: ``pread``, one open per shard and request."""

    gap = 1 << 12  # a read call costs about as much as copying 4 KiB more

    def __init__(self, root: str, label: str) -> None:
        super().__init__(label)
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def whole(self, keys: list[str]) -> list[Any]:
        out: list[Any] = []
        for key in keys:
            try:
                with open(self._path(key), "rb") as fh:
                    out.append(fh.read())
            except FileNotFoundError:
                out.append(None)
        return out

    def shard_chunks(self, lay: ChunkLayout, groups: dict[str, list[int]]) -> dict[str, list[Any]]:
        return {key: self._one_shard(lay, key, ids) for key, ids in groups.items()}

    def _one_shard(self, lay: ChunkLayout, key: str, ids: list[int]) -> list[Any]:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return [None] * len(ids)
        try:
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self.indexes.get(key)
            if cached is None or cached[0] != ident:
                # First use, or the shard was rewritten since its index was read.
                n = lay.index_nbytes
                pos = st.st_size - n if lay.index_at_end else 0
                raw = os.pread(fd, n, pos) if pos >= 0 else b""
                cached = (ident, self._index(lay, key, raw, st.st_size))
                self.indexes[key] = cached
            out: list[Any] = [None] * len(ids)
            for r0, r1, members in _coalesce(_spans(cached[1], ids), self.gap):
                buf = os.pread(fd, r1 - r0, r0)
                if len(buf) < r1 - r0:
                    raise CorruptChunkError(f"{self.label}: shard {key!r} is truncated (needed bytes {r0}..{r1})")
                mv = memoryview(buf)
                for a, b, slot in members:
                    out[slot] = mv[a - r0 : b - r0]
            return out
        finally:
            os.close(fd)


class _StoreObjects(_Objects):
    """Any zarr store (object stores, zip files): concurrent range requests, batched per phase."""

    def __init__(self, store: Any, label: str, *, remote: bool) -> None:
        super().__init__(label)
        self.store = store
        self.gap = 1 << 20 if remote else 1 << 16
        self.index_lock = threading.Lock()

    def _get_many(self, reqs: list[tuple[str, Any]]) -> list[Any]:
        """``store.get(key, byte_range=...)`` for every request, concurrently, with retries."""
        import time

        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        proto = default_buffer_prototype()
        limit = int(zarr.config.get("async.concurrency") or 10)
        store = self.store

        async def one(sem: asyncio.Semaphore, key: str, rng: Any) -> Any:
            async with sem:
                buf = await store.get(key, prototype=proto, byte_range=rng)
                return None if buf is None else buf.to_bytes()

        async def all_() -> list[Any]:
            sem = asyncio.Semaphore(limit)
            return list(await asyncio.gather(*(one(sem, k, r) for k, r in reqs)))

        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))
        for attempt in range(retries + 1):
            try:
                return sync(all_())
            except (OSError, TimeoutError) as exc:
                # Missing objects come back as None; refused credentials are not transient.
                if isinstance(exc, (FileNotFoundError, PermissionError)) or attempt == retries:
                    raise StoreError(f"{self.label}: range request failed after {attempt + 1} attempts: {exc}") from exc
                time.sleep(backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def whole(self, keys: list[str]) -> list[Any]:
        return self._get_many([(k, None) for k in keys])

    def shard_chunks(self, lay: ChunkLayout, groups: dict[str, list[int]]) -> dict[str, list[Any]]:
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        need = [k for k in groups if k not in self.indexes]
        if need:
            n = lay.index_nbytes
            rng = SuffixByteRequest(n) if lay.index_at_end else RangeByteRequest(0, n)
            raws = self._get_many([(k, rng) for k in need])
            parsed = {k: None if raw is None else ("remote", self._index(lay, k, raw)) for k, raw in zip(need, raws)}
            with self.index_lock:
                self.indexes.update(parsed)
        out: dict[str, list[Any]] = {}
        reqs: list[tuple[str, Any]] = []
        where: list[tuple[str, int, int, list[tuple[int, int, int]]]] = []
        for key, ids in groups.items():
            out[key] = [None] * len(ids)
            cached = self.indexes.get(key)
            if cached is None:
                continue
            for r0, r1, members in _coalesce(_spans(cached[1], ids), self.gap):
                reqs.append((key, RangeByteRequest(r0, r1)))
                where.append((key, r0, r1, members))
        blobs = self._get_many(reqs)
        for (key, r0, r1, members), blob in zip(where, blobs):
            if blob is None or len(blob) < r1 - r0:
                raise CorruptChunkError(f"{self.label}: shard {key!r} is truncated or vanished (needed bytes {r0}..{r1})")
            mv = memoryview(blob)
            for a, b, slot in members:
                out[key][slot] = mv[a - r0 : b - r0]
        return out


# -- the reader -----------------------------------------------------------------------


class ZarrChunkReader:
    """Decoded chunks of one zarr array of an AnnData store, and 1-D ranges / rows of it.

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
    """

    def __init__(self, objects: _Objects, path: str, layout: ChunkLayout, encode_key: Callable[[tuple[int, ...]], str]) -> None:
        self.objects = objects
        self.path = path
        self.layout = layout
        self._encode = encode_key
        self.label = f"{objects.label}: array {path!r}"

    def key(self, coords: Sequence[int]) -> str:
        k = self._encode(tuple(int(c) for c in coords))
        return f"{self.path}/{k}" if self.path else k

    def _decode(self, raw: Any, coords: tuple[int, ...]) -> np.ndarray:
        from numcodecs.compat import ensure_contiguous_ndarray

        lay = self.layout
        data: Any = raw
        try:
            for codec in reversed(lay.decoders):
                data = codec.decode(data)
            if isinstance(data, (bytes, bytearray, memoryview)):
                buf = np.frombuffer(data, dtype=np.uint8)
            else:
                buf = ensure_contiguous_ndarray(data).reshape(-1).view(np.uint8)
        except Exception as exc:
            raise CorruptChunkError(f"{self.label}: chunk {coords} does not decode ({type(exc).__name__}: {exc})") from None
        if buf.nbytes != lay.chunk_nbytes:
            raise CorruptChunkError(f"{self.label}: chunk {coords} decoded to {buf.nbytes} bytes, expected {lay.chunk_nbytes}")
        return buf.view(lay.disk_dtype).reshape(lay.chunks)

    def read_chunks(self, coords: np.ndarray) -> list[np.ndarray | None]:
        """Decoded chunks at grid *coords* (``(k, ndim)``; inner chunks when sharded); ``None`` = fill."""
        lay = self.layout
        coords = np.asarray(coords, dtype=np.int64).reshape(len(coords), len(lay.chunks))
        if not len(coords):
            return []
        if lay.per_shard is None:
            raws = self.objects.whole([self.key(c) for c in coords.tolist()])
        else:
            per = np.array(lay.per_shard, dtype=np.int64)
            shards = [tuple(sc) for sc in (coords // per).tolist()]
            linear = np.ravel_multi_index(tuple((coords % per).T), lay.per_shard).tolist()
            groups: dict[tuple[int, ...], list[int]] = {}
            for j, sc in enumerate(shards):
                groups.setdefault(sc, []).append(j)
            keys = {sc: self.key(sc) for sc in groups}
            got = self.objects.shard_chunks(lay, {keys[sc]: [linear[j] for j in js] for sc, js in groups.items()})
            raws = [None] * len(coords)
            for sc, js in groups.items():
                for j, raw in zip(js, got[keys[sc]]):
                    raws[j] = raw
        present = [j for j, r in enumerate(raws) if r is not None]
        tuples = [tuple(c) for c in coords.tolist()]
        decode = self._decode
        if len(present) > 16 and sum(len(raws[j]) for j in present) > (1 << 18):
            from dask_loom.anndata._read import map_threads

            decoded = map_threads(lambda j: decode(raws[j], tuples[j]), present)
        else:
            decoded = [decode(raws[j], tuples[j]) for j in present]
        out: list[np.ndarray | None] = [None] * len(coords)
        for j, d in zip(present, decoded):
            out[j] = d
        _count("direct_reads")
        _count("chunks_decoded", len(present))
        return out

    # -- consumers ----------------------------------------------------------------

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
        coords = np.array([(int(r), *oc) for r in ruq.tolist() for oc in other_coords], dtype=np.int64).reshape(-1, len(lay.chunks))
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


def _objects_for(store: Any) -> _Objects:
    """Byte access for an :class:`~dask_loom.anndata.AnnStore` holding a zarr store."""
    spec = store.spec
    if store.kind == "zarr" and spec.is_local:
        return _LocalDir(spec.url, spec.name)
    return _StoreObjects(store.root().store, spec.name, remote=not spec.is_local)


def chunk_reader(store: Any, path: str, array: Callable[[], Any]) -> ZarrChunkReader | None:
    """The per-process :class:`ZarrChunkReader` of array *path* of *store*, or ``None``.

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
                    (r.objects for (url, _), r in _readers.items() if url == store.spec.url and r is not _NO_READER),
                    None,
                )
            objects = objects or _objects_for(store)
            reader = ZarrChunkReader(objects, arr.path, lay, arr.metadata.encode_chunk_key)
        with _lock:
            reader = _readers.setdefault(key, reader)
    return None if reader is _NO_READER else reader


def forget(url: str) -> None:
    """Drop this process's readers (and cached shard indexes) of store *url*."""
    with _lock:
        for key in [k for k in _readers if k[0] == url]:
            del _readers[key]
