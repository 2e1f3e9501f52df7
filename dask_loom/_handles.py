"""One kind of per-process cache for what is expensive to open: file handles, parsed footers, roots.

Every such cache in the package is a :class:`HandleCache`: thread-safe,
optionally bounded (least recently used first out, with a ``close`` for what
it drops), one value made at a time per key (two threads asking for the same
file open it once), and emptied in a forked child.  A child must open its own
handles (HDF5 and many readers are not fork-safe); the parent's values stay
referenced there, never closed, because closing could block on locks another
parent thread held at the moment of the fork.

A rewritten file opens afresh either way: keys that include its identity
(size, mtime, inode), whose stale entries age out of a bounded cache, or one
key per file with a ``valid`` check that replaces (and closes) a stale entry.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["HandleCache"]

V = TypeVar("V")

_ALL: weakref.WeakSet[HandleCache[Any]] = weakref.WeakSet()
_INHERITED: list[Any] = []  # the parent's values, in a forked child: kept, never closed


class HandleCache(Generic[V]):
    """A per-process map from keys to opened things.

    Parameters
    ----------
    name
        What it holds, for ``repr``.
    maxsize
        At most this many entries (or a callable read at each insert, for a
        configurable bound); ``None``: unbounded.
    close
        Called on a value the bound evicts, or that :meth:`discard`/:meth:`forget` drop.
    """

    def __init__(
        self,
        name: str,
        *,
        maxsize: int | Callable[[], int] | None = None,
        close: Callable[[V], Any] | None = None,
    ) -> None:
        self.name = name
        self._maxsize = maxsize
        self._close = close
        self._reset()
        _ALL.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._making: dict[Hashable, threading.Lock] = {}

    def _limit(self) -> int | None:
        m = self._maxsize
        return max(1, int(m() if callable(m) else m)) if m is not None else None

    def peek(self, key: Hashable) -> V | None:
        """The value for *key* if cached (and mark it recently used), else ``None``."""
        with self._lock:
            v = self._data.get(key)
            if v is not None:
                self._data.move_to_end(key)
            return v

    def put(self, key: Hashable, value: V) -> None:
        """Cache *value* under *key*, evicting the least recently used beyond the bound."""
        evicted = []
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            limit = self._limit()
            while limit is not None and len(self._data) > limit:
                evicted.append(self._data.popitem(last=False)[1])
        self._closing(evicted)

    def get(self, key: Hashable, make: Callable[[], V], *, valid: Callable[[V], bool] | None = None) -> V:
        """The value for *key*, made by *make* (once, even when threads ask together) if absent.

        *make* must not return ``None`` (``None`` means "not cached").  With
        *valid*, a cached value it rejects (a handle to a file since replaced)
        is dropped, closed, and made afresh, under the same once-per-key rule.
        """
        v = self.peek(key)
        if v is not None and (valid is None or valid(v)):
            return v
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        with making:
            try:
                v = self.peek(key)
                if v is not None and valid is not None and not valid(v):
                    self._drop_stale(key, v)
                    v = None
                if v is None:
                    v = make()
                    self.put(key, v)
            finally:
                with self._lock:
                    self._making.pop(key, None)
        return v

    def _drop_stale(self, key: Hashable, value: V) -> None:
        with self._lock:
            mine = self._data.get(key) is value
            if mine:
                del self._data[key]
        # Whoever took it out closes it, once.
        self._closing([value] if mine else [])

    def keys(self) -> list[Hashable]:
        """The keys cached now."""
        with self._lock:
            return list(self._data)

    def discard(self, key: Hashable) -> None:
        """Drop (and close) the value for *key*, if any."""
        with self._lock:
            v = self._data.pop(key, None)
        self._closing([] if v is None else [v])

    def forget(self, where: Callable[[Hashable], bool]) -> int:
        """Drop (and close) every value whose key satisfies *where*; how many."""
        with self._lock:
            keys = [k for k in self._data if where(k)]
            gone = [self._data.pop(k) for k in keys]
        self._closing(gone)
        return len(gone)

    def _closing(self, values: list[V]) -> None:
        if self._close is not None:
            for v in values:
                self._close(v)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        return f"<HandleCache {self.name}: {len(self._data)} entries>"

    def _after_fork(self) -> None:
        _INHERITED.append(self._data)
        self._reset()


def _after_fork_in_child() -> None:
    for cache in list(_ALL):
        cache._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
