"""The block planner: every dask block is a union of whole stored chunks."""

from __future__ import annotations

import math
import pickle
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from dask.array.core import normalize_chunks
from dask.utils import key_split
from hypothesis import given
from hypothesis import strategies as st

from dask_loom.blocks import align_chunks, from_source, plan_blocks, selection_bands
from dask_loom.errors import ChunkAlignmentWarning


class ArraySource:
    """A numpy array behind the chunk-source protocol, counting reads."""

    prefix = "test-read"

    def __init__(self, arr: np.ndarray, chunk_shape: tuple[int, ...]) -> None:
        self.arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.chunk_shape = chunk_shape
        self.regions: list[tuple[slice, ...]] = []

    def read_block(self, region, out=None):
        self.regions.append(region)
        return self.arr[region].copy()

    def __dask_tokenize__(self):
        return ("ArraySource", self.arr.shape, self.chunk_shape, dask.base.tokenize(self.arr))


shapes = st.lists(st.integers(0, 400), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 200_000)


@st.composite
def shape_and_chunks(draw):
    shape = draw(shapes)
    chunks = [draw(st.integers(1, max(1, s + 5))) for s in shape]
    return tuple(shape), tuple(chunks)


def _aligned(sizes: tuple[int, ...], n: int, unit: int) -> bool:
    bounds = np.cumsum((0, *sizes))
    return bounds[-1] == n and all(b % unit == 0 or b == n for b in bounds)


@given(shape_and_chunks(), st.integers(1, 8), st.integers(1, 1 << 16), st.sampled_from([None, 0, 1, 2]))
def test_plan_is_aligned_and_covers(sc, itemsize, target, band_axis):
    shape, chunks = sc
    if band_axis is not None and band_axis >= len(shape):
        band_axis = None
    plan = plan_blocks(shape, chunks, itemsize, target_bytes=target, band_axis=band_axis)
    assert len(plan) == len(shape)
    for sizes, n, c in zip(plan, shape, chunks):
        assert _aligned(sizes, n, min(c, n) if n else c)
        assert all(s > 0 for s in sizes) or sizes == (0,)
    if band_axis is not None:
        for ax, sizes in enumerate(plan):
            if ax != band_axis:
                assert sizes == (shape[ax],) or shape[ax] == 0
    # A block never exceeds the target unless a single band/unit already does.
    unit_bytes = math.prod(min(c, n) if n else 1 for c, n in zip(chunks, shape)) * itemsize
    biggest = math.prod(max(s) for s in plan) * itemsize
    if band_axis is None:
        assert biggest <= max(target, unit_bytes) * 1 or biggest <= unit_bytes


def test_default_plan_for_loompy_layout():
    plan = plan_blocks((20000, 50000), (64, 64), 4)
    block = max(plan[0]) * max(plan[1]) * 4
    assert block <= 64 * 2**20
    assert block >= 32 * 2**20  # not needlessly small: few tasks per GB
    rows = plan_blocks((20000, 50000), (64, 64), 4, band_axis=0)
    assert rows[1] == (50000,) and all(r % 64 == 0 for r in rows[0][:-1])


def test_graph_size_does_not_scale_with_chunks():
    # 30,000 x 2,000,000 float32 with 64x64 chunks: 14.6 million stored chunks.
    src = ArraySource(np.empty((0, 0), "f4"), (64, 64))
    src.shape = (30000, 2000000)
    x = from_source(src)
    assert x.npartitions <= 240e9 / (64 * 2**20) * 1.5  # about one task per 64 MiB
    assert key_split(x.name) == "test-read"


@given(shape_and_chunks(), st.data())
def test_align_rounds_out(sc, data):
    shape, chunks = sc
    user = tuple(data.draw(st.integers(1, max(1, n))) for n in shape)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = align_chunks(user, shape, chunks, "f4")
    for sizes, n, c in zip(out, shape, chunks):
        assert _aligned(sizes, n, min(c, n) if n else c)
    normal = normalize_chunks(user, shape)
    aligned_input = all(_aligned(sizes, n, min(c, n) if n else c) for sizes, n, c in zip(normal, shape, chunks))
    warned = [x for x in w if issubclass(x.category, ChunkAlignmentWarning)]
    assert bool(warned) != aligned_input
    if aligned_input:
        assert out == tuple(tuple(s) for s in normal)


def test_align_warns_and_names_the_array():
    with pytest.warns(ChunkAlignmentWarning, match="split the stored chunks"):
        out = align_chunks((100, 50), (300, 100), (64, 64), "f4", what="x.loom:/matrix")
    assert out == ((128, 128, 44), (64, 36))


@given(
    st.integers(1, 500),
    st.integers(1, 70),
    st.lists(st.integers(0, 499), max_size=30),
    st.integers(1, 5),
)
def test_selection_bands(n, unit, pos, k):
    pos = [p for p in pos if p < n]
    bands = selection_bands(n, unit, np.array(pos, dtype=np.int64) // unit, k)
    covered = set()
    for a, b in bands:
        assert a % unit == 0 and (b % unit == 0 or b == n) and a < b <= n
        assert (b - a) <= k * unit
        covered.update(range(a, b))
    assert set(pos) <= covered
    # Only needed units are read.
    assert {c // unit for c in covered} == {p // unit for p in pos}


@given(shape_and_chunks())
def test_from_source_equals_numpy(sc):
    shape, chunks = sc
    arr = np.arange(math.prod(shape), dtype="f8").reshape(shape)
    src = ArraySource(arr, chunks)
    x = from_source(src, target_bytes=4096)
    np.testing.assert_array_equal(x.compute(scheduler="sync"), arr)
    # Every read region starts on a chunk boundary: no chunk is read by two tasks.
    for region in src.regions:
        for r, c in zip(region, chunks):
            assert r.start % c == 0


def test_names_are_deterministic_and_readable():
    arr = np.ones((100, 100))
    a = from_source(ArraySource(arr, (10, 10)))
    b = from_source(ArraySource(arr, (10, 10)))
    assert a.name == b.name and key_split(a.name) == "test-read"
    c = from_source(ArraySource(arr * 2, (10, 10)))
    assert c.name != a.name


def test_user_chunks_rounded_with_warning():
    arr = np.arange(100 * 90.0).reshape(100, 90)
    with pytest.warns(ChunkAlignmentWarning):
        x = from_source(ArraySource(arr, (20, 30)), chunks=(25, 40))
    assert x.chunks == ((40, 20, 20, 20), (60, 30))
    np.testing.assert_array_equal(x.compute(scheduler="sync"), arr)


def test_blocks_pickle_and_run_on_processes(local_cluster):
    arr = np.arange(120 * 70.0).reshape(120, 70)
    x = from_source(ArraySource(arr, (16, 16)), target_bytes=16 * 16 * 8 * 4)
    pickle.loads(pickle.dumps(x.dask))
    assert float(da.sum(x).compute(scheduler=local_cluster)) == arr.sum()
