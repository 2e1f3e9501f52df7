"""SIGKILL in the middle of permute, add_columns and layer writes leaves the old or the new file, whole."""

from __future__ import annotations

import os

import numpy as np
import pytest

import dask_loom
from tests._faults import kill_during
from tests.conftest import make_matrix

KILLS = int(os.environ.get("DASK_LOOM_KILLS", "6"))

OPS = {
    "permute": ("order = np.random.default_rng(1).permutation(4000)", "with dask_loom.connect(path) as ds:\n    ds.permute(order, axis=1)"),
    "add_columns": (
        "m = np.random.default_rng(2).random((1500, 1500)).astype('f4')",
        "with dask_loom.connect(path) as ds:\n    ds.add_columns({'': m, 'spliced': (m * 10).astype('i4')}, {'CellID': np.array(['n%d' % i for i in range(1500)]), 'Clusters': np.zeros(1500, int)})",
    ),
    "layer write": (
        "m = np.random.default_rng(3).random((1500, 4000)).astype('f4')",
        "with dask_loom.connect(path) as ds:\n    ds['fresh'] = m",
    ),
}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "orig.loom"
    m = make_matrix((1500, 4000), seed=0, density=0.5)
    dask_loom.create(
        path,
        {"": m, "spliced": (m * 2).astype("i4")},
        {"Gene": np.array([f"g{i}" for i in range(1500)])},
        {"CellID": np.array([f"c{i}" for i in range(4000)]), "Clusters": np.arange(4000) % 9},
    )
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
def test_sigkill_leaves_old_or_new(original, tmp_path, op):
    setup, code = OPS[op]
    report = kill_during(original, str(tmp_path), name=op.replace(" ", "_"), setup=setup, op=code, kills=KILLS, seed=hash(op) % 1000)
    assert report.kills == KILLS
    assert report.lost_or_corrupt == 0, report.notes
    assert report.old + report.new == KILLS
    # No temporary files remain visible as data; the next writer removes stale ones.
    work = tmp_path / f"{op.replace(' ', '_')}-work"
    with dask_loom.connect(work) as ds:
        ds.ca.After = np.arange(ds.shape[1])
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert leftovers == []
