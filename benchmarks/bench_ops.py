"""The format-agnostic operations against what a user does today, side by side (issue 13, "Measure").

Every figure is a fresh process (``_harness.cold_and_warm``): *cold* is the
whole process (interpreter, imports, opening the input, the operation, exit),
*warm* the operation's second run inside one process; peak RSS is of the
process tree.  Inputs are generated once and cached under ``benchmarks/cache/``.

1. **Pseudobulk** -- sum and mean of every gene by 50 groups over a CSR
   collection of 4 h5ad files (5 % non-zero, 2,000 genes; 200,000 cells by
   default, ``--full`` 1,000,000): ``dask_loom.aggregate(MappedCollection,
   "group", axis=0, func=["sum", "mean"])`` vs ``anndata.read_h5ad`` of the
   four files + ``anndata.concat`` + ``scanpy.get.aggregate`` (the read counted).
2. **map([mean, std])** over a local Zarr array (blosc-zstd, 512 x 512 chunks;
   8,192 x 8,192 float32 by default, ``--full`` 16,384 x 32,768): per-row mean
   and std with ``dask_loom.map`` vs ``dask.array.from_zarr`` ``mean``/``std``
   computed together (threaded scheduler).
3. **Per-channel mean and max of a 5-D OME image** (OME-Arrow typed chunk
   dataset, uint16 TCZYX, 2 x 3 x 16 x 1,024 x 1,024 = 192 MiB by default,
   ``--full`` 2 x 3 x 64 x 2,048 x 2,048 = 3 GiB): ``dask_loom.map(view,
   [np.mean, np.max], axis=1)`` vs decoding the image (``to_numpy``) and
   reducing it with numpy; the numpy reduction alone is reported too.

Each pair checks that both sides give the same numbers (``max_abs_diff``).

Usage::

    python benchmarks/bench_ops.py            # scaled down (results/ops_small.json)
    python benchmarks/bench_ops.py --full     # the issue's sizes (results/ops.json)
    python benchmarks/bench_ops.py --only zarr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, cold_and_warm, relative, run_process, save

N_GENES = 2_000
N_FILES = 4
N_GROUPS = 50
DENSITY = 0.05


# -- inputs -----------------------------------------------------------------------------------------


def _generate(path: str, code: str) -> None:
    """Run *code* in a fresh process to make *path* (cached: a ``.done`` marker beside it)."""
    marker = path + ".done"
    if os.path.exists(marker):
        return
    os.makedirs(CACHE, exist_ok=True)
    t0 = time.perf_counter()
    run_process(textwrap.dedent(code), timeout=24 * 3600)
    with open(marker, "w") as fh:
        json.dump({"seconds": round(time.perf_counter() - t0, 1)}, fh)


def h5ad_files(n_cells: int) -> list[str]:
    """Four h5ad files of *n_cells* rows in all: CSR ``X`` (float32 counts), obs ``group`` (50 categories)."""
    per = n_cells // N_FILES
    paths = [os.path.join(CACHE, f"ops_{n_cells}_{i}.h5ad") for i in range(N_FILES)]
    for i, p in enumerate(paths):
        _generate(
            p,
            f"""
            import numpy as np, pandas as pd, scipy.sparse as sp, anndata as ad
            from dask_loom._synthetic import synthetic_csr_blocks
            blocks, labels = [], []
            for m, lab in synthetic_csr_blocks({per}, {N_GENES}, density={DENSITY}, seed={i}, n_clusters={N_GROUPS}):
                blocks.append(m)
                labels.append(lab)
            X = sp.vstack(blocks, format="csr")
            lab = np.concatenate(labels)
            obs = pd.DataFrame(
                {{"group": pd.Categorical.from_codes(lab, categories=[f"g{{k:02d}}" for k in range({N_GROUPS})])}},
                index=[f"f{i}_cell{{j}}" for j in range(X.shape[0])],
            )
            var = pd.DataFrame(index=[f"Gene{{j:05d}}" for j in range({N_GENES})])
            ad.AnnData(X=X, obs=obs, var=var).write_h5ad({p!r})
            """,
        )
    return paths


def zarr_array(shape: tuple[int, int]) -> str:
    """A local float32 Zarr v3 array, blosc-zstd, 512 x 512 chunks, gamma-distributed values."""
    path = os.path.join(CACHE, f"ops_zarr_{shape[0]}x{shape[1]}.zarr")
    _generate(
        path,
        f"""
        import numpy as np, zarr
        from zarr.codecs import BloscCodec
        z = zarr.create_array({path!r}, shape={shape!r}, chunks=(512, 512), dtype="f4",
                              compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), overwrite=True)
        rng = np.random.default_rng(1)
        for i in range(0, {shape[0]}, 2048):
            n = min(2048, {shape[0]} - i)
            z[i:i + n] = rng.gamma(2.0, 1.0, (n, {shape[1]})).astype("f4")
        """,
    )
    return path


def ome_dataset(shape: tuple[int, ...]) -> str:
    """An OME-Arrow typed chunk dataset of a synthetic uint16 TCZYX image (see bench_ome.synthetic)."""
    path = os.path.join(CACHE, "ops_ome_" + "x".join(map(str, shape)) + ".ome.arrow")
    _generate(
        path,
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from bench_ome import synthetic
        import dask_loom
        dask_loom.write_ome_arrow_dataset(synthetic({shape!r}), {path!r}, overwrite=True, scheduler="threads")
        """,
    )
    return path


