"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1.

The ``s3_server`` session fixture starts moto's WSGI app with werkzeug on a
free loopback port (real HTTP, no client mocks), creates a bucket and yields
a dict::

    {"endpoint_url": "http://127.0.0.1:PORT", "bucket": "dask-loom-test",
     "storage_options": {...fsspec/s3fs options...}, "stats": Stats}

``stats`` counts what the server answered (GET requests, range requests and
body bytes sent) and can inject failures for the next requests
(``stats.fail_next(2, status=503)``, ``stats.deny_next(1)``), so retry and
credential paths are tested over the wire.

Plain object reads (``GET`` of a whole object or one byte range, ``HEAD``) are
answered from moto's stored objects by a fast path with the same headers moto
sends: moto itself copies the whole object on every GET (a 64 KiB range of a
32 MiB object took 73 ms here, against 24 ms for a 1 MiB one), a cost no real
object store has and one that would swamp the latency the cloud benchmarks
inject on purpose (``tests/_faultproxy.py``).  Everything else (writes,
listings, versioned or conditional reads, missing keys) goes to moto.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["S3Server", "Stats", "s3_server"]

BUCKET = "dask-loom-test"


class Stats:
    """Counters of the server's answers, plus failure injection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()
        self._fail: list[int] = []

    def reset(self) -> None:
        with self.lock:
            self.get_requests = 0
            self.range_requests = 0
            self.bytes_sent = 0
            self.paths: list[str] = []

    def fail_next(self, n: int, *, status: int = 503) -> None:
        """Answer the next *n* requests with HTTP *status* (5xx: transient)."""
        with self.lock:
            self._fail.extend([status] * n)

    def deny_next(self, n: int = 1) -> None:
        """Answer the next *n* requests with 403 AccessDenied (credentials refused)."""
        self.fail_next(n, status=403)

    def clear_failures(self) -> None:
        with self.lock:
            self._fail.clear()

    def _take_failure(self) -> int | None:
        with self.lock:
            return self._fail.pop(0) if self._fail else None


_BODIES = {
    403: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>',
    # As S3 answers a 500: s3fs asks again on its own only for SlowDown (503), as with the real service.
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>',
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>',
}


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Request headers that make a read conditional or special: those go to moto.
_SPECIAL = ("HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_UNMODIFIED_SINCE",
            "HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION_CUSTOMER_ALGORITHM")


def _fast_read(environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """Answer a plain GET/HEAD of a stored object as moto would, reading only the bytes asked for."""
    method = environ.get("REQUEST_METHOD")
    if method not in ("GET", "HEAD") or environ.get("QUERY_STRING") or any(h in environ for h in _SPECIAL):
        return None
    bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
    if not bucket or not key:
        return None
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import FakeKey, s3_backends

    b = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets.get(bucket)
    obj = None if b is None else b.keys.get(key)
    if not isinstance(obj, FakeKey):
        return None
    size = obj.size
    begin, end = 0, size - 1
    rng = environ.get("HTTP_RANGE")
    if rng is not None:
        m = _RANGE.match(rng.strip())
        if m is None or method == "HEAD":
            return None
        a, z = m.groups()
        if a:
            begin, end = int(a), min(int(z), size - 1) if z else size - 1
        elif z:
            begin = size - min(int(z), size)
        else:
            return None
        if begin >= size or begin > end:
            return None  # moto answers InvalidRange
    whole = begin == 0 and end == size - 1
    if whole and environ.get("HTTP_X_AMZ_CHECKSUM_MODE") and obj.checksum_algorithm:
        return None  # moto adds the stored checksum
    headers = {k.lower(): str(v) for k, v in obj.response_dict.items()}
    headers.update({k.lower(): str(v) for k, v in obj.metadata.items()})
    if obj.version_id != "null":
        headers["x-amz-version-id"] = obj.version_id
    headers["accept-ranges"] = "bytes"
    status = 200
    if rng is not None:
        status = 206
        if not whole:
            headers = {k: v for k, v in headers.items() if not k.startswith("x-amz-checksum-")}
        headers["content-range"] = f"bytes {begin}-{end}/{size}"
    n = end - begin + 1 if size else 0
    headers["content-length"] = str(n)
    headers.setdefault("content-type", "binary/octet-stream")
    body = b""
    if method == "GET" and n:
        with obj.lock:
            obj._value_buffer.seek(begin)
            body = obj._value_buffer.read(n)
    return status, list(headers.items()), body


class _Counting:
    """WSGI middleware: counts GET bodies, injects failures, serves plain reads fast."""

    def __init__(self, app: Any, stats: Stats, *, fast_reads: bool = True) -> None:
        self.app = app
        self.stats = stats
        self.fast_reads = fast_reads

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        status = self.stats._take_failure()
        if status is not None:
            body = _BODIES.get(status, _BODIES[503] if status >= 500 else b"")
            start_response(f"{status} Injected", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
        is_get = environ.get("REQUEST_METHOD") == "GET"
        if is_get:
            with self.stats.lock:
                self.stats.get_requests += 1
                self.stats.paths.append(environ.get("PATH_INFO", ""))
                if environ.get("HTTP_RANGE"):
                    self.stats.range_requests += 1
        fast = _fast_read(environ) if self.fast_reads else None
        if fast is not None:
            status, headers, body = fast
            start_response(f"{status} {'Partial Content' if status == 206 else 'OK'}", headers)
            with self.stats.lock:
                self.stats.bytes_sent += len(body)
            return [body]
        result = self.app(environ, start_response)
        if not is_get:
            return result
        return self._count(result)

    def _count(self, result: Any) -> Iterator[bytes]:
        try:
            for chunk in result:
                with self.stats.lock:
                    self.stats.bytes_sent += len(chunk)
                yield chunk
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


class S3Server:
    """moto's S3 app served by werkzeug in a thread on 127.0.0.1."""

    def __init__(self, bucket: str = BUCKET, *, fast_reads: bool = True) -> None:
        self.bucket = bucket
        self.fast_reads = fast_reads
        self.stats = Stats()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> dict[str, Any]:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        import logging

        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        app = _Counting(DomainDispatcherApplication(create_backend_app), self.stats, fast_reads=self.fast_reads)
        # Port 0: the system picks a free port as it binds (a port picked beforehand could be taken).
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="moto-s3")
        self._thread.start()
        endpoint = f"http://127.0.0.1:{port}"
        options = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            # Fail fast in tests: dask_loom does its own retries with backoff.
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 1}},
            "use_listings_cache": False,
        }
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).create_bucket(Bucket=self.bucket)
        return {"endpoint_url": endpoint, "bucket": self.bucket, "storage_options": options, "stats": self.stats}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 with bucket ``dask-loom-test`` (see module docstring)."""
    server = S3Server()
    info = server.start()
    try:
        yield info
    finally:
        server.stop()
