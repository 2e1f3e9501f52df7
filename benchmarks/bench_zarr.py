"""Zarr benchmarks: latency hiding, to_dask vs dask.array.from_zarr, loom map on .loom vs .loom.zarr (disk, S3).

(a) mean over a Zarr array of 256 chunks behind ``SlowStore(base_delay=0.05)``
    through ``ZarrArray.to_dask()``, against the ideal ``chunks x delay /
    concurrency`` at concurrency 32 (target: within 1.5x).  Timed twice in
    the same process: cold (first use of zarr's event loop and codecs) and
    warm; the wall time reported is the warm one, both are saved.  Two ways to get
    32 requests in flight: the default block plan (one block of many chunks,
    zarr's event loop fetching 32 at once) and one block per chunk on 32
    dask threads.
(b) ``ZarrArray.to_dask().mean()`` vs ``dask.array.from_zarr(...).mean()`` on a
    local store (target: never more than 5 % slower).
(c) ``ds.map([mean, std])`` on the loom map benchmark's file as ``.loom``, as
    ``.loom.zarr`` (blosc-zstd) on disk — with convert's default 512 x 512
    chunks and with the .loom's 64 x 64 — and as ``.loom.zarr`` on a local S3
    server (moto) (target: .loom.zarr on disk at least as fast as .loom).

Every measurement runs in a fresh process (wall time, peak RSS of the process tree).

    python benchmarks/bench_zarr.py            # full sizes
    python benchmarks/bench_zarr.py --small    # reduced sizes, to check the script
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _harness import CACHE, measure, save, table

from dask_loom._config import get_config

DELAY = 0.05
CONCURRENCY = 32
N_CHUNKS = 256


# -- (a) latency hiding -------------------------------------------------------------------------


def _slow_array(chunk: int) -> tuple[object, np.ndarray]:
    import zarr

    from dask_loom.stores import MemoryStore, SlowStore

    inner = MemoryStore()
    side = 16 * chunk  # 16 x 16 = 256 chunks
    ref = np.random.default_rng(0).random((side, side))
    zarr.create_array(inner, name="a", shape=ref.shape, chunks=(chunk, chunk), dtype="f8")[:] = ref
    return SlowStore(inner, base_delay=DELAY), ref


def run_slow_default_plan(chunk: int) -> dict:
    import zarr

    import dask_loom

    store, ref = _slow_array(chunk)
    with zarr.config.set({"async.concurrency": CONCURRENCY}):
        t0 = time.perf_counter()
        a = dask_loom.open_zarr(store, "a")
        x = a.to_dask()
        got = float(x.mean().compute(scheduler="threads"))
        cold = time.perf_counter() - t0
        # Warm: the process already runs zarr's event loop and dask's pool.  Opening the
        # array is one request (its metadata) before any chunk can be asked for: timed apart.
        t0 = time.perf_counter()
        x = dask_loom.open_zarr(store, "a").to_dask()
        t1 = time.perf_counter()
        got = float(x.mean().compute(scheduler="threads"))
        wall = time.perf_counter() - t0
    assert abs(got - ref.mean()) < 1e-12
    return {
        "wall": wall,
        "open": t1 - t0,
        "read": wall - (t1 - t0),
        "cold": cold,
        "blocks": int(np.prod(x.numblocks)),
    }


def run_slow_block_per_chunk(chunk: int) -> dict:
    import zarr

    import dask_loom

    store, ref = _slow_array(chunk)
    with zarr.config.set({"async.concurrency": CONCURRENCY}):
        walls = []
        for _ in range(2):  # cold, then warm
            t0 = time.perf_counter()
            x = dask_loom.open_zarr(store, "a").to_dask(chunks="chunks")
            got = float(x.mean().compute(scheduler="threads", num_workers=CONCURRENCY))
            walls.append(time.perf_counter() - t0)
    assert abs(got - ref.mean()) < 1e-12
    return {"wall": walls[1], "cold": walls[0], "blocks": int(np.prod(x.numblocks))}


def run_slow_from_zarr(chunk: int) -> dict:
    import dask.array as da
    import zarr

    store, ref = _slow_array(chunk)
    with zarr.config.set({"async.concurrency": CONCURRENCY}):
        walls = []
        for _ in range(2):  # cold, then warm
            t0 = time.perf_counter()
            x = da.from_zarr(zarr.open_array(store, path="a", mode="r"))
            got = float(x.mean().compute(scheduler="threads"))
            walls.append(time.perf_counter() - t0)
    assert abs(got - ref.mean()) < 1e-12
    return {"wall": walls[1], "cold": walls[0], "blocks": int(np.prod(x.numblocks))}


# -- (b) to_dask vs from_zarr ---------------------------------------------------------------------


def local_array(small: bool) -> str:
    import zarr

    shape, chunks = ((2048, 4096), (256, 256)) if small else ((8192, 8192), (512, 512))
    path = os.path.join(CACHE, f"zarr_{shape[0]}x{shape[1]}_{chunks[0]}.zarr")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        tmp = path + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        rng = np.random.default_rng(1)
        z = zarr.create_array(tmp, shape=shape, chunks=chunks, dtype="f4")
        for i in range(0, shape[0], chunks[0] * 4):
            z[i : i + chunks[0] * 4] = rng.gamma(
                2.0, 1.0, (min(chunks[0] * 4, shape[0] - i), shape[1])
            ).astype("f4")
        os.replace(tmp, path)
    return path


def run_to_dask(path: str) -> dict:
    import dask_loom

    t0 = time.perf_counter()
    x = dask_loom.open_zarr(path, mode="r").to_dask()
    m = float(x.mean(dtype="f8").compute(scheduler="threads"))
    return {"wall": time.perf_counter() - t0, "mean": m, "blocks": int(np.prod(x.numblocks))}


def run_to_dask_per_chunk(path: str) -> dict:
    import dask_loom

    t0 = time.perf_counter()
    x = dask_loom.open_zarr(path, mode="r").to_dask(chunks="chunks")
    m = float(x.mean(dtype="f8").compute(scheduler="threads"))
    return {"wall": time.perf_counter() - t0, "mean": m, "blocks": int(np.prod(x.numblocks))}


def run_from_zarr(path: str) -> dict:
    import dask.array as da

    t0 = time.perf_counter()
    x = da.from_zarr(path)
    m = float(x.mean(dtype="f8").compute(scheduler="threads"))
    return {"wall": time.perf_counter() - t0, "mean": m, "blocks": int(np.prod(x.numblocks))}


# -- (c) loom map ---------------------------------------------------------------------------------


def loom_files(small: bool) -> tuple[str, str, str]:
    """The loom map benchmark's file, and its .loom.zarr twins: default chunks (512 x 512) and 64 x 64."""
    from bench_loom_map import bench_file

    import dask_loom

    loom = bench_file(small)
    out = []
    for suffix, chunks in ((".loom.zarr", None), (".c64.loom.zarr", (64, 64))):
        zpath = loom[: -len(".loom")] + suffix
        if not os.path.exists(zpath):
            t0 = time.perf_counter()
            dask_loom.convert(loom, zpath, chunks=chunks, scheduler="threads")
            print(f"converted {loom} -> {zpath} in {time.perf_counter() - t0:.0f} s", flush=True)
        out.append(zpath)
    return loom, out[0], out[1]


