"""HDF5 ``.loom`` on an object store: the chunk index read from the B-tree, coalesced ranged reads, faults.

The B-tree reader is checked against h5py's own chunk lookup
(``DatasetID.get_chunk_info``) on files h5py and loompy wrote and on the real
files of ``shared/data/loom``; the remote path runs against the local S3 server
behind the request-counting proxy (``tests/_faultproxy.py``).
"""

from __future__ import annotations

import itertools
import os
import pickle
import uuid

import dask
import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import FormatError, LoomFormatError, StoreError
from dask_loom.hdf5._btree import chunk_btree, read_chunk_index
from dask_loom.hdf5._coalesce import coalesce_plan
from dask_loom.hdf5._files import HELD_SPANS, cached_entry, clear_all
from dask_loom.hdf5._layout import ChunkIndex
from tests.conftest import make_matrix

# -- the B-tree reader on local files ------------------------------------------------------------


def _local_index(path: str, name: str) -> ChunkIndex | None:
    """Our reader's index of dataset *name*, reading the file with plain ``pread``."""
    with h5py.File(path, "r") as f:
        ds = f[name]
        parent, _, leaf = ds.name.rpartition("/")
        group = f[parent or "/"]
        addr = group.id.links.get_info(leaf.encode()).u
        so, sl = f.id.get_create_plist().get_sizes()
        base = f.userblock_size
        shape = ds.shape
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    calls = []
    try:

        def read(o: int, n: int) -> bytes:
            return os.pread(fd, n, o)

        def fetch(starts: list[int], sizes: list[int]) -> list[bytes]:
            calls.append(len(starts))
            return [os.pread(fd, n, s) for s, n in zip(starts, sizes)]

        info = chunk_btree(read, addr, sizeof_offsets=so, sizeof_lengths=sl, base=base, name=path)
        if info is None:
            return None
        index = read_chunk_index(fetch, info, shape=shape, file_size=size, name=path)
        index.fetches = calls  # type: ignore[attr-defined]
        return index
    finally:
        os.close(fd)


def _h5py_index(path: str, name: str) -> dict[tuple[int, ...], tuple[int, int, int]]:
    """Every stored chunk as h5py reports it: grid position -> (offset, size, filter mask)."""
    out = {}
    with h5py.File(path, "r") as f:
        ds = f[name]
        n = ds.id.get_num_chunks()
        if n <= 2000:
            for i in range(n):
                info = ds.id.get_chunk_info(i)
                pos = tuple(int(o) // c for o, c in zip(info.chunk_offset, ds.chunks))
                out[pos] = (int(info.byte_offset), int(info.size), int(info.filter_mask))
        else:  # get_chunk_info(i) walks the tree from its start: by coordinate is O(log n) per chunk
            grid = [-(-s // c) for s, c in zip(ds.shape, ds.chunks)]
            for pos in np.ndindex(*grid):
                info = ds.id.get_chunk_info_by_coord(tuple(p * c for p, c in zip(pos, ds.chunks)))
                if info.byte_offset is not None:
                    out[pos] = (int(info.byte_offset), int(info.size), int(info.filter_mask))
            assert len(out) == n
    return out


def _assert_same(index: ChunkIndex, ref: dict[tuple[int, ...], tuple[int, int, int]]) -> None:
    got = {}
    for flat in np.flatnonzero(index.offsets >= 0):
        pos = tuple(int(p) for p in np.unravel_index(flat, index.grid))
        got[pos] = (int(index.offsets[flat]), int(index.sizes[flat]), int(index.masks[flat]))
    assert got == ref


@st.composite
def _datasets(draw):
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=rank, max_size=rank)))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    dtype = draw(st.sampled_from(["<f4", "<i2", "<f8", "u1"]))
    filters = draw(st.sampled_from([{}, {"compression": "gzip"}, {"compression": "gzip", "shuffle": True}]))
    written = draw(st.floats(0.0, 1.0))  # the fraction of chunks ever written (the rest stay unallocated)
    return shape, chunks, dtype, filters, written, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(_datasets())
