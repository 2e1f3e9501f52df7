"""Task names as the dask dashboard groups them, the dashboard's HTTP endpoints, progress bars.

The dashboard groups tasks by ``dask.utils.key_split(key)`` (task stream
colours, progress bars, Prometheus ``task_prefix_name``): every task-name
prefix dask_loom uses must come out of ``key_split`` whole (reference:
ecosystem.md §10).  Here each operation is run and the prefixes of the tasks
that really ran are compared with the intended ones; then a job runs on a
LocalCluster and the prefixes, with their task counts, are read back from
the scheduler and over the dashboard's HTTP endpoints.
"""

from __future__ import annotations

import json
import pathlib
import re
import time
import urllib.request
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
from dask.base import tokenize
from dask.callbacks import Callback
from dask.utils import key_split

import dask_loom
from dask_loom.cluster import compute

#: Every task-name prefix dask_loom gives its tasks.
INTENDED = {
    "anndata-write",
    "hdf-read",
    "hdf-write",
    "loom-aggregate",
    "loom-batch",
    "loom-convert",
    "loom-export",
    "loom-map",
    "loom-map-combine",
    "loom-map-result",
    "loom-permute",
    "loom-read",
    "loom-scan",
    "loom-sparse",
    "loom-write",
    "mapped-obs",
    "mapped-read",
    "ome-read",
    "ome-write",
    "tiff-read",
    "zarr-read",
    "zarr-write",
}
# dask_loom.map / aggregate / scan / permute name their tasks <format>-<operation>
# (tests/test_ops_formats.py runs each on each format).
OPS_FORMATS = ("loom", "zarr", "h5ad", "mapped", "ome", "dask", "hdf")
OPS = ("map", "map-combine", "map-result", "aggregate", "aggregate-combine", "aggregate-result", "scan", "batch")
INTENDED |= {f"{f}-{op}" for f in OPS_FORMATS for op in OPS} | {"zarr-permute", "h5ad-read", "loom-reshard", "zarr-reshard"}
# Names in the source that look like prefixes but name no task.
NOT_TASKS = {"dask-loom", "dask-loom-demo", "dask-loom-write"}  # temporary paths, a distributed Lock
FAMILIES = ("loom", "zarr", "mapped", "ome", "hdf", "tiff", "anndata", "h5ad", "dask")

PACKAGE = pathlib.Path(dask_loom.__file__).parent


@pytest.mark.parametrize("prefix", sorted(INTENDED))
def test_prefix_survives_key_split(prefix):
    tok = tokenize(prefix)
    assert key_split(f"{prefix}-{tok}") == prefix
    assert key_split((f"{prefix}-{tok}", 0, 3)) == prefix
    assert key_split(f"{prefix}-{tok}-1024") == prefix  # loom-batch-<token>-<start>
    for i, word in enumerate(prefix.split("-")):
        # key_split keeps a first word that starts with a letter (h5ad), later words only if alphabetic
        assert word.isalpha() or (i == 0 and word[0].isalpha() and word.isalnum())
        assert not (len(word) == 8 and word[0] in "abcdef")  # key_split would cut the prefix there


def test_every_prefix_in_the_source_is_intended():
    pattern = re.compile(
        r'task_name\(\s*"([a-z-]+)"'
        r'|(?<![a-z_])(?:read_)?prefix(?:: str)? ?= ?"([a-z-]+)"'
        r'|(?<![a-z_])prefix="([a-z-]+)"'
        r'|f"([a-z]+(?:-[a-z]+)+)-\{'
    )
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            name = next(g for g in m.groups() if g)
            if not name.startswith("dask-loom-") or name in NOT_TASKS:
                found.add(name)
    found -= NOT_TASKS
    assert found, "the pattern found no task names at all"
    assert found <= INTENDED, f"task-name prefixes not in INTENDED (check them against key_split): {found - INTENDED}"


# -- the names tasks really run under ----------------------------------------------------------


def _record(fn) -> Counter:
    """Prefixes (with task counts) of the tasks a local-scheduler run executes."""
    keys: list = []
    with Callback(pretask=lambda key, dsk, state: keys.append(key)):
        fn()
    return Counter(key_split(k) for k in keys)


def _graph(x) -> set[str]:
    return {key_split(k) for k in x.__dask_graph__()}


@pytest.fixture(scope="module")
def loom_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    rng = np.random.default_rng(0)
    m = (rng.random((300, 500)) * (rng.random((300, 500)) < 0.3)).astype("float32")
    path = folder / "d.loom"
    dask_loom.create(
        str(path),
        {"": m, "spliced": (m * 10).astype("int32")},
        {"Gene": np.array([f"g{i}" for i in range(300)])},
        {"CellID": np.arange(500), "Clusters": np.arange(500) % 4},
    )
    return path, m


