"""Kill a writing process with SIGKILL at random moments, then check the file.

Shared by the Loom write tests (a few kills each) and the reliability suite
(many kills, results tabulated in docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loom_digest(path: str) -> str:
    """A digest of everything a Loom file holds (layers, attributes, graphs, globals), read with h5py."""
    import h5py

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visit(names.append)
        for name in sorted(names):
            obj = f[name]
            if isinstance(obj, h5py.Dataset) and "/." not in "/" + name:
                h.update(name.encode())
                data = obj[()]
                h.update(np.asarray(data).tobytes() if np.asarray(data).dtype != object else repr(data.tolist()).encode())
    return h.hexdigest()


def is_valid_loom(path: str) -> tuple[bool, str]:
    """loompy's LoomValidator accepts the file, h5py decodes every dataset (every chunk),
    and dask_loom opens it with its validator."""
    import h5py
    import loompy

    try:
        v = loompy.LoomValidator()
        if not v.validate(path):
            return False, "; ".join(v.errors[:3])
        with h5py.File(path, "r") as f:
            f.visititems(lambda _, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
        with dask_loom_connect(path) as ds:
            ds.shape
        return True, ""
    except Exception as exc:  # a corrupt file: report, do not crash the test
        return False, f"{type(exc).__name__}: {exc}"


def zarr_digest(path: str) -> str:
    """A digest of a Zarr store's content, read with zarr-python: every array's path, shape,
    dtype and values, and every node's attributes except loompy's ``last_modified`` stamps."""
    import zarr

    h = hashlib.sha256()
    root = zarr.open_group(path, mode="r")
    nodes = [("", root), *sorted(root.members(max_depth=None), key=lambda kv: kv[0])]
    for name, node in nodes:
        attrs = {k: v for k, v in dict(node.attrs).items() if k != "last_modified"}
        h.update(f"{name}|{json.dumps(attrs, sort_keys=True, default=str)}".encode())
        if isinstance(node, zarr.Array):
            data = np.asarray(node[...])
            h.update(f"|{data.shape}|{data.dtype}".encode())
            h.update(repr(data.tolist()).encode() if data.dtype.kind in "OTUS" else np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def is_valid_zarr(path: str, *, loom: bool = True) -> tuple[bool, str]:
    """A store "validates" when zarr-python opens it and decodes every chunk of every array,
    and dask_loom opens it too (``connect`` with the Loom validator for Loom stores)."""
    import zarr

    try:
        root = zarr.open_group(path, mode="r")
        for _, node in root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                node[...]
        if loom:
            with dask_loom_connect(path) as ds:
                ds[:, :]
        else:
            import dask_loom

            dask_loom.open_zarr(path, mode="r")
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def dask_loom_connect(path: str) -> Any:
    import dask_loom

    return dask_loom.connect(path, "r", validate=True)


def any_digest(path: str) -> str:
    """``zarr_digest`` for directories, ``loom_digest`` for HDF5 files."""
    return zarr_digest(path) if os.path.isdir(path) else loom_digest(path)


def any_valid(path: str) -> tuple[bool, str]:
    if not os.path.exists(path):
        return False, f"{path} is missing"
    return is_valid_zarr(path) if os.path.isdir(path) else is_valid_loom(path)


@dataclass
class KillReport:
    operation: str
    kills: int = 0
    old: int = 0
    new: int = 0
    invalid: int = 0
    other: int = 0
    completed_before_kill: int = 0
    op_seconds: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def lost_or_corrupt(self) -> int:
        return self.invalid + self.other


CHILD = """
import sys, os, numpy as np
sys.path.insert(0, {repo!r})
import dask_loom
path = {path!r}
{setup}
print("START", flush=True)
{op}
print("DONE", flush=True)
"""


def run_op(path: str, setup: str, op: str, timeout: float = 300) -> float:
    code = CHILD.format(repo=REPO, path=path, setup=textwrap.dedent(setup), op=textwrap.dedent(op))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout, capture_output=True)
    return time.perf_counter() - t0


# A process that has imported dask_loom once and forks one child per run, so a
# kill costs the operation's time, not an interpreter start-up (seconds on a
# loaded 2-core machine).  Nothing runs threads in it before it forks.
ZYGOTE = r"""
import json, os, sys, traceback
sys.path.insert(0, REPO)
import numpy as np, scipy.sparse, h5py, zarr, dask, dask.array
import dask_loom, dask_loom.loom._zarrtree, dask_loom.loom._convert

def say(msg):
    # One write() per line: the server and its children share this pipe.
    os.write(1, (msg + "\n").encode())

say("READY")
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        code = 0
        try:
            ns = {"np": np, "dask_loom": dask_loom, "os": os, "path": cmd["path"]}
            exec(cmd["setup"], ns)
            say("START")
            exec(cmd["op"], ns)
            say("DONE")
        except BaseException:
            traceback.print_exc()
            say("ERROR")
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    say(f"PID {pid}")
    _, status = os.waitpid(pid, 0)
    say(f"EXIT {pid} {status}")
