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
"""

from __future__ import annotations

import os
import socket
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
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>',
}


class _Counting:
    """WSGI middleware: counts GET bodies, injects failures."""

    def __init__(self, app: Any, stats: Stats) -> None:
        self.app = app
        self.stats = stats

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """moto's S3 app served by werkzeug in a thread on 127.0.0.1."""

    def __init__(self, bucket: str = BUCKET) -> None:
        self.bucket = bucket
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

        app = _Counting(DomainDispatcherApplication(create_backend_app), self.stats)
        port = _free_port()
        self._server = make_server("127.0.0.1", port, app, threaded=True)
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