# -- the runs ---------------------------------------------------------------------------------------

PRELUDE = "import warnings\nwarnings.simplefilter('ignore')\nimport numpy as np\n"


def pseudobulk(paths: list[str]) -> dict:
    ours = cold_and_warm(
        PRELUDE + f"import dask_loom\npaths = {paths!r}",
        """
        mc = dask_loom.MappedCollection(paths, obs_keys="group")
        (s, m), labels = dask_loom.aggregate(mc, "group", axis=0, func=["sum", "mean"], return_labels=True)
        """,
        result="[float(s.sum()), float(m.sum()), s[:3, :3].tolist(), m[:3, :3].tolist()]",
    )
    peer = cold_and_warm(
        PRELUDE + f"import anndata as ad, scanpy as sc\npaths = {paths!r}",
        """
        adata = ad.concat([ad.read_h5ad(p) for p in paths])
        agg = sc.get.aggregate(adata, by="group", func=["sum", "mean"])
        agg = agg[np.argsort(agg.obs_names.astype(str))]
        s, m = np.asarray(agg.layers["sum"]), np.asarray(agg.layers["mean"])
        """,
        result="[float(s.sum()), float(m.sum()), s[:3, :3].tolist(), m[:3, :3].tolist()]",
    )
    return {"dask_loom": ours, "anndata+scanpy": peer}


def zarr_map(path: str) -> dict:
    ours = cold_and_warm(
        PRELUDE + f"import dask_loom\npath = {path!r}",
        """
        za = dask_loom.open_zarr(path, mode="r")
        mean, std = dask_loom.map(za, [np.mean, np.std], axis=0)
        """,
        result="[float(mean.sum()), float(std.sum()), mean[:3].tolist(), std[:3].tolist()]",
    )
    peer = cold_and_warm(
        PRELUDE + f"import dask, dask.array as da\npath = {path!r}",
        """
        x = da.from_zarr(path)
        mean, std = dask.compute(x.mean(axis=1, dtype="f8"), x.std(axis=1, dtype="f8"), scheduler="threads")
        """,
        result="[float(mean.sum()), float(std.sum()), mean[:3].tolist(), std[:3].tolist()]",
    )
    return {"dask_loom": ours, "dask.array.from_zarr": peer}


