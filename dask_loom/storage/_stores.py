"""Stores with simplezarr's API that are also zarr-python ``Store`` objects.

One object serves two callers:

* **simplezarr's synchronous contract** — ``get(key) -> bytes`` (a missing key
  raises :class:`~dask_loom.errors.MissingKeyError`, an ``IOError``),
  ``set(key, bytes)``, ``erase``, ``erase_values``, ``erase_prefix``,
  ``get_partial_values([(key, start, length)])``, ``set_partial_values``,
  ``list()``, ``list_prefix("a/")`` (full keys), ``list_dir("a/")`` (full keys
  and ``"sub/"`` prefixes);
* **zarr-python's asynchronous ``Store`` ABC** — ``await get(key, prototype,
  byte_range)`` (``None`` when missing), ``await set(key, Buffer)``,
  ``delete``, ``exists``, ``async for k in list_dir("a")`` (relative names).

The two share method names, so calls are told apart by their arguments: a
``prototype`` (zarr always passes one) or a ``Buffer`` value selects the async
path, plain ``bytes`` the sync one.  ``list``/``list_prefix``/``list_dir``
return a :class:`KeyList`, a lazy sequence that compares equal to the sorted
simplezarr list and, under ``async for``, yields zarr's entries without
blocking zarr's event loop.  Deliberate difference: a prefix without the
trailing ``/`` (zarr's spelling, ``list_dir("a")``) is read as the directory
``a/`` instead of being refused, since zarr-python passes prefixes that way.

Stores pickle as a spec (path, URL, options; a :class:`MemoryStore` by value),
never as an open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from dask_loom.errors import InvalidKeyError, MissingKeyError, ReadOnlyError, StoreError

__all__ = [
    "BaseStore",
    "KeyList",
    "ListableStore",
    "LocalStore",
    "MemoryStore",
    "ReadableStore",
    "SlowStore",
    "WritableStore",
    "WrapperStore",
    "check_key",
    "check_node_path",
    "check_prefix",
]

_NO = object()  # "argument not given": tells simplezarr calls from zarr calls

# A byte request in the sync primitives: (start, length_or_None) or ("suffix", n).
Req = tuple[Any, Any] | None


def check_key(key: Any, store: str | None = None) -> str:
    """Validate a simplezarr key: a non-empty ``str`` that cannot escape its store.

    Refused: a leading or trailing ``/``, empty or all-dot segments (``..``),
    NUL bytes, backslashes (a path separator on Windows and to some servers),
    and percent-encoded forms of these (``%2e%2e``, ``%5c``, ``%00``), which an
    HTTP server or object store may decode.  *store* names the store in the
    message.
    """
    where = f"{store}: " if store else ""
    if not isinstance(key, str):
        raise TypeError(f"{where}store keys must be str, not {type(key).__name__}")
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(f"{where}invalid store key {key!r}: must be non-empty without a leading or trailing '/'")
    _check_text(key, key, where)
    if "%" in key:
        from urllib.parse import unquote

        decoded = unquote(key)
        if decoded != key:
            if decoded.startswith("/"):
                raise InvalidKeyError(f"{where}invalid store key {key!r}: percent-encoded absolute path {decoded!r}")
            _check_text(key, decoded, where, encoded=True)
    return key


def _check_text(key: str, text: str, where: str, *, encoded: bool = False) -> None:
    how = " (percent-encoded)" if encoded else ""
    if "\x00" in text:
        raise InvalidKeyError(f"{where}invalid store key {key!r}: contains a NUL byte{how}")
    if "\\" in text:
        raise InvalidKeyError(f"{where}invalid store key {key!r}: contains a backslash{how}")
    for part in text.split("/"):
        if not part or set(part) == {"."}:
            raise InvalidKeyError(f"{where}invalid store key {key!r}: empty or all-dot segment {part!r}{how}")


def check_node_path(path: Any, store: str | None = None) -> str:
    """Validate a Zarr node path inside a store and return it without outer ``/``.

    As in zarr-python, a leading ``/`` means the store's root (``"/a"`` is
    ``"a"``), never the file system's; everything else follows
    :func:`check_key` (``..``, NUL, backslashes and their percent-encodings
    are refused).
    """
    if not isinstance(path, str):
        raise TypeError(f"{store + ': ' if store else ''}node paths must be str, not {type(path).__name__}")
    p = path.strip("/")
    if p:
        try:
            check_key(p, store)
        except InvalidKeyError as exc:
            raise InvalidKeyError(str(exc).replace("invalid store key", "invalid node path", 1)) from None
    return p


def _plain_key(key: Any) -> bool:
    """Cheap test that *key* is an ordinary key (the hot path: one call per chunk); others get :func:`check_key`."""
    return (
        type(key) is str
        and bool(key)
        and key[0] != "/"
        and key[-1] != "/"
        and "//" not in key
        and "\\" not in key
        and "\x00" not in key
        and "%" not in key
        and ("." not in key or not any(set(part) == {"."} for part in key.split("/")))
    )


def check_prefix(prefix: Any, store: str | None = None) -> str:
    """Normalise a prefix to ``""`` (root) or ``"a/b/"``.

    simplezarr's root ``"/"`` and zarr's root ``""`` both mean the whole store;
    ``"a/b"`` (zarr's spelling) is read as ``"a/b/"``.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"{store + ': ' if store else ''}store prefixes must be str, not {type(prefix).__name__}")
    if prefix in ("", "/"):
        return ""
    p = prefix if prefix.endswith("/") else prefix + "/"
    check_key(p[:-1], store)
    return p


def _parse_range(byte_range: ByteRequest | None) -> Req:
    if byte_range is None:
        return None
    if isinstance(byte_range, RangeByteRequest):
        return (byte_range.start, max(0, byte_range.end - byte_range.start))
    if isinstance(byte_range, OffsetByteRequest):
        return (byte_range.offset, None)
    if isinstance(byte_range, SuffixByteRequest):
        return ("suffix", byte_range.suffix)
    raise ValueError(f"Unexpected byte_range, got {byte_range}.")


def _slice(data: bytes, req: Req) -> bytes:
    if req is None:
        return data
    if req[0] == "suffix":
        n = int(req[1])
        return data[len(data) - n :] if n else b""
    start, length = req
    return data[start:] if length is None else data[start : start + length]


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, memoryview):
        return value.tobytes()
    raise TypeError(f"{what}: values must be bytes or memoryview, not {type(value).__name__}")


