"""``dask-loom``: the command line.

Every subcommand that computes takes ``--scheduler ADDR`` (default: an
active configuration, ``DASK_LOOM_SCHEDULER``, or the embedded default) and
``--progress/--no-progress``.  Exit codes: 0 success, 1 a data or I/O error
(printed as one line naming the file and the problem), 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["main"]

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (getattr(fn, "_configure", lambda p: None), fn, help)
        return fn

    return deco


def arguments(configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    def deco(fn: Callable[..., int]) -> Callable[..., int]:
        fn._configure = configure  # type: ignore[attr-defined]
        return fn

    return deco


def _compute_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", metavar="ADDR", help="dask scheduler address (tcp://host:8786), 'threads', 'sync' or 'local'")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show a progress bar (default: when writing to a terminal)")


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _announce(args: argparse.Namespace) -> Iterator[Any]:
    from dask_loom.cluster import resolve_scheduler

    target = resolve_scheduler(getattr(args, "scheduler", None))
    if hasattr(target, "dashboard_link"):
        _say(f"dask dashboard: {target.dashboard_link}")
    yield target


# --- info -------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .loom file or .loom.zarr store (path or URL)")


@command("info", "describe a Loom file: shape, layers, attributes, graphs, spec, writer quirks")
@arguments(_info_args)
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


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--strictness", choices=["speconly", "conventions"], default="speconly")


@command("validate", "check a Loom file against the spec (and optionally the conventions)")
@arguments(_validate_args)
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


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--layer", default="", help="layer name (default: the main matrix)")
    p.add_argument("--axis", type=int, choices=[0, 1], default=0, help="0: one row per gene (default), 1: one row per cell")
    p.add_argument("-o", "--out", metavar="OUT.tsv", help="write the table here (default: a summary on stdout)")
    _compute_options(p)


STAT_FUNCS = ("mean", "std", "min", "max", "count_nonzero")


def run_stats(path: str, *, layer: str = "", axis: int = 0, scheduler: Any = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-row (axis 0) or per-column (axis 1) mean, std, min, max and non-zero count."""
    from dask_loom.loom import connect

    with connect(path, "r") as ds:
        values = ds.map(list(STAT_FUNCS), axis=axis, layer=layer, scheduler=scheduler, progress=progress)
        attrs = ds.ra if axis == 0 else ds.ca
        key = next((k for k in ("Gene", "CellID", "var_names", "obs_names") if k in attrs), None)
        names = attrs[key] if key else np.arange(ds.shape[axis])
    return {"name": np.asarray(names), **dict(zip(STAT_FUNCS, values))}


def write_table(table: dict[str, np.ndarray], out: str) -> None:
    cols = list(table)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\t".join(cols) + "\n")
        for row in zip(*(table[c] for c in cols)):
            fh.write("\t".join(f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v) for v in row) + "\n")


@command("stats", "per-gene (or per-cell) mean, std, min, max, non-zeros through map")
@arguments(_stats_args)
def cmd_stats(args: argparse.Namespace) -> int:
    with _announce(args) as target:
        t0 = time.perf_counter()
        table = run_stats(args.file, layer=args.layer, axis=args.axis, scheduler=target, progress=_progress(args))
        dt = time.perf_counter() - t0
    n = len(table["name"])
    if args.out:
        write_table(table, args.out)
        _say(f"wrote {n} rows to {args.out} in {dt:.2f} s")
    else:
        what = "genes" if args.axis == 0 else "cells"
        print(f"{n} {what}, layer {args.layer!r}, computed in {dt:.2f} s")
        for f in STAT_FUNCS:
            v = table[f]
            print(f"  {f:>14}: median {np.median(v):.4g}, range [{v.min():.4g}, {v.max():.4g}]")
    return 0


# --- demo -------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--genes", type=int, default=3000)
    p.add_argument("--cells", type=int, default=16000)
    p.add_argument("--dir", help="where to write the demo file (default: a temporary folder, removed afterwards)")
    _compute_options(p)


@command("demo", "write a realistic synthetic Loom file and run stats on it (no cluster needed)")
@arguments(_demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from dask_loom._synthetic import write_synthetic_loom

    with contextlib.ExitStack() as stack:
        folder = args.dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dask-loom-demo-"))
        path = os.path.join(folder, "demo.loom")
        t0 = time.perf_counter()
        write_synthetic_loom(path, args.genes, args.cells)
        t1 = time.perf_counter()
        size = os.path.getsize(path)
        print(f"wrote {path}: {args.genes} genes x {args.cells} cells, float32 counts, {size / 2**20:.1f} MiB on disk, in {t1 - t0:.1f} s")
        with _announce(args) as target:
            for axis, what in ((0, "gene"), (1, "cell")):
                t2 = time.perf_counter()
                table = run_stats(path, axis=axis, scheduler=target, progress=_progress(args))
                t3 = time.perf_counter()
                print(
                    f"per-{what} stats ({', '.join(STAT_FUNCS)}) over {len(table['name'])} {what}s in {t3 - t2:.2f} s; "
                    f"mean of means {table['mean'].mean():.4f}, median non-zeros {np.median(table['count_nonzero']):.0f}"
                )
            out = os.path.join(folder, "gene_stats.tsv")
            write_table(run_stats(path, axis=0, scheduler=target), out)
            print(f"gene table: {out}" + ("" if args.dir else " (removed with the temporary folder)"))
    return 0


# --- main -------------------------------------------------------------------------------


def _load_more() -> None:
    # Subcommands defined next to their operations register themselves here.
    for mod in ("dask_loom.loom._cli_ops", "dask_loom.loom._convert"):
        with contextlib.suppress(ImportError):
            __import__(mod)


def build_parser() -> argparse.ArgumentParser:
    _load_more()
    parser = argparse.ArgumentParser(
        prog="dask-loom",
        description="Loom files as chunk-aligned task graphs on dask: inspect, validate, compute, convert.",
        epilog="Run 'dask-loom demo' for a first look; 'dask-loom COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def _version() -> str:
    from dask_loom import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dask-loom``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dask_loom.errors import DaskLoomError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _say("dask-loom: interrupted")
        return 130
    except (DaskLoomError, OSError, ValueError, KeyError, IndexError) as exc:
        msg: Any = exc
        if isinstance(exc, KeyError) and exc.args:
            msg = exc.args[0]
        elif isinstance(exc, OSError) and exc.strerror and exc.filename:
            msg = exc.strerror
        _say(f"dask-loom {args.command}: error: {msg}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
