"""MappedCollection: dask_loom vs lamindb on the same AnnData files (h5ad and sharded zarr).

Runs, each in a fresh process (wall time, items/s, peak RSS of the process
tree including DataLoader workers):

(a) random single-item ``__getitem__``;
(b) one shuffled epoch through ``DataLoader(batch_size=256, num_workers=2)``:
    lamindb's recommended setup (``parallel=True`` + ``torch_worker_init_fn``),
    ours with the same DataLoader (``__getitems__`` is used), and our
    ``iter_batches`` (block-shuffled, read ahead in the background);
(c) the sequential read floor: h5py / zarr reading each file's CSR in large
    row slices and densifying 256-row batches (the same output, no shuffling).

lamindb is slow enough that its epoch is measured on its first
``--peer-batches`` batches, our DataLoader runs on their first
``--our-batches``; ``iter_batches`` and the floor read the whole collection.
Everything is reported as items/s, which is what the ratios compare.  Also reported: label entropy per batch (batch
diversity) for iter_batches, a fully random order and sequential order.

Usage::

    python benchmarks/bench_mapped.py --small     # 4 x 25k rows x 2,000 genes (validation)
    python benchmarks/bench_mapped.py             # 4 x 250k rows x 2,000 genes (>= 1M rows)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import CACHE, measure, save

N_GENES = 2000
N_TYPES = 20


# -- data ------------------------------------------------------------------------------


def _csr_chunk(rng: np.random.Generator, n: int, density: float) -> Any:
    import scipy.sparse as sp

    mask = rng.random((n, N_GENES), dtype=np.float32) < density
    rows, cols = np.nonzero(mask)
    data = rng.integers(1, 30, size=len(rows)).astype(np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(n, N_GENES))


def make_files(rows_per_file: int, n_files: int, density: float) -> dict[str, list[str]]:
    """h5ad files and the same data as sharded zarr v3 (cached under benchmarks/cache/)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import zarr

    root = os.path.join(CACHE, f"mapped_{n_files}x{rows_per_file}x{N_GENES}_{density}")
    marker = os.path.join(root, "done.json")
    h5 = [os.path.join(root, f"part{i}.h5ad") for i in range(n_files)]
    zr = [os.path.join(root, f"part{i}.zarr") for i in range(n_files)]
    if os.path.exists(marker):
        return {"h5ad": h5, "zarr": zr}
    os.makedirs(root, exist_ok=True)
    warnings.simplefilter("ignore")
    genes = [f"gene{i:05d}" for i in range(N_GENES)]
    for i in range(n_files):
        rng = np.random.default_rng(i)
        x = sp.vstack([_csr_chunk(rng, min(20_000, rows_per_file - a), density) for a in range(0, rows_per_file, 20_000)], format="csr")
        # cell types come in runs (as files sorted by cluster do), so sequential batches are not diverse
        runs = np.repeat(rng.integers(0, N_TYPES, rows_per_file // 500 + 1), 500)[:rows_per_file]
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([f"type{t:02d}" for t in runs])},
            index=[f"p{i}c{j}" for j in range(rows_per_file)],
        )
        a = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))
        a.write_h5ad(h5[i])
        with ad.settings.override(zarr_write_format=3):
            a.write_zarr(zr[i])
            g = zarr.open_group(zr[i], mode="r+", use_consolidated=False)
            del g["X"]
            # annbatch-style sharding: small inner chunks (~64 rows), ~1M-element shards
            inner = max(1024, int(64 * density * N_GENES))
            ad.io.write_elem(g, "X", a.X, dataset_kwargs={"chunks": (inner,), "shards": (inner * 128,)})
            zarr.consolidate_metadata(zr[i])
    with open(marker, "w") as fh:
        json.dump({"rows_per_file": rows_per_file, "n_files": n_files, "density": density}, fh)
    return {"h5ad": h5, "zarr": zr}


# -- runs (module level: each runs in a spawned process) --------------------------------


def _lamindb_cls() -> Any:
    from lamindb.core import MappedCollection

    return MappedCollection


