"""Handing tensor views to DLPack consumers (torch, jax), and reading them ahead on a thread pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dask_loom._threads import read_ahead
from dask_loom.errors import MissingDependencyError, SelectionError
from dask_loom.ome._selection import _check_policy


class _DLPackWrapper:
    """A single-use DLPack producer (ownership moves to the first consumer)."""

    def __init__(self, producer: Any, device: tuple[int, int]) -> None:
        self._producer = producer
        self._device = device

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self._producer is None:
            raise RuntimeError("DLPack capsule has already been consumed and cannot be reused.")
        capsule = self._producer.__dlpack__(**kwargs)  # TypeError lets consumers retry older protocols
        self._producer = None
        return capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("Torch is not installed: pip install 'dask_loom[torch]'") from None
    return torch


def _jax_numpy() -> Any:
    try:
        import jax.numpy as jnp
    except ImportError:
        raise MissingDependencyError("JAX is not installed: pip install 'dask_loom[jax]'") from None
    return jnp


def _device(device: str) -> str:
    d = str(device).strip().lower()
    if d not in ("cpu", "cuda"):
        raise SelectionError(f"Unsupported device '{d}'. Expected 'cpu' or 'cuda'.")
    return d


def _mode(mode: str) -> str:
    return _check_policy(mode, ("arrow", "numpy"), "mode")


def _export(obj: Any, device: str) -> Any:
    """DLPack wrapper of a numpy array or Arrow array, on *device*."""
    if device == "cpu":
        dev = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (1, 0)
        return _DLPackWrapper(obj, dev)
    torch = _torch()
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA device requested but torch reports no CUDA.")
    t = torch.from_numpy(np.asarray(obj)).to(device="cuda")
    return _DLPackWrapper(t, t.__dlpack_device__())


def _prefetched(thunks: Sequence[Callable[[], Any]], depth: int) -> Iterator[Any]:
    """Results of *thunks* in order, with *depth* of them computed ahead on (at most 4) threads."""
    if depth < 0:
        raise SelectionError(f"prefetch must be >= 0, got {depth}")
    return read_ahead(thunks, depth, workers=4, name="ome-prefetch")