"""


class Zygote:
    """Runs operations in forked children of one pre-imported process; SIGKILLs them on request."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        import tempfile

        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE.replace("REPO", repr(REPO))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env={**os.environ, **(env or {})},
        )
        line = self._line()
        if line != "READY":
            raise RuntimeError(f"the fork server did not start: {line!r}\n{self._stderr()}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died\n{self._stderr()}")
        return line.strip()

    def _stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def start(self, path: str, setup: str, op: str) -> int:
        """Fork a child running *setup* then *op* on *path*; return its pid once *op* starts."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"path": path, "setup": textwrap.dedent(setup), "op": textwrap.dedent(op)}) + "\n")
        self.proc.stdin.flush()
        pid = None
        started = False
        while pid is None or not started:
            line = self._line()
            if line.startswith("PID "):
                pid = int(line.split()[1])
            elif line == "START":
                started = True
            elif line == "ERROR":
                self.finish()
                raise RuntimeError(f"the child failed before its operation started\n{self._stderr()}")
            elif line.startswith("EXIT "):
                raise RuntimeError(f"the child died before its operation started (wait status {line.split()[2]})\n{self._stderr()}")
        return pid

    def finish(self) -> tuple[bool, int]:
        """Wait for the child; ``(completed, status)`` where *completed* means it printed DONE."""
        done = False
        while True:
            line = self._line()
            if line == "DONE":
                done = True
            elif line == "ERROR":
                raise RuntimeError(f"the operation failed in the child\n{self._stderr()}")
            elif line.startswith("EXIT "):
                return done, int(line.split()[2])

    def run(self, path: str, setup: str, op: str) -> float:
        """Run to completion; the operation's duration in seconds (set-up excluded)."""
        self.start(path, setup, op)
        t0 = time.perf_counter()
        done, status = self.finish()
        if not done or status != 0:
            raise RuntimeError(f"the operation did not complete (status {status})\n{self._stderr()}")
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def kill_during(
    original: str,
    workdir: str,
    *,
    name: str,
    setup: str,
    op: str,
    kills: int,
    seed: int = 0,
    digest: Any = loom_digest,
    valid: Any = is_valid_loom,
    target: str | None = None,
    zygote: Zygote | None = None,
) -> KillReport:
    """Run *op* on copies of *original*, SIGKILL it at random moments, classify each outcome.

    The op runs once to completion first to learn its duration and the "new"
    digest; then each kill lands uniformly inside ``[0, 1.05 * duration]``
    after the child reports that its set-up is done.  *target* names what the
    op changes when that is not the copy itself (``path`` in the op is then the
    copy of *original* and the target is ``path + target``, e.g. ``".zarr"``
    for a conversion); it is checked after every kill.  Children are forked
    from *zygote* when given (no interpreter start-up per kill).
    """
    rng = np.random.default_rng(seed)
    report = KillReport(name)
    t_start = time.perf_counter()

    def tgt(p: str) -> str:
        return p + target if target else p

    old = digest(tgt(original))
    done = os.path.join(workdir, f"{name}-done")
    work = os.path.join(workdir, f"{name}-work")
    own = zygote is None
    zyg = zygote or Zygote()
    try:
        _copy_all(original, done, target)
        first = zyg.run(done, setup, op)
        new = digest(tgt(done))
        if new == old:
            raise AssertionError(f"{name}: the operation did not change the file; nothing to test")
        # Time the operation alone (set-up excluded) for placing the kills: the
        # median of three runs (the machine is shared and busy).
        times = [first]
        for _ in range(2):
            _copy_all(original, work, target)
            times.append(zyg.run(work, setup, op))
        duration = float(np.median(times))
        report.op_seconds = round(duration, 3)
        for _ in range(kills):
            _copy_all(original, work, target)
            pid = zyg.start(work, setup, op)
            time.sleep(float(rng.uniform(0, duration * 1.05)))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            try:
                completed, _ = zyg.finish()
            except RuntimeError as exc:  # the op raised instead of being killed
                report.notes.append(str(exc)[:300])
                completed = False
            report.kills += 1
            report.completed_before_kill += int(completed)
            ok, why = valid(tgt(work))
            if ok:
                try:
                    d = digest(tgt(work))
                except Exception as exc:
                    ok, why = False, f"digest failed: {type(exc).__name__}: {exc}"
            if not ok:
                report.invalid += 1
                report.notes.append(why)
                continue
            if d == old:
                report.old += 1
            elif d == new:
                report.new += 1
            else:
                report.other += 1
                report.notes.append("content is neither the old nor the new")
    finally:
        if own:
            zyg.close()
    report.seconds = round(time.perf_counter() - t_start, 1)
    return report


def _copy_all(original: str, dst: str, target: str | None) -> None:
    _copy(original, dst)
    if target:
        _copy(original + target, dst + target)


def _copy(src: str, dst: str) -> None:
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    elif os.path.exists(dst):
        os.remove(dst)
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def save_report(reports: list[KillReport], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump([r.__dict__ | {"lost_or_corrupt": r.lost_or_corrupt} for r in reports], fh, indent=2)
