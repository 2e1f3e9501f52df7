"""Preload module for dask workers: ``dask worker ADDRESS --preload dask_loom.worker_setup``.

Every deployment file in ``deploy/`` (compose, Helm values, the dask-kubernetes
``DaskCluster``, the SLURM ``jobqueue.yaml``) starts its workers with this
preload.  At worker start it

* imports dask_loom (so the first task does not pay for it),
* applies ``DASK_LOOM_*`` environment variables and any
  ``--dask-loom-config KEY=VALUE`` preload arguments to the ``dask_loom.*``
  configuration, rejecting unknown keys and malformed values *now*: a
  misconfigured worker closes at start instead of failing its first task,
* lets glibc serve buffers under 16 MiB from its heap again where a nanny's
  ``MALLOC_TRIM_THRESHOLD_`` pinned its mmap threshold at 128 KiB
  (:func:`tune_allocator`),
* logs one line with the dask_loom version, the versions of the libraries
  that read the data, and the settings in force.

At shutdown it closes the HDF5 handles the worker process cached.

Extra settings go after the scheduler address (preload arguments)::

    dask worker tcp://scheduler:8786 --preload dask_loom.worker_setup \\
        --dask-loom-config block-size=128MiB --dask-loom-config scan-prefetch=4

:func:`worker_info` reports what a worker process runs, e.g.
``client.run(dask_loom.worker_setup.worker_info)``.
"""

from __future__ import annotations

import ast
import asyncio
import logging
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
import dask

from dask_loom import _config
from dask_loom._allocator import tune_allocator
from dask_loom.errors import ConfigError

__all__ = ["dask_setup", "dask_teardown", "parse_settings", "setup", "teardown", "tune_allocator", "worker_info"]

# A child of distributed's logger, so the line lands in the worker log with
# distributed's own handler and format (other loggers print only warnings).
logger = logging.getLogger("distributed.worker.dask_loom")

_LIBRARIES = ("dask", "distributed", "numpy", "h5py", "zarr", "numcodecs", "pyarrow")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def parse_settings(settings: Iterable[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings into ``dask_loom.*`` config values.

    Values are Python literals when they parse as one (``4``, ``None``,
    ``[64, 64]``), else strings.  Keys may be written with ``_`` or ``-``.

    Examples
    --------
    >>> parse_settings(["block-size=128MiB", "scan_prefetch=4"])
    {'block-size': '128MiB', 'scan-prefetch': 4}
    >>> parse_settings(["blocksize=1"])
    Traceback (most recent call last):
    ...
    dask_loom.errors.ConfigError: unknown dask_loom setting 'blocksize' ...
    """
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or not key:
            raise ConfigError(f"dask_loom setting {item!r} is not of the form KEY=VALUE")
        if key not in _config.DEFAULTS:
            known = ", ".join(sorted(_config.DEFAULTS))
            raise ConfigError(f"unknown dask_loom setting {key!r} (from {item!r}); known settings: {known}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _check() -> None:
    try:
        _config.block_size_bytes()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"dask_loom.block-size is invalid: {exc}") from None
    for key in ("scan-prefetch", "loader-prefetch", "retries", "io-threads"):
        value = _config.get_config(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"dask_loom.{key} must be a non-negative integer, got {value!r}")


def worker_info() -> dict[str, Any]:
    """What this process runs: dask_loom and library versions, and the ``dask_loom.*`` settings.

    Examples
    --------
    >>> info = worker_info()
    >>> sorted(info)
    ['config', 'dask_loom', 'libraries']
    >>> info["config"]["scan-prefetch"] >= 0
    True
    """
    import dask_loom

    return {
        "dask_loom": dask_loom.__version__,
        "libraries": {name: _version(name) for name in _LIBRARIES},
        "config": {key: _config.get_config(key) for key in sorted(_config.DEFAULTS)},
    }


def setup(server: Any, settings: Iterable[str] = ()) -> dict[str, Any]:
    """Configure dask_loom in a worker (or scheduler, or client) process; returns :func:`worker_info`.

    Parameters
    ----------
    server
        The ``Worker`` (or any dask server or client) being set up; only its
        ``address``/``name`` are used, for the log line.
    settings
        ``KEY=VALUE`` strings applied on top of ``DASK_LOOM_*`` variables.

    Raises
    ------
    ConfigError
        An unknown key in *settings* or an invalid value (the server then
        fails to start).  Unknown ``DASK_LOOM_*`` variables are logged and ignored.
    """
    from_env = _config._from_env()
    unknown = sorted(set(from_env) - set(_config.DEFAULTS))
    if unknown:
        # Probably a typo (DASK_LOOM_BLOCKSIZE); a warning, since the variable may be meant for something else.
        names = ", ".join("DASK_LOOM_" + k.upper().replace("-", "_") for k in unknown)
        logger.warning("ignoring environment variable(s) %s: not dask_loom settings", names)
    values = {k: v for k, v in from_env.items() if k in _config.DEFAULTS}
    values.update(parse_settings(settings))
    if values:
        dask.config.set({f"dask_loom.{k}": v for k, v in values.items()})
    _check()
    tuned = tune_allocator()
    info = worker_info()
    where = getattr(server, "address", None) or getattr(server, "name", None) or type(server).__name__
    libs = " ".join(f"{k}={v}" for k, v in info["libraries"].items())
    changed = " ".join(f"{k}={v!r}" for k, v in sorted(values.items())) or "defaults"
    heap = "; buffers under 16 MiB from the heap (mmap threshold raised)" if tuned else ""
    logger.info("dask_loom %s ready on %s (%s); settings: %s%s", info["dask_loom"], where, libs, changed, heap)
    return info


def teardown(server: Any) -> None:
    """Close the HDF5 files this process keeps open for reading."""
    from dask_loom.hdf5._files import clear_all

    clear_all()


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--dask-loom-config",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A dask_loom.* setting, e.g. block-size=128MiB (repeatable).",
)
def dask_setup(server: Any, settings: tuple[str, ...] = ()) -> None:
    """distributed's preload hook (a click command, so it accepts preload arguments).

    distributed only logs a failing preload and starts the worker anyway; a
    worker whose dask_loom settings are wrong is closed instead (with its
    nanny, so it is not restarted), so the mistake shows at deployment.
    """
    try:
        setup(server, settings)
    except ConfigError as exc:
        if hasattr(server, "close") and hasattr(server, "status"):
            logger.error("closing %s: %s", getattr(server, "address", server), exc)
            _pending.add(asyncio.ensure_future(_close_when_started(server)))
        raise


_pending: set[asyncio.Future[Any]] = set()


async def _close_when_started(server: Any) -> None:
    # The preload runs inside the server's start method, and a worker that is
    # still starting does not take its nanny down with it (the nanny would
    # restart it): wait until it runs, then close both.
    from distributed.core import Status

    for _ in range(600):
        if server.status != Status.init:
            break
        await asyncio.sleep(0.1)
    await server.close(reason="dask_loom-config-error")


def dask_teardown(server: Any) -> None:
    """distributed's preload teardown hook."""
    teardown(server)
