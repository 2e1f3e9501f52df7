"""Zarr nodes (simplezarr's API) against the real stores in shared/data/zarr, and aligned writes."""

from __future__ import annotations

import json
import shutil
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.utils import key_split
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import CorruptChunkError, FormatError, UnsupportedCodecError
from dask_loom.stores import LocalStore, MemoryStore, SlowStore
from dask_loom.zarr import NodeNotFoundError, ZarrArray, ZarrGroup

ARANGE = np.arange(100, dtype=np.float32).reshape(10, 10)
ZARRS_OK = [
    *(f"v2/array_{c}_C.zarr" for c in ("none", "blosc", "gzip", "bz2", "zstd")),
    "v2/array_none_F.zarr",
    "v2/array_blosc_F.zarr",
    *(f"v3/array_{c}.zarr" for c in ("none", "blosc", "gzip", "bz2", "zstd", "none_transpose", "blosc_transpose")),
    *(f"v3_zarr_python/array_{c}.zarr" for c in ("none", "blosc", "gzip", "bz2", "zstd", "zlib", "adler32", "fletcher32")),
]
ZARRS_MISSING_CODEC = [f"{v}/array_{c}{s}.zarr" for v, s in (("v2", "_C"), ("v3", ""), ("v3_zarr_python", "")) for c in ("pcodec", "zfpy")]


@pytest.fixture(scope="module")
def zdata(data_dir):
    return data_dir / "zarr"


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


# -- values of every store in the MANIFEST --------------------------------------------------


