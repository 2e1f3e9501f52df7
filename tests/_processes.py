"""A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, for the tests that need them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

__all__ = ["free_port", "start_scheduler", "start_worker", "stop"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_scheduler(port: int, log: IO[str], *, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.Popen:
    """Start ``dask scheduler`` on *port* and return once a client can connect to it."""
    from distributed import Client

    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            Client(f"tcp://127.0.0.1:{port}", timeout=2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop([proc])
                raise
            time.sleep(0.3)


def start_worker(address: str, name: str, log: IO[str], *, args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start one single-threaded ``dask worker`` (2 GiB memory limit) for the scheduler at *address*."""
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name, "--nthreads", "1", "--nworkers", "1",
         "--memory-limit", "2GiB", "--host", "127.0.0.1", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
    )  # fmt: skip


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """Terminate *procs* (last started first), killing any that do not exit within 20 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
