"""The base store classes: simplezarr's synchronous API and zarr-python's ``Store`` ABC on one object.

See :mod:`dask_loom.storage._stores` for the contract; the built-in memory
and local stores subclass :class:`_Base3` there.  The generic wrapper
(:class:`WrapperStore`, and :class:`SlowStore` for tests) is here because
``BaseStore.with_read_only`` returns one for a user's subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, ClassVar

from zarr.abc.store import (
    ByteRequest,
    Store,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from dask_loom.errors import MissingKeyError, ReadOnlyError
from dask_loom.storage._keys import (
    _NO,
    KeyList,
    Req,
    _as_bytes,
    _dir_entries,
    _in_event_loop,
    _parse_range,
    _plain_key,
    _slice,
    check_key,
    check_prefix,
    normalize_prefix,
)

__all__ = ["BaseStore", "ListableStore", "ReadableStore", "SlowStore", "WrapperStore", "WritableStore"]

# -- simplezarr-style subclasses: public methods as the primitives ------------------------

# simplezarr's public store methods.  A subclass that overrides one of them
# (as simplezarr documents) supplies the primitive the base classes build on.
_SIMPLEZARR_METHODS = (
    "get",
    "get_partial_values",
    "set",
    "set_partial_values",
    "erase",
    "erase_values",
    "erase_prefix",
    "list",
    "list_prefix",
    "list_dir",
)

_calling = threading.local()  # (store id, method) pairs whose user implementation is running


def _api(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a base-class method (not a user implementation)."""
    fn._dl_api = True  # type: ignore[attr-defined]
    return fn


def _active() -> set[tuple[int, str]]:
    try:
        return _calling.active  # type: ignore[no-any-return]
    except AttributeError:
        _calling.active = set()
        return _calling.active  # type: ignore[no-any-return]


def _call_impl(store: BaseStore, name: str, impl: Callable[..., Any], *args: Any) -> Any:
    """Run a user implementation, remembering it runs (so a ``super()`` call inside it gets the default)."""
    active = _active()
    tok = (id(store), name)
    if tok in active:
        return impl(store, *args)
    active.add(tok)
    try:
        return impl(store, *args)
    finally:
        active.discard(tok)


def _user_zget(impl: Callable[..., Any]) -> Callable[..., Any]:
    def get(
        self: ReadableStore, key: Any, prototype: Any = _NO, byte_range: ByteRequest | None = None
    ) -> Any:
        if prototype is _NO and byte_range is None:
            return _call_impl(self, "get", impl, key)
        return self._zget(self._key(key), prototype, byte_range)

    return get


def _user_zget_partial(impl: Callable[..., Any]) -> Callable[..., Any]:
    def get_partial_values(self: ReadableStore, *args: Any, **kwargs: Any) -> Any:
        if len(args) + len(kwargs) == 2 or "prototype" in kwargs:
            return self._zget_partial(*args, **kwargs)
        return _call_impl(self, "get_partial_values", impl, *args, *kwargs.values())

    return get_partial_values


def _user_zset(impl: Callable[..., Any]) -> Callable[..., Any]:
    def zset(self: WritableStore, key: Any, value: Any) -> Any:
        if isinstance(value, Buffer):
            return self._zset(self._key(key), value)
        return _call_impl(self, "set", impl, key, value)

    return zset


def _user_zlist(impl: Callable[..., Any]) -> Callable[..., Any]:
    def zlist(self: ListableStore) -> Any:
        if _in_event_loop():
            return KeyList(lambda: _call_impl(self, "list", impl), self._zlist)
        return _call_impl(self, "list", impl)

    return zlist


def _user_zlisting(name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    def listing(self: ListableStore, prefix: Any) -> Any:
        if _in_event_loop():
            agen = self._zlist_prefix if name == "list_prefix" else self._zlist_dir
            return KeyList(lambda: _call_impl(self, name, impl, prefix), lambda: agen(prefix))
        return _call_impl(self, name, impl, prefix)

    listing.__name__ = name
    return listing


# Names shared with zarr's async Store: the user's sync method is wrapped so zarr's calls still work.
_ZARR_SHARED: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "get": _user_zget,
    "get_partial_values": _user_zget_partial,
    "set": _user_zset,
    "list": _user_zlist,
    "list_prefix": lambda impl: _user_zlisting("list_prefix", impl),
    "list_dir": lambda impl: _user_zlisting("list_dir", impl),
}


