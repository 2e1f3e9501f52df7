"""loom ``map([mean, std])``: loompy 3.0.8 vs dask_loom (threads, 2-process LocalCluster) vs the raw floor.

The file: 20,000 genes x 50,000 cells float32 counts (~90% zeros) written by
``loompy.create`` with its defaults (64x64 chunks, gzip 2), generated once and
cached in benchmarks/cache/.  Every run is a fresh process; wall time is the
operation only (file opening included, cluster start-up reported apart).

    python benchmarks/bench_loom_map.py            # the full 4 GB layer
    python benchmarks/bench_loom_map.py --small    # 4,000 x 10,000, to check the script
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, measure, save, table


def bench_file(small: bool) -> str:
    n, m = (4000, 10000) if small else (20000, 50000)
    path = os.path.join(CACHE, f"loompy_{n}x{m}.loom")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        from dask_loom._synthetic import write_synthetic_loom

        t0 = time.perf_counter()
        tmp = path + ".partial"
        write_synthetic_loom(tmp, n, m, writer="loompy")
        os.replace(tmp, path)
        print(f"generated {path} with loompy in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def run_loompy(path: str, axis: int) -> dict:
    import loompy

    t0 = time.perf_counter()
    with loompy.connect(path, "r") as ds:
        out = ds.map([np.mean, np.std], axis=axis)
    return {"wall": time.perf_counter() - t0, "checksum": [float(np.nansum(x)) for x in out]}


def run_dask_loom(path: str, axis: int, scheduler: str) -> dict:
    import dask_loom

    client = None
    startup = 0.0
    if scheduler == "cluster":
        from distributed import Client, LocalCluster

        t = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
        # A long-lived cluster has its workers' imports done; the file's chunk
        # index is still built inside the timed run.
        client.run(lambda: __import__("dask_loom.hdf5"))
        startup = time.perf_counter() - t
    t0 = time.perf_counter()
    with dask_loom.connect(path, "r") as ds:
        kw = {"client": client} if client is not None else ({} if scheduler == "default" else {"scheduler": scheduler})
        out = ds.map([np.mean, np.std], axis=axis, **kw)
    wall = time.perf_counter() - t0
    if client is not None:
        client.close()
        cluster.close()
    return {"wall": wall, "startup": startup, "checksum": [float(np.nansum(x)) for x in out]}


def run_floor(path: str, workers: int, axis: int | None = None) -> dict:
    """Read and inflate every chunk once, `workers` threads; with *axis*, also reduce.

    Chunk offsets come from the same cached index; bytes by pread; libdeflate.
    Without *axis* nothing else is done (no assembly, no reduction); with it,
    each block's chunks are inflated into one buffer and summed, with their
    squares, along *axis* (the issue's floor: read + inflate + reduce), the
    partial sums combined at the end.
    """
    from concurrent.futures import ThreadPoolExecutor

    import deflate

    from dask_loom.blocks import block_regions, plan_blocks
    from dask_loom.hdf5 import dataset_layout, read_ranges
    from dask_loom.hdf5._source import _chunk_offsets
    from dask_loom.storage import FileSpec

    t0 = time.perf_counter()
    spec = FileSpec.from_path(path)
    lay = dataset_layout(spec, "matrix")
    nbytes = int(np.prod(lay.chunks)) * np.dtype(lay.dtype).itemsize
    plan = plan_blocks(lay.shape, lay.chunks, 4)

    def one(region: tuple) -> int:
        c_lo = [r.start // c for r, c in zip(region, lay.chunks)]
        c_hi = [-(-r.stop // c) for r, c in zip(region, lay.chunks)]
        coords = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(c_lo, c_hi)], indexing="ij"), axis=-1).reshape(-1, 2)
        offsets, sizes, _ = _chunk_offsets(spec, lay, coords)
        raws = read_ranges(spec, offsets.tolist(), sizes.tolist())
        if axis is None:
            return sum(len(deflate.zlib_decompress(r, nbytes)) for r in raws)
        grid = [b - a for a, b in zip(c_lo, c_hi)]
        flat = np.concatenate([np.frombuffer(deflate.zlib_decompress(r, nbytes), dtype=lay.dtype) for r in raws])
        blk = flat.reshape(*grid, *lay.chunks)  # (gi, gj, ci, cj)
        keep = "ac" if axis == 0 else "bd"  # loompy's axis=0 is one value per row
        s = np.einsum(f"abcd->{keep}", blk, dtype=np.float64)
        ss = np.einsum(f"abcd,abcd->{keep}", blk, blk, dtype=np.float64)
        return (tuple(r.start for r in region), s, ss, len(raws) * nbytes)

    with ThreadPoolExecutor(workers) as ex:
        parts = list(ex.map(one, [r for _, r in block_regions(plan)]))
    if axis is None:
        return {"wall": time.perf_counter() - t0, "bytes": sum(parts)}
    n_out = lay.shape[axis]
    s, ss = np.zeros(n_out), np.zeros(n_out)
    for start, ps, pss, _ in parts:
        o = start[axis]
        k = min(ps.size, n_out - o)  # edge chunks are stored whole
        s[o : o + k] += ps.ravel()[:k]
        ss[o : o + k] += pss.ravel()[:k]
    mean = s / lay.shape[1 - axis]
    return {"wall": time.perf_counter() - t0, "bytes": sum(p[3] for p in parts), "checksum": [float(mean.sum())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-loompy", action="store_true")
    args = ap.parse_args()
    path = bench_file(args.small)
    rows = []
    rows.append(("floor: read+inflate, 2 threads", measure(run_floor, path, 2, repeat=args.repeat)))
    rows.append(("floor: read+inflate, 1 thread", measure(run_floor, path, 1, repeat=args.repeat)))
    rows.append(("floor: read+inflate+reduce axis=0, 2 threads", measure(run_floor, path, 2, 0, repeat=args.repeat)))
    rows.append(("floor: read+inflate+reduce axis=1, 2 threads", measure(run_floor, path, 2, 1, repeat=args.repeat)))
    for axis in (0, 1):
        if not args.skip_loompy:
            rows.append((f"loompy map axis={axis}", measure(run_loompy, path, axis, repeat=args.repeat)))
        rows.append((f"dask_loom map axis={axis} threads", measure(run_dask_loom, path, axis, "threads", repeat=args.repeat)))
        rows.append((f"dask_loom map axis={axis} LocalCluster 2x1", measure(run_dask_loom, path, axis, "cluster", repeat=args.repeat)))
        rows.append((f"dask_loom map axis={axis} default (auto)", measure(run_dask_loom, path, axis, "default", repeat=args.repeat)))
    floor = rows[0][1]["wall"]
    print(table(rows, rows[0][0]))
    ratios = {}
    for axis in (0, 1):
        d = dict(rows)
        best = min(d[f"dask_loom map axis={axis} threads"]["wall"], d[f"dask_loom map axis={axis} LocalCluster 2x1"]["wall"])
        ratios[f"axis{axis}_best_vs_floor"] = best / floor
        ratios[f"axis{axis}_cluster_vs_floor"] = d[f"dask_loom map axis={axis} LocalCluster 2x1"]["wall"] / floor
        # The floor: read + inflate + reduce along the same axis.
        ratios[f"axis{axis}_best_vs_reduce_floor"] = best / d[f"floor: read+inflate+reduce axis={axis}, 2 threads"]["wall"]
        if not args.skip_loompy:
            ratios[f"axis{axis}_speedup_vs_loompy_threads"] = d[f"loompy map axis={axis}"]["wall"] / d[f"dask_loom map axis={axis} threads"]["wall"]
            ratios[f"axis{axis}_speedup_vs_loompy_cluster"] = d[f"loompy map axis={axis}"]["wall"] / d[f"dask_loom map axis={axis} LocalCluster 2x1"]["wall"]
            ratios[f"axis{axis}_speedup_vs_loompy_default"] = d[f"loompy map axis={axis}"]["wall"] / d[f"dask_loom map axis={axis} default (auto)"]["wall"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print("results:", save("loom_map" + ("_small" if args.small else ""), {"file": path, "rows": dict(rows), "ratios": ratios}))


if __name__ == "__main__":
    main()
