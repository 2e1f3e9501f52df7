"""obstore, the object-store client for ``s3://``, ``gs://``, ``az://`` and ``http(s)://`` URLs.

Chosen by measurement (``benchmarks/bench_client.py``): a fresh process pays
about 0.12 s for importing obstore and its first GET, against 1.2 s for
s3fs/aiobotocore (0.6 s of imports, 0.3 s for the first request).  Users'
storage options are accepted in the s3fs/gcsfs/adlfs spelling they pass today
(``key``, ``secret``, ``anon``, ``endpoint_url``, ``client_kwargs`` …) and
translated to obstore's configuration; obstore's own keys pass through.
Stores are built with obstore's retries off: retries are dask_loom's
(``dask_loom.retries``, ``dask_loom.retry-backoff``), counted and classified
the same for every backend.  One store per process, bucket and options.
obstore cannot be used in a child forked after its parent used it
(:func:`is_native`): such a child falls back to fsspec.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

# A key request: the whole object (None), (start, length or None), ("suffix", n).
Req = tuple[Any, Any] | None

__all__ = [
    "LIST_LIMIT",
    "NATIVE_SCHEMES",
    "EarlyReads",
    "classify_obstore",
    "classify_status",
    "cut",
    "fsspec_options",
    "is_native",
    "message",
    "native_store",
    "nexists",
    "nexists_async",
    "nget",
    "nget_async",
    "nlist",
    "prefix_async",
    "run_sync",
    "suffix_async",
    "translate_options",
]

# Objects listed before a listing gives up (20 pages on S3): the consolidated-metadata check
# of a store (dask_loom.zarr._consolidated) reads every document past it.
LIST_LIMIT = 20_000

# Schemes served by obstore; anything else (memory://, zip, chained URLs) stays on fsspec.
NATIVE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})

_KIND = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
         "http": "http", "https": "http"}  # fmt: skip

# fsspec-only knobs (listings caches, block sizes, botocore retries): nothing to translate.
_IGNORED = frozenset({
    "use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache", "default_block_size",
    "default_cache_type", "default_fill_cache", "cache_regions", "asynchronous", "loop", "use_ssl",
    "version_aware", "max_concurrency", "fixed_upload_size", "session", "config_kwargs", "client_kwargs",
    "s3_additional_kwargs", "requester_pays", "consistency", "cache_timeout", "block_size",
})  # fmt: skip

_PREFIX = {"s3": "aws_", "gcs": "google_", "azure": "azure_", "http": ""}

# s3fs / gcsfs / adlfs spellings -> obstore configuration keys.
_RENAMES = {
    "s3": {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token",
           "aws_access_key_id": "aws_access_key_id", "aws_secret_access_key": "aws_secret_access_key",
           "aws_session_token": "aws_session_token", "endpoint_url": "aws_endpoint", "region_name": "aws_region",
           "region": "aws_region", "anon": "aws_skip_signature"},
    "gcs": {"anon": "google_skip_signature", "project": None, "access": None, "endpoint_url": "google_base_url"},
    "azure": {"account_name": "azure_storage_account_name", "account_key": "azure_storage_account_key",
              "sas_token": "azure_storage_sas_key", "tenant_id": "azure_storage_tenant_id",
              "client_id": "azure_storage_client_id", "client_secret": "azure_storage_client_secret",
              "anon": "azure_skip_signature", "account_url": "azure_storage_endpoint"},
    "http": {},
}  # fmt: skip


def is_native(url: str) -> bool:
    """True when *url* is served by obstore in this process (one scheme, no ``::`` chain).

    obstore's runtime does not survive ``fork``: a child forked after its
    parent used obstore (a torch DataLoader worker, a fork pool) would hang on
    its first request, so such a child reads through fsspec instead
    (:func:`fsspec_options`); spawned processes and forks made before any
    object-store use keep obstore.
    """
    if _forked_after_use or "://" not in url:
        return False
    return url.split("://", 1)[0].lower() in NATIVE_SCHEMES


# obstore's configuration keys back to s3fs's, for a forked child's fsspec fallback.
_TO_S3FS = {"aws_access_key_id": "key", "access_key_id": "key", "aws_secret_access_key": "secret",
            "secret_access_key": "secret", "aws_session_token": "token", "session_token": "token",
            "aws_endpoint": "endpoint_url", "endpoint": "endpoint_url", "aws_skip_signature": "anon",
            "skip_signature": "anon"}  # fmt: skip


def fsspec_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """*options* for fsspec's filesystem of *url*: s3fs spellings kept, obstore's common S3 keys translated back."""
    if "://" not in url or url.split("://", 1)[0].lower() not in NATIVE_SCHEMES:
        return dict(options)
    if _forked_after_use:
        _check_fallback(url)
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k in ("client_options", "retry_config"):
            continue
        if k in ("aws_region", "region") and _KIND[url.split("://", 1)[0].lower()] == "s3":
            out.setdefault("client_kwargs", {})["region_name"] = v
        else:
            out[_TO_S3FS.get(k, k)] = v
    return out


def _check_fallback(url: str) -> None:
    """A forked child's fsspec fallback for *url* is installed, or a clear error saying what to do."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        from dask_loom.errors import StoreError
        from dask_loom.storage._redact import redact_url

        raise StoreError(
            f"{redact_url(url)}: this process was forked after its parent read through obstore, which cannot "
            "run in a forked child; start the workers with 'spawn' or 'forkserver' (torch DataLoader: "
            f"multiprocessing_context='spawn'), or install fsspec's {scheme}:// filesystem for the fallback "
            f"({exc})"
        ) from None


