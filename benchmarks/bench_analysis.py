"""The single-cell recipe out of core: scanpy in memory vs scanpy on dask vs dask_loom, side by side.

Input: a generated counts matrix shaped like the 10x 1.3 M neurons (27,998
genes, 7.2 % non-zero, negative-binomial counts with cluster structure;
``dask_loom._synthetic.synthetic_csr_blocks``), stored as h5ad CSR
(uncompressed, as anndata writes it) and as AnnData Zarr (v2, blosc-lz4, as
anndata writes it), cached under ``benchmarks/cache/``.  Default 200,000 cells;
``--full`` 1,306,127.

Each run is a fresh process (wall time from start to exit, peak RSS of the
process tree), end to end from the file: normalise -> log1p -> 2,000 variable
genes (``seurat``) -> PCA(50), ``X_pca`` computed:

* ``scanpy-memory``: ``anndata.read_h5ad`` then scanpy (skipped where the
  matrix would not fit in half the machine's memory);
* ``scanpy-dask``: anndata's lazy reader as its dask tutorial shows
  (``read_elem_lazy`` of ``X`` in 100,000-row sparse chunks) and scanpy's
  functions, dask's threaded scheduler;

  a peer run is stopped after ``--peer-timeout`` seconds or over
  ``--peer-max-gib`` (default half the machine's memory) and recorded as
  stopped, with its time and memory until then; a stopped scanpy-dask run is
  repeated, with dask_loom, at ``--peer-fallback-cells`` (50,000) cells, and
  the ratios say which size they are from;
* ``dask_loom``: ``MappedCollection(path).to_anndata()`` and ``dask_loom.pp``.

Also: per-gene mean and variance alone (M non-zeros/s per core), and Loom ->
AnnData Zarr conversion of the 20,000 x 50,000 Loom benchmark file
(``dask-loom convert`` vs ``scanpy.read_loom`` + ``write_zarr``).

Usage::

    python benchmarks/bench_analysis.py              # 200,000 cells
    python benchmarks/bench_analysis.py --full       # 1,306,127 cells (the lead runs it)
    python benchmarks/bench_analysis.py --cells 20000 --only dask_loom
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, relative, run_process, save

N_GENES = 27_998
FULL = 1_306_127
DEFAULT = 200_000
DENSITY = 0.072
CORES = os.cpu_count() or 1


def inputs(n_cells: int) -> dict[str, str]:
    """The h5ad and AnnData Zarr inputs for *n_cells* (generated once, cached)."""
    os.makedirs(CACHE, exist_ok=True)
    h5 = os.path.join(CACHE, f"analysis_{n_cells}x{N_GENES}.h5ad")
    zr = os.path.join(CACHE, f"analysis_{n_cells}x{N_GENES}.zarr")
    marker = h5 + ".done"
    if not os.path.exists(marker):
        code = textwrap.dedent(f"""
            from dask_loom._synthetic import write_synthetic_h5ad, h5ad_to_anndata_zarr
            write_synthetic_h5ad({h5!r}, {n_cells}, {N_GENES}, density={DENSITY}, seed=0)
            h5ad_to_anndata_zarr({h5!r}, {zr!r})
        """)
        t0 = time.perf_counter()
        run_process(code, timeout=24 * 3600)
        with open(marker, "w") as fh:
            json.dump({"seconds": time.perf_counter() - t0}, fh)
    return {"h5ad": h5, "zarr": zr}


PRELUDE = """
import json, time, warnings
warnings.simplefilter("ignore")
T = {{}}
C = {{}}  # CPU seconds of the process (all threads) per step: readable on a loaded machine
_t = time.perf_counter()
_c = time.process_time()
def step(name):
    global _t, _c
    now, c = time.perf_counter(), time.process_time()
    T[name] = round(now - _t, 3)
    C[name] = round(c - _c, 2)
    _t, _c = now, c
"""

SCANPY_MEMORY = (
    PRELUDE
    + """
