"""Loom operations side by side with loompy 3.0.8 on the map benchmark's file.

scan(axis=1) over the main layer (light per-batch work), aggregate by a 20-group label,
permute along axis 1 with a random ordering (each run on a fresh copy), sparse(), and
create from a scipy CSR of the same data.  Every run is a fresh process; wall time covers
the operation (copies and inputs prepared before the clock starts), peak RSS the whole
process tree.

    python benchmarks/bench_loom_ops.py           # 20,000 x 50,000
    python benchmarks/bench_loom_ops.py --small   # 4,000 x 10,000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, measure, save, table
from bench_loom_map import bench_file, run_floor


def _client(scheduler: str):
    if scheduler != "cluster":
        return None, None
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    client.run(lambda: __import__("dask_loom.hdf5"))  # imports done, as on a long-lived cluster
    return cluster, client


def _lib(name: str):
    if name == "loompy":
        import loompy

        return loompy
    import dask_loom

    return dask_loom


def _kw(lib: str, client) -> dict:
    return {} if lib == "loompy" else ({"client": client} if client is not None else {"scheduler": "threads"})


def run_scan(path: str, lib: str, scheduler: str = "threads") -> dict:
    cluster, client = _client(scheduler)
    mod = _lib(lib)
    t0 = time.perf_counter()
    total = 0.0
    with mod.connect(path, "r", **({} if lib == "loompy" else _kw(lib, client))) as ds:
        for _, _, view in ds.scan(axis=1, batch_size=512, layers=[""]):
            total += float(view[""][:, :][0].sum())  # light per-batch work
    wall = time.perf_counter() - t0
    if client is not None:
        client.close()
        cluster.close()
    return {"wall": wall, "checksum": total}


def run_aggregate(path: str, lib: str, scheduler: str = "threads") -> dict:
    cluster, client = _client(scheduler)
    mod = _lib(lib)
    t0 = time.perf_counter()
    with mod.connect(path, "r") as ds:
        m = ds.aggregate(group_by="Clusters", aggr_by="mean", **_kw(lib, client))
    wall = time.perf_counter() - t0
    if client is not None:
        client.close()
        cluster.close()
    return {"wall": wall, "checksum": float(m.sum())}


def run_permute(path: str, lib: str, scheduler: str = "threads") -> dict:
    work = os.path.join(tempfile.mkdtemp(dir=CACHE), "p.loom")
    shutil.copyfile(path, work)
    cluster, client = _client(scheduler)
    mod = _lib(lib)
    with mod.connect(work, "r") as ds:
        n = ds.shape[1]
    order = np.random.default_rng(0).permutation(n)
    t0 = time.perf_counter()
    with mod.connect(work, **({} if lib == "loompy" else _kw(lib, client))) as ds:
        ds.permute(order, axis=1)
    wall = time.perf_counter() - t0
    if client is not None:
        client.close()
        cluster.close()
    shutil.rmtree(os.path.dirname(work))
    return {"wall": wall}


def run_sparse(path: str, lib: str, scheduler: str = "threads") -> dict:
    cluster, client = _client(scheduler)
    mod = _lib(lib)
    t0 = time.perf_counter()
    with mod.connect(path, "r", **({} if lib == "loompy" else _kw(lib, client))) as ds:
        m = ds.sparse()
    wall = time.perf_counter() - t0
    if client is not None:
        client.close()
        cluster.close()
    return {"wall": wall, "nnz": int(m.nnz)}


def csr_input(path: str) -> str:
    """The layer as a CSR matrix plus attributes, saved once beside the cached file."""
    target = path + ".csr.npz"
    if not os.path.exists(target):
        import scipy.sparse as sp

        import dask_loom

        with dask_loom.connect(path, "r") as ds:
            sp.save_npz(target + ".tmp.npz", ds.sparse().tocsr(), compressed=False)
            np.savez(target + ".attrs.npz", **{f"ra_{k}": ds.ra[k].astype(str) for k in ds.ra.keys()}, **{f"ca_{k}": np.asarray(ds.ca[k]).astype(str) if ds.ca[k].dtype == object else ds.ca[k] for k in ds.ca.keys()})
        os.replace(target + ".tmp.npz", target)
    return target


def run_create_csr(path: str, lib: str) -> dict:
    import scipy.sparse as sp

    csr = sp.load_npz(csr_input(path))  # the input: held in memory by both libraries
    attrs = np.load(csr_input(path) + ".attrs.npz")
    ra = {k[3:]: attrs[k] for k in attrs.files if k.startswith("ra_")}
    ca = {k[3:]: attrs[k] for k in attrs.files if k.startswith("ca_")}
    out = os.path.join(tempfile.mkdtemp(dir=CACHE), "c.loom")
    mod = _lib(lib)
    t0 = time.perf_counter()
    mod.create(out, csr, ra, ca)
    wall = time.perf_counter() - t0
    shutil.rmtree(os.path.dirname(out))
    return {"wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated subset: scan,aggregate,permute,sparse,create")
    args = ap.parse_args()
    path = bench_file(args.small)
    only = set(args.only.split(",")) if args.only else {"scan", "aggregate", "permute", "sparse", "create"}
    rows = [("floor: read+inflate, 2 threads", measure(run_floor, path, 2))]
    ratios = {}
    for op, fn in (("scan", run_scan), ("aggregate", run_aggregate), ("permute", run_permute), ("sparse", run_sparse)):
        if op not in only:
            continue
        lp = measure(fn, path, "loompy")
        th = measure(fn, path, "dask_loom", "threads")
        cl = measure(fn, path, "dask_loom", "cluster")
        rows += [(f"{op}: loompy", lp), (f"{op}: dask_loom threads", th), (f"{op}: dask_loom LocalCluster 2x1", cl)]
        ratios[f"{op}_speedup_threads"] = lp["wall"] / th["wall"]
        ratios[f"{op}_speedup_cluster"] = lp["wall"] / cl["wall"]
        ratios[f"{op}_best_vs_floor"] = min(th["wall"], cl["wall"]) / rows[0][1]["wall"]
    if "create" in only:
        csr_input(path)
        lp = measure(run_create_csr, path, "loompy")
        dl = measure(run_create_csr, path, "dask_loom")
        rows += [("create from CSR: loompy", lp), ("create from CSR: dask_loom", dl)]
        ratios["create_speedup"] = lp["wall"] / dl["wall"]
        ratios["create_peak_rss_ratio"] = lp["peak_rss"] / dl["peak_rss"]
    print(table(rows, rows[0][0]))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    name = "loom_ops" + ("_small" if args.small else "")
    merged_rows, merged_ratios = dict(rows), ratios
    if args.only:  # a partial run updates the saved results instead of replacing them
        import json

        from _harness import RESULTS

        old = os.path.join(RESULTS, f"{name}.json")
        if os.path.exists(old):
            with open(old) as fh:
                prev = json.load(fh)
            merged_rows = {**prev.get("rows", {}), **merged_rows}
            merged_ratios = {**prev.get("ratios", {}), **ratios}
    print("results:", save(name, {"file": path, "rows": merged_rows, "ratios": merged_ratios}))


if __name__ == "__main__":
    main()