def _timeout(v: Any) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(v))


# An Azure connection string's fields (adlfs' ``connection_string``) -> obstore configuration keys.
_AZURE_CONNECTION = {"accountname": "azure_storage_account_name", "accountkey": "azure_storage_account_key",
                     "sharedaccesssignature": "azure_storage_sas_key", "blobendpoint": "azure_storage_endpoint"}  # fmt: skip


def _azure_connection_string(text: str) -> dict[str, Any]:
    """obstore configuration for an Azure connection string (``AccountName=…;AccountKey=…;BlobEndpoint=…``).

    ``UseDevelopmentStorage=true`` is Azurite's shorthand; fields for the
    other services (queues, tables, files) do not concern blobs and are
    skipped.  A malformed field is refused without echoing the string, which
    holds the account key.

    Examples
    --------
    >>> sorted(_azure_connection_string("AccountName=a;AccountKey=k==;BlobEndpoint=http://127.0.0.1:10000/a").items())
    [('azure_storage_account_key', 'k=='), ('azure_storage_account_name', 'a'), ('azure_storage_endpoint', 'http://127.0.0.1:10000/a')]
    """
    fields: dict[str, str] = {}
    for i, field in enumerate(f for f in str(text).split(";") if f.strip()):
        name, sep, value = field.partition("=")
        if not sep:
            raise ValueError(f"storage option 'connection_string': field {i + 1} is not NAME=VALUE")
        fields[name.strip().lower()] = value.strip()
    config = {_AZURE_CONNECTION[k]: v for k, v in fields.items() if k in _AZURE_CONNECTION}
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        config["azure_use_emulator"] = True
    elif "endpointsuffix" in fields and "accountname" in fields and "blobendpoint" not in fields:
        # A sovereign cloud (core.chinacloudapi.cn …): the blob endpoint is built from the suffix.
        protocol = fields.get("defaultendpointsprotocol", "https")
        config["azure_storage_endpoint"] = f"{protocol}://{fields['accountname']}.blob.{fields['endpointsuffix']}"
    return config