import anndata as ad, scanpy as sc, numpy as np
a = ad.read_h5ad({path!r}); step("read")
sc.pp.normalize_total(a); step("normalize_total")
sc.pp.log1p(a); step("log1p")
sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor="seurat"); step("highly_variable_genes")
sc.pp.pca(a, n_comps=50); step("pca")
xp = np.asarray(a.obsm["X_pca"]); step("X_pca")
print(json.dumps({{"steps": T, "cpu": C, "hvg": int(a.var.highly_variable.sum()), "ratio": a.uns["pca"]["variance_ratio"][:5].tolist(), "xpca_abs_sum": float(np.abs(xp).sum())}}))
"""
)

SCANPY_DASK = (
    PRELUDE
    + """
import anndata as ad, scanpy as sc, numpy as np, h5py, zarr
path = {path!r}
if path.endswith(".h5ad"):
    f = h5py.File(path, "r")
else:
    f = zarr.open_group(path, mode="r")
# anndata's lazy reader, as scanpy's dask tutorial uses it: X in {chunk}-row sparse chunks.
a = ad.AnnData(
    X=ad.experimental.read_elem_lazy(f["X"], chunks=({chunk}, {n_genes})),
    obs=ad.io.read_elem(f["obs"]),
    var=ad.io.read_elem(f["var"]),
)
step("read")
sc.pp.normalize_total(a); step("normalize_total")
sc.pp.log1p(a); step("log1p")
sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor="seurat"); step("highly_variable_genes")
sc.pp.pca(a, n_comps=50); step("pca")
xp = a.obsm["X_pca"].compute(); step("X_pca")
print(json.dumps({{"steps": T, "cpu": C, "hvg": int(a.var.highly_variable.sum()), "ratio": a.uns["pca"]["variance_ratio"][:5].tolist(), "xpca_abs_sum": float(np.abs(xp).sum())}}))
"""
)

DASK_LOOM = (
    PRELUDE
    + """
import numpy as np, dask_loom
mc = dask_loom.MappedCollection([{path!r}])
a = mc.to_anndata(); step("read")
dask_loom.pp.normalize_total(a); step("normalize_total")
dask_loom.pp.log1p(a); step("log1p")
dask_loom.pp.highly_variable_genes(a, n_top_genes=2000, flavor="seurat"); step("highly_variable_genes")
dask_loom.pp.pca(a, n_comps=50); step("pca")
xp = a.obsm["X_pca"].compute(); step("X_pca")
print(json.dumps({{"steps": T, "cpu": C, "hvg": int(a.var.highly_variable.sum()), "ratio": a.uns["pca"]["variance_ratio"][:5].tolist(), "xpca_abs_sum": float(np.abs(xp).sum())}}))
"""
)

MEAN_VAR = (
    PRELUDE
    + """