class KeyList(Sequence[str]):
    """Result of ``list``/``list_prefix``/``list_dir``: a lazy, sorted key list.

    Used as a sequence (``==``, ``len``, iteration, indexing) it is
    simplezarr's answer, computed synchronously on first use; under
    ``async for`` it yields zarr-python's entries through the store's async
    path.

    Examples
    --------
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore({"a/b": b"1", "a/c/d": b"2", "e": b"3"})
    >>> s.list_dir("a/")
    ['a/b', 'a/c/']
    >>> s.list_dir("a/") == ["a/b", "a/c/"]
    True
    """

    __slots__ = ("_afn", "_items", "_sfn")

    def __init__(self, sync_fn: Callable[[], list[str]], async_fn: Callable[[], AsyncIterator[str]]) -> None:
        self._sfn = sync_fn
        self._afn = async_fn
        self._items: list[str] | None = None

    def _list(self) -> list[str]:
        if self._items is None:
            self._items = sorted(self._sfn())
        return self._items

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __len__(self) -> int:
        return len(self._list())

    def __iter__(self) -> Iterator[str]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyList):
            other = other._list()
        if isinstance(other, (list, tuple)):
            return self._list() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._list())

    def __aiter__(self) -> AsyncIterator[str]:
        return self._afn().__aiter__()


