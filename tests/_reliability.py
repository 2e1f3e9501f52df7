"""Results of the reliability tests, and the table in docs/reliability.md rendered from them.

Every reliability test calls :func:`record` with what it injected, how many
times, and what it found.  Records go to one JSON file (``$DASK_LOOM_RELIABILITY_JSON``,
default ``benchmarks/results/reliability.tmp``, which git ignores), merged
under a file lock since xdist workers write at once.  The committed table
comes from a full run::

    DASK_LOOM_KILLS=50 DASK_LOOM_FUZZ_EXAMPLES=2000 DASK_LOOM_RELIABILITY_JSON=docs/reliability.json \\
        python -m pytest -n 2 -m reliability tests/
    python tests/_reliability.py docs/reliability.json docs/reliability.md
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO, "benchmarks", "results", "reliability.tmp")

# Sections of the table, in order, with their headings.
SECTIONS = {
    "kill-writer": "Writing process killed with SIGKILL",
    "kill-worker": "Worker process killed while a graph runs",
    "s3": "Object store faults (local S3 server behind a fault-injecting proxy)",
    "disk-full": "Disk full while writing (tmpfs mounted by the test)",
    "bad-input": "Hostile input to every reader",
    "fuzz": "Property-based fuzzing (hypothesis)",
    "concurrency": "Concurrency",
    "load": "Load and leaks",
    "security": "Security",
}


@dataclass
class Outcome:
    """What a reader did with a hostile input."""

    error: BaseException | None
    seconds: float
    peak: int
    hung: bool
    value: Any = None


def run_limited(fn: Callable[[], Any], limit: float = 10.0) -> Outcome:
    """Run *fn* in a thread with a time limit, tracing allocations (numpy's buffers included)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # examined by the caller
            box["error"] = exc

    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return Outcome(box.get("error"), took, peak, t.is_alive(), box.get("value"))


_BUILTINS = (ValueError, OSError, KeyError, IndexError, TypeError, LookupError, MemoryError, OverflowError)


def raised_by_us(exc: BaseException) -> bool:
    tb = traceback.extract_tb(exc.__traceback__)
    return bool(tb) and f"{os.sep}dask_loom{os.sep}" in tb[-1].filename


def is_typed(exc: BaseException) -> bool:
    """A dask_loom error, or the builtin it derives from raised by dask_loom itself (not from inside a dependency)."""
    from dask_loom.errors import DaskLoomError

    return isinstance(exc, DaskLoomError) or (isinstance(exc, _BUILTINS) and raised_by_us(exc))


# Kills per operation: CI runs a few, the published table comes from DASK_LOOM_KILLS=50.
CI_KILLS = 10


def kills(default: int = CI_KILLS) -> int:
    """How many SIGKILLs per operation (``$DASK_LOOM_KILLS``, else *default*)."""
    return int(os.environ.get("DASK_LOOM_KILLS", default))


def json_path() -> str:
    return os.environ.get("DASK_LOOM_RELIABILITY_JSON") or DEFAULT_JSON


def record(section: str, name: str, *, injected: str, times: int, result: str, ok: bool, **numbers: Any) -> None:
    """Store one row of the table (replacing an older row of the same section and name)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    path = json_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    row = {"section": section, "name": name, "injected": injected, "times": int(times), "result": result, "ok": bool(ok)}
    row.update({k: v for k, v in numbers.items() if v is not None})
    import hashlib
    import tempfile

    lock_file = os.path.join(tempfile.gettempdir(), f"dask-loom-reliability-{hashlib.sha1(path.encode()).hexdigest()[:12]}.lock")
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = _load(path)
        doc["rows"] = [r for r in doc["rows"] if (r["section"], r["name"]) != (section, name)] + [row]
        doc["updated"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        doc["machine"] = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        tmp = f"{path}.{os.getpid()}.part"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)


def _load(path: str) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError), open(path) as fh:
        doc = json.load(fh)
        if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
            return doc
    return {"rows": []}


INTRO = """# Reliability and security

Every number on this page was produced by the test suite (`tests/test_reliability_*.py`,
`tests/test_bad_input.py`, `tests/test_security.py`), which writes each row to
[`reliability.json`](reliability.json); `python tests/_reliability.py` renders this page from it.
The faults are injected for real: processes are killed with `SIGKILL`, the S3 server is a
real HTTP server (moto) behind a TCP proxy that answers 500/503, drops connections or
stalls, the disk is a size-limited tmpfs mounted by the test, and hostile files are real files.

**Target**: zero lost or corrupted files across all injected faults; every bad input answered
by a typed error (`dask_loom.errors.*`) naming the file and the problem within 10 s; RSS growth
under 5 % across the load loop.

How the content of a file is judged after a kill: a `.loom` file *validates* when loompy's
`LoomValidator` accepts it, and its *content* is a SHA-256 over every dataset (read with h5py).
A Zarr store *validates* when zarr-python opens it and decodes every chunk of every array and
`dask_loom.connect` (with the Loom validator) reads it; its *content* is a SHA-256 over every
array's path, shape, dtype and values and every node's attributes except `last_modified`.
"Old" and "new" are the content before the operation and after an uninterrupted run.
"""

REPRO = """
## Reproducing

```
DASK_LOOM_KILLS=50 DASK_LOOM_FUZZ_EXAMPLES=2000 DASK_LOOM_RELIABILITY_JSON=docs/reliability.json \\
    python -m pytest -n 2 -p no:randomly -m reliability tests/
python tests/_reliability.py docs/reliability.json docs/reliability.md
```

CI runs the same tests with fewer kills per operation (`DASK_LOOM_KILLS` unset: {ci_kills}) and
fewer fuzzing examples (`DASK_LOOM_FUZZ_EXAMPLES` unset: 150 per property) to stay within its
time budget; the table above comes from a run with the full counts.
"""


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: dict[str, Any], *, ci_kills: int) -> str:
    rows = doc.get("rows", [])
    out = [INTRO]
    bad = [r for r in rows if not r.get("ok")]
    total_kills = sum(r["times"] for r in rows if r["section"] in ("kill-writer", "kill-worker"))
    lost = sum(int(r.get("lost_or_corrupt", 0)) for r in rows)
    out.append(
        f"**Summary** ({doc.get('updated', '?')}, {doc.get('machine', '?')}): {len(rows)} checks, "
        f"{len(rows) - len(bad)} met their target; {total_kills} processes killed, {lost} files lost or corrupted.\n"
    )
    if bad:
        out.append("Checks that missed their target: " + ", ".join(f"{r['section']}/{r['name']}" for r in bad) + ".\n")
    for section, title in SECTIONS.items():
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        out.append(f"\n## {title}\n")
        out.append("| Check | How it is injected | Times | Result | Target met |")
        out.append("|---|---|---:|---|:---:|")
        for r in sorted(sec, key=lambda r: r["name"]):
            out.append(f"| {_cell(r['name'])} | {_cell(r['injected'])} | {r['times']} | {_cell(r['result'])} | {'yes' if r['ok'] else '**no**'} |")
    out.append(REPRO.format(ci_kills=ci_kills))
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    src = argv[1] if len(argv) > 1 else os.path.join(REPO, "docs", "reliability.json")
    dst = argv[2] if len(argv) > 2 else os.path.join(REPO, "docs", "reliability.md")
    with open(src) as fh:
        doc = json.load(fh)
    with open(dst, "w") as fh:
        fh.write(render_markdown(doc, ci_kills=CI_KILLS))
    print(f"wrote {dst} ({len(doc.get('rows', []))} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