import numpy as np, dask_loom
from dask_loom.pp._graph import column_stats, compute
mc = dask_loom.MappedCollection([{path!r}])
x = mc.to_dask(sparse=True)
compute(column_stats(x[:{warm}]))  # compile the kernels, open the file
_t, _c = time.perf_counter(), time.process_time()
(s,) = compute(column_stats(x)); step("mean_var")
n = x.shape[0]
mean = s[0, 0] / n
nnz = float(s[2, 0].sum())
print(json.dumps({{"steps": T, "cpu": C, "nnz": nnz, "mean_sum": float(mean.sum())}}))
"""
)


def run_recipe(kind: str, code: str, *, timeout: float = 6 * 3600, max_rss: int | None = None) -> dict:
    peer = max_rss is not None
    r = run_process(code, timeout=timeout, max_rss=max_rss, stop_ok=peer)
    what = r.get("stopped") or (r["result"]["steps"] if r["result"] else "")
    print(f"  {kind:<28} {r['wall']:8.1f} s  {r['peak_rss'] / 2**30:6.2f} GiB  {what}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1,306,127 cells")
    ap.add_argument("--cells", type=int, default=None)
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated runs: scanpy-memory, scanpy-dask, dask_loom, mean_var, convert",
    )
    ap.add_argument(
        "--dask-chunk",
        type=int,
        default=100_000,
        help="rows per chunk of the scanpy-dask run (its tutorial: 100,000)",
    )
    ap.add_argument("--formats", default="h5ad,zarr")
    ap.add_argument(
        "--peer-timeout", type=float, default=900, help="seconds a peer run may take before it is stopped"
    )
    ap.add_argument(
        "--peer-max-gib",
        type=float,
        default=None,
        help="memory a peer run may take before it is stopped (default: half the machine)",
    )
    ap.add_argument(
        "--peer-fallback-cells",
        type=int,
        default=50_000,
        help="when scanpy-dask is stopped, run it (and dask_loom) again at this many cells for a ratio",
    )
    ap.add_argument(
        "--convert-small",
        action="store_true",
        help="convert the 4,000 x 10,000 Loom file instead of the 20,000 x 50,000 one",
    )
    ap.add_argument(
        "--convert-ours-only",
        action="store_true",
        help="convert with dask-loom only (scanpy reads the whole file into memory)",
    )
    ap.add_argument("--out", default=None, help="name of the results file (default: from the cell count)")
    args = ap.parse_args()
    n_cells = args.cells or (FULL if args.full else DEFAULT)
    only = (
        set(args.only.split(","))
        if args.only
        else {"scanpy-memory", "scanpy-dask", "dask_loom", "mean_var", "convert"}
    )
    formats = args.formats.split(",")
    import psutil

    # The matrix inputs are generated only for the runs that read them (not for --only convert).
    paths = inputs(n_cells) if only - {"convert"} else {}
    nnz_est = int(n_cells * N_GENES * DENSITY)
    results: dict = {"n_cells": n_cells, "n_genes": N_GENES, "density": DENSITY, "nnz": nnz_est, "runs": {}}
    if paths:
        print(
            f"{n_cells} cells x {N_GENES} genes, ~{nnz_est / 1e6:.0f} M non-zeros; inputs {[relative(p) for p in paths.values()]}"
        )
    else:
        formats = []
    runs = results["runs"]
    cap = int((args.peer_max_gib * 2**30) if args.peer_max_gib else psutil.virtual_memory().total / 2)
    peer = {"timeout": args.peer_timeout, "max_rss": cap}
    results["peer_limits"] = {"timeout_s": args.peer_timeout, "max_rss_gib": cap / 2**30}
    if "scanpy-memory" in only:
        need = nnz_est * 8 * 3  # X, its normalised copy, working space
        if need < cap:
            runs["scanpy-memory h5ad"] = run_recipe(
                "scanpy-memory h5ad", SCANPY_MEMORY.format(path=paths["h5ad"]), **peer
            )
        else:
            print(f"  scanpy-memory skipped: needs about {need / 2**30:.0f} GiB")
    stopped_fmts = []
    for fmt in formats:
        if "scanpy-dask" in only:
            code = SCANPY_DASK.format(path=paths[fmt], chunk=args.dask_chunk, n_genes=N_GENES)
            runs[f"scanpy-dask {fmt}"] = r = run_recipe(f"scanpy-dask {fmt}", code, **peer)
            if r.get("stopped"):
                stopped_fmts.append(fmt)
        if "dask_loom" in only:
            runs[f"dask_loom {fmt}"] = run_recipe(f"dask_loom {fmt}", DASK_LOOM.format(path=paths[fmt]))
        if "mean_var" in only:
            r = run_process(MEAN_VAR.format(path=paths[fmt], warm=1000))
            sec = r["result"]["steps"]["mean_var"]
            nnz = r["result"]["nnz"]
            r["mnnz_per_s_per_core"] = nnz / sec / CORES / 1e6
            # Per CPU-second of the process as well: what a core gives when it is busy (the
            # wall figure also counts the time a thread waits for the other or for memory).
            r["mnnz_per_cpu_s"] = nnz / max(r["result"]["cpu"]["mean_var"], 1e-9) / 1e6
            runs[f"mean_var {fmt}"] = r
            print(
                f"  mean_var {fmt:<19} {sec:8.2f} s  {r['mnnz_per_s_per_core']:.0f} M nnz/s per core, "
                f"{r['mnnz_per_cpu_s']:.0f} M per CPU-second ({nnz / 1e6:.0f} M nnz, {CORES} cores)"
            )
    small = args.peer_fallback_cells
    if stopped_fmts and small < n_cells:
        # The peer did not finish at this size: both sides again at a size it finishes, for a ratio.
        small_paths = inputs(small)
        for fmt in stopped_fmts:
            code = SCANPY_DASK.format(path=small_paths[fmt], chunk=args.dask_chunk, n_genes=N_GENES)
            runs[f"scanpy-dask {fmt} @{small}"] = run_recipe(f"scanpy-dask {fmt} @{small}", code, **peer)
            runs[f"dask_loom {fmt} @{small}"] = run_recipe(
                f"dask_loom {fmt} @{small}", DASK_LOOM.format(path=small_paths[fmt])
            )
    ratios = {}
    for fmt in formats:
        ours, theirs = runs.get(f"dask_loom {fmt}"), runs.get(f"scanpy-dask {fmt}")
        if ours and theirs and not theirs.get("stopped"):
            ratios[fmt] = {
                "speedup_vs_scanpy_dask": theirs["wall"] / ours["wall"],
                "memory_fraction_of_scanpy_dask": ours["peak_rss"] / theirs["peak_rss"],
            }
        elif ours and theirs:
            ratios[fmt] = {
                "scanpy_dask_stopped": theirs["stopped"],
                "speedup_vs_scanpy_dask_at_least": theirs["wall"] / ours["wall"],
                "memory_fraction_of_scanpy_dask_at_most": ours["peak_rss"] / theirs["peak_rss"],
            }
            o, t = runs.get(f"dask_loom {fmt} @{small}"), runs.get(f"scanpy-dask {fmt} @{small}")
            if o and t and not t.get("stopped"):
                ratios[fmt][f"at_{small}_cells"] = {
                    "speedup_vs_scanpy_dask": t["wall"] / o["wall"],
                    "memory_fraction_of_scanpy_dask": o["peak_rss"] / t["peak_rss"],
                }
    mem = runs.get("scanpy-memory h5ad")
    if mem and not mem.get("stopped") and runs.get("dask_loom h5ad"):
        ratios.setdefault("h5ad", {})["speedup_vs_scanpy_memory"] = (
            mem["wall"] / runs["dask_loom h5ad"]["wall"]
        )
        ratios["h5ad"]["memory_fraction_of_scanpy_memory"] = (
            runs["dask_loom h5ad"]["peak_rss"] / mem["peak_rss"]
        )
    results["ratios"] = ratios
    if "convert" in only:
        results["convert"] = run_convert(small=args.convert_small, peers=not args.convert_ours_only)
    for fmt, r in ratios.items():
        print(f"  {fmt}: {r}")
    if only == {"convert"}:
        results = {"convert": results.get("convert")}
        name = "analysis_convert_small" if args.convert_small else "analysis_convert"
        name += "_ours" if args.convert_ours_only else ""
    else:
        name = (
            "analysis_full"
            if n_cells == FULL
            else ("analysis" if n_cells == DEFAULT else f"analysis_{n_cells}")
        )
    print("saved", save(args.out or name, results))


CONVERT_SCANPY = (
    PRELUDE
    + """
