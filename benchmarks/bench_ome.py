"""OME-Arrow side by side: dask_loom vs reading the whole record + numpy slicing vs ome-arrow.

A synthetic 5-D uint16 image (default T=4, C=3, Z=32, 2048 x 2048: 3 GiB) is
written twice, streaming from a lazy dask array: as a typed chunk dataset
(one chunk per Parquet row group) and as a single-record OME-Parquet file.
Then, each in a fresh process (wall time and peak RSS of the process tree):

* ``write_dataset`` / ``write_record``: the streaming writers (target: peak RSS < 1 GiB);
* ``full_read``: the whole image through ``open_ome_arrow(...).to_numpy()``;
* ``roi_read``: a 512 x 512 x Z region of one (t, c) — only its chunks are read;
* ``numpy_full`` / ``numpy_roi``: the baseline — read the same single record
  whole, then slice with numpy;
* ``mean_dask``: per-channel mean through ``to_dask()`` (one block per stored
  chunk) on a 2-process LocalCluster, ``mean_dask_auto`` the same with
  ``chunks="auto"`` (64 MiB blocks of whole chunks), against ``numpy_mean``
  (whole record read, then numpy);
* ``ome_arrow_full`` / ``ome_arrow_roi``: ome-arrow 0.1.0's ``TensorView`` on the
  record, when installed and the image is small enough for it (it converts
  byte chunks through Python objects).

Targets: ``full_read / roi_read >= 20`` and ``write_* peak RSS < 1 GiB``.

Usage::

    python benchmarks/bench_ome.py --small          # 192 MiB, validates the script
    python benchmarks/bench_ome.py                  # 3 GiB
    python benchmarks/bench_ome.py --only write     # just the writers at full size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FULL = (4, 3, 32, 2048, 2048)
SMALL = (4, 3, 8, 1024, 1024)
ROI = 512


# --------------------------------------------------------------------------- harness


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _child(fn_name: str, args: tuple[Any, ...], conn: Any) -> None:
    try:
        fn = globals()[fn_name]
        out = fn(*args)
        conn.send(("ok", out))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def measure(fn_name: str, *args: Any, timeout: float = 1800) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh spawned process; its timed wall and the tree's peak RSS."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(fn_name, args, child))
    p.start()
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
    if not parent.poll(timeout):
        p.kill()
        stop.set()
        return {"error": f"timed out after {timeout} s"}
    status, out = parent.recv()
    stop.set()
    th.join()
    p.join()
    if status != "ok":
        return {"error": out.splitlines()[0], "traceback": out}
    out["peak_rss_mib"] = round(peak / 2**20, 1)
    return out


# --------------------------------------------------------------------------- workloads (run in children)


def synthetic(shape: tuple[int, ...]) -> Any:
    """A lazy, deterministic image: smooth structure plus noise, one (t, c) slab band per block."""
    import dask.array as da

    def block(block_info: Any = None) -> np.ndarray:
        loc = block_info[None]["array-location"]
        (t0, _), (c0, _), (za, zb), (ya, yb), (xa, xb) = loc
        y = np.arange(ya, yb, dtype=np.float32)[:, None]
        x = np.arange(xa, xb, dtype=np.float32)[None, :]
        plane = (np.sin(y / 37.0 + t0) * np.cos(x / 53.0 + c0) * 900 + 1200).astype(np.uint16)
        rng = np.random.default_rng(abs(hash(tuple(a for a, _ in loc))) % 2**32)
        out = rng.integers(0, 16, size=(1, 1, zb - za, yb - ya, xb - xa), dtype=np.uint16)  # compresses ~2x, like real data
        out += plane
        out += (np.arange(za, zb, dtype=np.uint16) * 7)[:, None, None]
        return out

    chunks = (1, 1, shape[2], min(512, shape[3]), shape[4])
    return da.map_blocks(block, dtype=np.uint16, chunks=da.core.normalize_chunks(chunks, shape))


def write_dataset(shape: tuple[int, ...], out: str) -> dict[str, Any]:
    import dask_loom

    t0 = time.perf_counter()
    info = dask_loom.write_ome_arrow_dataset(synthetic(shape), out, overwrite=True, scheduler="threads")
    return {"wall": time.perf_counter() - t0, "chunk_shape": info["chunk_shape"], "chunks": info["chunk_count"],
            "bytes_on_disk": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))}


def write_record(shape: tuple[int, ...], out: str) -> dict[str, Any]:
    import dask_loom

    t0 = time.perf_counter()
    # One record is one Parquet page (< 2 GiB): compress chunks, not pages, so 3 GiB fits.
    dask_loom.to_ome_parquet(synthetic(shape), out, scheduler="threads", chunk_compression="zstd", compression=None)
    return {"wall": time.perf_counter() - t0, "bytes_on_disk": os.path.getsize(out)}


def _roi(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    return (shape[4] // 2 - ROI // 2, shape[3] // 2 - ROI // 2, ROI, ROI)  # centred: chunk-aligned for 256 tiles


def full_read(path: str) -> dict[str, Any]:
    import dask_loom

    t0 = time.perf_counter()
    a = dask_loom.open_ome_arrow(path, layout="TCZYX").to_numpy()
    return {"wall": time.perf_counter() - t0, "checksum": int(a[:, :, ::7, ::97, ::89].astype(np.int64).sum())}


def roi_read(path: str, shape: tuple[int, ...]) -> dict[str, Any]:
    import dask_loom

    x, y, w, h = _roi(shape)
    t0 = time.perf_counter()
    v = dask_loom.open_ome_arrow(path, t=0, c=0, roi=(x, y, w, h), layout="ZYX")
    a = v.to_numpy()
    wall = time.perf_counter() - t0
    touched = len(v.image.index().touching(np.array([0]), np.array([0]), np.arange(shape[2]), (y, y + h), (x, x + w)))
    return {"wall": wall, "checksum": int(a.astype(np.int64).sum()), "chunks_touched": touched,
            "chunks_total": len(v.image.index())}


def numpy_full(record: str) -> dict[str, Any]:
    """Baseline: read the single record whole (pyarrow), assemble the numpy image."""
    import dask_loom

    t0 = time.perf_counter()
    a = dask_loom.open_ome_arrow(record, layout="TCZYX").to_numpy()
    return {"wall": time.perf_counter() - t0, "checksum": int(a[:, :, ::7, ::97, ::89].astype(np.int64).sum())}


def numpy_roi(record: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Baseline: read the same record whole, then slice the region with numpy."""
    import dask_loom

    x, y, w, h = _roi(shape)
    t0 = time.perf_counter()
    a = dask_loom.open_ome_arrow(record, layout="TCZYX").to_numpy()[0, 0, :, y : y + h, x : x + w].copy()
    return {"wall": time.perf_counter() - t0, "checksum": int(a.astype(np.int64).sum())}


