"""Which scheduler runs a graph.

In order: the ``client=`` or ``scheduler=`` a caller passes; an active
``distributed.Client``; an address from ``dask_loom.scheduler`` (or the
``DASK_LOOM_SCHEDULER`` environment variable); else the embedded default,
chosen by ``dask_loom.embedded``: ``"auto"`` (the default: dask's threaded
scheduler for graphs reading up to ``dask_loom.embedded-threshold``, 1 GiB,
and a process-based ``LocalCluster``, started on first use and reused, for
bigger ones), ``"threads"`` or ``"local"``.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import dask

from dask_loom._config import get_config
from dask_loom.errors import SchedulerError

__all__ = [
    "close_embedded",
    "compute",
    "dashboard_link",
    "embedded_client",
    "get_client",
    "resolve_scheduler",
]

_lock = threading.Lock()
_clients: dict[str, Any] = {}
_embedded: Any = None

_LOCAL_NAMES = {"threads", "threading", "sync", "synchronous", "single-threaded", "processes", "multiprocessing"}


def _active_client() -> Any:
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        c = default_client()
    except ValueError:
        return None
    return c if c.status == "running" else None


def _connect(address: str) -> Any:
    from distributed import Client

    timeout = float(get_config("connect-timeout"))
    with _lock:
        c = _clients.get(address)
        if c is not None and c.status == "running":
            return c
    try:
        c = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(f"cannot reach the dask scheduler at {address!r}: {exc}") from None
    with _lock:
        _clients[address] = c
    return c


def embedded_client(*, n_workers: int | None = None) -> Any:
    """The embedded process-based LocalCluster's client (started on first use)."""
    global _embedded
    with _lock:
        if _embedded is not None and _embedded.status == "running":
            return _embedded
    from distributed import Client, LocalCluster

    n = n_workers or get_config("embedded-workers")
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
    )
    client = Client(cluster, set_as_default=False)
    with _lock:
        _embedded = client
    return client


@atexit.register
def close_embedded() -> None:
    """Shut the embedded LocalCluster and cached clients down."""
    global _embedded
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
        emb, _embedded = _embedded, None
    for c in clients:
        with contextlib.suppress(Exception):
            c.close()
    if emb is not None:
        with contextlib.suppress(Exception):
            cluster = emb.cluster
            emb.close()
            cluster.close()


def resolve_scheduler(scheduler: Any = None, client: Any = None, *, nbytes: int | None = None) -> Any:
    """Return what to hand to ``dask.compute(scheduler=...)``.

    Parameters
    ----------
    scheduler
        ``None``, a dask scheduler name (``"threads"``, ``"sync"``,
        ``"processes"``), ``"local"`` (the embedded LocalCluster), a scheduler
        address such as ``"tcp://10.0.0.5:8786"``, or a ``Client``.
    client
        A ``distributed.Client`` (takes precedence).
    nbytes
        How much data the graph reads, when known.  With
        ``dask_loom.embedded = "auto"`` (the default) graphs over more than
        ``dask_loom.embedded-threshold`` bytes run on the embedded
        LocalCluster, smaller ones on the threaded scheduler.

    Examples
    --------
    >>> resolve_scheduler("sync")
    'sync'
    """
    if client is not None:
        return client
    if scheduler is not None:
        if not isinstance(scheduler, str):
            return scheduler  # a Client or a get function
        if scheduler in _LOCAL_NAMES:
            return scheduler
        if scheduler in ("local", "embedded"):
            return embedded_client()
        if "://" in scheduler or ":" in scheduler:
            return _connect(scheduler)
        raise ValueError(
            f"unknown scheduler {scheduler!r}: give 'threads', 'sync', 'processes', 'local' or an address like tcp://host:8786"
        )
    c = _active_client()
    if c is not None:
        return c
    # A scheduler set through dask's own config (dask.config.set(scheduler=...)) wins next.
    own = dask.config.get("scheduler", None)
    if own is not None:
        return own
    address = get_config("scheduler")
    if address:
        return _connect(str(address))
    mode = get_config("embedded")
    if mode == "local":
        return embedded_client()
    if mode == "auto" and nbytes is not None and nbytes > _threshold():
        # Inflating small chunks holds the GIL for most of its time, so big
        # reads scale with processes, not threads (benchmarks/bench_loom_map.py).
        return embedded_client()
    return "threads"


def _threshold() -> int:
    from dask.utils import parse_bytes

    v = get_config("embedded-threshold")
    return parse_bytes(v) if isinstance(v, str) else int(v)


def get_client(scheduler: Any = None, client: Any = None) -> Any:
    """The ``distributed.Client`` that would run a graph, or ``None`` for local schedulers."""
    s = resolve_scheduler(scheduler, client)
    return s if hasattr(s, "submit") else None


def dashboard_link(scheduler: Any = None, client: Any = None) -> str | None:
    """The dashboard URL of the cluster that would run a graph (``None`` locally)."""
    c = get_client(scheduler, client)
    return None if c is None else c.dashboard_link


@contextlib.contextmanager
def _progress(enabled: bool, target: Any) -> Iterator[None]:
    if not enabled or hasattr(target, "submit"):
        yield
        return
    from dask.diagnostics import ProgressBar

    # stderr, as tqdm does: a bar never mixes into data a command prints on stdout.
    with ProgressBar(minimum=float(get_config("progress-minimum")), out=sys.stderr):
        yield


def _distributed_progress(futures: Any, client: Any) -> None:
    from distributed import progress as dprogress
    from distributed.utils import is_kernel

    # Our clients are not the default client, which progress() would look for.
    where = {"scheduler": client.scheduler.address}
    if is_kernel():
        try:  # Jupyter: the live widget (needs ipywidgets); gather() below waits
            from IPython.display import display

            display(dprogress(futures, notebook=True, **where))
            return
        except ImportError:
            pass
        dprogress(futures, notebook=False, **where)
        return
    with contextlib.redirect_stdout(sys.stderr):
        dprogress(futures, notebook=False, **where)


def compute(
    *collections: Any,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
    nbytes: int | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``dask.compute`` on the scheduler :func:`resolve_scheduler` picks.

    With ``progress=True`` (or ``dask_loom.progress`` set in the config) a
    progress bar is shown: dask's text bar on local schedulers (on stderr,
    after ``dask_loom.progress-minimum`` seconds), distributed's bar on a
    cluster (text on stderr in a terminal, a widget in Jupyter).
    """
    progress = bool(progress or get_config("progress"))
    target = resolve_scheduler(scheduler, client, nbytes=nbytes)
    if hasattr(target, "submit"):
        futures = target.compute(list(collections), **kwargs)
        if progress:
            _distributed_progress(futures, target)
        return tuple(target.gather(futures))
    with _progress(progress, target):
        return dask.compute(*collections, scheduler=target, **kwargs)
