"""MappedCollection's direct zarr path (byte ranges + cached shard indexes) against anndata.read_zarr."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import warnings
import zipfile

import anndata as ad
import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec

from dask_loom import MappedCollection
from dask_loom.anndata import open_store
from dask_loom.anndata._read import read_vector
from dask_loom.errors import CorruptChunkError
from dask_loom.zarr import _chunks as _zchunks

N_OBS, N_VARS = 120, 14


def _adata(seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(N_OBS, N_VARS, density=0.3, format="csr", dtype=np.float32, random_state=seed)
    x.data[:] = rng.integers(1, 50, x.nnz)
    dense = rng.random((N_OBS, N_VARS)).astype(np.float32)
    dense[16:48] = 0  # all-fill chunks: absent objects / absent inner chunks / an absent shard
    a = ad.AnnData(
        x,
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], N_OBS))},
            index=[f"c{seed}_{i}" for i in range(N_OBS)],
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(N_VARS)]),
    )
    a.layers["dense"] = dense
    a.obsm["emb"] = rng.random((N_OBS, 3))
    return a


def _custom_sharded(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """A 1-D array in shards with the index at the start, no crc32c, big-endian blosc inner chunks."""
    del group[name]
    arr = zarr.create(
        shape=values.shape,
        chunks=(40,),
        dtype=values.dtype,
        store=group.store,
        path=f"{group.path}/{name}",
        zarr_format=3,
        codecs=[
            ShardingCodec(
                chunk_shape=(8,),
                codecs=[BytesCodec(endian="big"), BloscCodec(cname="lz4")],
                index_codecs=[BytesCodec()],
                index_location="start",
            )
        ],
    )
    arr[:] = values


def _rechunk(path: str, a: ad.AnnData) -> None:
    """Several chunks per array (anndata writes these small arrays as one chunk)."""
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    for key, value, chunks in [
        ("X", a.X, (40,)),
        ("layers/dense", a.layers["dense"], (16, 5)),
        ("obsm/emb", a.obsm["emb"], (32, 2)),
    ]:
        del g[key]
        ad.io.write_elem(g, key, value, dataset_kwargs={"chunks": chunks})
    zarr.consolidate_metadata(path)


def _write_variants(tmp) -> dict[str, str]:
    warnings.simplefilter("ignore")
    out = {}
    # zarr v2, anndata's codecs (blosc-lz4)
    out["v2"] = str(tmp / "v2.zarr")
    with ad.settings.override(zarr_write_format=2):
        a = _adata(0)
        a.write_zarr(out["v2"])
        _rechunk(out["v2"], a)
    # zarr v3, unsharded (zstd)
    out["v3"] = str(tmp / "v3.zarr")
    with ad.settings.override(zarr_write_format=3):
        a = _adata(1)
        a.write_zarr(out["v3"])
        _rechunk(out["v3"], a)
    # zarr v3 sharded: CSR vectors in 16-element chunks, 64-element shards; dense layer in 2-D shards
    out["v3_sharded"] = str(tmp / "v3s.zarr")
    a = _adata(2)
    with ad.settings.override(zarr_write_format=3):
        a.write_zarr(out["v3_sharded"])
        g = zarr.open_group(out["v3_sharded"], mode="r+", use_consolidated=False)
        del g["X"]
        ad.io.write_elem(g, "X", a.X, dataset_kwargs={"chunks": (16,), "shards": (64,)})
        del g["layers/dense"]
        ad.io.write_elem(
            g, "layers/dense", a.layers["dense"], dataset_kwargs={"chunks": (8, 3), "shards": (16, 6)}
        )
        zarr.consolidate_metadata(out["v3_sharded"])
    # zarr v3, hand-built codecs: index at the start, no checksum, big-endian, blosc; gzip indptr
    out["v3_custom"] = str(tmp / "v3c.zarr")
    a = _adata(3)
    with ad.settings.override(zarr_write_format=3):
        a.write_zarr(out["v3_custom"])
    g = zarr.open_group(out["v3_custom"], mode="r+", use_consolidated=False)
    x = g["X"]
    _custom_sharded(x, "data", a.X.data.astype(np.float32))
    _custom_sharded(x, "indices", a.X.indices.astype(np.int32))
    del x["indptr"]
    ip = x.create_array("indptr", shape=(N_OBS + 1,), chunks=(50,), dtype="i8", compressors=[GzipCodec()])
    ip[:] = a.X.indptr
    zarr.consolidate_metadata(out["v3_custom"])
    # the sharded store, zipped
    out["v3_zip"] = str(tmp / "v3s.zarr.zip")
    with zipfile.ZipFile(out["v3_zip"], "w") as zf:
        for root, _dirs, files in os.walk(out["v3_sharded"]):
            for fn in files:
                full = os.path.join(root, fn)
                zf.write(full, os.path.relpath(full, out["v3_sharded"]))
    warnings.resetwarnings()
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    paths = _write_variants(tmp_path_factory.mktemp("zdirect"))
    refs = {}
    for name, p in paths.items():
        src = paths["v3_sharded"] if name == "v3_zip" else p
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refs[name] = ad.read_zarr(src)
    return paths, refs


NAMES = ["v2", "v3", "v3_sharded", "v3_custom", "v3_zip"]


def _check_items(items, ref, idx):
    x = ref.X.toarray()
    for item, i in zip(items, idx):
        np.testing.assert_array_equal(item["X"], x[i])
        np.testing.assert_array_equal(item["dense"], ref.layers["dense"][i])
        np.testing.assert_array_equal(item["obsm_emb"], ref.obsm["emb"][i])


@pytest.mark.parametrize("name", NAMES)
def test_items_equal_read_zarr_and_direct_path_used(variants, name):
    paths, refs = variants
    ref = refs[name]
    before = dict(_zchunks.STATS)
    mc = MappedCollection([paths[name]], layers_keys=["X", "dense"], obsm_keys="emb")
    idx = np.random.default_rng(5).permutation(N_OBS)[:70]
    items = mc.__getitems__(idx.tolist())
    _check_items(items, ref, idx)
    _check_items([mc[int(i)] for i in idx[:5]], ref, idx[:5])
    assert _zchunks.STATS["direct_reads"] > before["direct_reads"]
    assert _zchunks.STATS["chunks_decoded"] > before["chunks_decoded"]
    assert _zchunks.STATS["fallback_arrays"] == before["fallback_arrays"]
    mc.close()


@pytest.mark.parametrize("name", ["v3_sharded", "v3_custom"])
def test_shard_indexes_cached(variants, name):
    paths, refs = variants
    mc = MappedCollection([paths[name]])
    rows = [3, 50, 51, 99]
    mc.__getitems__(rows)
    n = _zchunks.STATS["index_reads"]
    assert n > 0
    items = mc.__getitems__(rows)
    assert _zchunks.STATS["index_reads"] == n  # served from the cache
    np.testing.assert_array_equal(np.stack([i["X"] for i in items]), refs[name].X[rows].toarray())
    mc.close()


def test_iter_batches_and_dask_equal_read_zarr(variants):
    paths, refs = variants
    mc = MappedCollection([paths[n] for n in NAMES], layers_keys=["X", "dense"], obsm_keys="emb")
    x = np.concatenate([refs[n].X.toarray() for n in NAMES])
    dense = np.concatenate([refs[n].layers["dense"] for n in NAMES])
    got_x = np.full_like(x, -1)
    got_d = np.full_like(dense, -1)
    for batch in mc.iter_batches(32, block_size=8, preload_blocks=4, seed=1, sparse=True):
        got_x[batch["_index"]] = batch["X"].toarray()
        got_d[batch["_index"]] = batch["dense"].toarray()
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_d, dense)
    np.testing.assert_array_equal(mc.to_dask().compute(scheduler="threads"), x)
    np.testing.assert_array_equal(mc.to_dask("dense").compute(scheduler="sync"), dense)


def test_switched_off_gives_same_values_through_zarr(variants):
    paths, refs = variants
    idx = [0, 17, 40, 41, 119]
    with dask.config.set({"dask_loom.anndata-zarr-direct": False}):
        mc = MappedCollection([paths["v3_sharded"]], layers_keys=["X", "dense"], obsm_keys="emb")
        before = _zchunks.STATS["direct_reads"]
        items = mc.__getitems__(idx)
        assert _zchunks.STATS["direct_reads"] == before
    _check_items(items, refs["v3_sharded"], idx)
    mc.close()


@pytest.fixture(scope="module")
def sharded_vector(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("zvec") / "v.zarr")
    g = zarr.open_group(path, mode="w", zarr_format=3)
    values = np.arange(1000, dtype=np.int64) * 3
    values[200:300] = 0  # absent inner chunks
    a = g.create_array("v", shape=(1000,), chunks=(16,), shards=(128,), dtype="i8")
    a[:] = values
    return open_store(path), values


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 200)), min_size=1, max_size=12))
def test_read_vector_ranges_equal_numpy(sharded_vector, runs):
    store, values = sharded_vector
    starts = np.array([a for a, _ in runs], dtype=np.int64)
    stops = np.minimum(starts + np.array([n for _, n in runs]), 1000)
    got = read_vector(store, "v", starts, stops)
    want = np.concatenate([values[a:b] for a, b in zip(starts, stops)])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == values.dtype


@pytest.fixture(scope="module")
def blosc_vector(tmp_path_factory):
    # As anndata writes CSR vectors to Zarr v2: blosc, unsharded (whole chunks decode into the result).
    path = str(tmp_path_factory.mktemp("zvec2") / "v.zarr")
    g = zarr.open_group(path, mode="w", zarr_format=2)
    values = np.random.default_rng(7).integers(0, 50, 1000).astype(np.float32)
    values[320:400] = 0  # absent chunks (the fill)
    from numcodecs import Blosc

    a = g.create_array(
        "v", shape=(1000,), chunks=(16,), dtype="f4", compressors=Blosc("lz4", 5, Blosc.SHUFFLE)
    )
    a[:] = values
    return path, values


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 200)), min_size=1, max_size=12))
def test_read_vector_ranges_of_a_blosc_vector_equal_numpy(blosc_vector, runs):
    path, values = blosc_vector
    assert not os.path.exists(os.path.join(path, "v", "21"))  # an absent chunk in range
    starts = np.array([a for a, _ in runs], dtype=np.int64)
    stops = np.minimum(starts + np.array([n for _, n in runs]), 1000)
    got = read_vector(open_store(path), "v", starts, stops)
    want = np.concatenate([values[a:b] for a, b in zip(starts, stops)])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == values.dtype


@pytest.mark.parametrize("how", ["size", "truncated", "header"])
def test_corrupt_blosc_chunk_read_whole_raises_naming_it(blosc_vector, tmp_path, how):
    src, _ = blosc_vector
    path = str(tmp_path / "bad.zarr")
    shutil.copytree(src, path)
    fn = os.path.join(path, "v", "2")
    with open(fn, "rb") as fh:
        raw = bytearray(fh.read())
    if how == "size":
        raw[4:8] = (8 * 16).to_bytes(4, "little")  # claims twice the chunk's bytes
    elif how == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw = raw[:10]
    with open(fn, "wb") as fh:
        fh.write(bytes(raw))
    with pytest.raises(CorruptChunkError, match=r"chunk 'v/2'"):
        read_vector(open_store(path), "v", np.array([0]), np.array([100]))


def test_blosc_chunk_with_trailing_bytes_is_read(blosc_vector, tmp_path):
    """Bytes after the length a blosc header gives are ignored, as numcodecs ignores them (z5py pads its chunks)."""
    src, values = blosc_vector
    path = str(tmp_path / "padded.zarr")
    shutil.copytree(src, path)
    fn = os.path.join(path, "v", "2")
    with open(fn, "ab") as fh:
        fh.write(b"\0" * 16)
    np.testing.assert_array_equal(read_vector(open_store(path), "v", np.array([0]), np.array([100])), values[:100])
    np.testing.assert_array_equal(read_vector(open_store(path), "v", np.array([35]), np.array([40])), values[35:40])


def test_rewritten_shard_is_read_again(variants, tmp_path):
    paths, _ = variants
    path = str(tmp_path / "copy.zarr")
    shutil.copytree(paths["v3_sharded"], path)
    mc = MappedCollection([path], layers_keys="dense")
    before = np.stack([i["dense"] for i in mc.__getitems__(list(range(0, N_OBS, 5)))])
    arr = zarr.open_array(path, path="layers/dense", mode="r+")
    new = np.asarray(arr[:]) + 1
    arr[:] = new
    after = np.stack([i["dense"] for i in mc.__getitems__(list(range(0, N_OBS, 5)))])
    np.testing.assert_array_equal(after, new[::5])
    np.testing.assert_array_equal(after, before + 1)
    mc.close()


def _corrupt(path: str, key: str, how: str) -> None:
    fn = os.path.join(path, *key.split("/"))
    with open(fn, "rb") as fh:
        raw = bytearray(fh.read())
    if how == "index":
        raw[-10] ^= 0xFF  # inside the index, before its crc32c
    elif how == "chunk":
        raw[0:8] = b"\0" * 8  # the first inner chunk's zstd frame header
    else:
        raw = raw[: len(raw) // 2]
    with open(fn, "wb") as fh:
        fh.write(bytes(raw))


@pytest.mark.parametrize("how", ["index", "chunk", "truncated"])
def test_corrupt_shards_raise_naming_the_shard(variants, tmp_path, how):
    paths, _ = variants
    path = str(tmp_path / f"bad_{how}.zarr")
    shutil.copytree(paths["v3_sharded"], path)
    _corrupt(path, "X/data/c/0", how)
    mc = MappedCollection([path])
    with pytest.raises(CorruptChunkError, match=r"X/data") as info:
        mc.__getitems__([0, 1])
    assert path in str(info.value)
    mc.close()


def test_batch_over_many_files_does_not_deadlock(tmp_path):
    # More (file, key) jobs than the thread pool has threads: nested pools ran out of workers.
    warnings.simplefilter("ignore")
    paths = []
    for i in range(20):
        p = str(tmp_path / f"f{i}.zarr")
        ad.AnnData(sp.random(6, 4, density=0.5, format="csr", dtype=np.float32, random_state=i)).write_zarr(p)
        paths.append(p)
    warnings.resetwarnings()
    mc = MappedCollection(paths)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        items = ex.submit(mc.__getitems__, list(range(0, 120, 2))).result(timeout=120)
    ref = sp.vstack([ad.read_zarr(p).X for p in paths]).toarray()
    np.testing.assert_array_equal(np.stack([i["X"] for i in items]), ref[::2])


@pytest.mark.s3
def test_s3_direct_reads(variants, s3_server):
    s3fs = pytest.importorskip("s3fs")
    paths, refs = variants
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = s3_server["bucket"]
    names = ["v2", "v3_sharded", "v3_custom", "v3_zip"]
    urls = []
    for n in names:
        target = f"{bucket}/zdirect/{os.path.basename(paths[n])}"
        if os.path.isdir(paths[n]):
            fs.put(paths[n], target, recursive=True)
        else:
            fs.put(paths[n], target)
        urls.append(f"s3://{target}")
    mc = MappedCollection(
        urls, layers_keys=["X", "dense"], obsm_keys="emb", storage_options=s3_server["storage_options"]
    )
    before = _zchunks.STATS["direct_reads"]
    s3_server["stats"].reset()
    idx = np.random.default_rng(2).permutation(mc.n_obs)[:150]
    items = mc.__getitems__(idx.tolist())
    assert _zchunks.STATS["direct_reads"] > before
    assert s3_server["stats"].range_requests > 0
    for k, n in enumerate(names):
        sel = [j for j, i in enumerate(idx) if mc.storage_idx[i] == k]
        _check_items([items[j] for j in sel], refs[n], [int(idx[j]) - k * N_OBS for j in sel])
    mc.close()


@pytest.mark.s3
def test_s3_open_requests(variants, s3_server, s3_proxy):
    """Opening a remote consolidated v3 store reads its root document once and probes no v2 document."""
    s3fs = pytest.importorskip("s3fs")
    paths, refs = variants
    proxy = s3_proxy()
    fs = s3fs.S3FileSystem(**proxy.storage_options)
    bucket = s3_server["bucket"]
    for name in ("v2", "v3_sharded"):
        target = f"{bucket}/zopen/{os.path.basename(paths[name])}"
        fs.put(paths[name], target, recursive=True)
        proxy.reset_counts()
        with MappedCollection(
            [f"s3://{target}"], obs_keys="cell_type", storage_options=proxy.storage_options
        ) as mc:
            got = [r.path.rsplit("/", 1)[-1] for r in proxy.log]
            items = mc.__getitems__(list(range(5)))
        np.testing.assert_array_equal(np.stack([i["X"] for i in items]), refs[name].X[:5].toarray())
        if name == "v3_sharded":
            assert got.count("zarr.json") == 1, got  # the one GET (no existence check before it)
            assert not {".zgroup", ".zattrs", ".zmetadata"} & set(got), got
            # HEAD + one-key listing (a directory), zarr.json GET, and one GET for each of
            # 3 obs/var arrays read at open (s3fs needed 10: a HEAD before each whole GET).
            assert len(got) <= 6, got
