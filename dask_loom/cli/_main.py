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
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from dask_loom.cli import _convert, _loom, _ops
from dask_loom.cli._common import message, say

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class Command(NamedTuple):
    """One subcommand: how to add its arguments, what runs it, its one-line help."""

    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


#: Every subcommand, in the order ``--help`` lists them: the one place commands are registered.
COMMANDS: dict[str, Command] = {
    "info": Command(
        _loom.info_args,
        _loom.cmd_info,
        "describe a Loom file: shape, layers, attributes, graphs, spec, writer quirks",
    ),
    "validate": Command(
        _loom.validate_args,
        _loom.cmd_validate,
        "check a Loom file against the spec (and optionally the conventions)",
    ),
    "stats": Command(
        _loom.stats_args, _loom.cmd_stats, "per-gene (or per-cell) mean, std, min, max, non-zeros through map"
    ),
    "demo": Command(
        _loom.demo_args,
        _loom.cmd_demo,
        "write a realistic synthetic Loom file and run stats on it (no cluster needed)",
    ),
    "convert": Command(
        _convert.convert_args,
        _convert.cmd_convert,
        "convert .loom <-> .loom.zarr, a Loom container to AnnData (.zarr, .h5ad), or an image (OME-TIFF, OME-Zarr) to OME-Arrow Parquet",
    ),
    "aggregate": Command(
        _ops.aggregate_args,
        _ops.cmd_aggregate,
        "aggregate columns by a label into a new Loom file (one column per group)",
    ),
    "permute": Command(
        _ops.permute_args,
        _ops.cmd_permute,
        "reorder rows or columns (every layer, attribute and graph), crash-safe",
    ),
    "export": Command(
        _ops.export_args,
        _ops.cmd_export,
        "export a layer and its attributes as tab-separated text, as loompy does",
    ),
    "scan": Command(
        _ops.scan_args,
        _ops.cmd_scan,
        "write the file as batches of rows or columns (.npz), read with read-ahead",
    ),
}


#: One or two example lines per subcommand, shown by ``dask-loom COMMAND --help``.
EXAMPLES: dict[str, str] = {
    "info": "dask-loom info cortex.loom\ndask-loom info s3://bucket/cortex.loom.zarr",
    "validate": "dask-loom validate cortex.loom --strictness conventions",
    "stats": "dask-loom stats cortex.loom --axis 1 -o cells.tsv --scheduler tcp://10.0.0.5:8786",
    "demo": "dask-loom demo --genes 2000 --cells 8000 --scheduler local",
    "convert": "dask-loom convert cortex.loom cortex.loom.zarr --chunks 256,256\ndask-loom convert cortex.loom cortex.zarr\ndask-loom convert image.ome.tiff image.ome.parquet\ndask-loom convert --reshard old.loom.zarr",
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
    """The ``dask-loom`` parser with one subparser per entry of :data:`COMMANDS`."""
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
    for name, cmd in COMMANDS.items():
        example = EXAMPLES.get(name)
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=cmd.help[:1].upper() + cmd.help[1:] + ".",
            epilog="example:\n  " + example.replace("\n", "\n  ") if example else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.configure(p)
        p.set_defaults(func=cmd.run)
    return parser


def _version() -> str:
    from dask_loom import __version__

    return __version__


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
        say("dask-loom: interrupted")
        return 130
    except UnsupportedSchemeError as exc:  # a usage error: the URL names something we never open
        say(f"dask-loom {args.command}: error: {message(exc)}")
        return 2
    except (DaskLoomError, OSError, ValueError, KeyError, IndexError) as exc:
        say(f"dask-loom {args.command}: error: {message(exc)}")
        return 1
    except Exception as exc:  # anything else (a bug of ours or a dependency's): one line, no traceback
        say(f"dask-loom {args.command}: error: {type(exc).__name__}: {message(exc)}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
