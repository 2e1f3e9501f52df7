"""Regenerate the figures in ``graphs/``: task graphs of each operation, and the benchmark charts.

Task graphs come from real runs on a small generated Loom file (and a small
AnnData pair and OME-Arrow image): each operation runs on dask's local
schedulers while a callback records every graph it computes, and the union
is drawn as a layered DAG, one dot per task, coloured by its task prefix
with the colours of the dashboard's task stream.  Graphviz is not needed:
the layout is computed here and drawn with matplotlib.

The benchmark charts read ``benchmarks/results/*.json`` (the full-size run
of a benchmark where there is one, else its ``--small`` run): wall time and
peak RSS per row, peer rows (loompy, lamindb, ome-arrow, numpy, zarr-python)
beside dask_loom's, and every comparison ratio the benchmarks recorded.

Usage::

    python graphs/make_graphs.py                  # all figures into graphs/
    python graphs/make_graphs.py --small --out /tmp/figs
    python graphs/make_graphs.py --only bench     # charts only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import textwrap
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
DPI = 90
# Families of task names that belong to dask_loom (the rest are dask's own: getitem, rechunk …).
OURS = ("loom", "zarr", "mapped", "ome", "hdf", "tiff")

# -------------------------------------------------------------------------------------------
# task graphs
# -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture() -> Iterator[dict[Any, Any]]:
    """Collect the union of every graph run on a local scheduler inside the block."""
    from dask.callbacks import Callback

    graph: dict[Any, Any] = {}
    with Callback(start=lambda dsk: graph.update(dsk)):
        yield graph


def dependencies(dsk: dict[Any, Any]) -> dict[Any, set[Any]]:
    from dask.core import get_deps

    deps, _ = get_deps(dsk)
    return {k: {d for d in v if d in dsk} for k, v in deps.items()}


def layered_layout(deps: dict[Any, set[Any]]) -> dict[Any, tuple[float, int]]:
    """``key -> (x, layer)``: layer = longest path from a source; x ordered by parents (barycentres)."""
    layer: dict[Any, int] = {}
    order = _toposort(deps)
    for k in order:
        layer[k] = 1 + max((layer[d] for d in deps[k]), default=-1)
    rows: dict[int, list[Any]] = defaultdict(list)
    for k in order:
        rows[layer[k]].append(k)
    # sources in key order (block indices stay together), then barycentre sweeps down and up
    rows[0].sort(key=_sort_key)
    pos = {k: float(i) for r in rows.values() for i, k in enumerate(r)}
    children: dict[Any, list[Any]] = defaultdict(list)
    for k, ds in deps.items():
        for d in ds:
            children[d].append(k)
    n_layers = max(rows) + 1 if rows else 0
    for _ in range(3):
        for li in range(1, n_layers):
            _reorder(rows[li], pos, lambda k: deps[k])
        for li in range(n_layers - 2, -1, -1):
            _reorder(rows[li], pos, lambda k: children[k])
    width = max((len(r) for r in rows.values()), default=1)
    out = {}
    for li, r in rows.items():
        offset = (width - len(r)) / 2  # centre narrow layers
        for i, k in enumerate(r):
            out[k] = (offset + i, li)
    return out


def _sort_key(key: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(key, tuple):
        return (str(key[0]), tuple(int(i) if isinstance(i, (int, np.integer)) else 0 for i in key[1:]))
    return (str(key), ())


def _reorder(row: list[Any], pos: dict[Any, float], neighbours: Callable[[Any], Any]) -> None:
    def bary(k: Any) -> float:
        ns = [pos[n] for n in neighbours(k) if n in pos]
        return sum(ns) / len(ns) if ns else pos[k]

    row.sort(key=lambda k: (bary(k), _sort_key(k)))
    for i, k in enumerate(row):
        pos[k] = float(i)


def _toposort(deps: dict[Any, set[Any]]) -> list[Any]:
    indeg = {k: len(v) for k, v in deps.items()}
    children: dict[Any, list[Any]] = defaultdict(list)
    for k, ds in deps.items():
        for d in ds:
            children[d].append(k)
    ready = sorted((k for k, n in indeg.items() if n == 0), key=_sort_key)
    out = []
    while ready:
        k = ready.pop(0)
        out.append(k)
        for c in children[k]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    if len(out) != len(deps):
        raise ValueError("the graph has a cycle")
    return out


def lazy_graph(x: Any) -> dict[Any, Any]:
    """The tasks a collection's compute would run: its graph culled to its keys (names kept, no fusion)."""
    from dask.core import flatten

    return dict(x.__dask_graph__().cull(set(flatten(x.__dask_keys__()))))


