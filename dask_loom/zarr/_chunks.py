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

import abc
import asyncio
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom._config import config_bytes, get_config
from dask_loom.errors import CorruptChunkError, StoreError

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

# Counters the tests use to prove which path served a read (per process).
STATS = {
    "direct_reads": 0,
    "chunks_decoded": 0,
    "index_reads": 0,
    "fallback_arrays": 0,
    "range_requests": 0,
    "short_answers": 0,
}


def split_by_chunk(
    starts: np.ndarray, stops: np.ndarray, c: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _fast_decode(codec: Any) -> Callable[[Any], Any]:
    """The decode function of a numcodecs codec.

    Blosc's module-level ``decompress`` skips ``Blosc.decode``'s buffer
    checks: about 4x less overhead on a 16 KiB chunk.
    """
    if type(codec).__name__ == "Blosc":
        from numcodecs import blosc

        return blosc.decompress
    return codec.decode


def _v3_decoder(codec: dict[str, Any]) -> Callable[[Any], Any]:
    import numcodecs

    name = codec.get("name", "")
    config = dict(codec.get("configuration") or {})
    if name in _V3_CODECS:
        # Decoding needs none of the options (they describe how to encode).
        return _fast_decode(getattr(numcodecs, _V3_CODECS[name])())
    if name.startswith("numcodecs."):
        return _fast_decode(numcodecs.get_codec({"id": name.split(".", 1)[1], **config}))
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
    decoders: tuple[Callable[[Any], Any], ...]
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
    if not isinstance(fill, (int, float, bool, np.number, np.bool_)):
        raise ValueError("fill value")
    if meta.get("zarr_format") == 2:
        import numcodecs

        if meta.get("filters"):
            raise ValueError("filters")
        chunks = tuple(int(c) for c in meta["chunks"])
        if len(arr.shape) > 1 and meta.get("order", "C") != "C":
            raise ValueError("order")
        comp = meta.get("compressor")
        decoders = (_fast_decode(numcodecs.get_codec(dict(comp))),) if comp else ()
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
        tuple(arr.shape),
        chunks,
        per_shard,
        disk,
        dtype,
        decoders,
        fill,
        index_at_end=at_end,
        index_crc=index_crc,
        index_order=index_order,
    )


# -- fetching bytes -------------------------------------------------------------------


Span = tuple[int, int, int]  # (start, stop, slot)


def _coalesce(spans: list[Span], gap: int, max_bytes: int | None = None) -> list[tuple[int, int, list[Span]]]:
    """Group byte spans ``(start, stop, slot)`` into runs no further apart than *gap*, each at most *max_bytes* long.

    Returns ``(run_start, run_stop, members)``.  A single span longer than
    *max_bytes* is a run of its own.  Plain Python: a request usually holds a
    few spans per object, where numpy's call overhead dominates.

    Examples
    --------
    >>> _coalesce([(100, 150, 1), (0, 50, 0), (5000, 5010, 2)], 64)
    [(0, 150, [(0, 50, 0), (100, 150, 1)]), (5000, 5010, [(5000, 5010, 2)])]
    >>> [r[:2] for r in _coalesce([(0, 40, 0), (40, 80, 1), (80, 120, 2)], 0, 100)]
    [(0, 80), (80, 120)]
    """
    runs: list[tuple[int, int, list[Span]]] = []
    for span in sorted(spans):
        if (
            runs
            and span[0] - runs[-1][1] <= gap
            and (max_bytes is None or max(runs[-1][1], span[1]) - runs[-1][0] <= max_bytes)
        ):
            r0, r1, members = runs[-1]
            members.append(span)
            runs[-1] = (r0, max(r1, span[1]), members)
        else:
            runs.append((span[0], span[1], [span]))
    return runs


