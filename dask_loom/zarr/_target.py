"""A Zarr array as a chunk target: every task writes the stored objects of its own block.

Writing part of a shard is a read-modify-write of the whole shard key, so two
tasks writing into one shard at once lose data (zarr-python #3682, dask
#12583).  Blocks handed to a :class:`ZarrTarget` are unions of whole stored
objects (shards, or chunks when unsharded), so each object is written by
exactly one task, and the task writes it itself: :meth:`ZarrTarget.encode_block`
stores the block and returns a small receipt, the caller has nothing left to
store.

The transaction: in a local store the array is written into a copy beside
the store and swapped in at commit with one atomic directory exchange, under
the writer lock (:func:`dask_loom.storage._atomic.local_transaction`, the
same transaction a ``.loom.zarr`` container uses); a crash leaves the old
array or the new one.  Object stores have no rename: the old array is
removed first and the new array's metadata document is written last, as its
commit marker, so an interrupted write leaves no array, never a mixture.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dask_loom.blocks._target import BlockTarget
from dask_loom.errors import MissingKeyError

__all__ = ["ZarrTarget", "chunk_samples", "default_shards", "shards_param", "stored_ratio"]

_DOCS = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def default_shards(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    itemsize: int,
    *,
    target_bytes: int | str | None = None,
    stored_ratio: float | None = None,
) -> tuple[int, ...] | None:
    """The shard shape dask_loom writes: whole inner *chunks*, about ``dask_loom.block-size`` bytes decoded.

    Shaped as :func:`~dask_loom.blocks.plan_blocks` shapes a block, so a dask
    block of the array is one shard (one object: one request for its index
    and a few coalesced ranged reads for its chunks).  ``None`` when a shard
    would hold a single chunk (nothing to gain from sharding).

    With *stored_ratio* (stored bytes per decoded byte, estimated by
    :func:`stored_ratio`), a shard that would store less than
    ``dask_loom.coalesce-bytes`` grows until it stores about that much (at
    most four times the decoded target): shards are taken away along the
    axis cut into the most, and those left share its chunks evenly.  Reading
    an object store then takes about one request per ``coalesce-bytes``
    stored, where a shard of compressible counts would take one per few MiB.

    Examples
    --------
    >>> default_shards((20_000, 50_000), (64, 64), 4, target_bytes="64MiB")
    (4032, 3904)
    >>> default_shards((60, 50), (64, 64), 4) is None
    True

    Counts at 1/20 of their decoded size: 64 MiB shards would store 3.2 MiB.

    >>> default_shards((4096, 16384), (128, 128), 4, target_bytes="64MiB")
    (4096, 4096)
    >>> default_shards((4096, 16384), (128, 128), 4, target_bytes="64MiB", stored_ratio=0.05)
    (4096, 5504)
    """
    from dask_loom._config import block_size_bytes, config_bytes
    from dask_loom.blocks._plan import units_per_block

    shape = tuple(int(s) for s in shape)
    chunks = tuple(max(1, int(c)) for c in chunks)
    if not shape or 0 in shape:
        return None
    itemsize = max(1, int(itemsize))
    grid = tuple(-(-n // c) for n, c in zip(shape, chunks))
    units = list(units_per_block(shape, chunks, itemsize, target_bytes=target_bytes))
    if stored_ratio is not None and stored_ratio > 0:
        floor = config_bytes("coalesce-bytes")
        cap = 4 * block_size_bytes(target_bytes)

        def nbytes(u: Sequence[int]) -> int:
            return math.prod(min(k, g) * c for k, g, c in zip(u, grid, chunks)) * itemsize

        # One shard fewer along the axis cut most often, spread evenly, until a shard stores
        # about coalesce-bytes: every shard grows alike, none is a small remainder.
        while nbytes(units) * stored_ratio < floor:
            counts = [-(-g // u) for g, u in zip(grid, units)]
            ax = max(range(len(counts)), key=lambda i: counts[i])
            if counts[ax] == 1:
                break
            grown = list(units)
            grown[ax] = -(-grid[ax] // (counts[ax] - 1))
            if nbytes(grown) > cap:
                break
            units = grown
    # Not past the array's edge: the last shard holds the chunks that exist.
    units = tuple(min(u, g) for u, g in zip(units, grid))
    if all(u == 1 for u in units):
        return None
    return tuple(u * c for u, c in zip(units, chunks))


def stored_ratio(samples: Sequence[Any], encode: Callable[[np.ndarray], Any]) -> float | None:
    """Stored bytes per decoded byte of *samples* (chunk-shaped arrays) as *encode* compresses them.

    ``None`` without samples.  Used by writers to size shards by what they
    store (:func:`default_shards`).

    Examples
    --------
    >>> import numpy as np, numcodecs
    >>> stored_ratio([np.zeros((64, 64), "f4")], numcodecs.Zstd().encode) < 0.01
    True
    """
    decoded = stored = 0
    for s in samples:
        a = np.ascontiguousarray(s)
        decoded += a.nbytes
        stored += len(memoryview(encode(a)).cast("B"))
    return stored / decoded if decoded else None


def chunk_samples(values: Any, chunks: tuple[int, ...], *, k: int = 8) -> list[np.ndarray]:
    """Up to *k* chunk-shaped pieces of *values*, spread over its chunk grid, as numpy arrays.

    *values* is anything sliceable to an array (numpy, scipy sparse, a Loom
    layer or Zarr array whose slicing reads only what it needs).  A dask
    array is sampled inside its first block only: one block is computed,
    never the whole graph.

    Examples
    --------
    >>> import numpy as np
    >>> [s.shape for s in chunk_samples(np.ones((5, 300)), (4, 100), k=3)]
    [(4, 100), (4, 100), (1, 100)]
    """
    shape = tuple(int(n) for n in values.shape)
    if not shape or 0 in shape:
        return []
    if getattr(values, "format", None) in ("coo", "dia", "dok", "lil", "bsr"):
        values = values.tocsr()  # scipy formats that cannot be sliced (or slowly)
    if hasattr(values, "__dask_graph__"):
        first = tuple(slice(0, int(c[0])) for c in values.chunks)
        values = np.asarray(values[first].compute())
        shape = values.shape
    grid = tuple(-(-n // c) for n, c in zip(shape, chunks))
    n = math.prod(grid)
    picks = sorted({round(float(i)) for i in np.linspace(0, n - 1, min(k, n))})
    out = []
    for flat in picks:
        at = np.unravel_index(flat, grid)
        region = tuple(slice(int(g) * c, min(n_, (int(g) + 1) * c)) for g, c, n_ in zip(at, chunks, shape))
        piece = values[region]
        out.append(np.asarray(piece.toarray() if hasattr(piece, "toarray") else piece))
    return out


def _store_name(store: Any) -> str:
    return getattr(store, "name", None) or repr(store)


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def shards_param(shards: tuple[int, ...] | None) -> dict[str, Any] | None:
    """``zarr.create_array``'s *shards* for shards dask_loom writes: each shard's index at its start.

    A reader on an object store then reads the index, with the first
    ``2 * coalesce-bytes`` of the shard, in one bounded range request on every
    store.  At the end (zarr's default) it takes a suffix range, which Azure's
    blob API lacks: there each shard cost a ``HEAD`` for its size first.
    Every Zarr v3 reader reads either (the sharding codec's
    ``index_location``).

    Examples
    --------
    >>> shards_param((128, 64))
    {'shape': (128, 64), 'index_location': 'start'}
    >>> shards_param(None) is None
    True
    """
    if shards is None:
        return None
    return {"shape": tuple(int(c) for c in shards), "index_location": "start"}


class ZarrTarget(BlockTarget):
    """An array of a Zarr store (v2 or v3, sharded or not), written as a transaction.

    Parameters
    ----------
    store
        A store, local path or URL (*storage_options* for URLs).
    path
        Array path inside the store (``""``: the store is the array).
    shape, dtype, chunks, shards, compressors, fill_value, attributes, dimension_names, zarr_format
        As for ``zarr.create_array``.
    write_empty_chunks
        Store chunks that hold only the fill value (default: skip them).
    overwrite
        Replace an existing node at *path* (else ``ContainsArrayError`` /
        ``ContainsGroupError`` when the transaction begins).
    prefix
        Task-name prefix (default ``"zarr-write"``).

    Examples
    --------
    >>> import numpy as np, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> from dask_loom.zarr import ZarrTarget
    >>> s = MemoryStore()
    >>> t = ZarrTarget(s, "a/x", shape=(6, 4), dtype="f4", chunks=(2, 2), shards=(4, 4))
    >>> with t.transaction():
    ...     t.write_block((slice(0, 4), slice(0, 4)), np.ones((4, 4)))
    ...     t.write_block((slice(4, 6), slice(0, 4)), np.zeros((2, 4)))
    >>> t.chunk_shape, float(dask_loom.open_zarr(s, "a/x").to_dask().sum().compute())
    ((4, 4), 16.0)
    """

    def __init__(
        self,
        store: Any,
        path: str = "",
        *,
        shape: tuple[int, ...],
        dtype: Any,
        chunks: tuple[int, ...],
        shards: tuple[int, ...] | None = None,
        compressors: Any = "auto",
        fill_value: Any = None,
        attributes: dict[str, Any] | None = None,
        dimension_names: tuple[str, ...] | None = None,
        zarr_format: int = 3,
        write_empty_chunks: bool = False,
        overwrite: bool = True,
        prefix: str = "zarr-write",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        import zarr

        from dask_loom.storage._objectstore import open_store
        from dask_loom.storage._stores import MemoryStore, check_node_path
        from dask_loom.zarr._source import _numpy_dtype

        if isinstance(store, (str, os.PathLike)):
            store = open_store(store, **(storage_options or {}))
        # Refused here, naming the store (zarr's own check names neither).
        self.path = check_node_path(path, _store_name(store))
        self.store = store
        self.label = f"{_store_name(store)}: array {self.path or '/'!r}"
        kw: dict[str, Any] = {}
        if zarr_format == 3:
            kw["dimension_names"] = dimension_names
        # The metadata documents are made in memory, and written when the transaction says.
        scratch = MemoryStore()
        z = zarr.create_array(
            scratch,
            name=self.path or None,
            shape=tuple(int(s) for s in shape),
            dtype=dtype,
            chunks=tuple(int(c) for c in chunks),
            shards=shards_param(shards),
            compressors=compressors,
            fill_value=fill_value,
            attributes=attributes,
            zarr_format=zarr_format,
            **kw,
        )
        self.metadata = z.metadata.to_dict()
        self._docs = {k: scratch.get(k) for k in scratch.list()}
        self.shape = tuple(int(s) for s in z.shape)
        self.dtype = _numpy_dtype(z)
        self.chunk_shape = tuple(int(c) for c in (z.shards or z.chunks))
        self.write_empty_chunks = bool(write_empty_chunks)
        self.overwrite = bool(overwrite)
        self.prefix = prefix
        self._joined = False
        self._write_store: Any = None

    @classmethod
    def on(cls, store: Any, path: str, metadata: dict[str, Any], *, prefix: str = "zarr-write", label: str | None = None) -> ZarrTarget:
        """A target of the existing array *path* of *store* (*metadata* its document), inside a transaction the caller holds."""
        from dask_loom.zarr._source import _numpy_dtype, build_array

        arr = build_array(store, path, metadata)
        self = cls.__new__(cls)
        self.store = store
        self.path = path.strip("/")
        self.label = label or f"{_store_name(store)}: array {self.path or '/'!r}"
        self.metadata = metadata
        self._docs = {}
        self.shape = tuple(int(s) for s in arr.shape)
        self.dtype = _numpy_dtype(arr)
        self.chunk_shape = tuple(int(c) for c in (arr.shards or arr.chunks))
        self.write_empty_chunks = False
        self.overwrite = True
        self.prefix = prefix
        self._joined = True
        self._write_store = store
        return self

    def __dask_tokenize__(self) -> Any:
        import json

        from dask.base import tokenize

        # The destination, not a transaction's copy: the same write gets the same task names.
        return ("ZarrTarget", tokenize(self.store), self.path, json.dumps(self.metadata, sort_keys=True, default=str), self.prefix)

    def __reduce__(self) -> Any:
        # Tasks write into the store of the open transaction (the copy, for a local store).
        where = self._write_store if self._write_store is not None else self.store
        return (_rebuild, (self.store, where, self.path, self.metadata, self.write_empty_chunks, self.prefix, self.label))

    # -- the two halves ---------------------------------------------------------------------

    def encode_block(self, region: tuple[slice, ...], data: Any) -> tuple[tuple[int, ...], int]:
        """Write the stored objects of one block; the receipt is ``(block origin, bytes given)``."""
        from dask_loom.zarr._source import build_array

        block = self.as_block(region, data)
        where = self._write_store if self._write_store is not None else self.store
        build_array(where, self.path, self.metadata, write_empty_chunks=self.write_empty_chunks)[region] = block
        return tuple(int(r.start) for r in region), int(block.nbytes)

    # -- the transaction --------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._joined:
            yield  # the caller's transaction decides
            return
        from dask_loom.storage._atomic import local_transaction
        from dask_loom.storage._stores import LocalStore

        self._check_overwrite()
        if type(self.store) is LocalStore:
            with local_transaction(self.store.path, label=self.label, base="empty", node=self.path) as copy:
                for key, doc in self._docs.items():
                    copy.set(key, doc)
                self._write_store = copy
                try:
                    yield
                finally:
                    self._write_store = None
            return
        self._erase_node()
        self._write_store = self.store
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self._erase_node()
            raise
        finally:
            self._write_store = None
        self._commit_docs()

    def _node_exists(self) -> bool:
        from dask_loom.zarr._nodes import NodeNotFoundError, read_node_metadata

        try:
            read_node_metadata(self.store, self.path)
        except NodeNotFoundError:
            return False
        return True

    def _check_overwrite(self) -> None:
        if self.overwrite or not self._node_exists():
            return
        from zarr.errors import ContainsArrayError

        raise ContainsArrayError(f"{self.label}: a node exists there (pass overwrite=True to replace it)")

    def _erase_node(self) -> None:
        # The metadata first: from here on the array does not open, whatever is left of its chunks.
        for doc in _DOCS:
            with contextlib.suppress(MissingKeyError, FileNotFoundError):
                self.store.erase(_join(self.path, doc))
        with contextlib.suppress(MissingKeyError, FileNotFoundError):
            self.store.erase_prefix(f"{self.path}/" if self.path else "/")

    def _commit_docs(self) -> None:
        """Groups above the array that the store lacks, then the array's own documents (the commit marker) last."""
        from dask_loom.zarr._nodes import NodeNotFoundError, read_node_metadata

        mine = {_join(self.path, d) for d in _DOCS}
        for key, doc in self._docs.items():
            if key in mine:
                continue
            node = key.rpartition("/")[0]
            try:
                read_node_metadata(self.store, node)
            except NodeNotFoundError:
                self.store.set(key, doc)
        # .zattrs before .zarray (v2), so the document that makes the array is the last one.
        for key in sorted((k for k in self._docs if k in mine), key=lambda k: k.endswith((".zarray", "zarr.json"))):
            self.store.set(key, self._docs[key])


def _rebuild(
    store: Any, write_store: Any, path: str, metadata: dict[str, Any], write_empty_chunks: bool, prefix: str, label: str
) -> ZarrTarget:
    self = ZarrTarget.on(write_store, path, metadata, prefix=prefix, label=label)
    self.store = store  # the destination names it; the transaction's copy takes the writes
    self.write_empty_chunks = write_empty_chunks
    return self