def run_map(path: str, storage_options: dict | None = None) -> dict:
    import dask_loom

    t0 = time.perf_counter()
    with dask_loom.connect(path, "r", storage_options=storage_options) as ds:
        out = ds.map([np.mean, np.std], axis=0, scheduler="threads")
    return {"wall": time.perf_counter() - t0, "checksum": [float(np.nansum(x)) for x in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    ap.add_argument(
        "--no-s3", action="store_true", help="in (c), skip the .loom.zarr on the local S3 server (slow: moto)"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"rows": {}, "ratios": {}}

    if "a" not in skip:
        chunk = 64 if args.small else 128
        ideal = N_CHUNKS * DELAY / CONCURRENCY
        rows = [
            (
                "(a) to_dask() default plan, zarr conc. 32",
                measure(run_slow_default_plan, chunk, repeat=args.repeat),
            ),
            (
                "(a) to_dask(chunks='chunks'), 32 threads",
                measure(run_slow_block_per_chunk, chunk, repeat=args.repeat),
            ),
            (
                "(a) dask.array.from_zarr, default threads",
                measure(run_slow_from_zarr, chunk, repeat=args.repeat),
            ),
        ]
        print(table(rows, rows[0][0]))
        runs = rows[0][1]["results"]
        res = {k: float(np.median([r[k] for r in runs])) for k in ("wall", "open", "read")}
        # The metadata request comes first and alone: the least a cold open-and-read can take.
        results["ideal_a_with_open"] = ideal + DELAY
        results["ratios"]["(a) to_dask() default plan: read after open / ideal"] = res["read"] / ideal
        results["ratios"]["(a) to_dask() default plan: open + read / (ideal + one request)"] = res["wall"] / (
            ideal + DELAY
        )
        results["read_ahead"] = get_config("read-ahead")
        print(
            f"default plan: open {res['open']:.3f} s, read {res['read']:.3f} s = {res['read'] / ideal:.2f}x the ideal {ideal:.3f} s; "
            f"open + read = {res['wall'] / (ideal + DELAY):.2f}x (ideal + one request)"
        )
        for name, r in rows:
            cold = r["result"]["cold"]
            results["ratios"][f"{name} / ideal (warm)"] = r["wall"] / ideal
            results["ratios"][f"{name} / ideal (cold process)"] = cold / ideal
            print(
                f"{name}: warm {r['wall']:.3f} s = {r['wall'] / ideal:.2f}x, cold {cold:.3f} s = {cold / ideal:.2f}x the ideal {ideal:.3f} s"
            )
        results["rows"].update(dict(rows))
        results["ideal_a"] = ideal

    if "b" not in skip:
        path = local_array(args.small)
        rows = [
            ("(b) dask.array.from_zarr", measure(run_from_zarr, path, repeat=args.repeat)),
            ("(b) ZarrArray.to_dask()", measure(run_to_dask, path, repeat=args.repeat)),
            (
                "(b) ZarrArray.to_dask(chunks='chunks')",
                measure(run_to_dask_per_chunk, path, repeat=args.repeat),
            ),
        ]
        print(table(rows, rows[0][0]))
        for name, r in rows[1:]:
            ratio = r["wall"] / rows[0][1]["wall"]
            results["ratios"][f"{name} / from_zarr"] = ratio
            print(f"{name} / from_zarr wall: {ratio:.3f} (target <= 1.05)")
        results["rows"].update(dict(rows))

    if "c" not in skip:
        loom, zpath, z64 = loom_files(args.small)
        rows = [
            ("(c) map .loom (HDF5, gzip 2, 64x64)", measure(run_map, loom, repeat=args.repeat)),
            ("(c) map .loom.zarr disk (blosc-zstd, 512x512)", measure(run_map, zpath, repeat=args.repeat)),
            ("(c) map .loom.zarr disk (blosc-zstd, 64x64)", measure(run_map, z64, repeat=args.repeat)),
        ]
        if not args.no_s3:
            from _s3server import S3Server

            server = S3Server()
            info = server.start()
            try:
                import s3fs

                url = f"s3://{info['bucket']}/bench/{os.path.basename(zpath)}"
                t0 = time.perf_counter()
                s3fs.S3FileSystem(**info["storage_options"]).put(zpath, url[len("s3://") :], recursive=True)
                print(f"uploaded {zpath} to {url} in {time.perf_counter() - t0:.1f} s", flush=True)
                rows.append(
                    (
                        "(c) map .loom.zarr on local S3 (moto)",
                        measure(run_map, url, info["storage_options"], repeat=args.repeat),
                    )
                )
            finally:
                server.stop()
        print(table(rows, rows[0][0]))
        sums = [r["result"]["checksum"] for _, r in rows]
        assert all(np.allclose(s, sums[0], rtol=1e-5) for s in sums), sums
        for name, r in rows[1:]:
            results["ratios"][f"{name}: speedup over .loom"] = rows[0][1]["wall"] / r["wall"]
        results["rows"].update(dict(rows))
        results["files"] = {"loom": loom, "zarr": zpath, "zarr_64": z64}

    for k, v in results["ratios"].items():
        print(f"{k}: {v:.2f}")
    name = "zarr" + ("_small" if args.small else "")
    if skip or args.no_s3:
        # A partial run updates the parts it ran and keeps the others' last results.
        import json

        from _harness import RESULTS

        old = os.path.join(RESULTS, f"{name}.json")
        if os.path.exists(old):
            with open(old) as fh:
                prev = json.load(fh)
            for key in ("rows", "ratios"):
                results[key] = {**prev.get(key, {}), **results[key]}
            results = {
                **{k: v for k, v in prev.items() if k not in ("benchmark", "machine", "when")},
                **results,
            }
    print("results:", save(name, results))


if __name__ == "__main__":
    main()
