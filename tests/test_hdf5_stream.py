"""A remote ``.loom``'s chunk index filled in as its leaf pages arrive (``PendingChunkIndex``).

The levels above the leaves are read first; the leaf pages then come in the
background with the chunks between them, and a block's lookup waits for its
own pages only.  Checked against h5py's own chunk lookup on local files with a
stream whose delivery order the test controls, and end to end through the
request-counting proxy in front of the local S3 server.
"""

from __future__ import annotations

import os
import threading
import time

import dask
import h5py
import numpy as np
import pytest

import dask_loom
from dask_loom.errors import LoomFormatError, StoreError
from dask_loom.hdf5._btree import PendingChunkIndex, chunk_btree, read_chunk_index
from dask_loom.hdf5._files import HELD_SPANS, cached_entry, clear_all
from dask_loom.hdf5._layout import ChunkIndex
from dask_loom.hdf5._spans import HeldSpans
from tests.test_hdf5_remote import _upload, big_loom  # noqa: F401  (big_loom: a fixture)


def _write(path: str, shape: tuple[int, int], chunks: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).random(shape).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=m, chunks=chunks, compression="gzip")
    return m


class _Controlled:
    """A file read with ``pread``, whose leaf pages are delivered only when the test says so."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.pages: list[tuple[int, int]] = []
        self.deliver = None

    def fetch(self, starts: list[int], sizes: list[int]) -> list[bytes]:
        return [os.pread(self.fd, n, s) for s, n in zip(starts, sizes)]

    def stream(self, starts: list[int], sizes: list[int], deliver) -> None:
        self.pages = list(zip(starts, sizes))
        self.deliver = deliver

    def send(self, i: int, *, damage: bool = False) -> None:
        s, n = self.pages[i]
        buf = bytearray(os.pread(self.fd, n, s))
        if damage:
            buf[:4] = b"XXXX"
        self.deliver(i, bytes(buf))

    def index(self, name: str = "x") -> PendingChunkIndex:
        with h5py.File(self.path, "r") as f:
            ds = f[name]
            parent, _, leaf = ds.name.rpartition("/")
            group = f[parent or "/"]  # held: its id closes when the Group object goes
            addr = group.id.links.get_info(leaf.encode()).u
            so, sl = f.id.get_create_plist().get_sizes()
            shape = ds.shape
        info = chunk_btree(
            lambda o, n: os.pread(self.fd, n, o), addr, sizeof_offsets=so, sizeof_lengths=sl, name=self.path
        )
        return read_chunk_index(
            self.fetch,
            info,
            shape=shape,
            file_size=os.path.getsize(self.path),
            name=self.path,
            stream=self.stream,
        )

    def close(self) -> None:
        os.close(self.fd)


def _h5py_offsets(path: str, n: int, grid: tuple[int, ...], chunks: tuple[int, ...]) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    with h5py.File(path, "r") as f:
        ds = f["x"]
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            pos = tuple(int(o) // c for o, c in zip(info.chunk_offset, chunks))
            out[np.ravel_multi_index(pos, grid)] = info.byte_offset
    return out


@pytest.fixture
def two_level(tmp_path):
    """An h5py file whose chunk B-tree has a root above 16+ leaf pages (1,600 chunks)."""
    path = str(tmp_path / "tree.h5")
    _write(path, (400, 400), (10, 10))
    c = _Controlled(path)
    yield c
    c.close()


def _lookup_in_thread(index, coords):
    got: dict = {}

    def run():
        try:
            got["value"] = index.lookup(coords)
        except BaseException as exc:
            got["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_lookup_waits_for_its_own_pages_only(two_level):
    index = two_level.index()
    assert isinstance(index, PendingChunkIndex) and not index.complete
    pages = len(two_level.pages)
    assert pages >= 4
    ref = _h5py_offsets(two_level.path, 1600, (40, 40), (10, 10))
    first_row = np.stack([np.zeros(40, dtype=int), np.arange(40)], axis=1)  # chunks 0..39 in C order
    last_row = np.stack([np.full(40, 39), np.arange(40)], axis=1)
    # Pages arrive in reverse: the last row's lookup goes on as soon as its pages are in,
    # while the first row's still waits.
    t_first, got_first = _lookup_in_thread(index, first_row)
    t_last, got_last = _lookup_in_thread(index, last_row)
    order = list(range(pages))[::-1]
    sent = 0
    while t_last.is_alive():
        assert sent < pages
        two_level.send(order[sent])
        sent += 1
        t_last.join(0.05)
    assert sent < pages and t_first.is_alive() and "value" in got_last
    np.testing.assert_array_equal(got_last["value"][0], ref[1560:1600])
    for i in order[sent:]:
        two_level.send(i)
    t_first.join(5)
    np.testing.assert_array_equal(got_first["value"][0], ref[:40])
    assert index.complete
    np.testing.assert_array_equal(index.offsets, ref)
    assert index.in_c_order()


def test_whole_arrays_wait_for_every_page(two_level):
    index = two_level.index()
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("offsets", index.offsets), daemon=True)
    t.start()
    for i in range(len(two_level.pages) - 1):
        two_level.send(i)
    t.join(0.2)
    assert t.is_alive()  # reading the arrays whole never sees a half-filled index
    two_level.send(len(two_level.pages) - 1)
    t.join(5)
    np.testing.assert_array_equal(got["offsets"], _h5py_offsets(two_level.path, 1600, (40, 40), (10, 10)))
    assert index.encode() == ChunkIndex(index.grid, index.offsets, index.sizes, index.masks).encode()


def test_a_failed_page_fails_lookups_and_never_hangs(two_level):
    index = two_level.index()
    done = []
    index.when_done(done.append)
    t, got = _lookup_in_thread(index, np.array([[39, 39]]))
    two_level.deliver(len(two_level.pages) - 1, StoreError("s3://b/x.loom: range request failed"))
    t.join(5)
    assert not t.is_alive() and isinstance(got["error"], StoreError)
    with pytest.raises(StoreError, match="x.loom"):
        index.lookup(np.array([[0, 0]]))  # even a lookup whose own page would be fine
    assert done == [index] and index.error is not None
    two_level.send(0)  # pages after the failure change nothing
    assert not index.complete


def test_a_damaged_page_raises_a_format_error(two_level):
    index = two_level.index()
    two_level.send(0, damage=True)
    with pytest.raises(LoomFormatError, match="no chunk B-tree node"):
        index.lookup(np.array([[0, 0]]))


def test_a_page_holding_chunks_outside_its_keys_is_refused(two_level):
    index = two_level.index()
    # Page 1's bytes delivered as page 0: its chunks lie outside the keys page 0 was given.
    s, n = two_level.pages[1]
    two_level.deliver(0, os.pread(two_level.fd, n, s))
    with pytest.raises(LoomFormatError, match="outside the keys its parent gives it"):
        index.lookup(np.array([[0, 0]]))


def test_held_spans_on_their_way():
    data = bytes(range(256)) * 4
    offsets = np.array([0, 100, 300, 600], dtype=np.int64)
    sizes = np.array([100, 200, 300, 300], dtype=np.int64)
    held = HeldSpans()
    assert held.expect([(0, 300), (300, 600)]) == [0, 300]
    assert held.expect([(250, 400)]) == []  # overlaps: not taken
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("v", held.take([100], [200])), daemon=True)
    t.start()
    t.join(0.1)
    assert t.is_alive()  # inside a span on its way: waits instead of asking the store
    held.fill(0, data[0:300])
    t.join(5)
    assert bytes(got["v"][0]) == data[100:300]
    held.fail(300)  # will not come: its readers ask the store themselves
    assert held.take([300], [300]) == [None]
    assert held.nbytes == 300
    held.settle(
        [0, 300], offsets, sizes
    )  # owes chunk 0 only now (chunk 1 was served before the index was known)
    assert len(held) == 1
    (first,) = held.take([0], [100])
    assert bytes(first) == data[:100] and len(held) == 0


# -- end to end, through the proxy ----------------------------------------------------------------


@pytest.fixture(scope="module")
def band_loom(big_loom):  # noqa: F811  (the fixture, not the import)
    """The issue's 4,096 x 16,384 loompy file (18.6 MB; opening holds its first 1 and last 2 MiB), and its matrix."""
    with h5py.File(big_loom, "r") as f:
        m = f["matrix"][:]
    return big_loom, m


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.slow
def test_remote_blocks_decode_before_the_last_page_arrives(s3_server, s3_proxy, band_loom, monkeypatch):
    """With a slow link, the first blocks are read while the index's last pages are still coming."""
    import dask_loom.hdf5._remote as remote

    path, m = band_loom
    url = _upload(s3_server, path, "bands.loom")
    proxy = s3_proxy(
        latency=0.02, bandwidth=20e6
    )  # ~0.8 s for the file's 18.6 MB: room for blocks to finish first on a loaded machine
    events: list[tuple[str, float]] = []
    fetch_plan = remote._fetch_plan

    def timed_fetch(spec, entry, plan):
        got = fetch_plan(spec, entry, plan)
        events.append(("piece", time.monotonic()))
        return got

    monkeypatch.setattr(remote, "_fetch_plan", timed_fetch)
    clear_all()
    with dask.config.set({"dask_loom.block-size": "4MiB", "dask_loom.coalesce-bytes": "1MiB"}):
        with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
            src = ds.__dask_loom_layer_host__().source("")
            staged_pieces = type(src).staged_pieces

            def timed(self, region):
                runs = staged_pieces(self, region)

                def decoded():  # the block is decoded once its last piece has been
                    yield from runs
                    events.append(("block", time.monotonic()))

                return None if runs is None else decoded()

            monkeypatch.setattr(type(src), "staged_pieces", timed)
            got = ds.map([np.mean, np.std], axis=0, scheduler="threads")
            index = src.chunk_index()
            held = cached_entry(src.spec).cache[HELD_SPANS]
            snap = proxy.snapshot()
    np.testing.assert_allclose(got[0], m.mean(axis=1, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(got[1], m.std(axis=1, dtype=np.float64), rtol=1e-5)
    assert isinstance(index, PendingChunkIndex) and index.complete
    last_piece = max(t for kind, t in events if kind == "piece")
    blocks = [t for kind, t in events if kind == "block"]
    pieces = sum(kind == "piece" for kind, _t in events)
    # 64 blocks of 4 MiB; the index read's ~15 pieces come over ~0.8 s, in waves (8 requests in
    # flight share the link): blocks of the first wave are done before the last piece arrives
    # (none would be, were the index waited for).
    assert pieces >= 8 and sum(t < last_piece for t in blocks) >= 2, [
        (k, round(t - events[0][1], 3)) for k, t in events
    ]
    # Every chunk fetched once: the map asked the store for nothing the index read had not brought.
    stored = int(index.sizes.sum())
    assert snap["total_bytes"] <= 1.1 * stored + (os.path.getsize(path) - stored), snap
    assert len(held) == 0 and held.served >= 0.9 * stored


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
def test_remote_index_fault_fails_the_map_then_a_new_map_reads_it_again(s3_server, s3_proxy, band_loom):
    path, m = band_loom
    url = _upload(s3_server, path, "bands.loom")
    proxy = s3_proxy()
    clear_all()
    with dask.config.set({"dask_loom.retries": 1, "dask_loom.retry-backoff": 0.01}):
        with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
            src = ds.__dask_loom_layer_host__().source("")
            # Opening is done; from here every request fails (the leaf pages and any chunk read).
            proxy.always("503")
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="bands.loom"):
                ds.map([np.mean], axis=0, scheduler="threads")
            assert time.monotonic() - t0 < 30
            proxy.clear()
            got = ds.map([np.mean], axis=0, scheduler="threads")
            assert src.chunk_index().complete
    np.testing.assert_allclose(got[0], m.mean(axis=1, dtype=np.float64), rtol=1e-6)


def test_an_index_that_will_not_be_completed_here_is_read_again(two_level):
    """A failed streamed index, or one still coming in a forked child, is not used: it would fail or wait for ever."""
    from dask_loom.hdf5._source import _usable

    index = two_level.index()
    assert _usable(index) is index  # still coming, to this process's threads
    index.pid = -1  # as a forked child sees its parent's index
    assert _usable(index) is None
    for i in range(len(two_level.pages)):
        two_level.send(i)
    assert _usable(index) is index  # complete: any process may use it
    failed = two_level.index()
    two_level.deliver(0, StoreError("s3://b/x.loom: range request failed"))
    assert _usable(failed) is None


def test_an_index_settles_only_the_spans_its_own_read_announced():
    """Two datasets of one file read their indexes at once: one finishing must not let go of the other's bytes."""
    data = bytes(range(256)) * 4
    held = HeldSpans()
    mine = held.expect([(0, 300)])
    other = held.expect([(300, 700)])  # another dataset's read, still on its way
    held.fill(0, data[:300])
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("v", held.take([400], [100])), daemon=True)
    t.start()
    # This index lists chunks 0..300 only: the other span would owe nothing by it, and be dropped.
    held.settle(mine, np.array([0, 100], dtype=np.int64), np.array([100, 200], dtype=np.int64))
    assert held.nbytes == 700
    held.fill(300, data[300:700])
    t.join(5)
    assert bytes(got["v"][0]) == data[400:500] and other == [300]
