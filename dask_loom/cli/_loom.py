"""``dask-loom info | validate | stats | demo``: read a Loom file, check it, summarise it."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np

from dask_loom.cli._common import announce, compute_options, positive, progress, say, validate_option

__all__ = ["STAT_FUNCS", "run_stats", "write_table"]


# --- info -------------------------------------------------------------------------------


def info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .loom file or .loom.zarr store (path or URL)")


def cmd_info(args: argparse.Namespace) -> int:
    from dask_loom.loom import connect
    from dask_loom.loom._inspect import describe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with connect(args.file, "r", validate=False) as ds:
            text = describe(ds, [str(w.message) for w in caught])
    print(text)
    return 0


# --- validate ---------------------------------------------------------------------------


def validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .loom file or .loom.zarr store (path or URL)")
    p.add_argument(
        "--strictness",
        choices=["speconly", "conventions"],
        default="speconly",
        help="'speconly' (default): the Loom spec; 'conventions': also the naming conventions (Gene, CellID, ...)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from dask_loom.loom import LoomValidator

    v = LoomValidator()
    ok = v.validate(args.file, strictness=args.strictness)
    for line in v.summary:
        print(line)
    for w in v.warnings:
        print(f"warning: {w}")
    for e in v.errors:
        print(f"error: {e}")
    print(f"{args.file}: {'valid' if ok else 'NOT valid'} (Loom spec {v.version})")
    return 0 if ok else 1


# --- stats ------------------------------------------------------------------------------


def stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .loom file or .loom.zarr store (path or URL)")
    p.add_argument("--layer", default="", help="layer name (default: the main matrix)")
    p.add_argument(
        "--axis",
        type=int,
        choices=[0, 1],
        default=0,
        help="0: one row per gene (default), 1: one row per cell",
    )
    p.add_argument(
        "-o", "--out", metavar="OUT.tsv", help="write the table here (default: a summary on stdout)"
    )
    validate_option(p)
    compute_options(p)


STAT_FUNCS = ("mean", "std", "min", "max", "count_nonzero")


def run_stats(
    path: str,
    *,
    layer: str = "",
    axis: int = 0,
    scheduler: Any = None,
    progress: bool = False,
    validate: bool = True,
) -> dict[str, np.ndarray]:
    """Per-row (axis 0) or per-column (axis 1) mean, std, min, max and non-zero count."""
    from dask_loom.loom import connect

    with connect(path, "r", validate=validate) as ds:
        values = ds.map(list(STAT_FUNCS), axis=axis, layer=layer, scheduler=scheduler, progress=progress)
        attrs = ds.ra if axis == 0 else ds.ca
        key = next((k for k in ("Gene", "CellID", "var_names", "obs_names") if k in attrs), None)
        names = attrs[key] if key else np.arange(ds.shape[axis])
    return {"name": np.asarray(names), **dict(zip(STAT_FUNCS, values))}


def write_table(table: dict[str, np.ndarray], out: str) -> None:
    """Write ``table`` (column name -> values) as tab-separated text with a header line."""
    cols = list(table)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\t".join(cols) + "\n")
        for row in zip(*(table[c] for c in cols)):
            fh.write(
                "\t".join(f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v) for v in row) + "\n"
            )


def cmd_stats(args: argparse.Namespace) -> int:
    with announce(args) as target:
        t0 = time.perf_counter()
        table = run_stats(
            args.file,
            layer=args.layer,
            axis=args.axis,
            scheduler=target,
            progress=progress(args),
            validate=args.validate,
        )
        dt = time.perf_counter() - t0
    n = len(table["name"])
    if args.out:
        write_table(table, args.out)
        say(f"wrote {n} rows to {args.out} in {dt:.2f} s")
    else:
        what = "genes" if args.axis == 0 else "cells"
        print(f"{n} {what}, layer {args.layer!r}, computed in {dt:.2f} s")
        for f in STAT_FUNCS:
            v = table[f]
            print(f"  {f:>14}: median {np.median(v):.4g}, range [{v.min():.4g}, {v.max():.4g}]")
    return 0


# --- demo -------------------------------------------------------------------------------


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--genes", type=positive, default=3000, help="rows of the demo file (default: 3000)")
    p.add_argument("--cells", type=positive, default=16000, help="columns of the demo file (default: 16000)")
    p.add_argument(
        "--dir", help="where to write the demo file (default: a temporary folder, removed afterwards)"
    )
    compute_options(p)


def cmd_demo(args: argparse.Namespace) -> int:
    from dask_loom._synthetic import write_synthetic_loom

    with contextlib.ExitStack() as stack:
        folder = args.dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dask-loom-demo-"))
        path = os.path.join(folder, "demo.loom")
        t0 = time.perf_counter()
        write_synthetic_loom(path, args.genes, args.cells)
        t1 = time.perf_counter()
        size = os.path.getsize(path)
        print(
            f"wrote {path}: {args.genes} genes x {args.cells} cells, float32 counts, {size / 2**20:.1f} MiB on disk, in {t1 - t0:.1f} s"
        )
        with announce(args) as target:
            for axis, what in ((0, "gene"), (1, "cell")):
                t2 = time.perf_counter()
                table = run_stats(path, axis=axis, scheduler=target, progress=progress(args))
                t3 = time.perf_counter()
                print(
                    f"per-{what} stats ({', '.join(STAT_FUNCS)}) over {len(table['name'])} {what}s in {t3 - t2:.2f} s; "
                    f"mean of means {table['mean'].mean():.4f}, median non-zeros {np.median(table['count_nonzero']):.0f}"
                )
            out = os.path.join(folder, "gene_stats.tsv")
            write_table(run_stats(path, axis=0, scheduler=target), out)
            print(f"gene table: {out}" + ("" if args.dir else " (removed with the temporary folder)"))
    return 0
