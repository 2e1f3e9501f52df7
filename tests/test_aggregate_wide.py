"""Aggregating a layer too wide for full-width bands: blocks of about the block size, combined in a tree.

A full-width row band one stored unit tall of an atlas (7,424 x 4,096 shards
across 3.3 M cells) is 49 GB; such layers are grouped over 2-D blocks whose
partials (sums, moments, extremes, products, picks by position) are combined a
row band at a time, or, for the functions needing a group's values together
(median, nunique ...), shuffled by group into gathers of about the block size.
Every value is checked against numpy or numpy-groupies on the same data (and
the band path); the blocks the tasks read and the values they reduce against
the block size.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import dask
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.ops import _aggregate, _engine

# Bands of one 64-row unit across 6,000 columns are 750 KB: more than 4 blocks of 16 KiB.
NARROW = {
    "dask_loom.block-size": "16KiB",
    "dask_loom.coalesce-bytes": 64,
    "dask_loom.loom-zarr-chunks": [64, 64],
    "dask_loom.loom-chunks": [64, 64],
}
SHAPE = (200, 6000)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    rng = np.random.default_rng(21)
    m = (rng.poisson(3.0, SHAPE) * (rng.random(SHAPE) < 0.3)).astype("u2")
    m[:, ::97] = 65535  # extremes: any rounding in a partial sum would show
    labels = rng.integers(0, 11, SHAPE[1])
    d = tmp_path_factory.mktemp("wide")
    paths = {}
    with dask.config.set(NARROW):
        for kind in ("loom", "loom.zarr"):
            paths[kind] = d / f"w.{kind}"
            dask_loom.create(
                str(paths[kind]),
                m,
                {"g": np.arange(SHAPE[0])},
                {"c": np.arange(SHAPE[1]), "L": labels},
                scheduler="sync",
            )
    return paths, m, labels


def _spy_regions(monkeypatch, module, name) -> list:
    """The regions the task function ``module.name(source, region, ...)`` is called with."""
    seen = []
    real = getattr(module, name)

    def spy(source, region, *args):
        seen.append(region)
        return real(source, region, *args)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.fixture
def regions(monkeypatch):
    """The regions the aggregate's block tasks read."""
    return _spy_regions(monkeypatch, _aggregate, "_tile")


def _want(m: np.ndarray, labels: np.ndarray, func: str) -> np.ndarray:
    """numpy's *func* of each group's columns (float64; exact int64 sums)."""
    out = []
    for g in range(labels.max() + 1):
        part = m[:, labels == g]
        out.append(
            part.astype(np.int64).sum(axis=1)
            if func == "sum"
            else getattr(np, func)(part.astype(np.float64), axis=1)
        )
    return np.stack(out, axis=1)


@pytest.mark.parametrize("kind", ["loom", "loom.zarr"])
@pytest.mark.parametrize("func", ["sum", "mean", "max", "min", "var", "std"])
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_wide_layer_is_grouped_over_blocks_equal_numpy(wide, regions, kind, func, scheduler):
    paths, m, labels = wide
    with dask.config.set(NARROW), dask_loom.connect(str(paths[kind]), "r") as ds:
        got = ds.aggregate(group_by="L", aggr_by=func, scheduler=scheduler)
    want = _want(m, labels, func)
    if func in ("sum", "max", "min"):
        np.testing.assert_array_equal(got, want.astype(np.float64))
    else:  # var and std from sums of squares, numpy's in two passes
        np.testing.assert_allclose(got, want, rtol=1e-12 if func == "mean" else 1e-9)
    # No task read a full-width band: blocks of about the block size (one stored unit at most
    # past it), several per row band.
    assert regions and all(r[1].stop - r[1].start < SHAPE[1] for r in regions)
    unit = 64 * 64 * 2
    assert max(math.prod(s.stop - s.start for s in r) for r in regions) * 2 <= 16 * 1024 + 4 * unit


