"""Shared benchmark plumbing: isolated runs with wall time and peak RSS of the process tree.

Each measurement runs in a fresh (spawned) child process so one run's memory
never inflates the next; a sampler thread records the peak resident memory of
the child and all its descendants (dask workers included).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CACHE = os.path.join(os.path.dirname(__file__), "cache")


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # a child exited while the tree was listed: sample again next tick
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _child(fn: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    try:
        t0 = time.perf_counter()
        out = fn(*args)
        conn.send(("ok", time.perf_counter() - t0, out))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", 0.0, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


_compiled = False


def _compile_package() -> None:
    """Byte-compile dask_loom once, as ``pip install`` does for an installed package.

    A checkout installed in editable mode, run where ``PYTHONDONTWRITEBYTECODE``
    is set, would otherwise compile every module it imports from source in each
    fresh process (60 ms of a cold ``connect``, measured): a cost no installed
    package pays, and the peers' modules are compiled already.
    """
    global _compiled
    if not _compiled:
        import compileall

        compileall.compile_dir(os.path.join(os.path.dirname(RESULTS), "..", "dask_loom"), quiet=1)
        _compiled = True


def measure(fn: Callable[..., Any], *args: Any, repeat: int = 1) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh process *repeat* times; median wall, max peak RSS.

    *fn* must be importable (defined at module level).  Its own timing (the
    part after imports and set-up it chooses to exclude) is returned if it
    returns a dict with a ``"wall"`` key; otherwise the call's duration.
    """
    _compile_package()
    ctx = mp.get_context("spawn")
    walls, peaks, extra, extras = [], [], None, []
    for _ in range(repeat):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, args=(fn, args, child))
        p.start()
        proc = psutil.Process(p.pid)
        peak = 0
        stop = threading.Event()

        def sample(proc: psutil.Process = proc, stop: threading.Event = stop) -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss(proc))
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        status, wall, out = parent.recv()
        stop.set()
        th.join()
        p.join()
        if status != "ok":
            raise RuntimeError(out)
        if isinstance(out, dict) and "wall" in out:
            wall = out["wall"]
            extra = out
            extras.append(out)
        walls.append(wall)
        peaks.append(peak)
    walls.sort()
    return {
        "wall": walls[len(walls) // 2],
        "walls": walls,
        "peak_rss": max(peaks),
        "result": extra,
        "results": extras,
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def scrub(value: Any) -> Any:
    """*value* with this machine's paths made repository-relative (results never carry absolute paths)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    if isinstance(value, str):
        value = value.replace(root, "")
        # Temporary folders and other absolute paths: keep the file's name only.
        return re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)", r"\1", value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def save(name: str, payload: dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    payload = scrub(
        {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    )
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    return path


def table(rows: list[tuple[str, dict[str, Any]]], baseline: str) -> str:
    base = dict(rows)[baseline]["wall"]
    out = [f"{'run':<44} {'wall s':>8} {'peak RSS MiB':>13} {'vs ' + baseline:>14}"]
    for name, r in rows:
        out.append(f"{name:<44} {r['wall']:>8.2f} {r['peak_rss'] / 2**20:>13.0f} {base / r['wall']:>13.2f}x")
    return "\n".join(out)


_compiled = False


def _compile_package() -> None:
    """Write the bytecode of the dask_loom the children import, once (``__pycache__`` is ignored by git)."""
    global _compiled
    if _compiled:
        return
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("dask_loom")
    if spec is not None and spec.origin:
        compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)
    _compiled = True


def run_process(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    max_rss: int | None = None,
    stop_ok: bool = False,
) -> dict[str, Any]:
    """Run ``python -c code`` in a fresh interpreter: whole-process wall time and peak RSS.

    The wall time runs from just before the process is started to its exit,
    so interpreter start-up, imports, the operation, closing files and
    shutting down whatever it started are all in it — what a user running a
    script pays.  Peak RSS is of the whole process tree (dask workers
    included), sampled every 20 ms.  The code's last line of standard output,
    if it is JSON, is returned under ``"result"``.  With ``stop_ok`` a run
    that passes *timeout* or *max_rss* (bytes) is killed and returned with
    ``"stopped"`` saying why (a peer that cannot finish is a result too).

    The process runs dask_loom as an installed package does, from compiled
    bytecode (pip compiles it at install; the peers' packages are installed
    so): with ``PYTHONDONTWRITEBYTECODE`` set, a checkout recompiled every
    dask_loom module in every cold process (measured 0.1-0.4 s).
    """
    import subprocess
    import sys

    _compile_package()
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if stop_ok:
        return _run_stoppable(code, full_env, timeout, max_rss)
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, text=True
    )
    proc = psutil.Process(p.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({p.returncode}):\n{err[-4000:]}")
    result: Any = None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if lines:
        with contextlib.suppress(ValueError):
            result = json.loads(lines[-1])
    return {"wall": wall, "peak_rss": peak, "result": result}


def _run_stoppable(
    code: str, full_env: dict[str, str], timeout: float, max_rss: int | None
) -> dict[str, Any]:
    """:func:`run_process` for a peer that may not finish: stopped after *timeout* s or over *max_rss* bytes."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, text=True
    )
    proc = psutil.Process(p.pid)
    peak = 0
    stopped: list[str] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc))
            if max_rss is not None and peak > max_rss and not stopped:
                stopped.append(f"stopped over {max_rss / 2**30:.1f} GiB")
                p.kill()
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stopped.append(f"stopped after {timeout:.0f} s")
        p.kill()
        out, err = p.communicate()
    finally:
        done.set()
        th.join()
    wall = time.perf_counter() - t0
    if stopped:
        return {"wall": wall, "peak_rss": peak, "result": None, "stopped": stopped[0]}
    if p.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({p.returncode}):\n{err[-4000:]}")
    result: Any = None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if lines:
        with contextlib.suppress(ValueError):
            result = json.loads(lines[-1])
    return {"wall": wall, "peak_rss": peak, "result": result}