def _spans(entries: list[tuple[int, int] | None], ids: list[int]) -> list[Span]:
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

    def _index(
        self, lay: ChunkLayout, key: str, raw: Any, size: int | None = None
    ) -> list[tuple[int, int] | None]:
        """Parse (and check) a shard index read from object *key*: ``(offset, nbytes)`` or ``None`` per inner chunk."""
        _count("index_reads")
        n = math.prod(lay.per_shard or ())
        where = f"{self.label}: shard {key!r}"
        if raw is None or len(raw) != lay.index_nbytes:
            got = 0 if raw is None else len(raw)
            rng = f"the last {lay.index_nbytes} bytes" if lay.index_at_end else f"bytes 0..{lay.index_nbytes}"
            raise CorruptChunkError(
                f"{where}: shard index ({rng}) holds {got} bytes, expected {lay.index_nbytes}: the shard is truncated"
            )
        if lay.index_crc:
            import numcodecs

            try:
                raw = numcodecs.CRC32C().decode(raw)
            except (RuntimeError, ValueError) as exc:
                raise CorruptChunkError(f"{where}: shard index checksum mismatch ({exc})") from None
        index = np.frombuffer(raw, dtype=f"{lay.index_order}u8").reshape(n, 2).astype(np.uint64)
        present = index[:, 0] != _EMPTY
        if present.any():
            starts, ends = index[present, 0], index[present, 0] + index[present, 1]
            if (ends < starts).any():  # offset + size wrapped around 2**64
                raise CorruptChunkError(
                    f"{where}: shard index holds an impossible byte range (offset + size overflows)"
                )
            if size is not None and int(ends.max()) > size:
                raise CorruptChunkError(
                    f"{where}: shard index points outside the object (bytes up to {int(ends.max())} of a {size}-byte shard)"
                )
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
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
        return out

    def shard_chunks(self, lay: ChunkLayout, groups: dict[str, list[int]]) -> dict[str, list[Any]]:
        return {key: self._one_shard(lay, key, ids) for key, ids in groups.items()}

    def _one_shard(self, lay: ChunkLayout, key: str, ids: list[int]) -> list[Any]:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
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
                    raise CorruptChunkError(
                        f"{self.label}: shard {key!r} is truncated (bytes {r0}..{r1} requested, {len(buf)} read)"
                    )
                mv = memoryview(buf)
                for a, b, slot in members:
                    out[slot] = mv[a - r0 : b - r0]
            return out
        finally:
            os.close(fd)