@pytest.fixture(scope="module")
def wide_float(tmp_path_factory):
    """A float32 layer near 1 (products stay finite), with zeros, in 64 x 64 chunks (Loom allows no NaN)."""
    rng = np.random.default_rng(5)
    m = (1 + 0.001 * rng.poisson(2.0, SHAPE)).astype("f4")
    m[rng.random(SHAPE) < 0.01] = 0
    m[:50, 3] = 0  # a group's first column: zero in some rows
    labels = rng.integers(0, 9, SHAPE[1])
    path = tmp_path_factory.mktemp("widef") / "f.loom"
    with dask.config.set(NARROW):
        dask_loom.create(
            str(path),
            m,
            {"g": np.arange(SHAPE[0])},
            {"c": np.arange(SHAPE[1]), "L": labels},
            scheduler="sync",
        )
    return path, m, labels


@pytest.mark.parametrize(
    "func",
    [
        "nansum",
        "sumofsquares",
        "nansumofsquares",
        "len",
        "nanlen",
        "prod",
        "nanprod",
        "any",
        "all",
        "first",
        "last",
    ],
)
def test_wide_layer_elementwise_functions_equal_numpy_groupies(wide_float, regions, func):
    """Functions whose block values combine one element at a time are grouped over blocks too."""
    from numpy_groupies import aggregate_np

    path, m, labels = wide_float
    with dask.config.set(NARROW), dask_loom.connect(str(path), "r") as ds:
        got = ds.aggregate(group_by="L", aggr_by=func, scheduler="threads")
    want = aggregate_np(labels, m.astype(np.float64), func=func, axis=1, size=labels.max() + 1)
    # Sums and products of a float32 layer are taken in float32 (BLAS, reduceat), by blocks or by bands alike.
    rtol = 1e-6 if "sum" in func else 1e-5 if "prod" in func else 1e-10
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float64), rtol=rtol, equal_nan=True)
    assert regions and all(r[1].stop - r[1].start < SHAPE[1] for r in regions)
    assert len(regions) > len(np.unique([r[0].start for r in regions]))  # several blocks per row band