def run_getitem(kind: str, paths: list[str], n: int, impl: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    if impl == "lamindb":
        mc = _lamindb_cls()(paths, obs_keys="cell_type")
    else:
        from dask_loom import MappedCollection

        mc = MappedCollection(paths, obs_keys="cell_type")
    idx = np.random.default_rng(0).integers(0, len(mc), n)
    for i in idx[:20]:  # warm-up: first touches open files, caches indptr
        mc[int(i)]
    t0 = time.perf_counter()
    total = 0.0
    for i in idx:
        total += float(mc[int(i)]["X"].sum())
    wall = time.perf_counter() - t0
    return {"wall": wall, "items": n, "items_per_s": n / wall, "checksum": total}


def run_dataloader(kind: str, paths: list[str], impl: str, max_batches: int | None) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    import torch
    from torch.utils.data import DataLoader

    if impl == "lamindb":
        mc = _lamindb_cls()(paths, obs_keys="cell_type", parallel=True)
    else:
        from dask_loom import MappedCollection

        mc = MappedCollection(paths, obs_keys="cell_type", parallel=True)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(
        mc, batch_size=256, shuffle=True, num_workers=2, worker_init_fn=mc.torch_worker_init_fn, generator=gen,
        persistent_workers=False,
    )
    t0 = time.perf_counter()
    items = 0
    it = iter(loader)
    t_first = None
    for b, batch in enumerate(it):
        if t_first is None:
            t_first = time.perf_counter()
        items += batch["X"].shape[0]
        if max_batches is not None and b + 1 >= max_batches:
            break
    wall = time.perf_counter() - t0
    del it
    return {"wall": wall, "items": items, "items_per_s": items / wall, "startup_s": (t_first or t0) - t0}


def run_iter_batches(kind: str, paths: list[str], block_size: int, preload_blocks: int) -> dict[str, Any]:
    from dask_loom import MappedCollection

    mc = MappedCollection(paths, obs_keys="cell_type")
    t0 = time.perf_counter()
    items = 0
    ent = []
    for batch in mc.iter_batches(256, seed=0, block_size=block_size, preload_blocks=preload_blocks):
        items += batch["X"].shape[0]
        if len(ent) < 400:
            ent.append(_entropy(batch["cell_type"]))
    wall = time.perf_counter() - t0
    seen = None
    return {"wall": wall, "items": items, "items_per_s": items / wall, "entropy": float(np.mean(ent)), "seen": seen}


def run_iterable_loader(kind: str, paths: list[str], max_batches: int | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from dask_loom import MappedCollection, MappedIterableDataset

    mc = MappedCollection(paths, obs_keys="cell_type")
    loader = DataLoader(MappedIterableDataset(mc, 256, seed=0), batch_size=None, num_workers=2)
    t0 = time.perf_counter()
    items = 0
    for b, batch in enumerate(loader):
        items += batch["X"].shape[0]
        if max_batches is not None and b + 1 >= max_batches:
            break
    wall = time.perf_counter() - t0
    return {"wall": wall, "items": items, "items_per_s": items / wall}


def run_floor(kind: str, paths: list[str], densify: bool) -> dict[str, Any]:
    """Sequential read floor: each file's CSR read in 65,536-row slices with h5py / zarr."""
    import scipy.sparse as sp

    t0 = time.perf_counter()
    items = 0
    for p in paths:
        if kind == "h5ad":
            import h5py

            f = h5py.File(p, "r")
            g = f["X"]
        else:
            import zarr

            f = None
            g = zarr.open_group(p, mode="r")["X"]
        indptr = g["indptr"][...]
        n = len(indptr) - 1
        for a in range(0, n, 65536):
            b = min(n, a + 65536)
            lo, hi = int(indptr[a]), int(indptr[b])
            m = sp.csr_matrix((g["data"][lo:hi], g["indices"][lo:hi], indptr[a : b + 1] - lo), shape=(b - a, N_GENES))
            if densify:
                for s in range(0, b - a, 256):
                    m[s : s + 256].toarray()
            items += b - a
        if f is not None:
            f.close()
    wall = time.perf_counter() - t0
    return {"wall": wall, "items": items, "items_per_s": items / wall}


def _entropy(codes: Any) -> float:
    _, c = np.unique(np.asarray(codes), return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def diversity(paths: list[str], block_size: int, preload_blocks: int) -> dict[str, float]:
    from dask_loom import MappedCollection

    mc = MappedCollection(paths, obs_keys="cell_type")
    codes = np.concatenate(mc._codes["cell_type"])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(codes))
    n = min(len(codes), 256 * 400)
    rand = np.mean([_entropy(codes[perm[i : i + 256]]) for i in range(0, n, 256)])
    seq = np.mean([_entropy(codes[i : i + 256]) for i in range(0, n, 256)])
    blk = []
    for b in mc.iter_batches(256, seed=0, block_size=block_size, preload_blocks=preload_blocks):
        blk.append(_entropy(b["cell_type"]))
        if len(blk) >= 400:
            break
    return {"random_order": float(rand), "iter_batches": float(np.mean(blk)), "sequential": float(seq),
            "iter_batches_vs_random": float(np.mean(blk) / rand)}


# -- main -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="4 x 25k rows (validation run)")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--peer-batches", type=int, default=40, help="batches of lamindb's DataLoader epoch to time")
    ap.add_argument("--our-batches", type=int, default=400, help="batches of our DataLoader runs to time (0: whole epoch)")
    ap.add_argument("--getitem-items", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--preload-blocks", type=int, default=32)
    ap.add_argument("--kinds", default="h5ad,zarr")
    args = ap.parse_args()
    rows = 25_000 if args.small else 250_000
    files = make_files(rows, 4, args.density)
    try:
        _lamindb_cls()
        peer = "lamindb"
    except Exception as exc:  # documented in the results; never silently swapped
        print(f"lamindb not importable ({exc}); no peer runs", file=sys.stderr)
        peer = None
    results: dict[str, Any] = {"rows": rows * 4, "genes": N_GENES, "density": args.density, "peer": peer,
                               "block_size": args.block_size, "preload_blocks": args.preload_blocks, "runs": {}}
    for kind in args.kinds.split(","):
        paths = files[kind]
        r: dict[str, Any] = {}
        print(f"\n== {kind}: {rows * 4:,} rows x {N_GENES} genes, CSR {args.density:.0%} ==", flush=True)
        for impl in ([peer] if peer else []) + ["dask_loom"]:
            r[f"getitem_{impl}"] = measure(run_getitem, kind, paths, args.getitem_items, impl)
        if peer:
            r[f"dataloader_{peer}"] = measure(run_dataloader, kind, paths, peer, args.peer_batches)
        ours = args.our_batches or None
        r["dataloader_dask_loom"] = measure(run_dataloader, kind, paths, "dask_loom", ours)
        r["iter_batches"] = measure(run_iter_batches, kind, paths, args.block_size, args.preload_blocks)
        r["iterable_dataloader"] = measure(run_iterable_loader, kind, paths, ours)
        r["floor_read"] = measure(run_floor, kind, paths, False)
        r["floor_read_densify"] = measure(run_floor, kind, paths, True)
        r["diversity"] = diversity(paths, args.block_size, args.preload_blocks)
        ips = {k: v["result"]["items_per_s"] for k, v in r.items() if isinstance(v, dict) and v.get("result")}
        ratios = {}
        if peer:
            ratios["getitem_vs_lamindb"] = ips["getitem_dask_loom"] / ips[f"getitem_{peer}"]
            ratios["dataloader_vs_lamindb"] = ips["dataloader_dask_loom"] / ips[f"dataloader_{peer}"]
            ratios["iter_batches_vs_lamindb"] = ips["iter_batches"] / ips[f"dataloader_{peer}"]
        ratios["iter_batches_vs_floor_densify"] = ips["iter_batches"] / ips["floor_read_densify"]
        ratios["floor_densify_over_iter_batches"] = ips["floor_read_densify"] / ips["iter_batches"]
        r["ratios"] = ratios
        results["runs"][kind] = r
        print(f"{'run':<28} {'items/s':>12} {'wall s':>8} {'peak RSS MiB':>13}")
        for k, v in r.items():
            if isinstance(v, dict) and v.get("result"):
                print(f"{k:<28} {v['result']['items_per_s']:>12,.0f} {v['wall']:>8.2f} {v['peak_rss'] / 2**20:>13.0f}")
        print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
        print("label entropy per batch:", {k: round(v, 3) for k, v in r["diversity"].items()})
    name = "mapped_small" if args.small else "mapped"
    print("\nwrote", save(name, results))


if __name__ == "__main__":
    main()
