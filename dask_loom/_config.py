"""dask_loom's configuration: one ``dask.config`` namespace, ``dask_loom.*``.

Every key can also be set through a ``DASK_LOOM_<KEY>`` environment variable
(``-`` written as ``_``), e.g. ``DASK_LOOM_BLOCK_SIZE=128MiB`` or
``DASK_LOOM_SCHEDULER=tcp://10.0.0.5:8786``.  dask's own ``DASK_DASK_LOOM__…``
spelling works too, since these are ordinary dask config keys.
"""

from __future__ import annotations

import ast
import os
from typing import Any

import dask
import dask.config
from dask.utils import parse_bytes

__all__ = ["DEFAULTS", "block_size_bytes", "config_bytes", "get_config"]

DEFAULTS: dict[str, Any] = {
    # Target bytes per dask block; 64 MiB measured best on 2-core machines
    # (see benchmarks/ and reference/performance.md).
    "block-size": "64MiB",
    # How many scan batches are read ahead of the one the caller works on.
    "scan-prefetch": 2,
    # A scheduler address to use when no distributed Client is active.
    "scheduler": None,
    # The embedded default: "auto" runs graphs on a thread pool of our own (chunks
    # inflate without the GIL, so threads use every core and nothing starts up), or
    # synchronously inside a dask worker; "threads" always uses the pool; "local"
    # starts a process LocalCluster on first use (embedded-workers processes).
    "embedded": "auto",
    "embedded-workers": None,
    # Threads of the embedded pool (None: one per core).
    "threads": None,
    # Threads of the embedded pool for graphs whose reads wait on an object store (None: two
    # per core): while one task waits for its request, another decodes on the core.  Each extra
    # thread holds a block in flight; a remote HDF5 file already held in memory keeps one per core.
    "remote-threads": None,
    # Datasets with at most this many chunks get their whole chunk index built
    # once per process; larger ones are indexed block by block inside tasks.
    "index-max-chunks": 1_048_576,
    # Thread pool size for ZarrArray.get_chunk_future and similar helpers.
    "io-threads": 32,
    # A block read from a store whose requests wait (object stores) is read as this many
    # sub-blocks at once, so one decodes while the others' requests are in flight; the
    # requests in flight stay within zarr's async.concurrency (blocks/_readahead.py).
    # 1 reads each block in one call.  Unsharded Zarr chunks stream instead (no sub-blocks).
    "read-ahead": 4,
    # Compressor of arrays in .loom.zarr containers: blosc-lz4hc, blosc-lz4, blosc-zstd, blosc-zlib,
    # blosc-blosclz, zstd, gzip or none (blosc: clevel 5, byte shuffle).  lz4hc decodes counts
    # 2.3-2.5x faster than blosc-zstd (2.9 against 1.2 GiB/s a core, uint16 and float32 layers of
    # 90 % zeros) and encodes faster, storing 35-57 % more: a map over a layer is decode-bound, on
    # disk and on an object store alike (docs/zarr.md, "Codec").
    "zarr-codec": "blosc-lz4hc",
    # Inner chunk shape of the sharded layers of a .loom.zarr (shards of about block-size
    # are made of them).  256 x 256 with blosc-lz4hc (benchmarks/bench_cloud_zarr.py (a), the
    # float32 layer): map 0.10 s on disk and 0.17 s on S3, against 0.14 / 0.25 s for 128 x 128 and
    # 0.27 / 0.47 s for 64 x 64 (512 x 512: 0.09 / 0.24 s); the atlas's uint16 layer on a cluster
    # (bench_atlas.py --chunks) maps in 1.6 / 0.8 s on 1 / 2 workers against 1.6 / 1.0 s, and is
    # written 2x faster (zarr-python encodes a shard chunk by chunk).  It was kept out while a
    # nanny's MALLOC_TRIM_THRESHOLD_ made every decoded chunk of 128 KiB or more an mmap (then 1.5x /
    # 2x slower); the first block a worker reads now lifts that (dask_loom/_allocator.py).
    "loom-zarr-chunks": [256, 256],
    # Reads of byte ranges on object stores (HDF5 .loom chunks, chunk-index pages): neighbouring
    # ranges are merged into one ranged request of about coalesce-bytes (a run is cut into
    # round(run / coalesce-bytes) pieces, so no small tail request), reading through holes of up
    # to coalesce-gap (at tens of ms per request and >= 100 MB/s, a 1 MiB hole costs less than a
    # request); the requests of one task are sent at once.  Local files read with pread.
    "coalesce-bytes": "4MiB",
    "coalesce-gap": "1MiB",
    # The chunk B-tree of a remote HDF5 dataset is read a level at a time; its pages lie between
    # chunks, so reading through the holes between them (the smallest first, each at most
    # coalesce-gap) may add at most this many bytes per level: a small file is fetched in a few
    # large requests, a large one costs more requests but never a download of most of the file.
    # The chunks read through are held for the chunk reads that follow (hdf5/_spans.py), each
    # served once, so this also bounds the memory they take until then.  When all the holes
    # pass it by at most an eighth, all are read (the rest would each cost a task a round trip).
    # The leaf level streams in: a block's lookup waits for its own pages only (_btree.py).
    "index-read-waste": "64MiB",
    # A remote HDF5 dataset's chunk index (built once, in few requests, when a source is made)
    # travels inside the graph when encoded it is at most this big, so workers need not
    # rebuild it; larger indexes are rebuilt once per worker process.
    "index-ship-bytes": "2MiB",
    # Retries for transient object-store errors.
    "retries": 5,
    "retry-backoff": 0.2,
    # Upper bound on attribute / metadata sizes read from files (bytes).
    "max-metadata-bytes": "1GiB",
    # Upper bounds on what a file's declared sizes may make us plan or allocate: dask blocks
    # of one array, and bytes of one stored chunk (a damaged or hostile file is refused).
    "max-blocks": 10_000_000,
    "max-chunk-bytes": "4GiB",
    # Chunk shape of layers dask_loom creates (loompy's default is 64 x 64).
    "loom-chunks": [64, 64],
    # MappedCollection.iter_batches: rows per shuffled block, blocks read (and
    # shuffled) together, and fetches read ahead in the background.
    "loader-block-size": 256,
    "loader-preload-blocks": 32,
    "loader-prefetch": 2,
    # MappedCollection on zarr: read chunks by byte range (cached shard indexes)
    # and decode them with numcodecs instead of going through zarr-python.
    "anndata-zarr-direct": True,
    # Seconds to wait when connecting to a scheduler address.
    "connect-timeout": 10,
    # Show a progress bar on every compute (as if progress=True were passed), and
    # how long a local compute runs before dask's text bar appears (seconds).
    "progress": False,
    "progress-minimum": 1.0,
    # Seconds a writer waits for another writer to release an HDF5 file.
    "write-timeout": 60,
    # Every write through a Loom connection is a transaction (HDF5: copy-on-write of the
    # file; local Zarr: a hard-linked copy swapped in).  False writes attributes, graphs and
    # regions in place: faster on large files, but a crash during such a write can corrupt them.
    "atomic-writes": True,
    # Target bytes of one OME-Arrow chunk the writers choose (a Z slab of square YX tiles).
    "ome-chunk-bytes": "2MiB",
    # Whole single-record OME-Parquet images kept in memory per process for block reads.
    "ome-record-cache": 2,
    # Per-block sparse kernels (dense chunks to CSR, per-gene statistics, Gram matrices):
    # "auto" compiles them with numba where it is installed (the analysis extra brings it),
    # "numpy" always uses the vectorised numpy versions, "numba" requires numba.
    "kernels": "auto",
}

