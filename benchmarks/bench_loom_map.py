"""loom ``map([mean, std])`` and ``dask-loom stats``: loompy 3.0.8 vs dask_loom vs the raw floor.

The file: 20,000 genes x 50,000 cells float32 counts (~90% zeros) written by
``loompy.create`` with its defaults (64x64 chunks, gzip 2), generated once and
cached in benchmarks/cache/.  Each figure is timed as users meet it: cold is a
fresh process (interpreter, imports, connect, map, close, exit; a cluster's
start when one is asked for), warm the second map in one process.  Peak RSS is
of the whole process tree.  The floors are timed inside a process after its
imports (they are floors, not user figures).

    python benchmarks/bench_loom_map.py            # the full 4 GB layer
    python benchmarks/bench_loom_map.py --small    # 4,000 x 10,000, to check the script
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, cold_and_warm, measure, relative, run_process, save, table


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


LOOMPY_SETUP = "import numpy as np\nimport loompy"
DASK_LOOM_SETUP = "import numpy as np\nimport dask_loom"


def map_op(lib: str, path: str, axis: int, kwargs: str = "") -> str:
    """One ``map([mean, std])`` as a script statement: connect, map, close."""
    return f"with {lib}.connect({path!r}, 'r') as ds:\n    out = ds.map([np.mean, np.std], axis={axis}{kwargs})\n"


CHECKSUM = "[float(np.nansum(x)) for x in out]"


def run_map(path: str, lib: str, axis: int, *, scheduler: str | None = None, repeat: int = 1) -> dict:
    """Cold (a fresh process: import, connect, map, close, exit) and warm (a second map in one process)."""
    setup = LOOMPY_SETUP if lib == "loompy" else DASK_LOOM_SETUP
    kw = f", scheduler={scheduler!r}" if scheduler else ""
    return cold_and_warm(setup, map_op(lib, path, axis, kw), result=CHECKSUM, repeat=repeat)


def run_stats_cli(path: str, *, repeat: int = 1) -> dict:
    """``dask-loom stats FILE -o OUT`` end to end, as a user runs it."""
    out = os.path.join(CACHE, "stats.tsv")
    code = f"import sys\nfrom dask_loom.cli import main\nsys.exit(main(['stats', {path!r}, '-o', {out!r}]))"
    runs = sorted((run_process(code) for _ in range(repeat)), key=lambda r: r["wall"])
    return runs[len(runs) // 2]


LOOMPY_STATS = """
import numpy as np
import loompy
funcs = [np.mean, np.std, np.min, np.max, np.count_nonzero]
with loompy.connect({path!r}, "r") as ds:
    vals = ds.map(funcs, axis=0)
    names = ds.ra["Gene"]
with open({out!r}, "w") as fh:
    fh.write("name\\tmean\\tstd\\tmin\\tmax\\tcount_nonzero\\n")
    for row in zip(names, *vals):
        fh.write("\\t".join([str(row[0])] + [f"{{v:.6g}}" for v in row[1:]]) + "\\n")
