"""Remote objects read in byte ranges: :class:`RemoteFile` (the client calls) and :class:`RangeFile` (a file object).

A :class:`RemoteFile` answers the few questions readers ask of one object
(size, is it a prefix, these byte ranges) through obstore for ``s3://``,
``gs://``, ``az://`` and ``http(s)://`` and through fsspec for other URLs
(``memory://``).  A :class:`RangeFile` is the read-only, seekable file
object h5py, zipfile and pyarrow read through: an LRU cache of fixed-size
blocks, the blocks one read needs fetched together in one concurrent call.
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import threading
from collections.abc import Callable
from typing import Any

from dask_loom.storage._obstore import fsspec_options, is_native, native_store, prefix_async, run_sync

__all__ = ["RangeFile", "RemoteFile"]

Fetch = Callable[[list[int], list[int]], list[Any]]


class RemoteFile:
    """One remote object at *url* (with *options*), read in byte ranges; *name* is what it shows (no credentials).

    Errors are the clients' own (``FileNotFoundError`` for a missing object,
    obstore's or fsspec's exceptions otherwise): callers retry and classify
    them (:func:`dask_loom.storage._objectstore._classify`).
    """

    def __init__(self, url: str, options: dict[str, Any], *, name: str = "<remote object>") -> None:
        self.url = url
        self.name = name
        self.options = dict(options)
        self._held: tuple[int, Any, str] | None = None
        self._size: int | None = None
        self._native = False

    def _client(self) -> tuple[Any, str]:
        held = self._held
        if held is None or held[0] != os.getpid():  # a forked child builds its own client
            self._native = is_native(self.url)
            if self._native:
                store, path = native_store(self.url, self.options)
            else:
                import fsspec.core

                store, path = fsspec.core.url_to_fs(self.url, **fsspec_options(self.url, self.options))
            held = self._held = (os.getpid(), store, path)
        return held[1], held[2]

    @property
    def native(self) -> bool:
        self._client()
        return self._native

    def size(self) -> int:
        """The object's size in bytes (a HEAD request, unless :meth:`kind` made it)."""
        if self._size is not None:
            return self._size
        client, path = self._client()
        if self.native:
            import obstore

            return int(obstore.head(client, path)["size"])
        return int(client.size(path))

    def stat(self) -> tuple[int, str]:
        """The object's size and a tag that changes when it is rewritten (ETag or modification time)."""
        client, path = self._client()
        if self.native:
            import obstore

            meta = obstore.head(client, path)
            return int(meta["size"]), str(meta.get("e_tag") or meta.get("last_modified") or "")
        info = client.info(path)
        return int(info.get("size") or 0), str(
            info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        )

    def is_file(self) -> bool:
        """True when the object exists (one HEAD request); a prefix is no file."""
        client, path = self._client()
        if not self.native:
            return bool(client.isfile(path))
        import obstore

        try:
            obstore.head(client, path)
        except FileNotFoundError:
            return False
        return True

    def kind(self) -> str:
        """``"file"`` or ``"directory"`` (a prefix holding objects); ``FileNotFoundError`` when neither."""
        client, path = self._client()
        if not self.native:
            return "directory" if client.info(path).get("type") == "directory" else "file"
        import obstore

        try:
            self._size = int(obstore.head(client, path)["size"])
            return "file"
        except FileNotFoundError:
            pass
        if not self.url.startswith(("http://", "https://")):
            got = obstore.list_with_delimiter(client, path.rstrip("/"))
            if got["common_prefixes"] or got["objects"]:
                return "directory"
        raise FileNotFoundError(path)

    def exists(self) -> bool:
        try:
            self.kind()
        except FileNotFoundError:
            return False
        return True

    def cat_ranges(self, starts: list[int], ends: list[int]) -> list[Any]:
        """The bytes of each ``[start, end)`` range, all requested at once; a failed range gives its exception."""
        client, path = self._client()
        if not self.native:
            return client.cat_ranges([path] * len(starts), starts, ends, on_error="return")
        import obstore

        async def all_ranges() -> list[Any]:
            return await asyncio.gather(
                *(obstore.get_range_async(client, path, start=s, end=e) for s, e in zip(starts, ends)),
                return_exceptions=True,
            )

        got = run_sync(all_ranges)
        if any(type(g).__name__ == "NotSupportedError" for g in got):
            # A web server that ignores Range headers: the whole object once, cut here.
            whole = bytes(obstore.get(client, path).bytes())
            got = [whole[s:e] for s, e in zip(starts, ends)]
        return got

    def ends(self, head: int, tail: int) -> tuple[int, Any, Any]:
        """The object's size, its first *head* bytes and its last *tail* bytes, in one round trip.

        Both are ranged GETs sent at once (the tail as a suffix range, whose
        answer gives the size): no HEAD request first.  Short objects come
        back whole in either.  On Azure (no suffix ranges) and through
        fsspec: the size first, then the tail.
        """
        client, path = self._client()
        if not self.native:
            size = self.size()
            h, t = self.read_ranges([0, max(0, size - tail)], [min(head, size), min(tail, size)])
            return size, h, t
        import obstore

        async def suffix() -> tuple[int, Any]:
            got = await obstore.get_async(client, path, options={"range": {"suffix": tail}})
            return int(got.meta["size"]), await got.bytes_async()

        async def both() -> tuple[Any, tuple[int, Any]]:
            try:
                return await asyncio.gather(obstore.get_range_async(client, path, start=0, end=head), suffix())
            except Exception as exc:
                if type(exc).__name__ != "NotSupportedError":
                    raise
            # Azure has no suffix ranges: the head's answer tells the size, then the tail (two round trips).
            first, size = await prefix_async(client, path, head)
            start = max(size - tail, 0)
            return first, (size, await obstore.get_range_async(client, path, start=start, end=size) if size else b"")

        try:
            first, (size, last) = run_sync(both)
        except FileNotFoundError:
            raise
        except Exception:
            # An empty object answers a ranged GET with 416 or a whole (empty) body, which
            # obstore refuses: say it is empty, and let the reader refuse it as it would a file.
            if self.size() != 0:
                raise
            return 0, b"", b""
        self._size = size
        return size, first, last

    def read_ranges(self, starts: list[int], sizes: list[int]) -> list[Any]:
        """:meth:`cat_ranges` by ``(start, size)``, raising the first failure."""
        got = self.cat_ranges(list(starts), [s + n for s, n in zip(starts, sizes)])
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return got

    def open(self, *, block_size: int = 1 << 20) -> RangeFile:
        """A seekable read-only file object over the object."""
        return RangeFile(self.size(), self.read_ranges, block_size=block_size)

    def __repr__(self) -> str:  # options (and a URL's user:password@) may hold credentials: never print them
        return f"RemoteFile({self.name!r})"


