"""The package's shared helpers: one I/O pool, one ordered read-ahead, one per-process handle cache."""

from __future__ import annotations

import multiprocessing
import threading
import time

import dask
import pytest

from dask_loom._handles import HandleCache
from dask_loom._threads import io_pool, map_threads, read_ahead
from tests._processes import in_forked_child


def test_map_threads_keeps_order_and_runs_concurrently():
    barrier = threading.Barrier(4, timeout=10)

    def f(x):
        barrier.wait()  # returns only when 4 calls run at once
        return x * x

    assert map_threads(f, list(range(4))) == [0, 1, 4, 9]


def test_nested_map_threads_never_deadlocks():
    # Every pool thread busy with a call that itself maps: the inner maps run inline.
    with dask.config.set({"dask_loom.io-threads": 2}):
        got = map_threads(lambda i: sum(map_threads(lambda j: i * j, list(range(5)))), list(range(8)))
    assert got == [10 * i for i in range(8)]


def test_io_pool_follows_the_setting():
    with dask.config.set({"dask_loom.io-threads": 3}):
        assert io_pool()._max_workers == 3
        assert io_pool() is io_pool()
    with dask.config.set({"dask_loom.io-threads": 5}):
        assert io_pool()._max_workers == 5


def test_read_ahead_order_depth_and_errors():
    started: list[int] = []
    ahead = []

    def thunk(i):
        def run():
            started.append(i)
            time.sleep(0.005)
            return i

        return run

    consumed = []
    for v in read_ahead((thunk(i) for i in range(20)), 3):
        ahead.append(len(started) - len(consumed))  # begun but not yet handed out, this one included
        consumed.append(v)
        time.sleep(0.01)  # the caller's work: the read-ahead fills up meanwhile
    assert consumed == list(range(20))
    # depth + 1 at most (this one and 3 ahead); at least one read ahead of the caller. How full it
    # gets depends on the machine's load (3 seen on a busy CI run), so the bound, not the fill.
    assert 2 <= max(ahead) <= 4, ahead

    def boom():
        raise KeyError("third")

    it = read_ahead([lambda: 1, lambda: 2, boom, lambda: 4], 2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(KeyError, match="third"):
        next(it)
    assert list(read_ahead([lambda: 7], 0)) == [7]
    with pytest.raises(ValueError, match="depth"):
        list(read_ahead([], -1))


def test_read_ahead_closed_early_cancels_and_waits():
    started, finished = [], []

    def thunk(i):
        def run():
            started.append(i)
            time.sleep(0.05)
            finished.append(i)
            return i

        return run

    it = read_ahead((thunk(i) for i in range(100)), 4, workers=2)
    assert next(it) == 0
    it.close()
    # Nothing is still running once close() returns, and most of the 100 never started.
    assert sorted(started) == sorted(finished)
    assert len(started) <= 6


def test_handle_cache_makes_once_and_evicts_lru_with_close():
    made, closed = [], []
    cache: HandleCache[str] = HandleCache("test", maxsize=2, close=closed.append)

    def make(k):
        def run():
            time.sleep(0.02)
            made.append(k)
            return f"handle-{k}"

        return run

    threads = [threading.Thread(target=lambda: cache.get("a", make("a"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == ["a"]
    assert cache.get("b", make("b")) == "handle-b"
    assert cache.get("a", make("a")) == "handle-a"  # "a" now most recent
    cache.get("c", make("c"))
    assert closed == ["handle-b"]
    assert cache.peek("b") is None and cache.peek("a") == "handle-a"
    assert cache.forget(lambda k: k in ("a", "z")) == 1
    assert closed == ["handle-b", "handle-a"]

    def fails():
        raise OSError("cannot open")

    with pytest.raises(OSError):
        cache.get("x", fails)
    assert cache.get("x", make("x")) == "handle-x"  # a failed open leaves nothing behind


def _child_sees(cache, q):
    q.put((len(cache), cache.get("k", lambda: "child")))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_handle_cache_is_empty_in_a_forked_child():
    cache: HandleCache[str] = HandleCache("fork", maxsize=4)
    cache.put("k", "parent")
    got, _ = in_forked_child(_child_sees, cache)
    assert got == (0, "child")
    assert cache.peek("k") == "parent"


def test_handle_cache_replaces_what_valid_rejects_once():
    closed = []
    cache: HandleCache[list[int]] = HandleCache("valid", close=closed.append)
    made = []

    def make(identity):
        def run():
            time.sleep(0.02)
            made.append(identity)
            return [identity]

        return run

    assert cache.get("f", make(1), valid=lambda v: v[0] == 1) == [1]
    assert cache.get("f", make(9), valid=lambda v: v[0] == 1) == [1]  # still valid: not made again
    # The file changed: eight threads see the stale entry together; one replaces it, one close.
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get("f", make(2), valid=lambda v: v[0] == 2)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [1, 2] and got == [[2]] * 8
    assert closed == [[1]]
    assert "f" in cache and "g" not in cache and len(cache) == 1
