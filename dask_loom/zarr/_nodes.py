"""simplezarr's node API (``open_zarr``, ``ZarrGroup``, ``ZarrArray``) over zarr-python.

Zarr v2 and v3, every codec zarr-python decodes, and sharded arrays (whose
storage unit, ``chunk_shape``, is the shard).  Metadata is read once per node
and kept in ``.metadata``; arrays are rebuilt from it in worker processes, so
a dask graph carries the store spec, the path and the document, nothing open.

Where a directory holds both ``zarr.json`` and ``.zarray`` (zarrs writes both),
the Zarr v3 document wins, as in zarr-python.  A Zarr v2 string array whose
``fill_value`` is a number (zarr-python 2 wrote ``0``) opens instead of
failing: an object (variable-length) array fills with ``"0"`` as zarr-python
3 reads it, a fixed-length one with the empty string as zarr-python 2 did
(zarr-python 3 refuses those).

Groups cache the nodes they open (``g["a"]["b"] is g["a/b"]``, as in
simplezarr); ``open_zarr`` again to see metadata changed by another writer.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import warnings
from typing import Any

import numpy as np

from dask_loom.errors import FormatError, InvalidKeyError
from dask_loom.storage._objectstore import open_store
from dask_loom.storage._stores import BaseStore, check_node_path
from dask_loom.zarr._docs import NodeNotFoundError, read_node_metadata, readable_metadata
from dask_loom.zarr._source import (
    ZarrSource,
    _numpy_dtype,
    build_array,
    chunk_key,
    ensure_open,
    store_label,
    translate_read_error,
)

__all__ = ["NodeNotFoundError", "ZarrArray", "ZarrGroup", "ZarrNode", "open_zarr"]


# -- executor for get_chunk_future / set_chunk_future -------------------------------------


def executor() -> concurrent.futures.ThreadPoolExecutor:
    """The thread pool behind the ``*_future`` methods: the package's I/O pool (``dask_loom.io-threads``)."""
    from dask_loom._threads import io_pool

    return io_pool()


# -- metadata discovery ---------------------------------------------------------------------


