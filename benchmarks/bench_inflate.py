"""Inflating loompy's chunks: every zlib binding on 1 and 2 threads (issue 11).

Reads the first 40,000 stored chunks of the map benchmark's file (loompy's 64 x 64
float32 chunks, gzip level 2, about 1 KiB each compressed, 16 KiB decoded) into
memory, then inflates all of them into one reused buffer with each binding, on
one thread and on two threads sharing the work.  Timed inside one process after
the chunks are loaded (a decoder comparison, not a user figure); best of 5.

    python benchmarks/bench_inflate.py           # chunks of the 20,000 x 50,000 file
    python benchmarks/bench_inflate.py --small   # chunks of the 4,000 x 10,000 file
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import relative, save
from bench_loom_map import bench_file

N_CHUNKS = 40_000


def load_chunks(path: str) -> tuple[list[bytes], int]:
    import h5py

    with h5py.File(path, "r") as f:
        d = f["matrix"]
        nbytes = int(np.prod(d.chunks)) * d.dtype.itemsize
        raws = []
        for i in range(0, d.shape[0], d.chunks[0]):
            for j in range(0, d.shape[1], d.chunks[1]):
                raws.append(d.id.read_direct_chunk((i, j))[1])
                if len(raws) == N_CHUNKS:
                    return raws, nbytes
    return raws, nbytes


def _joined(decode: Callable[[bytes], Any]) -> Callable[[list[bytes], np.ndarray, int], None]:
    # Bindings that return a new bytes object per chunk: decode, then copy into the buffer.
    def run(raws: list[bytes], out: np.ndarray, nbytes: int) -> None:
        np.concatenate([np.frombuffer(decode(r), np.uint8) for r in raws], out=out[: len(raws) * nbytes])

    return run


def bindings(nbytes: int) -> dict[str, Callable[[list[bytes], np.ndarray, int], None]]:
    import deflate

    from dask_loom.hdf5 import _inflate
    from dask_loom.hdf5._inflate import inflate_into

    def per_chunk(raws: list[bytes], buf: np.ndarray, n: int) -> None:
        saved, _inflate._BATCH = _inflate._BATCH, None  # the route used where the extension is not built
        try:
            inflate_into(raws, buf, n)
        finally:
            _inflate._BATCH = saved

    out: dict[str, Callable[[list[bytes], np.ndarray, int], None]] = {
        "dask_loom compiled loop (libdeflate, one GIL release per block)": lambda raws, buf, n: inflate_into(raws, buf, n),
        "dask_loom per chunk (libdeflate via ctypes, GIL released)": per_chunk,
        "deflate.zlib_decompress (libdeflate, GIL held)": _joined(lambda r: deflate.zlib_decompress(r, nbytes)),
        "zlib (stdlib)": _joined(zlib.decompress),
    }
    try:
        from numcodecs import Zlib

        codec = Zlib()
        out["numcodecs.Zlib"] = _joined(codec.decode)
    except ImportError:  # pragma: no cover
        pass
    for name, mod, attr in (("isal", "isal.isal_zlib", "decompress"), ("zlib-ng", "zlib_ng.zlib_ng", "decompress")):
        try:
            fn = getattr(__import__(mod, fromlist=[attr]), attr)
        except ImportError:
            continue
        out[name] = _joined(fn)
    try:
        import imagecodecs

        def imc(raws: list[bytes], buf: np.ndarray, n: int) -> None:
            mv = memoryview(buf).cast("B")
            for k, r in enumerate(raws):
                imagecodecs.deflate_decode(r, out=mv[k * n : (k + 1) * n])

        out["imagecodecs.deflate_decode (libdeflate)"] = imc
    except ImportError:
        pass
    return out


def time_binding(fn: Callable[[list[bytes], np.ndarray, int], None], raws: list[bytes], nbytes: int, threads: int) -> float:
    batch = 4096  # about one 64 MiB dask block of 16 KiB chunks
    batches = [raws[i : i + batch] for i in range(0, len(raws), batch)]
    bufs = [np.empty(batch * nbytes, np.uint8) for _ in range(threads)]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()

        def work(i: int) -> None:
            for b in batches[i::threads]:
                fn(b, bufs[i], nbytes)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return best / len(raws) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    path = bench_file(args.small)
    raws, nbytes = load_chunks(path)
    rows: dict[str, dict[str, float]] = {}
    for name, fn in bindings(nbytes).items():
        one = time_binding(fn, raws, nbytes, 1)
        two = time_binding(fn, raws, nbytes, 2)
        rows[name] = {"us_per_chunk_1_thread": one, "us_per_chunk_2_threads": two, "scaling": one / two}
        print(f"{name:<52} 1 thread {one:6.2f} us/chunk   2 threads {two:6.2f} us/chunk   x{one / two:.2f}", flush=True)
    info = {"name": os.path.basename(path), "path": relative(path), "chunks": len(raws), "decoded_bytes_per_chunk": nbytes}
    print("results:", save("inflate" + ("_small" if args.small else ""), {"file": info, "rows": rows}))


if __name__ == "__main__":
    main()
