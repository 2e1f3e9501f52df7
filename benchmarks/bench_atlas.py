"""An atlas-shaped run: map and aggregate over a cell atlas on an object store, on a real cluster.

The full atlas is 3,300,000 cells x 58,000 genes of uint16 counts (a Loom
layer is genes x cells: 58,000 x 3,300,000, about 383 GB decoded).  This
benchmark writes a slice of it (all genes, ``--cells N`` cells; the default
fits a 2-core machine in a few minutes) as a ``.loom.zarr`` with
``dask_loom.create`` to the local S3 server (moto on 127.0.0.1), and reads it
back through the request-counting proxy that waits ``--latency`` seconds
(20 ms) before answering each request (``tests/_faultproxy.py``; requests in
flight wait at the same time, each in its own thread).  The server and the
proxy run in processes of their own (``benchmarks/_testbed.py``), so their CPU
is measured apart and they share no GIL with the client.  On a real ``dask
scheduler`` with 1, then 2 ``dask worker`` processes (one thread each, no
nanny but the environment a nanny sets: one BLAS thread, ``MALLOC_TRIM_THRESHOLD_``; the
``dask_loom.worker_setup`` preload every ``deploy/`` file uses; warmed first: imports,
the store opened, one small read, the cold
start recorded) it runs

* ``ds.map([np.mean, np.std], axis=0)``   (per gene), and
* ``ds.aggregate(group_by=labels)``       (the mean of each gene in each of 50 cell groups),

and records per run: wall time; requests and bytes per GiB decoded and the
most requests in flight at once (the proxy's counters); peak RSS of a worker
process; the CPU seconds of every process (client, scheduler, each worker, S3
server, proxy) and of the whole machine, so the share other work took is
known (``processes``); the scheduler share (below); the scheduler process's
CPU share, busy and idle; and the scaling ``T1 / (2 * T2)`` with the evidence
of what limits it (worker CPU seconds 2 vs 1 worker, cores used by ours and by
others).  It also measures the decode rate of one core on the stored chunks
(no network), and the client's time to build the graph of ``map`` for the
full 58,000 x 3,300,000 shape with the same stored chunks (nothing computed).

The scheduler share is the part of the worker threads' time (threads x wall,
wall from the call to its result in the client) not spent computing a task,
``1 - task compute / (threads x wall)``, from the task stream; it is split into
idle before each thread's first task, between tasks, and after its last task
(``stream_stats``).

Counts are synthetic but count-like: about 8 % non-zero, gene detection
rates spread over 0.2 % - 30 %, geometric values; each stored chunk is
generated from its own seed, so any part can be regenerated to check the
results (a band of genes is checked against numpy).

    python benchmarks/bench_atlas.py                 # default slice
    python benchmarks/bench_atlas.py --cells 4096    # smaller (script check)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import itertools
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _harness import save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_CELLS = 3_300_000
GENES = 58_000
GIB = 2**30


# -- the generated atlas ------------------------------------------------------------------------


def gene_profile(n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene detection rate (0.2 % - 30 %, most genes rare) and mean count when detected."""
    rng = np.random.default_rng(15)
    u = rng.random(n_genes)
    detect = 0.002 + 0.3 * u**3
    mean = 1.0 + 20.0 * u**4
    return detect.astype(np.float32), mean.astype(np.float32)


