"""Which scheduler runs a graph.

In order: the ``client=`` or ``scheduler=`` a caller passes; an active
``distributed.Client``; an address from ``dask_loom.scheduler`` (or the
``DASK_LOOM_SCHEDULER`` environment variable); else the embedded default,
chosen by ``dask_loom.embedded``:

``"auto"`` (the default)
    dask's threaded scheduler on a pool of this package's own (one thread per
    core, remade in a forked child, where a parent's pool has no threads), or
    the synchronous scheduler inside a dask worker, whose own threads are the
    parallelism.  HDF5 chunks inflate with the GIL released
    (:mod:`dask_loom.hdf5._inflate`), so threads use every core with no
    process to start: the first call is as fast as later ones.
``"threads"``
    the thread pool, even inside a worker.
``"local"``
    a process-based ``LocalCluster``, started on first use and reused; its
    workers start without re-running the caller's ``__main__``, so a plain
    script without an ``if __name__ == "__main__":`` guard works.
"""

from __future__ import annotations

import atexit
import contextlib
import os
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
    "thread_pool",
]

_lock = threading.Lock()
_clients: dict[str, Any] = {}
_embedded: Any = None

_LOCAL_NAMES = {"threads", "threading", "sync", "synchronous", "single-threaded", "processes", "multiprocessing"}


def _active_client() -> Any:
    if "distributed" not in sys.modules:  # no Client can exist: do not pay 0.3 s to import it
        return None
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


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start child processes without them importing the caller's ``__main__``.

    multiprocessing's spawn and forkserver children re-run the main script
    (to find functions pickled by reference to it) unless ``__main__`` has
    neither a module spec nor a file; a script without a main guard would
    then start a cluster again inside each worker and fail.  Our workers never
    need the caller's main module (functions defined there travel by value
    with cloudpickle), so its file is hidden while the workers start.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    if main is None or (spec is None and path is None):
        yield
        return
    main.__spec__ = None
    with contextlib.suppress(AttributeError):
        del main.__file__
    try:
        yield
    finally:
        main.__spec__ = spec
        if path is not None:
            main.__file__ = path


def embedded_client(*, n_workers: int | None = None) -> Any:
    """The embedded process-based LocalCluster's client (started on first use).

    Used when ``dask_loom.embedded`` is ``"local"`` or a call asks for
    ``scheduler="local"``.  Works from plain scripts without a main guard.
    """
    global _embedded
    with _lock:
        if _embedded is not None and _embedded.status == "running":
            return _embedded
    from distributed import Client, LocalCluster

    n = n_workers or get_config("embedded-workers")
    with _main_hidden():
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            # As deploy/ starts workers: settings checked, the allocator tuned under the nanny.
            preload=["dask_loom.worker_setup"],
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
        How much data the graph reads, when known (kept for callers; the
        embedded default no longer depends on it).

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
    if mode not in ("auto", "threads"):
        raise ValueError(f"dask_loom.embedded must be 'auto', 'threads' or 'local', not {mode!r}")
    if mode == "auto" and _in_worker():
        return "sync"
    return "threads"


def _in_worker() -> bool:
    """Whether this thread runs a task of a ``dask.distributed`` worker."""
    if "distributed" not in sys.modules:  # never import distributed just to ask
        return False
    from distributed.worker import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


_threads: Any = None  # this process's SchedulerThreads
_pool_pid: int | None = None


def thread_pool(*, waits: bool = False) -> Any:
    """This process's pool for the threaded scheduler (one thread per core).

    With *waits* (a graph whose reads wait on an object store), the pool of
    ``dask_loom.remote-threads`` threads (default two per core), so a core
    decodes while another task's request is in flight.  Both are views of
    one set of threads (:class:`~dask_loom._threads.SchedulerThreads`), so
    their block buffers are not held twice.

    dask's own default pool survives a ``fork`` as an object whose threads
    are gone, so a forked child (a torch DataLoader worker) that computes
    would wait forever; these threads are remade in each process.
    """
    global _pool_pid, _threads
    from dask_loom._threads import SchedulerThreads

    n = _pool_size(waits=waits)
    with _lock:
        if _pool_pid != os.getpid() or _threads is None:
            _threads = SchedulerThreads()  # a forked child's copy has no threads
            _pool_pid = os.getpid()
        return _threads.pool(n)


def _pool_size(*, waits: bool) -> int:
    """The threads of :func:`thread_pool` (``waits``: for a graph whose reads wait on an object store)."""
    cores = os.cpu_count() or 1
    return int((get_config("remote-threads") or 2 * cores) if waits else (get_config("threads") or cores))


def _in_pool() -> bool:
    return threading.current_thread().name.startswith("dask-loom_")


_blas_lock = threading.Lock()
_blas_depth = 0
_blas_limiter: Any = None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS on one thread while the pool's threads compute.

    Each pool thread is already one core's worth of work; a multithreaded
    BLAS inside every task oversubscribes the machine (OpenBLAS's threads spin
    while they wait), measured 50 % more CPU time for the same ``map``.  dask's
    workers do the same through ``OPENBLAS_NUM_THREADS=1``.  Nested and
    concurrent computes share one limit, lifted when the last one ends.
    """
    global _blas_depth, _blas_limiter
    with _blas_lock:
        if _blas_depth == 0:
            _blas_limiter = _limit_blas()
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


_controller: Any = None


def _limit_blas() -> Any:
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency
        return None
    if _controller is None:
        _controller = ThreadpoolController()  # finds the BLAS libraries numpy loaded
    return _controller.limit(limits=1, user_api="blas")


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
    waits: bool = False,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``dask.compute`` on the scheduler :func:`resolve_scheduler` picks.

    With ``progress=True`` (or ``dask_loom.progress`` set in the config) a
    progress bar is shown: dask's text bar on local schedulers (on stderr,
    after ``dask_loom.progress-minimum`` seconds), distributed's bar on a
    cluster (text on stderr in a terminal, a widget in Jupyter).  *waits*
    says the graph's reads wait on an object store: the threaded scheduler
    then runs it on more threads than cores (:func:`thread_pool`).
    """
    progress = bool(progress or get_config("progress"))
    target = resolve_scheduler(scheduler, client, nbytes=nbytes)
    if hasattr(target, "submit"):
        futures = target.compute(list(collections), **kwargs)
        if progress:
            _distributed_progress(futures, target)
        return tuple(target.gather(futures))
    if target in ("threads", "threading") and "pool" not in kwargs:
        if _in_pool():
            # A graph computed from inside one of the pool's tasks would wait
            # for threads that are all busy waiting: run it in this thread.
            target = "sync"
        else:
            kwargs["pool"] = thread_pool(waits=waits)
            with _one_blas_thread(), _progress(progress, target):
                return dask.compute(*collections, scheduler=_scheduler_function(target), **kwargs)
    with _progress(progress, target):
        return dask.compute(*collections, scheduler=_scheduler_function(target), **kwargs)


def _scheduler_function(target: Any) -> Any:
    """dask's local scheduler for a name (dask asks whether distributed is installed for a name: 0.3 s cold)."""
    if target in ("threads", "threading"):
        import dask.threaded

        return dask.threaded.get
    if target in ("sync", "synchronous", "single-threaded"):
        import dask.local

        return dask.local.get_sync
    return target
