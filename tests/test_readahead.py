"""Read-ahead of blocks on stores whose requests wait (blocks/_readahead.py).

Checked against numpy on the same data, and by what the store sees: the
requests in flight never exceed zarr's ``async.concurrency`` and reach it,
and chunks are decoded while other requests are still in flight (the plain
read decodes only after its last request: the assertion tells them apart).
No assertion on absolute speed.
"""

from __future__ import annotations

import itertools
import threading
from typing import ClassVar

import dask
import numpy as np
import pytest
import zarr

import dask_loom
from dask_loom.blocks._readahead import latency_bound, read_ahead, sub_blocks
from dask_loom.stores import LocalStore, MemoryStore, SlowStore


class _Counting(SlowStore):
    """A SlowStore that counts requests in flight (class-wide: opening read-only makes a copy)."""

    lock = threading.Lock()
    active = 0
    peak = 0
    started = 0

    @classmethod
    def reset(cls) -> None:
        cls.active = cls.peak = cls.started = 0

    async def _aget(self, key, req=None):
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.started += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            return await super()._aget(key, req)
        finally:
            with cls.lock:
                cls.active -= 1


def _array(store, shape, chunks, dtype="f8", seed=0):
    ref = np.random.default_rng(seed).random(shape).astype(dtype)
    inner = MemoryStore()
    zarr.create_array(inner, name="a", shape=shape, chunks=chunks, dtype=dtype)[:] = ref
    return store(inner), ref


