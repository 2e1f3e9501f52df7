"""A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, for the tests that need them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

__all__ = ["free_port", "in_forked_child", "start_scheduler", "start_worker", "stop"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_scheduler(log: IO[str], *, env: Mapping[str, str] | None = None, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start ``dask scheduler`` on a port it picks itself; return it and its address once a client can connect.

    The scheduler binds port 0 and reports its address through ``--scheduler-file``: a port chosen
    here beforehand could be taken by another process (another test worker's cluster) before the
    scheduler binds it, and the scheduler would then exit at once.
    """
    import json
    import tempfile

    from distributed import Client

    folder = tempfile.mkdtemp(prefix="dask-loom-scheduler-")
    info = os.path.join(folder, "scheduler.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", info],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=None if env is None else dict(env),
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with open(info) as f:
                    address = json.load(f)["address"]
                Client(address, timeout=2).close()
                return proc, address
            except (OSError, ValueError, KeyError):
                # Not written yet (or half written), or not answering yet.
                if time.monotonic() > deadline or proc.poll() is not None:
                    stop([proc])
                    log.flush()
                    with open(log.name) as f:
                        said = f.read()[-4000:]
                    raise OSError(f"dask scheduler did not come up (exit code {proc.returncode}); its log:\n{said}") from None
                time.sleep(0.3)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


def in_forked_child(target, *args) -> tuple[object, int | None]:
    """``(what target(*args, queue) put, exit code)`` of a child forked from this process."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    return got, p.exitcode
