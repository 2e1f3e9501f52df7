"""Aggregating a layer too wide for full-width bands: blocks of about the block size, combined in a tree.

A full-width row band one stored unit tall of an atlas (7,424 x 4,096 shards
across 3.3 M cells) is 49 GB; such layers are grouped over 2-D blocks whose
partials (sums, sums of squares, extremes, products, first and last values) are combined a
row band at a time.  Every value is checked against
numpy on the same data (and loompy's aggregate for a ``.loom``); the blocks the
tasks read against the block size.
"""

from __future__ import annotations

import math

import dask
import numpy as np
import pytest

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


def test_full_atlas_graph_has_block_sized_tasks_and_shallow_trees():
    """The full 58,000 x 3,300,000 atlas in 7,424 x 4,096 shards: the graph, built without reading."""

    class Atlas:
        shape = (58_000, 3_300_000)
        chunk_shape = (7_424, 4_096)
        dtype = np.dtype("u2")

    plan = _aggregate.GroupPlan(np.arange(Atlas.shape[1]) % 50, 50)
    finals = _aggregate._tiled_sums(
        Atlas(), plan, None, "atlas-aggregate-x", "atlas-aggregate-combine-x", "mean"
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