def test_btree_index_equals_h5py(tmp_path_factory, case):
    shape, chunks, dtype, filters, written, seed = case
    path = str(tmp_path_factory.mktemp("bt") / "x.h5")
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("g/x", shape=shape, chunks=chunks, dtype=dtype, **filters)
        grid = [-(-s // c) for s, c in zip(shape, chunks)]
        for pos in np.ndindex(*grid):
            if rng.random() < written:
                sel = tuple(slice(p * c, min((p + 1) * c, s)) for p, c, s in zip(pos, chunks, shape))
                ds[sel] = rng.integers(0, 100, size=[x.stop - x.start for x in sel])
    index = _local_index(path, "g/x")
    assert index is not None
    _assert_same(index, _h5py_index(path, "g/x"))


def test_deep_tree_is_read_one_level_per_round(tmp_path):
    """10,000 chunks make a tree of three levels: three fetches, each for a whole level."""
    path = str(tmp_path / "deep.h5")
    data = np.arange(200 * 300, dtype="<i4").reshape(200, 300)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=data, chunks=(2, 3), compression="gzip")
    index = _local_index(path, "x")
    ref = _h5py_index(path, "x")
    assert len(ref) == 10_000
    _assert_same(index, ref)
    assert (
        len(index.fetches) == 3
        and index.fetches[0] == 1
        and index.fetches[1] > 1
        and index.fetches[2] > index.fetches[1]
    )


def test_userblock_base_address(tmp_path):
    """Addresses in the file are relative to the superblock's base (after a user block)."""
    path = str(tmp_path / "ub.h5")
    with h5py.File(path, "w", userblock_size=1024) as f:
        f.create_dataset("x", data=np.arange(5000.0).reshape(50, 100), chunks=(7, 9), compression="gzip")
    index = _local_index(path, "x")
    _assert_same(index, _h5py_index(path, "x"))


def test_other_index_types_are_left_to_h5py(tmp_path):
    """The 1.10 format's indexes (extensible array, v2 B-tree) are not read here: ``None``, h5py builds them."""
    path = str(tmp_path / "latest.h5")
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("x", data=np.ones((40, 40)), chunks=(8, 8), maxshape=(None, 40))
        f.create_dataset("y", data=np.ones((40, 40)), chunks=(8, 8), maxshape=(None, None))
        f.create_dataset("c", data=np.ones((4, 4)))  # contiguous
    for name in ("x", "y", "c"):
        assert _local_index(path, name) is None


def test_btree_index_on_loompy_file(tmp_path):
    import loompy

    path = str(tmp_path / "l.loom")
    m = make_matrix((300, 700), seed=3)
    loompy.create(
        path, {"": m, "spliced": m.astype("int32")}, {"Gene": np.arange(300)}, {"CellID": np.arange(700)}
    )
    for name in ("matrix", "layers/spliced"):
        _assert_same(_local_index(path, name), _h5py_index(path, name))


def test_btree_index_on_real_files(data_dir):
    seen = 0
    for root, _dirs, files in os.walk(data_dir / "loom"):
        for fn in sorted(files):
            if not fn.endswith(".loom"):
                continue
            path = os.path.join(root, fn)
            names: list[str] = []

            def chunked(n: str, o: object, names: list[str] = names) -> None:
                if isinstance(o, h5py.Dataset) and o.chunks:
                    names.append(n)

            with h5py.File(path, "r") as f:
                f.visititems(chunked)
            for name in names:
                index = _local_index(path, name)
                assert index is not None, (fn, name)
                _assert_same(index, _h5py_index(path, name))
                seen += 1
    assert seen > 100  # the LoomExperiment files hold a chunked dataset per attribute


def test_chunk_index_encodes_small_and_exact(loompy_file):
    import dask_loom.hdf5._layout as lay
    from dask_loom.hdf5 import dataset_layout
    from dask_loom.storage import FileSpec

    path, _ref = loompy_file
    spec = FileSpec.from_path(path)
    layout = dataset_layout(spec, "/matrix")
    with h5py.File(path, "r") as f:
        index = lay.full_index(f["matrix"], layout)
    data = index.encode()
    back = ChunkIndex.decode(data)
    assert back.grid == index.grid
    for a in ("offsets", "sizes", "masks"):
        np.testing.assert_array_equal(getattr(back, a), getattr(index, a))
    assert len(data) < 8 * index.offsets.size  # compact enough to ride in a graph
    with pytest.raises(FormatError, match="cannot decode"):
        ChunkIndex.decode(data[:-5])
    with pytest.raises(FormatError, match="cannot decode"):
        ChunkIndex.decode(b"nonsense")


# -- request planning ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 700)), min_size=1, max_size=40),
    st.integers(0, 3000),
    st.integers(1, 4000),
)
def test_coalesce_plan_covers_each_range_once(ranges, gap, target):
    # Ranges of a real index never overlap: lay them out one after another with the drawn holes.
    starts, sizes, pos = [], [], 0
    for hole, n in ranges:
        starts.append(pos + hole)
        sizes.append(n)
        pos += hole + n
    order = np.random.default_rng(len(ranges)).permutation(len(starts))
    starts = [starts[i] for i in order]
    sizes = [sizes[i] for i in order]
    plan = coalesce_plan(starts, sizes, gap=gap, target=target)
    members = sorted(i for _a, _b, m in plan for i in m)
    assert members == list(range(len(starts)))
    for r0, r1, m in plan:
        assert r0 == min(starts[i] for i in m) and r1 == max(starts[i] + sizes[i] for i in m)
        # A piece longer than 1.5 x target is a single range (never cut inside one).
        assert r1 - r0 <= 1.5 * target + max(sizes[i] for i in m) or len(m) == 1
    # Holes wider than the gap are never read through.
    spans = sorted((starts[i], starts[i] + sizes[i]) for i in range(len(starts)))
    for r0, r1, _m in plan:
        inside = [s for s in spans if r0 <= s[0] < r1]
        for (_a, e), (s, _b) in itertools.pairwise(inside):
            assert s - e <= gap