def test_wide_layer_with_a_column_selection_equals_numpy(wide, regions):
    """loompy 3.0.8 refuses ``select`` (deprecated): the groups are those of the selected columns."""
    paths, m, labels = wide
    keep = (np.arange(SHAPE[1]) % 5 != 0) & (labels != 4)  # no column of group 4 is selected
    with dask.config.set(NARROW), dask_loom.connect(str(paths["loom"]), "r") as ds:
        got = ds.aggregate(select=keep, group_by="L", aggr_by="mean", scheduler="threads")
    present = np.unique(labels[keep])
    want = np.stack([m[:, keep & (labels == g)].astype(np.float64).mean(axis=1) for g in present], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert len(regions) > len(np.unique([r[0].start for r in regions]))


def test_wide_zarr_array_other_functions_combine_over_blocks(wide, monkeypatch):
    """``dask_loom.aggregate`` with functions outside the sums: the generic graph, 2-D blocks combined."""
    paths, m, labels = wide
    seen = _spy_regions(monkeypatch, _engine, "_group_read")
    with dask.config.set(NARROW):
        arr = dask_loom.open_zarr(str(paths["loom.zarr"]), "matrix")
        (mx, sd), cats = dask_loom.aggregate(
            arr, labels, axis=1, func=["max", "std"], scheduler="threads", return_labels=True
        )
    np.testing.assert_array_equal(cats, np.arange(labels.max() + 1))
    for g in range(labels.max() + 1):
        cols = m[:, labels == g].astype(np.float64)
        np.testing.assert_array_equal(mx[:, g], cols.max(axis=1))
        np.testing.assert_allclose(sd[:, g], cols.std(axis=1), rtol=1e-9)
    assert seen and all(r[1].stop - r[1].start < SHAPE[1] for r in seen)


def test_wide_layer_on_a_process_cluster(wide, local_cluster):
    paths, m, labels = wide
    with dask.config.set(NARROW), dask_loom.connect(str(paths["loom.zarr"]), "r") as ds:
        got = ds.aggregate(group_by="L", aggr_by="sum", client=local_cluster)
    np.testing.assert_array_equal(got, _want(m, labels, "sum").astype(np.float64))


# A band of one stored unit (64 rows in the .loom, 128 in the .loom.zarr's shards) across 6,000
# uint16 columns is 750 KB or 1.5 MB: between one and four blocks of 512 KiB.
A_FEW_BLOCKS = {**NARROW, "dask_loom.block-size": "512KiB"}


@pytest.mark.parametrize("kind", ["loom", "loom.zarr"])
@pytest.mark.parametrize("func", ["mean", "var", "median"])
def test_a_band_of_a_few_blocks_is_tiled_and_only_past_four_shuffled(wide, monkeypatch, kind, func):
    """A band one unit tall past one block is grouped over block-sized tiles (several tasks of
    about a block each, so that workers stay even), where the partials combine; median reads
    the full-width band (a shuffle starts past four blocks)."""
    paths, m, labels = wide
    tiles = _spy_regions(monkeypatch, _aggregate, "_tile")
    bands = _spy_regions(monkeypatch, _aggregate, "_band")
    engine = _spy_regions(monkeypatch, _engine, "_group_read")
    with dask.config.set(A_FEW_BLOCKS), dask_loom.connect(str(paths[kind]), "r") as ds:
        got = ds.aggregate(group_by="L", aggr_by=func, scheduler="threads")
        unit_shape = ds.layers[""]._source().chunk_shape
        # Two functions: dask_loom.aggregate's generic graph, which follows the same rule.
        engine_funcs = ["max", "mean" if func == "median" else func]
        via_engine = dask_loom.aggregate(ds, labels, axis=1, func=engine_funcs, scheduler="threads")
    want = _want(m, labels, func)
    np.testing.assert_allclose(got, want, rtol=1e-12 if func in ("mean", "median") else 1e-9)
    for f, v in zip(engine_funcs, via_engine):
        np.testing.assert_allclose(v, _want(m, labels, f), rtol=1e-9)
    block, unit = 512 * 1024, math.prod(unit_shape) * 2
    assert block < unit_shape[0] * SHAPE[1] * 2 <= 4 * block  # the case this test is for
    if func == "median":
        assert not tiles and bands and all(r[1] == slice(0, SHAPE[1]) for r in bands)
    else:
        assert tiles and all(r[1].stop - r[1].start < SHAPE[1] for r in tiles)
        assert max(math.prod(s.stop - s.start for s in r) for r in tiles) * 2 <= block + unit
        assert len(tiles) >= 2 * len({r[0].start for r in tiles})  # a band is two tiles or more
    assert engine and max(math.prod(s.stop - s.start for s in r) for r in engine) * 2 <= block + unit
    # Tiles are runs of chunks along a row of them (a file's C order), not squares.
    assert all(r[0].stop - r[0].start <= unit_shape[0] for r in [*tiles, *engine])


class _Atlas:
    """The full atlas's layout, metadata only (graphs are built over it, never run)."""

    chunk_shape = (7_424, 4_096)
    dtype = np.dtype("u2")

    def __init__(self, rows: int = 58_000) -> None:
        self.shape = (rows, 3_300_000)


def test_full_atlas_graph_has_block_sized_tasks_and_shallow_trees():
    """The full 58,000 x 3,300,000 atlas in 7,424 x 4,096 shards: the graph, built without reading."""
    import cloudpickle

    plan = _aggregate.GroupPlan(np.arange(3_300_000) % 50, 50)
    finals = _aggregate._tiled_sums(
        _Atlas(), plan, None, "atlas-aggregate-x", "atlas-aggregate-combine-x", "mean"
    )
    assert len(finals) == 8  # one result per row band of shards
    graph = dict(finals[0].dask)
    reads = [v for v in graph.values() if v[0] is _aggregate._tile]
    assert len(reads) == 8 * 806  # one task per shard
    assert max(math.prod(s.stop - s.start for s in v[2]) for v in reads) * 2 <= 64 << 20
    combines = [k for k in graph if isinstance(k, tuple) and k[0] == "atlas-aggregate-combine-x"]
    # 806 -> 101 -> 13 -> 2 partials per band in 3 levels of 8; the result task combines the last 2.
    assert max(k[1] for k in combines) + 1 == math.ceil(math.log(806, 8)) - 1
    results = [v for k, v in graph.items() if k in {f.key for f in finals}]
    assert all(len(v) == 1 + 2 + 2 for v in results)  # (finish, counts, func, *2 partials)
    # One plan per column block, shared by the 8 row bands, travelling as uint8 labels: the graph
    # pickles to 3.6 MiB (a plan per task with int64 labels and sort order made 414 MiB).
    assert len({id(v[3]) for v in reads}) == 806
    assert len(cloudpickle.dumps(graph)) < 8 << 20


# --- every accepted function on the wide path: partials combined, or a shuffle by group ------------


def _accepted_functions() -> list[str]:
    """Every canonical name ``aggregate`` accepts (numpy-groupies' reducing functions)."""
    from numpy_groupies.registry import aliasing_py

    from dask_loom.ops._kernels import check_group_func

    names = set()
    for alias in aliasing_py:
        if isinstance(alias, str):
            with contextlib.suppress(ValueError):
                names.add(check_group_func(alias))
    return sorted(names)


ACCEPTED = _accepted_functions()
#: The band path's 0/0 for a cell without values (numpy-groupies' fill, 0, elsewhere).
_NAN_FILL = {"mean", "var", "std", "nanmean", "nanvar", "nanstd"}
WIDE_ZARR = {"dask_loom.block-size": "16KiB", "dask_loom.coalesce-bytes": 64}


def _zarr_source(tmp: str, m: np.ndarray, chunks: tuple[int, int]):
    import zarr

    from dask_loom.ops._sources import resolve

    z = zarr.open_array(tmp, mode="w", shape=m.shape, chunks=chunks, dtype=m.dtype)
    z[:] = m
    return resolve(dask_loom.open_zarr(tmp, mode="r"), layer=None, what="test").parts[0]


@pytest.fixture(scope="module", params=["float32", "uint16", "int32"])
def wide_any(request, tmp_path_factory):
    """96 x 1,500 in 32 x 32 chunks: zeros, NaNs and infinities (float32), negatives (int32), 12 labels, one never used."""
    rng = np.random.default_rng(17)
    shape = (96, 1500)
    m = rng.poisson(2.0, shape) * (rng.random(shape) < 0.4)
    if request.param == "int32":
        m = m - rng.poisson(2.0, shape)
    m = m.astype(request.param)
    if request.param == "float32":
        m[rng.random(shape) < 0.05] = np.nan
        m[:, 11] = np.nan  # a whole column
        m[5, :] = np.nan  # a whole row: every cell without values
        m[7, 3] = np.inf
    labels = rng.integers(0, 11, shape[1])
    labels[labels == 6] = 11  # label 6: a group without columns
    src = _zarr_source(str(tmp_path_factory.mktemp("wideany") / "m.zarr"), m, (32, 32))
    return src, m, labels


def _expect(m: np.ndarray, idx: np.ndarray, n_groups: int, func: str) -> np.ndarray:
    from numpy_groupies import aggregate_np

    fill = np.nan if func in _NAN_FILL else 0
    if func in ("prod", "nanprod"):
        # numpy-groupies multiplies in the input's dtype: fifteen uint16 values of up to 3 already wrap
        # around (314,928 read as 52,784). dask_loom's products are float64, as numpy's are wider.
        m = m.astype(np.float64)
    return np.asarray(aggregate_np(idx, m, func=func, axis=1, size=n_groups, fill_value=fill), dtype=np.float64)


@pytest.fixture
def npg_inputs(monkeypatch):
    """The ``(rows, columns)`` of every array handed to numpy-groupies (the band path's and the gathers' values)."""
    from dask_loom.ops import _kernels

    seen = []
    real = _kernels._npg_reduce

    def spy(band, plan, func, **kw):
        seen.append(band.shape)
        return real(band, plan, func, **kw)

    monkeypatch.setattr(_kernels, "_npg_reduce", spy)
    return seen


@pytest.fixture
def reads(monkeypatch):
    """Every region read through ``read_into_buffer`` (bands, blocks, cut blocks)."""
    from dask_loom.ops import _map

    return _spy_regions(monkeypatch, _map, "read_ahead")


@pytest.mark.parametrize("func", ACCEPTED)
def test_wide_every_function_equals_band_path_and_numpy_groupies(wide_any, reads, func):
    """Wide path == band path == ``numpy_groupies.aggregate`` (whole array), with and without ``select``."""
    from dask_loom.ops._aggregate import aggregate_columns

    src, m, labels = wide_any
    n_groups = 12
    rng = np.random.default_rng(3)
    for select in (None, np.flatnonzero(rng.random(m.shape[1]) < 0.6), rng.integers(0, m.shape[1], 1200)):
        cols = np.arange(m.shape[1]) if select is None else select  # the last: unsorted, with repeats
        idx = labels[cols]
        want = _expect(m[:, cols], idx, n_groups, func)
        band = aggregate_columns(src, idx, n_groups, func, select=select, scheduler="sync")
        reads.clear()
        with dask.config.set(WIDE_ZARR):
            got = aggregate_columns(src, idx, n_groups, func, select=select, scheduler="threads")
        assert reads and max(r[1].stop - r[1].start for r in reads) < m.shape[1]  # the wide path: blocks
        # float32 sums in BLAS (by band or block), float64 in numpy-groupies; variances by Chan et al. on blocks
        summed = m.dtype == np.float32 and func in {"sum", "mean", "var", "std", "sumofsquares", "nansum", "nanmean", "nanvar", "nanstd", "nansumofsquares", "skew", "nanskew", "kurt", "nankurt"}
        rtol = 1e-5 if summed else 1e-12 if func in {"var", "std", "nanvar", "nanstd", "skew", "nanskew", "kurt", "nankurt", "mean", "nanmean", "trapezoid", "nantrapezoid"} else 0
        np.testing.assert_allclose(got, band, rtol=rtol, atol=1e-9 if rtol else 0, equal_nan=True, err_msg=f"{func} band, select={select is not None}")
        if func not in ("prod", "nanprod") or m.dtype.kind != "f":  # numpy-groupies multiplies in float64, the band path in float32
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-9 if rtol else 0, equal_nan=True, err_msg=f"{func} numpy-groupies")


