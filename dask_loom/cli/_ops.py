"""``dask-loom aggregate | permute | export | scan``: the Loom operations, each a task graph."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from dask_loom.cli._common import announce, compute_options, positive, progress, say, validate_option

__all__: list[str] = []


def aggregate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="input .loom / .loom.zarr (path or URL)")
    p.add_argument("out", metavar="OUT", help="output Loom file (.loom or .loom.zarr): one column per group")
    p.add_argument(
        "--group-by", default="Clusters", help="column attribute holding the group labels (default: Clusters)"
    )
    p.add_argument("--aggr-by", default="mean", help="numpy-groupies function for the matrix (default: mean)")
    p.add_argument("--layer", default="", help="layer to aggregate (default: the main matrix)")
    p.add_argument(
        "--ca",
        action="append",
        default=[],
        metavar="ATTR=FUNC",
        help="aggregate a column attribute too (tally, first, mean, mode, …); repeatable",
    )
    p.add_argument(
        "--if-equal", action="store_true", help="copy column attributes that are constant within every group"
    )
    validate_option(p)
    compute_options(p)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from dask_loom.loom import connect

    ca = {}
    for item in args.ca:
        if "=" not in item:
            raise ValueError(f"--ca expects ATTR=FUNC, got {item!r}")
        k, v = item.split("=", 1)
        ca[k] = v
    with announce(args) as target, connect(args.file, "r", validate=args.validate) as ds:
        t0 = time.perf_counter()
        m = ds.aggregate(
            args.out,
            group_by=args.group_by,
            aggr_by=args.aggr_by,
            aggr_ca_by=ca or None,
            layer=args.layer,
            aggr_ca_if_equal=args.if_equal,
            scheduler=target,
            progress=progress(args),
        )
    say(
        f"wrote {args.out}: {m.shape[0]} rows x {m.shape[1]} groups ({args.aggr_by} by {args.group_by}) in {time.perf_counter() - t0:.2f} s"
    )
    return 0


def permute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the .loom / .loom.zarr to permute in place (crash-safe)")
    p.add_argument("--axis", type=int, choices=[0, 1], required=True, help="0: rows, 1: columns")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--order-by", metavar="ATTR", help="sort by this attribute of the axis")
    how.add_argument("--random", metavar="SEED", type=int, help="a random permutation with this seed")
    how.add_argument("--ordering", metavar="FILE.npy", help="a .npy file holding the permutation")
    validate_option(p)
    compute_options(p)


def cmd_permute(args: argparse.Namespace) -> int:
    from dask_loom.loom import connect

    with announce(args) as target, connect(args.file, "r+", validate=args.validate, scheduler=target) as ds:
        n = ds.shape[args.axis]
        if args.order_by:
            attrs = ds.ra if args.axis == 0 else ds.ca
            if args.order_by not in attrs.keys():
                what = ("row", "column")[args.axis]
                raise KeyError(
                    f"{args.file}: no {what} attribute '{args.order_by}' to order by (have: {', '.join(attrs.keys()) or 'none'})"
                )
            ordering = np.argsort(attrs[args.order_by], kind="stable")
        elif args.random is not None:
            ordering = np.random.default_rng(args.random).permutation(n)
        else:
            ordering = np.load(args.ordering)
        t0 = time.perf_counter()
        ds.permute(ordering, axis=args.axis)
    say(f"permuted {args.file} along axis {args.axis} ({n} items) in {time.perf_counter() - t0:.2f} s")
    return 0


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="input .loom / .loom.zarr (path or URL)")
    p.add_argument(
        "out", metavar="OUT.tsv", help="output tab-separated file (loompy's layout, byte for byte)"
    )
    p.add_argument("--layer", default=None, help="layer to export (default: the main matrix)")
    validate_option(p)
    compute_options(p)


def cmd_export(args: argparse.Namespace) -> int:
    from dask_loom.loom import connect

    with announce(args) as target, connect(args.file, "r", validate=args.validate, scheduler=target) as ds:
        t0 = time.perf_counter()
        ds.export(args.out, layer=args.layer)
    say(f"wrote {args.out} in {time.perf_counter() - t0:.2f} s")
    return 0


def scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="input .loom / .loom.zarr (path or URL)")
    p.add_argument(
        "--axis",
        type=int,
        choices=[0, 1],
        default=1,
        help="0: batches of rows, 1: batches of columns (default)",
    )
    p.add_argument(
        "--batch-size",
        metavar="N",
        type=positive,
        default=512,
        help="rows or columns per batch (default: 512)",
    )
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: all)")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="write batch_<start>.npz files here (layers, indexes, attributes of the axis)",
    )
    validate_option(p)
    compute_options(p)


def cmd_scan(args: argparse.Namespace) -> int:
    from dask_loom.loom import connect

    layers = args.layers.split(",") if args.layers else None
    os.makedirs(args.out, exist_ok=True)
    n = 0
    with announce(args) as target, connect(args.file, "r", validate=args.validate, scheduler=target) as ds:
        t0 = time.perf_counter()
        what = ["layers", "col_attrs" if args.axis == 1 else "row_attrs"]
        for ix, index, view in ds.scan(axis=args.axis, batch_size=args.batch_size, layers=layers, what=what):
            arrays: dict[str, Any] = {"indexes": index}
            for name in view.layers.keys():
                arrays[f"layer_{name or 'matrix'}"] = view.layers[name].values
            attrs = view.ca if args.axis == 1 else view.ra
            for k in attrs.keys():
                v = attrs[k]
                arrays[f"attr_{k.replace('/', '_')}"] = v.astype(str) if v.dtype == object else v
            np.savez(os.path.join(args.out, f"batch_{ix:09d}.npz"), **arrays)
            n += 1
    say(f"wrote {n} batches to {args.out} in {time.perf_counter() - t0:.2f} s")
    return 0
