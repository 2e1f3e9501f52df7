"""Decoded chunks in grid layout (``read_staged``) for Zarr: against zarr-python, and the reductions built on them.

``map``, ``aggregate`` and the sparse conversion reduce a block's decoded
chunks where they lie (``(*grid, *chunks)`` in a per-thread buffer) instead of
assembling the block.  For a sharded array the staged chunks are the *inner*
chunks, smaller than the storage unit the blocks are cut by; every value here is
checked against zarr-python reading the same array, or numpy on the matrix
written.
"""

from __future__ import annotations

import pathlib

import dask
import numpy as np
import pytest
import zarr
from conftest import make_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.zarr import _chunks

# Several shards of about block-size (a coalesce-bytes this small never grows them, test_shard_sizing.py).
SMALL_BLOCKS = {
    "dask_loom.block-size": "256KiB",
    "dask_loom.loom-zarr-chunks": [64, 64],
    "dask_loom.coalesce-bytes": "4KiB",
}


def _write(fn: pathlib.Path, ref: np.ndarray, kind: str) -> None:
    blosc = [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
    if kind == "sharded-blosc":  # the direct path: decompressed straight into the slots
        z = zarr.create_array(str(fn), shape=ref.shape, chunks=(32, 48), shards=(128, 144), dtype=ref.dtype,
                              compressors=blosc, fill_value=0)  # fmt: skip
    elif kind == "sharded-zstd":  # another codec: decoded, then copied into the slot
        z = zarr.create_array(str(fn), shape=ref.shape, chunks=(32, 48), shards=(128, 144), dtype=ref.dtype,
                              compressors=[zarr.codecs.ZstdCodec()], fill_value=0)  # fmt: skip
    elif kind == "big-endian":  # stored in another byte order than it is read in
        z = zarr.create_array(str(fn), shape=ref.shape, chunks=(32, 48), dtype=ref.dtype.newbyteorder(">"),
                              serializer=zarr.codecs.BytesCodec(endian="big"), compressors=blosc, fill_value=0)  # fmt: skip
    else:  # zarr v2, blosc: anndata's default
        z = zarr.create_array(str(fn), shape=ref.shape, chunks=(32, 48), dtype=ref.dtype, zarr_format=2,
                              compressors=[__import__("numcodecs").Blosc(cname="lz4")], fill_value=0)  # fmt: skip
    z[:] = ref


def _rowmajor(staged: np.ndarray) -> np.ndarray:
    k0, k1, c0, c1 = staged.shape
    return staged.transpose(0, 2, 1, 3).reshape(k0 * c0, k1 * c1)


@pytest.fixture(scope="module", params=["sharded-blosc", "sharded-zstd", "big-endian", "v2-blosc"])
def staged_array(request, tmp_path_factory):
    rng = np.random.default_rng(5)
    ref = (rng.integers(1, 90, (300, 500)) * (rng.random((300, 500)) < 0.1)).astype("f4")
    ref[:64, 48:144] = 0  # whole chunks of zeros: zarr-python does not write them (read as the fill)
    fn = tmp_path_factory.mktemp("staged") / f"{request.param}.zarr"
    _write(fn, ref, request.param)
    return dask_loom.open_zarr(str(fn), mode="r"), fn, ref


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_staged_chunks_equal_zarr_python(staged_array, data):
    arr, fn, _ = staged_array
    src = arr.source()
    r0 = data.draw(st.integers(0, 300 // 32 - 1)) * 32
    r1 = data.draw(st.integers(r0 // 32 + 1, 300 // 32)) * 32
    c0 = data.draw(st.integers(0, 500 // 48 - 1)) * 48
    c1 = data.draw(st.integers(c0 // 48 + 1, 500 // 48)) * 48
    staged = src.read_staged((slice(r0, r1), slice(c0, c1)))
    assert staged is not None and staged.shape == ((r1 - r0) // 32, (c1 - c0) // 48, 32, 48)
    assert staged.dtype == np.dtype("f4")
    np.testing.assert_array_equal(_rowmajor(staged), zarr.open_array(str(fn))[r0:r1, c0:c1])


def test_staged_refuses_partial_chunks(staged_array):
    arr, _, _ = staged_array
    src = arr.source()
    assert src.read_staged((slice(0, 30), slice(0, 48))) is None  # not on chunk boundaries
    assert src.read_staged((slice(288, 300), slice(0, 48))) is None  # the array's last, partial chunk row
    assert src.read_staged((slice(0, 32), slice(480, 500))) is None


@pytest.fixture(scope="module")
def sharded_loom(tmp_path_factory):
    m = make_matrix((300, 517), seed=4)
    fn = tmp_path_factory.mktemp("staged") / "s.loom.zarr"
    with dask.config.set(SMALL_BLOCKS):
        dask_loom.create(str(fn), {"": m}, {"g": np.arange(300)}, {"c": np.arange(517)}, scheduler="sync")
    return fn, m


@pytest.fixture
def staged_calls(monkeypatch):
    calls = []
    real = _chunks.ZarrChunkReader.staged_pieces  # read_staged is its one-piece form

    def spy(self, region, **kw):
        out = real(self, region, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_chunks.ZarrChunkReader, "staged_pieces", spy)
    return calls


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_map_and_aggregate_over_inner_chunks_equal_numpy(sharded_loom, staged_calls, scheduler):
    """Shards of several inner chunks (and a partial edge shard): map and aggregate on the staged chunks."""
    fn, m = sharded_loom
    groups = (np.arange(m.shape[1]) * 7) % 5
    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(str(fn), "r") as ds:
        mean0, std0 = ds.map([np.mean, np.std], axis=0, scheduler=scheduler)
        mean1, mx1 = ds.map([np.mean, np.max], axis=1, scheduler=scheduler)
        agg = ds.aggregate(group_by=groups, aggr_by="mean", scheduler=scheduler)
        total = ds.aggregate(group_by=groups, aggr_by="sum", scheduler=scheduler)
        with dask.config.set(scheduler=scheduler):
            coo = ds.sparse()
    np.testing.assert_array_equal(coo.toarray(), m)
    m64 = m.astype(np.float64)
    np.testing.assert_allclose(mean0, m64.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std0, m64.std(axis=1), rtol=1e-6)
    np.testing.assert_allclose(mean1, m64.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(mx1, m.max(axis=0))
    want_sum = np.stack([m64[:, groups == g].sum(axis=1) for g in range(5)], axis=1)
    np.testing.assert_allclose(total, want_sum, rtol=1e-6)
    np.testing.assert_allclose(agg, want_sum / np.bincount(groups), rtol=1e-6)
    assert any(staged_calls), "no block was reduced on its staged chunks"


def test_map_on_staged_chunks_on_a_process_cluster(sharded_loom, local_cluster):
    fn, m = sharded_loom
    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(str(fn), "r") as ds:
        mean0, std0 = ds.map([np.mean, np.std], axis=0, client=local_cluster)
    np.testing.assert_allclose(mean0, m.astype(np.float64).mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std0, m.astype(np.float64).std(axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "inner"),
    [("u2", 256), ("i2", 256), ("u1", 64), ("i4", 64), ("u2", 512)],  # u2 at 512 wide: summed in float64
)
@pytest.mark.parametrize("container", ["loom.zarr", "loom"])
def test_integer_group_sums_on_staged_chunks_are_exact(tmp_path, monkeypatch, dtype, inner, container):
    """Integer layers are summed on their staged chunks in float32 where that is exact: equal to numpy's int64 sums."""
    from dask_loom.ops import _aggregate

    info = np.iinfo(dtype)
    rng = np.random.default_rng(11)
    # The extremes of the type, densely: any rounding in a float32 partial sum would show.
    # Whole chunk rows (a band of partial chunks is summed as a band), a partial chunk column.
    m = rng.integers(info.min, info.max, (4 * inner, 1100), endpoint=True, dtype=np.int64).astype(dtype)
    m[:, ::3] = info.max
    groups = rng.integers(0, 7, m.shape[1])
    fn = tmp_path / f"i.{container}"
    conf = {"dask_loom.block-size": "1MiB", "dask_loom.coalesce-bytes": 64}
    with dask.config.set(conf):
        dask_loom.create(
            str(fn), m, {"g": np.arange(4 * inner)}, {"c": np.arange(1100)}, chunks=(inner, inner), scheduler="sync"
        )
    used = []
    real = _aggregate._sum_dtype

    def spy(dt, width):
        out = real(dt, width)
        used.append((width, out))
        return out

    monkeypatch.setattr(_aggregate, "_sum_dtype", spy)
    with dask.config.set(conf), dask_loom.connect(str(fn), "r") as ds:
        total = ds.aggregate(group_by=groups, aggr_by="sum", scheduler="threads")
        mean = ds.aggregate(group_by=groups, aggr_by="mean", scheduler="sync")
    want = np.stack([m[:, groups == g].sum(axis=1, dtype=np.int64) for g in range(7)], axis=1)
    np.testing.assert_array_equal(total, want.astype(np.float64))
    np.testing.assert_allclose(mean, want / np.bincount(groups), rtol=1e-12)
    staged = {out for width, out in used if width > 1}
    assert staged, "no band was summed on its staged chunks"
    exact32 = max(abs(info.min), info.max) * inner < 2**24
    assert staged == {np.dtype(np.float32) if exact32 else np.dtype(np.float64)}