def test_every_function_is_tiled_or_shuffled():
    """Nothing accepted is left to full-width bands: each function has partials or goes through the shuffle."""
    from dask_loom.ops._aggregate_tiles import TILED

    shuffled = sorted(set(ACCEPTED) - TILED)
    assert set(TILED) <= set(ACCEPTED)
    assert {"median", "nanmedian", "nunique", "nannunique", "quantile", "skew"} <= set(shuffled)
    assert {"nanmean", "nanvar", "nanstd", "nanmin", "nanmax", "argmax", "argmin", "nanfirst", "nanlast"} <= TILED


@pytest.mark.parametrize("func", ["median", "nunique", "nanquantile", "nanmean", "nanvar", "argmax", "nanlast"])
def test_wide_path_never_reads_or_reduces_a_full_width_band(wide_any, reads, npg_inputs, func):
    """No task reads a full-width band, and no task hands numpy-groupies more than about a block of values.

    On the code before the shuffle and the nan-aware partials these functions read one band per task.
    """
    from dask_loom.ops._aggregate import aggregate_columns

    src, m, labels = wide_any
    block = 16 * 1024
    with dask.config.set(WIDE_ZARR):
        got = aggregate_columns(src, labels, 12, func, scheduler="threads")
    np.testing.assert_allclose(got, _expect(m, labels, 12, func), rtol=1e-5, equal_nan=True)
    itemsize = m.dtype.itemsize
    assert reads and all(r[1].stop - r[1].start < m.shape[1] for r in reads)
    unit = 32 * 32 * itemsize  # a block is about the block size, at most a stored unit past it
    assert max(math.prod(s.stop - s.start for s in r) for r in reads) * itemsize <= block + 4 * unit
    # Gathers hold about the block size (a group's columns one row at a time at the least), blocks at most a block.
    assert all(rows * cols * itemsize <= block + cols * itemsize for rows, cols in npg_inputs)


