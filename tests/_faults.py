"""Kill a writing process with SIGKILL at random moments, then check the file.

Shared by the Loom write tests (a few kills each) and the reliability suite
(many kills, results tabulated in docs/reliability.md).
"""

from __future__ import annotations

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
    import loompy

    try:
        v = loompy.LoomValidator()
        ok = v.validate(path)
        return ok, "; ".join(v.errors[:3])
    except Exception as exc:  # a corrupt file: report, do not crash the test
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class KillReport:
    operation: str
    kills: int = 0
    old: int = 0
    new: int = 0
    invalid: int = 0
    other: int = 0
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
) -> KillReport:
    """Run *op* on copies of *original*, SIGKILL it at random moments, classify each outcome.

    The op runs once to completion first to learn its duration and the "new"
    digest; then each kill lands uniformly inside ``[0, duration]`` after the
    child reports that its set-up is done.
    """
    rng = np.random.default_rng(seed)
    report = KillReport(name)
    old = digest(original)
    done = os.path.join(workdir, f"{name}-done")
    _copy(original, done)
    run_op(done, setup, op)
    new = digest(done)
    if new == old:
        raise AssertionError(f"{name}: the operation did not change the file; nothing to test")
    # Time the operation alone (set-up excluded) for placing the kills.
    work = os.path.join(workdir, f"{name}-work")
    _copy(original, work)
    code = CHILD.format(repo=REPO, path=work, setup=textwrap.dedent(setup), op=textwrap.dedent(op))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    p.stdout.readline()
    t0 = time.perf_counter()
    p.wait(timeout=300)
    duration = time.perf_counter() - t0
    for _ in range(kills):
        _copy(original, work)
        p = subprocess.Popen([sys.executable, "-c", code.replace(repr(done), repr(work))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        if "START" not in line:
            p.kill()
            p.wait()
            raise AssertionError(f"{name}: the child failed before starting: {line!r}")
        time.sleep(float(rng.uniform(0, duration * 1.05)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        report.kills += 1
        ok, why = valid(work)
        if not ok:
            report.invalid += 1
            report.notes.append(why)
            continue
        d = digest(work)
        if d == old:
            report.old += 1
        elif d == new:
            report.new += 1
        else:
            report.other += 1
            report.notes.append("content is neither the old nor the new")
    return report


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
