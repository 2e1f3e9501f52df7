"""An HDF5 ``.loom`` on an object store: ``map([mean, std])`` remote vs local vs h5py over fsspec.

The file (loompy-written, float32, 64 x 64 chunks, gzip) is uploaded to the
local S3 server (moto, ``tests/_s3server.py``) and read through the
request-counting proxy (``tests/_faultproxy.py``) that waits ``--latency``
seconds (default 20 ms, a real object store's round trip) before answering
each request.  Three runs, each in a fresh process, timed from ``connect`` to
the result:

``local``
    ``dask_loom.connect(path).map([np.mean, np.std], axis=0)`` on the local file;
``remote``
    the same on ``s3://…`` through the proxy (opening, chunk index, map);
``h5py-fsspec``
    what a user writes without dask_loom: ``h5py.File(fs.open(url))`` and the
    layer read in row bands of ``--band`` rows, mean and std per row with numpy.

Targets (issue 15): remote <= 1.5 x local, and >= 10 x faster than h5py over
fsspec.  The requests and bytes the proxy saw are recorded per run.

    python benchmarks/bench_cloud_loom.py                 # 4,096 x 16,384
    python benchmarks/bench_cloud_loom.py --rows 20000 --cols 50000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _harness import CACHE, measure, relative, save, table


def bench_file(rows: int, cols: int) -> str:
    path = os.path.join(CACHE, f"loompy_{rows}x{cols}.loom")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        from dask_loom._synthetic import write_synthetic_loom

        t0 = time.perf_counter()
        tmp = path + ".partial"
        write_synthetic_loom(tmp, rows, cols, writer="loompy")
        os.replace(tmp, path)
        print(f"generated {relative(path)} with loompy in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _dask_loom_map(url: str, storage_options: dict | None) -> list[np.ndarray]:
    import dask_loom

    with dask_loom.connect(url, "r", storage_options=storage_options, validate=False) as ds:
        return ds.map([np.mean, np.std], axis=0)


def _h5py_fsspec_map(url: str, storage_options: dict, band: int) -> list[np.ndarray]:
    import fsspec
    import h5py

    fs = fsspec.filesystem("s3", **storage_options)
    means, stds = [], []
    with fs.open(url, "rb") as fh, h5py.File(fh, "r") as f:
        m = f["matrix"]
        for i in range(0, m.shape[0], band):
            block = m[i : i + band].astype(np.float64)
            means.append(block.mean(axis=1))
            stds.append(block.std(axis=1))
    return [np.concatenate(means), np.concatenate(stds)]


def _cold_and_warm(fn: Any, *fargs: Any, warm: bool) -> dict:
    """Time *fn* in this (fresh) process: cold pays imports, sessions and first opens; then, if
    *warm*, a second call (files and chunk indexes the first call cached stay cached)."""
    t0 = time.perf_counter()
    out = fn(*fargs)
    cold = time.perf_counter() - t0
    result = {"wall": cold, "cold": cold, "checksum": [float(np.nansum(x)) for x in out]}
    if warm:
        t0 = time.perf_counter()
        fn(*fargs)
        result["warm"] = time.perf_counter() - t0
    return result


def _cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def run_dask_loom(url: str, storage_options: dict | None, warm: bool) -> dict:
    import dask_loom  # noqa: F401  (the package's own import is not part of the figure)

    return _cold_and_warm(_dask_loom_map, url, storage_options, warm=warm)


def run_h5py_fsspec(url: str, storage_options: dict, band: int, warm: bool) -> dict:
    import h5py  # noqa: F401

    return _cold_and_warm(_h5py_fsspec_map, url, storage_options, band, warm=warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds the proxy waits per request")
    ap.add_argument("--band", type=int, default=1024, help="rows per read in the h5py-over-fsspec run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-h5py", action="store_true", help="skip the (slow) h5py-over-fsspec run")
    args = ap.parse_args()

    from _faultproxy import FaultProxy, options_via
    from _s3server import S3Server

    path = bench_file(args.rows, args.cols)
    server = S3Server()
    info = server.start()
    proxy = FaultProxy(info["endpoint_url"], latency=args.latency)
    try:
        import fsspec

        fs = fsspec.filesystem("s3", **info["storage_options"])
        key = f"{info['bucket']}/bench/{os.path.basename(path)}"
        fs.put_file(path, key)
        url = f"s3://{key}"
        opts = options_via(info["storage_options"], proxy.url)
        rows: list[tuple[str, dict]] = []
        traffic: dict[str, dict] = {}
        harness_cpu: dict[str, dict] = {}

        def timed(name: str, fn: Any, *fargs: Any) -> None:
            # Cold: fresh processes doing one run each (their traffic is one run's);
            # warm: the second run of a process that already did one.
            # The S3 server and the proxy are threads of this process: its CPU time during the
            # runs (less the local run's, which is the harness's own) is what the test bed took
            # from the two cores the reader runs on.
            proxy.reset_counts()
            c0 = _cpu()
            colds = [measure(fn, *fargs, False) for _ in range(args.repeat)]
            c1 = _cpu()
            snap = proxy.snapshot()
            proxy.reset_counts()
            warms = [measure(fn, *fargs, True)["result"] for _ in range(args.repeat)]
            c2 = _cpu()
            both = proxy.snapshot()
            harness_cpu[name] = {"cold_run": (c1 - c0) / args.repeat, "cold_and_warm_run": (c2 - c1) / args.repeat}
            cw = sorted(r["wall"] for r in colds)
            ww = sorted(r["warm"] for r in warms)
            r = {
                "wall": cw[len(cw) // 2],
                "cold_walls": cw,
                "warm": ww[len(ww) // 2],
                "warm_walls": ww,
                "peak_rss": max(c["peak_rss"] for c in colds),
                "result": colds[0]["result"],
            }
            traffic[name] = {
                "cold_run": {
                    "requests": snap["total_requests"] / args.repeat,
                    "bytes": snap["total_bytes"] / args.repeat,
                    "by_method": {k: v / args.repeat for k, v in snap["requests"].items()},
                },
                "warm_run": {
                    "requests": both["total_requests"] / args.repeat - snap["total_requests"] / args.repeat,
                    "bytes": both["total_bytes"] / args.repeat - snap["total_bytes"] / args.repeat,
                },
            }
            rows.append((name, r))
            t = traffic[name]
            print(
                f"{name}: cold {r['wall']:.2f} s, warm {r['warm']:.2f} s (medians of {args.repeat}); per cold run "
                f"{t['cold_run']['requests']:.0f} requests, {t['cold_run']['bytes'] / 2**20:.1f} MiB; per warm run "
                f"{t['warm_run']['requests']:.0f} requests, {t['warm_run']['bytes'] / 2**20:.1f} MiB",
                flush=True,
            )

        timed("local", run_dask_loom, path, None)
        timed(f"remote (S3 + {args.latency * 1000:.0f} ms/request)", run_dask_loom, url, opts)
        if not args.skip_h5py:
            timed(
                f"h5py-fsspec (S3 + {args.latency * 1000:.0f} ms/request)",
                run_h5py_fsspec,
                url,
                opts,
                args.band,
            )
    finally:
        proxy.close()
        server.stop()

    print(table(rows, rows[0][0]))
    print(table([(n, {**r, "wall": r["warm"]}) for n, r in rows], rows[0][0]).replace("wall s", "warm s"))
    sums = [r["result"]["checksum"] for _, r in rows]
    assert all(np.allclose(s, sums[0], rtol=1e-5) for s in sums), sums
    ratios = {}
    for kind in ("wall", "warm"):
        label = "cold" if kind == "wall" else "warm"
        walls = {name: r[kind] for name, r in rows}
        ratios[f"remote / local ({label})"] = walls[rows[1][0]] / walls[rows[0][0]]
        if len(rows) > 2:
            ratios[f"h5py-fsspec / remote ({label})"] = walls[rows[2][0]] / walls[rows[1][0]]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    stored = os.path.getsize(path)
    remote_req = traffic[rows[1][0]]["cold_run"]["requests"]
    print(
        f"remote: {remote_req:.0f} requests per cold run (open, chunk index, map) for a {stored / 2**20:.1f} MiB file"
    )
    base = harness_cpu[rows[0][0]]
    testbed = {
        n: {k: max(0.0, v - base[k]) for k, v in c.items()} for n, c in harness_cpu.items() if n != rows[0][0]
    }
    for n, c in testbed.items():
        print(f"test bed (S3 server + proxy) CPU per run, {n}: cold {c['cold_run']:.2f} s", flush=True)
    name = "cloud_loom" if (args.rows, args.cols) == (4096, 16384) else f"cloud_loom_{args.rows}x{args.cols}"
    out = save(
        name,
        {
            "file": {"path": relative(path), "shape": [args.rows, args.cols], "bytes": stored},
            "latency_s": args.latency,
            "repeat": args.repeat,
            "rows": dict(rows),
            "traffic": traffic,
            "testbed_cpu_s_per_run": testbed,
            "ratios": ratios,
            "targets": {"remote / local": "<= 1.5", "h5py-fsspec / remote": ">= 10"},
            "notes": "cold: a fresh process, connect to result (the object-store client's imports and sessions included for the "
            "remote runs; importing dask_loom excluded on both sides); warm: a second connect+map in that process (the "
            "connection was closed: it opens the file again and reuses the chunk index the first run kept, but no chunk "
            "bytes, so its tasks fetch their own; modules and object-store sessions warm)",
        },
    )
    print("results:", relative(out))


if __name__ == "__main__":
    main()