SMALL_BLOCKS = {"dask_loom.block-size": 64 * 64 * 4 * 4}  # several blocks on a small file


def _ops(path, tmp):
    def with_ds(f):
        def run():
            with dask_loom.connect(path, "r+") as ds:
                f(ds)

        return run

    return {
        # (at most 8 partials of a row here: combined in its result task)
        "map": (with_ds(lambda ds: ds.map([np.mean, np.std], axis=0)), {"loom-map", "loom-map-result"}),
        "map-function": (with_ds(lambda ds: ds.map([lambda v: v[:3].sum()], axis=1)), {"loom-map"}),
        "read": (with_ds(lambda ds: ds[10:200, [1, 400]]), {"loom-read"}),
        "scan": (with_ds(lambda ds: list(ds.scan(axis=1, batch_size=128, what=["layers"]))), {"loom-scan", "loom-batch"}),
        # bands of two blocks and more are grouped over block-sized tiles, finished per band
        "aggregate": (with_ds(lambda ds: ds.aggregate(None, group_by="Clusters")), {"loom-aggregate", "loom-aggregate-result"}),
        "sparse": (with_ds(lambda ds: ds.sparse()), {"loom-sparse"}),
        "export": (with_ds(lambda ds: ds.export(str(tmp / "d.tsv"))), {"loom-export"}),
        "permute": (with_ds(lambda ds: ds.permute(np.arange(500)[::-1].copy(), axis=1)), {"loom-permute", "loom-write"}),
        "write": (
            with_ds(lambda ds: ds.layers.__setitem__("twice", da.from_array(np.ones((300, 500), "float32"), chunks=(64, 64)))),
            {"loom-write"},
        ),
        "convert": (lambda: dask_loom.convert(path, tmp / "d.loom.zarr"), {"loom-convert", "loom-read"}),
    }


@pytest.mark.parametrize(
    "op", ["map", "map-function", "read", "scan", "aggregate", "sparse", "export", "permute", "write", "convert"]
)
def test_operations_run_under_their_names(loom_file, tmp_path, op):
    import shutil

    path, _ = loom_file
    work = tmp_path / "d.loom"
    shutil.copy(path, work)
    fn, expected = _ops(work, tmp_path)[op]
    with dask.config.set(SMALL_BLOCKS):
        seen = _record(fn)
    ours = {p for p in seen if p.split("-")[0] in FAMILIES}
    assert ours == expected
    # any other task is dask's own work on a user's array (rechunking the input of a write)
    assert all(p.split("-")[0] not in FAMILIES for p in set(seen) - expected)
    assert not set(seen) & set(FAMILIES)  # a bare "loom" would mean a name key_split cut short


def test_lazy_collections_carry_their_names(loom_file, tmp_path):
    path, m = loom_file
    with dask_loom.connect(path, "r") as ds:
        assert _graph(ds.layers[""].to_dask()) == {"loom-read"}
        assert _graph(ds.to_xarray()["spliced"].data) == {"loom-read"}
    from dask_loom.hdf5 import hdf5_to_dask

    assert _graph(hdf5_to_dask(str(path), "matrix")) == {"hdf-read"}
    z = tmp_path / "z.zarr"
    dask_loom.to_zarr(da.from_array(m, chunks=(100, 100)), str(z))
    assert _graph(dask_loom.open_zarr(str(z), mode="r").to_dask()) == {"zarr-read"}
    seen = _record(lambda: dask_loom.to_zarr(da.from_array(m, chunks=(100, 100)), str(tmp_path / "w.zarr")))
    assert "zarr-write" in seen
    a = np.arange(2 * 2 * 3 * 16 * 16, dtype="uint16").reshape(2, 2, 3, 16, 16)
    tv = dask_loom.TensorView(dask_loom.to_ome_arrow(a, chunk_shape=(1, 8, 8)))
    # "original-ome-read" is the one task holding the record (dask's from_array naming)
    assert _graph(tv.to_dask()) - {"original-ome-read"} == {"ome-read"}


def test_mapped_collection_names(tmp_path):
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    for i in range(2):
        obs = pd.DataFrame({"k": pd.Categorical(["a", "b"] * 20)}, index=[f"c{i}_{j}" for j in range(40)])
        anndata.AnnData(np.ones((40, 6), "float32"), obs=obs).write_h5ad(tmp_path / f"a{i}.h5ad")
    mc = dask_loom.MappedCollection([tmp_path / "a0.h5ad", tmp_path / "a1.h5ad"], obs_keys=["k"])
    assert _graph(mc.to_dask()) == {"mapped-read"}
    # from_delayed wraps the obs task ("from-value-…") and fusion appends "concatenate"; the name stays readable
    seen = _record(lambda: mc.to_xarray()["k"].compute())
    assert any("mapped-obs" in p for p in seen)


