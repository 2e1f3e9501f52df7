"""Object stores (``s3://``, ``gs://``, ``az://``, ``http(s)://``) through obstore; ``memory://`` through fsspec.

``s3://``, ``gs://``, ``az://`` and ``http(s)://`` go through obstore
(:mod:`dask_loom.storage._obstore`: a tenth of s3fs's cold cost), with its
synchronous calls for simplezarr and its ``_async`` calls for zarr, so many
chunk requests are in flight at once.  Other fsspec URLs (``memory://``, the
tests' and doctests' store) keep fsspec: its ordinary filesystem for
synchronous calls, an asynchronous instance bound to zarr's event loop where
the filesystem has one.  Transient failures (5xx, timeouts, dropped
connections) are retried with exponential backoff (``dask_loom.retries``,
``dask_loom.retry-backoff``), then raised as :class:`~dask_loom.errors.StoreError`
naming the store and key; refused credentials fail at once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from dask_loom._config import get_config
from dask_loom.errors import MissingKeyError, StoreError
from dask_loom.storage._obstore import (
    classify_obstore,
    classify_status,
    cut,
    fsspec_options,
    is_native,
    message,
    native_store,
    nexists,
    nexists_async,
    nget,
    nget_async,
    nlist,
    prefix_async,
    suffix_async,
)
from dask_loom.storage._stores import (
    BaseStore,
    LocalStore,
    MemoryStore,
    Req,
    _Base3,
    _slice,
)
from dask_loom.storage._urls import check_scheme, is_url, redact_url

__all__ = ["ObjectStore", "open_store"]


class CredentialsError(StoreError, PermissionError):
    """The object store refused the credentials (or access to the key)."""


_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs's translation of 503 SlowDown
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
}


def _status(exc: BaseException) -> int | None:
    # s3fs re-raises botocore's ClientError as a bare OSError (EREMOTEIO for a
    # 500): the HTTP status is only on the exception it was raised from.
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for attr in ("status", "status_code", "code"):
            v = getattr(e, attr, None)
            if isinstance(v, int):
                return v
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(v, int):
                return v
        e = e.__cause__ or e.__context__
    return None


def _classify(exc: BaseException) -> str:
    """``"missing"``, ``"denied"``, ``"transient"`` or ``"fatal"``."""
    if isinstance(exc, (FileNotFoundError, MissingKeyError)):
        return "missing"
    if isinstance(exc, PermissionError):
        return "denied"
    if type(exc).__module__.startswith("obstore"):
        kind = classify_obstore(exc)
        if kind is not None:
            return kind
    if any(w in type(exc).__name__ for w in ("ChecksumError", "PayloadError", "IncompleteRead")):
        # A body cut short or damaged on the way (aiohttp reports a cut body with status 400).
        return "transient"
    status = _status(exc)
    if status is not None:
        return classify_status(status)
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return "transient"
    name = type(exc).__name__
    # A body that fails its checksum (botocore's FlexibleChecksumError) or ends early came back
    # damaged on the way (a proxy, a cache): asked again, as any transient fault.
    if any(
        w in name
        for w in (
            "Timeout",
            "Connect",
            "Connection",
            "EndpointConnection",
            "ServerDisconnected",
            "ClientOSError",
            "ChecksumError",
            "PayloadError",
            "IncompleteRead",
        )
    ):
        return "transient"
    if isinstance(exc, OSError):
        if exc.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "denied"
        text = str(exc).lower()
        if any(
            w in text
            for w in (
                "503",
                "500",
                "502",
                "504",
                "slow down",
                "unavailable",
                "internal error",
                "timed out",
                "timeout",
                "connection",
            )
        ):
            return "transient"
        if any(
            w in text
            for w in ("access denied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch", "403")
        ):
            return "denied"
    return "fatal"


# Schemes whose fsspec filesystem sends a negative start as a suffix range ("bytes=-n").
_SUFFIX_RANGES = frozenset({"s3", "s3a"})
_HEX = frozenset("0123456789abcdef")


def _tags(info: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(content MD5, ETag)`` of an object from its listing entry."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"') or None
    return _content_md5(info), etag


def _content_md5(info: dict[str, Any]) -> str | None:
    """The MD5 (hex) of an object's content from its listing entry, where the store tells it."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    if len(etag) == 32 and set(etag) <= _HEX:
        return etag  # S3 single-part upload (a multipart ETag has a "-N" suffix)
    b64 = info.get("md5Hash")  # GCS
    if isinstance(b64, str):
        import base64
        import binascii

        try:
            return base64.b64decode(b64).hex()
        except (binascii.Error, ValueError):
            return None
    return None


