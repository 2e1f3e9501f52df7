"""Small helpers to turn lists of tasks into dask collections with readable names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

__all__ = ["task_name", "tasks"]


def task_name(prefix: str, *token_parts: Any) -> str:
    """``f"{prefix}-{tokenize(...)}"``: groups under *prefix* in the dashboard."""
    return f"{prefix}-{tokenize(*token_parts)}"


def tasks(name: str, func: Callable[..., Any], arg_lists: Sequence[tuple[Any, ...]]) -> list[Delayed]:
    """One task per argument tuple, keyed ``(name, i)``; returns their ``Delayed``s.

    Arguments may themselves be dask keys of other layers given through
    ``Delayed`` objects; here they are plain (picklable) values.
    """
    dsk = {(name, i): (func, *args) for i, args in enumerate(arg_lists)}
    hlg = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return [Delayed((name, i), hlg, layer=name) for i in range(len(arg_lists))]
