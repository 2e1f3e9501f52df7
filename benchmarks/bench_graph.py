"""Graph construction cost for a huge layer: 30,000 x 2,000,000 float32, 64x64 chunks (14.6 M chunks).

The file is created with every chunk unallocated (instant, a few KB on disk); nothing in graph
construction may cost time in proportion to the number of stored chunks.  Prints the time to
build (not compute) the graphs of ``ds.layers[""].dask``, ``ds.map([mean, std])`` (both axes),
``aggregate`` and ``scan``, and the task counts.

    python benchmarks/bench_graph.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import save


def main() -> None:
    import dask_loom

    n, m = 30_000, 2_000_000
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "huge.loom")
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "matrix",
            shape=(n, m),
            dtype="f4",
            chunks=(64, 64),
            compression="gzip",
            compression_opts=2,
            maxshape=(n, None),
        )
        for g in ("layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs", "attrs"):
            f.create_group(g)
        f["row_attrs/Gene"] = np.arange(n)
        f["col_attrs/Clusters"] = np.arange(m) % 20
        f["attrs/LOOM_SPEC_VERSION"] = "3.0.0"
    out = {}
    with dask_loom.connect(path, "r") as ds:
        t0 = time.perf_counter()
        x = ds.layers[""].dask
        out["dask_array_s"] = time.perf_counter() - t0
        out["dask_array_tasks"] = x.npartitions
        from dask_loom.ops._map import map_graph

        src = ds.__dask_loom_layer_host__().source("")
        for axis in (0, 1):
            t0 = time.perf_counter()
            dsk, _, _ = map_graph(src, [np.mean, np.std], axis=axis)
            out[f"map_axis{axis}_graph_s"] = time.perf_counter() - t0
            out[f"map_axis{axis}_tasks"] = len(dsk)
        t0 = time.perf_counter()
        it = ds.scan(axis=1, batch_size=512)
        out["scan_setup_s"] = time.perf_counter() - t0
        del it
    bytes_total = n * m * 4
    out["chunks"] = (n // 64 + 1) * (m // 64 + 1)
    out["tasks_per_gib"] = out["dask_array_tasks"] / (bytes_total / 2**30)
    for k, v in out.items():
        print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    print("results:", save("graph", {"rows": {}, "ratios": out}))


if __name__ == "__main__":
    main()