def test_one_group_larger_than_a_block_is_gathered_in_row_ranges(tmp_path, npg_inputs):
    """A group whose columns alone pass the block size is gathered a range of rows at a time."""
    from dask_loom.ops._aggregate import aggregate_columns
    from dask_loom.ops._aggregate_shuffle import gather_plan

    rng = np.random.default_rng(8)
    m = rng.poisson(1.5, (64, 2000)).astype("u2")
    labels = (rng.random(2000) < 0.05).astype(np.int64)  # group 0: 95 % of the columns
    src = _zarr_source(str(tmp_path / "m.zarr"), m, (32, 64))  # a band 32 x 2,000: 128 KB, more than 4 blocks
    with dask.config.set(WIDE_ZARR):
        got = aggregate_columns(src, labels, 2, "median", scheduler="threads")
    np.testing.assert_array_equal(got, _expect(m, labels, 2, "median"))
    set_of_group, _groups, bounds = gather_plan(np.bincount(labels), 32, 2, 16 * 1024)
    assert len(bounds[set_of_group[0]]) > 2  # group 0 of a 32-row band: split in row ranges
    assert max(r * c for r, c in npg_inputs) * 2 <= 16 * 1024 + 2000 * 2


@pytest.mark.parametrize("func", ["median", "nanvar", "argmin", "nannunique", "nanfirst"])
def test_wide_functions_on_a_process_cluster(wide_any, local_cluster, func):
    from dask_loom.ops._aggregate import aggregate_columns

    src, m, labels = wide_any
    sel = np.flatnonzero(labels != 3)
    with dask.config.set(WIDE_ZARR):
        got = aggregate_columns(src, labels[sel], 12, func, select=sel, client=local_cluster)
    np.testing.assert_allclose(got, _expect(m[:, sel], labels[sel], 12, func), rtol=1e-5, atol=1e-9, equal_nan=True)


