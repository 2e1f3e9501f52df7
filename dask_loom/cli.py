"""``dask-loom``: the command line.

Every subcommand that computes (``stats``, ``demo``, ``convert``,
``aggregate``, ``permute``, ``export``, ``scan``) takes ``--scheduler ADDR``
(default: ``DASK_LOOM_SCHEDULER``, else the embedded default) and
``--progress/--no-progress`` (default: a bar when stderr is a terminal);
``info`` and ``validate`` only read metadata and compute nothing.  Those that
read a Loom file check it against the spec first, as ``loompy.connect`` does,
and take ``--no-validate`` to skip the check (``connect(validate=False)``).
Exit codes: 0 success, 1 a data or I/O error (printed as one line naming the
file and the problem, no traceback; a failed spec check also lists the
validator's reasons), 2 a usage error (unknown flag, bad value).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
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


_ADDRESS = re.compile(r"^((tcp|tls|ws|wss|ucx|inproc)://)?\[?[A-Za-z0-9_.:-]+\]?(:\d+)?/?$")


def _scheduler_arg(value: str) -> str:
    """``--scheduler``: a dask scheduler name or an address; anything else is a usage error."""
    from dask_loom.cluster import _LOCAL_NAMES

    if value in _LOCAL_NAMES or value in ("local", "embedded"):
        return value
    if (":" in value or "://" in value) and _ADDRESS.match(value):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a scheduler: give an address such as tcp://10.0.0.5:8786, "
        "or 'threads', 'sync', 'processes' or 'local' (a LocalCluster for this run)"
    )


def _compute_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument(
        "--scheduler",
        metavar="ADDR",
        type=_scheduler_arg,
        help="a dask scheduler address (tcp://host:8786), or 'threads', 'sync', 'processes', "
        "'local' (a LocalCluster started for this run); default: $DASK_LOOM_SCHEDULER, else threads",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def _validate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="do not check the input against the Loom spec first (as connect(validate=False)); "
        "files loompy's validator rejects are then read as far as they can be",
    )


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _probe(address: str) -> None:
    """Fail fast, with one clear line, when nothing listens at a tcp/tls scheduler address."""
    from urllib.parse import urlsplit

    from dask_loom._config import get_config
    from dask_loom.errors import SchedulerError

    url = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        raise SchedulerError(f"{address!r} is not a valid scheduler address") from None
    if url.scheme not in ("tcp", "tls") or not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=float(get_config("connect-timeout"))).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise SchedulerError(f"cannot reach the dask scheduler at {address!r}: {why}") from None


@contextlib.contextmanager
def _announce(args: argparse.Namespace) -> Iterator[Any]:
    """Resolve ``--scheduler`` (printing the dashboard link of a cluster) and apply ``--progress``."""
    import dask

    from dask_loom.cluster import resolve_scheduler

    address = getattr(args, "scheduler", None)
    if address is None:
        from dask_loom._config import get_config

        address = get_config("scheduler")
    if isinstance(address, str) and (":" in address or "://" in address):
        _probe(address)
    target = resolve_scheduler(getattr(args, "scheduler", None))
    if hasattr(target, "dashboard_link"):
        _say(f"dask dashboard: {target.dashboard_link}")
    # Operations without a progress= parameter (permute, export, scan) compute
    # through dask_loom.cluster.compute, which honours this config key.
    with dask.config.set({"dask_loom.progress": _progress(args) if hasattr(args, "progress") else False}):
        yield target


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return n


# --- info -------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .loom file or .loom.zarr store (path or URL)")


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
    p.add_argument("file", metavar="FILE", help="a .loom file or .loom.zarr store (path or URL)")
    p.add_argument(
        "--strictness",
        choices=["speconly", "conventions"],
        default="speconly",
        help="'speconly' (default): the Loom spec; 'conventions': also the naming conventions (Gene, CellID, ...)",
    )


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
    p.add_argument("file", metavar="FILE", help="a .loom file or .loom.zarr store (path or URL)")
    p.add_argument("--layer", default="", help="layer name (default: the main matrix)")
    p.add_argument("--axis", type=int, choices=[0, 1], default=0, help="0: one row per gene (default), 1: one row per cell")
    p.add_argument("-o", "--out", metavar="OUT.tsv", help="write the table here (default: a summary on stdout)")
    _validate_option(p)
    _compute_options(p)


STAT_FUNCS = ("mean", "std", "min", "max", "count_nonzero")


def run_stats(
    path: str, *, layer: str = "", axis: int = 0, scheduler: Any = None, progress: bool = False, validate: bool = True
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
        table = run_stats(args.file, layer=args.layer, axis=args.axis, scheduler=target, progress=_progress(args), validate=args.validate)
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
    p.add_argument("--genes", type=_positive, default=3000, help="rows of the demo file (default: 3000)")
    p.add_argument("--cells", type=_positive, default=16000, help="columns of the demo file (default: 16000)")
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
    for mod in ("dask_loom.loom._convert", "dask_loom.loom._cli_ops"):
        with contextlib.suppress(ImportError):
            __import__(mod)


#: One or two example lines per subcommand, shown by ``dask-loom COMMAND --help``.
EXAMPLES: dict[str, str] = {
    "info": "dask-loom info cortex.loom\ndask-loom info s3://bucket/cortex.loom.zarr",
    "validate": "dask-loom validate cortex.loom --strictness conventions",
    "stats": "dask-loom stats cortex.loom --axis 1 -o cells.tsv --scheduler tcp://10.0.0.5:8786",
    "demo": "dask-loom demo --genes 2000 --cells 8000 --scheduler local",
    "convert": "dask-loom convert cortex.loom cortex.loom.zarr --chunks 256,256\ndask-loom convert image.ome.tiff image.ome.parquet",
    "aggregate": "dask-loom aggregate cortex.loom clusters.loom --group-by Clusters --aggr-by mean --ca Age=mean",
    "permute": "dask-loom permute cortex.loom --axis 1 --order-by Clusters\ndask-loom permute cortex.loom --axis 1 --random 42",
    "export": "dask-loom export cortex.loom cortex.tsv --layer spliced",
    "scan": "dask-loom scan cortex.loom --axis 1 --batch-size 1024 --out batches/",
}

_EPILOG = """\
exit codes: 0 success, 1 a data or I/O error (one line naming the file), 2 a usage error
(including a URL scheme outside dask_loom.storage.ALLOWED_SCHEMES)

