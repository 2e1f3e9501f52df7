"""Ordered iteration over graph results with a bounded read-ahead."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dask

from dask_loom._threads import read_ahead
from dask_loom.cluster import compute, resolve_scheduler

__all__ = ["prefetched"]


def prefetched(
    jobs: Iterable[Any],
    *,
    depth: int,
    scheduler: Any = None,
    client: Any = None,
    local_scheduler: str = "threads",
    nbytes: int | None = None,
) -> Iterator[Any]:
    """Compute dask collections one after another, keeping *depth* of them in flight.

    While the caller works on result *k*, results *k+1 … k+depth* are already
    being computed, so a consumer doing light work sees the reader busy all
    the time; memory holds at most ``depth + 1`` results.  On a distributed
    cluster the jobs are submitted as futures; locally each runs in a
    background thread on dask's threaded scheduler.

    *jobs* is an iterable of dask collections (or of zero-argument callables
    returning one, built lazily).  *nbytes* (the data all jobs read) lets
    the embedded default choose threads or processes.
    """
    depth = max(0, int(depth))
    target = resolve_scheduler(scheduler, client, nbytes=nbytes)
    it = iter(jobs)

    def build(job: Any) -> Any:
        return job() if callable(job) and not dask.is_dask_collection(job) else job

    if hasattr(target, "submit"):
        pending: collections.deque[Any] = collections.deque()
        for job in it:
            pending.append(target.compute(build(job)))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        return

    def run(job: Any) -> Any:
        # The read-ahead threads are the parallelism: each job runs in its
        # thread (no nested thread pool per job).
        sched = target if isinstance(target, str) and target not in ("threads", "threading") else "sync"
        return compute(build(job), scheduler=sched if depth else local_scheduler)[0]

    yield from read_ahead((functools.partial(run, job) for job in it), depth, name="dask-loom-prefetch")


def as_callable(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)