@pytest.mark.parametrize("name", ZARRS_OK)
def test_zarrs_arange_arrays(zdata, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = dask_loom.open_zarr(zdata / "zarrs-tests" / name)
    assert isinstance(a, ZarrArray)
    assert (a.dtype, a.shape, a.chunk_shape, a.ndim) == ("float32", (10, 10), (5, 5), 2)
    assert a.attributes == {"key": "value"}
    np.testing.assert_array_equal(a.to_dask().compute(scheduler="sync"), ARANGE)
    np.testing.assert_array_equal(a.get_chunk((1, 0)), ARANGE[5:, :5])


@pytest.mark.parametrize("name", ZARRS_MISSING_CODEC)
def test_missing_codec_is_named(zdata, name):
    codec = "pcodec" if "pcodec" in name else "zfpy"
    with pytest.raises(UnsupportedCodecError, match=codec):
        dask_loom.open_zarr(zdata / "zarrs-tests" / name).to_dask().compute(scheduler="sync")


def test_zarr_python_v2_fixture(zdata):
    fixture = zdata / "zarr-python-v2-fixture" / "fixture"
    root = dask_loom.open_zarr(fixture, mode="r")
    assert isinstance(root, ZarrGroup)
    assert "14" in repr(root)
    assert "nested_legacy" in repr(root)
    for j in range(7):
        np.testing.assert_array_equal(root[f"3/{j}"].to_dask().compute(), np.arange(1111, dtype="<i8"))
        np.testing.assert_array_equal(
            root[f"19/{j}"].to_dask().compute(), np.arange(20000, dtype="<i4").reshape(200, 100, order="F")
        )
    for j in (0, 3):
        np.testing.assert_array_equal(root[f"10/{j}"].to_dask().compute(), np.linspace(0, 1, 3333))
    with pytest.warns(UserWarning, match="14/1.*fill_value 0"):  # nodes are cached: open anew to see the warning
        s1 = dask_loom.open_zarr(fixture, "14/1", mode="r").to_dask().compute()
    counts = dict(zip(*np.unique(s1, return_counts=True)))
    assert counts == {b"A": 1481, b"C": 1318, b"G": 1334, b"T": 1422}
    assert s1[:8].tolist() == [b"C", b"C", b"A", b"G", b"G", b"C", b"G", b"G"]
    with pytest.warns(UserWarning, match="15/2"):
        u = dask_loom.open_zarr(fixture, "15/2", mode="r").to_dask().compute()
    assert dict(zip(*np.unique(u, return_counts=True))) == {"baz": 1444, "foo": 1385, "quux": 1374, "bar": 1352}
    f = root["16/5"].to_dask().compute()
    assert int(np.isnan(f).sum()) == 1137
    assert np.nansum(f) == pytest.approx(650.2539682539682)
    assert int(root["17/6"].to_dask().compute().sum()) == 2808
    np.testing.assert_array_equal(
        root["21/1"].to_dask().compute(), np.arange(20000, dtype="<i4").reshape(20, 100, 10, order="F")
    )
    for name in ("flat", "flat_legacy", "meta", "nested"):
        np.testing.assert_array_equal(root[name].to_dask().compute(), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(root["nested_legacy"].to_dask().compute(), [[0, 0], [0, 0]])
    assert root["utf8attrs"].attributes == {"foo": "た"}


def test_z5py_store(zdata):
    from PIL import Image

    ref = np.asarray(Image.open(zdata / "zarr-implementations" / "reference_image.png"))
    assert int(ref.sum()) == 90_124_324
    g = dask_loom.open_zarr(zdata / "zarr-implementations" / "z5py.zr", mode="r")
    for name in ("blosc", "zlib"):
        a = g[name]
        assert a.chunk_shape == (100, 100, 1)
        np.testing.assert_array_equal(a.to_dask().compute(), ref)
    with pytest.raises(CorruptChunkError, match=r"array 'gzip', chunk 'gzip/0\.0\.0'.*not gzip.*zlib"):
        g["gzip"].to_dask().compute(scheduler="sync")
    with pytest.raises(CorruptChunkError, match="gzip/"):
        g["gzip"].get_chunk((5, 5, 2))


def test_cities(zdata):
    names = (zdata / "zarrs-tests" / "cities.csv").read_text(encoding="utf-8").splitlines()
    assert len(names) == 47_868
    for p in ("v3/cities.zarr", "zarr_python_compat/cities_v2.zarr", "zarr_python_compat/cities_v3.zarr"):
        a = dask_loom.open_zarr(zdata / "zarrs-tests" / p)
        assert a.dtype == "string"
        assert a.to_dask().compute().tolist() == names


def test_fill_values_and_strings(zdata):
    base = zdata / "zarrs-tests" / "zarr_python_compat"

    def read(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dask_loom.open_zarr(base / p).to_dask().compute()

    assert read("bool_v2_fv_null.zarr").tolist() == [True, False, False, False, False]
    assert read("int_v2_fv_null.zarr").tolist() == [42, 123, 0, 0, 0]
    np.testing.assert_array_equal(read("float_v2_fv_null.zarr"), np.array([3.14, 2.71, 0, 0, 0], dtype="f4"))
    assert read("str_v2_fv_null.zarr").tolist() == ["a", "bb", "", "", ""]
    # A numeric fill for an object (vlen) string array reads as zarr-python 3 reads it.
    zref = zarr.open_array(str(base / "str_v2_fv_0.zarr"), mode="r")[:].tolist()
    assert read("str_v2_fv_0.zarr").tolist() == zref == ["a", "bb", "", "", "0"]
    for p in ("fixed_length_utf32_v2_le.zarr", "fixed_length_utf32_v2_be.zarr", "fixed_length_utf32_v3_le.zarr"):
        assert read(p).tolist() == ["abc", "🎉", "hi", "te", ""]
    assert read("v3_bytes.zarr").tolist() == [b"New York", b"Los Angeles", b"Chicago"]
    for p in ("adler32.zarr", "fletcher32.zarr"):
        np.testing.assert_array_equal(read(p), np.arange(10000, dtype="u2").reshape(100, 100))


@pytest.mark.parametrize("unit", ["Y", "W", "D", "h", "m", "s", "ms", "us", "ns", "10ms", "10us"])
def test_datetimes(zdata, unit):
    a = dask_loom.open_zarr(zdata / "zarrs-tests" / "zarr_python_compat" / f"datetime64[{unit}].zarr")
    got = a.to_dask().compute()
    base = unit.lstrip("0123456789")
    ref = np.array(
        ["1970-01-01", "NaT", "2005-02-03", "2005-02-03T04:05", "2005-02-03T04:05:06", "NaT"], dtype="datetime64[ns]"
    ).astype(f"datetime64[{base}]")
    np.testing.assert_array_equal(got.astype(f"datetime64[{base}]"), ref)


def test_timedeltas(zdata):
    got = dask_loom.open_zarr(zdata / "zarrs-tests" / "zarr_python_compat" / "timedelta64[ps].zarr").to_dask().compute()
    assert got.dtype == np.dtype("m8[ps]")
    assert int(got[0].astype(np.int64)) == -5357488147419103232  # overflowed when written; kept as stored
    assert np.isnat(got[-1])
    ms = dask_loom.open_zarr(zdata / "zarrs-tests" / "zarr_python_compat" / "timedelta64[ms].zarr").to_dask().compute()
    assert ms[0] == np.timedelta64(8760, "h")
    assert ms[1] == np.timedelta64(2, "W")
    assert ms[8] == np.timedelta64(9, "s")


def test_zarrs_groups(zdata):
    g = dask_loom.open_zarr(zdata / "zarrs-tests" / "array_write_read.zarr")
    assert g["group"].attributes == {"foo": "bar"}
    a = g["group/array"]
    assert a.metadata["dimension_names"] == ["y", "x"]
    x = a.to_dask().compute()
    assert int(np.isnan(x[:4, :4]).sum()) == 16
    assert np.nansum(x.astype("f8")) == pytest.approx(-71.19999991357327)
    np.testing.assert_allclose(x[-1], [1, 1, 1, 1, -7.4, -7.5, -7.6, -7.7], rtol=1e-6)

    h = dask_loom.open_zarr(zdata / "zarrs-tests" / "hierarchy.zarr")
    assert [c.name for c in h.children] == ["a", "b"]
    assert sorted(h["a"].keys()) == ["baz", "foo"]
    assert h["b"].attributes == {"test_key": "test_value"}
    foo = h["a/foo"]
    assert foo.attributes == {"foo": 42, "bar": "apples", "baz": [1, 2, 3, 4]}
    x = foo.to_dask(chunks="chunks")  # lazily: 100 blocks, nothing read yet
    assert x.numblocks == (10, 10)
    assert x.shape == (10000, 1000)
    assert np.isnan(x.blocks[3, 7].compute()).all()
    assert np.isnan(foo.get_chunk((9, 9))).all()

    i = dask_loom.open_zarr(zdata / "zarrs-tests" / "issue_287.zarr")
    assert i["meta/date"].to_dask().compute().tolist() == np.array(
        ["2023-01-01", "2023-01-02", "2023-01-03"], dtype="datetime64[ms]"
    ).tolist()
    assert i["meta/collection"].to_dask().compute().tolist() == ["collection_a", "collection_b", "collection_c"]
    assert i["meta/bbox"].to_dask().compute()[0] == "POLYGON ((10 -10, 10 10, -10 10, -10 -10, 10 -10))"


def test_sharded_array(zdata):
    root = zdata / "zarrs-tests" / "sharded_array_write_read.zarr"
    with pytest.raises(NodeNotFoundError, match="no Zarr metadata"):
        dask_loom.open_zarr(root)
    a = dask_loom.open_zarr(root, "group/array")
    assert a.chunk_shape == (4, 8)
    assert a.inner_chunk_shape == (4, 4)
    x = a.to_dask(chunks="chunks")
    assert x.chunks == ((4, 4), (8,))
    np.testing.assert_array_equal(x.compute(), np.arange(64, dtype=np.uint16).reshape(8, 8))
    np.testing.assert_array_equal(a.get_chunk((1, 0)), np.arange(32, 64, dtype=np.uint16).reshape(4, 8))


# -- bad input ---------------------------------------------------------------------------------


def _copy(zdata, name, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(zdata / "zarrs-tests" / name, dst)
    dst.chmod(0o755)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def test_malformed_metadata(zdata, tmp_path):
    d = _copy(zdata, "v3_zarr_python/array_none.zarr", tmp_path)
    (d / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array", ')
    with pytest.raises(FormatError, match=r"'zarr.json' is not valid JSON"):
        dask_loom.open_zarr(d)
    (d / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array", "shape": [10]}))
    with pytest.raises(FormatError, match="invalid metadata"):
        dask_loom.open_zarr(d)
    d2 = _copy(zdata, "v2/array_none_C.zarr", tmp_path / "v2")
    (d2 / ".zarray").write_text("[1, 2]")
    (d2 / "zarr.json").unlink(missing_ok=True)
    with pytest.raises(FormatError, match=r"'\.zarray' holds a JSON list"):
        dask_loom.open_zarr(d2)


def test_unknown_codec(zdata, tmp_path):
    d = _copy(zdata, "v3_zarr_python/array_none.zarr", tmp_path)
    meta = json.loads((d / "zarr.json").read_text())
    meta["codecs"].append({"name": "no.such.codec", "configuration": {}})
    (d / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises((UnsupportedCodecError, FormatError), match=r"no\.such\.codec"):
        dask_loom.open_zarr(d).to_dask().compute(scheduler="sync")


def test_checksum_mismatch_names_the_chunk(tmp_path):
    store = LocalStore(tmp_path / "crc.zarr")
    z = zarr.create_array(store, name="a", shape=(20,), chunks=(10,), dtype="i4", compressors=None,
                          serializer={"name": "bytes"}, filters=None)
    zarr.create_array(store, name="b", shape=(20,), chunks=(10,), dtype="i4", compressors=[{"name": "crc32c"}], overwrite=True)
    b = zarr.open_array(store, path="b")
    b[:] = np.arange(20)
    raw = bytearray(store.get("b/c/1"))
    raw[0] ^= 0xFF
    store.set("b/c/1", bytes(raw))
    del z
    a = dask_loom.open_zarr(store, "b")
    np.testing.assert_array_equal(a.get_chunk((0,)), np.arange(10))
    with pytest.raises(CorruptChunkError, match=r"chunk 'b/c/1'.*checksum"):
        a.to_dask().compute(scheduler="sync")


def test_missing_path_and_bad_indices(tmp_path):
    with pytest.raises(NodeNotFoundError):
        dask_loom.open_zarr(tmp_path / "nothing.zarr")
    s = MemoryStore()
    zarr.create_array(s, name="x", shape=(5, 6), chunks=(4, 4), dtype="f8")
    a = dask_loom.open_zarr(s, "x")
    with pytest.raises(IndexError, match="outside the chunk grid"):
        a.get_chunk((2, 0))
    with pytest.raises(TypeError):
        a.get_chunk((0.5, 0))
    with pytest.raises(ValueError, match="expected"):
        a.set_chunk(np.zeros((2, 2)), (0, 0))
    with pytest.raises(TypeError, match="dtype"):
        a.set_chunk(np.zeros((4, 4), dtype="f4"), (0, 0))
    with pytest.raises(KeyError, match="no node 'y'"):
        dask_loom.open_zarr(s)["y"]


# -- chunk API ----------------------------------------------------------------------------------


def test_chunks_edges_futures_and_check_empty():
    s = MemoryStore()
    zarr.create_array(s, name="x", shape=(50, 60), chunks=(32, 32), dtype="i4", fill_value=100)
    a = dask_loom.open_zarr(s, "x")
    assert a._fill_value == 100
    assert (a.get_chunk((1, 1)) == 100).all()
    assert a.get_chunk((1, 1)).shape == (32, 32)
    ref = np.arange(3000, dtype="i4").reshape(50, 60)
    futs = []
    for i in range(2):
        for j in range(2):
            block = np.full((32, 32), 100, dtype="i4")
            part = ref[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32]
            block[: part.shape[0], : part.shape[1]] = part
            futs.append(a.set_chunk_future(block, (i, j)))
    [f.result() for f in futs]
    np.testing.assert_array_equal(a.to_dask().compute(), ref)
    edge = a.get_chunk_future((1, 1)).result()
    np.testing.assert_array_equal(edge[:18, :28], ref[32:, 32:])
    assert (edge[18:] == 100).all()
    assert (edge[:, 28:] == 100).all()
    # All-fill chunk with check_empty: the key is erased, not written.
    a.set_chunk(np.full((32, 32), 100, dtype="i4"), (0, 0))
    assert "x/c/0/0" not in s.list_prefix("x/")
    a.set_chunk(np.full((32, 32), 100, dtype="i4"), (0, 0), check_empty=False)
    assert "x/c/0/0" in s.list_prefix("x/")
    with dask.config.set({"dask_loom.io-threads": 3}):
        from dask_loom.zarr._nodes import executor

        assert executor()._max_workers == 3


def test_print_metadata(capsys):
    s = MemoryStore()
    zarr.create_array(s, name="x", shape=(3,), chunks=(2,), dtype="i2", attributes={"a": 1})
    dask_loom.open_zarr(s, "x").print_metadata()
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == [3]
    assert out["attributes"] == {"a": 1}


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    chunk=st.tuples(st.integers(3, 12), st.integers(3, 12)),
    shard_mult=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
)
def test_to_dask_blocks_are_whole_chunks(shape, chunk, shard_mult):
    s = MemoryStore()
    shards = None if shard_mult is None else (chunk[0] * shard_mult[0], chunk[1] * shard_mult[1])
    ref = np.arange(np.prod(shape), dtype="f8").reshape(shape)
    z = zarr.create_array(s, name="a", shape=shape, chunks=chunk, shards=shards, dtype="f8")
    z[:] = ref
    a = dask_loom.open_zarr(s, "a")
    unit = shards or chunk
    for x in (a.to_dask(), a.to_dask(chunks="chunks"), a.to_dask(target_bytes=8 * unit[0] * unit[1] * 3)):
        for sizes, u, n in zip(x.chunks, unit, shape):
            bounds = np.cumsum(sizes)[:-1]
            assert (bounds % u == 0).all()
            assert sum(sizes) == n
        np.testing.assert_array_equal(x.compute(scheduler="sync"), ref)
    assert {key_split(k) for k in a.to_dask().__dask_graph__()} == {"zarr-read"}


@pytest.mark.cluster
def test_to_dask_on_process_cluster(local_cluster, tmp_path):
    store = SlowStore(LocalStore(tmp_path / "a.zarr"), base_delay=0.001)
    ref = np.random.default_rng(0).random((100, 90))
    zarr.create_array(store, name="a", shape=ref.shape, chunks=(16, 16), shards=(32, 48), dtype="f8")[:] = ref
    x = dask_loom.open_zarr(store, "a").to_dask(chunks="chunks")
    assert x.numblocks == (4, 2)
    np.testing.assert_allclose(local_cluster.compute(x).result(), ref)
    np.testing.assert_allclose(local_cluster.compute(x.mean(axis=0)).result(), ref.mean(axis=0))


# -- aligned writes ----------------------------------------------------------------------------------


def _plain_dask_write(x, store, shape):
    z = zarr.create_array(store, name="plain", shape=shape, chunks=(5, 5), shards=(20, 20), dtype="f8", overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x.store(z, lock=False)
    return zarr.open_array(store.sub if hasattr(store, "sub") else store, path="plain")[:]


@pytest.mark.cluster
def test_to_zarr_misaligned_blocks_on_a_process_cluster(local_cluster, tmp_path):
    shape = (80, 80)
    ref = np.arange(6400, dtype="f8").reshape(shape) + 1
    # 7x7 blocks cut across the 20x20 shards: many tasks touch every shard.
    x = da.from_array(ref, chunks=(7, 7))
    local = LocalStore(tmp_path / "aligned.zarr")
    # A small delay per request widens the read-modify-write window, as a real object store does.
    slow = SlowStore(local, base_delay=0.01)
    out = dask_loom.to_zarr(x, slow, "aligned", chunks=(5, 5), shards=(20, 20), client=local_cluster)
    assert out.chunk_shape == (20, 20)
    np.testing.assert_array_equal(zarr.open_array(local, path="aligned")[:], ref)
    np.testing.assert_array_equal(out.to_dask().compute(), ref)

    # The plain dask path (blocks straight into shards, no lock) on the same cluster:
    # concurrent partial-shard writes overwrite each other.
    lost = []
    with dask.config.set(scheduler=local_cluster):
        for _ in range(3):
            got = _plain_dask_write(x, SlowStore(LocalStore(tmp_path / "plain.zarr"), base_delay=0.01), shape)
            lost.append(int((got != ref).sum()))
    assert max(lost) > 0, "the unaligned dask write kept every value this time"


def test_to_zarr_numpy_unsharded_and_v2(tmp_path):
    ref = np.random.default_rng(1).integers(0, 1000, (33, 17)).astype("i8")
    a = dask_loom.to_zarr(ref, LocalStore(tmp_path / "x.zarr"), "m", chunks=(8, 8), scheduler="sync")
    np.testing.assert_array_equal(a.to_dask().compute(), ref)
    b = dask_loom.to_zarr(da.from_array(ref, chunks=5), str(tmp_path / "v2.zarr"), "m", chunks=(10, 10), zarr_format=2)
    assert b.metadata["zarr_format"] == 2
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v2.zarr"), path="m")[:], ref)


def test_to_zarr_replaces_an_array_as_one_transaction(tmp_path):
    root = tmp_path / "s.zarr"
    g = zarr.open_group(str(root), mode="w")
    g.create_array("x", data=np.arange(100, dtype="f4").reshape(10, 10), chunks=(5, 5))
    g.create_array("y", data=np.arange(7, dtype="i8"), chunks=(3,))

    def boom(block):
        raise RuntimeError("compute failed half-way")

    bad = da.ones((10, 10), chunks=5, dtype="f4").map_blocks(boom, dtype="f4")
    with pytest.raises(RuntimeError, match="half-way"):
        dask_loom.to_zarr(bad, str(root), "x", chunks=(5, 5), scheduler="sync")
    # The failed write left the old array, and nothing beside the store.
    np.testing.assert_array_equal(zarr.open_array(str(root), path="x")[:], np.arange(100, dtype="f4").reshape(10, 10))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dlpart-")] == []
    new = np.full((12, 4), 3.5, dtype="f8")
    dask_loom.to_zarr(new, str(root), "x", chunks=(4, 4), scheduler="sync")
    np.testing.assert_array_equal(zarr.open_array(str(root), path="x")[:], new)
    np.testing.assert_array_equal(zarr.open_array(str(root), path="y")[:], np.arange(7))
    dask_loom.to_zarr(np.arange(5), str(root), "deep/er/z", chunks=(2,), scheduler="sync")
    assert zarr.open_array(str(root), path="deep/er/z")[:].tolist() == [0, 1, 2, 3, 4]
    assert sorted(k for k, _ in zarr.open_group(str(root), mode="r").members(max_depth=None)) == [
        "deep", "deep/er", "deep/er/z", "x", "y"
    ]


# -- conformance with simplezarr 0.0.1 and zarr-python (issue 12) ---------------------------------


def _tree(store):
    g = zarr.create_group(store)
    g.create_group("sub")
    a = g.create_array("sub/a", shape=(100, 100), chunks=(50, 50), dtype="f4", fill_value=0)
    a[:50, :50] = 1.0
    g.create_array("sub/b", shape=(3,), chunks=(2,), dtype="u2")
    g.create_array("top", shape=(), dtype="i8")
    return g


def test_structure_is_text_reprs_and_cached_nodes(capsys):
    s = MemoryStore()
    _tree(s)
    g = dask_loom.open_zarr(s)
    expected = "\n".join([
        "<ZarrGroup '' with 2 children>",
        "    <ZarrGroup 'sub' with 2 children>",
        "        <ZarrArray 'sub/a' 100x100 float32>",
        "        <ZarrArray 'sub/b' 3 uint16>",
        "    <ZarrArray 'top' () int64>",
    ])
    assert g.get_structure() == expected
    g.print_structure()
    assert capsys.readouterr().out == expected + "\n"
    assert g.get_structure(max_depth=0) == "<ZarrGroup '' with 2 children>"
    assert repr(g) == "\n".join(expected.splitlines()[:2] + expected.splitlines()[-1:])  # one level of children
    assert repr(g["sub/a"]) == "<ZarrArray 'sub/a' 100x100 float32>"
    assert repr(g["sub"]).count("<Zarr") == 3
    # Nodes are opened once (simplezarr caches them): one object per node.
    assert g["sub"]["a"] is g["sub/a"] is g["sub"]["a"]
    assert g.children[0] is g["sub"]
    assert g[""] is g
    import pickle

    copy = pickle.loads(pickle.dumps(g))
    assert copy.get_structure() == expected
    assert copy["sub"]["a"] is copy["sub/a"] is not g["sub/a"]


def test_get_chunk_outside_the_grid_is_an_index_error():
    """Deliberate (docs/zarr.md): simplezarr 0.0.1 returned a fill-value chunk, its later releases refuse too."""
    s = MemoryStore()
    _tree(s)
    a = dask_loom.open_zarr(s, "sub/a")
    np.testing.assert_array_equal(a.get_chunk((0, 0)), np.ones((50, 50), "f4"))
    np.testing.assert_array_equal(a.get_chunk((1, 1)), np.zeros((50, 50), "f4"))  # missing: the fill value
    for index in ((9, 0), (0, 2), (-1, 0)):
        with pytest.raises(IndexError, match=r"outside the chunk grid \(2, 2\)"):
            a.get_chunk(index)
        with pytest.raises(IndexError):
            a.get_chunk_future(index)


def test_folders_without_metadata_are_not_children(zdata, tmp_path):
    d = _copy(zdata, "hierarchy.zarr", tmp_path)
    (d / "OME").mkdir()
    (d / "OME" / "METADATA.ome.xml").write_text("<OME/>")  # as OME-Zarr downloads carry
    (d / "a" / "notes").mkdir()
    (d / "a" / "notes" / "readme.txt").write_text("x")
    for store in (LocalStore(d), zarr.storage.LocalStore(d, read_only=True)):
        g = dask_loom.open_zarr(store)
        ref = zarr.open_group(d, mode="r")
        assert g.keys() == sorted(ref.keys()) == ["a", "b"]
        assert g["a"].keys() == sorted(ref["a"].keys()) == ["baz", "foo"]
        assert "OME" not in repr(g) and "notes" not in g.get_structure()
        assert [c.name for c in g["a"].children] == ["baz", "foo"]
        with pytest.raises(KeyError, match="no node 'OME'"):
            g["OME"]


def _zip_arrays(group, prefix=""):
    out = {}
    for c in group.children:
        name = f"{prefix}{c.name}"
        if isinstance(c, ZarrArray):
            out[name] = c
        else:
            out.update(_zip_arrays(c, name + "/"))
    return out


def test_zipped_stores_open_read_only_from_an_object_or_a_path(data_dir):
    import pickle

    from zarr.storage import ZipStore

    path = data_dir / "anndata" / "anndata-archives" / "v0.7.0" / "adata.zarr.zip"
    ref = zarr.open_group(ZipStore(path, mode="r"), mode="r")
    for g in (dask_loom.open_zarr(ZipStore(path, mode="r")), dask_loom.open_zarr(path), dask_loom.open_zarr(str(path))):
        assert sorted(g.keys()) == sorted(ref.group_keys())
        arrays = _zip_arrays(g)
        assert len(arrays) == 79  # the MANIFEST's count
        for name in ("X/data", "X/indices", "obsm/array", "layers/array", "raw/X/data"):
            np.testing.assert_array_equal(arrays[name].to_dask().compute(scheduler="sync"), ref[name][:])
        x = g["X/data"].to_dask()
        assert float(x.sum().compute(scheduler="sync")) == 285.0
        # Shipped to a worker, the zip store is re-opened there.
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(x)).compute(scheduler="sync"), ref["X/data"][:])
    with pytest.raises(Exception, match="read-only"):
        dask_loom.open_zarr(path)["X/data"].set_chunk(np.zeros(228, "f4"), (0,), check_empty=False)


def test_v2_string_fill_values_match_zarr_python(tmp_path):
    s = LocalStore(tmp_path / "s.zarr")
    z = zarr.create_array(s, name="o", shape=(4,), chunks=(2,), dtype=str, zarr_format=2, fill_value="")
    z[:2] = np.array(["a", "b"])
    meta = json.loads(s.get("o/.zarray"))
    meta["fill_value"] = 0  # as zarr-python 2 and anndata wrote it
    s.set("o/.zarray", json.dumps(meta).encode())
    ref = zarr.open_array(s, path="o", mode="r")[:]
    a = dask_loom.open_zarr(s, "o")
    assert a.to_dask().compute(scheduler="sync").tolist() == ref.tolist() == ["a", "b", "0", "0"]
    assert a.get_chunk((1,)).tolist() == ref[2:].tolist()
    # Fixed-length strings: zarr-python 3 refuses fill 0; zarr-python 2 read np.zeros((), dtype) ('').
    u = zarr.create_array(s, name="u", shape=(4,), chunks=(2,), dtype="<U3", zarr_format=2, fill_value="")
    u[:2] = np.array(["ab", "c"])
    meta = json.loads(s.get("u/.zarray"))
    meta["fill_value"] = 0
    s.set("u/.zarray", json.dumps(meta).encode())
    with pytest.raises(TypeError, match="Invalid type: 0"):
        zarr.open_array(s, path="u", mode="r")
    with pytest.warns(UserWarning, match="fill_value 0 for string dtype <U3"):
        b = dask_loom.open_zarr(s, "u")
    assert b.to_dask().compute(scheduler="sync").tolist() == ["ab", "c", np.zeros((), "<U3")[()], ""]


def test_simplezarr_chunk_key_separator(tmp_path):
    """simplezarr writes the "default" key encoding with any separator (its tests use "-") under c/0-0."""
    meta = {
        "zarr_format": 3, "node_type": "array", "shape": [4, 6], "data_type": "uint16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 3]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "-"}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}], "fill_value": 7,
    }
    ref = np.arange(24, dtype="<u2").reshape(4, 6)
    data = {"x/zarr.json": json.dumps(meta).encode()}
    for i, j in ((0, 0), (0, 1), (1, 0)):
        data[f"x/c/{i}-{j}"] = ref[2 * i : 2 * i + 2, 3 * j : 3 * j + 3].tobytes()
    s = MemoryStore(data)
    a = dask_loom.open_zarr(s, "x")
    expected = ref.copy()
    expected[2:, 3:] = 7  # chunk (1, 1) is missing
    np.testing.assert_array_equal(a.to_dask().compute(scheduler="sync"), expected)
    np.testing.assert_array_equal(a.get_chunk((0, 1)), ref[:2, 3:])
    a.set_chunk(np.full((2, 3), 9, "<u2"), (1, 1))
    assert s.get("x/c/1-1") == np.full((2, 3), 9, "<u2").tobytes()
    bad = {**meta, "chunk_key_encoding": {"name": "default", "configuration": {"separator": "\\"}}}
    s.set("y/zarr.json", json.dumps(bad).encode())
    with pytest.raises(FormatError, match="separator"):
        dask_loom.open_zarr(s, "y")
