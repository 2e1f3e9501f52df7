"""HDF5 read by byte range and decoded outside h5py: equal to h5py, every filter, every layout."""

from __future__ import annotations

import os
import pickle
import threading

import h5py
import numpy as np
import pytest

from dask_loom.errors import CorruptChunkError, LoomFormatError
from dask_loom.hdf5 import STATS, HDF5Source, dataset_layout, hdf5_to_dask, invalidate
from dask_loom.hdf5._files import clear_all
from dask_loom.storage import FileSpec


@pytest.fixture
def h5file(tmp_path):
    rng = np.random.default_rng(0)
    a = (rng.random((300, 170)) * (rng.random((300, 170)) > 0.7)).astype("f4")
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("gzip", data=a, chunks=(64, 64), compression="gzip", compression_opts=2)
        f.create_dataset(
            "shuffle", data=a, chunks=(50, 30), compression="gzip", shuffle=True, fletcher32=True
        )
        f.create_dataset("fletcher", data=a.astype("f8"), chunks=(64, 64), fletcher32=True)
        f.create_dataset("raw", data=a, chunks=(64, 64))
        f.create_dataset("lzf", data=a, chunks=(64, 64), compression="lzf")
        f.create_dataset("contig", data=a)
        f.create_dataset("bigend", data=a.astype(">i4"), chunks=(64, 64), compression="gzip")
        f.create_dataset("int8", data=(a * 10).astype("i1"), chunks=(7, 9), compression="gzip", shuffle=True)
        f.create_dataset("oned", data=np.arange(1000, dtype="i8"), chunks=(100,), compression="gzip")
        part = f.create_dataset(
            "partial", shape=(300, 170), dtype="f4", chunks=(64, 64), fillvalue=7.5, compression="gzip"
        )
        part[0:64, 0:64] = a[0:64, 0:64]
    yield path, a
    clear_all()


@pytest.mark.parametrize("name", ["gzip", "shuffle", "fletcher", "raw", "contig", "bigend", "int8", "oned"])
def test_fast_path_equals_h5py(h5file, name):
    path, _ = h5file
    with h5py.File(path, "r") as f:
        expected = f[name][()]
    before = STATS["h5py_blocks"]
    x = hdf5_to_dask(str(path), name, chunks=None)
    np.testing.assert_array_equal(x.compute(scheduler="threads"), expected)
    assert x.dtype == expected.dtype
    assert STATS["h5py_blocks"] == before, "the byte-range path should have served every block"
    assert dataset_layout(FileSpec.from_path(path), name).fast


def test_lzf_falls_back_to_h5py(h5file):
    path, a = h5file
    layout = dataset_layout(FileSpec.from_path(path), "lzf")
    assert not layout.fast and "32000" in layout.why_slow
    before = STATS["h5py_blocks"]
    np.testing.assert_array_equal(hdf5_to_dask(str(path), "lzf").compute(), a)
    assert STATS["h5py_blocks"] > before


def test_unwritten_chunks_read_as_fill_value(h5file):
    path, a = h5file
    out = hdf5_to_dask(str(path), "partial").compute()
    np.testing.assert_array_equal(out[:64, :64], a[:64, :64])
    assert (out[64:, :] == 7.5).all() and (out[:64, 64:] == 7.5).all()


def test_unaligned_region_reads(h5file):
    path, a = h5file
    spec = FileSpec.from_path(path)
    src = HDF5Source(spec, dataset_layout(spec, "shuffle"))
    np.testing.assert_array_equal(src.read_block((slice(13, 211), slice(5, 169))), a[13:211, 5:169])


def test_gzip_loom_layer_uses_fast_path(loompy_file):
    path, ref = loompy_file
    import dask_loom

    before = dict(STATS)
    with dask_loom.connect(path, "r") as ds:
        layout = ds.__dask_loom_layer_host__().source("").layout
        assert layout.filter_names == ["gzip"] and layout.fast
        np.testing.assert_array_equal(ds[:, :], ref[""])
        np.testing.assert_array_equal(ds["spliced"][:, :], ref["spliced"])
    assert STATS["fast_blocks"] > before["fast_blocks"]
    assert STATS["h5py_blocks"] == before["h5py_blocks"]


