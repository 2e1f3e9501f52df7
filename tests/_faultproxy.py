"""A fault-injecting HTTP proxy between a client (s3fs) and the local S3 server (moto).

Real sockets, no client mocks: every request the client sends reaches this
proxy on 127.0.0.1, which either forwards it to the server or answers it with
a fault taken from a queue:

``"500"``/``"503"``
    an HTTP error answer with S3's XML body (``InternalError`` / ``SlowDown``);
``"drop"``
    the connection is reset (TCP RST) without an answer;
``"stall"``
    nothing is answered for ``stall_seconds`` (longer than the client's read
    timeout), then the connection is closed;
``"cut"``
    the request is forwarded, but the answer is cut off half-way through its
    body and the connection reset;
``"short"``
    the request is forwarded, but only the first half of the answer's body is
    sent, under a ``Content-Length`` rewritten to match, and the connection is
    closed cleanly: a well-formed answer that is silently short (a broken
    cache or middlebox), which only a client checking lengths notices.

``proxy.inject("503", 3)`` queues faults for the next requests;
``proxy.always("drop")`` fails every request until ``proxy.clear()``.
``proxy.counts`` tells how many requests met each outcome.

It is also the latency-true test bed of the cloud benchmarks: ``latency``
seconds are waited before every request is answered (a round trip to a real
object store costs tens of milliseconds; requests in flight at once wait
concurrently, as they would), and ``bandwidth`` caps the bytes per second of
all answer bodies together (one shared link).  ``proxy.requests`` and
``proxy.bytes`` count requests and answer-body bytes by method,
``proxy.ranged`` the GETs that carried a ``Range`` header, and ``proxy.log``
keeps one :class:`Request` per request (method, path, range, status, body
bytes) for assertions on what a reader asked for.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["FaultProxy", "Request", "options_via"]

_BODIES = {
    "500": (
        500,
        "Internal Server Error",
        b"<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>",
    ),
    "503": (
        503,
        "Slow Down",
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    ),
}


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The request head (up to the blank line) and whatever body bytes came with it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > 1 << 20:
            return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def _with_close(head: bytes) -> bytes:
    lines = [ln for ln in head.rstrip(b"\r\n").split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _splice(src: socket.socket, dst: socket.socket, counted: Any, timeout: float = 30.0) -> None:
    """Copy *src* to *dst* until *src* ends, through a pipe in the kernel.

    ``counted(n)`` is told of every *n* bytes before they are passed on, so a
    client that has its answer finds it counted.
    """
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    try:
        while True:
            try:
                k = os.splice(src.fileno(), w, 1 << 20)
            except BlockingIOError:
                if not select.select([src], [], [], timeout)[0]:
                    raise TimeoutError("upstream silent") from None
                continue
            if k == 0:
                return
            counted(k)
            while k:
                try:
                    m = os.splice(r, dst.fileno(), k)
                except BlockingIOError:
                    if not select.select([], [dst], [], timeout)[1]:
                        raise TimeoutError("client not reading") from None
                    continue
                k -= m
    finally:
        os.close(r)
        os.close(w)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close() sends RST, as a crashed server or a broken middlebox does.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Request:
    """One request the proxy saw: what was asked and how much body came back."""

    method: str
    path: str
    range: str | None  # the Range header as sent ("bytes=0-99"), or None
    fault: str
    status: int | None = None  # the upstream status (None when the proxy answered itself)
    body_bytes: int = 0


def options_via(storage_options: dict[str, Any], url: str) -> dict[str, Any]:
    """fsspec/s3fs *storage_options* pointed at *url* (a proxy) instead of the server itself."""
    import copy

    opts = copy.deepcopy(storage_options)
    opts["endpoint_url"] = url
    return opts


def _status_of(head: bytes) -> int | None:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` (``"http://127.0.0.1:PORT"``) that injects faults.

    Parameters
    ----------
    upstream
        The server's address (``"http://127.0.0.1:PORT"``).
    stall_seconds
        How long a ``"stall"`` fault keeps silent.
    latency
        Seconds waited before each request is forwarded (or faulted); settable later.
    bandwidth
        Bytes per second of all answer bodies together (``None``: no cap); settable later.
    """

    def __init__(
        self,
        upstream: str,
        *,
        stall_seconds: float = 5.0,
        latency: float = 0.0,
        bandwidth: float | None = None,
    ) -> None:
        host, _, port = upstream.split("://", 1)[1].partition(":")
        self.upstream = (host, int(port))
        self.stall_seconds = stall_seconds
        self.latency = float(latency)
        self.bandwidth = bandwidth
        self._lock = threading.Lock()
        self._queue: collections.deque[str] = collections.deque()
        self._always: str | None = None
        self._link_free = 0.0  # when the shared link has sent everything reserved so far
        self.paced = 0.0  # seconds answers were held back by the bandwidth cap, all told
        self.counts: collections.Counter[str] = collections.Counter()
        self.methods: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = self.methods  # the same counts, by their plainer name
        self.bytes: collections.Counter[str] = collections.Counter()
        self.ranged = 0
        self.log: list[Request] = []
        self.in_flight = 0  # requests being answered now (latency included)
        self.peak_in_flight = 0  # the most at once since the last reset_counts()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(128)
        self.port = self._srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fault-proxy")
        self._thread.start()

    # -- control -----------------------------------------------------------------------
    def inject(self, fault: str, n: int = 1) -> None:
        with self._lock:
            self._queue.extend([fault] * n)

    def always(self, fault: str | None) -> None:
        with self._lock:
            self._always = fault

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._always = None

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.methods.clear()
            self.bytes.clear()
            self.ranged = 0
            self.log = []
            self.peak_in_flight = self.in_flight

    def snapshot(self) -> dict[str, Any]:
        """Counts so far: requests and body bytes by method, ranged GETs, and their totals."""
        with self._lock:
            return {
                "requests": dict(self.methods),
                "bytes": dict(self.bytes),
                "ranged_gets": self.ranged,
                "total_requests": sum(self.methods.values()),
                "total_bytes": sum(self.bytes.values()),
                "faults": {k: v for k, v in self.counts.items() if k != "pass"},
                "peak_in_flight": self.peak_in_flight,
            }

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _next(self, head: bytes) -> tuple[str, Request]:
        first = head.split(b"\r\n", 1)[0].split(b" ")
        method = first[0].decode(errors="replace")
        path = first[1].decode(errors="replace") if len(first) > 1 else ""
        rng = _header(head, b"range")
        with self._lock:
            fault = self._queue.popleft() if self._queue else (self._always or "pass")
            self.counts[fault] += 1
            self.methods[method] += 1
            if method == "GET" and rng is not None:
                self.ranged += 1
            req = Request(method, path, None if rng is None else rng.decode(errors="replace"), fault)
            self.log.append(req)
            return fault, req

    def _sent(self, req: Request, n: int) -> None:
        with self._lock:
            req.body_bytes += n
            self.bytes[req.method] += n

    def _pace(self, n: int) -> None:
        """Wait until *n* more body bytes fit through the shared link (a no-op without a cap)."""
        bw = self.bandwidth
        if not bw or n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._link_free)
            self._link_free = start + n / float(bw)
            until = self._link_free
        delay = until - time.monotonic()
        if delay > 0:
            with self._lock:
                self.paced += delay
            time.sleep(delay)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._thread.join(timeout=5)
        self._srv.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- serving -------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self._stop.is_set():
                client.close()
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        try:
            got = _read_head(client)
            if got is None:
                client.close()
                return
            head, rest = got
        except OSError:
            client.close()
            return
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            self._answer(client, head, rest)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        try:
            fault, req = self._next(head)
            method = req.method
            if self.latency > 0:
                time.sleep(self.latency)  # in this request's own thread: requests in flight wait together
            if fault in _BODIES:
                self._drain_body(client, head, rest)
                status, reason, body = _BODIES[fault]
                client.sendall(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + (b"" if method == "HEAD" else body)
                )
                client.close()
            elif fault == "drop":
                _reset(client)
            elif fault == "stall":
                self._stop.wait(self.stall_seconds)
                client.close()
            else:
                self._forward(client, head, rest, req, mode=fault)
        except OSError:
            client.close()

    def _drain_body(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        if _header(head, b"expect") is not None:
            return  # the client waits for "100 Continue" before sending a body
        n = int(_header(head, b"content-length") or 0) - len(rest)
        client.settimeout(5)
        while n > 0:
            chunk = client.recv(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def _forward(self, client: socket.socket, head: bytes, rest: bytes, req: Request, *, mode: str) -> None:
        up = socket.create_connection(self.upstream, timeout=30)
        up.sendall(_with_close(head) + rest)
        done = threading.Event()

        def pump_up() -> None:
            # The rest of the request body (and any 100-continue dance) goes upstream.
            try:
                while not done.is_set():
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    up.sendall(chunk)
            except OSError:
                pass

        t = threading.Thread(target=pump_up, daemon=True)
        t.start()
        answer = b""  # the upstream answer's head, until it is complete
        in_body = False
        try:
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                if not in_body:
                    answer += chunk
                    if b"\r\n\r\n" not in answer:
                        continue
                    h, _, body = answer.partition(b"\r\n\r\n")
                    h += b"\r\n\r\n"
                    in_body = True
                    if h.startswith(b"HTTP/1.1 100") or h.startswith(b"HTTP/1.0 100"):
                        # An interim "100 Continue": pass it on and read the real answer.
                        client.sendall(h)
                        answer, in_body = body, False
                        if b"\r\n\r\n" not in answer:
                            continue
                        h, _, body = answer.partition(b"\r\n\r\n")
                        h += b"\r\n\r\n"
                        in_body = True
                    req.status = _status_of(h)
                    n = int(_header(h, b"content-length") or 0)
                    if mode == "cut":
                        half = body[: max(0, n // 2)]
                        self._pace(len(half))
                        client.sendall(h + half)
                        self._sent(req, len(half))
                        break
                    if mode == "short" and req.method == "GET" and n > 1:
                        # A well-formed answer with half the body: Content-Length rewritten to match.
                        keep = n // 2
                        h = b"\r\n".join(
                            (b"Content-Length: %d" % keep)
                            if ln.lower().startswith(b"content-length:")
                            else ln
                            for ln in h.split(b"\r\n")
                        )
                        got = body
                        while len(got) < keep:
                            more = up.recv(65536)
                            if not more:
                                break
                            got += more
                        self._pace(keep)
                        client.sendall(h + got[:keep])
                        self._sent(req, min(keep, len(got)))
                        break
                    client.sendall(h)
                    chunk = body
                    if mode == "pass" and not self.bandwidth:
                        # The rest of the body moves in the kernel: the proxy's CPU is the test bed's,
                        # taken from the cores the reader under test runs on.
                        if chunk:
                            client.sendall(chunk)
                            self._sent(req, len(chunk))
                        _splice(up, client, lambda n: self._sent(req, n))
                        break
                    if not chunk:
                        continue
                self._pace(len(chunk))
                client.sendall(chunk)
                self._sent(req, len(chunk))
        finally:
            done.set()
            up.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)  # wakes the request pump
            if mode == "cut":
                time.sleep(0.05)
                _reset(client)
            else:
                client.close()
            t.join(timeout=5)