class RangeFile(io.RawIOBase):
    """A read-only file of *size* bytes whose blocks come from *fetch* ``(starts, sizes)``, LRU-cached.

    *seed* maps block numbers to blocks fetched elsewhere; each is used once,
    then held like a fetched block.  The blocks one read needs and the cache
    lacks are fetched together (one call, requests concurrent).
    """

    def __init__(
        self,
        size: int,
        fetch: Fetch,
        *,
        block_size: int = 1 << 20,
        maxblocks: int = 32,
        seed: dict[int, bytes] | None = None,
    ) -> None:
        super().__init__()
        self.size = int(size)
        self.blocksize = int(block_size)
        self._fetch = fetch
        self._max = maxblocks
        self._seed = dict(seed or {})
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._pos = 0
        self._lock = threading.Lock()
        self.fetches = 0  # calls to *fetch* (for tests)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        pos = base + int(offset)
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _block(self, b: int) -> bytes:
        got = self._blocks.get(b)
        if got is not None:
            self._blocks.move_to_end(b)
        return got  # type: ignore[return-value]

    def _span(self, start: int, end: int) -> bytes:
        with self._lock:
            first, last = start // self.blocksize, (end - 1) // self.blocksize
            need = [b for b in range(first, last + 1) if b not in self._blocks and b not in self._seed]
            if need:
                self.fetches += 1
                starts = [b * self.blocksize for b in need]
                sizes = [min(self.size, s + self.blocksize) - s for s in starts]
                for b, blob in zip(need, self._fetch(starts, sizes)):
                    self._blocks[b] = bytes(blob)
            parts = []
            for b in range(first, last + 1):
                blob = self._seed.pop(b, None)
                if blob is not None:
                    self._blocks[b] = blob
                parts.append(self._block(b))
            while len(self._blocks) > max(self._max, last - first + 1):
                self._blocks.popitem(last=False)
        lo = start - first * self.blocksize
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        return joined[lo : lo + end - start]

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        end = self.size if size is None or size < 0 else min(self.size, self._pos + int(size))
        if end <= self._pos:
            return b""
        out = self._span(self._pos, end)
        self._pos = end
        return out

    def readinto(self, buf: Any) -> int:
        mv = memoryview(buf).cast("B")
        data = self.read(len(mv))
        mv[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)