def test_coalesce_plan_pieces_of_about_target():
    starts = [i * 100 for i in range(100)]  # 100 adjacent ranges of 100 bytes: one run of 10,000
    sizes = [100] * 100
    plan = coalesce_plan(starts, sizes, gap=0, target=3000)
    assert [b - a for a, b, _m in plan] == [3400, 3300, 3300]  # round(10000 / 3000) = 3 pieces, no small tail
    plan = coalesce_plan(starts, sizes, gap=0, target=4000)
    assert [b - a for a, b, _m in plan] == [5000, 5000]  # 2.5 rounds to 2: pieces stay under 1.5 x target
    assert len(coalesce_plan(starts, sizes, gap=0, target=10**9)) == 1
    assert len(coalesce_plan([0, 10_000], [10, 10], gap=9_989, target=10**9)) == 2
    assert len(coalesce_plan([0, 10_000], [10, 10], gap=9_990, target=10**9)) == 1


# -- on the local S3 server ----------------------------------------------------------------------


def _upload(s3_server, local: str, name: str) -> str:
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server["storage_options"], skip_instance_cache=True)
    key = f"{s3_server['bucket']}/hdf5-remote-{uuid.uuid4().hex[:8]}/{name}"
    fs.put_file(local, key)
    return f"s3://{key}"