def mean_dask(path: str, workers: int, chunks: Any = None) -> dict[str, Any]:
    import warnings

    from distributed import Client, LocalCluster

    import dask_loom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
    try:
        # A long-lived cluster has its workers warm: import the reader there first.
        client.run(lambda: __import__("dask_loom.ome"))
        t0 = time.perf_counter()
        d = dask_loom.open_ome_arrow(path, layout="CTZYX").to_dask(chunks=chunks)
        (m,) = dask_loom.cluster.compute(d.mean(axis=(1, 2, 3, 4)), client=client)
        wall = time.perf_counter() - t0
        tasks = len(d.__dask_graph__())
    finally:
        client.close()
        cluster.close()
    return {"wall": wall, "means": [float(v) for v in m], "tasks": tasks}


def numpy_mean(record: str) -> dict[str, Any]:
    import dask_loom

    t0 = time.perf_counter()
    a = dask_loom.open_ome_arrow(record, layout="TCZYX").to_numpy()
    m = a.mean(axis=(0, 2, 3, 4))
    return {"wall": time.perf_counter() - t0, "means": [float(v) for v in m]}


def ome_arrow_full(record: str) -> dict[str, Any]:
    import warnings

    import ome_arrow

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    a = ome_arrow.OMEArrow(record, column_name="image").tensor_view(layout="TCZYX").to_numpy()
    return {"wall": time.perf_counter() - t0, "checksum": int(a[:, :, ::7, ::97, ::89].astype(np.int64).sum())}