def draw_graph(dsk: dict[Any, Any], title: str, path: pathlib.Path) -> pathlib.Path:
    """Draw a task graph as a layered DAG (sources at the top) into a PNG."""
    from dask.utils import key_split

    if not dsk:
        raise ValueError(f"{title}: no tasks were recorded")
    deps = dependencies(dsk)
    xy = layered_layout(deps)
    prefixes = {k: key_split(k) for k in dsk}
    counts = Counter(prefixes.values())
    ordered = sorted(counts, key=lambda p: (not p.startswith(OURS), p))
    palette = plt.get_cmap("tab10").colors
    colours = {p: palette[i % len(palette)] for i, p in enumerate(ordered)}
    width = max(x for x, _ in xy.values()) + 1
    depth = max(y for _, y in xy.values()) + 1
    fig_w = min(16.0, max(8.0, 0.32 * width + 2.5))
    fig_h = min(9.0, max(2.6, 0.75 * depth + 1.4))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=DPI)
    for k, ds in deps.items():
        x1, y1 = xy[k]
        for d in ds:
            x0, y0 = xy[d]
            ax.plot([x0, x1], [-y0, -y1], color="#9a9a9a", lw=0.6, zorder=1)
    size = max(18.0, min(140.0, 2600.0 / max(width, 1)))
    for prefix in ordered:
        pts = np.array([xy[k] for k, p in prefixes.items() if p == prefix], dtype=float)
        ax.scatter(pts[:, 0], -pts[:, 1], s=size, color=colours[prefix], edgecolor="black", linewidth=0.4, zorder=2,
                   label=f"{prefix} ({counts[prefix]})")
    ax.set_title(textwrap.fill(f"{title} — {len(dsk)} tasks", width=int(fig_w * 9)), fontsize=10)
    ax.axis("off")
    ax.margins(x=0.04, y=0.12)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title="task prefix (tasks)",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _small_inputs(folder: pathlib.Path, *, small: bool) -> dict[str, Any]:
    """A Loom file, two AnnData files and an OME-Arrow record, all small."""
    import anndata
    import pandas as pd

    import dask_loom

    rows, cols = (128, 192) if small else (256, 384)
    rng = np.random.default_rng(0)
    m = (rng.poisson(1.5, size=(rows, cols)) * (rng.random((rows, cols)) < 0.3)).astype("float32")
    loom = folder / "example.loom"
    dask_loom.create(
        str(loom),
        {"": m, "spliced": (m * 2).astype("int32")},
        {"Gene": np.array([f"g{i}" for i in range(rows)])},
        {"CellID": np.array([f"c{i}" for i in range(cols)]), "Clusters": rng.integers(0, 4, size=cols)},
        chunks=(64, 64),
    )
    h5ads = []
    for i in range(2):
        n = 96 if small else 192
        obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], size=n))}, index=[f"f{i}c{j}" for j in range(n)])
        ad = anndata.AnnData(rng.random((n, 40)).astype("float32"), obs=obs)
        h5ads.append(folder / f"part{i}.h5ad")
        ad.write_h5ad(h5ads[-1])
    image = rng.integers(0, 4000, size=(2, 3, 4, 96, 96), dtype=np.uint16)  # T C Z Y X
    record = dask_loom.to_ome_arrow(image, chunk_shape=(2, 48, 48), channel_names=["DNA", "Actin", "Golgi"])
    return {"loom": loom, "h5ads": h5ads, "record": record}