class BaseStore(Store):
    """Base of every dask_loom store (a zarr-python ``Store``).

    Subclasses implement synchronous primitives ``_get(key, req)``,
    ``_set(key, data)``, ``_erase(key)`` and ``_keys(prefix)``; the async
    primitives default to calling them directly, or in a thread when
    ``_blocking_io`` is true (real disk or network I/O), so zarr's event loop
    keeps running.
    """

    _blocking_io = False

    def __init__(self, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)

    # -- names for messages -------------------------------------------------------------
    @property
    def name(self) -> str:
        """What error messages call this store."""
        return type(self).__name__

    def _missing(self, key: str) -> MissingKeyError:
        return MissingKeyError(f"{self.name}: no key {key!r}")

    def _key(self, key: Any) -> str:
        """*key* if it cannot escape the store, else :class:`~dask_loom.errors.InvalidKeyError` naming the store."""
        return key if _plain_key(key) else check_key(key, self.name)

    # -- sync primitives (subclasses) -----------------------------------------------------
    def _get(self, key: str, req: Req = None) -> bytes:
        raise TypeError(f"{self.name} is not readable")

    def _set(self, key: str, data: bytes) -> None:
        raise ReadOnlyError(f"{self.name} is not writable")

    def _erase(self, key: str) -> None:
        raise ReadOnlyError(f"{self.name} is not writable")

    def _keys(self, prefix: str) -> Iterable[str]:
        raise TypeError(f"{self.name} cannot list its keys")

    def _exists(self, key: str) -> bool:
        try:
            self._get(key, (0, 0))
        except MissingKeyError:
            return False
        return True

    def _size(self, key: str) -> int:
        """Bytes stored under *key* (stores override this to answer without reading the value)."""
        return len(self._get(key))

    # -- async primitives -------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._blocking_io:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _aget(self, key: str, req: Req = None) -> bytes:
        return await self._run(self._get, key, req)

    async def _aset(self, key: str, data: bytes) -> None:
        await self._run(self._set, key, data)

    async def _aerase(self, key: str) -> None:
        await self._run(self._erase, key)

    async def _aexists(self, key: str) -> bool:
        return await self._run(self._exists, key)

    async def _akeys(self, prefix: str) -> list[str]:
        return await self._run(lambda: list(self._keys(prefix)))

    def _dir(self, prefix: str) -> list[str]:
        """simplezarr's ``list_dir`` for a normalised prefix; stores override it to list one level only."""
        return _dir_entries(self._keys(prefix), prefix)

    async def _adir(self, prefix: str) -> list[str]:
        return await self._run(self._dir, prefix)

    # -- zarr's Store ABC -----------------------------------------------------------------
    @property
    def supports_writes(self) -> bool:
        return isinstance(self, WritableStore)

    @property
    def supports_deletes(self) -> bool:
        return isinstance(self, WritableStore)

    @property
    def supports_listing(self) -> bool:
        return isinstance(self, ListableStore)

    @property
    def supports_partial_writes(self) -> bool:  # type: ignore[override]
        return False

    def _check_writable(self) -> None:
        if self.read_only:
            # zarr's exact message (its StoreTests match it), as a typed error.
            raise _ReadOnlyStoreError("store was opened in read-only mode and does not support writing")

    def with_read_only(self, read_only: bool = False) -> BaseStore:
        """A copy of this store (same data) with another read-only flag."""
        return self._copy(read_only=read_only)

    def _copy(self, *, read_only: bool) -> BaseStore:
        raise NotImplementedError(f"with_read_only is not implemented for the {type(self)} store type.")

    async def exists(self, key: str) -> bool:
        return await self._aexists(key)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:  # type: ignore[override]
        raise TypeError(f"{self.name} is not readable")

    async def get_partial_values(  # type: ignore[override]
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        raise TypeError(f"{self.name} is not readable")

    async def set(self, key: str, value: Buffer) -> None:  # type: ignore[override]
        self._check_writable()
        raise ReadOnlyError(f"{self.name} is not writable")

    async def delete(self, key: str) -> None:
        self._check_writable()
        raise ReadOnlyError(f"{self.name} is not writable")

    def list(self) -> Any:  # type: ignore[override]
        raise TypeError(f"{self.name} cannot list its keys")

    def list_prefix(self, prefix: str) -> Any:  # type: ignore[override]
        raise TypeError(f"{self.name} cannot list its keys")

    def list_dir(self, prefix: str) -> Any:  # type: ignore[override]
        raise TypeError(f"{self.name} cannot list its keys")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._spec() == other._spec()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self._token_spec())))

    def _spec(self) -> Any:
        return id(self)

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return (type(self).__name__, tokenize(self._token_spec()), self.read_only)

    def _token_spec(self) -> Any:
        """What identifies the store in dask tokens (cheap: no data)."""
        return self._spec()

    # -- helpers shared by moves (loom on zarr swaps names at the end of a write) --
    def _move_prefix(self, src: str, dst: str) -> None:
        """Move every key under ``src/`` to ``dst/`` (``dst/`` is emptied first)."""
        src_p, dst_p = check_prefix(src), check_prefix(dst)
        for k in list(self._keys(dst_p)):
            self._erase(k)
        for k in list(self._keys(src_p)):
            self._set(dst_p + k[len(src_p) :], self._get(k))
            self._erase(k)