def test_combined_partials_equal_one_block_whatever_the_split():
    """Chan's merge and the picks give the one-block value for any split of the columns, in any order of blocks."""
    from dask_loom.ops._aggregate_tiles import tile_partials, tiled_finish
    from dask_loom.ops._kernels import GroupPlan

    rng = np.random.default_rng(4)
    x = (1e6 + rng.standard_normal((5, 300))).astype(np.float64)  # a large mean: sums of squares would lose it
    x[rng.random(x.shape) < 0.1] = np.nan
    idx = rng.integers(0, 4, 300)
    for func in ("nanvar", "nanstd", "nanargmax", "argmin", "nanfirst", "nanlast", "nanmin", "nanprod"):
        whole = tiled_finish(np.bincount(idx, minlength=4), func, tile_partials(x, GroupPlan(idx, 4), func, 0))
        cuts = [0, *sorted(rng.choice(np.arange(1, 300), 6, replace=False)), 300]
        parts = [tile_partials(x[:, a:b], GroupPlan(idx[a:b], 4), func, a) for a, b in itertools.pairwise(cuts)]
        rng.shuffle(parts)  # positions, not the order of the blocks, decide a pick
        split = tiled_finish(np.bincount(idx, minlength=4), func, *parts)
        np.testing.assert_allclose(split, whole, rtol=1e-10, equal_nan=True, err_msg=func)
        np.testing.assert_allclose(whole, _expect(x, idx, 4, func), rtol=1e-9, equal_nan=True, err_msg=func)