def translate_options(scheme: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """obstore ``(config, client_options)`` for the storage options a user passed (s3fs-style or obstore's own).

    Examples
    --------
    >>> config, client = translate_options("s3", {"key": "K", "secret": "S", "endpoint_url": "http://127.0.0.1:9000"})
    >>> sorted(config), client
    (['aws_access_key_id', 'aws_endpoint', 'aws_secret_access_key'], {'allow_http': True})
    """
    kind = _KIND[scheme.lower()]
    renames = _RENAMES[kind]
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for k, v in options.items():
        if k == "client_options":
            client.update(v or {})
        elif k == "retry_config":
            continue  # retries are ours (module docstring)
        elif k == "client_kwargs" and isinstance(v, dict):
            for ck, cv in v.items():
                if ck in ("endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key",
                          "aws_session_token") and kind == "s3":  # fmt: skip
                    config[renames[ck]] = cv
                elif ck == "verify" and cv is False:
                    client["allow_invalid_certificates"] = True
                elif ck == "headers" and isinstance(cv, dict):
                    client["default_headers"] = dict(cv)
        elif k == "config_kwargs" and isinstance(v, dict):
            if "connect_timeout" in v:
                client["connect_timeout"] = _timeout(v["connect_timeout"])
            if "read_timeout" in v:
                client["timeout"] = _timeout(v["read_timeout"])
            if (v.get("s3") or {}).get("addressing_style") == "virtual":
                config["aws_virtual_hosted_style_request"] = True
        elif k == "token" and kind == "gcs":
            if v in ("anon", None):
                config["google_skip_signature"] = True
            elif isinstance(v, str) and os.path.exists(v):
                config["google_service_account"] = v
        elif k == "connection_string" and kind == "azure":
            config.update(_azure_connection_string(v))
        elif k == "requester_pays" and kind == "s3":
            if v:
                config["aws_request_payer"] = True
        elif k in renames:
            if renames[k] is not None and v is not None:
                config[renames[k]] = v
        elif k in _IGNORED:
            continue
        elif kind != "http" and (
            k.startswith(_PREFIX[kind]) or not k.startswith(("aws_", "google_", "azure_"))
        ):
            # obstore's own keys ("aws_region", "region", "skip_signature" …): it refuses unknown ones by name.
            config[k] = v
        else:
            raise ValueError(f"storage option {k!r} does not apply to {scheme}:// URLs")
    for k in [k for k, v in config.items() if k.endswith("skip_signature")]:
        if not config[k]:
            del config[k]
    endpoint = next((str(v) for k, v in config.items() if k.endswith(("endpoint", "base_url")) and v), "")
    if endpoint.startswith("http://") or config.get("azure_use_emulator") or config.get("use_emulator"):
        client.setdefault("allow_http", True)
    if kind == "http" and scheme.lower() == "http":
        client.setdefault("allow_http", True)
    return config, client


# -- stores -------------------------------------------------------------------------------
_stores: dict[Any, Any] = {}
_stores_lock = threading.Lock()


_used_in: int | None = None  # the process that built an obstore store (its runtime is then running)
_forked_after_use = False


def _forget_after_fork() -> None:
    global _stores_lock, _loop, _loop_lock, _forked_after_use
    _forked_after_use = _forked_after_use or _used_in is not None
    _stores.clear()
    _stores_lock = threading.Lock()
    _loop = None
    _loop_lock = threading.Lock()


def _split(url: str) -> tuple[str, str, str]:
    """``(scheme, root, path)``: the bucket/container/host part a store is built for, and the key below it."""
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if _KIND[scheme] == "http":
        host, _, path = rest.partition("/")
        return scheme, f"{scheme}://{host}", path
    bucket, _, path = rest.partition("/")
    return scheme, bucket, path


def native_store(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """The process's obstore store for *url*'s bucket (or host) and *options*, and the object path below it."""
    global _used_in
    _used_in = os.getpid()
    scheme, root, path = _split(url)
    key = (_KIND[scheme], root, sorted((k, repr(v)) for k, v in options.items()))
    store = _stores.get(repr(key))
    if store is None:
        with _stores_lock:
            store = _stores.get(repr(key))
            if store is None:
                store = _build(scheme, root, options)
                _stores[repr(key)] = store
    return store, path.strip("/")


def _build(scheme: str, root: str, options: dict[str, Any]) -> Any:
    from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

    config, client = translate_options(scheme, options)
    retry = {"max_retries": 0, "retry_timeout": datetime.timedelta(0)}
    kind = _KIND[scheme]
    if kind == "s3":
        return S3Store(root, config=config, client_options=client, retry_config=retry)
    if kind == "gcs":
        return GCSStore(root, config=config, client_options=client, retry_config=retry)
    if kind == "azure":
        if "@" in root:  # abfs://container@account.dfs.core.windows.net/...
            return AzureStore.from_url(
                f"{scheme}://{root}", config=config, client_options=client, retry_config=retry
            )
        return AzureStore(root, config=config, client_options=client, retry_config=retry)
    return HTTPStore.from_url(root, client_options=client, retry_config=retry)


_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_OS_MESSAGE = re.compile(r'message: "([^"]*)"')


def message(exc: BaseException) -> str:
    """*exc*'s text without obstore's multi-line debug dump, its root cause (``connect error: Connection refused``) kept."""
    text = str(exc)
    head, _, debug = text.partition("\n\nDebug source")
    cause = [f"{k.lower()} error" for k in _HTTP_KIND.findall(debug)[:1]] + _OS_MESSAGE.findall(debug)[-1:]
    return head.strip() + (f" ({': '.join(cause)})" if cause else "")


_STATUS = re.compile(r"status code: (\d{3})")


def classify_status(status: int) -> str:
    """What an HTTP error *status* means for a retry: missing, denied, transient or fatal."""
    if status == 404:
        return "missing"
    if status in (401, 403):
        return "denied"
    if status >= 500 or status in (408, 429):
        return "transient"
    return "fatal"


def classify_obstore(exc: BaseException) -> str | None:
    """``"missing"``, ``"denied"``, ``"transient"``, ``"fatal"`` for an obstore exception; ``None`` when unsure."""
    # obstore raises FileNotFoundError for a 404, its own classes otherwise; a 5xx, a
    # timeout or a cut body is a GenericError whose text carries the HTTP status or cause.
    kind = type(exc).__name__
    if kind in ("PermissionDeniedError", "UnauthenticatedError"):
        return "denied"
    if kind == "NotFoundError":
        return "missing"
    if kind not in ("GenericError", "BaseError", "JoinError"):
        return None
    text = message(exc)
    m = _STATUS.search(text)
    if m is not None:
        return classify_status(int(m.group(1)))
    low = text.lower()
    if any(w in low for w in ("timed out", "timeout", "connect", "error sending request", "decod", "body",
                              "incomplete", "reset", "broken pipe", "closed")):  # fmt: skip
        return "transient"
    return None


# -- calls with dask_loom's request shapes (Req: None, (start, length), ("suffix", n)) -----------
def nget(store: Any, path: str, req: Req) -> bytes:
    import obstore

    try:
        return _nget_range(store, path, req)
    except Exception as exc:
        if req is None or type(exc).__name__ != "NotSupportedError":
            raise
    # A web server that ignores Range headers (python's http.server): the whole object, cut here.
    return cut(bytes(obstore.get(store, path).bytes()), req)


def _nget_range(store: Any, path: str, req: Req) -> bytes:
    import obstore

    if req is None:
        return bytes(obstore.get(store, path).bytes())
    if req[0] == "suffix":
        n = int(req[1])
        if not n:
            obstore.head(store, path)
            return b""
        return run_sync(lambda: suffix_async(store, path, n))[0]  # Azure's missing suffix ranges: there
    start, length = int(req[0]), req[1]
    if length == 0:
        obstore.head(store, path)
        return b""
    if length is None:
        return bytes(obstore.get(store, path, options={"range": {"offset": start}}).bytes())
    return bytes(obstore.get_range(store, path, start=start, length=int(length)))


async def nget_async(store: Any, path: str, req: Req) -> bytes:
    import obstore

    try:
        return await _nget_range_async(store, path, req)
    except Exception as exc:
        if req is None or type(exc).__name__ != "NotSupportedError":
            raise
    return cut(bytes(await (await obstore.get_async(store, path)).bytes_async()), req)


async def _nget_range_async(store: Any, path: str, req: Req) -> bytes:
    import obstore

    if req is None:
        got = await obstore.get_async(store, path)
    elif req[0] == "suffix" and int(req[1]):
        return (await suffix_async(store, path, int(req[1])))[0]
    elif req[0] == "suffix" or req[1] == 0:
        await obstore.head_async(store, path)
        return b""
    elif req[1] is None:
        got = await obstore.get_async(store, path, options={"range": {"offset": int(req[0])}})
    else:
        return bytes(await obstore.get_range_async(store, path, start=int(req[0]), length=int(req[1])))
    return bytes(await got.bytes_async())


async def prefix_async(store: Any, path: str, n: int) -> tuple[bytes, int]:
    """The first *n* bytes of an object (all of it when smaller) and its size, in one request on every store.

    A plain bounded range: the answer's ``Content-Range`` tells the size, and
    a range past the end is cut to the object (no suffix range, which Azure
    lacks, and no ``HEAD``).  A web server that ignores ranges sends the
    whole object, cut here.
    """
    import obstore

    try:
        got = await obstore.get_async(store, path, options={"range": (0, int(n))})
        return bytes(await got.bytes_async()), int(got.meta["size"])
    except Exception as exc:
        if type(exc).__name__ != "NotSupportedError":
            await _raise_unless_empty(store, path, exc)
            return b"", 0
    whole = await _whole_async(store, path)
    return whole[: int(n)], len(whole)


async def _raise_unless_empty(store: Any, path: str, exc: BaseException) -> None:
    # An empty object answers a ranged GET with 416 or a whole (empty) body, which obstore
    # refuses: its reader then says what an empty object is (a truncated shard); else *exc*.
    import obstore

    if isinstance(exc, FileNotFoundError):  # an absent shard is common (never written): no HEAD for it
        raise exc
    try:
        size = int((await obstore.head_async(store, path))["size"])
    except Exception:
        raise exc from None
    if size != 0:
        raise exc


async def _whole_async(store: Any, path: str) -> bytes:
    # A web server that ignores Range headers (python's http.server): obstore refuses its whole
    # answer to a ranged GET, so the object is fetched whole and cut here.
    import obstore

    return bytes(await (await obstore.get_async(store, path)).bytes_async())


async def suffix_async(store: Any, path: str, n: int) -> tuple[bytes, int]:
    """The last *n* bytes of an object (all of it when smaller) and its size: one request, two on Azure.

    Azure's blob API has no suffix ranges (obstore refuses them before
    sending anything), so there the size comes from a ``HEAD`` first.  A web
    server that ignores ranges sends the whole object, cut here.
    """
    import obstore

    try:
        got = await obstore.get_async(store, path, options={"range": {"suffix": n}})
        return bytes(await got.bytes_async()), int(got.meta["size"])
    except Exception as exc:
        if type(exc).__name__ != "NotSupportedError":
            await _raise_unless_empty(store, path, exc)
            return b"", 0
    size = int((await obstore.head_async(store, path))["size"])
    if not size:
        return b"", 0
    try:
        return bytes(await obstore.get_range_async(store, path, start=max(size - n, 0), end=size)), size
    except Exception as exc:
        if type(exc).__name__ != "NotSupportedError":
            raise
    whole = await _whole_async(store, path)
    return whole[-n:], len(whole)


def nexists(store: Any, path: str) -> bool:
    import obstore

    try:
        obstore.head(store, path)
    except FileNotFoundError:
        return False
    return True


async def nexists_async(store: Any, path: str) -> bool:
    import obstore

    try:
        await obstore.head_async(store, path)
    except FileNotFoundError:
        return False
    return True


def nlist(store: Any, prefix: str, *, limit: int | None = None) -> list[dict[str, Any]] | None:
    """Every object below *prefix* (a request per thousand keys); ``None`` past *limit* objects."""
    import obstore

    out: list[dict[str, Any]] = []
    for batch in obstore.list(store, prefix or None, chunk_size=1000):
        out.extend(batch)
        if limit is not None and len(out) > limit:
            return None
    return out


def cut(data: bytes, req: Any) -> bytes:
    """The part of a whole object's bytes that a key request asks for (as a ranged read answers it)."""
    if req[0] == "suffix":
        n = int(req[1])
        return data[len(data) - n :] if n else b""
    start, length = req
    return data[start:] if length is None else data[start : start + length]


# -- a private event loop for the synchronous callers' concurrent requests ---------------------
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None:
        with _loop_lock:
            if _loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True, name="dask-loom-obstore").start()
                _loop = loop
    return _loop


def run_sync(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run the coroutine *make* ``()`` returns on this process's background loop and wait for its result.

    ``obstore.get_ranges`` holds at most 10 requests in flight; a read of many
    coalesced ranges sends them all at once here, as the asynchronous path does.
    """
    return asyncio.run_coroutine_threadsafe(_wrap(make), _background_loop()).result()


async def _wrap(make: Callable[[], Awaitable[Any]]) -> Any:
    return await make()


class EarlyReads:
    """Whole objects and a listing of a remote store, requested before the store object exists.

    Opening a remote ``.loom.zarr`` starts with importing zarr-python (about
    0.25 s, every dask_loom store subclasses its ``Store``) before any
    request.  The objects opening reads first (the root document, a file
    attribute) and the listing that checks the root's consolidated metadata
    are requested here, on obstore's threads, while that import runs; the
    store takes each once (:meth:`take`, :meth:`take_listing`).  A request
    that failed here is simply made again by the store, with its retries and
    typed errors.

    Parameters
    ----------
    url
        The store's URL (a native one: see :func:`is_native`).
    options
        Its storage options.
    keys
        Object keys below the store's root.
    listing_limit
        Also list every object (``None``: past this many objects).
    """

    def __init__(self, url: str, options: dict[str, Any], keys: list[str], *, listing_limit: int | None = None) -> None:
        self.store, self.root = native_store(url, options)
        loop = _background_loop()
        head = f"{self.root}/" if self.root else ""
        self._gets = {k: asyncio.run_coroutine_threadsafe(nget_async(self.store, head + k, None), loop) for k in keys}
        self._listing: Any = None
        if listing_limit is not None:
            from dask_loom._threads import io_pool

            self._listing = io_pool().submit(nlist, self.store, self.root, limit=listing_limit)

    def take(self, key: str) -> bytes | None:
        """The object's bytes if it was requested here and came back (once), else ``None``."""
        fut = self._gets.pop(key, None)
        if fut is None:
            return None
        try:
            return fut.result()  # type: ignore[no-any-return]
        except Exception:
            return None  # missing or failing: the store asks again and says why

    async def atake(self, key: str) -> bytes | None:
        """:meth:`take` from a coroutine (waits without blocking its event loop)."""
        fut = self._gets.pop(key, None)
        if fut is None:
            return None
        try:
            return await asyncio.wrap_future(fut)  # type: ignore[no-any-return]
        except Exception:
            return None

    def take_listing(self) -> tuple[bool, list[dict[str, Any]] | None]:
        """``(True, objects or None past the limit)`` once if the listing was taken here, else ``(False, None)``."""
        fut, self._listing = self._listing, None
        if fut is None:
            return False, None
        try:
            return True, fut.result()
        except Exception:
            return False, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
