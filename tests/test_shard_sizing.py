"""Shards sized by what they store: a shard of well-compressing values grows to about ``coalesce-bytes``.

The rule (:func:`dask_loom.zarr.default_shards` with ``stored_ratio``) is checked
as a property of shapes and ratios; the writers (``create`` from numpy, scipy and
dask input, ``convert`` from a loompy file) against the stored objects on disk,
with values read back by zarr-python and loompy; and the requests a ``map`` over
such a layer sends to the S3 server behind the counting proxy.
"""

from __future__ import annotations

import json
import math
import pathlib

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.zarr import chunk_samples, default_shards, stored_ratio

# Small enough to run in a second: blocks of 256 KiB, shards grown to store 32 KiB.
SMALL = {
    "dask_loom.block-size": "256KiB",
    "dask_loom.coalesce-bytes": "32KiB",
    "dask_loom.loom-zarr-chunks": [128, 128],
}


def _counts(shape: tuple[int, int], seed: int, *, zeros: float = 0.9) -> np.ndarray:
    """Counts as a single-cell layer holds them: mostly zeros, small integers, float32."""
    rng = np.random.default_rng(seed)
    return (rng.poisson(2.0, shape) * (rng.random(shape) > zeros)).astype("f4")


def _shard_shape(store: pathlib.Path, node: str = "matrix") -> tuple[int, ...]:
    doc = json.loads((store / node / "zarr.json").read_text())
    assert doc["codecs"][0]["name"] == "sharding_indexed"
    return tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])


def _shard_sizes(store: pathlib.Path, node: str = "matrix") -> list[int]:
    return sorted(p.stat().st_size for p in (store / node / "c").rglob("*") if p.is_file())


