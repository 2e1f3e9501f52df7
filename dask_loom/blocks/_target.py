"""The write half of the block layer: chunk targets (design decisions 1, 4 and 10).

A *chunk target* is where :func:`dask_loom.store` writes: an HDF5 dataset, a
Zarr array, a Loom layer (HDF5 or ``.loom.zarr``), an OME-Arrow chunk
dataset.  It has ``shape``, ``dtype``, ``chunk_shape`` (the write unit: the
stored chunk, or the shard where an array is sharded), ``prefix`` (the
task-name prefix, such as ``"loom-write"``) and ``label`` (how errors name
it), and two halves:

``encode_block(region, data) -> payload``
    runs in a task, in any process: checks the block, casts it to the target
    dtype and encodes it.  HDF5 targets return the compressed chunks (h5py
    cannot write from several processes or threads); Zarr targets write
    their chunk objects themselves and return a small receipt.
``store_payload(payload)``
    runs in the caller, in order: the single HDF5 writer stores the encoded
    chunks (``write_direct_chunk``); nothing for Zarr.

``write_block(region, data)`` does both, for direct local use.  Regions
always start on chunk boundaries and end on one or at the array's edge
(:func:`check_region`), so no two tasks ever write one stored chunk.

Every write happens inside ``with target.transaction():`` (or
``t = target.begin(); ...; t.commit()``): at a normal exit the new content
becomes visible all at once, on an exception nothing of it is (the old
content stays, or there is no array).  A target made inside a bigger
transaction (a Loom layer inside ``create`` or ``permute``) joins it.
Targets pickle without their open handles: tasks carry only what encoding
needs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dask_loom.errors import ChunkAlignmentError

__all__ = ["BlockTarget", "ChunkTarget", "Transaction", "as_block", "check_region"]


@runtime_checkable
class ChunkTarget(Protocol):
    """What :func:`dask_loom.store` needs from a storage-backed array to write."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    prefix: str

    def encode_block(self, region: tuple[slice, ...], data: Any) -> Any:  # pragma: no cover - protocol
        ...

    def store_payload(self, payload: Any) -> None:  # pragma: no cover - protocol
        ...

    def write_block(self, region: tuple[slice, ...], data: Any) -> None:  # pragma: no cover - protocol
        ...

    def transaction(self) -> contextlib.AbstractContextManager[Any]:  # pragma: no cover - protocol
        ...

    def __dask_tokenize__(self) -> Hashable:  # pragma: no cover - protocol
        ...


def check_region(region: tuple[slice, ...], shape: tuple[int, ...], chunk_shape: tuple[int, ...], label: str) -> None:
    """Refuse a write region that splits a stored chunk.

    Every start must lie on a chunk boundary and every stop on one or at the
    array's edge: a region that covers part of a chunk would overwrite the
    rest of it (decision 1).

    Raises
    ------
    ChunkAlignmentError
        Naming the target and the region.
    """
    if len(region) != len(shape):
        raise ChunkAlignmentError(f"{label}: a {len(region)}-D region for a {len(shape)}-D array")
    for r, n, c in zip(region, shape, chunk_shape):
        start, stop = int(r.start or 0), int(n if r.stop is None else r.stop)
        if not 0 <= start <= stop <= n or (r.step not in (None, 1)):
            raise ChunkAlignmentError(f"{label}: region {_fmt(region)} lies outside the array of shape {shape}")
        c = max(1, int(c))
        if start % c or (stop % c and stop != n):
            raise ChunkAlignmentError(
                f"{label}: region {_fmt(region)} splits the stored chunks {tuple(chunk_shape)} of the array "
                f"of shape {shape}; writes cover whole chunks only"
            )


def _fmt(region: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{r.start}:{r.stop}" for r in region) + "]"


def as_block(region: tuple[slice, ...], data: Any, dtype: np.dtype, label: str) -> np.ndarray:
    """*data* as a numpy block of *dtype* that fits *region* (scipy.sparse blocks are densified here, in the task)."""
    if hasattr(data, "toarray") and hasattr(data, "nnz"):
        data = data.toarray()
    block = np.asarray(data)
    expect = tuple(int(r.stop) - int(r.start) for r in region)
    if block.shape != expect:
        raise ValueError(f"{label}: a block of shape {block.shape} does not fit region {_fmt(region)}")
    return block.astype(dtype, copy=False)


class _Abandoned(Exception):
    """Thrown into a transaction rolled back by :meth:`Transaction.abort` without an error of its own."""


class Transaction:
    """An open transaction of a target: :meth:`commit` or :meth:`abort` it (or use it as a context manager)."""

    def __init__(self, target: BlockTarget) -> None:
        self.target = target
        self._cm = target.transaction()
        self._cm.__enter__()
        self._open = True

    def commit(self) -> None:
        """Make everything written since :meth:`BlockTarget.begin` visible at once."""
        if self._open:
            self._open = False
            self._cm.__exit__(None, None, None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Roll back: nothing written since :meth:`BlockTarget.begin` becomes visible."""
        if self._open:
            self._open = False
            exc = exc if exc is not None else _Abandoned(f"{self.target.label}: transaction aborted")
            with contextlib.suppress(_Abandoned):
                self._cm.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.commit()
        else:
            self.abort(exc)


class BlockTarget(ABC):
    """Base class of dask_loom's chunk targets (see the module docstring).

    Subclasses set ``shape``, ``dtype``, ``chunk_shape``, ``prefix`` and
    ``label``, implement :meth:`encode_block` and :meth:`_transaction` (begin,
    then commit at a normal exit or abort on an exception), and override
    :meth:`store_payload` where the caller stores what tasks encode.  An
    optional ``block_bytes`` caps the size of the blocks :func:`dask_loom.store`
    plans for in-memory input.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    prefix: str
    label: str
    block_bytes: int | None = None
    _depth: int = 0

    @abstractmethod
    def encode_block(self, region: tuple[slice, ...], data: Any) -> Any:
        """Check, cast and encode one block of whole chunks (runs in a task)."""

    def store_payload(self, payload: Any) -> None:
        """Store what :meth:`encode_block` returned (runs in the caller, in block order)."""
        return None

    def write_block(self, region: tuple[slice, ...], data: Any) -> None:
        """Encode and store one block here (inside the open transaction, else as its own)."""
        with self.transaction():
            self.store_payload(self.encode_block(region, data))

    def check_region(self, region: tuple[slice, ...]) -> None:
        """:func:`check_region` for this target."""
        check_region(region, self.shape, self.chunk_shape, self.label)

    def as_block(self, region: tuple[slice, ...], data: Any) -> np.ndarray:
        """The aligned, shape-checked block of this target's dtype (see :func:`as_block`)."""
        self.check_region(region)
        return as_block(region, data, self.dtype, self.label)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[BlockTarget]:
        """All writes inside become visible together at the end, or not at all.

        Nested use (and :func:`dask_loom.store` inside an open transaction)
        joins the transaction already open.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        with self._transaction():
            self._depth = 1
            try:
                yield self
            finally:
                self._depth = 0

    def begin(self) -> Transaction:
        """Open the transaction; :meth:`Transaction.commit` or :meth:`Transaction.abort` ends it."""
        return Transaction(self)

    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """Begin; commit at a normal exit, abort on an exception (a generator context manager)."""

    def __getstate__(self) -> dict[str, Any]:
        # A transaction belongs to the process that opened it, never to a task.
        state = dict(self.__dict__)
        state.pop("_depth", None)
        return state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} shape={self.shape} dtype={self.dtype} chunks={self.chunk_shape}>"