def test_threads_decode_concurrently(h5file):
    """Reads from many threads at once give the right data (no shared handle state)."""
    path, a = h5file
    spec = FileSpec.from_path(path)
    src = HDF5Source(spec, dataset_layout(spec, "shuffle"))
    errors = []

    def work(i):
        try:
            for _ in range(20):
                r0 = (i * 37) % 250
                np.testing.assert_array_equal(
                    src.read_block((slice(r0, r0 + 50), slice(0, 170))), a[r0 : r0 + 50]
                )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_source_pickles_without_handles(h5file):
    path, a = h5file
    spec = FileSpec.from_path(path)
    src = HDF5Source(spec, dataset_layout(spec, "gzip"))
    src.read_block((slice(0, 64), slice(0, 64)))  # opens handles in this process
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read_block((slice(64, 128), slice(0, 170))), a[64:128])


def test_runs_on_process_cluster(h5file, local_cluster):
    path, a = h5file
    x = hdf5_to_dask(str(path), "shuffle")
    np.testing.assert_allclose(x.sum(axis=0).compute(scheduler=local_cluster), a.sum(axis=0), rtol=1e-5)


def test_cache_invalidated_when_file_changes(tmp_path):
    path = tmp_path / "y.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros((10, 10)), chunks=(5, 5), compression="gzip")
    assert hdf5_to_dask(str(path), "x").sum().compute() == 0
    with h5py.File(path, "r+") as f:
        del f["x"]
        f.create_dataset("x", data=np.ones((10, 10)), chunks=(5, 5), compression="gzip")
    os.utime(path, ns=(1, 1))  # a new mtime, even on coarse clocks
    assert hdf5_to_dask(str(path), "x").sum().compute() == 100


def test_corrupt_chunk_raises_naming_file(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "x",
            data=np.arange(10000.0).reshape(100, 100),
            chunks=(50, 50),
            compression="gzip",
            fletcher32=True,
        )
        offset = f["x"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 10)
        b = fh.read(1)
        fh.seek(offset + 10)
        fh.write(bytes([b[0] ^ 0xFF]))
    invalidate(FileSpec.from_path(path))
    with pytest.raises(CorruptChunkError, match="bad.h5"):
        hdf5_to_dask(str(path), "x").compute(scheduler="sync")


def test_not_hdf5(tmp_path):
    path = tmp_path / "nope.h5"
    path.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(LoomFormatError, match="nope.h5"):
        hdf5_to_dask(str(path), "x")


def test_truncated_file(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "x", data=np.random.default_rng(0).random((500, 500)), chunks=(100, 100), compression="gzip"
        )
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises((LoomFormatError, OSError), match="t.h5"):
        hdf5_to_dask(str(path), "x").compute(scheduler="sync")


# -- chunks encoded outside h5py ------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2, 4, 6, 9])
@pytest.mark.parametrize("shuffle", [False, True])
def test_chunks_encoded_outside_h5py_read_back_through_hdf5(tmp_path, level, shuffle):
    """ISA-L (or zlib) streams written with write_direct_chunk decode through HDF5's own deflate filter."""
    import zlib

    from dask_loom.hdf5 import _encode
    from dask_loom.hdf5._target import encoder_for

    rng = np.random.default_rng(level)
    ref = np.where(rng.random((100, 70)) < 0.2, rng.poisson(3, (100, 70)), 0).astype("f4")
    fn = tmp_path / "e.h5"
    with h5py.File(fn, "w") as f:
        ds = f.create_dataset(
            "x",
            shape=ref.shape,
            dtype=ref.dtype,
            chunks=(32, 32),
            compression="gzip",
            compression_opts=level,
            shuffle=shuffle,
        )
        enc = encoder_for(ds)
        region = (slice(0, 100), slice(0, 70))
        for offset, data in enc(region, ref):
            zlib.decompress(data)  # a zlib stream, whoever wrote it
            ds.id.write_direct_chunk(offset, data, 0)
    with h5py.File(fn, "r") as f:
        np.testing.assert_array_equal(f["x"][:], ref)
    if level == 0 or _encode._isal() is None:
        assert _encode.deflate(ref.tobytes(), level) == zlib.compress(ref.tobytes(), level)