def _open_array_checked(store: Any, path: str, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    fixed = readable_metadata(meta)
    if fixed is not meta:
        warnings.warn(
            f"{store_label(store)}: array {path or '/'!r} declares fill_value {meta.get('fill_value')!r} for string dtype "
            f"{meta.get('dtype')}; read with an empty fill value, as zarr-python 2 did",
            UserWarning,
            stacklevel=4,
        )
    return build_array(store, path, fixed), fixed


# -- nodes ----------------------------------------------------------------------------------


class ZarrNode:
    """Base of :class:`ZarrGroup` and :class:`ZarrArray`: a path in a store with its metadata."""

    def __init__(self, store: Any, path: str, metadata: dict[str, Any] | None = None) -> None:
        self.store = store
        self.path = path.strip("/")
        if metadata is None:
            _, metadata = read_node_metadata(store, self.path)
        self.metadata = metadata

    @property
    def name(self) -> str:
        """Last component of the path (``""`` for the root)."""
        return self.path.rpartition("/")[2]

    @property
    def attributes(self) -> dict[str, Any]:
        """User attributes."""
        return dict(self.metadata.get("attributes") or {})

    def print_metadata(self) -> None:
        """Print the metadata document as indented JSON."""
        print(json.dumps(self.metadata, indent=4, default=str))

    def _where(self) -> str:
        return f"{store_label(self.store)}: {'array' if isinstance(self, ZarrArray) else 'group'} {self.path or '/'!r}"

    def _one_line_repr(self) -> str:
        return f"<{type(self).__name__} {self.path!r}>"

    def __repr__(self) -> str:
        return self._one_line_repr()


class ZarrGroup(ZarrNode):
    """A Zarr group; ``group["a/b"]`` navigates, ``repr`` shows its children.

    Child nodes are opened once and cached (``g["a"]["b"] is g["a/b"]``).
    Sub-folders without Zarr metadata (an OME-Zarr download's extras, say)
    are not children and are skipped by every listing.

    Examples
    --------
    >>> import numpy as np, zarr, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> g = zarr.create_group(s)
    >>> _ = g.create_array("a/x", shape=(4, 6), chunks=(2, 3), dtype="i4")
    >>> root = dask_loom.open_zarr(s)
    >>> root
    <ZarrGroup '' with 1 children>
        <ZarrGroup 'a' with 1 children>
    >>> root["a/x"]
    <ZarrArray 'a/x' 4x6 int32>
    >>> root["a"]["x"] is root["a/x"]
    True
    """

    def __init__(self, store: Any, path: str, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(store, path, metadata)
        self._nodes: dict[str, ZarrNode] = {}  # opened descendants by path relative to this group

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process opens its children again (the cache holds open arrays).
        return {**self.__dict__, "_nodes": {}}

    def _child_names(self) -> list[str]:
        prefix = f"{self.path}/" if self.path else "/"
        store = self.store
        if isinstance(store, BaseStore):
            entries = [e for e in store.list_dir(prefix) if e.endswith("/")]
            return [e[len(prefix) if self.path else 0 :].rstrip("/") for e in entries]
        from zarr.core.sync import _collect_aiterator, sync

        names = sync(_collect_aiterator(ensure_open(store).list_dir(self.path)))
        return sorted(n for n in names if n not in ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"))

    def _node(self, rel: str) -> ZarrNode:
        """The node at *rel* below this group, opened once (:class:`NodeNotFoundError` if there is none)."""
        node = self._nodes.get(rel)
        if node is not None:
            return node
        head, _, rest = rel.partition("/")
        if rest:
            try:
                parent: ZarrNode | None = self._node(head)
            except NodeNotFoundError:
                parent = None  # a folder without metadata on the way (implicit groups): open the path directly
            if isinstance(parent, ZarrGroup):
                return parent._node(rest)
            if parent is not None:
                raise NodeNotFoundError(f"{self._where()}: {head!r} is an array, it has no node {rest!r}")
        node = _open_node(self.store, "/".join(p for p in (self.path, rel) if p))
        return self._nodes.setdefault(rel, node)  # atomic: racing threads all get the first node stored

    @property
    def children(self) -> tuple[ZarrNode, ...]:
        """The child nodes; sub-folders without Zarr metadata are skipped."""
        out = []
        for name in self._child_names():
            try:
                check_node_path(name)
                out.append(self._node(name))
            except NodeNotFoundError:
                continue  # not a Zarr node: a plain folder beside the children
            except (FormatError, InvalidKeyError) as exc:
                warnings.warn(f"{self._where()}: skipped child {name!r}: {exc}", UserWarning, stacklevel=2)
        return tuple(out)

    def keys(self) -> list[str]:
        """Names of the children."""
        return [c.name for c in self.children]

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except (KeyError, FormatError):
            return False
        return True

    def __getitem__(self, path: str) -> ZarrNode:
        if not isinstance(path, str):
            raise TypeError(f"{self._where()}: index with a path string, not {type(path).__name__}")
        rel = check_node_path(path, self._where())
        if not rel:
            return self
        try:
            return self._node(rel)
        except NodeNotFoundError:
            raise KeyError(f"{self._where()} has no node {path!r}") from None

    def _one_line_repr(self) -> str:
        return f"<ZarrGroup {self.path!r} with {len(self.children)} children>"

    def get_structure(self, max_depth: int | None = None, indent: int = 0) -> str:
        """The tree below this group as text: one node per line, children indented by 4.

        Parameters
        ----------
        max_depth
            Levels of children to show (``None``: all).
        indent
            Spaces before the first line.
        """
        lines: list[str] = []

        def walk(node: ZarrNode, depth: int) -> None:
            lines.append(" " * (int(indent) + 4 * depth) + node._one_line_repr())
            if isinstance(node, ZarrGroup) and (max_depth is None or depth < int(max_depth)):
                for c in node.children:
                    walk(c, depth + 1)

        walk(self, 0)
        return "\n".join(lines)

    def print_structure(self, max_depth: int | None = None) -> None:
        """Print :meth:`get_structure`."""
        print(self.get_structure(max_depth))

    def __repr__(self) -> str:
        return self.get_structure(max_depth=1)


class ZarrArray(ZarrNode):
    """A Zarr array: chunk-level reads and writes, and a chunk-aligned dask view.

    ``chunk_shape`` is the storage unit: the shard for sharded arrays (as
    simplezarr reports it), else the chunk.  ``get_chunk`` returns the full
    declared chunk shape, padded with the fill value at the array edge.

    Examples
    --------
    >>> import numpy as np, zarr, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> z = zarr.create_array(s, name="x", shape=(5, 6), chunks=(4, 4), dtype="u2", fill_value=7)
    >>> z[:] = np.arange(30).reshape(5, 6)
    >>> a = dask_loom.open_zarr(s, "x")
    >>> a.dtype, a.shape, a.chunk_shape, a.chunk_grid_shape
    ('uint16', (5, 6), (4, 4), (2, 2))
    >>> a.get_chunk((1, 1))
    array([[28, 29,  7,  7],
           [ 7,  7,  7,  7],
           [ 7,  7,  7,  7],
           [ 7,  7,  7,  7]], dtype=uint16)
    >>> int(a.to_dask().sum().compute(scheduler="sync"))
    435
    """

    def __init__(self, store: Any, path: str, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(store, path, metadata)
        self._z, self.metadata = _open_array_checked(self.store, self.path, self.metadata)

    # -- description -------------------------------------------------------------------
    @property
    def zarr(self) -> Any:
        """The underlying ``zarr.Array``."""
        return self._z

    @property
    def dtype(self) -> str:
        """The data type as a string (``"uint16"``, ``"float32"``, ``"string"`` …)."""
        dt = self._z.dtype
        if not isinstance(dt, np.dtype) or dt.kind == "T":
            return "string"
        if dt.kind in "biufc":
            return dt.name
        return str(dt)

    @property
    def ndim(self) -> int:
        return len(self._z.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._z.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * _numpy_dtype(self._z).itemsize

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """Shape of the storage unit (shard if sharded, else chunk)."""
        return tuple(int(c) for c in (self._z.shards or self._z.chunks))

    @property
    def inner_chunk_shape(self) -> tuple[int, ...]:
        """zarr's read chunk (the inner chunk of a sharded array)."""
        return tuple(int(c) for c in self._z.chunks)

    @property
    def chunk_grid_shape(self) -> tuple[int, ...]:
        return tuple(-(-s // c) if s else 0 for s, c in zip(self.shape, self.chunk_shape))

    @property
    def chunk_size(self) -> int:
        return math.prod(self.chunk_shape)

    @property
    def chunk_nbytes(self) -> int:
        return self.chunk_size * _numpy_dtype(self._z).itemsize

    @property
    def _fill_value(self) -> Any:
        return self._z.fill_value

    @property
    def _dimension_names(self) -> tuple[str | None, ...] | None:
        return self.metadata.get("dimension_names")

    def _one_line_repr(self) -> str:
        shape = "x".join(str(n) for n in self.shape) if self.shape else "()"
        return f"<ZarrArray {self.path!r} {shape} {self.dtype}>"

    # -- chunk I/O -------------------------------------------------------------------
    def _chunk_region(self, index: Any) -> tuple[tuple[int, ...], tuple[slice, ...]]:
        if isinstance(index, (int, np.integer)) and self.ndim == 1:
            index = (index,)
        if not isinstance(index, tuple) or not all(isinstance(i, (int, np.integer)) for i in index):
            raise TypeError(f"{self._where()}: a chunk index is a tuple of ints, got {index!r}")
        if len(index) != self.ndim:
            raise IndexError(f"{self._where()}: chunk index {index} has {len(index)} axes, the array {self.ndim}")
        grid = self.chunk_grid_shape
        for i, g in zip(index, grid):
            if not 0 <= i < g:
                raise IndexError(f"{self._where()}: chunk index {tuple(int(i) for i in index)} outside the chunk grid {grid}")
        idx = tuple(int(i) for i in index)
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunk_shape, self.shape))
        return idx, region

    def get_chunk(self, index: Any) -> np.ndarray:
        """Read one stored chunk (shard): the full chunk shape, edge padded with the fill value."""
        _, region = self._chunk_region(index)
        try:
            data = np.asarray(self._z[region])
        except Exception as exc:
            raise translate_read_error(exc, self._z, self.store, region, self.chunk_shape) from exc
        dt = _numpy_dtype(self._z)
        if data.shape == self.chunk_shape:
            return data.astype(dt, copy=False)
        out = np.full(self.chunk_shape, self._fill_value if self._fill_value is not None else 0, dtype=dt)
        out[tuple(slice(0, s) for s in data.shape)] = data
        return out

    def get_chunk_future(self, index: Any) -> concurrent.futures.Future[np.ndarray]:
        """:meth:`get_chunk` in a thread pool (``dask_loom.io-threads`` threads)."""
        self._chunk_region(index)  # bad indices fail here, not inside the future
        return executor().submit(self.get_chunk, index)

    def set_chunk(self, data: np.ndarray, index: Any, check_empty: bool = True) -> None:
        """Write one stored chunk (shard); ``data`` has the full chunk shape and the array's dtype.

        With ``check_empty`` a chunk equal to the fill value everywhere is
        erased instead of written.  At the array edge only the part inside
        the array is stored.
        """
        _, region = self._chunk_region(index)
        data = np.asarray(data)
        dt = _numpy_dtype(self._z)
        if data.shape != self.chunk_shape:
            raise ValueError(f"{self._where()}: chunk data has shape {data.shape}, expected {self.chunk_shape}")
        if data.dtype != dt:
            raise TypeError(f"{self._where()}: chunk data has dtype {data.dtype}, expected {dt}")
        inside = data[tuple(slice(0, r.stop - r.start) for r in region)]
        arr = build_array(self.store, self.path, self.metadata, write_empty_chunks=not check_empty)
        arr[region] = inside

    def set_chunk_future(self, data: np.ndarray, index: Any) -> concurrent.futures.Future[None]:
        """:meth:`set_chunk` in the thread pool."""
        self._chunk_region(index)
        return executor().submit(self.set_chunk, data, index)

    def chunk_key(self, index: Any) -> str:
        """The store key of a chunk (shard)."""
        idx, _ = self._chunk_region(index)
        return chunk_key(self._z, idx)

    # -- dask ---------------------------------------------------------------------------
    def source(self, *, prefix: str = "zarr-read") -> ZarrSource:
        """This array as a chunk source for :func:`dask_loom.from_source`."""
        return ZarrSource(self.store, self.path, self.metadata, prefix=prefix)

    def __dask_loom_source__(self, layer: str | None = None) -> Any:
        """This array as ``dask_loom.map``/``aggregate``/``scan``/``permute`` read it (format ``zarr``)."""
        import functools

        from dask_loom.errors import OperationError
        from dask_loom.ops._sources import SourceInfo
        from dask_loom.zarr._permute import permute_array

        if layer is not None:
            raise OperationError(f"{self._where()}: layer={layer!r} applies to Loom connections and collections, not to a Zarr array")
        writable = not getattr(self.store, "read_only", False)
        return SourceInfo.from_source(
            self.source(),
            format="zarr",
            label=self._where(),
            permute=functools.partial(permute_array, self) if writable else None,
            read_only="the store is read-only",
        )

    def to_dask(self, *, chunks: Any = None, target_bytes: int | str | None = None) -> Any:
        """A dask array whose blocks are unions of whole stored chunks (shards).

        Parameters
        ----------
        chunks
            Any dask chunk specification; boundaries splitting stored chunks
            are rounded out with a warning.  ``"chunks"`` gives exactly one
            block per stored chunk (shard).  Default: blocks of
            ``dask_loom.block-size`` bytes made of whole chunks.
        target_bytes
            Block-size target for the default plan.
        """
        from dask_loom.blocks import from_source

        if isinstance(chunks, str) and chunks == "chunks":
            chunks = self.chunk_shape
        return from_source(self.source(), chunks=chunks, target_bytes=target_bytes)


def _open_node(store: Any, path: str) -> ZarrNode:
    kind, meta = read_node_metadata(store, path)
    return ZarrArray(store, path, meta) if kind == "array" else ZarrGroup(store, path, meta)


def _is_zip_file(path: str) -> bool:
    from dask_loom.storage._urls import is_url

    if is_url(path) or not os.path.isfile(path):
        return False
    import zipfile

    return zipfile.is_zipfile(path)


def open_zarr(store: Any, path: str = "", *, mode: str = "r+", **storage_options: Any) -> ZarrNode:
    """Open the Zarr node (group or array) at *path* of a store, path or URL.

    Parameters
    ----------
    store
        A store (any zarr-python ``Store``, a ``ZipStore`` opened or not), a
        local path (a directory, or a zip file such as ``x.zarr.zip``, which
        opens read-only), or a URL (``s3://…``; options in
        ``storage_options``).
    path
        Node path inside the store.
    mode
        ``"r"`` opens read-only; ``"r+"`` (default) allows ``set_chunk``.

    Raises
    ------
    NodeNotFoundError
        No ``zarr.json``/``.zarray``/``.zgroup`` at *path*.
    dask_loom.errors.FormatError
        Malformed metadata (naming the key and problem).
    dask_loom.errors.UnsupportedCodecError
        A codec this installation cannot decode.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
    if isinstance(store, (str, os.PathLike)) and _is_zip_file(os.fspath(store)):
        from zarr.storage import ZipStore

        # Zipped stores open read-only: a zip member cannot be replaced or erased in place.
        store = ZipStore(os.fspath(store), mode="r")
    elif isinstance(store, (str, os.PathLike, dict)):
        s = open_store(store, read_only=mode == "r", **storage_options)
        if isinstance(store, (str, os.PathLike)) and not isinstance(store, dict):
            from dask_loom.storage._urls import is_url

            if not is_url(os.fspath(store)) and not os.path.exists(os.fspath(store)):
                raise NodeNotFoundError(f"{os.fspath(store)}: no such file or directory")
        store = s
    elif mode == "r" and isinstance(store, BaseStore) and not store.read_only:
        store = store.with_read_only(True)
    ensure_open(store)
    # Checked for any store, zarr-python's own included (they do not all refuse "..").
    path = check_node_path(path, store_label(store))
    return _open_node(store, path)
