"""Graphs whose reads wait on an object store run on more threads than cores.

On two cores, two tasks each waiting for its shard leave both cores idle for
the request's round trip; with ``dask_loom.remote-threads`` (default two per
core) another task decodes meanwhile.  What is checked: which pool a graph
gets (:func:`dask_loom.cluster.thread_pool`), which sources count as waiting
(:func:`dask_loom.blocks._readahead.reads_wait`), and, through the counting
proxy, that a map over a sharded ``.loom.zarr`` on the S3 server keeps more
requests in flight than the pool of cores would, with values equal to numpy.
"""

from __future__ import annotations

import math
import os
import uuid

import dask
import numpy as np
import pytest

import dask_loom
from dask_loom.blocks._readahead import reads_wait
from dask_loom.cluster import thread_pool

CORES = os.cpu_count() or 1


def test_pool_sizes_follow_the_settings():
    assert thread_pool()._max_workers == CORES
    assert thread_pool(waits=True)._max_workers == 2 * CORES
    assert thread_pool(waits=True) is thread_pool(waits=True)
    with dask.config.set({"dask_loom.remote-threads": 3, "dask_loom.threads": 1}):
        assert thread_pool(waits=True)._max_workers == 3
        assert thread_pool()._max_workers == 1


def test_which_sources_wait(tmp_path, s3_server):
    import s3fs

    m = np.arange(64 * 96, dtype="f4").reshape(64, 96)
    loom, zarr_dir = tmp_path / "a.loom", tmp_path / "a.loom.zarr"
    for fn in (loom, zarr_dir):
        dask_loom.create(str(fn), m, {"g": np.arange(64)}, {"c": np.arange(96)}, scheduler="sync")
    fs = s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True)
    prefix = f"{s3_server['bucket']}/{uuid.uuid4().hex}"
    fs.put(str(loom), f"{prefix}/a.loom")
    fs.put(str(zarr_dir), f"{prefix}/a.loom.zarr", recursive=True)
    opts = s3_server["storage_options"]
    cases = [(str(loom), None, False), (str(zarr_dir), None, False),
             (f"s3://{prefix}/a.loom", opts, True), (f"s3://{prefix}/a.loom.zarr", opts, True)]  # fmt: skip
    for url, so, waits in cases:
        with dask_loom.connect(url, "r", storage_options=so, validate=False) as ds:
            assert reads_wait(ds.__dask_loom_layer_host__().source("")) is waits, url
            np.testing.assert_array_equal(ds.map([np.sum], axis=0)[0], m.sum(axis=1, dtype=np.float64))
    # A remote .loom whose chunks the opening and the chunk-index read hold in memory waits for
    # nothing (more threads would only hold more blocks); one whose index read held none of its
    # chunks (no bytes to spare for holes, the chunks past the metadata blocks) waits for each.
    from dask_loom.hdf5._files import clear_all

    big = (np.random.default_rng(1).random((1024, 2048)) * 100).astype("f4")  # 8 MiB, incompressible
    dask_loom.create(
        str(tmp_path / "b.loom"), big, {"g": np.arange(1024)}, {"c": np.arange(2048)}, scheduler="sync"
    )
    fs.put(str(tmp_path / "b.loom"), f"{prefix}/b.loom")
    for waste, waits in (("64MiB", False), (0, True)):
        clear_all()
        with dask.config.set({"dask_loom.index-read-waste": waste}):
            with dask_loom.connect(f"s3://{prefix}/b.loom", "r", storage_options=opts, validate=False) as ds:
                src = ds.__dask_loom_layer_host__().source("")
                src.chunk_index()
                assert reads_wait(src) is waits, waste
                got = ds.map([np.sum], axis=0)[0]
        np.testing.assert_allclose(got, big.sum(axis=1, dtype=np.float64), rtol=1e-6)


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.parametrize("remote_threads", [2, 4])
def test_map_on_s3_keeps_requests_in_flight_past_the_cores(
    tmp_path, s3_server, s3_proxy, remote_threads, monkeypatch
):
    import threading

    import s3fs

    from dask_loom.zarr._chunks import ZarrChunkReader

    lock, now, most = threading.Lock(), [0], [0]
    fetch = ZarrChunkReader._raws

    def counted(self, coords):  # the shard requests of one task, counted while they wait
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            return fetch(self, coords)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(ZarrChunkReader, "_raws", counted)

    rng = np.random.default_rng(3)
    m = (rng.random((512, 2048)) * 100).astype("f4")  # incompressible: shards of about 512 KiB
    fn = tmp_path / "w.loom.zarr"
    small = {"dask_loom.block-size": "512KiB"}
    with dask.config.set({**small, "dask_loom.coalesce-bytes": "64KiB"}):  # shards of block-size, not grown
        dask_loom.create(str(fn), m, {"g": np.arange(512)}, {"c": np.arange(2048)}, scheduler="sync")
    shards = [p for p in (fn / "matrix" / "c").rglob("*") if p.is_file()]
    assert len(shards) >= 6
    key = f"{s3_server['bucket']}/{uuid.uuid4().hex}/w.loom.zarr"
    s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True).put(
        str(fn), key, recursive=True
    )
    proxy = s3_proxy(latency=0.1)
    groups = np.arange(2048) % 7
    cfg = {**small, "dask_loom.threads": 2, "dask_loom.remote-threads": remote_threads}
    with (
        dask.config.set(cfg),
        dask_loom.connect(f"s3://{key}", "r", storage_options=proxy.storage_options) as ds,
    ):
        proxy.reset_counts()
        most[0] = 0
        mean, sd = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        snap = proxy.snapshot()
        sums = ds.aggregate(group_by=groups, aggr_by="sum", scheduler="threads")
    np.testing.assert_allclose(mean, m.mean(axis=1, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(sd, m.std(axis=1, dtype=np.float64), rtol=1e-5)
    want = np.stack([m[:, groups == g].sum(axis=1, dtype=np.float64) for g in range(7)], axis=1)
    np.testing.assert_allclose(sums, want, rtol=1e-5)
    # One request per shard (its index with it), no more for the extra threads.
    assert snap["total_requests"] == len(shards), snap
    # Each waiting 0.1 s: as many tasks waiting at once as the pool has threads.
    if remote_threads == 2:
        assert most[0] <= 2, most
    else:
        assert most[0] >= 3, most


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.parametrize("faults", [0, 3])
def test_map_on_s3_fetches_shards_ahead_once(tmp_path, s3_server, s3_proxy, monkeypatch, faults):
    """Each task of a map over a remote ``.loom.zarr`` starts fetching the shard of the task a pool's width later.

    The later task takes those bytes instead of asking the store: one request
    per shard still, none left unread (a prefetch in the wrong order would be
    a second request for a shard read already, and an entry never taken).
    A prefetch that fails (503s) leaves its shard to the task, which reads it
    as usual.
    """
    import s3fs

    from dask_loom.zarr import _chunks

    asked: list[int] = []
    readers: set[_chunks.ZarrChunkReader] = set()
    real = _chunks.ZarrChunkReader.prefetch

    def counting(self, region):
        asked.append(math.prod(r.stop - r.start for r in region))
        readers.add(self)
        return real(self, region)

    monkeypatch.setattr(_chunks.ZarrChunkReader, "prefetch", counting)
    rng = np.random.default_rng(4)
    m = (rng.random((1024, 4096)) * 100).astype("f4")  # incompressible: shards of about 512 KiB
    fn = tmp_path / "p.loom.zarr"
    small = {"dask_loom.block-size": "512KiB"}
    with dask.config.set({**small, "dask_loom.coalesce-bytes": "64KiB"}):
        dask_loom.create(str(fn), m, {"g": np.arange(1024)}, {"c": np.arange(4096)}, scheduler="sync")
    shards = [p for p in (fn / "matrix" / "c").rglob("*") if p.is_file()]
    assert len(shards) == 32
    key = f"{s3_server['bucket']}/{uuid.uuid4().hex}/p.loom.zarr"
    s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True).put(str(fn), key, recursive=True)
    proxy = s3_proxy(latency=0.02)
    with (
        dask.config.set({**small, "dask_loom.remote-threads": 4, "dask_loom.retry-backoff": 0.01}),
        dask_loom.connect(f"s3://{key}", "r", storage_options=proxy.storage_options) as ds,
    ):
        proxy.reset_counts()
        proxy.inject("503", faults)
        mean, sd = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        snap = proxy.snapshot()
    np.testing.assert_allclose(mean, m.mean(axis=1, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(sd, m.std(axis=1, dtype=np.float64), rtol=1e-5)
    # Every task but the last wave's (4 threads) fetched the shard of a later one ahead.
    assert asked == [128 * 1024] * (len(shards) - 4), asked
    # One request per shard; a failed GET is followed by a HEAD (is the object empty?) and asked again.
    assert snap["requests"]["GET"] == len(shards) + faults and snap["requests"].get("HEAD", 0) == faults, snap
    assert readers and all(not r._ahead for r in readers)


@pytest.mark.timeout(60)
def test_a_fetch_ahead_of_another_process_is_not_waited_for(tmp_path):
    """A forked child inherits the entries of fetches its parent's threads were making: it reads itself."""
    from concurrent.futures import Future

    m = np.arange(128 * 256, dtype="f4").reshape(128, 256)
    fn = tmp_path / "f.loom.zarr"
    with dask.config.set({"dask_loom.loom-zarr-chunks": [64, 64]}):
        dask_loom.create(str(fn), m, {"g": np.arange(128)}, {"c": np.arange(256)}, scheduler="sync")
    with dask_loom.connect(str(fn), "r") as ds:
        src = ds.__dask_loom_layer_host__().source("")
        reader = src.reader()
        region = (slice(0, 64), slice(0, 128))
        never: Future = Future()  # the parent's fetch: never finished in this process
        reader._ahead[reader._whole_coords(region).tobytes()] = (os.getpid() + 1, never)
        got = src.read_block(region)
        assert not reader._ahead
        np.testing.assert_array_equal(got, m[region])
        staged = next(reader.staged_pieces(region, whole=True))
        assert staged.shape[:2] == (1, 2)


def test_pools_of_both_sizes_share_one_set_of_threads():
    import threading

    from dask_loom._threads import SchedulerThreads

    threads = SchedulerThreads(name="test-lanes")
    small, big = threads.pool(2), threads.pool(4)
    assert small is threads.pool(2) and (small._max_workers, big._max_workers) == (2, 4)

    def together(pool, n):
        # n tasks that can only finish when all n run at once
        barrier = threading.Barrier(n, timeout=10)
        names = [pool.submit(lambda: (barrier.wait(), threading.current_thread().name)[1]) for _ in range(n)]
        return {f.result(timeout=20) for f in names}

    assert len(together(small, 2)) == 2 and threads.started == 2
    # The larger pool starts only the two threads it lacks (two pools held six before).
    assert len(together(big, 4)) == 4 and threads.started == 4
    assert together(small, 2) <= {f"test-lanes_{i}" for i in range(4)} and threads.started == 4
    # A pool never starts more threads than its size, however many tasks wait.
    fresh = SchedulerThreads(name="test-lanes-fresh")
    assert sum(f.result(timeout=20) for f in [fresh.pool(2).submit(abs, -i) for i in range(200)]) == sum(range(200))
    assert fresh.started <= 2
    with pytest.raises(ZeroDivisionError):
        fresh.pool(2).submit(lambda: 1 / 0).result(timeout=20)
    assert fresh.pool(2).submit(abs, -3).result(timeout=20) == 3  # the thread survived the error