def _missing_error(exc: BaseException) -> bool:
    """What simplezarr stores raise for a missing key: a bare ``IOError``, ``FileNotFoundError`` or ``KeyError``."""
    return type(exc) is OSError or isinstance(exc, (FileNotFoundError, KeyError))


class BaseStore(Store):
    """Base of every dask_loom store (a zarr-python ``Store``).

    Built-in stores implement synchronous primitives ``_get(key, req)``,
    ``_set(key, data)``, ``_erase(key)``, ``_keys(prefix)`` and optionally
    ``_dir(prefix)``; the async primitives default to calling them directly,
    or in a thread when ``_blocking_io`` is true (real disk or network I/O),
    so zarr's event loop keeps running.

    A subclass may instead override simplezarr's public methods (``get``,
    ``set``, ``erase``, ``list``, ``list_prefix``, ``list_dir`` …): the
    primitives then call those, every other method is built on them, and
    zarr-python's calls of the shared names (``get(key, prototype)``,
    ``set(key, Buffer)``, ``async for … in list_dir(p)``) still reach the
    async path.  No base ``__init__`` call is needed.
    """

    _blocking_io = False
    # Defaults for subclasses that do not call __init__ (simplezarr's base classes have none).
    _read_only = False
    _is_open = False
    _sync_impls: ClassVar[dict[str, Callable[..., Any]]] = {}

    def __init__(self, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        impls: dict[str, Callable[..., Any]] = {}
        for name in _SIMPLEZARR_METHODS:
            fn = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
            if fn is None or getattr(fn, "_dl_api", False):
                continue
            if hasattr(fn, "_dl_impl"):  # already wrapped in a parent class
                impls[name] = fn._dl_impl
                continue
            if (
                not inspect.isfunction(fn)
                or inspect.iscoroutinefunction(fn)
                or inspect.isasyncgenfunction(fn)
            ):
                continue  # a zarr-style (async) override: not simplezarr's sync method
            impls[name] = fn
            wrap = _ZARR_SHARED.get(name)
            if wrap is not None:
                wrapped = wrap(fn)
                wrapped.__name__, wrapped.__qualname__, wrapped.__doc__ = (
                    fn.__name__,
                    fn.__qualname__,
                    fn.__doc__,
                )
                wrapped._dl_impl = fn  # type: ignore[attr-defined]
                setattr(cls, name, wrapped)
        cls._sync_impls = impls
        if impls and "_blocking_io" not in cls.__dict__:
            cls._blocking_io = True  # user code may do real I/O: keep it off zarr's event loop

    def _route(self, name: str, *args: Any) -> Any:
        """Call the subclass's public *name* for a primitive, or ``_NO`` (none, or it is the caller)."""
        impl = type(self)._sync_impls.get(name)
        if impl is None or (id(self), name) in _active():
            return _NO
        return _call_impl(self, name, impl, *args)

    # -- names for messages -------------------------------------------------------------
    @property
    def name(self) -> str:
        """What error messages call this store."""
        return type(self).__name__

    def _missing(self, key: str) -> MissingKeyError:
        return MissingKeyError(f"{self.name}: no key {key!r}")

    def _key(self, key: Any) -> str:
        """*key* if it cannot escape the store, else :class:`~dask_loom.errors.InvalidKeyError` naming the store."""
        return key if _plain_key(key) else check_key(key, store=self.name)

    def _prefix(self, prefix: Any, method: str) -> str:
        """A simplezarr prefix checked (:func:`check_prefix`) and normalised: ``""`` for the root, else ``"a/"``."""
        p = check_prefix(prefix, store=f"{self.name}.{method}()")
        return "" if p == "/" else p

    # -- sync primitives (built-in stores override them) ------------------------------------
    def _get(self, key: str, req: Req = None) -> bytes:
        try:
            data = self._route("get", key)
        except MissingKeyError:
            raise
        except Exception as exc:
            if _missing_error(exc):
                raise MissingKeyError(f"{self.name}: no key {key!r} ({exc})") from exc
            raise
        if data is _NO:
            raise TypeError(f"{self.name} is not readable")
        return _slice(_as_bytes(data, f"{self.name}.get({key!r}) returned"), req)

    def _set(self, key: str, data: bytes) -> None:
        if self._route("set", key, data) is _NO:
            raise ReadOnlyError(f"{self.name} is not writable")

    def _erase(self, key: str) -> None:
        try:
            done = self._route("erase", key)
        except MissingKeyError:
            raise
        except Exception as exc:
            if _missing_error(exc):
                raise MissingKeyError(f"{self.name}: no key {key!r} ({exc})") from exc
            raise
        if done is _NO:
            raise ReadOnlyError(f"{self.name} is not writable")

    def _keys(self, prefix: str) -> Iterable[str]:
        out = self._route("list_prefix", prefix or "/")
        if out is _NO:
            out = self._route("list")
            if out is _NO:
                raise TypeError(f"{self.name} cannot list its keys")
        return sorted(k for k in out if k.startswith(prefix))

    def _dir(self, prefix: str) -> list[str]:
        """simplezarr's ``list_dir`` for a normalised prefix; stores override it to list one level only."""
        out = self._route("list_dir", prefix or "/")
        if out is not _NO:
            return sorted(out)
        return _dir_entries(self._keys(prefix), prefix)

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

    async def _adir(self, prefix: str) -> list[str]:
        return await self._run(self._dir, prefix)

    # -- zarr's listings (zarr's prefix semantics) -------------------------------------------
    async def _zlist(self) -> AsyncIterator[str]:
        for k in await self._akeys(""):
            yield k

    async def _zlist_prefix(self, prefix: Any) -> AsyncIterator[str]:
        if prefix in ("", "/") or (isinstance(prefix, str) and prefix.endswith("/")):
            for k in await self._akeys(normalize_prefix(prefix, self.name)):
                yield k
            return
        # zarr also passes plain string prefixes ("x" matches "x/..." and "xy"): match them as strings.
        raw = check_key(prefix, store=self.name)
        parent = raw.rpartition("/")[0]
        for k in await self._akeys(parent + "/" if parent else ""):
            if k.startswith(raw):
                yield k

    async def _zlist_dir(self, prefix: Any) -> AsyncIterator[str]:
        p = normalize_prefix(prefix, self.name)
        for entry in await self._adir(p):
            yield entry[len(p) :].rstrip("/")

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
        # A store of unknown construction (a user subclass): a view over the same object.
        return WrapperStore(self, read_only=read_only)

    async def exists(self, key: str) -> bool:
        return await self._aexists(key)

    @_api
    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:  # type: ignore[override]
        raise TypeError(f"{self.name} is not readable")

    @_api
    async def get_partial_values(  # type: ignore[override]
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        raise TypeError(f"{self.name} is not readable")

    @_api
    async def set(self, key: str, value: Buffer) -> None:  # type: ignore[override]
        self._check_writable()
        raise ReadOnlyError(f"{self.name} is not writable")

    async def delete(self, key: str) -> None:
        self._check_writable()
        raise ReadOnlyError(f"{self.name} is not writable")

    @_api
    def list(self) -> Any:  # type: ignore[override]
        raise TypeError(f"{self.name} cannot list its keys")

    @_api
    def list_prefix(self, prefix: str) -> Any:  # type: ignore[override]
        raise TypeError(f"{self.name} cannot list its keys")

    @_api
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
        src_p, dst_p = normalize_prefix(src), normalize_prefix(dst)
        for k in list(self._keys(dst_p)):
            self._erase(k)
        for k in list(self._keys(src_p)):
            self._set(dst_p + k[len(src_p) :], self._get(k))
            self._erase(k)


class _ReadOnlyStoreError(ReadOnlyError, ValueError):
    """A write through a read-only store (a ``ValueError`` too, as zarr raises)."""


class ReadableStore(BaseStore):
    """A store that can read keys (simplezarr ``get``/``get_partial_values``; zarr ``get``/``exists``).

    Partial reads default to ``get()`` and a slice; built-in stores read only
    the requested bytes.
    """

    @_api
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

    @_api
    def get_partial_values(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``get_partial_values([(key, start, length)])`` (sync) or zarr's ``await get_partial_values(prototype, key_ranges)``."""
        if len(args) + len(kwargs) == 2 or "prototype" in kwargs:
            return self._zget_partial(*args, **kwargs)
        (key_ranges,) = args or (kwargs["key_ranges"],)
        out = []
        for item in key_ranges:
            if not isinstance(item, tuple) or len(item) != 3:
                raise TypeError(f"{self.name}: key ranges are (key, start, length) 3-tuples, got {item!r}")
            key, start, length = item
            out.append(self._get(self._key(key), (int(start), None if length is None else int(length))))
        return out

    async def _zget_partial(self, *args: Any, **kwargs: Any) -> list[Buffer | None]:
        rest = list(args)
        prototype = kwargs["prototype"] if "prototype" in kwargs else rest.pop(0)
        key_ranges = kwargs["key_ranges"] if "key_ranges" in kwargs else rest.pop(0)
        pairs = [(self._key(k), r) for k, r in key_ranges]
        return list(await asyncio.gather(*(self._zget(k, prototype, r) for k, r in pairs)))

    async def exists(self, key: str) -> bool:
        return await self._aexists(self._key(key))

    def get_sync(
        self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """zarr's optional synchronous read (``None`` when missing)."""
        prototype = prototype or default_buffer_prototype()
        try:
            return prototype.buffer.from_bytes(self._get(self._key(key), _parse_range(byte_range)))
        except MissingKeyError:
            return None


class WritableStore(BaseStore):
    """A store that can write and delete keys (simplezarr ``set``/``erase*``; zarr ``set``/``delete``).

    ``set_partial_values`` defaults to get, splice and set; ``erase_values``
    to ``erase()`` per key; ``erase_prefix`` to listing the prefix and
    erasing each key.
    """

    @_api
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

    @_api
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

    @_api
    def erase(self, key: str) -> None:
        """Delete a key; a missing key raises :class:`~dask_loom.errors.MissingKeyError` (an ``IOError``)."""
        self._check_writable()
        self._erase(self._key(key))

    @_api
    def erase_values(self, keys: Iterable[str]) -> None:
        """Delete several keys (each through ``erase()``)."""
        for k in keys:
            self.erase(k)

    @_api
    def erase_prefix(self, prefix: str) -> None:
        """Delete every key under a ``"dir/"`` prefix (``"/"``: everything); a missing prefix is a no-op.

        The prefix must end with ``/``: ``erase_prefix("dir1")`` is refused
        rather than guessed (it could mean ``dir1/`` or every key starting
        with ``dir1``, such as ``dir10/…``).
        """
        p = self._prefix(prefix, "erase_prefix")
        self._check_writable()
        for k in list(self._keys(p)):
            with contextlib.suppress(MissingKeyError):
                self._erase(k)


class ListableStore(BaseStore):
    """A store that can list keys (simplezarr ``list*``; zarr's async ``list*``).

    ``list_prefix`` and ``list_dir`` default to filtering ``list()``; built-in
    stores list only the requested directory.
    """

    @_api
    def list(self) -> Any:  # type: ignore[override]
        """All keys, sorted (a ``list``; a :class:`KeyList` inside a running event loop)."""
        if _in_event_loop():
            return KeyList(lambda: list(self._keys("")), self._zlist)
        return sorted(self._keys(""))

    @_api
    def list_prefix(self, prefix: str) -> Any:  # type: ignore[override]
        """Every key under a ``"dir/"`` prefix (recursive, full keys); the root is ``"/"``."""
        if _in_event_loop():
            return KeyList(
                lambda: list(self._keys(self._prefix(prefix, "list_prefix"))),
                lambda: self._zlist_prefix(prefix),
            )
        return sorted(self._keys(self._prefix(prefix, "list_prefix")))

    @_api
    def list_dir(self, prefix: str) -> Any:  # type: ignore[override]
        """Keys and ``"dir/sub/"`` prefixes directly inside ``"dir/"``; ``async for`` yields zarr's relative names."""
        if _in_event_loop():
            return KeyList(
                lambda: self._dir(self._prefix(prefix, "list_dir")), lambda: self._zlist_dir(prefix)
            )
        return self._dir(self._prefix(prefix, "list_dir"))


class _Base3(ReadableStore, WritableStore, ListableStore):
    """Readable, writable and listable."""


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

    # Pickled by state (the default): the wrapped store pickles as its spec, and
    # subclasses keep every attribute whatever their __init__ takes.

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