def cold_and_warm(
    setup: str, op: str, *, result: str = "None", repeat: int = 1, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Time an operation as users meet it: cold (a fresh process) and warm (a second call).

    *setup* is code run first (imports, inputs; its cost is part of the cold
    figure), *op* the operation (a statement, may span lines), *result* an
    expression evaluated after it and printed as JSON (a checksum).  The cold
    figure is a whole process doing setup, op and exit; the warm figure is
    the op's second run inside one process, timed by that process.  Medians
    over *repeat* runs; peak RSS is the largest seen in either.
    """
    import textwrap

    setup, op = textwrap.dedent(setup), textwrap.dedent(op)
    cold_code = f"import json\n{setup}\n{op}\nprint(json.dumps({result}, default=float))\n"
    warm_code = (
        f"import json, time\n{setup}\n{op}\n_t0 = time.perf_counter()\n{op}\n_w = time.perf_counter() - _t0\n"
        f"print(json.dumps({{'warm': _w, 'result': {result}}}, default=float))\n"
    )
    colds = [run_process(cold_code, env=env) for _ in range(repeat)]
    warms = [run_process(warm_code, env=env) for _ in range(repeat)]
    cw = sorted(c["wall"] for c in colds)
    ww = sorted(w["result"]["warm"] for w in warms)
    return {
        "wall": cw[len(cw) // 2],
        "cold_walls": cw,
        "warm": ww[len(ww) // 2],
        "warm_walls": ww,
        "peak_rss": max(c["peak_rss"] for c in colds),
        "peak_rss_warm_process": max(w["peak_rss"] for w in warms),
        "result": colds[0]["result"],
    }


def relative(path: str) -> str:
    """A path as results files record it: relative to the repository, never the machine's absolute path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.relpath(os.path.abspath(path), root)