def ome_arrow_roi(record: str, shape: tuple[int, ...]) -> dict[str, Any]:
    import warnings

    import ome_arrow

    warnings.simplefilter("ignore")
    x, y, w, h = _roi(shape)
    t0 = time.perf_counter()
    a = ome_arrow.OMEArrow(record, column_name="image").tensor_view(t=0, c=0, roi=(x, y, w, h), layout="ZYX").to_numpy()
    return {"wall": time.perf_counter() - t0, "checksum": int(a.astype(np.int64).sum())}


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help=f"image {SMALL} (192 MiB) instead of {FULL} (3 GiB)")
    ap.add_argument("--only", choices=["write", "read", "all"], default="all")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory, removed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reference-max-mib", type=float, default=512, help="run ome-arrow only on images up to this size")
    args = ap.parse_args(argv)

    shape = SMALL if args.small else FULL
    nbytes = int(np.prod(shape)) * 2
    work = args.workdir or tempfile.mkdtemp(prefix="bench-ome-", dir=os.environ.get("TMPDIR", "/tmp"))
    os.makedirs(work, exist_ok=True)
    ds, rec = os.path.join(work, "image.ds"), os.path.join(work, "image.ome.parquet")
    res: dict[str, Any] = {}

    def run(name: str, fn: str, *a: Any) -> dict[str, Any]:
        r = measure(fn, *a)
        res[name] = r
        shown = {k: v for k, v in r.items() if k not in ("traceback", "means")}
        print(f"{name:16s} {json.dumps(shown)}", flush=True)
        return r

    try:
        print(f"image {shape} uint16 = {nbytes / 2**30:.2f} GiB, workdir {work}", flush=True)
        if args.only in ("write", "all") or not os.path.exists(ds):
            run("write_dataset", "write_dataset", shape, ds)
        if args.only in ("write", "all") or not os.path.exists(rec):
            run("write_record", "write_record", shape, rec)  # atomic: no file when it fails
        if args.only in ("read", "all"):
            run("full_read", "full_read", ds)
            run("roi_read", "roi_read", ds, shape)
            # The baseline reads "the same record" whole; without a single-record file (over
            # Parquet's 2 GiB page limit) it reads every chunk of the dataset instead.
            base = rec if os.path.exists(rec) else ds
            res["baseline_source"] = os.path.basename(base)
            if base == rec:
                run("record_roi_read", "roi_read", rec, shape)
            run("numpy_full", "numpy_full", base)
            run("numpy_roi", "numpy_roi", base, shape)
            run("mean_dask", "mean_dask", ds, args.workers)
            run("mean_dask_auto", "mean_dask", ds, args.workers, "auto")
            run("numpy_mean", "numpy_mean", base)
            try:
                import ome_arrow  # noqa: F401

                have_ref = True
            except ImportError:
                have_ref = False
            if have_ref and nbytes <= args.reference_max_mib * 2**20 and os.path.exists(rec):
                run("ome_arrow_full", "ome_arrow_full", rec)
                run("ome_arrow_roi", "ome_arrow_roi", rec, shape)
            else:
                res["ome_arrow"] = {"skipped": "not installed" if not have_ref else
                                    f"image larger than --reference-max-mib {args.reference_max_mib}"}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def wall(k: str) -> float | None:
        return res.get(k, {}).get("wall")

    def ratio(a: str, b: str) -> float | None:
        x, y = wall(a), wall(b)
        return round(x / y, 2) if x and y else None

    ratios = {
        "full_over_roi": ratio("full_read", "roi_read"),
        "numpy_roi_over_roi": ratio("numpy_roi", "roi_read"),
        "numpy_full_over_full": ratio("numpy_full", "full_read"),
        "numpy_mean_over_mean_dask": ratio("numpy_mean", "mean_dask"),
        "numpy_mean_over_mean_dask_auto": ratio("numpy_mean", "mean_dask_auto"),
        "ome_arrow_full_over_full": ratio("ome_arrow_full", "full_read"),
        "ome_arrow_roi_over_roi": ratio("ome_arrow_roi", "roi_read"),
    }
    checks = {}
    if "roi_read" in res and "numpy_roi" in res:
        checks["roi_equal_numpy"] = res["roi_read"].get("checksum") == res["numpy_roi"].get("checksum")
    if "full_read" in res and "numpy_full" in res:
        checks["full_equal_numpy"] = res["full_read"].get("checksum") == res["numpy_full"].get("checksum")
    if "mean_dask" in res and "numpy_mean" in res and "means" in res["mean_dask"]:
        checks["means_equal"] = bool(np.allclose(res["mean_dask"]["means"], res["numpy_mean"]["means"]))
    if "ome_arrow_roi" in res and "checksum" in res["ome_arrow_roi"]:
        checks["roi_equal_ome_arrow"] = res["ome_arrow_roi"]["checksum"] == res["roi_read"].get("checksum")
    targets = {
        "roi_20x_faster_than_full": (ratios["full_over_roi"] or 0) >= 20,
        "write_dataset_peak_rss_under_1GiB": res.get("write_dataset", {}).get("peak_rss_mib", 1e9) < 1024,
        "write_record_peak_rss_under_1GiB": res.get("write_record", {}).get("peak_rss_mib", 1e9) < 1024,
    }
    out = {
        "benchmark": "bench_ome",
        "shape": list(shape),
        "dtype": "uint16",
        "image_gib": round(nbytes / 2**30, 3),
        "small": args.small,
        "workers": args.workers,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": res,
        "ratios": ratios,
        "checks": checks,
        "targets": targets,
    }
    print(json.dumps({"ratios": ratios, "checks": checks, "targets": targets}, indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    name = "bench_ome_small.json" if args.small else ("bench_ome_write.json" if args.only == "write" else "bench_ome.json")
    with open(os.path.join(RESULTS, name), "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