def test_deflate_without_isal_is_zlib(monkeypatch):
    import zlib

    from dask_loom.hdf5 import _encode

    data = np.arange(5000, dtype="f4").tobytes()
    monkeypatch.setattr(_encode, "_ISAL", False)
    assert _encode.deflate(data, 2) == zlib.compress(data, 2)


# -- cutting a block into chunks, storing a block's chunks in one call ---------------------------


def _chunk_reference(
    block: np.ndarray, chunks: tuple[int, ...], fill: float
) -> dict[tuple[int, ...], np.ndarray]:
    """Each chunk of *block*, padded with *fill*, cut one at a time with numpy (the slow obvious way)."""
    out = {}
    grid = [-(-n // c) for n, c in zip(block.shape, chunks)]
    for idx in np.ndindex(*grid):
        piece = block[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))]
        full = np.full(chunks, fill, dtype=block.dtype)
        full[tuple(slice(0, n) for n in piece.shape)] = piece
        out[idx] = full
    return out


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [
        ((10,), (3,)),
        ((12,), (4,)),
        ((130, 70), (64, 32)),
        ((128, 64), (64, 32)),
        ((5, 7, 9), (2, 3, 4)),
        ((3, 40), (8, 8)),
    ],
)
@pytest.mark.parametrize("contiguous", [True, False])
def test_cut_chunks_matches_chunk_by_chunk_slicing(shape, chunks, contiguous):
    from dask_loom.hdf5._encode import cut_chunks

    rng = np.random.default_rng(len(shape))
    block = rng.random(shape).astype("f4")
    if not contiguous:  # a strided view, as a permuted band can be
        block = np.asfortranarray(block)[..., ::-1]
    ref = _chunk_reference(block, chunks, -7.0)
    scratch = np.full(10**6, 255, np.uint8)  # stale bytes in a reused buffer must not leak into padding
    for s in (None, scratch):
        tiles = cut_chunks(block, chunks, -7.0, scratch=s)
        assert tiles.shape == (*(-(-n // c) for n, c in zip(shape, chunks)), *chunks)
        assert tiles.flags.c_contiguous
        for idx, want in ref.items():
            np.testing.assert_array_equal(tiles[idx], want)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    "filters",
    [
        {"compression": "gzip", "compression_opts": 1},
        {"compression": "gzip", "compression_opts": 4},
        {"compression": "gzip", "compression_opts": 9},
        {"compression": "gzip", "shuffle": True},
        {"compression": "gzip", "shuffle": True, "fletcher32": True},
        {"shuffle": True},
        {"fletcher32": True},
        {},
    ],
)
def test_block_of_chunks_stored_in_one_call_reads_back_through_hdf5(tmp_path, direct, filters):
    """Every chunk of two blocks, encoded outside h5py and stored by one call each, decodes through HDF5's filters."""
    from dask_loom.hdf5._direct import write_chunks
    from dask_loom.hdf5._target import encoder_for

    rng = np.random.default_rng(3)
    ref = np.where(rng.random((150, 70)) < 0.3, rng.poisson(3, (150, 70)), 0).astype("f4")
    fn = tmp_path / "b.h5"
    with h5py.File(fn, "w") as f:
        ds = f.create_dataset("x", shape=ref.shape, dtype="f4", chunks=(64, 32), fillvalue=-1.0, **filters)
        enc = encoder_for(ds)
        for region in [(slice(0, 64), slice(0, 70)), (slice(64, 150), slice(0, 70))]:
            payload = enc(region, ref[region])
            assert [off for off, _ in payload] == [
                (r, c) for r in range(region[0].start, region[0].stop, 64) for c in range(0, 70, 32)
            ]
            write_chunks(ds.id, payload.offsets, payload.raws, direct=direct)
        assert ds.id.get_num_chunks() == 3 * 3
    with h5py.File(fn, "r") as f:
        np.testing.assert_array_equal(f["x"][:], ref)


def test_chunk_store_routes_write_the_same_bytes(tmp_path):
    from dask_loom.hdf5._direct import write_chunks
    from dask_loom.hdf5._target import encoder_for

    ref = np.random.default_rng(1).random((100, 100)).astype("f4")
    got = []
    for direct in (True, False):
        with h5py.File(tmp_path / f"{direct}.h5", "w") as f:
            ds = f.create_dataset("x", shape=ref.shape, dtype="f4", chunks=(32, 32), compression="gzip")
            p = encoder_for(ds)((slice(0, 100), slice(0, 100)), ref)
            write_chunks(ds.id, p.offsets, p.raws, direct=direct)
            got.append([ds.id.read_direct_chunk(off)[1] for off, _ in p])
    assert got[0] == got[1]


def test_compiled_chunk_store_is_built_and_falls_back(tmp_path, monkeypatch):
    # `pip install -e .` builds dask_loom/hdf5/_chunkcalls.c; without it h5py stores the chunks one by one.
    from dask_loom.hdf5 import _direct

    assert _direct.DIRECT
    monkeypatch.setattr(_direct, "_MOD", None)
    monkeypatch.setattr(_direct, "DIRECT", False)
    ref = np.arange(64 * 64, dtype="f4").reshape(64, 64)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ds = f.create_dataset("x", shape=ref.shape, dtype="f4", chunks=(32, 32))
        offs = np.array([(0, 0), (0, 32), (32, 0), (32, 32)])
        _direct.write_chunks(
            ds.id, offs, [np.ascontiguousarray(ref[r : r + 32, c : c + 32]).tobytes() for r, c in offs]
        )
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][:], ref)