@pytest.fixture(scope="module")
def big_loom(tmp_path_factory):
    """A 4,096 x 16,384 float32 Loom written by loompy (the issue's measurement file)."""
    from dask_loom._synthetic import write_synthetic_loom

    path = str(tmp_path_factory.mktemp("big") / "big.loom")
    write_synthetic_loom(path, 4096, 16384, writer="loompy")
    return path


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.slow
def test_remote_open_index_and_map_request_counts(s3_server, s3_proxy, big_loom):
    url = _upload(s3_server, big_loom, "big.loom")
    proxy = s3_proxy()
    clear_all()
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
        opened = proxy.snapshot()["total_requests"]
        proxy.reset_counts()
        src = ds.__dask_loom_layer_host__().source("")
        assert src.index is None  # small reads search the tree; whole-array graphs build the index
        src.chunk_index()
        # The leaf pages come in the background (a map's first blocks need not wait for the
        # last): count the whole index read here, the map's own requests below.
        src.index.wait()
        index_requests = proxy.snapshot()["total_requests"]
        assert src.index is not None and src.contiguous_axis == 0
        proxy.reset_counts()
        got = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        snap = proxy.snapshot()
    # h5py's walk of the same tree took 270+ requests (64 KiB blocks).
    assert index_requests <= 10, (opened, index_requests, [(r.method, r.range) for r in proxy.log])
    stored = int(src.index.sizes.sum())
    assert snap["total_requests"] <= max(1, round(stored / 2**22)), snap
    assert snap["total_bytes"] <= stored * 1.1  # no holes of any size read through
    with h5py.File(big_loom, "r") as f:
        m = f["matrix"][:]
    np.testing.assert_allclose(got[0], m.mean(axis=1, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(got[1], m.std(axis=1, dtype=np.float64), rtol=1e-5)
    _assert_same(src.index, _h5py_index(big_loom, "matrix"))

    # With no bytes to spare for holes, the pages are fetched one by one (all of a level at once):
    # more requests, but a few hundred KiB instead of most of the file.
    clear_all()
    with dask.config.set({"dask_loom.index-read-waste": 0}):
        with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
            proxy.reset_counts()
            lean = ds.__dask_loom_layer_host__().source("")
            lean.chunk_index().wait()
            snap = proxy.snapshot()
    np.testing.assert_array_equal(lean.index.offsets, src.index.offsets)
    assert snap["total_bytes"] < 2**21 and snap["total_requests"] > index_requests, snap


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.slow
def test_remote_map_fetches_each_stored_byte_once(s3_server, s3_proxy, big_loom):
    """Open, chunk index and map together fetch the chunks once, plus the metadata and index pages.

    The index's leaf pages lie between the chunks all through a loompy file, so
    reading them in a few requests reads most chunks too; the map then took
    them from the store a second time (36.3 MB fetched for a 19.4 MB file).
    """
    url = _upload(s3_server, big_loom, "big.loom")
    proxy = s3_proxy()
    clear_all()
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
        got = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        src = ds.__dask_loom_layer_host__().source("")
        held = cached_entry(src.spec).cache[HELD_SPANS]
        snap = proxy.snapshot()
    stored = int(src.index.sizes.sum())
    metadata = os.path.getsize(big_loom) - stored  # attributes, names, B-tree pages
    assert snap["total_bytes"] <= 1.1 * stored + metadata, (snap, stored, metadata)
    # Served from the bytes the index read held, and all of them let go once served.
    assert held.served >= 0.8 * stored and len(held) == 0, (held.served, stored, len(held))
    # The metadata blocks at both ends in 2 GETs at once, the second a suffix range whose answer
    # gives the size (no HEAD); they hold the tree's root; 4 + 4 for its two other levels, 2 for
    # chunks straddling the ends of what was held.
    assert snap["total_requests"] <= 12, [(r.method, r.range) for r in proxy.log]
    assert snap["requests"].get("HEAD", 0) == 0, snap
    assert [r.range for r in proxy.log[:2]] in (["bytes=0-1048575", "bytes=-2097152"], ["bytes=-2097152", "bytes=0-1048575"])
    with h5py.File(big_loom, "r") as f:
        m = f["matrix"][:]
    np.testing.assert_allclose(got[0], m.mean(axis=1, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(got[1], m.std(axis=1, dtype=np.float64), rtol=1e-5)


def test_pinned_blocks_serve_ranges_and_are_not_owed_by_spans():
    from dask_loom.hdf5._spans import HeldSpans

    data = bytes(range(256)) * 4
    offsets = np.array([10, 100, 200, 300], dtype=np.int64)
    sizes = np.array([50, 60, 80, 40], dtype=np.int64)
    held = HeldSpans()
    held.pin(0, data[0:128])  # a metadata block fetched on opening: chunks 10 and part of 100
    held.hold([(0, data[0:350])], offsets, sizes)  # chunk 10 is the pinned block's, never this span's
    (a,) = held.take([20], [30])  # any range inside the pinned block
    assert bytes(a) == data[20:50]
    got = held.take([10, 100, 200], [50, 60, 80])
    assert [bytes(g) for g in got] == [data[10:60], data[100:160], data[200:280]]
    assert len(held) == 1  # chunk 300 not served yet
    (last,) = held.take([300], [40])
    assert bytes(last) == data[300:340] and len(held) == 0
    assert bytes(held.take([10], [50])[0]) == data[10:60]  # pinned blocks stay


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
def test_missing_remote_loom_is_file_not_found(s3_server, s3_proxy):
    import errno

    proxy = s3_proxy()
    url = f"s3://{s3_server['bucket']}/hdf5-remote-{uuid.uuid4().hex[:8]}/absent.loom"
    clear_all()
    with pytest.raises(FileNotFoundError) as info:
        dask_loom.connect(url, "r", storage_options=proxy.storage_options)
    assert info.value.errno == errno.ENOENT and url in str(info.value)
    # Opening asks for both ends of the object at once: two 404s, nothing else.
    assert proxy.snapshot()["total_requests"] <= 2, [(r.method, r.path) for r in proxy.log]


def test_metadata_blocks_fetched_on_opening():
    from dask_loom.hdf5._metablocks import seed_ranges

    mib = 2**20
    assert seed_ranges(10 * mib + 5, mib) == [(0, mib), (9 * mib, 10 * mib + 5)]  # first block, last two
    assert seed_ranges(3 * mib, mib) == [(0, 3 * mib)]  # adjacent blocks: one range
    assert seed_ranges(2 * mib, mib) == [(0, 2 * mib)]
    assert seed_ranges(100, mib) == [(0, 100)]


@pytest.mark.parametrize("size", [100, 2**20, 2**20 + 5, 3 * 2**20 - 1, 10 * 2**20 + 5])
def test_metadata_file_seeded_from_the_object_ends(size):
    """Blocks cut from the two ends fetched on opening: the first block and the last two, nothing fetched again."""
    from dask_loom.hdf5._metablocks import open_metadata_file

    mib = 2**20
    data = (np.arange(size, dtype=np.int64) * 2654435761 % 251).astype(np.uint8).tobytes()
    fetched: list[tuple[int, int]] = []

    def fetch(starts, sizes):
        fetched.extend(zip(starts, sizes))
        return [data[s : s + n] for s, n in zip(starts, sizes)]

    tail = data[max(0, size - 2 * mib) :]
    pinned: list[tuple[int, bytes]] = []
    pieces = [(0, data[:mib]), (size - len(tail), tail)]
    f = open_metadata_file(size, fetch, block_size=mib, pin=lambda s, b: pinned.append((s, bytes(b))), pieces=pieces)
    nblocks = -(-size // mib)
    # Each piece is pinned whole, with the bytes around its whole blocks (chunks there need no request).
    assert pinned == pieces
    f.seek(0)
    assert f.read(64) == data[:64]
    f.seek(size - 70)
    assert f.read() == data[size - 70 :]
    if nblocks > 1:
        f.seek(nblocks // 2 * mib - 3)  # across a block boundary
        assert f.read(10) == data[nblocks // 2 * mib - 3 : nblocks // 2 * mib + 7]
    assert all(s // mib not in {0, nblocks - 2, nblocks - 1} for s, _n in fetched), fetched


def test_held_spans_serve_whole_chunks_once():
    from dask_loom.hdf5._spans import HeldSpans

    data = bytes(range(256)) * 4  # a "file" of 1,024 bytes
    offsets = np.array([10, 100, 200, 300, 600, -1], dtype=np.int64)
    sizes = np.array([50, 60, 80, 40, 100, 0], dtype=np.int64)
    held = HeldSpans()
    # A span holding chunks 10, 100 and 200 (280 is past its end), and one holding no whole chunk.
    held.hold([(0, data[0:250]), (250, data[250:320]), (590, data[590:650])], offsets, sizes)
    assert len(held) == 1 and held.nbytes == 250
    got = held.take([100, 200, 300], [60, 80, 40])
    assert bytes(got[0]) == data[100:160] and got[1] is None and got[2] is None  # 200..280 is not held whole
    assert held.served == 60 and len(held) == 1
    held.hold([(5, data[5:60])], offsets, sizes)  # overlaps the span held: ignored
    assert held.nbytes == 250
    (first,) = held.take([10], [50])
    assert bytes(first) == data[10:60] and held.served == 110
    assert len(held) == 0  # chunks 10 and 100 were all it held whole: let go
    assert held.take([10], [50]) == [None]


def test_gap_within_merges_smallest_holes_first():
    from dask_loom.hdf5._coalesce import gap_within

    # Holes of 10, 50, 20, 1000 bytes between five ranges of 5 bytes.
    starts, sizes = [0, 15, 70, 95, 1100], [5] * 5
    assert gap_within(starts, sizes, gap=10**6, max_waste=10**6) == 1000
    assert gap_within(starts, sizes, gap=10**6, max_waste=80) == 50
    assert gap_within(starts, sizes, gap=10**6, max_waste=79) == 20
    assert gap_within(starts, sizes, gap=10**6, max_waste=5) == 0
    assert gap_within(starts, sizes, gap=30, max_waste=10**6) == 20
    # All holes (1,080 bytes) within an eighth over the cap: read through, the largest too.
    assert gap_within(starts, sizes, gap=10**6, max_waste=960) == 1000
    assert gap_within(starts, sizes, gap=10**6, max_waste=959) == 50


@pytest.fixture(scope="module")
def small_loom(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "ref.loom")
    m = make_matrix((300, 700), seed=21, density=0.5)
    dask_loom.create(path, m, {"Gene": np.arange(300)}, {"CellID": np.arange(700)}, chunks=(64, 64))
    return path, m


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
def test_remote_source_ships_its_index(s3_server, s3_proxy, small_loom):
    """A source unpickled in a fresh process state reads blocks without opening the file through h5py."""
    path, m = small_loom
    url = _upload(s3_server, path, "ref.loom")
    proxy = s3_proxy()
    clear_all()
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
        src = ds.__dask_loom_layer_host__().source("")
    blob = pickle.dumps(src)
    clear_all()  # a worker: no open file, no cached index
    proxy.reset_counts()
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.index.offsets, src.index.offsets)
    got = again.read_block((slice(64, 192), slice(0, 700)))
    np.testing.assert_array_equal(got, m[64:192])
    log = [(r.method, r.range) for r in proxy.log]
    assert [m for m, _r in log] == ["GET"], log  # one ranged GET of the band's chunks: no HEAD, no metadata
    with dask.config.set({"dask_loom.index-ship-bytes": 10}):
        assert pickle.loads(pickle.dumps(src)).index is None  # too big to ship: workers rebuild it


def _patched_copy(path: str, out: str) -> tuple[int, int]:
    """*path* with the first chunk address of its B-tree pointing past the end of the file."""
    import shutil

    shutil.copyfile(path, out)
    with h5py.File(out, "r") as f:
        addr = f.id.links.get_info(b"matrix").u
    fd = os.open(out, os.O_RDWR)
    try:
        info = chunk_btree(lambda o, n: os.pread(fd, n, o), addr, sizeof_offsets=8, sizeof_lengths=8)
        node = os.pread(fd, 24, info.root)
        assert node[:4] == b"TREE" and node[5] == 0  # a leaf: its first child is a chunk
        size = os.path.getsize(out)
        pos = info.root + 24 + 32  # node header, then the first key (size, mask, 3 x uint64)
        os.pwrite(fd, (size + 4096).to_bytes(8, "little"), pos)
    finally:
        os.close(fd)
    return size, size + 4096


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
def test_remote_index_pointing_past_the_object_is_a_typed_error(s3_server, s3_proxy, small_loom, tmp_path):
    path, _m = small_loom
    bad = str(tmp_path / "bad.loom")
    size, where = _patched_copy(path, bad)
    url = _upload(s3_server, bad, "bad.loom")
    proxy = s3_proxy()
    clear_all()
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
        with pytest.raises(LoomFormatError) as info:
            ds[:, :]
    msg = str(info.value)
    assert url in msg and str(where) in msg and str(size) in msg and "outside the file" in msg, msg
    # The same damage locally: h5py's index, then the read refuses it as truncated.
    clear_all()
    with dask_loom.connect(bad, "r", validate=False) as ds:
        with pytest.raises(LoomFormatError, match="truncated"):
            ds[:, :]


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
def _spy_prefetches(monkeypatch) -> tuple[list[int], list[int]]:
    """The chunks each prefetch was asked for, and the requests each one that was not held whole sent."""
    from dask_loom.hdf5 import _files, _source

    asked: list[int] = []
    sent: list[int] = []
    real_prefetch, real_stream = _files.prefetch_ranges, _files.stream_plan

    def prefetch(spec, starts, sizes, *, entry):
        asked.append(len(starts))
        return real_prefetch(spec, starts, sizes, entry=entry)

    def stream(spec, entry, plan, on_piece):
        sent.append(len(plan))
        return real_stream(spec, entry, plan, on_piece)

    monkeypatch.setattr(_source, "prefetch_ranges", prefetch)
    monkeypatch.setattr(_files, "stream_plan", stream)
    return asked, sent


# (operation, block size, chunks per block): 32 blocks of 8 MiB decoded (eight waves of the pool's
# 4 threads) for map and for aggregate's full-width bands; 128 tiles of 2 MiB for aggregate where
# a band of one chunk row (4 MiB) passes a block.
AHEAD = {"map": ("8MiB", 512), "aggregate": ("8MiB", 512), "aggregate-tiles": ("2MiB", 128)}


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.slow
@pytest.mark.parametrize(("op", "faults"), [("map", 0), ("map", 3), ("aggregate", 0), ("aggregate-tiles", 0)])
def test_warm_remote_reads_fetch_blocks_ahead_once(s3_server, s3_proxy, big_loom, monkeypatch, op, faults):
    """Reads whose chunks are not held (the second pass in a process) fetch blocks ahead, each byte once.

    Each task starts fetching the block of the read task one pool's width
    later in the threaded scheduler's order; a task starting its read finds
    those bytes on their way.  Fetched in the wrong order, blocks would be
    asked for twice and spans would be left held; a prefetch that fails (503s)
    leaves its block to the task, which reads it as usual.
    """
    url = _upload(s3_server, big_loom, "big.loom")
    proxy = s3_proxy(latency=0.01)
    clear_all()
    with h5py.File(big_loom, "r") as f:
        m = f["matrix"][:]
    labels = np.arange(m.shape[1]) % 7
    opts = proxy.storage_options
    with dask_loom.connect(url, "r", storage_options=opts, validate=False) as ds:
        ds.map([np.mean], axis=0, scheduler="threads")  # the chunk index, kept by the process
    asked, sent = _spy_prefetches(monkeypatch)
    block, per_block = AHEAD[op]
    with dask.config.set({"dask_loom.retry-backoff": 0.01, "dask_loom.remote-threads": 4, "dask_loom.block-size": block}):
        with dask_loom.connect(url, "r", storage_options=opts, validate=False) as ds:
            src = ds.__dask_loom_layer_host__().source("")
            proxy.reset_counts()
            proxy.inject("503", faults)
            if op == "map":
                got = ds.map([np.mean, np.std], axis=0, scheduler="threads")
            else:
                got = [dask_loom.aggregate(ds, labels, axis=1, func="sum", scheduler="threads")]
            snap = proxy.snapshot()
            held = cached_entry(src.spec).cache[HELD_SPANS]
            assert len(held) == 0 and held.nbytes == 0  # every span fetched ahead was served and let go
    if op == "map":
        np.testing.assert_allclose(got[0], m.mean(axis=1, dtype=np.float64), rtol=1e-6)
        np.testing.assert_allclose(got[1], m.std(axis=1, dtype=np.float64), rtol=1e-5)
    else:
        want = np.stack([m[:, labels == g].sum(axis=1, dtype=np.float64) for g in range(7)], axis=1)
        np.testing.assert_allclose(got[0], want, rtol=1e-5)
    stored = int(src.index.sizes.sum())
    n_blocks = len(src.index.sizes) // per_block
    # Every read task but the last wave's (4 threads) fetched a block ahead; those not held whole
    # already (the file's first and last MiBs since opening; a tile whose chunks lie inside the
    # span fetched for its neighbour) sent requests; no byte was fetched twice.
    assert asked == [per_block] * (n_blocks - 4), asked
    assert len(sent) >= (n_blocks - 8) // 2 and sum(sent) <= 2 * len(sent), sent
    assert snap["total_bytes"] <= 1.05 * stored + faults * 2**10, (snap, stored)
    assert snap["requests"]["GET"] <= n_blocks * 2 + faults, snap


def _count_prefetches_here(on: bool) -> int:
    """In a worker: start (*on*) or stop counting HDF5Source prefetches; returns the count so far."""
    from dask_loom.hdf5 import _source

    real = getattr(_source, "_uncounted_prefetch", None)
    if on and real is None:
        real = _source._uncounted_prefetch = _source.prefetch_ranges
        _source._prefetches = 0

        def counting(*args, **kwargs):
            _source._prefetches += 1
            return real(*args, **kwargs)

        _source.prefetch_ranges = counting
    elif not on and real is not None:
        _source.prefetch_ranges = real
        del _source._uncounted_prefetch
    return getattr(_source, "_prefetches", 0)


@pytest.mark.s3
@pytest.mark.xdist_group("s3proxy")
@pytest.mark.slow
def test_no_blocks_fetched_ahead_on_a_distributed_cluster(s3_server, s3_proxy, big_loom, local_cluster):
    """A worker runs tasks the scheduler gives it: blocks fetched ahead there could be read elsewhere."""
    url = _upload(s3_server, big_loom, "big.loom")
    proxy = s3_proxy()
    clear_all()
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
        ds.map([np.mean], axis=0, scheduler="threads")
        src = ds.__dask_loom_layer_host__().source("")
        stored = int(src.index.sizes.sum())
        proxy.reset_counts()
        # Blocks that would be fetched ahead on the pool (32, 4 threads), as in the test above.
        local_cluster.run(_count_prefetches_here, True)
        try:
            with dask.config.set({"dask_loom.remote-threads": 4, "dask_loom.block-size": "8MiB"}):
                got = ds.map([np.mean], axis=0, client=local_cluster)
        finally:
            counts = local_cluster.run(_count_prefetches_here, False)
        snap = proxy.snapshot()
    assert sum(counts.values()) == 0, counts
    with h5py.File(big_loom, "r") as f:
        np.testing.assert_allclose(got[0], f["matrix"][:].mean(axis=1, dtype=np.float64), rtol=1e-6)
    # The workers hold no index of their own: each reads its blocks (and nothing twice).
    assert snap["total_bytes"] <= 1.05 * stored + 2**22, (snap, stored)


def test_short_answers_are_retried_or_refused(s3_server, s3_proxy, small_loom):
    path, m = small_loom
    url = _upload(s3_server, path, "ref.loom")
    proxy = s3_proxy()
    clear_all()
    with dask.config.set({"dask_loom.retries": 2, "dask_loom.retry-backoff": 0.01}):
        proxy.inject("short", 1)  # the opening's answer (the object's ends, with its size) cut short: asked again
        with dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False) as ds:
            assert proxy.counts["short"] == 1
            src = ds.__dask_loom_layer_host__().source("")
            src.chunk_index()  # built while the answers are whole
            # This small file was fetched whole by opening and indexing it: drop what is held,
            # so the chunks come from the store.
            cached_entry(src.spec).cache.pop(HELD_SPANS)
            proxy.reset_counts()
            proxy.inject("short", 2)
            np.testing.assert_array_equal(ds[:, :], m)
            assert proxy.counts["short"] == 2
            proxy.always("short")
            try:
                with pytest.raises(StoreError) as info:
                    ds[:, :]
            finally:
                proxy.clear()
    msg = str(info.value)
    assert url in msg and "attempts" in msg and "bytes" in msg and "answered" in msg, msg
    clear_all()
    proxy.always("short")
    try:
        with dask.config.set({"dask_loom.retries": 2, "dask_loom.retry-backoff": 0.01}):
            with pytest.raises(StoreError) as info:
                dask_loom.connect(url, "r", storage_options=proxy.storage_options, validate=False)
    finally:
        proxy.clear()
    msg = str(info.value)
    assert url in msg and "attempts" in msg and "opening" in msg and "short answer" in msg, msg


@pytest.mark.s3
def test_script_that_never_closes_a_remote_loom_exits_cleanly(s3_server, small_loom):
    """HDF5 closed files left open from its own exit handler, after Python had gone; h5py's
    file-object driver (every remote file) then called back into Python: SIGSEGV at exit."""
    import json
    import subprocess
    import sys

    path, m = small_loom
    url = _upload(s3_server, path, "never-closed.loom")
    script = (
        "import json, sys, numpy as np, dask_loom\n"
        "url, opts = sys.argv[1], json.loads(sys.argv[2])\n"
        "ds = dask_loom.connect(url, 'r', storage_options=opts, validate=False)\n"
        "print(float(ds.map([np.sum], axis=0, scheduler='threads')[0].sum()))\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", script, url, json.dumps(s3_server["storage_options"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, (got.returncode, got.stderr[-2000:])
    assert float(got.stdout.strip()) == pytest.approx(float(m.sum(dtype=np.float64)), rel=1e-6)


@pytest.mark.s3
def test_empty_remote_loom_is_not_an_hdf5_file(s3_server, tmp_path):
    """An empty object answers ranged GETs with 416 or a whole empty body: refused as an empty local file is."""
    (tmp_path / "empty.loom").write_bytes(b"")
    url = _upload(s3_server, str(tmp_path / "empty.loom"), "empty.loom")
    clear_all()
    with pytest.raises(LoomFormatError, match=r"empty\.loom: not a readable HDF5 file"):
        dask_loom.connect(url, "r", storage_options=s3_server["storage_options"])
    with pytest.raises(LoomFormatError, match="not a readable HDF5 file"):
        dask_loom.connect(str(tmp_path / "empty.loom"), "r")