class _StoreObjects(_Objects):
    """Any zarr store (object stores, memory, zip files): concurrent range requests, batched per phase.

    Parameters
    ----------
    store
        A zarr store (``await store.get(key, prototype, byte_range)``).
    label
        The store's name, for messages.
    remote
        An object store: holes up to ``dask_loom.coalesce-gap`` are read
        through (a request costs a round trip), else up to 64 KiB.
    cache_indexes
        Keep shard indexes between reads (they are not re-validated: only for
        stores whose shards do not change under the reader).
    """

    def __init__(self, store: Any, label: str, *, remote: bool, cache_indexes: bool = True) -> None:
        super().__init__(label)
        self.store = store
        self.remote = remote
        self.cache_indexes = cache_indexes
        self.gap = config_bytes("coalesce-gap") if remote else 1 << 16
        self.max_bytes = max(1, config_bytes("coalesce-bytes"))
        self.index_lock = threading.Lock()

    def _get_many(self, reqs: list[tuple[str, Any, int | None]]) -> list[Any]:
        """``store.get(key, byte_range=...)`` for every ``(key, range, expected length)``, concurrently.

        Missing objects come back as ``None``.  An answer shorter than the
        length it was asked for is asked again (a transient fault of a proxy
        or cache), and refused when it stays short.  Transient store errors
        are retried by the store (dask_loom's object store), or here.
        """
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        proto = default_buffer_prototype()
        limit = int(zarr.config.get("async.concurrency") or 10)
        store = self.store
        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))

        async def one(sem: asyncio.Semaphore, key: str, rng: Any, expect: int | None) -> Any:
            got = 0
            for attempt in range(retries + 1):
                async with sem:
                    _count("range_requests")
                    buf = await store.get(key, prototype=proto, byte_range=rng)
                if buf is None:
                    return None
                data = buf.to_bytes()
                got = len(data)
                if expect is None or got >= expect:
                    return data
                _count("short_answers")
                if attempt < min(retries, 2):  # short twice more: not transient
                    await asyncio.sleep(backoff * 2**attempt)
                    continue
                break
            raise CorruptChunkError(
                f"{self.label}: object {key!r}, bytes {_fmt(rng)}: {got} bytes came back, expected {expect} "
                "(the answer was cut short, or the shard index points outside the object)"
            )

        async def all_() -> list[Any]:
            sem = asyncio.Semaphore(limit)
            # Let every request finish (no orphaned requests on the loop), then raise the first error.
            got = await asyncio.gather(*(one(sem, k, r, e) for k, r, e in reqs), return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException):
                    raise g
            return list(got)

        for attempt in range(retries + 1):
            try:
                return sync(all_())
            except (CorruptChunkError, StoreError):
                raise
            except (OSError, TimeoutError) as exc:
                # Refused credentials and missing files are not transient.
                if isinstance(exc, (FileNotFoundError, PermissionError)) or attempt == retries:
                    raise StoreError(
                        f"{self.label}: range request failed after {attempt + 1} attempts: {exc}"
                    ) from exc
                time.sleep(backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def whole(self, keys: list[str]) -> list[Any]:
        return self._get_many([(k, None, None) for k in keys])

    def _read_indexes(
        self, lay: ChunkLayout, keys: list[str]
    ) -> tuple[dict[str, Any], dict[str, tuple[int, bytes]]]:
        """Shard indexes of *keys* (``None`` for absent shards), and the tail bytes read with them.

        On an object store that tells an object's size with a suffix read
        (S3), the index of a shard whose index is at its end is read with the
        last ``coalesce-bytes`` of the shard in one request: the chunks those
        bytes hold need no request of their own.  The tails come back as
        ``{key: (offset of the first byte, bytes)}``.
        """
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        n = lay.index_nbytes
        tails: dict[str, tuple[int, bytes]] = {}
        if lay.index_at_end and self.remote and hasattr(self.store, "_aget_tail"):
            got = self._get_tails(keys, max(n, self.max_bytes))
            out: dict[str, Any] = {}
            for k, res in zip(keys, got):
                if res is None:
                    out[k] = None
                    continue
                blob, size = res
                out[k] = ("remote", self._index(lay, k, blob[-n:] if len(blob) >= n else blob, size))
                if size is not None:
                    tails[k] = (size - len(blob), blob)
            return out, tails
        rng = SuffixByteRequest(n) if lay.index_at_end else RangeByteRequest(0, n)
        # No expected length: a short index is a truncated shard, refused by _index.
        raws = self._get_many([(k, rng, None) for k in keys])
        return {
            k: None if raw is None else ("remote", self._index(lay, k, raw)) for k, raw in zip(keys, raws)
        }, tails

    def _get_tails(self, keys: list[str], n: int) -> list[tuple[bytes, int | None] | None]:
        """``store._aget_tail(key, n)`` for every key, concurrently (``None``: absent); short answers retried, then refused."""
        import zarr
        from zarr.core.sync import sync

        from dask_loom.errors import MissingKeyError

        limit = int(zarr.config.get("async.concurrency") or 10)
        store = self.store
        backoff = float(get_config("retry-backoff"))

        async def one(sem: asyncio.Semaphore, key: str) -> tuple[bytes, int | None] | None:
            got = 0
            for attempt in range(3):
                async with sem:
                    _count("range_requests")
                    try:
                        blob, size = await store._aget_tail(key, n)
                    except MissingKeyError:
                        return None
                expect = n if size is None else min(n, size)
                got = len(blob)
                if got >= expect:
                    return blob, size
                _count("short_answers")
                if attempt < 2:
                    await asyncio.sleep(backoff * 2**attempt)
            raise CorruptChunkError(
                f"{self.label}: object {key!r}, last {n} bytes: {got} bytes came back, expected {expect} (the answer was cut short)"
            )

        async def all_() -> list[Any]:
            sem = asyncio.Semaphore(limit)
            got = await asyncio.gather(*(one(sem, k) for k in keys), return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException):
                    raise g
            return list(got)

        return sync(all_())

    def shard_chunks(self, lay: ChunkLayout, groups: dict[str, list[int]]) -> dict[str, list[Any]]:
        from zarr.abc.store import RangeByteRequest

        tails: dict[str, tuple[int, bytes]] = {}
        if self.cache_indexes:
            need = [k for k in groups if k not in self.indexes]
            if need:
                parsed, tails = self._read_indexes(lay, need)
                with self.index_lock:
                    self.indexes.update(parsed)
            indexes = self.indexes
        else:
            indexes, tails = self._read_indexes(lay, list(groups))
        out: dict[str, list[Any]] = {}
        reqs: list[tuple[str, Any, int | None]] = []
        where: list[tuple[str, int, int, list[Span], int]] = []  # key, run, members, pieces
        for key, ids in groups.items():
            out[key] = [None] * len(ids)
            cached = indexes.get(key)
            if cached is None:
                continue
            spans = _spans(cached[1], ids)
            tail = tails.get(key)
            if tail is not None:
                t0, blob = tail
                mv = memoryview(blob)
                rest = []
                for a, b, slot in spans:
                    if a >= t0:  # inside the bytes read with the index
                        out[key][slot] = mv[a - t0 : b - t0]
                    else:
                        rest.append((a, b, slot))
                spans = rest
            for r0, r1, members in _coalesce(spans, self.gap):
                # A run is fetched in requests of exactly coalesce-bytes (the last one shorter),
                # cut wherever they fall: the fewest requests of at most that size.
                pieces = range(r0, r1, self.max_bytes)
                for p0 in pieces:
                    p1 = min(p0 + self.max_bytes, r1)
                    reqs.append((key, RangeByteRequest(p0, p1), p1 - p0))
                where.append((key, r0, r1, members, len(pieces)))
        blobs = self._get_many(reqs)
        i = 0
        for key, r0, r1, members, k in where:
            parts = blobs[i : i + k]
            i += k
            if any(p is None for p in parts):
                raise CorruptChunkError(
                    f"{self.label}: shard {key!r} vanished while it was read (bytes {r0}..{r1})"
                )
            blob = parts[0] if k == 1 else b"".join(parts)
            mv = memoryview(blob)
            for a, b, slot in members:
                out[key][slot] = mv[a - r0 : b - r0]
        return out


def _fmt(rng: Any) -> str:
    if rng is None:
        return "(whole object)"
    if hasattr(rng, "suffix"):
        return f"-{rng.suffix} (suffix)"
    if hasattr(rng, "end"):
        return f"{rng.start}..{rng.end}"
    return f"{getattr(rng, 'offset', '?')}.."


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
            got = self.objects.shard_chunks(
                lay, {keys[sc]: [linear[j] for j in js] for sc, js in groups.items()}
            )
            raws = [None] * len(coords)
            for sc, js in groups.items():
                for j, raw in zip(js, got[keys[sc]]):
                    raws[j] = raw
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
        chunks = self.read_chunks(coords)
        for cc, chunk in zip(coords.tolist(), chunks):
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


def _problem(exc: BaseException) -> str:
    from dask_loom.zarr._source import _problem as describe

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
    from dask_loom.zarr._source import store_label

    label = store_label(store)
    if type(store) is LocalStore:
        return _LocalDir(str(store.path), label)
    remote = isinstance(store, ObjectStore)
    return _StoreObjects(store, label, remote=remote, cache_indexes=remote)


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
