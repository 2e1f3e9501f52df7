"""``graphs/make_graphs.py``: task-graph pictures from real runs, benchmark charts from results JSON."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "graphs" / "make_graphs.py"
GRAPHS = ["map", "scan", "aggregate", "permute", "convert", "mapped_batch", "tensorview"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_BYTES = 200 * 1024


@pytest.fixture(scope="module")
def mg():
    spec = importlib.util.spec_from_file_location("make_graphs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_graphs"] = mod  # dataclasses look their module up while the script loads
    spec.loader.exec_module(mod)
    return mod


def _results(folder: pathlib.Path) -> pathlib.Path:
    """Results JSON in the three shapes the benchmarks write."""
    folder.mkdir()
    rows = {
        "benchmark": "loom_map",
        "machine": {"cpus": 2},
        "rows": {
            "loompy map": {"wall": 2.0, "peak_rss": 300 * 2**20},
            "dask_loom map threads": {"wall": 0.5, "peak_rss": 200 * 2**20},
        },
        "ratios": {"speedup_vs_loompy": 4.0, "tasks": 12, "broken_over_x": None},
    }
    small = {**rows, "benchmark": "loom_map_small", "rows": {"loompy map": {"wall": 9.0, "peak_rss": 1}}}
    runs = {
        "benchmark": "mapped",
        "runs": {
            "h5ad": {
                "getitem_lamindb": {"wall": 3.0, "peak_rss": 2**20, "result": {"items": 2000}},
                "getitem_dask_loom": {"wall": 1.0, "peak_rss": 2**20, "result": {"items": 2000}},
                "ratios": {"getitem_vs_lamindb": 3.0},
            }
        },
    }
    results = {
        "benchmark": "bench_ome",
        "small": True,
        "results": {"full_read": {"wall": 1.5, "peak_rss_mib": 400.0}, "numpy_full": {"wall": 3.0, "peak_rss_mib": 700.0}},
        "ratios": {"numpy_full_over_full": 2.0},
    }
    for name, data in [("loom_map", rows), ("loom_map_small", small), ("mapped", runs), ("bench_ome_small", results)]:
        (folder / f"{name}.json").write_text(json.dumps(data))
    (folder / "broken.json").write_text("{not json")
    return folder


def test_load_results(mg, tmp_path):
    results = {r.name: r for r in mg.load_results(_results(tmp_path / "res"))}
    assert set(results) == {"loom_map", "mapped", "ome"}
    lm = results["loom_map"]
    assert not lm.small  # the full-size run wins over loom_map_small.json
    assert lm.groups[0].rows == {"loompy map": (2.0, 300.0), "dask_loom map threads": (0.5, 200.0)}
    assert lm.ratios == {"speedup_vs_loompy": 4.0}  # counts and None are not comparisons
    mp = results["mapped"]
    assert mp.groups[0].title == "runs / h5ad"
    assert mp.groups[0].rows["getitem_lamindb [2,000 items]"] == (3.0, 1.0)
    assert mp.ratios == {"runs h5ad getitem_vs_lamindb": 3.0}
    assert results["ome"].small
    assert results["ome"].groups[0].rows["numpy_full"] == (3.0, 700.0)
    assert [mg._is_peer(n) for n in ["loompy map", "dask_loom map threads", "floor: read", "getitem_lamindb", "full_read"]] == [
        "peer",
        "dask_loom",
        "floor",
        "peer",
        "dask_loom",
    ]


def test_layered_layout(mg):
    # a diamond plus a tail: a -> b, a -> c, (b, c) -> d, d -> e
    deps = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}, "e": {"d"}}
    xy = mg.layered_layout(deps)
    assert {k: y for k, (_, y) in xy.items()} == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 3}
    assert xy["b"][0] != xy["c"][0]
    with pytest.raises(ValueError, match="cycle"):
        mg.layered_layout({"a": {"b"}, "b": {"a"}})


def _check_png(path: pathlib.Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) < MAX_BYTES, f"{path.name} is {len(data) // 1024} KiB"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3
    assert img.shape[0] > 100
    assert img.shape[1] > 300
    assert img.std() > 0.05  # not a blank canvas


def test_script_on_a_tiny_input(mg, tmp_path, capsys):
    out = tmp_path / "figs"
    assert mg.main(["--small", "--out", str(out), "--results", str(_results(tmp_path / "res"))]) == 0
    printed = capsys.readouterr().out
    expected = [f"graph_{g}.png" for g in GRAPHS] + ["bench_loom_map.png", "bench_mapped.png", "bench_ome.png", "bench_ratios.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    for name in expected:
        _check_png(out / name)
        assert name in printed


def test_graphs_record_real_task_names(mg, tmp_path):
    """The graph a picture is drawn from is the one the operation ran (names and task counts)."""
    import dask
    from dask.utils import key_split

    import dask_loom

    path = tmp_path / "t.loom"
    m = np.arange(128 * 192, dtype="float32").reshape(128, 192)
    dask_loom.create(str(path), m, {"Gene": np.arange(128)}, {"CellID": np.arange(192)}, chunks=(64, 64))
    with dask.config.set({"dask_loom.block-size": 2 * 64 * 64 * 4}), dask_loom.connect(path, "r") as ds, mg.capture() as g:
        means = ds.map([np.mean], axis=0, scheduler="sync")[0]
    np.testing.assert_allclose(means, m.mean(axis=1))
    prefixes = {key_split(k) for k in g}
    # A row's partials (at most 8) are combined in its result task, no combine task of their own.
    assert prefixes == {"loom-map", "loom-map-result"}
    assert sum(key_split(k) == "loom-map" for k in g) == 3  # 6 chunks, 2 per block
    png = mg.draw_graph(g, "map", tmp_path / "m.png")
    _check_png(png)


def test_committed_figures_are_small_and_shown_in_the_readme():
    pngs = sorted((REPO / "graphs").glob("*.png"))
    assert pngs, "graphs/*.png are committed (python graphs/make_graphs.py regenerates them)"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"graphs/([\w.-]+\.png)", readme))
    for g in GRAPHS:
        assert f"graph_{g}.png" in {p.name for p in pngs}
        assert f"graph_{g}.png" in shown
    for p in pngs:
        assert p.stat().st_size < MAX_BYTES, p.name
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert shown <= {p.name for p in pngs}, f"README shows missing figures: {shown - {p.name for p in pngs}}"


def test_benchmark_results_carry_no_machine_paths():
    # Results record inputs by name and shape, relative to the repository (issue 11).
    import json
    import re

    results = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    assert results
    for f in results:
        text = json.dumps(json.loads(f.read_text()))
        assert not re.search(r'"/(?:work|tmp|home|root|Users)/', text), f.name
        assert str(REPO) not in text, f.name


def test_map_combines_rows_of_many_partials_in_a_tree_of_eight(tmp_path):
    """20 partials per row: 3 combine tasks (8 + 8 + 4), then the result task combines those 3 and finishes."""
    import dask
    from dask.base import key_split

    import dask_loom
    from dask_loom.ops._map import map_graph

    m = np.arange(64 * 1280, dtype="float32").reshape(64, 1280)
    path = tmp_path / "w.loom"
    dask_loom.create(str(path), m, {"Gene": np.arange(64)}, {"CellID": np.arange(1280)}, chunks=(64, 64))
    with dask.config.set({"dask_loom.block-size": 64 * 64 * 4}), dask_loom.connect(path, "r") as ds:
        dsk, outs, _ = map_graph(ds.__dask_loom_layer_host__().source(""), [np.mean], axis=0)
        means = ds.map([np.mean], axis=0, scheduler="sync")[0]
    counts = {}
    for k in dsk:
        counts[key_split(k)] = counts.get(key_split(k), 0) + 1
    assert counts == {"loom-map": 20, "loom-map-combine": 3, "loom-map-result": 1}
    assert len(outs) == 1
    np.testing.assert_allclose(means, m.mean(axis=1), rtol=1e-6)
