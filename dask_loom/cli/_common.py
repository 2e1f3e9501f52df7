"""Options and helpers every ``dask-loom`` subcommand shares.

Kept free of heavy imports: ``dask-loom --help`` imports this module and must
stay cheap (see ``tests/test_first_call.py``); everything that computes is
imported inside the functions that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["announce", "compute_options", "message", "positive", "progress", "say", "validate_option"]

_ADDRESS = re.compile(r"^((tcp|tls|ws|wss|ucx|inproc)://)?\[?[A-Za-z0-9_.:-]+\]?(:\d+)?/?$")


def scheduler_arg(value: str) -> str:
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


def compute_options(p: argparse.ArgumentParser) -> None:
    """Add ``--scheduler`` and ``--progress/--no-progress`` (every command that computes)."""
    g = p.add_argument_group("where it runs")
    g.add_argument(
        "--scheduler",
        metavar="ADDR",
        type=scheduler_arg,
        help="a dask scheduler address (tcp://host:8786), or 'threads', 'sync', 'processes', "
        "'local' (a LocalCluster started for this run); default: $DASK_LOOM_SCHEDULER, else threads",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def validate_option(p: argparse.ArgumentParser) -> None:
    """Add ``--no-validate`` (every command that reads a Loom file)."""
    p.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="do not check the input against the Loom spec first (as connect(validate=False)); "
        "files loompy's validator rejects are then read as far as they can be",
    )


def progress(args: argparse.Namespace) -> bool:
    """Whether to show a progress bar: ``--progress``, else when stderr is a terminal."""
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def say(msg: str) -> None:
    """One line on stderr (stdout is kept for a command's results)."""
    print(msg, file=sys.stderr, flush=True)


def positive(value: str) -> int:
    """An argparse type: a positive integer."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return n


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
def announce(args: argparse.Namespace) -> Iterator[Any]:
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
        say(f"dask dashboard: {target.dashboard_link}")
    # Operations without a progress= parameter (permute, export, scan) compute
    # through dask_loom.cluster.compute, which honours this config key.
    with dask.config.set({"dask_loom.progress": progress(args) if hasattr(args, "progress") else False}):
        yield target


def message(exc: BaseException) -> str:
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