@pytest.mark.parametrize(
    ("region", "unit", "per_tile"),
    [
        ((slice(0, 100), slice(0, 70)), (16, 16), 4),
        ((slice(32, 100), slice(16, 70)), (16, 16), 3),
        ((slice(0, 5), slice(0, 9), slice(0, 11)), (2, 4, 3), 5),
        ((slice(0, 64),), (8,), 3),
        ((slice(0, 10), slice(0, 10)), (16, 16), 8),
    ],
)
def test_sub_blocks_tile_the_region_exactly(region, unit, per_tile):
    tiles = sub_blocks(region, unit, per_tile)
    hits = np.zeros(tuple(r.stop for r in region), dtype=int)
    for t in tiles:
        # whole stored chunks (or the region's edge), at most per_tile of them
        for s, r, u in zip(t, region, unit):
            assert (s.start - r.start) % u == 0
            assert s.stop == r.stop or (s.stop - r.start) % u == 0
        assert np.prod([-(-(s.stop - s.start) // u) for s, u in zip(t, unit)]) <= per_tile
        hits[t] += 1
    inside = hits[tuple(region)]
    assert (inside == 1).all() and hits.sum() == inside.size


@pytest.mark.parametrize(
    "region",
    [(slice(0, 640), slice(0, 999)), (slice(128, 1000), slice(64, 999)), (slice(0, 1000), slice(0, 999))],
)
def test_read_ahead_matches_numpy(region):
    store, ref = _array(lambda s: SlowStore(s, base_delay=0.002), (1000, 999), (64, 64))
    src = dask_loom.open_zarr(store, "a", mode="r").source()
    assert latency_bound(src)
    with zarr.config.set({"async.concurrency": 8}):
        np.testing.assert_array_equal(read_ahead(src, region), ref[region])
        shape = tuple(r.stop - r.start for r in region)
        buf = np.full(shape[0] * shape[1] + 7, -1.0)
        out = buf[: shape[0] * shape[1]].reshape(shape)
        assert read_ahead(src, region, out) is out
        np.testing.assert_array_equal(out, ref[region])
        assert (buf[-7:] == -1).all()  # nothing written outside the block


def test_through_to_dask_and_map():
    store, ref = _array(lambda s: SlowStore(s, base_delay=0.002), (600, 500), (50, 50), dtype="u2")
    z = dask_loom.open_zarr(store, "a", mode="r")
    with zarr.config.set({"async.concurrency": 6}):
        x = z.to_dask()
        assert x.numblocks == (1, 1)  # one block of 120 chunks: read ahead inside the task
        np.testing.assert_array_equal(x.compute(scheduler="threads"), ref)
        mean, std = dask_loom.map(z, [np.mean, np.std], axis=0, scheduler="threads")
    np.testing.assert_allclose(mean, ref.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=1), rtol=1e-12)


def test_local_and_memory_stores_read_in_one_call(tmp_path):
    for store in (MemoryStore(), LocalStore(tmp_path / "a.zarr")):
        zarr.create_array(store, name="a", shape=(64, 64), chunks=(8, 8), dtype="i4")[:] = np.arange(
            64 * 64
        ).reshape(64, 64)
        assert not latency_bound(dask_loom.open_zarr(store, "a", mode="r").source())


def _decode_watch(monkeypatch, store):
    """Record the requests in flight each time a chunk is decoded."""
    from dask_loom.zarr._chunks import ZarrChunkReader

    seen: list[int] = []
    decode = ZarrChunkReader._decode

    def watched(self, raw, coords):
        seen.append(store.active)
        return decode(self, raw, coords)

    monkeypatch.setattr(ZarrChunkReader, "_decode", watched)
    return seen


def test_in_flight_within_the_limit_and_decoding_overlaps_requests(monkeypatch):
    # The latency benchmark's layout: 256 chunks behind 50 ms, 32 requests at a time.
    from dask_loom.zarr._chunks import ZarrChunkReader

    store, ref = _array(lambda s: _Counting(s, base_delay=0.05), (1024, 1024), (64, 64))
    src = dask_loom.open_zarr(store, "a", mode="r").source()
    region = (slice(0, 1024), slice(0, 1024))
    seen = _decode_watch(monkeypatch, _Counting)
    with zarr.config.set({"async.concurrency": 32}):
        # Unsharded chunks on a store whose requests wait: the block's chunks are asked for
        # at once, 32 in flight until the last, each decoded as it arrives, whatever read-ahead says.
        assert src.streams_chunks
        for readers in (1, 4, 5):
            _Counting.reset()
            seen.clear()
            with dask.config.set({"dask_loom.read-ahead": readers}):
                np.testing.assert_array_equal(read_ahead(src, region), ref)
            assert _Counting.peak == 32 and _Counting.started == 256, readers
            overlapped = sum(1 for n in seen if n > 0)
            assert len(seen) == 256 and overlapped >= 224, (readers, overlapped)
            # Requests are never waited for in waves: 32 stay in flight while 224 remain to start.
            assert sorted(seen[:200])[len(seen[:200]) // 2] >= 24, seen[:200]

        # A source that does not stream (e.g. sharded): read in one call, or as sub-blocks.
        monkeypatch.setattr(ZarrChunkReader, "streams", property(lambda self: False))
        src = dask_loom.open_zarr(store, "a", mode="r").source()
        assert not src.streams_chunks
        _Counting.reset()
        seen.clear()
        with dask.config.set({"dask_loom.read-ahead": 1}):
            np.testing.assert_array_equal(read_ahead(src, region), ref)
        # Read in one call: 32 in flight, and every chunk decoded after the last request.
        assert _Counting.peak == 32 and _Counting.started == 256
        assert len(seen) == 256 and max(seen) == 0
        for readers in (4, 8, 5):
            _Counting.reset()
            seen.clear()
            with dask.config.set({"dask_loom.read-ahead": readers}):
                np.testing.assert_array_equal(read_ahead(src, region), ref)
            per_tile = 32 // readers
            limit = (32 // per_tile) * per_tile  # readers x chunks per sub-block: 32, 32, 30
            assert _Counting.peak <= limit, (readers, _Counting.peak)
            assert _Counting.peak >= limit - per_tile, (readers, _Counting.peak)
            # Most chunks are decoded while other sub-blocks' requests are in flight.
            overlapped = sum(1 for n in seen if n > 0)
            assert len(seen) == 256 and overlapped >= 128, (readers, overlapped)


def test_errors_of_a_sub_block_surface(monkeypatch):
    from dask_loom.errors import CorruptChunkError

    store, _ = _array(lambda s: SlowStore(s, base_delay=0.001), (256, 256), (32, 32))
    store._store.set("a/c/3/5", b"not zstd")
    src = dask_loom.open_zarr(store, "a", mode="r").source()
    with (
        zarr.config.set({"async.concurrency": 8}),
        pytest.raises(CorruptChunkError, match=r"chunk 'a/c/3/5'"),
    ):
        read_ahead(src, (slice(0, 256), slice(0, 256)))


def test_sub_blocks_cover_every_chunk_once_for_many_shapes():
    for shape, unit, per in itertools.product(
        [(7, 9), (16, 16), (33, 5)], [(2, 3), (4, 4), (1, 5)], [1, 2, 5, 40]
    ):
        region = tuple(slice(0, s) for s in shape)
        tiles = sub_blocks(region, unit, per)
        hits = np.zeros(shape, dtype=int)
        for t in tiles:
            hits[t] += 1
        assert (hits == 1).all(), (shape, unit, per)


class _Flaky(SlowStore):
    """A SlowStore whose first request for each key in ``flaky`` fails as a dropped connection."""

    flaky: ClassVar[set[str]] = set()
    failed: ClassVar[list[str]] = []

    async def _aget(self, key, req=None):
        if key in type(self).flaky:
            type(self).flaky.discard(key)
            type(self).failed.append(key)
            raise ConnectionResetError(f"connection dropped reading {key}")
        return await super()._aget(key, req)


def test_streamed_block_fills_missing_chunks_and_retries_dropped_requests():
    store, ref = _array(lambda s: _Flaky(s, base_delay=0.002), (256, 256), (32, 32))
    store._store.erase("a/c/1/2")
    ref[32:64, 64:96] = 0  # a missing chunk reads as the fill value
    src = dask_loom.open_zarr(store, "a", mode="r").source()
    assert src.streams_chunks
    _Flaky.flaky = {"a/c/0/0", "a/c/7/7", "a/c/3/4"}
    _Flaky.failed = []
    with zarr.config.set({"async.concurrency": 8}), dask.config.set({"dask_loom.retry-backoff": 0.001}):
        np.testing.assert_array_equal(read_ahead(src, (slice(0, 256), slice(0, 256))), ref)
    assert sorted(_Flaky.failed) == ["a/c/0/0", "a/c/3/4", "a/c/7/7"]


def test_streamed_block_refuses_after_the_retries():
    from dask_loom.errors import StoreError

    class _Down(SlowStore):
        async def _aget(self, key, req=None):
            if key == "a/c/2/2":
                raise ConnectionResetError("down")
            return await super()._aget(key, req)

    store, _ = _array(lambda s: _Down(s, base_delay=0.001), (128, 128), (32, 32))
    src = dask_loom.open_zarr(store, "a", mode="r").source()
    with (
        zarr.config.set({"async.concurrency": 4}),
        dask.config.set({"dask_loom.retry-backoff": 0.001, "dask_loom.retries": 2}),
        pytest.raises(StoreError, match=r"'a/c/2/2' failed after 3 attempts: down"),
    ):
        read_ahead(src, (slice(0, 128), slice(0, 128)))