# -- the rule ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5000), st.integers(1, 200_000)),
    chunk=st.sampled_from([16, 64, 128, 256]),
    ratio=st.floats(0.001, 1.5),
    target=st.sampled_from([1 << 20, 16 << 20, 64 << 20]),
    floor=st.sampled_from([256 << 10, 4 << 20]),
)
def test_grown_shards_store_about_the_floor_within_four_blocks(shape, chunk, ratio, target, floor):
    chunks = (chunk, chunk)
    with dask.config.set({"dask_loom.coalesce-bytes": floor}):
        plain = default_shards(shape, chunks, 4, target_bytes=target)
        grown = default_shards(shape, chunks, 4, target_bytes=target, stored_ratio=ratio)
    grid = [-(-n // c) for n, c in zip(shape, chunks)]
    if plain is None and grown is None:
        return
    plain = plain or chunks
    assert grown is not None
    units = [s // c for s, c in zip(grown, chunks)]
    assert all(s % c == 0 for s, c in zip(grown, chunks))
    assert all(1 <= u <= g for u, g in zip(units, grid))
    # Never smaller than the decoded-size shard, along any axis.
    assert all(g >= min(p, n_c) for g, p, n_c in zip(grown, plain, (g * c for g, c in zip(grid, chunks))))
    full = math.prod(min(u, g) * c for u, g, c in zip(units, grid, chunks)) * 4
    base = math.prod(min(p // c, g) * c for p, g, c in zip(plain, grid, chunks)) * 4
    assert full <= max(4 * target, base)
    if full * ratio < floor:
        # It stopped growing for a reason: one shard spans the array, or one fewer would pass 4 blocks.
        counts = [-(-g // u) for g, u in zip(grid, units)]
        ax = max(range(2), key=lambda i: counts[i])
        if counts[ax] > 1:
            fewer = list(units)
            fewer[ax] = -(-grid[ax] // (counts[ax] - 1))
            assert math.prod(min(u, g) * c for u, g, c in zip(fewer, grid, chunks)) * 4 > 4 * target
    if ratio * base >= floor:
        assert grown == tuple(min(p, g * c) for p, g, c in zip(plain, grid, chunks)) or grown == plain


def test_stored_ratio_and_samples_follow_the_values():
    import numcodecs

    encode = numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE).encode
    sparse_ratio = stored_ratio(chunk_samples(_counts((512, 1024), 1), (64, 64)), encode)
    noise = np.random.default_rng(2).random((512, 1024)).astype("f4")
    noise_ratio = stored_ratio(chunk_samples(noise, (64, 64)), encode)
    assert 0 < sparse_ratio < 0.3 < noise_ratio <= 1.1
    assert stored_ratio([], encode) is None
    samples = chunk_samples(np.arange(300 * 500).reshape(300, 500), (64, 100), k=4)
    # Spread over the grid, first and last chunk among them (the last one partial).
    assert len(samples) == 4
    np.testing.assert_array_equal(samples[0], np.arange(300 * 500).reshape(300, 500)[:64, :100])
    np.testing.assert_array_equal(samples[-1], np.arange(300 * 500).reshape(300, 500)[256:, 400:])


# -- the writers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "coo", "dask"])
def test_create_grows_shards_of_counts_and_reads_back(tmp_path, kind):
    m = _counts((512, 2048), seed=3)
    value = {"numpy": m, "coo": sp.coo_matrix(m), "dask": da.from_array(m, chunks=(256, 1024))}[kind]
    fn = tmp_path / f"{kind}.loom.zarr"
    with dask.config.set(SMALL):
        plain = default_shards(m.shape, (128, 128), 4)
        dask_loom.create(str(fn), value, {"g": np.arange(512)}, {"c": np.arange(2048)}, scheduler="sync")
    shards = _shard_shape(fn)
    sizes = _shard_sizes(fn)
    assert math.prod(shards) > math.prod(plain)  # grown: a 256 KiB shard of these stores ~ 13 KiB
    assert math.prod(shards) * 4 <= 4 * (256 << 10)
    # Every shard but a remainder at the edge stores at least 32 KiB.
    assert sorted(sizes)[len(sizes) // 2] >= 32 << 10, sizes
    np.testing.assert_array_equal(zarr.open_array(str(fn / "matrix"), mode="r")[:], m)
    with dask_loom.connect(str(fn), "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        np.testing.assert_allclose(
            ds.map([np.mean], axis=0, scheduler="threads")[0], m.mean(axis=1), rtol=1e-6
        )


def test_incompressible_values_keep_block_size_shards(tmp_path):
    m = np.random.default_rng(4).random((512, 2048)).astype("f4")
    fn = tmp_path / "noise.loom.zarr"
    with dask.config.set(SMALL):
        dask_loom.create(str(fn), m, {"g": np.arange(512)}, {"c": np.arange(2048)}, scheduler="sync")
        assert _shard_shape(fn) == default_shards(m.shape, (128, 128), 4)
    np.testing.assert_array_equal(zarr.open_array(str(fn / "matrix"), mode="r")[:], m)


def test_a_dask_input_is_sampled_in_its_first_block_only(tmp_path):
    m = _counts((512, 2048), seed=5)
    calls = []

    def block(x, block_info=None):
        calls.append(block_info[0]["chunk-location"])
        return x

    x = da.from_array(m, chunks=(512, 512)).map_blocks(block, dtype=m.dtype)
    with dask.config.set(SMALL):
        dask_loom.create(
            str(tmp_path / "d.loom.zarr"), x, {"g": np.arange(512)}, {"c": np.arange(2048)}, scheduler="sync"
        )
    # Each of the 4 blocks computed once for the write, the first once more for the sample.
    assert sorted(calls) == sorted([(0, 0), (0, 0), (0, 1), (0, 2), (0, 3)])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "d.loom.zarr" / "matrix"), mode="r")[:], m)


def test_convert_from_loompy_sizes_shards_by_the_source(tmp_path):
    import loompy

    m = _counts((512, 2048), seed=6)
    src = tmp_path / "src.loom"
    loompy.create(str(src), m, {"g": np.arange(512)}, {"c": np.arange(2048)})
    out = tmp_path / "out.loom.zarr"
    with dask.config.set(SMALL):
        dask_loom.convert(str(src), str(out), scheduler="sync")
        plain = default_shards(m.shape, (128, 128), 4)
    assert math.prod(_shard_shape(out)) > math.prod(plain)
    with loompy.connect(str(src), "r") as lp, dask_loom.connect(str(out), "r") as ds:
        np.testing.assert_array_equal(ds[:, :], lp[:, :])


# -- on the S3 server behind the counting proxy ------------------------------------------------------


@pytest.mark.s3
def test_map_over_grown_shards_reads_coalesce_bytes_per_request(tmp_path, s3_server, s3_proxy):
    from test_zarr_shards import _upload

    m = _counts((1024, 4096), seed=7)
    fn = tmp_path / "counts.loom.zarr"
    conf = {
        "dask_loom.block-size": "1MiB",
        "dask_loom.coalesce-bytes": "128KiB",
        "dask_loom.loom-zarr-chunks": [128, 128],
    }
    with dask.config.set(conf):
        dask_loom.create(str(fn), m, {"g": np.arange(1024)}, {"c": np.arange(4096)}, scheduler="sync")
    sizes = _shard_sizes(fn)
    assert len(sizes) >= 2
    url = _upload(s3_server, fn)
    proxy = s3_proxy(latency=0.0)
    with dask.config.set(conf), dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds:
        proxy.reset_counts()
        mean = ds.map([np.mean], axis=0, scheduler="threads")[0]
        cold = proxy.snapshot()
        proxy.reset_counts()
        again = ds.map([np.mean], axis=0, scheduler="threads")[0]  # shard indexes known: ranged reads
        warm = proxy.snapshot()
    np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(again, mean)
    stored = sum(sizes)
    for snap in (cold, warm):
        assert snap["requests"].get("HEAD", 0) == 0
        # At most one request per 128 KiB stored, and never more than one per shard.
        assert snap["total_requests"] <= min(len(sizes), stored // (128 << 10)), (snap, sizes)


# -- the codec the estimate assumes is the codec written -----------------------------------------


@pytest.mark.parametrize("codec", ["blosc-lz4hc", "blosc-zstd", "blosc-lz4", "zstd", "gzip", "none"])
def test_each_codec_is_written_read_back_and_estimated_as_stored(tmp_path, codec):
    from dask_loom.loom._zarrtree import sample_encoder

    m = _counts((512, 2048), seed=8)
    fn = tmp_path / "c.loom.zarr"
    with dask.config.set({**SMALL, "dask_loom.zarr-codec": codec}):
        dask_loom.create(str(fn), m, {"g": np.arange(512)}, {"c": np.arange(2048)}, scheduler="sync")
        encode = sample_encoder()
    arr = zarr.open_array(str(fn / "matrix"), mode="r")
    np.testing.assert_array_equal(arr[:], m)
    names = [c.to_dict()["name"] for c in arr.compressors]
    assert names == {"none": [], "zstd": ["zstd"], "gzip": ["gzip"]}.get(codec, ["blosc"])
    if codec.startswith("blosc"):
        assert arr.compressors[0].to_dict()["configuration"]["cname"] == codec.split("-")[1]
    if encode is None:
        assert codec == "none"
        return
    # What the sampled chunks say a shard stores is what the shards store (index aside), within 15 %.
    estimate = stored_ratio(chunk_samples(m, (128, 128), k=64), encode) * m.nbytes
    assert abs(estimate / sum(_shard_sizes(fn)) - 1) < 0.15


def test_an_unknown_codec_is_refused_by_name(tmp_path):
    with (
        dask.config.set({"dask_loom.zarr-codec": "blosc-snappy"}),
        pytest.raises(ValueError, match="blosc-snappy"),
    ):
        dask_loom.create(
            str(tmp_path / "x.loom.zarr"), np.ones((4, 4), "f4"), {"g": np.arange(4)}, {"c": np.arange(4)}
        )