# -- the dashboard of a LocalCluster -------------------------------------------------------------


def _http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read()


def _prefix_counts(client) -> dict[str, int]:
    """Tasks that reached memory, per prefix, as the scheduler counts them (cumulative)."""
    return client.run_on_scheduler(
        lambda dask_scheduler: {k: int(v.state_counts["memory"]) for k, v in dask_scheduler.task_prefixes.items()}
    )


def _metrics(base: str) -> dict[str, int]:
    """``dask_scheduler_prefix_state_totals_total{state="memory"}`` per prefix, from /metrics."""
    text = _http(f"{base}/metrics").decode()
    out = {}
    for m in re.finditer(r'dask_scheduler_prefix_state_totals_total\{state="memory",task_prefix_name="([^"]+)"\} ([0-9.e+]+)', text):
        out[m.group(1)] = int(float(m.group(2)))
    return out


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@pytest.mark.cluster
def test_dashboard_shows_prefixes_and_counts(loom_file, local_cluster):
    pytest.importorskip("prometheus_client")  # the scheduler's /metrics needs it
    path, m = loom_file
    client = local_cluster
    base = client.dashboard_link.rsplit("/", 1)[0]
    assert _http(f"{base}/health") == b"ok"
    counts = json.loads(_http(f"{base}/json/counts.json"))
    assert counts["workers"] == 2

    def job(**kw):
        with dask_loom.connect(path, "r") as ds:
            means = ds.map([np.mean, np.std], axis=0, **kw)[0]
            groups = ds.aggregate(None, group_by="Clusters", aggr_by="sum", **kw)
        return means, groups

    with dask.config.set(SMALL_BLOCKS):
        expected = _record(lambda: job(scheduler="sync"))  # the same graphs, run locally
        before, before_http = _prefix_counts(client), _metrics(base)
        means, groups = job(client=client)
        # a persisted collection keeps its layer's name (no fusion), so its reads show as loom-read
        with dask_loom.connect(path, "r") as ds:
            x = ds.layers[""].to_dask().persist(scheduler=client)
            n_read = x.npartitions
            np.testing.assert_allclose(x.compute(scheduler=client), m)
            del x
    np.testing.assert_allclose(means, m.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(groups, np.stack([m[:, np.arange(500) % 4 == g].sum(axis=1) for g in range(4)], axis=1), rtol=1e-5)
    want = {**expected, "loom-read": n_read}
    assert set(want) == {"loom-map", "loom-map-result", "loom-aggregate", "loom-aggregate-result", "loom-read"}

    got = _delta(_prefix_counts(client), before)
    assert {p: got.get(p) for p in want} == want
    # the same numbers over HTTP (the dashboard's Prometheus endpoint); allow the scrape to catch up
    for _ in range(50):
        got_http = _delta(_metrics(base), before_http)
        if all(got_http.get(p) == n for p, n in want.items()):
            break
        time.sleep(0.1)
    assert {p: got_http.get(p) for p in want} == want


# -- progress bars -----------------------------------------------------------------------------


def test_progress_local(capsys):
    x = da.ones((100, 100), chunks=10).sum()
    with dask.config.set({"dask_loom.progress-minimum": 0}):
        assert compute(x, scheduler="threads", progress=True) == (10000.0,)
        out, err = capsys.readouterr()
        assert "100% Completed" in err
        assert out == ""
        compute(x, scheduler="sync")
        assert "Completed" not in capsys.readouterr().err
        with dask.config.set({"dask_loom.progress": True}):  # on for every compute
            compute(x, scheduler="sync")
        assert "100% Completed" in capsys.readouterr().err
    compute(x, scheduler="threads", progress=True)  # a fast compute stays quiet (1 s minimum)
    assert "Completed" not in capsys.readouterr().err


@pytest.mark.cluster
def test_progress_distributed(capsys, local_cluster, monkeypatch):
    x = da.arange(1000, chunks=100).sum()
    assert compute(x, client=local_cluster, progress=True) == (499500,)
    out, err = capsys.readouterr()
    assert "100% Completed" in err
    assert "Completed" not in out
    # in Jupyter without ipywidgets: the text bar, on stdout (the cell's output)
    import distributed.utils

    monkeypatch.setattr(distributed.utils, "is_kernel", lambda: True)
    assert compute(x, client=local_cluster, progress=True) == (499500,)
    out, err = capsys.readouterr()
    assert "100% Completed" in out
