"""Where the chunks of a Zarr array lie: its layout, shard indexes and the byte access to its objects.

The lower half of the direct chunk reader (:mod:`dask_loom.zarr._chunks`):
what an array looks like on disk (codecs, inner chunks, shards), and ranged,
coalesced reads of the objects of a local folder or a store.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom._config import config_bytes, get_config
from dask_loom.errors import CorruptChunkError, StoreError

# Counters the tests use to prove which path served a read (per process).
STATS = {
    "direct_reads": 0,
    "chunks_decoded": 0,
    "index_reads": 0,
    "fallback_arrays": 0,
    "range_requests": 0,
    "short_answers": 0,
}
_stats_lock = threading.Lock()
_EMPTY = np.uint64(2**64 - 1)  # offset and size of an absent inner chunk


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
    from dask_loom.zarr._meta import check_safe_codecs

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
    # Whether whole objects arrive one by one (stream_whole) while others are in flight:
    # worth it where each request waits (object stores), so decoding overlaps the waiting.
    streams = False

    def __init__(self, label: str) -> None:
        self.label = label
        # shard key -> (identity, [(offset, nbytes) or None per inner chunk]) or None (absent shard)
        self.indexes: dict[str, tuple[Any, list[tuple[int, int] | None]] | None] = {}

    @abc.abstractmethod
    def whole(self, keys: list[str]) -> list[Any]:
        """Whole objects (``None`` where absent)."""

    def stream_whole(self, keys: list[str]) -> Iterator[tuple[int, Any]]:
        """``(position in keys, whole object or None)`` for every key, in the order they arrive."""
        yield from enumerate(self.whole(keys))

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
        from zarr.core.sync import sync

        limit = int(zarr.config.get("async.concurrency") or 10)
        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))
        one = self._one

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

    async def _one(self, sem: asyncio.Semaphore | None, key: str, rng: Any, expect: int | None) -> Any:
        """One request (``None``: missing); a short answer is asked again, then refused (*sem*: the limit)."""
        from zarr.core.buffer import default_buffer_prototype

        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))
        got = 0
        for attempt in range(retries + 1):
            async with sem if sem is not None else contextlib.nullcontext():
                _count("range_requests")
                buf = await self.store.get(key, prototype=default_buffer_prototype(), byte_range=rng)
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

    def whole(self, keys: list[str]) -> list[Any]:
        return self._get_many([(k, None, None) for k in keys])

    def stream_whole(self, keys: list[str]) -> Iterator[tuple[int, Any]]:
        """Whole objects as they arrive, ``async.concurrency`` requests in flight until the last.

        Reading a block as one batch leaves nothing in flight while its chunks
        are decoded; batches of sub-blocks (one per thread) wait for their
        slowest request before asking for more.  Here a request starts as soon
        as one ends, and the caller decodes each object while the others wait.
        A failed request is retried on its own (transient errors), and the
        first error is raised once every request has finished.
        """
        import queue

        import zarr
        from zarr.core.sync import _get_loop

        if len(keys) < 2:
            yield from enumerate(self.whole(keys))
            return
        limit = int(zarr.config.get("async.concurrency") or 10)
        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))
        answers: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()

        async def one(i: int, key: str) -> None:
            for attempt in range(retries + 1):
                try:
                    answers.put((i, await self._one(None, key, None, None), None))
                    return
                except (CorruptChunkError, StoreError) as exc:
                    answers.put((i, None, exc))
                    return
                except (OSError, TimeoutError) as exc:
                    # Refused credentials and missing files are not transient.
                    if isinstance(exc, (FileNotFoundError, PermissionError)) or attempt == retries:
                        err = StoreError(
                            f"{self.label}: request for {key!r} failed after {attempt + 1} attempts: {exc}"
                        )
                        err.__cause__ = exc
                        answers.put((i, None, err))
                        return
                    await asyncio.sleep(backoff * 2**attempt)
                except BaseException as exc:
                    answers.put((i, None, exc))
                    return

        todo = list(enumerate(keys))[::-1]

        async def worker() -> None:
            # `limit` workers each start their next request as soon as one ends: no
            # semaphore hand-over (a turn of the loop) between two requests.
            while todo:
                await one(*todo.pop())

        async def all_() -> None:
            await asyncio.gather(*(worker() for _ in range(min(limit, len(keys)))))

        done = asyncio.run_coroutine_threadsafe(all_(), _get_loop())
        error: BaseException | None = None
        try:
            for _ in range(len(keys)):
                i, data, exc = answers.get()
                if exc is not None:
                    error = error or exc
                elif error is None:
                    yield i, data
        finally:
            done.result()  # every request has ended: none is left running on the loop
        if error is not None:
            raise error

    def _read_indexes(
        self, lay: ChunkLayout, keys: list[str]
    ) -> tuple[dict[str, Any], dict[str, tuple[int, bytes]]]:
        """Shard indexes of *keys* (``None`` for absent shards), and the bytes read with them.

        On an object store, the index is read with the ``2 * coalesce-bytes``
        at the shard's end where it lies (in one suffix request where the store
        has them, S3; Azure asks for the size first), or at its start (one
        bounded range on every store: what dask_loom writes): the chunks those
        bytes hold need no request of their own, and a shard sized by what it
        stores (at least ``coalesce-bytes``, see
        :func:`~dask_loom.zarr.default_shards`) usually comes whole.  The bytes
        come back as ``{key: (offset of the first byte, bytes)}``.
        """
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        n = lay.index_nbytes
        ends: dict[str, tuple[int, bytes]] = {}
        if self.remote and hasattr(self.store, "_aget_tail"):
            got = self._get_ends(keys, max(n, 2 * self.max_bytes), at_end=lay.index_at_end)
            out: dict[str, Any] = {}
            for k, res in zip(keys, got):
                if res is None:
                    out[k] = None
                    continue
                blob, size = res
                if lay.index_at_end:
                    out[k] = ("remote", self._index(lay, k, blob[-n:] if len(blob) >= n else blob, size))
                    if size is not None:
                        ends[k] = (size - len(blob), blob)
                else:
                    out[k] = ("remote", self._index(lay, k, blob[:n], size))
                    ends[k] = (0, blob)
            return out, ends
        rng = SuffixByteRequest(n) if lay.index_at_end else RangeByteRequest(0, n)
        # No expected length: a short index is a truncated shard, refused by _index.
        raws = self._get_many([(k, rng, None) for k in keys])
        return {
            k: None if raw is None else ("remote", self._index(lay, k, raw)) for k, raw in zip(keys, raws)
        }, ends

    def _get_ends(self, keys: list[str], n: int, *, at_end: bool) -> list[tuple[bytes, int | None] | None]:
        """The last (*at_end*) or first *n* bytes of every key and its size, concurrently (``None``: absent).

        Short answers are retried, then refused.
        """
        import zarr
        from zarr.core.sync import sync

        from dask_loom.errors import MissingKeyError

        limit = int(zarr.config.get("async.concurrency") or 10)
        store = self.store
        get = store._aget_tail if at_end else store._aget_head
        backoff = float(get_config("retry-backoff"))
        which = f"last {n} bytes" if at_end else f"bytes 0..{n}"

        async def one(sem: asyncio.Semaphore, key: str) -> tuple[bytes, int | None] | None:
            got = 0
            for attempt in range(3):
                async with sem:
                    _count("range_requests")
                    try:
                        blob, size = await get(key, n)
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
                f"{self.label}: object {key!r}, {which}: {got} bytes came back, expected {expect} (the answer was cut short)"
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

        ends: dict[str, tuple[int, bytes]] = {}
        if self.cache_indexes:
            need = [k for k in groups if k not in self.indexes]
            if need:
                parsed, ends = self._read_indexes(lay, need)
                with self.index_lock:
                    self.indexes.update(parsed)
            indexes = self.indexes
        else:
            indexes, ends = self._read_indexes(lay, list(groups))
        out: dict[str, list[Any]] = {}
        reqs: list[tuple[str, Any, int | None]] = []
        where: list[tuple[str, int, int, list[Span], int]] = []  # key, run, members, pieces
        for key, ids in groups.items():
            out[key] = [None] * len(ids)
            cached = indexes.get(key)
            if cached is None:
                continue
            spans = _spans(cached[1], ids)
            held = ends.get(key)
            if held is not None:
                t0, blob = held
                t1 = t0 + len(blob)
                mv = memoryview(blob)
                rest = []
                for a, b, slot in spans:
                    if t0 <= a and b <= t1:  # inside the bytes read with the index
                        out[key][slot] = mv[a - t0 : b - t0]
                    else:
                        rest.append((a, b, slot))
                spans = rest
            for r0, r1, members in _coalesce(spans, self.gap):
                # Requests of equal size, cut wherever they fall (the answers are joined), each
                # at least coalesce-bytes and under twice that: no small tail request, and as
                # many bytes per request as the first read of a shard (its last 2 x coalesce-bytes).
                step = -(-(r1 - r0) // max(1, (r1 - r0) // self.max_bytes))
                pieces = range(r0, r1, step)
                for p0 in pieces:
                    p1 = min(p0 + step, r1)
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