@st.composite
def _wide_cases(draw):
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(40, 300))
    chunks = (draw(st.integers(1, 16)), draw(st.integers(1, max(1, cols // 8))))
    dtype = draw(st.sampled_from(["float32", "uint16", "int32"]))
    n_groups = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**32 - 1))
    select = draw(st.sampled_from(["all", "mask", "indices"]))
    func = draw(st.sampled_from(ACCEPTED))
    return rows, cols, chunks, dtype, n_groups, seed, select, func


@settings(max_examples=40, deadline=None)
@given(_wide_cases())
@example(case=(13, 40, (1, 1), "uint16", 3, 0, "indices", "nanprod"))  # a product past uint16 (found by CI)
def test_wide_path_property_equals_numpy_groupies(case):
    """Any shape, chunking, labels (some groups empty), selection and function: the wide path equals numpy-groupies."""
    import tempfile

    from dask_loom.ops import _map
    from dask_loom.ops._aggregate import aggregate_columns

    rows, cols, chunks, dtype, n_groups, seed, select, func = case
    rng = np.random.default_rng(seed)
    m = rng.integers(-1 if dtype == "int32" else 0, 4, (rows, cols)).astype(dtype)  # small values: many ties
    if dtype == "float32":
        m[rng.random(m.shape) < 0.15] = np.nan
    labels = rng.integers(0, n_groups, cols)
    sel = {"all": None, "mask": np.flatnonzero(rng.random(cols) < 0.5), "indices": rng.integers(0, cols, cols)}[select]
    if sel is not None and not len(sel):
        sel = None
    use = np.arange(cols) if sel is None else sel
    itemsize = np.dtype(dtype).itemsize
    block = max(8, min(chunks[0], rows) * cols * itemsize // 5)  # a band one stored unit tall: five blocks, the wide path
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        src = _zarr_source(f"{tmp}/m.zarr", m, chunks)
        seen = _spy_regions(mp, _map, "read_ahead")
        staged = _spy_regions(mp, _aggregate, "_staged_sums")  # sums and means read decoded chunks
        with dask.config.set({"dask_loom.block-size": block, "dask_loom.coalesce-bytes": 0}):
            got = aggregate_columns(src, labels[use], n_groups, func, select=sel, scheduler="threads")
    assert seen + staged and all(r[1].stop - r[1].start < cols for r in seen + staged)
    want = _expect(m[:, use], labels[use], n_groups, func)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=func)


def test_atlas_band_shuffle_graph_has_block_sized_gathers():
    """One 7,424-row band of the full atlas (3,300,000 cells, 50 groups) for median: the graph, built without reading."""
    from dask_loom.ops._aggregate_shuffle import _cut, _gather, shuffle_graph

    plan = _aggregate.GroupPlan(np.arange(3_300_000) % 50, 50)
    (final,) = shuffle_graph(_Atlas(rows=7_424), plan, None, "atlas-median-x", "median", target_bytes=64 << 20)
    graph = dict(final.dask)
    cuts = [v for v in graph.values() if v[0] is _cut]
    assert len(cuts) == 806 and max(math.prod(s.stop - s.start for s in v[2]) for v in cuts) * 2 <= 64 << 20
    gathers = [v for v in graph.values() if v[0] is _gather]
    # Each group is 66,000 cells: 980 MB of the band, gathered in 15 row ranges of about 64 MiB.
    assert len(gathers) == 50 * 15
    spans = [(r1 - r0) * len(g) for (g, r0, r1) in graph[final.key][3]]
    assert max(spans) * 66_000 * 2 <= 64 << 20


def test_group_plan_travels_as_its_labels_and_lands_whole():
    import pickle

    from dask.base import tokenize

    idx = np.random.default_rng(3).integers(0, 50, 4_096)
    plan = _aggregate.GroupPlan(idx, 50)
    raw = pickle.dumps(plan)
    back = pickle.loads(raw)
    assert len(raw) < 5_000  # uint8 labels; the int64 labels and sort order alone are 64 KiB
    for name in ("idx", "order", "counts", "starts", "first", "last"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
    assert back.idx.dtype == np.int64 and back.n_groups == 50 and tokenize(back) == tokenize(plan)
    wide = _aggregate.GroupPlan(np.arange(70_000) % 70_000, 70_000)  # more groups than uint16 holds: uint32
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(wide)).idx, wide.idx)