def test_chunk_hdf5_refuses_raises_its_error_after_storing_the_ones_before(tmp_path):
    from dask_loom.hdf5._direct import write_chunks

    raw = np.ones((32, 32), "f4").tobytes()
    with h5py.File(tmp_path / "r.h5", "w") as f:
        ds = f.create_dataset("x", shape=(64, 64), dtype="f4", chunks=(32, 32))
        with pytest.raises((ValueError, OSError, RuntimeError)):  # (5, 0) is not a chunk's origin
            write_chunks(ds.id, np.array([(0, 0), (5, 0), (32, 32)]), [raw, raw, raw], direct=True)
        assert ds.id.get_num_chunks() == 1
        np.testing.assert_array_equal(ds[:32, :32], 1)


def test_compiled_chunk_store_releases_the_gil(tmp_path):
    # While one call stores a block's chunks, another thread keeps running Python.
    from dask_loom.hdf5._direct import DIRECT, write_chunks

    if not DIRECT:
        pytest.skip("the compiled chunk store is not built")
    n = 20000
    raw = np.zeros((8, 8), "f4").tobytes()
    offs = np.stack(np.divmod(np.arange(n), 200), axis=1) * 8
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    with h5py.File(tmp_path / "g.h5", "w") as f:
        ds = f.create_dataset("x", shape=(8 * 100, 8 * 200), dtype="f4", chunks=(8, 8))
        t = threading.Thread(target=spin)
        t.start()
        try:
            before = ticks[0]
            write_chunks(ds.id, offs, [raw] * n, direct=True)
            during = ticks[0] - before
        finally:
            stop.set()
            t.join()
        assert ds.id.get_num_chunks() == n
    assert during > 1000