class ObjectStore(_Base3):
    """A store on an object store or any fsspec URL, as one prefix (``s3://bucket/x.zarr``).

    Parameters
    ----------
    url
        Root URL of the store.
    storage_options
        Credentials and endpoint, s3fs-style (``key``, ``secret``,
        ``endpoint_url``/``client_kwargs`` …) or obstore's own keys
        (:func:`~dask_loom.storage._obstore.translate_options`); never printed.
    read_only
        Refuse writes (always true for ``http(s)://``).

    Examples
    --------
    >>> from dask_loom.stores import ObjectStore
    >>> s = ObjectStore("memory://doc-example")
    >>> s.set("a/b", b"1")
    >>> s.list_dir("/"), s.get("a/b")
    (['a/'], b'1')
    >>> s.erase_prefix("/")
    """

    _blocking_io = True

    def __init__(
        self, url: str, *, storage_options: dict[str, Any] | None = None, read_only: bool = False
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"ObjectStore url must be a str, not {type(url).__name__}")
        scheme = check_scheme(url)
        if scheme in ("http", "https"):
            read_only = True
        super().__init__(read_only=read_only)
        self.url = url.rstrip("/")
        self.scheme = scheme
        self.storage_options = dict(storage_options or {})
        self._local = threading.local()
        self._afs_by_loop: dict[int, Any] = {}
        self._root: str | None = None
        self._is_native = is_native(self.url)
        self._nat: tuple[int, Any, str] | None = None
        self._early: Any = None

    def adopt_early(self, early: Any) -> bool:
        """Serve the first reads (and listing) from *early* (:class:`~dask_loom.storage._obstore.EarlyReads`).

        Only when it read this very store and root (returns whether it did);
        never pickled with the store.  ``None`` drops what is left of them
        (the store was written to).
        """
        nat = self._native() if early is not None else None
        self._early = early if nat is not None and early.store is nat[0] and early.root == nat[1] else None
        return self._early is not None

    # -- identity ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return redact_url(self.url)

    def _spec(self) -> Any:
        return (self.url, sorted((k, repr(v)) for k, v in self.storage_options.items()))

    def _copy(self, *, read_only: bool) -> ObjectStore:
        copy = ObjectStore(self.url, storage_options=self.storage_options, read_only=read_only)
        copy._early = self._early  # the same one-shot reads: whichever asks first takes each
        return copy

    def __reduce__(self) -> Any:
        return (_object_from_state, (self.url, self.storage_options, self.read_only))

    def __repr__(self) -> str:  # storage options may hold credentials: never print them
        return f"ObjectStore({self.name!r})"

    def __str__(self) -> str:
        return self.name

    @property
    def supports_listing(self) -> bool:
        return self.scheme not in ("http", "https")

    # -- clients ---------------------------------------------------------------------------
    def _native(self) -> tuple[Any, str] | None:
        """This process's obstore store and the root path below it, or ``None`` for an fsspec URL."""
        if not self._is_native or not is_native(self.url):  # a forked child may have to fall back to fsspec
            return None
        held = self._nat
        if held is None or held[0] != os.getpid():  # a forked child builds its own client
            store, root = native_store(self.url, self.storage_options)
            held = self._nat = (os.getpid(), store, root)
        return held[1], held[2]

    def _npath(self, root: str, key: str) -> str:
        return f"{root}/{key}" if root and key else root or key

    def _fs(self) -> Any:
        fs = getattr(self._local, "fs", None)
        if fs is None:
            import fsspec.core

            fs, root = fsspec.core.url_to_fs(self.url, **fsspec_options(self.url, self.storage_options))
            self._root = root.rstrip("/")
            self._local.fs = fs
        return fs

    def _path(self, key: str) -> str:
        self._fs()
        return f"{self._root}/{key}" if key else str(self._root)

    async def _afs(self) -> Any:
        loop = asyncio.get_running_loop()
        held = self._afs_by_loop.get(id(loop))
        # An id can be reused by a later loop once the old one is gone: check identity.
        fs = held[1] if held is not None and held[0] is loop else None
        if fs is None:
            import fsspec

            sync_fs = self._fs()
            if not getattr(sync_fs, "async_impl", False):
                fs = False  # no async implementation: run the sync calls in threads
            else:
                fs = fsspec.filesystem(
                    sync_fs.protocol if isinstance(sync_fs.protocol, str) else sync_fs.protocol[0],
                    asynchronous=True,
                    loop=loop,
                    skip_instance_cache=True,
                    **fsspec_options(self.url, self.storage_options),
                )
                if hasattr(fs, "set_session"):
                    await fs.set_session()
            self._afs_by_loop = {k: v for k, v in self._afs_by_loop.items() if not v[0].is_closed()}
            self._afs_by_loop[id(loop)] = (loop, fs)
        return fs

    def _whole_kw(self, fs: Any) -> dict[str, Any]:
        # s3fs asks for the size (a HEAD) before every whole-object GET, to split
        # large objects into concurrent ranges; whole objects read here are small
        # (metadata, attribute values, unsharded chunks): one GET each.
        s3fs = self.scheme in _SUFFIX_RANGES and hasattr(fs, "max_concurrency")
        return {"max_concurrency": 1} if s3fs else {}

    # -- retries ----------------------------------------------------------------------------
    def _fail(self, op: str, key: str, exc: BaseException, attempts: int) -> BaseException:
        kind = _classify(exc)
        if kind == "missing":
            return self._missing(key)
        if kind == "denied":
            return CredentialsError(f"{self.name}: access to {key or '/'!r} refused ({op}): {message(exc)}")
        if kind == "transient":
            return StoreError(
                f"{self.name}: {op} {key or '/'!r} failed after {attempts} attempts: {type(exc).__name__}: {message(exc)}"
            )
        return StoreError(f"{self.name}: {op} {key or '/'!r} failed: {type(exc).__name__}: {message(exc)}")

    def _retry(self, op: str, key: str, fn: Callable[[], Any]) -> Any:
        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))
        for attempt in range(retries + 1):
            try:
                return fn()
            except (MissingKeyError, StoreError):
                raise
            except Exception as exc:
                if _classify(exc) != "transient" or attempt == retries:
                    raise self._fail(op, key, exc, attempt + 1) from exc
                time.sleep(backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _aretry(self, op: str, key: str, fn: Callable[[], Any]) -> Any:
        retries = int(get_config("retries"))
        backoff = float(get_config("retry-backoff"))
        for attempt in range(retries + 1):
            try:
                return await fn()
            except (MissingKeyError, StoreError):
                raise
            except Exception as exc:
                if _classify(exc) != "transient" or attempt == retries:
                    raise self._fail(op, key, exc, attempt + 1) from exc
                await asyncio.sleep(backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- sync primitives ---------------------------------------------------------------
    def _get(self, key: str, req: Req = None) -> bytes:
        nat = self._native()
        if nat is not None:
            early = self._early
            got = early.take(key) if early is not None else None
            if got is not None:
                return got if req is None else cut(got, req)
            return self._retry("get", key, lambda: nget(nat[0], self._npath(nat[1], key), req))
        path = self._path(key)
        fs = self._fs()

        def go() -> bytes:
            if req is None:
                return fs.cat_file(path, **self._whole_kw(fs))
            if req[0] == "suffix":
                if not req[1]:
                    fs.info(path)
                    return b""
                if self.scheme in _SUFFIX_RANGES:
                    return fs.cat_file(path, start=-int(req[1]))
                size = fs.size(path)
                return fs.cat_file(path, start=max(0, size - int(req[1])), end=size)
            start, length = int(req[0]), req[1]
            if length == 0:
                fs.info(path)
                return b""
            return fs.cat_file(path, start=start, end=None if length is None else start + int(length))

        return self._retry("get", key, go)

    def _exists(self, key: str) -> bool:
        nat = self._native()
        if nat is not None:
            return bool(self._retry("exists", key, lambda: nexists(nat[0], self._npath(nat[1], key))))
        fs = self._fs()
        path = self._path(key)
        return bool(self._retry("exists", key, lambda: fs.isfile(path)))

    def _size(self, key: str) -> int:
        nat = self._native()
        if nat is not None:
            import obstore

            return int(
                self._retry("size", key, lambda: obstore.head(nat[0], self._npath(nat[1], key))["size"])
            )
        fs = self._fs()
        path = self._path(key)
        return int(self._retry("size", key, lambda: fs.size(path)))

    def _set(self, key: str, data: bytes) -> None:
        nat = self._native()
        if nat is not None:
            import obstore

            self._retry("set", key, lambda: obstore.put(nat[0], self._npath(nat[1], key), bytes(data)))
            return
        fs = self._fs()
        path = self._path(key)
        self._retry("set", key, lambda: fs.pipe_file(path, data))

    def _erase(self, key: str) -> None:
        nat = self._native()
        if nat is not None:
            import obstore

            path = self._npath(nat[1], key)

            def erase() -> None:
                obstore.head(nat[0], path)  # a missing key is an error here, as on a file system
                obstore.delete(nat[0], path)

            self._retry("erase", key, erase)
            return
        fs = self._fs()
        path = self._path(key)

        def go() -> None:
            if not fs.isfile(path):
                raise FileNotFoundError(path)
            fs.rm_file(path)

        self._retry("erase", key, go)

    def _keys(self, prefix: str) -> list[str]:
        nat = self._native()
        if nat is not None:
            root = nat[1]
            found = self._retry("list", prefix, lambda: nlist(nat[0], self._npath(root, prefix.rstrip("/"))))
            rels = [p[len(root) + 1 :] if root else p for p in (m["path"] for m in found)]
            return sorted(k for k in rels if k.startswith(prefix))
        fs = self._fs()
        base = self._path(prefix.rstrip("/"))
        root = str(self._root)

        def go() -> list[str]:
            try:
                found = fs.find(base)
            except FileNotFoundError:
                return []
            return found

        out = []
        for p in self._retry("list", prefix, go):
            p = p.rstrip("/")
            if p.startswith(root + "/"):
                out.append(p[len(root) + 1 :])
            elif not root and p:
                out.append(p)
        return sorted(k for k in out if k.startswith(prefix))

    def _dir(self, prefix: str) -> list[str]:
        # One level (a delimiter listing), not every key below the prefix.
        nat = self._native()
        if nat is not None:
            import obstore

            root = nat[1]
            got = self._retry(
                "list",
                prefix,
                lambda: obstore.list_with_delimiter(nat[0], self._npath(root, prefix.rstrip("/")) or None),
            )
            names = [(p, True) for p in got["common_prefixes"]] + [(m["path"], False) for m in got["objects"]]
            found = set()
            for name, is_dir in names:
                rel = name.rstrip("/")[len(root) + 1 :] if root else name.rstrip("/")
                if rel.startswith(prefix) and rel != prefix.rstrip("/"):
                    found.add(rel + "/" if is_dir else rel)
            return sorted(found)
        fs = self._fs()
        base = self._path(prefix.rstrip("/"))
        root = str(self._root)

        def go() -> list[dict[str, Any]]:
            try:
                return fs.ls(base, detail=True)
            except FileNotFoundError:
                return []

        out = set()
        for info in self._retry("list", prefix, go):
            name = str(info.get("name", "")).rstrip("/")
            if root and not name.startswith(root + "/"):
                continue
            rel = name[len(root) + 1 :] if root else name
            if not rel.startswith(prefix) or rel == prefix.rstrip("/"):
                continue
            out.add(rel + "/" if info.get("type") == "directory" else rel)
        return sorted(out)

    def content_digests(self, *, limit: int) -> dict[str, tuple[str | None, str | None]] | None:
        """Every key of the store with ``(MD5 of its content, ETag)`` as the listing tells them (``None`` where not).

        One listing (a request per thousand keys on S3): an S3 ``ETag`` of a
        single-part upload is the MD5 of the object, GCS lists ``md5Hash``;
        Azure's ``ETag`` is an opaque version that changes with every write.
        Returns ``None`` altogether when the store holds more than *limit*
        keys (S3 stops paging there) or cannot be listed.
        """
        if not self.supports_listing:
            return None
        nat = self._native()
        if nat is not None:
            root = nat[1]
            taken, infos = self._early.take_listing() if self._early is not None else (False, None)
            if not taken:
                infos = self._retry("list", "", lambda: nlist(nat[0], root, limit=limit))
            if infos is None:
                return None
            head = f"{root}/" if root else ""
            return {m["path"][len(head) :]: _tags({"ETag": m.get("e_tag")}) for m in infos}
        fs = self._fs()
        root = str(self._root)
        if hasattr(fs, "_iterdir") and hasattr(fs, "split_path") and getattr(fs, "loop", None) is not None:
            from fsspec.asyn import sync

            bucket, prefix, _ = fs.split_path(root)
            head = f"{bucket}/{prefix}/" if prefix else f"{bucket}/"

            async def pages() -> list[dict[str, Any]] | None:
                out = []
                async for info in fs._iterdir(bucket, delimiter="", prefix=head[len(bucket) + 1 :]):
                    out.append(info)
                    if len(out) > limit:
                        return None
                return out

            infos = self._retry("list", "", lambda: sync(fs.loop, pages))
            if infos is None:
                return None
            names = [(str(i.get("name", "")), i) for i in infos]
        else:
            try:
                found = self._retry("list", "", lambda: fs.find(root, detail=True))
            except MissingKeyError:
                return {}
            if len(found) > limit:
                return None
            names = list(found.items())
            head = root.rstrip("/") + "/"
        return {name[len(head) :]: _tags(info) for name, info in names if name.startswith(head)}

    # -- async primitives --------------------------------------------------------------
    async def _aget(self, key: str, req: Req = None) -> bytes:
        nat = self._native()
        if nat is not None:
            early = self._early
            got = await early.atake(key) if early is not None else None
            if got is not None:
                return got if req is None else cut(got, req)
            return await self._aretry("get", key, lambda: nget_async(nat[0], self._npath(nat[1], key), req))
        fs = await self._afs()
        if fs is False:
            return await asyncio.to_thread(self._get, key, req)
        path = self._path(key)

        async def go() -> bytes:
            if req is None:
                return await fs._cat_file(path, **self._whole_kw(fs))
            if req[0] == "suffix":
                n = int(req[1])
                if n and self.scheme in _SUFFIX_RANGES:
                    # One GET with "Range: bytes=-n" (a shard index): no HEAD, not the whole object.
                    return await fs._cat_file(path, start=-n)
                data = await fs._cat_file(path)
                return _slice(data, req)
            start, length = int(req[0]), req[1]
            if length == 0:
                await fs._info(path)
                return b""
            return await fs._cat_file(path, start=start, end=None if length is None else start + int(length))

        return await self._aretry("get", key, go)

    async def _aget_tail(self, key: str, n: int) -> tuple[bytes, int | None]:
        """The last *n* bytes of object *key* (all of it when smaller) and the object's size, in one request.

        Through obstore the size comes from the answer's ``Content-Range``
        (Azure, which has no suffix ranges, asks for it first); through
        fsspec, on S3 likewise, elsewhere it is ``None`` (unknown).  Raises
        :class:`MissingKeyError` when the object does not exist.
        """
        nat = self._native()
        if nat is not None and n > 0:
            path = self._npath(nat[1], key)
            return await self._aretry("get", key, lambda: suffix_async(nat[0], path, int(n)))
        fs = await self._afs()
        if fs is False or self.scheme not in _SUFFIX_RANGES or not hasattr(fs, "_call_s3"):
            return await self._aget(key, ("suffix", n)), None
        path = self._path(key)
        bucket, obj, _ = fs.split_path(path)

        async def go() -> tuple[bytes, int | None]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=obj, Range=f"bytes=-{int(n)}")
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            total = str(resp.get("ContentRange") or "").rpartition("/")[2]
            return body, int(total) if total.isdigit() else None

        return await self._aretry("get", key, go)

    async def _aget_head(self, key: str, n: int) -> tuple[bytes, int | None]:
        """The first *n* bytes of object *key* (all of it when smaller) and the object's size, in one request.

        Through obstore the size comes from the answer's ``Content-Range``, on
        every store (a bounded range, which Azure has too); through fsspec it is
        ``None`` (unknown).  Raises :class:`MissingKeyError` when the object
        does not exist.
        """
        nat = self._native()
        if nat is not None and n > 0:
            path = self._npath(nat[1], key)
            return await self._aretry("get", key, lambda: prefix_async(nat[0], path, int(n)))
        return await self._aget(key, (0, int(n))), None

    async def _aset(self, key: str, data: bytes) -> None:
        nat = self._native()
        if nat is not None:
            import obstore

            path = self._npath(nat[1], key)
            await self._aretry("set", key, lambda: obstore.put_async(nat[0], path, bytes(data)))
            return
        fs = await self._afs()
        if fs is False:
            await asyncio.to_thread(self._set, key, data)
            return
        path = self._path(key)
        await self._aretry("set", key, lambda: fs._pipe_file(path, data))

    async def _aerase(self, key: str) -> None:
        nat = self._native()
        if nat is not None:
            import obstore

            path = self._npath(nat[1], key)

            async def erase() -> None:
                await obstore.head_async(nat[0], path)
                await obstore.delete_async(nat[0], path)

            await self._aretry("erase", key, erase)
            return
        fs = await self._afs()
        if fs is False:
            await asyncio.to_thread(self._erase, key)
            return
        path = self._path(key)
        await self._aretry("erase", key, lambda: fs._rm_file(path))

    async def _aexists(self, key: str) -> bool:
        nat = self._native()
        if nat is not None:
            return bool(
                await self._aretry("exists", key, lambda: nexists_async(nat[0], self._npath(nat[1], key)))
            )
        fs = await self._afs()
        if fs is False:
            return await asyncio.to_thread(self._exists, key)
        path = self._path(key)
        return bool(await self._aretry("exists", key, lambda: fs._isfile(path)))

    async def _akeys(self, prefix: str) -> list[str]:
        # Listing is rare (opening groups); the sync path in a thread keeps it simple.
        return await asyncio.to_thread(self._keys, prefix)


def _object_from_state(url: str, options: dict[str, Any], read_only: bool) -> ObjectStore:
    return ObjectStore(url, storage_options=options, read_only=read_only)


def open_store(
    url: str | os.PathLike[str] | BaseStore, *, read_only: bool = False, **storage_options: Any
) -> BaseStore:
    """Resolve a path or URL to a store.

    A local path (or ``file://`` URL) gives a :class:`LocalStore`; ``s3://``,
    ``gs://``, ``az://``, ``http(s)://``, ``memory://`` … an
    :class:`ObjectStore`; a store is returned as is.  URL schemes outside
    :data:`~dask_loom.storage.ALLOWED_SCHEMES` are refused.

    Examples
    --------
    >>> from dask_loom.stores import open_store
    >>> open_store("/tmp/x.zarr")
    LocalStore('/tmp/x.zarr')
    >>> open_store("s3://bucket/x.zarr", anon=True)
    ObjectStore('s3://bucket/x.zarr')
    """
    if isinstance(url, BaseStore):
        return url.with_read_only(True) if read_only and not url.read_only else url
    if isinstance(url, dict):
        return MemoryStore(url, read_only=read_only)
    text = os.fspath(url)
    scheme = check_scheme(text)
    if not is_url(text):
        return LocalStore(text, read_only=read_only)
    if scheme == "file":
        return LocalStore(text.split("://", 1)[1], read_only=read_only)
    return ObjectStore(text, storage_options=storage_options, read_only=read_only)
