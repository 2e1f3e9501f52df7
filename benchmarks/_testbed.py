"""The cloud test bed out of the benchmark's process: the S3 server and the latency proxy, each its own process.

Run in one process with the client (as ``tests/_s3server.py`` and
``tests/_faultproxy.py`` are in the tests), the server and the proxy share the
client's GIL and their CPU time cannot be told apart from the client's.  Here
each runs as a child process, so the benchmark can read every process's CPU
seconds (``psutil``) and the test bed no longer competes for the client's GIL.

    python benchmarks/_testbed.py server BUCKET          # moto's S3 on 127.0.0.1
    python benchmarks/_testbed.py proxy UPSTREAM LATENCY  # the request-counting proxy

Each prints one JSON line (its address) and then answers lines on stdin:
``snapshot`` (the proxy's counters as one JSON line), ``reset`` (zero them);
end of input stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

__all__ = ["Child", "start_proxy", "start_server"]


class Child:
    """A test-bed process: its pid, the address it printed, and the line protocol to it."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"test-bed process {args[0]} did not start")
        self.info: dict[str, Any] = json.loads(line)
        self.pid = self.proc.pid

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    # The FaultProxy names the benchmark uses.
    def snapshot(self) -> dict[str, Any]:
        return self.ask("snapshot")

    def reset_counts(self) -> None:
        self.ask("reset")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(bucket: str) -> Child:
    return Child(["server", bucket])


def start_proxy(upstream: str, latency: float) -> Child:
    return Child(["proxy", upstream, repr(float(latency))])


def _serve(answer: Any) -> None:
    for line in sys.stdin:
        out = answer(line.strip())
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> None:
    role = sys.argv[1]
    if role == "server":
        from _s3server import S3Server

        server = S3Server(bucket=sys.argv[2])
        info = server.start()
        info.pop("stats")
        print(json.dumps(info), flush=True)
        _serve(lambda cmd: {})
        server.stop()
    elif role == "proxy":
        from _faultproxy import FaultProxy

        proxy = FaultProxy(sys.argv[2], latency=float(sys.argv[3]))
        print(json.dumps({"url": proxy.url}), flush=True)

        def answer(cmd: str) -> Any:
            if cmd == "snapshot":
                return proxy.snapshot()
            if cmd == "reset":
                proxy.reset_counts()
            return {}

        _serve(answer)
        proxy.close()
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