def task_graphs(out: pathlib.Path, *, small: bool = False) -> list[pathlib.Path]:
    """Run each operation on small inputs and draw the graphs it computed."""
    import dask

    import dask_loom

    made = []
    with tempfile.TemporaryDirectory(prefix="dask-loom-graphs-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = pathlib.Path(tmp)
        inp = _small_inputs(folder, small=small)
        loom = inp["loom"]
        # two stored chunks per block, so each operation shows several blocks
        with dask.config.set({"dask_loom.block-size": 2 * 64 * 64 * 4, "dask_loom.progress": False}):

            def run(name: str, title: str, fn: Callable[[], Any]) -> None:
                with capture() as g:
                    fn()
                made.append(draw_graph(g, title, out / f"graph_{name}.png"))

            with dask_loom.connect(loom, "r") as ds:
                shape = ds.shape
                run("map", f"ds.map([np.mean, np.std], axis=0) on a {shape[0]} x {shape[1]} Loom file, 64 x 64 chunks",
                    lambda: ds.map([np.mean, np.std], axis=0, scheduler="sync"))
                # prefetch=0: read-ahead runs batches concurrently, and dask's callbacks see one compute at a time
                run("scan", "ds.scan(axis=1, batch_size=96): one loom-batch task assembles each batch",
                    lambda: list(ds.scan(axis=1, batch_size=96, layers=[""], what=["layers"], prefetch=0, scheduler="sync")))
                run("aggregate", "ds.aggregate(group_by='Clusters', aggr_by='mean')",
                    lambda: ds.aggregate(None, group_by="Clusters", aggr_by="mean", scheduler="sync"))
            work = folder / "permute.loom"
            shutil.copy(loom, work)
            with dask_loom.connect(work, "r+", scheduler="sync") as ds:
                order = np.random.default_rng(1).permutation(ds.shape[1])
                run("permute", "ds.permute(ordering, axis=1): every layer rewritten, swapped in at the end",
                    lambda: ds.permute(order, axis=1))
            run("convert", "dask_loom.convert('example.loom', 'example.loom.zarr')",
                lambda: dask_loom.convert(loom, folder / "example.loom.zarr", scheduler="sync"))

            mc = dask_loom.MappedCollection(inp["h5ads"], obs_keys=["cell_type"])
            x = mc.to_dask()
            idx = np.sort(np.random.default_rng(2).choice(mc.n_obs, size=32, replace=False))
            batch = x[idx]
            made.append(draw_graph(lazy_graph(batch),
                                   "MappedCollection.to_dask()[shuffled batch of 32 rows] over two .h5ad files",
                                   out / "graph_mapped_batch.png"))
            tv = dask_loom.TensorView(inp["record"], c=[2, 0], layout="CZYX", t=1)
            made.append(draw_graph(lazy_graph(tv.to_dask()),
                                   "TensorView(record, t=1, c=[2, 0], layout='CZYX').to_dask()",
                                   out / "graph_tensorview.png"))
    return made


# -------------------------------------------------------------------------------------------
# benchmark charts
# -------------------------------------------------------------------------------------------

PEER_WORDS = ("loompy", "lamindb", "ome_arrow", "ome-arrow", "numpy", "from_zarr", "zarr-python", "anndata", "peer")


@dataclass
class Group:
    """Rows of one benchmark run (name -> wall seconds, peak RSS MiB)."""

    title: str
    rows: dict[str, tuple[float, float | None]] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    small: bool
    path: pathlib.Path
    groups: list[Group]
    ratios: dict[str, float]


def _row(v: Any) -> tuple[float, float | None] | None:
    if not isinstance(v, dict) or not isinstance(v.get("wall"), (int, float)):
        return None
    if isinstance(v.get("peak_rss"), (int, float)):
        rss = v["peak_rss"] / 2**20
    elif isinstance(v.get("peak_rss_mib"), (int, float)):
        rss = float(v["peak_rss_mib"])
    else:
        rss = None
    return float(v["wall"]), rss


def _label(name: str, v: dict[str, Any]) -> str:
    # Runs that processed different amounts of work (a loader's items) say so beside their time.
    items = (v.get("result") or {}).get("items") if isinstance(v.get("result"), dict) else v.get("items")
    return f"{name} [{items:,} items]" if isinstance(items, int) else name


def _groups(node: Any, where: str) -> Iterator[Group]:
    if not isinstance(node, dict):
        return
    rows = {_label(k, v): r for k, v in node.items() if (r := _row(v)) is not None}
    if rows:
        yield Group(where, rows)
    for k, v in node.items():
        if isinstance(v, dict) and _row(v) is None and k != "ratios":
            yield from _groups(v, f"{where} / {k}" if where else k)


def _ratios(node: Any, where: str = "") -> Iterator[tuple[str, float]]:
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        if k == "ratios" and isinstance(v, dict):
            for name, value in v.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 and _is_comparison(name):
                    yield (f"{where} {name}".strip(), float(value))
        elif isinstance(v, dict):
            yield from _ratios(v, f"{where} {k}".strip() if where else k)


def _is_comparison(name: str) -> bool:
    return bool(re.search(r"speedup|_vs_|_over_|/|ratio", name))


def load_results(folder: pathlib.Path) -> list[Result]:
    """Every results JSON, keeping the full-size run of a benchmark over its --small run."""
    found: dict[str, Result] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
            continue
        stem = path.stem
        small = bool(data.get("small")) or stem.endswith("_small")
        family = stem.removesuffix("_small").removeprefix("bench_")
        groups = [g for g in _groups({k: v for k, v in data.items() if k != "machine"}, "") if g.rows]
        ratios = dict(_ratios(data))
        if not groups and not ratios:
            continue
        res = Result(family, small, path, groups, ratios)
        old = found.get(family)
        if old is None or (old.small and not small):
            found[family] = res
    return [found[k] for k in sorted(found)]


def _is_peer(name: str) -> str:
    low = name.lower()
    if "floor" in low:
        return "floor"
    if "dask_loom" in low or "dask-loom" in low or "to_dask" in low:
        return "dask_loom"
    return "peer" if any(w in low for w in PEER_WORDS) else "dask_loom"


KIND_COLOURS = {"dask_loom": "#2a7ab9", "peer": "#e0812f", "floor": "#9a9a9a"}


def bench_chart(res: Result, out: pathlib.Path) -> pathlib.Path:
    """Wall time and peak RSS per row of every group of one benchmark."""
    groups = res.groups
    n_rows = sum(len(g.rows) for g in groups)
    fig_h = min(14.0, 1.2 + 0.32 * n_rows + 0.45 * len(groups))
    ratios = [len(g.rows) + 0.8 for g in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, fig_h), dpi=DPI, squeeze=False,
                             gridspec_kw={"height_ratios": ratios, "width_ratios": [3, 2]})
    for (ax_w, ax_m), g in zip(axes, groups):
        names = list(g.rows)
        y = np.arange(len(names))[::-1]
        colours = [KIND_COLOURS[_is_peer(n)] for n in names]
        walls = [g.rows[n][0] for n in names]
        ax_w.barh(y, walls, color=colours)
        ax_w.set_yticks(y, [n if len(n) <= 42 else n[:40] + "…" for n in names], fontsize=8)
        ax_w.set_xlabel("wall time (s)", fontsize=8)
        ax_w.tick_params(axis="x", labelsize=8)
        ax_w.set_title(g.title or res.name, fontsize=9, loc="left")
        for yi, w in zip(y, walls):
            ax_w.text(w, yi, f" {w:.3g}", va="center", fontsize=7)
        ax_w.margins(x=0.18)
        rss = [g.rows[n][1] for n in names]
        if any(r is not None for r in rss):
            ax_m.barh(y, [r or 0 for r in rss], color=colours)
            ax_m.set_yticks(y, [])
            ax_m.set_xlabel("peak RSS (MiB)", fontsize=8)
            ax_m.tick_params(axis="x", labelsize=8)
            for yi, r in zip(y, rss):
                if r is not None:
                    ax_m.text(r, yi, f" {r:.0f}", va="center", fontsize=7)
            ax_m.margins(x=0.18)
        else:
            ax_m.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    fig.legend(handles, ["dask_loom", "peer / reference", "floor (raw read)"], loc="upper right", fontsize=8, ncol=3, frameon=False)
    fig.suptitle(f"{res.name}{' (--small run)' if res.small else ''}: {res.path.name}", fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / f"bench_{res.name}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def ratio_chart(results: list[Result], out: pathlib.Path) -> pathlib.Path | None:
    """Every comparison ratio, as each benchmark defines it, on a log axis."""
    items = [(f"{r.name}{' (small)' if r.small else ''}: {k}", v) for r in results for k, v in r.ratios.items()]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(11, min(14.0, 1.4 + 0.28 * len(items))), dpi=DPI)
    y = np.arange(len(items))[::-1]
    values = [v for _, v in items]
    ax.barh(y, values, color="#2a7ab9")
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y, [n if len(n) <= 70 else n[:68] + "…" for n, _ in items], fontsize=7)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3g}", va="center", fontsize=7)
    ax.set_title("Ratios as each benchmark defines them (X_over_Y = time of X / time of Y)", fontsize=9, loc="left")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path = out / "bench_ratios.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def bench_charts(results_dir: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    results = load_results(results_dir)
    made = [bench_chart(r, out) for r in results if r.groups]
    ratio = ratio_chart(results, out)
    return made + ([ratio] if ratio else [])


# -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=HERE, help="where the PNGs go (default: graphs/)")
    p.add_argument("--results", type=pathlib.Path, default=REPO / "benchmarks" / "results", help="benchmark results folder")
    p.add_argument("--small", action="store_true", help="smaller inputs (faster; used by the tests)")
    p.add_argument("--only", choices=["graphs", "bench"], help="make only the task graphs or only the charts")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    made: list[pathlib.Path] = []
    if args.only != "bench":
        made += task_graphs(args.out, small=args.small)
    if args.only != "graphs":
        made += bench_charts(args.results, args.out)
    for path in made:
        print(f"{os.path.relpath(path)}  {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
