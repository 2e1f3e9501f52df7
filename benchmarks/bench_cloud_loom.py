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


def run_dask_loom(url: str, storage_options: dict | None) -> dict:
    import dask_loom

    t0 = time.perf_counter()
    with dask_loom.connect(url, "r", storage_options=storage_options, validate=False) as ds:
        out = ds.map([np.mean, np.std], axis=0)
    return {"wall": time.perf_counter() - t0, "checksum": [float(np.nansum(x)) for x in out]}


def run_h5py_fsspec(url: str, storage_options: dict, band: int) -> dict:
    import fsspec
    import h5py

    t0 = time.perf_counter()
    fs = fsspec.filesystem("s3", **storage_options)
    means, stds = [], []
    with fs.open(url, "rb") as fh, h5py.File(fh, "r") as f:
        m = f["matrix"]
        for i in range(0, m.shape[0], band):
            block = m[i : i + band].astype(np.float64)
            means.append(block.mean(axis=1))
            stds.append(block.std(axis=1))
    out = [np.concatenate(means), np.concatenate(stds)]
    return {"wall": time.perf_counter() - t0, "checksum": [float(np.nansum(x)) for x in out]}


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

        def timed(name: str, fn: Any, *fargs: Any) -> None:
            proxy.reset_counts()
            r = measure(fn, *fargs, repeat=args.repeat)
            snap = proxy.snapshot()
            per_run = {
                k: v / args.repeat
                for k, v in (("requests", snap["total_requests"]), ("bytes", snap["total_bytes"]))
            }
            traffic[name] = {
                **snap,
                "requests_per_run": per_run["requests"],
                "bytes_per_run": per_run["bytes"],
            }
            rows.append((name, r))
            print(
                f"{name}: {r['wall']:.2f} s (median of {args.repeat}); {per_run['requests']:.0f} requests, "
                f"{per_run['bytes'] / 2**20:.1f} MiB per run",
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
    sums = [r["result"]["checksum"] for _, r in rows]
    assert all(np.allclose(s, sums[0], rtol=1e-5) for s in sums), sums
    walls = {name: r["wall"] for name, r in rows}
    local, remote = walls[rows[0][0]], walls[rows[1][0]]
    ratios = {"remote / local": remote / local}
    if len(rows) > 2:
        ratios["h5py-fsspec / remote"] = walls[rows[2][0]] / remote
    stored = os.path.getsize(path)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    remote_req = traffic[rows[1][0]]["requests_per_run"]
    print(
        f"remote: {remote_req:.0f} requests per run for a {stored / 2**20:.1f} MiB file "
        f"({stored / 2**22 / max(remote_req, 1):.2f} x 4 MiB per request)"
    )
    name = "cloud_loom" if (args.rows, args.cols) == (4096, 16384) else f"cloud_loom_{args.rows}x{args.cols}"
    out = save(
        name,
        {
            "file": {"path": relative(path), "shape": [args.rows, args.cols], "bytes": stored},
            "latency_s": args.latency,
            "repeat": args.repeat,
            "rows": dict(rows),
            "traffic": traffic,
            "ratios": ratios,
            "targets": {"remote / local": "<= 1.5", "h5py-fsspec / remote": ">= 10"},
        },
    )
    print("results:", relative(out))


if __name__ == "__main__":
    main()
