"""Sharded Zarr by default: layout written, values, reshard, request counts on S3, and shard faults.

Every value is checked against numpy (or loompy / anndata / zarr-python reading
the same store); the layout against the ``zarr.json`` documents on disk; the
request counts against the fault proxy's own log of what reached the S3 server.
"""

from __future__ import annotations

import json
import math
import pathlib
import uuid

import dask
import numpy as np
import pytest
import zarr
from conftest import make_matrix

import dask_loom
from dask_loom.errors import CorruptChunkError, FileBeingWrittenError, StoreError

# Several shards in a small array: small blocks, 64 x 64 inner chunks.
SMALL_BLOCKS = {"dask_loom.block-size": "256KiB", "dask_loom.loom-zarr-chunks": [64, 64]}


def _meta(store_dir: pathlib.Path, node: str) -> dict:
    return json.loads((store_dir / node / "zarr.json").read_text())


def _sharding(meta: dict) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(shard shape, inner chunk shape)`` of a v3 array document, or ``None`` when unsharded."""
    codecs = meta.get("codecs") or []
    if not codecs or codecs[0]["name"] != "sharding_indexed":
        return None
    return tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]), tuple(
        codecs[0]["configuration"]["chunk_shape"]
    )


# -- written sharded by default -------------------------------------------------------------


def test_loom_zarr_layers_are_sharded_and_read_back(tmp_path):
    m = make_matrix((300, 517), seed=1)
    spliced = make_matrix((300, 517), seed=2, dtype="int32")
    fn = tmp_path / "a.loom.zarr"
    with dask.config.set(SMALL_BLOCKS):
        dask_loom.create(
            str(fn),
            {"": m, "spliced": spliced},
            {"g": np.arange(300)},
            {"c": np.arange(517)},
            scheduler="sync",
        )
    for node, arr in (("matrix", m), ("layers/spliced", spliced)):
        shards, inner = _sharding(_meta(fn, node))
        assert inner == (64, 64)
        assert all(s % c == 0 for s, c in zip(shards, inner)) and math.prod(shards) > math.prod(inner)
        # about block-size bytes of whole inner chunks, up to 4x that where such a shard
        # would store less than coalesce-bytes (test_shard_sizing.py)
        assert math.prod(shards) * arr.dtype.itemsize <= 4 * 256 * 1024
        # zarr-python reads what was written; each shard's index is at its start (one bounded
        # range on every object store, Azure included)
        z = zarr.open_array(str(fn / node), mode="r")
        np.testing.assert_array_equal(z[:], arr)
        assert _meta(fn, node)["codecs"][0]["configuration"]["index_location"] == "start"
    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(str(fn), "r") as ds:
        x = ds.layers[""].dask
        shards = _sharding(_meta(fn, "matrix"))[0]
        for axis, sizes in enumerate(x.chunks):  # every dask block is whole shards
            assert all(b % shards[axis] == 0 for b in np.cumsum(sizes)[:-1])
        np.testing.assert_array_equal(ds[:, :], m)
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], spliced)
        mean, sd = ds.map([np.mean, np.std], axis=0, scheduler="sync")
    np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(sd, m.std(axis=1), rtol=1e-5)


def test_convert_from_loompy_writes_shards_equal_to_loompy(tmp_path, loompy_file):
    import loompy

    path, _ = loompy_file
    out = tmp_path / "ref.loom.zarr"
    with dask.config.set(SMALL_BLOCKS):
        dask_loom.convert(path, str(out), scheduler="sync")
    assert _sharding(_meta(out, "matrix")) is not None
    assert _sharding(_meta(out, "layers/spliced")) is not None
    with loompy.connect(str(path), "r") as lp, dask_loom.connect(str(out), "r") as ds:
        np.testing.assert_array_equal(ds[:, :], lp[:, :])
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], lp.layers["spliced"][:, :])


def test_new_layer_and_add_columns_stay_sharded(tmp_path):
    m = make_matrix((200, 150), seed=3)
    fn = tmp_path / "b.loom.zarr"
    with dask.config.set(SMALL_BLOCKS):
        dask_loom.create(str(fn), m, {"g": np.arange(200)}, {"c": np.arange(150)}, scheduler="sync")
        with dask_loom.connect(str(fn), "r+") as ds:
            ds.layers["twice"] = 2 * m
            extra = make_matrix((200, 70), seed=4)
            ds.add_columns({"": extra, "twice": 2 * extra}, {"c": np.arange(150, 220)})
            np.testing.assert_array_equal(ds[:, :], np.hstack([m, extra]))
            np.testing.assert_array_equal(ds.layers["twice"][:, :], 2 * np.hstack([m, extra]))
    assert _sharding(_meta(fn, "layers/twice")) is not None
    np.testing.assert_array_equal(zarr.open_array(str(fn / "matrix"), mode="r")[:], np.hstack([m, extra]))


def test_anndata_zarr_dense_and_csr_are_sharded_and_read_by_anndata(tmp_path):
    import anndata
    import scipy.sparse as sp

    from dask_loom.anndata import anndata_target

    dense = make_matrix((500, 120), seed=5)
    csr = sp.csr_matrix(make_matrix((500, 120), seed=6, density=0.05))
    fn = tmp_path / "a.zarr"
    with dask.config.set(SMALL_BLOCKS):
        dask_loom.store(
            dense,
            anndata_target(str(fn), "layers/dense", shape=dense.shape, dtype="f4", chunks=(50, 120)),
            scheduler="sync",
        )
        dask_loom.store(
            csr,
            anndata_target(str(fn), "X", shape=csr.shape, dtype="f4", encoding="csr", chunks=40),
            scheduler="sync",
        )
    shards, inner = _sharding(_meta(fn, "layers/dense"))
    assert inner == (50, 120) and shards[0] > 50 and shards[0] % 50 == 0
    for name in ("data", "indices"):
        assert _sharding(_meta(fn, f"X/{name}")) is not None
    g = zarr.open_group(str(fn), mode="r")
    np.testing.assert_array_equal(anndata.io.read_elem(g["layers/dense"]), dense)
    got = anndata.io.read_elem(g["X"])
    assert (got != csr).nnz == 0 and got.shape == csr.shape


# -- unsharded stores, and reshard ------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
def test_unsharded_zarr_python_array_reads_and_reshards(tmp_path, fmt):
    ref = np.arange(300 * 200, dtype="f4").reshape(300, 200)
    fn = tmp_path / "z.zarr"
    zarr.create_array(str(fn), shape=ref.shape, chunks=(64, 64), dtype="f4", zarr_format=fmt)[:] = ref
    z = dask_loom.open_zarr(str(fn))
    np.testing.assert_array_equal(z.to_dask().compute(scheduler="sync"), ref)
    with dask.config.set(SMALL_BLOCKS):
        assert dask_loom.reshard(str(fn), scheduler="sync") == ["/"]
        assert dask_loom.reshard(str(fn), scheduler="sync") == []  # already sharded: left alone
    shards, inner = _sharding(json.loads((fn / "zarr.json").read_text()))
    assert inner == (64, 64) and math.prod(shards) > 64 * 64
    assert not (fn / ".zarray").exists()
    np.testing.assert_array_equal(zarr.open_array(str(fn), mode="r")[:], ref)
    np.testing.assert_array_equal(dask_loom.open_zarr(str(fn)).to_dask().compute(scheduler="sync"), ref)


def test_reshard_unsharded_loom_zarr(tmp_path, loompy_file):
    import loompy

    path, _ = loompy_file
    fn = tmp_path / "old.loom.zarr"
    # A .loom.zarr as dask_loom wrote them before sharding: one object per chunk.
    with dask.config.set({"dask_loom.block-size": 1}):
        dask_loom.convert(path, str(fn), chunks=(64, 64), scheduler="sync")
    assert _sharding(_meta(fn, "matrix")) is None
    with dask.config.set(SMALL_BLOCKS):
        done = dask_loom.reshard(str(fn), scheduler="sync")
    assert sorted(done) == ["layers/spliced", "matrix"]
    assert _sharding(_meta(fn, "matrix"))[1] == (64, 64)
    with loompy.connect(str(path), "r") as lp, dask_loom.connect(str(fn), "r") as ds:
        np.testing.assert_array_equal(ds[:, :], lp[:, :])
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], lp.layers["spliced"][:, :])
        np.testing.assert_array_equal(ds.ca["CellID"], lp.ca["CellID"])


def test_real_sharded_store_reads_through_the_direct_reader(data_dir):
    from dask_loom.zarr import _chunks

    before = _chunks.STATS["direct_reads"]
    z = dask_loom.open_zarr(str(data_dir / "zarr/zarrs-tests/sharded_array_write_read.zarr"), "group/array")
    np.testing.assert_array_equal(
        z.to_dask().compute(scheduler="sync"), np.arange(64, dtype=np.uint16).reshape(8, 8)
    )
    assert _chunks.STATS["direct_reads"] > before


# -- faults ---------------------------------------------------------------------------------------


def _sharded_array(fn: pathlib.Path, ref: np.ndarray, *, crc: bool, at: str = "end") -> None:
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    index = [BytesCodec(), Crc32cCodec()] if crc else [BytesCodec()]
    codec = ShardingCodec(
        chunk_shape=(16, 16), codecs=[BytesCodec(), ZstdCodec()], index_codecs=index, index_location=at
    )
    z = zarr.create_array(
        str(fn), shape=ref.shape, chunks=(64, 64), serializer=codec, compressors=None, dtype=ref.dtype
    )
    z[:] = ref


@pytest.mark.parametrize("at", ["end", "start"])  # zarr's default; what dask_loom writes
def test_truncated_shard_index_is_refused_naming_the_shard(tmp_path, at):
    ref = np.arange(128 * 64, dtype="f4").reshape(128, 64)
    fn = tmp_path / "t.zarr"
    _sharded_array(fn, ref, crc=True, at=at)
    shard = fn / "c" / "1" / "0"
    shard.write_bytes(shard.read_bytes()[:30])  # shorter than its index
    with pytest.raises(CorruptChunkError, match=r"shard 'c/1/0'.*truncated"):
        dask_loom.open_zarr(str(fn)).to_dask().compute(scheduler="sync")


def _point_outside(shard: pathlib.Path, at: str = "end") -> None:
    raw = bytearray(shard.read_bytes())
    n = 16 * 16  # 4 x 4 inner chunks, 16 bytes each, no checksum
    where = slice(len(raw) - n, len(raw)) if at == "end" else slice(0, n)
    index = np.frombuffer(bytes(raw[where]), "<u8").copy()
    index[0] = len(raw) + 1000  # first inner chunk's offset: past the object's end
    raw[where] = index.tobytes()
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("at", ["end", "start"])
def test_shard_index_pointing_outside_is_refused(tmp_path, at):
    ref = np.arange(128 * 64, dtype="f4").reshape(128, 64)
    fn = tmp_path / "o.zarr"
    _sharded_array(fn, ref, crc=False, at=at)
    _point_outside(fn / "c" / "0" / "0", at)
    with pytest.raises(CorruptChunkError, match=r"shard 'c/0/0'.*points outside the object"):
        dask_loom.open_zarr(str(fn)).to_dask().compute(scheduler="sync")


def _blosc_sharded(fn: pathlib.Path, ref: np.ndarray, inner: tuple[int, int], shards: tuple[int, int]) -> None:
    z = zarr.create_array(
        str(fn), shape=ref.shape, chunks=inner, shards=shards, dtype=ref.dtype,
        compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    )  # fmt: skip
    z[:] = ref


def test_blosc_chunk_whose_header_gives_another_size_is_refused(tmp_path):
    """A blosc header that gives another decoded size: an error naming the shard and the inner chunk, not garbage."""
    ref = np.random.default_rng(0).integers(0, 50, (128, 128)).astype("u2")
    fn = tmp_path / "h.zarr"
    _blosc_sharded(fn, ref, (32, 32), (128, 128))
    np.testing.assert_array_equal(dask_loom.open_zarr(str(fn)).to_dask().compute(scheduler="sync"), ref)
    shard = fn / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    n = 16 * 16 + 4  # 4 x 4 inner chunks, 16 bytes each, and zarr's CRC32C of the index
    offset = int(np.frombuffer(bytes(raw[-n : -n + 8]), "<u8")[0])  # the first inner chunk
    raw[offset + 4 : offset + 8] = (32 * 32 * 2 - 64).to_bytes(4, "little")  # blosc's decoded size
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match=r"h\.zarr.*shard 'c/0/0', inner chunk \(0, 0\): .*blosc"):
        dask_loom.open_zarr(str(fn)).to_dask().compute(scheduler="sync")


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_sharded_blosc_regions_equal_zarr_python(tmp_path, scheduler):
    """Sharded blosc reads through the direct reader: edges, unwritten chunks (fill) and any dask chunking."""
    rng = np.random.default_rng(2)
    ref = (rng.integers(1, 50, (700, 523)) * (rng.random((700, 523)) < 0.08)).astype("u2")
    ref[:128, 64:192] = 0  # whole inner chunks of zeros: zarr-python does not write them
    fn = tmp_path / "r.zarr"
    z = zarr.create_array(
        str(fn), shape=ref.shape, chunks=(64, 64), shards=(256, 256), dtype=ref.dtype, fill_value=0,
        compressors=[zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    )  # fmt: skip
    z[:] = ref
    index = np.frombuffer((fn / "c" / "0" / "0").read_bytes()[-(16 * 16 + 4) : -4], "<u8").reshape(16, 2)
    assert (index[:, 0] == 2**64 - 1).sum() == 4  # the zeroed inner chunks are absent: read as the fill
    arr = dask_loom.open_zarr(str(fn))
    for chunks in (None, "chunks", (300, 200), (77, 523)):
        x = arr.to_dask() if chunks is None else arr.to_dask(chunks=chunks)
        np.testing.assert_array_equal(x.compute(scheduler=scheduler), zarr.open_array(str(fn))[:])
    np.testing.assert_array_equal(arr.to_dask()[5:690:7, 100:400].compute(scheduler=scheduler), ref[5:690:7, 100:400])


def test_layer_replaced_with_other_inner_chunks_reads_the_new_layout(tmp_path):
    """An open reader meets a layer replaced (directory exchange) with other inner chunks: new values, never garbage."""
    m = make_matrix((300, 517), seed=1)
    fn = tmp_path / "r.loom.zarr"
    with dask.config.set(SMALL_BLOCKS):
        dask_loom.create(str(fn), {"": m, "L": m}, {"g": np.arange(300)}, {"c": np.arange(517)}, scheduler="sync")
    new = m * 2 + 1
    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(str(fn), "r") as ds:
        np.testing.assert_array_equal(ds.layers["L"][:50, :50], m[:50, :50])  # layout read, indexes cached
        x = ds.layers["L"].dask  # a graph built before the replacement
        dask_loom.to_zarr(new, str(fn), "layers/L", chunks=(32, 128), shards=(64, 256), scheduler="sync")
        assert _sharding(_meta(fn, "layers/L"))[1] == (32, 128)
        np.testing.assert_array_equal(ds.layers["L"][:, :], new)
        np.testing.assert_array_equal(x.compute(scheduler="sync"), new)
        # A replacement of another shape cannot be read as the opened layer: a typed error, not data.
        dask_loom.to_zarr(new[:, :100], str(fn), "layers/L", scheduler="sync")
        with pytest.raises(FileBeingWrittenError, match=r"layers/L.*replaced by one of shape \(300, 100\)"):
            ds.layers["L"][:10, :10]


# -- on the S3 server behind the counting proxy -------------------------------------------------------


def _upload(s3_server, local: pathlib.Path) -> str:
    import s3fs

    key = f"{s3_server['bucket']}/{uuid.uuid4().hex}/{local.name}"
    s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True).put(
        str(local), key, recursive=True
    )
    return f"s3://{key}"


@pytest.mark.s3
def test_map_over_sharded_loom_zarr_on_s3_few_requests(tmp_path, s3_server, s3_proxy):
    rng = np.random.default_rng(9)
    m = (rng.random((1024, 4096)) * 100).astype("f4")  # incompressible: 16 MiB stored
    fn = tmp_path / "big.loom.zarr"
    with dask.config.set({"dask_loom.block-size": "8MiB"}):
        dask_loom.create(str(fn), m, {"g": np.arange(1024)}, {"c": np.arange(4096)}, scheduler="sync")
    sizes = [p.stat().st_size for p in (fn / "matrix" / "c").rglob("*") if p.is_file()]
    assert len(sizes) >= 2
    url = _upload(s3_server, fn)
    proxy = s3_proxy(latency=0.0)
    with (
        dask.config.set({"dask_loom.block-size": "8MiB"}),
        dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds,
    ):
        proxy.reset_counts()
        mean, sd = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        snap = proxy.snapshot()
        # Ranged answers cut short on the way (a tail with its index, 4 MiB pieces): asked again.
        proxy.inject("short", 3)
        again = ds.map([np.mean], axis=0, scheduler="threads")[0]
        assert proxy.pending == 0
    np.testing.assert_array_equal(again, mean)
    np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(sd, m.std(axis=1), rtol=1e-4)
    stored = sum(sizes)
    mib4 = 4 << 20
    # One request per started 4 MiB of each shard (its index comes with its last 4 MiB), no HEADs.
    assert snap["total_requests"] <= sum(math.ceil(s / mib4) for s in sizes), snap
    assert snap["requests"].get("HEAD", 0) == 0
    assert snap["total_requests"] <= math.ceil(stored / mib4) + len(sizes) - 1
    assert snap["bytes"]["GET"] >= stored - 4096  # every byte of every shard read once


@pytest.mark.s3
def test_short_answers_on_s3_are_retried_never_a_short_block(tmp_path, s3_server, s3_proxy):
    rng = np.random.default_rng(10)
    ref = (rng.random((128, 64)) * 10).astype("f4")
    fn = tmp_path / "s.zarr"
    _sharded_array(fn, ref, crc=True)
    url = _upload(s3_server, fn)
    proxy = s3_proxy()
    z = dask_loom.open_zarr(url, mode="r", **proxy.storage_options)
    proxy.inject("short", 2)
    np.testing.assert_array_equal(z.to_dask().compute(scheduler="sync"), ref)
    assert proxy.pending == 0
    z = dask_loom.open_zarr(url, mode="r", **proxy.storage_options)
    proxy.always("short")
    try:
        # Every answer short: refused (after retries), naming the shard; never a block with missing values.
        with (
            dask.config.set({"dask_loom.retries": 1}),
            pytest.raises((CorruptChunkError, StoreError), match=r"c/\d/0"),
        ):
            z.to_dask().compute(scheduler="sync")
    finally:
        proxy.clear()


@pytest.mark.s3
@pytest.mark.parametrize("at", ["end", "start"])
def test_shard_index_outside_the_object_on_s3(tmp_path, s3_server, s3_proxy, at):
    ref = np.arange(128 * 64, dtype="f4").reshape(128, 64)
    fn = tmp_path / "o.zarr"
    _sharded_array(fn, ref, crc=False, at=at)
    _point_outside(fn / "c" / "1" / "0", at)
    url = _upload(s3_server, fn)
    proxy = s3_proxy()
    with pytest.raises(CorruptChunkError, match=r"shard 'c/1/0'.*points outside the object"):
        dask_loom.open_zarr(url, mode="r", **proxy.storage_options).to_dask().compute(scheduler="sync")


@pytest.mark.s3
@pytest.mark.parametrize("at", ["end", "start"])
def test_empty_shard_object_on_s3_is_a_truncated_shard(tmp_path, s3_server, at):
    """S3 answers a ranged GET on an empty object with 416: the reader says the shard is truncated, as on disk."""
    ref = np.arange(128 * 64, dtype="f4").reshape(128, 64)
    fn = tmp_path / "e.zarr"
    _sharded_array(fn, ref, crc=True, at=at)
    (fn / "c" / "1" / "0").write_bytes(b"")
    url = _upload(s3_server, fn)
    with pytest.raises(CorruptChunkError, match=r"shard 'c/1/0'.*truncated"):
        dask_loom.open_zarr(url, mode="r", **s3_server["storage_options"]).to_dask().compute(scheduler="sync")