@pytest.mark.parametrize("compiled", [True, False])
def test_chunk_index_lists_what_h5py_lists(tmp_path, compiled, monkeypatch):
    """The compiled listing (H5Dchunk_iter, no Python per chunk) equals h5py's chunk_iter, holes and masks included."""
    import zlib

    from dask_loom.hdf5 import _direct
    from dask_loom.hdf5._layout import describe, full_index

    if not compiled:
        monkeypatch.setattr(_direct, "_MOD", None)
    rng = np.random.default_rng(2)
    fn = tmp_path / "i.h5"
    with h5py.File(fn, "w") as f:
        two = f.create_dataset("two", shape=(300, 170), dtype="f4", chunks=(64, 64), compression="gzip")
        two[:128, :] = rng.random((128, 170))
        two[256:, 64:128] = 1.0  # rows 128-255 and most of the last band stay unwritten
        # one chunk stored unfiltered (filter mask bit 0 set: deflate skipped)
        two.id.write_direct_chunk((192, 128), np.full((64, 64), 3, "f4").tobytes(), 1)
        three = f.create_dataset("three", shape=(5, 7, 9), dtype="i2", chunks=(2, 3, 4), compression="gzip")
        three[...] = rng.integers(0, 100, (5, 7, 9))
    with h5py.File(fn, "r") as f:
        for name in ("two", "three"):
            ds = f[name]
            lay = describe(ds)
            index = full_index(ds, lay)
            listed = []
            ds.id.chunk_iter(listed.append)
            want = {s.chunk_offset: (s.byte_offset, s.size, s.filter_mask) for s in listed}
            chunks = np.asarray(ds.chunks)
            got = {}
            for flat in np.flatnonzero(index.offsets >= 0):
                pos = tuple(int(c) for c in np.array(np.unravel_index(flat, index.grid)) * chunks)
                got[pos] = (int(index.offsets[flat]), int(index.sizes[flat]), int(index.masks[flat]))
            assert got == want
        assert f["two"].id.get_chunk_info_by_coord((192, 128)).filter_mask == 1
        np.testing.assert_array_equal(f["two"][192:256, 128:170], 3)
        raw = f["two"].id.read_direct_chunk((0, 0))[1]
        np.testing.assert_array_equal(
            np.frombuffer(zlib.decompress(raw), "f4").reshape(64, 64), f["two"][:64, :64]
        )
    if compiled:
        assert _direct.DIRECT


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", ["f4", "f8", "i2", "u1"])
@pytest.mark.parametrize(
    ("shape", "chunks"), [((130, 70), (64, 32)), ((64, 64), (64, 64)), ((3, 100), (8, 8))]
)
def test_gathered_encoding_equals_encoding_a_numpy_take(compiled, dtype, shape, chunks, monkeypatch):
    """Gathering columns while cutting chunks (permute's write) gives the chunks of ``np.take``, byte for byte."""
    from dask_loom.hdf5 import _encode
    from dask_loom.hdf5._layout import DEFLATE

    if compiled:
        assert _encode._CUT is not None  # built by `pip install -e .`
    else:
        monkeypatch.setattr(_encode, "_CUT", None)
    rng = np.random.default_rng(7)
    band = (rng.random(shape) * 50).astype(dtype)
    index = rng.permutation(shape[1])
    enc = _encode.ChunkEncoder(shape, chunks, dtype, ((DEFLATE, 0, (2,)),), fillvalue=3)
    region = (slice(0, shape[0]), slice(0, shape[1]))
    got = enc.encode_gathered(region, band, index, 1)
    want = enc(region, np.take(band, index, axis=1))
    assert [o for o, _ in got] == [o for o, _ in want]
    assert got.raws == want.raws
    c0, c1 = chunks
    last = np.frombuffer(zlib_inflate(got.raws[-1]), dtype).reshape(chunks)
    r, c = (shape[0] - 1) // c0 * c0, (shape[1] - 1) // c1 * c1
    np.testing.assert_array_equal(last[: shape[0] - r, : shape[1] - c], band[r:, index[c:]])
    assert (last[shape[0] - r :, :] == 3).all() and (last[:, shape[1] - c :] == 3).all()


def zlib_inflate(raw: bytes) -> bytes:
    import zlib

    return zlib.decompress(raw)


def test_compiled_gather_refuses_columns_outside_the_band():
    from dask_loom.hdf5 import _encode

    if _encode._CUT is None:
        pytest.skip("the compiled module is not built")
    band = np.zeros((4, 5), "f4")
    out = np.empty(64, "f4")
    with pytest.raises(IndexError, match="outside"):
        _encode._CUT.gather_cut(band, 4, 5, 4, np.array([0, 1, 5], np.int64), 4, 4, b"\0" * 4, out[:16])
    with pytest.raises(ValueError, match="sizes"):
        _encode._CUT.gather_cut(band, 4, 5, 4, np.array([0, 1, 2], np.int64), 4, 4, b"\0" * 4, out)