class _ReadOnlyStoreError(ReadOnlyError, ValueError):
    """A write through a read-only store (a ``ValueError`` too, as zarr raises)."""


class ReadableStore(BaseStore):
    """A store that can read keys (simplezarr ``get``/``get_partial_values``; zarr ``get``/``exists``)."""

    def get(self, key: str, prototype: Any = _NO, byte_range: ByteRequest | None = None) -> Any:  # type: ignore[override]
        """``get(key) -> bytes`` (sync, ``IOError`` if missing) or zarr's ``await get(key, prototype, byte_range)``."""
        if prototype is _NO and byte_range is None:
            return self._get(self._key(key))
        return self._zget(self._key(key), prototype, byte_range)

    async def _zget(self, key: str, prototype: Any, byte_range: ByteRequest | None) -> Buffer | None:
        if prototype is _NO or prototype is None:
            prototype = default_buffer_prototype()
        req = _parse_range(byte_range)
        try:
            data = await self._aget(key, req)
        except MissingKeyError:
            return None
        return prototype.buffer.from_bytes(data)

    def get_partial_values(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``get_partial_values([(key, start, length)])`` (sync) or zarr's ``await get_partial_values(prototype, key_ranges)``."""
        if len(args) + len(kwargs) == 2 or "prototype" in kwargs:
            rest = list(args)
            prototype = kwargs["prototype"] if "prototype" in kwargs else rest.pop(0)
            key_ranges = kwargs["key_ranges"] if "key_ranges" in kwargs else rest.pop(0)
            return self._zget_partial(prototype, key_ranges)
        (key_ranges,) = args or (kwargs["key_ranges"],)
        out = []
        for item in key_ranges:
            if not isinstance(item, tuple) or len(item) != 3:
                raise TypeError(f"{self.name}: key ranges are (key, start, length) 3-tuples, got {item!r}")
            key, start, length = item
            out.append(self._get(self._key(key), (int(start), None if length is None else int(length))))
        return out

    async def _zget_partial(self, prototype: Any, key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        pairs = [(self._key(k), r) for k, r in key_ranges]
        return list(await asyncio.gather(*(self._zget(k, prototype, r) for k, r in pairs)))

    async def exists(self, key: str) -> bool:
        return await self._aexists(self._key(key))

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        """zarr's optional synchronous read (``None`` when missing)."""
        prototype = prototype or default_buffer_prototype()
        try:
            return prototype.buffer.from_bytes(self._get(self._key(key), _parse_range(byte_range)))
        except MissingKeyError:
            return None


class WritableStore(BaseStore):
    """A store that can write and delete keys (simplezarr ``set``/``erase*``; zarr ``set``/``delete``)."""

    def set(self, key: str, value: Any) -> Any:  # type: ignore[override]
        """``set(key, bytes)`` (sync) or zarr's ``await set(key, Buffer)``."""
        if isinstance(value, Buffer):
            return self._zset(self._key(key), value)
        self._key(key)
        data = _as_bytes(value, f"{self.name}: set({key!r})")
        self._check_writable()
        self._set(key, data)
        return None

    async def _zset(self, key: str, value: Buffer) -> None:
        self._check_writable()
        await self._aset(key, value.to_bytes())

    async def delete(self, key: str) -> None:
        self._check_writable()
        key = self._key(key)
        with contextlib.suppress(MissingKeyError):
            await self._aerase(key)

    def set_sync(self, key: str, value: Buffer) -> None:
        """zarr's optional synchronous write."""
        self._check_writable()
        self._set(self._key(key), value.to_bytes())

    def delete_sync(self, key: str) -> None:
        """zarr's optional synchronous delete (no error when missing)."""
        self._check_writable()
        key = self._key(key)
        with contextlib.suppress(MissingKeyError):
            self._erase(key)

    def set_partial_values(self, key_start_values: Iterable[tuple[str, int, Any]]) -> None:
        """Write ``bytes`` into existing values at byte offsets: ``[(key, start, bytes)]``."""
        self._check_writable()
        for item in key_start_values:
            if not isinstance(item, tuple) or len(item) != 3:
                raise TypeError(f"{self.name}: expected (key, start, bytes) 3-tuples, got {item!r}")
            key, start, value = item
            old = bytearray(self._get(self._key(key)))
            new = _as_bytes(value, f"{self.name}: set_partial_values({key!r})")
            start = int(start)
            if start > len(old):
                old.extend(b"\x00" * (start - len(old)))
            old[start : start + len(new)] = new
            self._set(key, bytes(old))

    def erase(self, key: str) -> None:
        """Delete a key; a missing key raises :class:`~dask_loom.errors.MissingKeyError` (an ``IOError``)."""
        self._check_writable()
        self._erase(self._key(key))

    def erase_values(self, keys: Iterable[str]) -> None:
        """Delete several keys."""
        for k in keys:
            self.erase(k)

    def erase_prefix(self, prefix: str) -> None:
        """Delete every key under a ``"dir/"`` prefix (``"/"``: everything); a missing prefix is a no-op."""
        self._check_writable()
        p = check_prefix(prefix, self.name)
        for k in list(self._keys(p)):
            with contextlib.suppress(MissingKeyError):
                self._erase(k)


def _dir_entries(keys: Iterable[str], prefix: str) -> list[str]:
    """simplezarr's ``list_dir``: full keys of files, ``"prefix/sub/"`` for sub-directories."""
    out = set()
    for k in keys:
        rest = k[len(prefix) :]
        head, sep, _ = rest.partition("/")
        out.add(prefix + head + "/" if sep else k)
    return sorted(out)


class ListableStore(BaseStore):
    """A store that can list keys (simplezarr ``list*``; zarr's async ``list*``)."""

    def list(self) -> KeyList:  # type: ignore[override]
        """All keys, sorted."""

        async def agen() -> AsyncIterator[str]:
            for k in await self._akeys(""):
                yield k

        return KeyList(lambda: list(self._keys("")), agen)

    def list_prefix(self, prefix: str) -> KeyList:  # type: ignore[override]
        """Every key under a ``"dir/"`` prefix (recursive, full keys)."""
        if isinstance(prefix, str) and prefix and not prefix.endswith("/") and prefix != "/":
            # zarr passes plain string prefixes here; match them as strings.
            raw = check_key(prefix, self.name)

            async def agen_raw() -> AsyncIterator[str]:
                for k in await self._akeys(""):
                    if k.startswith(raw):
                        yield k

            return KeyList(lambda: [k for k in self._keys("") if k.startswith(raw)], agen_raw)
        p = check_prefix(prefix, self.name)

        async def agen() -> AsyncIterator[str]:
            for k in await self._akeys(p):
                yield k

        return KeyList(lambda: list(self._keys(p)), agen)

    def list_dir(self, prefix: str) -> KeyList:  # type: ignore[override]
        """Keys and ``"sub/"`` prefixes directly inside ``"dir/"``; ``async for`` yields zarr's relative names."""
        p = check_prefix(prefix, self.name)

        async def agen() -> AsyncIterator[str]:
            for entry in await self._adir(p):
                yield entry[len(p) :].rstrip("/")

        return KeyList(lambda: self._dir(p), agen)


class _Base3(ReadableStore, WritableStore, ListableStore):
    """Readable, writable and listable."""


# --------------------------------------------------------------------------------------
# MemoryStore
# --------------------------------------------------------------------------------------


class MemoryStore(_Base3):
    """A readable, writable, listable store in a Python dict.

    Parameters
    ----------
    fields
        Initial ``{key: bytes}`` (copied).
    read_only
        Refuse writes.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> z = zarr.create_array(s, name="x", shape=(4,), chunks=(2,), dtype="i4")
    >>> z[:] = np.arange(4)
    >>> s.list_dir("x/")
    ['x/c/', 'x/zarr.json']
    >>> len(s.get("x/c/1")) > 0
    True
    """

    def __init__(self, fields: dict[str, Any] | None = None, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self._dict: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._uid = uuid.uuid4().hex  # tokens name the store, never hash its data
        for k, v in (fields or {}).items():
            self._dict[check_key(k, "MemoryStore")] = _as_bytes(v, f"MemoryStore: key {k!r}")

    @property
    def dict(self) -> dict[str, bytes]:
        """The dict holding the data."""
        return self._dict

    @property
    def nbytes(self) -> int:
        """Total bytes stored."""
        return sum(len(v) for v in self._dict.values())

    def _spec(self) -> Any:
        return self._dict

    def _token_spec(self) -> Any:
        return self._uid

    def _copy(self, *, read_only: bool) -> MemoryStore:
        new = MemoryStore(read_only=read_only)
        new._dict = self._dict  # same data, as zarr's MemoryStore.with_read_only
        new._lock = self._lock
        new._uid = self._uid
        return new

    def __reduce__(self) -> Any:
        return (_memory_from_state, (dict(self._dict), self.read_only, self._uid))

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._dict)} keys>)"

    def _get(self, key: str, req: Req = None) -> bytes:
        try:
            data = self._dict[key]
        except KeyError:
            raise self._missing(key) from None
        return _slice(data, req)

    def _exists(self, key: str) -> bool:
        return key in self._dict

    def _size(self, key: str) -> int:
        try:
            return len(self._dict[key])
        except KeyError:
            raise self._missing(key) from None

    def _set(self, key: str, data: bytes) -> None:
        with self._lock:
            parts = key.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in self._dict:
                    raise StoreError(f"{self.name}: cannot set {key!r}: {'/'.join(parts[:i])!r} is a key, not a directory")
            if key not in self._dict and any(k.startswith(key + "/") for k in self._dict):
                raise StoreError(f"{self.name}: cannot set {key!r}: it is a directory")
            self._dict[key] = data

    def _erase(self, key: str) -> None:
        with self._lock:
            if self._dict.pop(key, None) is None and key not in self._dict:
                raise self._missing(key)

    def _keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._dict if k.startswith(prefix))

    def _move_prefix(self, src: str, dst: str) -> None:
        src_p, dst_p = check_prefix(src), check_prefix(dst)
        with self._lock:
            for k in [k for k in self._dict if k.startswith(dst_p)]:
                del self._dict[k]
            for k in [k for k in self._dict if k.startswith(src_p)]:
                self._dict[dst_p + k[len(src_p) :]] = self._dict.pop(k)


