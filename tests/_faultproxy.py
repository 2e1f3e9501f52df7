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
    body and the connection reset.

``proxy.inject("503", 3)`` queues faults for the next requests;
``proxy.always("drop")`` fails every request until ``proxy.clear()``.
``proxy.counts`` tells how many requests met each outcome.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from typing import Any

__all__ = ["FaultProxy"]

_BODIES = {
    "500": (500, "Internal Server Error", b"<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>"),
    "503": (503, "Slow Down", b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
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


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close() sends RST, as a crashed server or a broken middlebox does.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` (``"http://127.0.0.1:PORT"``) that injects faults."""

    def __init__(self, upstream: str, *, stall_seconds: float = 5.0) -> None:
        host, _, port = upstream.split("://", 1)[1].partition(":")
        self.upstream = (host, int(port))
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._queue: collections.deque[str] = collections.deque()
        self._always: str | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.methods: collections.Counter[str] = collections.Counter()
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

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _next(self, method: str) -> str:
        with self._lock:
            fault = self._queue.popleft() if self._queue else (self._always or "pass")
            self.counts[fault] += 1
            self.methods[method] += 1
            return fault

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
            method = head.split(b" ", 1)[0].decode(errors="replace")
            fault = self._next(method)
            if fault in _BODIES:
                self._drain_body(client, head, rest)
                status, reason, body = _BODIES[fault]
                client.sendall(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body)
                )
                client.close()
            elif fault == "drop":
                _reset(client)
            elif fault == "stall":
                self._stop.wait(self.stall_seconds)
                client.close()
            else:
                self._forward(client, head, rest, cut=fault == "cut")
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

    def _forward(self, client: socket.socket, head: bytes, rest: bytes, *, cut: bool) -> None:
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
        body_seen = False
        try:
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                if cut and not body_seen and b"\r\n\r\n" in chunk:
                    body_seen = True
                    h, _, b = chunk.partition(b"\r\n\r\n")
                    n = int(_header(h + b"\r\n\r\n", b"content-length") or 0)
                    client.sendall(h + b"\r\n\r\n" + b[: max(0, n // 2)])
                    break
                client.sendall(chunk)
        finally:
            done.set()
            up.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)  # wakes the request pump
            if cut:
                time.sleep(0.05)
                _reset(client)
            else:
                client.close()
            t.join(timeout=5)
