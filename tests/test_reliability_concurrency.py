"""Concurrency: readers while a writer writes, two writers at once, 8 threads on one connection.

Every version ``k`` of a layer is ``BASE + 1000 * k`` (``BASE`` < 1000 differs
from element to element), so each value read names its version and its
position: a stored chunk whose values are not all ``BASE + 1000 * k`` for one
written ``k`` is *torn* (a mix of versions, or bytes from elsewhere).
Writes are transactions (``dask_loom.atomic-writes``, the default): HDF5
writes a copy of the file and renames it over the original, Zarr writes a
hard-linked copy of the store and exchanges the two directories.  With
transactions off, an HDF5 writer holds HDF5's exclusive lock and readers wait
for it (``dask_loom.write-timeout``), then raise ``FileBeingWrittenError``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import dask_loom
from dask_loom.errors import DaskLoomError, WriteConflictError
from tests._faults import is_valid_loom, is_valid_zarr
from tests._reliability import record

pytestmark = [pytest.mark.reliability]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2000, 600)
CHUNKS = (64, 64)
STEP = 1000.0


@functools.cache
def base() -> np.ndarray:
    i, j = np.indices(SHAPE)
    out = ((i * 7 + j * 13) % 997).astype("float32")
    out.flags.writeable = False  # shared by every check
    return out


def version(k: int) -> np.ndarray:
    return base() + np.float32(STEP * k)


def make_files(tmp: str) -> tuple[str, str]:
    loom = os.path.join(tmp, "c.loom")
    v0 = version(0)
    dask_loom.create(loom, {"": v0, "L": v0}, {"Gene": np.arange(SHAPE[0])}, {"CellID": np.arange(SHAPE[1])}, chunks=CHUNKS)
    zpath = os.path.join(tmp, "c.loom.zarr")
    dask_loom.convert(loom, zpath, chunks=CHUNKS)
    return loom, zpath


def check_read(arr: np.ndarray, r0: int, c0: int, max_version: int) -> dict[str, Any]:
    """Versions of the stored chunks inside a read of ``[r0:, c0:]``; counts torn chunks."""
    ref = base()[r0 : r0 + arr.shape[0], c0 : c0 + arr.shape[1]]
    delta = (arr.astype("float64") - ref) / STEP
    ver = np.rint(delta)
    ok = (delta == ver) & (ver >= 0) & (ver <= max_version)
    torn = 0
    versions: set[int] = set()
    # Walk the stored chunks the read touched (clipped to the read).
    for a in range(r0 - r0 % CHUNKS[0], r0 + arr.shape[0], CHUNKS[0]):
        for b in range(c0 - c0 % CHUNKS[1], c0 + arr.shape[1], CHUNKS[1]):
            sl = (slice(max(a, r0) - r0, min(a + CHUNKS[0], r0 + arr.shape[0]) - r0), slice(max(b, c0) - c0, min(b + CHUNKS[1], c0 + arr.shape[1]) - c0))
            v = np.unique(ver[sl])
            if not ok[sl].all() or len(v) != 1:
                torn += 1
            else:
                versions.add(int(v[0]))
    return {"torn": torn, "versions": versions}


def reader_loop(path: str, stop: Any, max_version: int, seed: int, min_reads: int = 5, ready: str | None = None) -> dict[str, Any]:
    """Read random regions three ways until *stop()*; return counts (JSON-able)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"reads": 0, "chunks": 0, "torn": 0, "mixed_reads": 0, "versions": [], "typed_errors": [], "other_errors": []}
    seen: set[int] = set()
    with dask_loom.connect(path, "r", validate=False, scheduler="threads") as ds:
        if ready:
            open(ready, "w").close()
        while out["reads"] < min_reads or not stop():
            r0 = int(rng.integers(0, SHAPE[0] - 1))
            c0 = int(rng.integers(0, SHAPE[1] - 1))
            r1 = min(SHAPE[0], r0 + int(rng.integers(1, 400)))
            c1 = min(SHAPE[1], c0 + int(rng.integers(1, 300)))
            how = out["reads"] % 3
            try:
                if how == 0:
                    arr = ds[r0:r1, c0:c1]
                elif how == 1:
                    arr = ds.layers["L"][r0:r1, c0:c1]
                else:
                    arr = ds.layers["L" if out["reads"] % 2 else ""].dask[r0:r1, c0:c1].compute(scheduler="threads")
            except DaskLoomError as exc:
                out["typed_errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                out["reads"] += 1
                continue
            except Exception as exc:
                out["other_errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                out["reads"] += 1
                continue
            res = check_read(arr, r0, c0, max_version)
            out["reads"] += 1
            out["chunks"] += len(range(r0 // CHUNKS[0], -(-r1 // CHUNKS[0]))) * len(range(c0 // CHUNKS[1], -(-c1 // CHUNKS[1])))
            out["torn"] += res["torn"]
            out["mixed_reads"] += len(res["versions"]) > 1
            seen |= res["versions"]
    out["versions"] = sorted(seen)
    return out


def writer_loop(path: str, versions: int, *, atomic: bool = True) -> dict[str, Any]:
    """Write versions 1..*versions*: the whole main matrix by region, then layer ``L`` whole."""
    import dask

    t0 = time.perf_counter()
    with dask.config.set({"dask_loom.atomic-writes": atomic}):
        for k in range(1, versions + 1):
            with dask_loom.connect(path, "r+", validate=False) as ds:
                ds[:, :] = version(k)
                ds.layers["L"] = version(k)
            # The file released for a moment between versions: an in-place writer holds HDF5's
            # exclusive lock while it writes, and on a fast machine readers otherwise never
            # got in between two versions (they saw only the first and the last).
            time.sleep(0.3)
    return {"versions": versions, "seconds": time.perf_counter() - t0}


CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from tests.test_reliability_concurrency import reader_loop, writer_loop
role, path, arg, seed, stop_file = sys.argv[1:6]
if role == "writer":
    # Start when the reader processes are reading (interpreter start-up takes seconds here).
    deadline = time.monotonic() + 60
    while len([n for n in os.listdir(os.path.dirname(stop_file)) if n.startswith("ready")]) < int(seed) and time.monotonic() < deadline:
        time.sleep(0.01)
    res = writer_loop(path, int(arg), atomic=os.environ.get("DASK_LOOM_TEST_IN_PLACE") != "1")
else:
    res = reader_loop(path, lambda: os.path.exists(stop_file), int(arg), int(seed), ready=os.path.join(os.path.dirname(stop_file), f"ready{{seed}}"))
print("RESULT " + json.dumps(res), flush=True)
"""


def _child(role: str, path: str, arg: int, seed: int, stop_file: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD.format(repo=REPO), role, path, str(arg), str(seed), stop_file],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _result(p: subprocess.Popen, timeout: float = 120) -> dict[str, Any]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"a child process hung for {timeout:.0f} s") from None
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"child failed (rc={p.returncode}):\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


VERSIONS = 4


READER_CASES = {"loom": ".loom", "zarr": ".loom.zarr", "loom-in-place": ".loom, dask_loom.atomic-writes off"}


@pytest.mark.parametrize("kind", list(READER_CASES))
def test_readers_while_writer_writes(tmp_path, kind):
    loom, zpath = make_files(str(tmp_path))
    path = zpath if kind == "zarr" else loom
    stop_file = str(tmp_path / "stop")
    # Two reader processes, two reader threads here, one writer process.
    readers = [_child("reader", path, VERSIONS, seed, stop_file) for seed in (1, 2)]
    # waits for the reader processes
    writer = _child("writer", path, VERSIONS, len(readers), stop_file, env={"DASK_LOOM_TEST_IN_PLACE": "1" if kind == "loom-in-place" else "0"})
    done = threading.Event()
    thread_results: list[dict[str, Any]] = []

    def run(seed: int) -> None:
        thread_results.append(reader_loop(path, done.is_set, VERSIONS, seed))

    threads = [threading.Thread(target=run, args=(s,)) for s in (3, 4)]
    for t in threads:
        t.start()
    try:
        wres = _result(writer)
    finally:
        open(stop_file, "w").close()
        done.set()
        for t in threads:
            t.join(120)
    results = [_result(p) for p in readers] + thread_results
    assert len(results) == 4
    reads = sum(r["reads"] for r in results)
    chunks = sum(r["chunks"] for r in results)
    torn = sum(r["torn"] for r in results)
    mixed = sum(r["mixed_reads"] for r in results)
    seen = sorted(set().union(*(r["versions"] for r in results)))
    typed = [e for r in results for e in r["typed_errors"]]
    other = [e for r in results for e in r["other_errors"]]
    # The final content is the last version, whole.
    with dask_loom.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], version(VERSIONS))
        np.testing.assert_array_equal(ds.layers["L"][:, :], version(VERSIONS))
    # The only acceptable error: the file changed under the reader too often to read around.
    unclear = [e for e in typed if not e.startswith("FileBeingWrittenError")]
    ok = torn == 0 and not other and not unclear and len(seen) > 2
    record(
        "concurrency",
        f"readers while one writer writes ({READER_CASES[kind]})",
        injected=(
            f"1 writer process writes {VERSIONS} versions{' in place' if kind == 'loom-in-place' else ' as transactions'} (each: the whole main matrix by region, then layer 'L' whole; "
            f"{wres['seconds']:.1f} s) while 2 reader processes and 2 reader threads read random regions "
            "(ds[a:b, c:d], ds.layers['L'][...], dask graphs)"
        ),
        times=reads,
        result=(
            f"{reads} reads ({chunks} chunk reads), {torn} torn chunks, {len(seen)} versions seen, "
            f"{mixed} reads spanning two versions chunk-wise, {len(typed)} typed errors, {len(other)} other errors"
        ),
        ok=ok,
        reads=reads,
        chunk_reads=chunks,
        torn=torn,
        versions_seen=len(seen),
        mixed_reads=mixed,
        typed_errors=len(typed),
        other_errors=len(other),
    )
    assert not other, other[:5]
    assert torn == 0
    assert not unclear, unclear[:5]
    assert len(seen) > 2, f"readers saw only versions {seen}: the test did not overlap reads and writes"


def test_block_read_across_a_file_replacement(tmp_path, monkeypatch):
    """The file is replaced between the chunk-offset lookup and the byte reads of one block.

    Offsets of the old file applied to the new one decoded to garbage
    (CorruptChunkError) or to other chunks; the block must be one whole version.
    """
    from dask_loom.hdf5 import _source

    path = str(tmp_path / "r.loom")
    dask_loom.create(path, {"": version(0), "L": version(0)}, {"Gene": np.arange(SHAPE[0])}, {"CellID": np.arange(SHAPE[1])}, chunks=CHUNKS)
    # The replacement's chunks lie elsewhere in the file (long attribute strings before them).
    other = str(tmp_path / "other.loom")
    dask_loom.create(other, {"": version(5), "L": version(5)}, {"Gene": np.array([f"gene-{'x' * 200}-{i}" for i in range(SHAPE[0])])}, {"CellID": np.arange(SHAPE[1])}, chunks=CHUNKS)
    real = _source.read_ranges
    replaced = []

    def replacing(spec, starts, sizes, **kw):
        if not replaced:
            os.replace(other, path)
            replaced.append(True)
        return real(spec, starts, sizes, **kw)

    with dask_loom.connect(path, "r") as ds:
        ds[0:64, 0:64]  # offsets of the old file now cached
        monkeypatch.setattr(_source, "read_ranges", replacing)
        got = ds[64:512, 0:256]
    assert replaced
    np.testing.assert_array_equal(got, version(5)[64:512, 0:256])
    res = check_read(got, 64, 0, 5)
    assert res["torn"] == 0 and res["versions"] == {5}


def two_writers_loop(tasks: list[list[Any]], barrier: str, me: int) -> list[dict[str, Any]]:
    """For each ``(path, k, timeout)``: meet the other writer at a file barrier, then write version *k* in one transaction."""
    import dask

    out = []
    for r, (path, k, timeout) in enumerate(tasks):
        open(os.path.join(barrier, f"{r}-{me}"), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(barrier, f"{r}-{1 - me}")) and time.monotonic() < deadline:
            time.sleep(0.001)
        t0 = time.perf_counter()
        res: dict[str, Any] = {"path": path, "k": k}
        try:
            with dask.config.set({"dask_loom.write-timeout": timeout}), dask_loom.connect(path, "r+", validate=False) as ds:
                ds[:, :] = version(k)
            res["status"] = "ok"
        except WriteConflictError as exc:
            res["status"], res["msg"] = "conflict", str(exc)
        except Exception as exc:
            res["status"], res["msg"] = "error", f"{type(exc).__name__}: {exc}"
        res["seconds"] = time.perf_counter() - t0
        res["done"] = time.time()
        out.append(res)
    return out


TWO_WRITERS = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.test_reliability_concurrency import two_writers_loop
print("RESULT " + json.dumps(two_writers_loop(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]))), flush=True)
"""

ROUNDS = 2


def _matrix(path: str) -> np.ndarray:
    # Read with the peer library, not with dask_loom.
    if os.path.isdir(path):
        import zarr

        return zarr.open_group(path, mode="r")["matrix"][...]
    import h5py

    with h5py.File(path, "r") as f:
        return f["matrix"][...]


@pytest.mark.parametrize("kind", ["loom", "zarr"])
def test_two_writers_on_one_file(tmp_path, kind):
    import shutil

    loom, zpath = make_files(str(tmp_path))
    src = loom if kind == "loom" else zpath
    ext = "loom" if kind == "loom" else "loom.zarr"
    tasks: list[list[list[Any]]] = [[], []]
    modes = []
    for r in range(2 * ROUNDS):
        # First rounds: the second writer waits (default write-timeout); then it may not wait at all.
        timeout = 60.0 if r < ROUNDS else 0.0
        p = str(tmp_path / f"w{r}.{ext}")
        (shutil.copytree if kind == "zarr" else shutil.copyfile)(src, p)
        for me in (0, 1):
            tasks[me].append([p, 1 + me, timeout])
        modes.append(timeout)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", TWO_WRITERS.format(repo=REPO), json.dumps(tasks[me]), str(barrier), str(me)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me in (0, 1)
    ]
    results = [_result(p, timeout=300) for p in procs]
    stats = {"both ok": 0, "conflict": 0, "invalid": 0, "mixed": 0}
    for r, timeout in enumerate(modes):
        a, b = results[0][r], results[1][r]
        path = a["path"]
        assert a["status"] != "error" and b["status"] != "error", (a, b)
        valid, why = is_valid_zarr(path) if kind == "zarr" else is_valid_loom(path)
        stats["invalid"] += not valid
        m = _matrix(path)
        whole = [k for k in (1, 2) if np.array_equal(m, version(k))]
        stats["mixed"] += not whole
        assert valid, why
        assert whole, f"{path}: the matrix is neither writer's content"
        oks = [x for x in (a, b) if x["status"] == "ok"]
        assert oks, (a, b)
        # The content is that of the writer that committed last.
        assert whole == [max(oks, key=lambda x: x["done"])["k"]], (a, b, whole)
        conflicts = [x for x in (a, b) if x["status"] == "conflict"]
        if timeout > 0:
            assert not conflicts, conflicts  # the second one waited
            stats["both ok"] += 1
        for c in conflicts:
            assert os.path.basename(path) in c["msg"] and "writer" in c["msg"], c["msg"]
            stats["conflict"] += 1
    waited = max(max(x["seconds"] for x in (results[0][r], results[1][r])) for r in range(ROUNDS))
    ok = stats["invalid"] == 0 and stats["mixed"] == 0
    record(
        "concurrency",
        f"two writers on one .{ext}",
        injected=(
            f"2 processes write the whole matrix (one transaction each) at the same moment, {2 * ROUNDS} times: "
            f"{ROUNDS} with dask_loom.write-timeout=60 s, {ROUNDS} with 0 s"
        ),
        times=2 * ROUNDS,
        result=(
            f"write-timeout 60 s: {stats['both ok']}/{ROUNDS} rounds both writes applied in turn (longest wait {waited:.1f} s); "
            f"write-timeout 0 s: {stats['conflict']} WriteConflictError naming the file; "
            f"{stats['invalid']} invalid files, {stats['mixed']} mixed contents; every file holds the last committed writer's matrix whole"
        ),
        ok=ok,
        rounds=2 * ROUNDS,
        conflicts=stats["conflict"],
        invalid=stats["invalid"],
        mixed=stats["mixed"],
        lost_or_corrupt=stats["invalid"] + stats["mixed"],
    )


REPS = 6


@pytest.mark.parametrize("kind", ["loom", "zarr", "loom-cluster"])
def test_eight_threads_on_one_connection(tmp_path, kind, request):
    rng = np.random.default_rng(7)
    m = (rng.negative_binomial(2, 0.3, size=(1000, 300)) * (rng.random((1000, 300)) < 0.3)).astype("float32")
    path = str(tmp_path / "t.loom")
    dask_loom.create(path, m, {"Gene": np.arange(m.shape[0])}, {"CellID": np.arange(m.shape[1])}, chunks=CHUNKS)
    if kind == "zarr":
        zpath = str(tmp_path / "t.loom.zarr")
        dask_loom.convert(path, zpath, chunks=CHUNKS)
        path = zpath
    ref_sum = [m.astype("float64").sum(axis=1), m.astype("float64").sum(axis=0)]
    ref_mean = [m.astype("float64").mean(axis=1), m.astype("float64").mean(axis=0)]
    n_ops = [0]
    failures: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            for rep in range(REPS):
                axis = (i + rep) % 2
                if (i + rep) % 4 < 2:
                    got = np.zeros_like(m)
                    for _ix, sel, view in ds.scan(axis=axis, batch_size=128 + 64 * (i % 3), what=["layers"]):
                        if axis == 0:
                            got[sel, :] = view[:, :]
                        else:
                            got[:, sel] = view[:, :]
                    np.testing.assert_array_equal(got, m)
                else:
                    s, mu = ds.map([np.sum, np.mean], axis=axis)
                    np.testing.assert_allclose(s, ref_sum[axis], rtol=1e-6)
                    np.testing.assert_allclose(mu, ref_mean[axis], rtol=1e-6)
                with lock:
                    n_ops[0] += 1
        except BaseException as exc:
            with lock:
                failures.append(f"thread {i}: {type(exc).__name__}: {exc}"[:500])

    where: dict[str, Any] = {"scheduler": "threads"}
    if kind == "loom-cluster":
        where = {"client": request.getfixturevalue("local_cluster")}
    with dask_loom.connect(path, "r", **where) as ds:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a thread hung"
    label = {"loom": ".loom", "zarr": ".loom.zarr", "loom-cluster": ".loom, process cluster"}[kind]
    record(
        "concurrency",
        f"8 threads on one connection ({label})",
        injected=(
            f"8 client threads share one connection, each running {REPS} operations: scans (axis 0 and 1, batch sizes 128-256) "
            "and maps ([np.sum, np.mean], axis 0 and 1)"
            + (" on a 2-worker process LocalCluster" if kind == "loom-cluster" else " on the threaded scheduler")
        ),
        times=n_ops[0] + len(failures),
        result=f"{n_ops[0]} of {8 * REPS} operations equal numpy on the same matrix; {len(failures)} failures",
        ok=not failures and n_ops[0] == 8 * REPS,
        operations=n_ops[0],
        failures=len(failures),
    )
    assert not failures, failures
    assert n_ops[0] == 8 * REPS


HOLD = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r+")  # HDF5's exclusive write lock, as an in-place writer holds it
print("HELD", flush=True)
time.sleep(float(sys.argv[2]))
f.close()
"""


def test_reader_meets_a_foreign_in_place_writer(tmp_path):
    """Another program holds the file open for writing: readers wait for it, then say the file is being written."""
    import dask

    from dask_loom.errors import FileBeingWrittenError

    path = str(tmp_path / "h.loom")
    dask_loom.create(path, version(0), {"Gene": np.arange(SHAPE[0])}, {"CellID": np.arange(SHAPE[1])}, chunks=CHUNKS)
    outcomes = []
    for hold, timeout in ((30.0, 0.3), (1.0, 30.0)):
        p = subprocess.Popen([sys.executable, "-c", HOLD, path, str(hold)], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "HELD"
            t0 = time.perf_counter()
            with dask.config.set({"dask_loom.write-timeout": timeout}):
                if timeout < 1:
                    with pytest.raises(FileBeingWrittenError, match="being written") as err:
                        dask_loom.connect(path, "r")
                    assert os.path.basename(path) in str(err.value)
                    outcomes.append(f"write-timeout {timeout} s: FileBeingWrittenError after {time.perf_counter() - t0:.1f} s")
                else:
                    with dask_loom.connect(path, "r") as ds:
                        np.testing.assert_array_equal(ds[:100, :100], version(0)[:100, :100])
                    outcomes.append(f"write-timeout {timeout:.0f} s: waited {time.perf_counter() - t0:.1f} s for the {hold:.0f} s write, then read the data")
        finally:
            p.kill()
            p.wait()
    record(
        "concurrency",
        "reader meets a foreign in-place writer (.loom)",
        injected="another process holds the .loom open with h5py 'r+' (HDF5's exclusive lock) while dask_loom connects and reads",
        times=2,
        result="; ".join(outcomes),
        ok=True,
    )