"""


def run_stats_loompy(path: str, *, repeat: int = 1) -> dict:
    """A loompy script writing the same table as ``dask-loom stats``."""
    code = LOOMPY_STATS.format(path=path, out=os.path.join(CACHE, "stats_loompy.tsv"))
    runs = sorted((run_process(code) for _ in range(repeat)), key=lambda r: r["wall"])
    return runs[len(runs) // 2]


def run_floor(path: str, workers: int, axis: int | None = None) -> dict:
    """Read and inflate every chunk once, `workers` threads; with *axis*, also reduce.

    Chunk offsets come from the same cached index; bytes by pread; libdeflate
    with the GIL released, each chunk into its slot of a per-thread buffer.
    Without *axis* nothing else is done (no assembly, no reduction); with it,
    each block's chunks are summed, with their squares, along *axis* (the
    issue's floor: read + inflate + reduce), the partial sums combined at the
    end.  Timed inside the process after imports and after the chunk index is
    built (its time is reported apart as ``index_s``): a floor to hold the warm
    figures against, not a user figure.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from dask_loom.blocks import block_regions, plan_blocks
    from dask_loom.hdf5 import dataset_layout, read_ranges
    from dask_loom.hdf5._inflate import inflate_into
    from dask_loom.hdf5._source import _chunk_offsets
    from dask_loom.storage import FileSpec

    t_index = time.perf_counter()
    spec = FileSpec.from_path(path)
    lay = dataset_layout(spec, "matrix")
    nbytes = int(np.prod(lay.chunks)) * np.dtype(lay.dtype).itemsize
    plan = plan_blocks(lay.shape, lay.chunks, 4)
    local = threading.local()
    _chunk_offsets(spec, lay, np.zeros((1, 2), dtype=np.int64))  # builds the cached chunk index
    t0 = time.perf_counter()
    index_s = t0 - t_index

    def one(region: tuple) -> Any:
        c_lo = [r.start // c for r, c in zip(region, lay.chunks)]
        c_hi = [-(-r.stop // c) for r, c in zip(region, lay.chunks)]
        coords = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(c_lo, c_hi)], indexing="ij"), axis=-1).reshape(-1, 2)
        offsets, sizes, _ = _chunk_offsets(spec, lay, coords)
        raws = read_ranges(spec, offsets.tolist(), sizes.tolist())
        buf = getattr(local, "buf", None)
        if buf is None or buf.nbytes < len(raws) * nbytes:
            buf = local.buf = np.empty(len(raws) * nbytes, np.uint8)
        inflate_into(raws, buf, nbytes)
        if axis is None:
            return len(raws) * nbytes
        grid = [b - a for a, b in zip(c_lo, c_hi)]
        blk = buf[: len(raws) * nbytes].view(lay.dtype).reshape(*grid, *lay.chunks)  # (gi, gj, ci, cj)
        keep = "ac" if axis == 0 else "bd"  # loompy's axis=0 is one value per row
        s = np.einsum(f"abcd->{keep}", blk, dtype=np.float64)
        ss = np.einsum(f"abcd,abcd->{keep}", blk, blk, dtype=np.float64)
        return (tuple(r.start for r in region), s, ss, len(raws) * nbytes)

    with ThreadPoolExecutor(workers) as ex:
        parts = list(ex.map(one, [r for _, r in block_regions(plan)]))
    if axis is None:
        return {"wall": time.perf_counter() - t0, "bytes": sum(parts), "index_s": index_s}
    n_out = lay.shape[axis]
    s, ss = np.zeros(n_out), np.zeros(n_out)
    for start, ps, pss, _ in parts:
        o = start[axis]
        k = min(ps.size, n_out - o)  # edge chunks are stored whole
        s[o : o + k] += ps.ravel()[:k]
        ss[o : o + k] += pss.ravel()[:k]
    mean = s / lay.shape[1 - axis]
    return {"wall": time.perf_counter() - t0, "bytes": sum(p[3] for p in parts), "checksum": [float(mean.sum())], "index_s": index_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-loompy", action="store_true")
    ap.add_argument("--no-cluster", action="store_true", help="skip the explicit LocalCluster runs")
    args = ap.parse_args()
    path = bench_file(args.small)
    r = args.repeat
    rows = []
    rows.append(("floor: read+inflate, 2 threads", measure(run_floor, path, 2, repeat=r)))
    rows.append(("floor: read+inflate, 1 thread", measure(run_floor, path, 1, repeat=r)))
    for axis in (0, 1):
        rows.append((f"floor: read+inflate+reduce axis={axis}, 2 threads", measure(run_floor, path, 2, axis, repeat=r)))
    for axis in (0, 1):
        if not args.skip_loompy:
            rows.append((f"loompy map axis={axis}", run_map(path, "loompy", axis, repeat=r)))
        rows.append((f"dask_loom map axis={axis} default", run_map(path, "dask_loom", axis, repeat=r)))
        if not args.no_cluster:
            rows.append((f"dask_loom map axis={axis} LocalCluster 2x1", run_map(path, "dask_loom", axis, scheduler="local", repeat=r)))
    rows.append(("dask-loom stats (CLI, end to end)", run_stats_cli(path, repeat=r)))
    if not args.skip_loompy:
        rows.append(("loompy script, same table", run_stats_loompy(path, repeat=r)))
    d = dict(rows)
    print(table(rows, rows[0][0]))
    ratios = {}
    floor = d["floor: read+inflate, 2 threads"]["wall"]
    for axis in (0, 1):
        ours = d[f"dask_loom map axis={axis} default"]
        # The floors are timed after imports; the map's warm figure is the like-for-like one.
        ratios[f"axis{axis}_warm_vs_floor"] = ours["warm"] / floor
        ratios[f"axis{axis}_warm_vs_reduce_floor"] = ours["warm"] / d[f"floor: read+inflate+reduce axis={axis}, 2 threads"]["wall"]
        ratios[f"axis{axis}_cold_vs_floor"] = ours["wall"] / floor
        if not args.skip_loompy:
            lp = d[f"loompy map axis={axis}"]
            ratios[f"axis{axis}_speedup_cold"] = lp["wall"] / ours["wall"]
            ratios[f"axis{axis}_speedup_warm"] = lp["warm"] / ours["warm"]
            if not args.no_cluster:
                ratios[f"axis{axis}_speedup_cold_cluster"] = lp["wall"] / d[f"dask_loom map axis={axis} LocalCluster 2x1"]["wall"]
    if not args.skip_loompy:
        ratios["stats_cli_speedup"] = d["loompy script, same table"]["wall"] / d["dask-loom stats (CLI, end to end)"]["wall"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    info = {"name": os.path.basename(path), "path": relative(path), "shape": [4000, 10000] if args.small else [20000, 50000]}
    print("results:", save("loom_map" + ("_small" if args.small else ""), {"file": info, "rows": d, "ratios": ratios}))


if __name__ == "__main__":
    main()