import scanpy as sc
a = sc.read_loom({src!r}, validate=False); step("read_loom")
a.write_zarr({dst!r}); step("write_zarr")
print(json.dumps({{"steps": T}}))
"""
)

CONVERT_OURS = (
    PRELUDE
    + """
from dask_loom.cli import main
main(["convert", {src!r}, {dst!r}, "--overwrite"]); step("convert")
print(json.dumps({{"steps": T}}))
"""
)


def run_convert(*, small: bool = False, peers: bool = True) -> dict:
    import shutil

    from bench_loom_map import bench_file

    src = bench_file(small=small)
    out: dict = {"input": relative(src)}
    runs = (("scanpy read_loom + write_zarr", CONVERT_SCANPY),) if peers else ()
    for kind, code in (*runs, ("dask-loom convert", CONVERT_OURS)):
        dst = os.path.join(CACHE, "converted.zarr")
        shutil.rmtree(dst, ignore_errors=True)
        out[kind] = run_recipe(kind, code.format(src=src, dst=dst))
        shutil.rmtree(dst, ignore_errors=True)
    if not peers:
        return out
    a, b = out["scanpy read_loom + write_zarr"], out["dask-loom convert"]
    out["speedup"] = a["wall"] / b["wall"]
    print(
        f"  convert: {out['speedup']:.2f}x faster, peak {b['peak_rss'] / 2**30:.2f} GiB vs {a['peak_rss'] / 2**30:.2f} GiB"
    )
    return out


if __name__ == "__main__":
    main()
