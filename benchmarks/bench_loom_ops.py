"""Loom operations side by side with loompy 3.0.8 on the map benchmark's file.

scan(axis=1) over the main layer (light per-batch work), aggregate by a 20-group label,
permute along axis 1 with a random ordering (each run on a fresh copy), sparse(), and
create from a scipy CSR of the same data.  Each figure is timed as users meet it: cold
is a whole fresh process (interpreter, imports, connect, operation, close, exit; file
copies for permute are made before it starts), warm the operation's second run in one
process; peak RSS is of the whole process tree.

    python benchmarks/bench_loom_ops.py           # 20,000 x 50,000
    python benchmarks/bench_loom_ops.py --small   # 4,000 x 10,000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, cold_and_warm, measure, relative, save, table
from bench_loom_map import bench_file, run_floor

SETUP = {"loompy": "import numpy as np\nimport loompy as lib", "dask_loom": "import numpy as np\nimport dask_loom as lib"}


def _kw(scheduler: str | None) -> str:
    return f", scheduler={scheduler!r}" if scheduler else ""


def run_scan(path: str, lib: str, scheduler: str | None = None, repeat: int = 1) -> dict:
    op = f"""
total = 0.0
with lib.connect({path!r}, "r"{_kw(scheduler)}) as ds:
    for _, _, view in ds.scan(axis=1, batch_size=512, layers=[""]):
        total += float(view[""][:, :][0].sum())  # light per-batch work
"""
    return cold_and_warm(SETUP[lib], op, result="total", repeat=repeat)


def run_aggregate(path: str, lib: str, scheduler: str | None = None, repeat: int = 1) -> dict:
    op = f"""
with lib.connect({path!r}, "r") as ds:
    m = ds.aggregate(group_by="Clusters", aggr_by="mean"{_kw(scheduler)})
"""
    return cold_and_warm(SETUP[lib], op, result="float(m.sum())", repeat=repeat)


def run_permute(path: str, lib: str, scheduler: str | None = None, repeat: int = 1) -> dict:
    # Each permute works on a fresh copy made before the process starts; the
    # warm figure permutes the copy a second time in the same process.
    work = os.path.join(tempfile.mkdtemp(dir=CACHE), "p.loom")
    shutil.copyfile(path, work)
    setup = SETUP[lib] + f"\norder = np.random.default_rng(0).permutation({_ncols(path)})"
    op = f"""
with lib.connect({work!r}{_kw(scheduler)}) as ds:
    ds.permute(order, axis=1)
"""
    try:
        cold = cold_and_warm(setup, op, repeat=1)
    finally:
        shutil.rmtree(os.path.dirname(work))
    return cold


def _ncols(path: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["matrix"].shape[1])


def run_sparse(path: str, lib: str, scheduler: str | None = None, repeat: int = 1) -> dict:
    op = f"""
with lib.connect({path!r}, "r"{_kw(scheduler)}) as ds:
    m = ds.sparse()
"""
    return cold_and_warm(SETUP[lib], op, result="int(m.nnz)", repeat=repeat)


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


def run_create_csr(path: str, lib: str, repeat: int = 1) -> dict:
    """``create`` from a CSR held in memory (loading it from .npz is in both sides' figures)."""
    out = os.path.join(tempfile.mkdtemp(dir=CACHE), "c.loom")
    setup = SETUP[lib] + f"""
import os
import scipy.sparse as sp
csr = sp.load_npz({csr_input(path)!r})
attrs = np.load({csr_input(path) + ".attrs.npz"!r})
ra = {{k[3:]: attrs[k] for k in attrs.files if k.startswith("ra_")}}
ca = {{k[3:]: attrs[k] for k in attrs.files if k.startswith("ca_")}}
"""
    op = f"""
if os.path.exists({out!r}):
    os.remove({out!r})
lib.create({out!r}, csr, ra, ca)
"""
    try:
        return cold_and_warm(setup, op, repeat=repeat)
    finally:
        shutil.rmtree(os.path.dirname(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated subset: scan,aggregate,permute,sparse,create")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cluster", action="store_true", help="also run each operation on an explicit LocalCluster (scheduler='local')")
    args = ap.parse_args()
    path = bench_file(args.small)
    only = set(args.only.split(",")) if args.only else {"scan", "aggregate", "permute", "sparse", "create"}
    r = args.repeat
    rows = [("floor: read+inflate, 2 threads", measure(run_floor, path, 2, repeat=r))]
    ratios = {}
    for op, fn in (("scan", run_scan), ("aggregate", run_aggregate), ("permute", run_permute), ("sparse", run_sparse)):
        if op not in only:
            continue
        lp = fn(path, "loompy", repeat=r)
        dl = fn(path, "dask_loom", repeat=r)
        rows += [(f"{op}: loompy", lp), (f"{op}: dask_loom", dl)]
        ratios[f"{op}_speedup_cold"] = lp["wall"] / dl["wall"]
        ratios[f"{op}_speedup_warm"] = lp["warm"] / dl["warm"]
        ratios[f"{op}_warm_vs_floor"] = dl["warm"] / rows[0][1]["wall"]
        ratios[f"{op}_peak_rss_gib"] = dl["peak_rss"] / 2**30
        if args.cluster:
            cl = fn(path, "dask_loom", scheduler="local", repeat=r)
            rows.append((f"{op}: dask_loom LocalCluster 2x1", cl))
            ratios[f"{op}_speedup_cold_cluster"] = lp["wall"] / cl["wall"]
    if "create" in only:
        csr_input(path)
        lp = run_create_csr(path, "loompy", repeat=r)
        dl = run_create_csr(path, "dask_loom", repeat=r)
        rows += [("create from CSR: loompy", lp), ("create from CSR: dask_loom", dl)]
        ratios["create_speedup_cold"] = lp["wall"] / dl["wall"]
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
    info = {"name": os.path.basename(path), "path": relative(path), "shape": [4000, 10000] if args.small else [20000, 50000]}
    print("results:", save(name, {"file": info, "rows": merged_rows, "ratios": merged_ratios}))


if __name__ == "__main__":
    main()