def ome_channels(path: str) -> dict:
    ours = cold_and_warm(
        PRELUDE + f"import dask_loom\npath = {path!r}",
        """
        view = dask_loom.open_ome_arrow(path, layout="TCZYX")
        mean, mx = dask_loom.map(view, [np.mean, np.max], axis=1)
        """,
        result="[mean.tolist(), mx.tolist()]",
    )
    peer = cold_and_warm(
        PRELUDE + f"import time, dask_loom\npath = {path!r}",
        """
        a = dask_loom.open_ome_arrow(path, layout="TCZYX").to_numpy()
        _r0 = time.perf_counter()
        mean, mx = a.mean(axis=(0, 2, 3, 4)), a.max(axis=(0, 2, 3, 4))
        reduce_only = time.perf_counter() - _r0
        """,
        result="[mean.tolist(), mx.tolist(), reduce_only]",
    )
    return {"dask_loom": ours, "decode+numpy": peer}


def _diff(a: list, b: list) -> float:
    """Largest absolute difference between two results' numbers (the checksums and sample values)."""
    x = np.asarray(np.hstack([np.ravel(np.asarray(v, dtype=float)) for v in a]))
    y = np.asarray(np.hstack([np.ravel(np.asarray(v, dtype=float)) for v in b]))
    return float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y))))


def _summary(name: str, runs: dict) -> dict:
    (ours_name, ours), (peer_name, peer) = runs.items()
    n = 2 if name == "ome" else None  # the numpy side also returns its reduce-only time
    out = {
        "runs": runs,
        "cold_speedup": round(peer["wall"] / ours["wall"], 2),
        "warm_speedup": round(peer["warm"] / ours["warm"], 2),
        "max_rel_diff": _diff(ours["result"][:n], peer["result"][:n]),
    }
    print(f"\n{name}: {ours_name} vs {peer_name}")
    for label, r in runs.items():
        print(
            f"  {label:<24} cold {r['wall']:7.2f} s   warm {r['warm']:7.2f} s   peak RSS {r['peak_rss'] / 2**20:7.0f} MiB"
        )
    if name == "ome":
        out["numpy_reduce_only"] = round(float(peer["result"][2]), 3)
        print(f"  numpy reduction alone (image decoded): {out['numpy_reduce_only']:.2f} s")
    print(
        f"  speed-up: cold {out['cold_speedup']}x, warm {out['warm_speedup']}x; max relative difference {out['max_rel_diff']:.2e}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--full", action="store_true", help="the issue's sizes (1,000,000 cells, 2 GiB Zarr, 3 GiB image)"
    )
    ap.add_argument(
        "--only", choices=["pseudobulk", "zarr", "ome"], action="append", help="run only these (repeatable)"
    )
    args = ap.parse_args(argv)
    which = args.only or ["pseudobulk", "zarr", "ome"]
    n_cells = 1_000_000 if args.full else 200_000
    zshape = (16_384, 32_768) if args.full else (8_192, 8_192)
    oshape = (2, 3, 64, 2048, 2048) if args.full else (2, 3, 16, 1024, 1024)
    results: dict = {"sizes": {}}
    if "pseudobulk" in which:
        paths = h5ad_files(n_cells)
        results["sizes"]["pseudobulk"] = {
            "cells": n_cells,
            "genes": N_GENES,
            "files": N_FILES,
            "groups": N_GROUPS,
            "density": DENSITY,
            "inputs": [relative(p) for p in paths],
        }
        results["pseudobulk"] = _summary("pseudobulk", pseudobulk(paths))
    if "zarr" in which:
        path = zarr_array(zshape)
        results["sizes"]["zarr"] = {
            "shape": zshape,
            "chunks": [512, 512],
            "dtype": "float32",
            "codec": "blosc-zstd",
            "input": relative(path),
        }
        results["zarr"] = _summary("zarr", zarr_map(path))
    if "ome" in which:
        path = ome_dataset(oshape)
        results["sizes"]["ome"] = {
            "shape_tczyx": oshape,
            "dtype": "uint16",
            "bytes": int(np.prod(oshape)) * 2,
            "input": relative(path),
        }
        results["ome"] = _summary("ome", ome_channels(path))
    name = "ops" if args.full else "ops_small"
    if args.only:
        name += "_" + "_".join(which)
    print("\nresults:", relative(save(name, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