Commands that compute take --scheduler ADDR (a dask scheduler such as tcp://10.0.0.5:8786,
or threads/sync/processes/local) and --progress/--no-progress; DASK_LOOM_SCHEDULER sets
the default address.  Run 'dask-loom demo' for a first look, 'dask-loom COMMAND --help'
for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    _load_more()
    parser = argparse.ArgumentParser(
        prog="dask-loom",
        description="Loom files (.loom HDF5 and .loom.zarr) as chunk-aligned task graphs on dask:\n"
        "inspect, validate, compute statistics, aggregate, permute, export, scan and convert,\n"
        "on this machine or on a dask.distributed cluster.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (configure, fn, help_) in COMMANDS.items():
        example = EXAMPLES.get(name)
        p = sub.add_parser(
            name,
            help=help_,
            description=help_[:1].upper() + help_[1:] + ".",
            epilog="example:\n  " + example.replace("\n", "\n  ") if example else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        configure(p)
        p.set_defaults(func=fn)
    return parser


def _version() -> str:
    from dask_loom import __version__

    return __version__


def _message(exc: BaseException) -> str:
    """One line naming the file (when known) and the problem."""
    from dask_loom.errors import LoomValidationError

    if isinstance(exc, LoomValidationError):
        # The validator's reasons follow, one per line; the headline names the file.
        reasons = [e for e in exc.errors if not e.startswith("For help, see")]
        head = f"{exc.filename} does not appear to be a valid Loom file according to Loom spec version '{exc.version}'"
        return "\n".join([f"{head} (--no-validate reads it anyway):", *(f"  {r}" for r in reasons)])
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        name = os.fspath(exc.filename)
        text = str(exc.strerror)
        return text if str(name) in text else f"{name}: {text}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split()) if "\n" not in text.strip() else text.strip().splitlines()[-1]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dask-loom``; returns the exit code (0 ok, 1 data/IO error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from dask_loom.errors import DaskLoomError, UnsupportedSchemeError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _say("dask-loom: interrupted")
        return 130
    except UnsupportedSchemeError as exc:  # a usage error: the URL names something we never open
        _say(f"dask-loom {args.command}: error: {_message(exc)}")
        return 2
    except (DaskLoomError, OSError, ValueError, KeyError, IndexError) as exc:
        _say(f"dask-loom {args.command}: error: {_message(exc)}")
        return 1
    except Exception as exc:  # anything else (a bug of ours or a dependency's): one line, no traceback
        _say(f"dask-loom {args.command}: error: {type(exc).__name__}: {_message(exc)}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