def _memory_from_state(d: dict[str, bytes], read_only: bool, uid: str) -> MemoryStore:
    s = MemoryStore(read_only=read_only)
    s._dict = d
    s._uid = uid
    return s


# --------------------------------------------------------------------------------------
# LocalStore
# --------------------------------------------------------------------------------------

_TMP_MARK = ".dlpart-"


class LocalStore(_Base3):
    """A store in a directory of the local file system.

    Keys are paths relative to *path*; keys that would escape it (``..``,
    absolute paths, NUL bytes) are refused.  Values are written to a
    temporary file beside the target and renamed into place, so a failed
    write never leaves a partial value behind.

    Examples
    --------
    >>> import tempfile
    >>> from dask_loom.stores import LocalStore
    >>> s = LocalStore(tempfile.mkdtemp())
    >>> s.set("a/b", b"xyz")
    >>> s.get("a/b"), s.list_dir("/")
    (b'xyz', ['a/'])
    >>> s.get("../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dask_loom.errors.InvalidKeyError: LocalStore('...'): invalid store key '../etc/passwd': empty or all-dot segment '..'
    """

    _blocking_io = True

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LocalStore path must be a str or os.PathLike, not {type(path).__name__}")
        super().__init__(read_only=read_only)
        self.path = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self._root = str(self.path)

    @property
    def name(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    def _spec(self) -> Any:
        return str(self.path)

    def _copy(self, *, read_only: bool) -> LocalStore:
        return LocalStore(self.path, read_only=read_only)

    def __reduce__(self) -> Any:
        return (_local_from_state, (str(self.path), self.read_only))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    def __str__(self) -> str:
        return f"file://{self.path}"

    def _file(self, key: str) -> pathlib.Path:
        if not isinstance(key, str):
            raise TypeError(f"store keys must be str, not {type(key).__name__}")
        if key.startswith(("/", "\\")) or os.path.isabs(key):
            raise InvalidKeyError(f"{self.name}: key {key!r} is an absolute path; keys must stay inside the store")
        check_key(key, self.name)
        p = self.path.joinpath(*key.split("/"))
        root = str(self.path)
        if os.path.commonpath([root, os.path.normpath(p)]) != root:
            raise InvalidKeyError(f"{self.name}: key {key!r} escapes the store root")
        return p

    def _fspath(self, key: str) -> str:
        # Hot path (one call per chunk read): plain string checks for ordinary
        # keys; anything unusual goes through the full checks of _file.
        if _plain_key(key):
            return f"{self._root}/{key}"
        return str(self._file(key))

    def _get(self, key: str, req: Req = None) -> bytes:
        p = self._fspath(key)
        try:
            with open(p, "rb") as f:
                if req is None:
                    return f.read()
                if req[0] == "suffix":
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - int(req[1])))
                    return f.read() if req[1] else b""
                f.seek(int(req[0]))
                if req[1] is None:
                    return f.read()
                # read(n) allocates n bytes up front: clamp to what the file holds.
                left = max(0, os.fstat(f.fileno()).st_size - int(req[0]))
                return f.read(min(int(req[1]), left))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise StoreError(f"{self.name}: cannot read {key!r}: {exc}") from exc

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._fspath(key))

    def _size(self, key: str) -> int:
        try:
            st = os.stat(self._fspath(key))
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        return int(st.st_size)

    def _set(self, key: str, data: bytes) -> None:
        p = self._file(key)
        tmp = p.with_name(f"{_TMP_MARK}{p.name}.{uuid.uuid4().hex}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if p.is_dir():
                raise StoreError(f"{self.name}: cannot set {key!r}: it is a directory") from exc
            raise StoreError(f"{self.name}: cannot write {key!r}: {exc}") from exc

    def _erase(self, key: str) -> None:
        p = self._file(key)
        try:
            p.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except PermissionError as exc:
            if p.is_dir():
                raise self._missing(key) from None
            raise StoreError(f"{self.name}: cannot erase {key!r}: {exc}") from exc
        # Empty directories are not keys: prune them so listings match the keys.
        parent = p.parent
        while parent != self.path and str(parent).startswith(str(self.path)):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _keys(self, prefix: str) -> list[str]:
        base = self.path / prefix if prefix else self.path
        if prefix:
            self._file(prefix[:-1])
        if not base.is_dir():
            return []
        out = []
        root_len = len(str(self.path)) + 1
        for dirpath, _dirs, files in os.walk(base):
            for fn in files:
                if fn.startswith(_TMP_MARK):
                    continue
                out.append(os.path.join(dirpath, fn)[root_len:].replace(os.sep, "/"))
        return sorted(out)

    def _dir(self, prefix: str) -> list[str]:
        base = self._file(prefix[:-1]) if prefix else self.path
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            if e.name.startswith(_TMP_MARK):
                continue
            out.append(prefix + e.name + "/" if e.is_dir() else prefix + e.name)
        return sorted(out)

    def _move_prefix(self, src: str, dst: str) -> None:
        src_p, dst_p = check_prefix(src), check_prefix(dst)
        s, d = self._file(src_p[:-1]), self._file(dst_p[:-1])
        if not s.is_dir():
            super()._move_prefix(src, dst)
            return
        import shutil

        if d.exists():
            # Rename the old directory away first so the swap itself is one rename.
            trash = d.with_name(f"{_TMP_MARK}{d.name}.{uuid.uuid4().hex}")
            os.replace(d, trash)
            os.replace(s, d)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
            os.replace(s, d)


def _local_from_state(path: str, read_only: bool) -> LocalStore:
    return LocalStore(path, read_only=read_only)


# --------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------


class WrapperStore(_Base3):
    """A store that wraps another store and delegates to it.

    Parameters
    ----------
    store
        The wrapped store (``.sub``).
    read_only
        Default: the wrapped store's flag.
    """

    def __init__(self, store: BaseStore, *, read_only: bool | None = None) -> None:
        if not isinstance(store, BaseStore):
            raise TypeError(f"{type(self).__name__} wraps a dask_loom store, not {type(store).__name__}")
        super().__init__(read_only=store.read_only if read_only is None else read_only)
        self._store = store

    @property
    def sub(self) -> BaseStore:
        """The wrapped store."""
        return self._store

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self._store.name})"

    def _spec(self) -> Any:
        return (self._store._spec(), self._wrapper_args())

    def _token_spec(self) -> Any:
        return (self._store._token_spec(), self._wrapper_args())

    def _wrapper_args(self) -> tuple[Any, ...]:
        return ()

    def _copy(self, *, read_only: bool) -> WrapperStore:
        return type(self)(self._store._copy(read_only=read_only), *self._wrapper_args(), read_only=read_only)

    def __reduce__(self) -> Any:
        return (_rebuild_wrapper, (type(self), self._store, self._wrapper_args(), self.read_only))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._store!r})"

    def _hook(self, method: str, args: tuple[Any, ...], result: Any) -> None:
        """Called after every delegated primitive; subclasses observe or delay here."""

    def _get(self, key: str, req: Req = None) -> bytes:
        out = self._store._get(key, req)
        self._hook("get", (key, req), out)
        return out

    def _set(self, key: str, data: bytes) -> None:
        self._store._set(key, data)
        self._hook("set", (key, data), None)

    def _erase(self, key: str) -> None:
        self._store._erase(key)
        self._hook("erase", (key,), None)

    def _keys(self, prefix: str) -> list[str]:
        out = list(self._store._keys(prefix))
        self._hook("list", (prefix,), out)
        return out

    def _exists(self, key: str) -> bool:
        out = self._store._exists(key)
        self._hook("exists", (key,), out)
        return out

    def _size(self, key: str) -> int:
        return self._store._size(key)

    async def _aget(self, key: str, req: Req = None) -> bytes:
        return await self._store._aget(key, req)

    async def _aset(self, key: str, data: bytes) -> None:
        await self._store._aset(key, data)

    async def _aerase(self, key: str) -> None:
        await self._store._aerase(key)

    async def _aexists(self, key: str) -> bool:
        return await self._store._aexists(key)

    async def _akeys(self, prefix: str) -> list[str]:
        return await self._store._akeys(prefix)

    def _dir(self, prefix: str) -> list[str]:
        out = self._store._dir(prefix)
        self._hook("list", (prefix,), out)
        return out

    async def _adir(self, prefix: str) -> list[str]:
        return await self._store._adir(prefix)

    def _move_prefix(self, src: str, dst: str) -> None:
        self._store._move_prefix(src, dst)