def gen_block(
    rows: slice, cols: slice, chunks: tuple[int, int], detect: np.ndarray, mean: np.ndarray
) -> np.ndarray:
    """The counts of ``[rows, cols]``: each stored chunk from its own seed (any region regenerates alike)."""
    out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=np.uint16)
    for r0 in range(rows.start, rows.stop, chunks[0]):
        r1 = min(rows.stop, r0 + chunks[0])
        for c0 in range(cols.start, cols.stop, chunks[1]):
            c1 = min(cols.stop, c0 + chunks[1])
            rng = np.random.default_rng((r0 // chunks[0], c0 // chunks[1], 15))
            hit = rng.random((r1 - r0, c1 - c0), dtype=np.float32) < detect[r0:r1, None]
            n = np.broadcast_to(mean[r0:r1, None], hit.shape)[hit]
            vals = rng.geometric(1.0 / n).astype(np.uint16)
            block = out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start]
            block[hit] = vals
    return out


def atlas_array(n_genes: int, n_cells: int, chunks: tuple[int, int]) -> Any:
    """The slice as a lazy dask array whose blocks are whole stored chunks (bands of 8 chunk rows)."""
    import dask.array as da
    from dask.array.core import normalize_chunks

    detect, mean = gene_profile(n_genes)
    bchunks = normalize_chunks((chunks[0] * 8, chunks[1] * 8), (n_genes, n_cells))

    def block(block_info: Any = None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        return gen_block(slice(r0, r1), slice(c0, c1), chunks, detect, mean)

    return da.map_blocks(block, chunks=bchunks, dtype=np.uint16, meta=np.empty((0, 0), np.uint16))


def group_labels(n_cells: int, n_groups: int) -> np.ndarray:
    return np.random.default_rng(16).integers(0, n_groups, size=n_cells).astype(np.int64)


def write_atlas(
    url: str, options: dict[str, Any], n_cells: int, chunks: tuple[int, int], n_groups: int
) -> dict[str, Any]:
    import dask_loom

    x = atlas_array(GENES, n_cells, chunks)
    row_attrs = {"Gene": np.array([f"G{i:05d}" for i in range(GENES)])}
    col_attrs = {
        "CellID": np.array([f"c{i:07d}" for i in range(n_cells)]),
        "Group": group_labels(n_cells, n_groups),
    }
    kw: dict[str, Any] = {}
    params = inspect.signature(dask_loom.create).parameters
    sharded = "shards" in params
    if sharded:
        # A writer that shards (issue 15, item 1): shards of about dask_loom.block-size.
        kw["shards"] = "auto"
    t0 = time.perf_counter()
    dask_loom.create(
        url, x, row_attrs, col_attrs, chunks=chunks, storage_options=options, scheduler="threads", **kw
    )
    return {"write_s": time.perf_counter() - t0, "writer_shards_option": sharded}


def stored(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Objects and bytes of the matrix as stored, and its Zarr metadata."""
    import json

    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    base = url[len("s3://") :] + "/matrix"
    sizes = [v["size"] for k, v in fs.find(base, detail=True).items() if not k.endswith("zarr.json")]
    meta = json.loads(fs.cat_file(base + "/zarr.json"))
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    return {
        "objects": len(sizes),
        "stored_bytes": int(sum(sizes)),
        "codecs": codecs,
        "sharded": "sharding_indexed" in codecs,
        "metadata": meta,
    }


# -- measurements in the client process ---------------------------------------------------------


def decode_rate(
    url: str, options: dict[str, Any], meta: dict[str, Any], chunks: tuple[int, int], n_cells: int
) -> dict[str, Any]:
    """One core decoding stored chunks into a block (the reader's own path), from memory: bytes/s."""
    import s3fs

    from dask_loom.stores import MemoryStore
    from dask_loom.zarr._source import ZarrSource

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    base = url[len("s3://") :] + "/matrix"
    rows = chunks[0] * 4
    cols = min(n_cells, chunks[1] * 16)
    mem = MemoryStore()
    mem.set("matrix/zarr.json", fs.cat_file(base + "/zarr.json"))
    keys = [k for k in fs.find(base) if not k.endswith("zarr.json")]
    for k in keys:
        rel = k[len(base) + 1 :]
        parts = rel.split("/")
        if len(parts) >= 3 and int(parts[-2]) < 4 and int(parts[-1]) < 16:
            mem.set(f"matrix/{rel}", fs.cat_file(k))
    src = ZarrSource(mem, "matrix", meta, prefix="loom-read")
    region = (slice(0, rows), slice(0, cols))
    src.read_block(region)  # warm
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        block = src.read_block(region)
        best = min(best, time.perf_counter() - t0)
    ref = gen_block(region[0], region[1], chunks, *gene_profile(GENES))
    np.testing.assert_array_equal(block, ref)
    return {"decode_bytes": int(block.nbytes), "decode_s": best, "decode_bytes_per_s": block.nbytes / best}


def graph_build(meta: dict[str, Any], n_cells: int) -> dict[str, Any]:
    """Build (never run) the graphs of ``map([mean, std])`` and ``aggregate`` over the full atlas shape with the stored layout."""
    import cloudpickle

    from dask_loom.ops._map import map_graph
    from dask_loom.stores import MemoryStore
    from dask_loom.zarr._source import ZarrSource

    full = {**meta, "shape": [GENES, n_cells]}
    src = ZarrSource(MemoryStore(), "matrix", full, prefix="loom-read")  # metadata only: no chunk exists
    t0 = time.perf_counter()
    dsk, outs, _ = map_graph(src, [np.mean, np.std], axis=0, prefix="loom-map")
    took = time.perf_counter() - t0
    # aggregate by 50 groups (tiled over blocks at this width): what the client sends the scheduler.
    from dask_loom.ops._aggregate import _tiled_sums
    from dask_loom.ops._kernels import GroupPlan

    plan = GroupPlan(np.random.default_rng(0).integers(0, 50, n_cells), 50)
    t0 = time.perf_counter()
    agg = _tiled_sums(src, plan, None, "loom-aggregate-full", "loom-aggregate-combine-full", "mean")
    agg_took = time.perf_counter() - t0
    agg_graph = dict(agg[0].__dask_graph__())
    n_read = sum(
        1
        for k in dsk
        if isinstance(k, tuple)
        and k[0].startswith("loom-map-")
        and not k[0].startswith(("loom-map-combine", "loom-map-result"))
    )
    return {
        "shape": [GENES, n_cells],
        "build_s": took,
        "tasks": len(dsk),
        "block_tasks": n_read,
        "outputs": len(outs),
        "pickled_bytes": len(cloudpickle.dumps(dsk)),
        "aggregate_build_s": agg_took,
        "aggregate_tasks": len(agg_graph),
        "aggregate_pickled_bytes": len(cloudpickle.dumps(agg_graph)),
    }


# -- the cluster --------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of each process in *pids* (sampled every 50 ms)."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for p in self.procs:
                with contextlib.suppress(psutil.Error):
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak.values())


def stream_stats(data: list[dict[str, Any]], t_start: float, t_end: float, lanes: int) -> dict[str, Any]:
    """Task-stream numbers of one run: time in tasks vs the lanes' (worker threads') wall time.

    ``scheduler_share`` is the part of the worker threads' time (``lanes x wall``,
    wall from the call to its result in the client) not spent computing a task:
    ``1 - task compute / (lanes x wall)``.  It is split in three, which add up to it (within the
    offsets of the processes' clocks):

    * ``idle_before_share``: from the call until each thread's first task starts
      (graph build and submission, scheduling the first tasks, per-process set-up);
    * ``idle_between_share``: gaps between two tasks on the same thread (the
      scheduler's round trip per task, fetching inputs from the other worker);
    * ``idle_after_share``: from each thread's last task to the result in the
      client (the other thread still busy, i.e. imbalance, plus the result's
      return).
    """
    compute = transfer = 0.0
    by_lane: dict[Any, list[tuple[float, float]]] = {}
    for t in data:
        spans = [(s["start"], s["stop"]) for s in t.get("startstops", ()) if s.get("action") == "compute"]
        for s in t.get("startstops", ()):
            if s.get("action") == "transfer":
                transfer += s["stop"] - s["start"]
        for a, b in spans:
            compute += b - a
            by_lane.setdefault((t.get("worker"), t.get("thread")), []).append((a, b))
    gaps = before = after = 0.0
    n_gaps = 0
    for spans in by_lane.values():
        spans.sort()
        before += max(0.0, spans[0][0] - t_start)
        after += max(0.0, t_end - spans[-1][1])
        for (_, b), (a2, _) in itertools.pairwise(spans):
            gaps += max(0.0, a2 - b)
            n_gaps += 1
    idle_lanes = max(0, lanes - len(by_lane))  # a thread that ran nothing idled throughout
    wall = t_end - t_start
    total = lanes * wall
    first = min((a for spans in by_lane.values() for a, _ in spans), default=t_start)
    last = max((b for spans in by_lane.values() for _, b in spans), default=t_end)
    return {
        "tasks": len(data),
        "task_compute_s": compute,
        "transfer_s": transfer,
        # Worker-thread time not in a task: scheduling, messages, serialisation, waiting at the ends.
        "scheduler_share": max(0.0, 1.0 - compute / total),
        "idle_before_share": before / total,
        "idle_between_share": gaps / total,
        "idle_after_share": (after + idle_lanes * wall) / total,
        "tasks_per_lane": sorted(len(v) for v in by_lane.values()),
        # Between two tasks on the same thread: the per-task price of the scheduler round trip.
        "gap_between_tasks_s": gaps,
        "overhead_per_task_ms": 1000.0 * gaps / max(1, n_gaps),
        "first_task_after_s": first - t_start,
        "result_after_last_task_s": t_end - last,
    }


def _noop(i: int) -> int:
    return i


def noop_rate(client: Any, sched: Any, n: int = 2000) -> dict[str, Any]:
    """The scheduler's own price per task: *n* independent no-op tasks, wall and scheduler CPU per task."""
    client.gather(client.map(_noop, range(200), pure=False))  # warm
    cpu0 = sum(sched.cpu_times()[:2])
    t0 = time.perf_counter()
    got = client.gather(client.map(_noop, range(n), pure=False))
    wall = time.perf_counter() - t0
    cpu = sum(sched.cpu_times()[:2]) - cpu0
    assert got == list(range(n))
    return {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall, "scheduler_cpu_per_task_ms": 1000 * cpu / n}


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def cpu_by_process(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named process, and by the whole machine.

    ``machine`` is every core's non-idle time (all processes, ours or not);
    ``machine_niced`` the part of it spent in niced processes.
    """
    import psutil

    out: dict[str, float] = {}
    for name, p in procs.items():
        try:
            t = p.cpu_times()
            out[name] = float(t.user + t.system)
        except psutil.Error:
            out[name] = float("nan")
    m = psutil.cpu_times()
    # Not idle, not waiting (steal, time the host gave to other machines, counts as taken); guest
    # time is already counted in user time (Linux), so left out.
    skip = m.idle + sum(getattr(m, k, 0.0) for k in ("iowait", "guest", "guest_nice"))
    out["machine"] = float(sum(m) - skip)
    out["machine_niced"] = float(getattr(m, "nice", 0.0))
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, Any]:
    """Per-process CPU seconds of one run, its share of one core, and what the rest of the machine used."""
    sec = {k: after[k] - before[k] for k in before}
    ours = sum(v for k, v in sec.items() if not k.startswith("machine"))
    sec["ours"] = ours
    sec["others"] = max(0.0, sec["machine"] - ours)  # other work on the machine (other sessions)
    return {
        "cpu_s": sec,
        "cores_busy": {k: v / wall for k, v in sec.items()},
    }


_WARM_MODULES = (
    "dask_loom.loom", "dask_loom.ops._map", "dask_loom.ops._aggregate", "dask_loom.ops._kernels",
    "dask_loom.zarr._source", "dask_loom.zarr._chunks", "zarr", "numcodecs.blosc", "s3fs",
)  # fmt: skip


def _warm(url: str, options: dict[str, Any]) -> float:
    """In a worker: import what the tasks need and open the layer's store (one small read).

    What a long-lived worker has done before: the first task otherwise pays
    the imports and the object-store client's set-up (seconds on a loaded
    2-core machine), a fixed cost a 1-to-2-worker ratio would count as
    scheduler time.  Returns the seconds it took (the cold start, recorded).
    """
    t0 = time.perf_counter()
    for m in _WARM_MODULES:
        importlib.import_module(m)
    import dask_loom

    with dask_loom.connect(url, "r", storage_options=options) as ds:
        ds.layers[""]._source().read_block((slice(0, 1), slice(0, 1)))
    return time.perf_counter() - t0


def run_cluster(
    n_workers: int,
    url: str,
    options: dict[str, Any],
    proxy: Any,
    n_groups: int,
    log_dir: str,
    testbed: dict[str, int],
    *,
    preload: bool = True,
) -> dict[str, Any]:
    import psutil
    from _processes import start_scheduler, stop
    from distributed import Client, get_task_stream

    import dask_loom

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    # What a nanny sets in the processes it starts (distributed.nanny.pre-spawn-environ): one BLAS
    # thread per worker thread, so 2 workers on 2 cores do not run 4 BLAS threads.
    import dask

    wenv = {**env, **{k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}}
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(os.path.join(log_dir, f"scheduler-{n_workers}.log"), "w")  # noqa: SIM115
        logs.append(log)
        scheduler, addr = start_scheduler(log, env=env)
        procs.append(scheduler)
        for i in range(n_workers):
            wlog = open(os.path.join(log_dir, f"worker-{n_workers}-{i}.log"), "w")  # noqa: SIM115
            logs.append(wlog)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--name", f"w{i}", "--nthreads", "1",
                     "--nworkers", "1", "--no-nanny", "--memory-limit", "6GiB", "--host", "127.0.0.1",
                     *(["--preload", "dask_loom.worker_setup"] if preload else [])],
                    stdout=wlog, stderr=subprocess.STDOUT, env=wenv,
                )
            )  # fmt: skip
        with Client(addr, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=120)
            # Imports and the first connection out of the timed part (the cluster is warm, as a long-lived one is).
            warm = client.run(_warm, url, options)
            for m in _WARM_MODULES:  # the client's first map otherwise imports the graph builders
                importlib.import_module(m)
            sched = psutil.Process(procs[0].pid)
            roles = {"client": psutil.Process(), "scheduler": sched}
            roles.update({f"worker-{i}": psutil.Process(p.pid) for i, p in enumerate(procs[1:])})
            roles.update({k: psutil.Process(v) for k, v in testbed.items()})
            sampler = RssSampler([p.pid for p in procs[1:]])
            out: dict[str, Any] = {
                "workers": n_workers,
                "threads_per_worker": 1,
                "worker_environ": {
                    k: wenv[k] for k in sorted(wenv) if k.endswith(("_NUM_THREADS", "TRIM_THRESHOLD_"))
                },
                "cold_start_s": sorted(warm.values()),  # per worker: imports and the store's first open
            }
            try:
                # The scheduler's CPU with nothing to schedule (heartbeats, the dashboard's periodic work):
                # the floor under scheduler_cpu_share, whatever the graph.
                c0, t0 = sum(sched.cpu_times()[:2]), time.perf_counter()
                time.sleep(3.0)
                out["scheduler_idle_cpu_share"] = (sum(sched.cpu_times()[:2]) - c0) / (
                    time.perf_counter() - t0
                )
                out["noop_tasks"] = noop_rate(client, sched)
                proxy.reset_counts()
                t0 = time.perf_counter()
                ds = dask_loom.connect(url, "r", storage_options=options)
                out["connect_s"] = time.perf_counter() - t0
                out["connect_requests"] = proxy.snapshot()["total_requests"]
                labels = ds.ca["Group"]
                shape = ds.shape
                # One small read through the whole path (client graph, workers' reads) before the timed
                # calls, as a long-lived cluster has done before; the cold first call is recorded here.
                t0 = time.perf_counter()
                x = ds.layers[""].dask[: min(shape[0], 256)]
                client.compute(x.astype(np.float64).mean(axis=1)).result()
                out["warmup_read_s"] = time.perf_counter() - t0
                for op in ("map", "aggregate"):
                    proxy.reset_counts()
                    cpu0 = sum(sched.cpu_times()[:2])
                    wcpu0 = client.run(_cpu_seconds)
                    pcpu0 = cpu_by_process(roles)
                    with get_task_stream(client=client) as ts:
                        w0 = time.time()
                        t0 = time.perf_counter()
                        if op == "map":
                            res = ds.map([np.mean, np.std], axis=0, client=client)
                        else:
                            res = [ds.aggregate(None, group_by=labels, aggr_by="mean", client=client)]
                        wall = time.perf_counter() - t0
                        w1 = time.time()
                    cpu1 = sum(sched.cpu_times()[:2])
                    pcpu1 = cpu_by_process(roles)
                    wcpu = sum(client.run(_cpu_seconds).values()) - sum(wcpu0.values())
                    snap = proxy.snapshot()
                    decoded = shape[0] * shape[1] * 2
                    gib = decoded / GIB
                    out[op] = {
                        "wall_s": wall,
                        "decoded_bytes": decoded,
                        "decoded_gib_per_s": gib / wall,
                        "requests": snap["requests"],
                        "ranged_gets": snap["ranged_gets"],
                        "total_requests": snap["total_requests"],
                        "requests_per_gib": snap["total_requests"] / gib,
                        "bytes_per_gib": snap["total_bytes"] / gib,
                        "bytes_per_request": snap["total_bytes"] / max(1, snap["requests"].get("GET", 0)),
                        "worker_cpu_s": wcpu,
                        "worker_cpu_per_gib_s": wcpu / gib,
                        "scheduler_cpu_s": cpu1 - cpu0,
                        "scheduler_cpu_share": (cpu1 - cpu0) / wall,
                        **stream_stats(ts.data, w0, w1, n_workers),
                        "processes": cpu_delta(pcpu0, pcpu1, wall),
                        "proxy_peak_in_flight": snap.get("peak_in_flight"),
                    }
                    out[op]["results"] = res
                ds.close()
            finally:
                out["peak_worker_rss"] = sampler.stop()
        return out
    finally:
        stop(procs)
        for f in logs:
            f.close()


def check(results: dict[str, Any], n_cells: int, chunks: tuple[int, int], n_groups: int) -> dict[str, Any]:
    """Compare one band of genes with numpy on the regenerated counts."""
    rows = slice(2 * chunks[0], 3 * chunks[0])  # whole stored chunks: regenerated from the same seeds
    ref = gen_block(rows, slice(0, n_cells), chunks, *gene_profile(GENES)).astype(np.float64)
    mean, std = (r[rows] for r in results["map"]["results"])
    np.testing.assert_allclose(mean, ref.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(std, ref.std(axis=1), rtol=1e-8)
    labels = group_labels(n_cells, n_groups)
    agg = results["aggregate"]["results"][0][rows]
    want = np.stack([ref[:, labels == g].mean(axis=1) for g in range(n_groups)], axis=1)
    np.testing.assert_allclose(agg, want, rtol=1e-10)
    return {"checked_rows": [rows.start, rows.stop], "nonzero_fraction": float((ref > 0).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=8192, help="cells in the slice (the full atlas: 3,300,000)")
    ap.add_argument(
        "--chunks",
        type=int,
        nargs=2,
        default=None,
        help="stored chunk shape (default: dask_loom.loom-zarr-chunks)",
    )
    ap.add_argument("--latency", type=float, default=0.02, help="seconds the proxy waits per request")
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--workers", default="1,2", help="worker counts to run, in order")
    ap.add_argument(
        "--no-preload",
        action="store_true",
        help="workers without dask_loom.worker_setup (a plain dask worker: its first block read tunes the allocator)",
    )
    ap.add_argument(
        "--name", default=None, help="results name (default: atlas, or atlas_<cells> for other sizes)"
    )
    args = ap.parse_args()

    import tempfile

    from _faultproxy import options_via
    from _testbed import start_proxy, start_server

    from dask_loom._config import get_config

    chunks = tuple(int(c) for c in (args.chunks or get_config("loom-zarr-chunks")))
    n_cells = int(args.cells)
    results: dict[str, Any] = {
        # Other work shared this 2-core machine: its load average when the run started and ended.
        "load_average_start": list(os.getloadavg()),
        "shape": [GENES, n_cells],
        "full_shape": [GENES, FULL_CELLS],
        "dtype": "uint16",
        "chunks": list(chunks),
        "latency_s": args.latency,
        "block_size": get_config("block-size"),
        "codec": get_config("zarr-codec"),
        "worker_preload": not args.no_preload,
        "zarr_async_concurrency": None,
        "runs": {},
    }
    import zarr

    results["zarr_async_concurrency"] = zarr.config.get("async.concurrency")
    # The S3 server and the proxy each in their own process: their CPU is measured apart, and
    # they do not share a GIL with the client (or with each other).
    server = start_server("atlas")
    info = server.info
    proxy = start_proxy(info["endpoint_url"], args.latency)
    via = options_via(info["storage_options"], proxy.info["url"])
    testbed = {"s3_server": server.pid, "proxy": proxy.pid}
    url = f"s3://{info['bucket']}/atlas-{uuid.uuid4().hex[:6]}.loom.zarr"
    try:
        print(
            f"writing {GENES} x {n_cells} uint16 ({GENES * n_cells * 2 / GIB:.2f} GiB decoded), chunks {chunks} ...",
            flush=True,
        )
        results["write"] = write_atlas(url, info["storage_options"], n_cells, chunks, args.groups)
        st = stored(url, info["storage_options"])
        meta = st.pop("metadata")
        results["stored"] = st
        results["write"]["compression_ratio"] = GENES * n_cells * 2 / st["stored_bytes"]
        print(
            f"  {results['write']['write_s']:.1f} s; {st['objects']} objects, {st['stored_bytes'] / 2**20:.1f} MiB stored, sharded: {st['sharded']}",
            flush=True,
        )
        results["decode"] = decode_rate(url, info["storage_options"], meta, chunks, n_cells)
        print(f"decode, one core: {results['decode']['decode_bytes_per_s'] / 2**20:.0f} MiB/s", flush=True)
        results["graph_build_full"] = graph_build(meta, FULL_CELLS)
        g = results["graph_build_full"]
        print(
            f"graph of map over {g['shape']}: {g['tasks']} tasks built in {g['build_s']:.3f} s, {g['pickled_bytes'] / 2**20:.1f} MiB; "
            f"aggregate: {g['aggregate_tasks']} tasks in {g['aggregate_build_s']:.3f} s, {g['aggregate_pickled_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as logs:
            for n in (int(w) for w in args.workers.split(",")):
                r = run_cluster(n, url, via, proxy, args.groups, logs, testbed, preload=not args.no_preload)
                for op in ("map", "aggregate"):
                    o = r[op]
                    print(
                        f"{n} worker(s) {op}: {o['wall_s']:.1f} s, {o['decoded_gib_per_s']:.2f} GiB/s, {o['requests_per_gib']:.0f} req/GiB, "
                        f"{o['bytes_per_gib'] / 2**20:.0f} MiB/GiB, scheduler share {o['scheduler_share']:.3f}, "
                        f"{o['overhead_per_task_ms']:.1f} ms/task gap, scheduler CPU {o['scheduler_cpu_share']:.3f}",
                        flush=True,
                    )
                    print(
                        f"    idle of worker threads: before first task {o['idle_before_share']:.3f}, between tasks "
                        f"{o['idle_between_share']:.3f}, after last {o['idle_after_share']:.3f}; tasks per thread {o['tasks_per_lane']}",
                        flush=True,
                    )
                    busy = o["processes"]["cores_busy"]
                    print("    cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()), flush=True)
                print(f"  cold start per worker (warmed before timing): {r['cold_start_s']}", flush=True)
                nt = r["noop_tasks"]
                print(
                    f"  peak worker RSS {r['peak_worker_rss'] / 2**20:.0f} MiB; no-op tasks: {nt['tasks_per_s']:.0f}/s, "
                    f"scheduler CPU {nt['scheduler_cpu_per_task_ms']:.2f} ms/task",
                    flush=True,
                )
                results["runs"][str(n)] = r
        runs = results["runs"]
        results["check"] = check(runs[next(iter(runs))], n_cells, chunks, args.groups)
        first = next(iter(runs.values()))
        for other in runs.values():
            for op in ("map", "aggregate"):
                for a, b in zip(first[op]["results"], other[op]["results"]):
                    np.testing.assert_allclose(a, b, rtol=1e-12)
        for k in runs.values():
            for op in ("map", "aggregate"):
                k[op].pop("results")
        if "1" in runs and "2" in runs:
            results["scaling"] = {
                op: runs["1"][op]["wall_s"] / (2 * runs["2"][op]["wall_s"]) for op in ("map", "aggregate")
            }
            print(f"scaling T1/(2 T2): {results['scaling']}", flush=True)
            # What limits it: the workers' CPU seconds for the same work (1.0: nothing is wasted by running
            # on two), and the cores our processes had (2 - others) against those they used.
            results["scaling_evidence"] = {
                op: {
                    "worker_cpu_2_over_1": runs["2"][op]["worker_cpu_s"] / runs["1"][op]["worker_cpu_s"],
                    "cores_used_by_ours": [
                        runs[n][op]["processes"]["cores_busy"]["ours"] for n in ("1", "2")
                    ],
                    "cores_used_by_others": [
                        runs[n][op]["processes"]["cores_busy"]["others"] for n in ("1", "2")
                    ],
                }
                for op in ("map", "aggregate")
            }
            print(f"scaling evidence: {results['scaling_evidence']}", flush=True)
    finally:
        proxy.close()
        server.close()
    results["load_average_end"] = list(os.getloadavg())
    name = args.name or ("atlas" if n_cells == 8192 else f"atlas_{n_cells}")
    print("results:", save(name, results))


if __name__ == "__main__":
    main()