_ENV_PREFIX = "DASK_LOOM_"


def _from_env() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        key = name[len(_ENV_PREFIX) :].lower().replace("_", "-")
        if key == "test-data":  # test fixture location, not a config key
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


dask.config.update_defaults({"dask_loom": DEFAULTS})
_env = _from_env()
if _env:
    dask.config.set({f"dask_loom.{k}": v for k, v in _env.items()})


def get_config(key: str) -> Any:
    """Return ``dask.config.get("dask_loom.<key>")`` (with the package default)."""
    return dask.config.get(f"dask_loom.{key}", DEFAULTS.get(key))


def block_size_bytes(value: int | str | None = None) -> int:
    """Target block size in bytes, from *value* or ``dask_loom.block-size``."""
    v = get_config("block-size") if value is None else value
    n = parse_bytes(v) if isinstance(v, str) else int(v)
    if n <= 0:
        raise ValueError(f"dask_loom.block-size must be positive, got {v!r}")
    return n


def config_bytes(key: str) -> int:
    """A byte-size key (``"4MiB"`` or an int) as a non-negative int."""
    v = get_config(key)
    n = parse_bytes(v) if isinstance(v, str) else int(v)
    if n < 0:
        raise ValueError(f"dask_loom.{key} must not be negative, got {v!r}")
    return n