def _rebuild_wrapper(cls: type, store: BaseStore, args: tuple[Any, ...], read_only: bool) -> WrapperStore:
    return cls(store, *args, read_only=read_only)


class SlowStore(WrapperStore):
    """A wrapper that delays every call: ``base_delay + nbytes * 8 / bits_per_second`` seconds.

    Sync (simplezarr) calls sleep; zarr's async calls ``await asyncio.sleep``,
    so concurrent chunk reads overlap their delays on zarr's event loop, as
    requests to a real object store do.

    Examples
    --------
    >>> from dask_loom.stores import MemoryStore, SlowStore
    >>> s = SlowStore(MemoryStore({"a": b"1"}), base_delay=0.001)
    >>> s.get("a")
    b'1'
    """

    def __init__(
        self,
        store: BaseStore,
        base_delay: float = 1.0,
        bits_per_second: float = 0.0,
        *,
        read_only: bool | None = None,
    ) -> None:
        super().__init__(store, read_only=read_only)
        self.base_delay = float(base_delay)
        self.bits_per_second = float(bits_per_second)

    def _wrapper_args(self) -> tuple[Any, ...]:
        return (self.base_delay, self.bits_per_second)

    def _delay(self, nbytes: int = 0) -> float:
        d = self.base_delay
        if self.bits_per_second > 0:
            d += nbytes * 8 / self.bits_per_second
        return d

    def _hook(self, method: str, args: tuple[Any, ...], result: Any) -> None:
        n = len(result) if method == "get" else len(args[1]) if method == "set" else 0
        time.sleep(self._delay(n))

    async def _aget(self, key: str, req: Req = None) -> bytes:
        try:
            out = await self._store._aget(key, req)
        except MissingKeyError:
            await asyncio.sleep(self._delay())
            raise
        await asyncio.sleep(self._delay(len(out)))
        return out

    async def _aset(self, key: str, data: bytes) -> None:
        await asyncio.sleep(self._delay(len(data)))
        await self._store._aset(key, data)

    async def _aerase(self, key: str) -> None:
        await asyncio.sleep(self._delay())
        await self._store._aerase(key)

    async def _aexists(self, key: str) -> bool:
        await asyncio.sleep(self._delay())
        return await self._store._aexists(key)

    async def _akeys(self, prefix: str) -> list[str]:
        await asyncio.sleep(self._delay())
        return await self._store._akeys(prefix)

    async def _adir(self, prefix: str) -> list[str]:
        await asyncio.sleep(self._delay())
        return await self._store._adir(prefix)
