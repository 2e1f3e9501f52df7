"""Writing layers: whole layers (numpy, scipy.sparse, dask) and regions.

A Loom layer is a chunk target (:class:`LayerTarget`): blocks of whole stored
chunks are checked (the spec forbids NaN and Inf), cast and encoded by the
tasks of :func:`dask_loom.store` (compressed for HDF5, whose single writer
stores them; written directly for ``.loom.zarr``).  Whole-layer writes are
transactions (``Tree.writing(atomic=True)``): a crash at any moment leaves the
old file.  scipy.sparse input is densified one band at a time, in the tasks,
never whole.  Region writes read, update and write back whole chunks through
the same target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._config import get_config
from dask_loom._indexing import normalize_key
from dask_loom._lazy import issparse
from dask_loom.blocks import selection_bands, store
from dask_loom.blocks._target import BlockTarget
from dask_loom.loom._common import check_name
from dask_loom.loom._layerhost import LayerHost, layer_path
from dask_loom.loom._store import touch

if TYPE_CHECKING:
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = [
    "LayerTarget",
    "check_values",
    "default_chunks",
    "fill_layer",
    "write_layer",
    "write_layer_region",
]


def default_chunks(shape: tuple[int, ...], chunks: Any = None, *, zarr: bool = False) -> tuple[int, ...]:
    """``(min(64, N), min(64, M))`` as loompy, or the configured/given chunk shape.

    For a ``.loom.zarr`` (*zarr*), the inner chunk shape of its sharded layers,
    ``dask_loom.loom-zarr-chunks``.
    """
    c = chunks if chunks is not None else get_config("loom-zarr-chunks" if zarr else "loom-chunks")
    return tuple(max(1, min(int(k), int(n))) for k, n in zip(c, shape))


def is_zarr_writer(w: Any) -> bool:
    """True for the writer of a ``.loom.zarr`` container."""
    from dask_loom.loom._zarrtree import ZarrWriter

    return isinstance(w, ZarrWriter)


def layer_shards(
    shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], *, sample: Any = None
) -> tuple[int, ...] | None:
    """The shard shape of a ``.loom.zarr`` layer of inner *chunks* (``None``: unsharded).

    A layer without columns yet (``add_columns`` to an empty file) is sharded
    as if it had one shard's worth of columns, as it will grow.  With
    *sample* (the values to be written, or an array like them), shards of
    well-compressing values grow to store about ``dask_loom.coalesce-bytes``
    each (:func:`dask_loom.zarr.default_shards`), estimated by compressing a
    few chunks of it as the layer will be stored.
    """
    from dask_loom.loom._zarrtree import sample_encoder
    from dask_loom.zarr._target import chunk_samples, default_shards, stored_ratio

    planned = tuple(max(int(n), int(c)) for n, c in zip(shape, chunks))
    ratio = None
    encode = sample_encoder() if sample is not None else None
    if encode is not None:
        ratio = stored_ratio(
            [s.astype(dtype, copy=False) for s in chunk_samples(sample, tuple(chunks))], encode
        )
    return default_shards(planned, chunks, np.dtype(dtype).itemsize, stored_ratio=ratio)


def check_dtype(dtype: Any, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "iuf":
        raise ValueError(f"{where}: matrix elements must be integer or float, not {dt}")
    return dt


def check_values(block: Any, where: str) -> None:
    """Refuse NaN and Inf (the Loom spec forbids them in matrices)."""
    data = block.data if issparse(block) else np.asarray(block)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError(f"{where}: INF and NaN not allowed in loom matrix")


class LayerTarget(BlockTarget):
    """A Loom layer (HDF5 ``.loom`` or ``.loom.zarr``) as a chunk target.

    Blocks are refused when they hold NaN or Inf, then encoded by the
    container's own target (:meth:`TreeWriter.target`).

    Parameters
    ----------
    ds
        An ``r+`` connection.
    name
        The layer (``""``: the main matrix); it is created, or replaced, with
        the connection's shape.
    dtype
        Integer or float (default: the existing layer's).
    chunks
        Stored chunk shape (default: the existing layer's, else loompy's 64 x 64).
    shape
        The layer's shape (default: the connection's; the main matrix of a
        file without other layers may change it).
    prefix
        Task-name prefix (default ``"loom-write"``).
    sample
        The values to be written (or an array like them): in a ``.loom.zarr``
        shards of well-compressing values are sized by what they store
        (:func:`layer_shards`).

    Notes
    -----
    The transaction is the connection's: the layer is written under a
    temporary name in a copy of the file (``Tree.writing(atomic=True)``) and
    takes its name at commit.  :meth:`on` makes the target of an array in a
    write already open (``create``, ``permute``, ``convert``), which joins it.

    Examples
    --------
    >>> import numpy as np, tempfile, os, dask_loom
    >>> from dask_loom.loom import LayerTarget
    >>> fn = os.path.join(tempfile.mkdtemp(), "a.loom")
    >>> dask_loom.create(fn, np.zeros((100, 50), "f4"), {"g": np.arange(100)}, {"c": np.arange(50)})
    >>> with dask_loom.connect(fn) as ds:
    ...     dask_loom.store(np.ones((100, 50)), LayerTarget(ds, "ones", dtype="i4"), scheduler="sync")
    ...     print(ds.layers["ones"].dtype, int(ds.layers["ones"][:, :].sum()))
    int32 5000
    """

    def __init__(
        self,
        ds: LoomConnectionLike,
        name: str,
        *,
        dtype: Any = None,
        chunks: Any = None,
        shape: tuple[int, int] | None = None,
        prefix: str = "loom-write",
        sample: Any = None,
    ) -> None:
        host = ds.__dask_loom_layer_host__()
        host.check_writable()
        check_name("Layer", name, ds.filename, allow_empty=True)
        self.where = f"{ds.filename}: layer '{name}'"
        existing = name in ds.layers.keys()
        if dtype is None:
            if not existing:
                raise ValueError(f"{self.where}: give the dtype of a new layer")
            dtype = host.dtype(name)
        if chunks is None and existing:
            info = host.info(name)
            chunks = info.inner_chunks or (tuple(info.chunks) if info.chunks else None)
        self.shape = tuple(int(s) for s in (shape if shape is not None else ds.shape))
        self.dtype = check_dtype(dtype, self.where)
        zarr = is_zarr_host(host)
        self._chunks = default_chunks(self.shape, chunks, zarr=zarr)
        # A .loom.zarr layer is sharded: the shard is the write unit the blocks are planned in.
        self._shards = layer_shards(self.shape, self.dtype, self._chunks, sample=sample) if zarr else None
        self.chunk_shape = self._shards or self._chunks
        self.prefix = prefix
        self.label = self.where
        self._host: LayerHost | None = host
        self._name = name
        self._inner: Any = None

    @classmethod
    def on(cls, w: Any, path: str, where: str, *, prefix: str = "loom-write") -> LayerTarget:
        """The layer array at *path* of the open tree writer *w*, inside the write *w* belongs to."""
        self = cls.__new__(cls)
        self._inner = w.target(path, prefix=prefix, label=where)
        self._host = None
        self._name = None
        self.where = self.label = where
        self.shape = tuple(self._inner.shape)
        self.dtype = np.dtype(self._inner.dtype)
        self.chunk_shape = tuple(self._inner.chunk_shape)
        self.prefix = prefix
        return self

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return (
            "LayerTarget",
            self.where,
            self.shape,
            self.dtype.str,
            self.chunk_shape,
            self.prefix,
            tokenize(self._inner) if self._inner is not None else None,
        )

    def __reduce__(self) -> Any:
        # Tasks carry the container's target (which drops its open handles) and the check.
        if self._inner is None:
            raise RuntimeError(f"{self.where}: a layer target travels to tasks inside its transaction only")
        return (_rebuild_layer_target, (self._inner, self.where, self.prefix))

    def encode_block(self, region: tuple[slice, ...], data: Any) -> Any:
        """Refuse NaN/Inf, then the container's encoding (compressed chunks, or chunks written)."""
        check_values(data, self.where)
        return self._inner.encode_block(region, data)

    def encode_gathered(self, region: tuple[slice, ...], data: Any, index: np.ndarray, axis: int) -> Any:
        """:meth:`encode_block` of ``np.take(data, index, axis=axis)`` (the gather done while encoding, where it can be)."""
        check_values(data, self.where)  # the same values, in another order
        if hasattr(self._inner, "encode_gathered"):
            return self._inner.encode_gathered(region, data, index, axis)
        return self._inner.encode_block(region, np.take(np.asarray(data), index, axis=axis))

    def store_payload(self, payload: Any) -> None:
        self._inner.store_payload(payload)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        host, name = self._host, self._name
        if host is None:
            yield  # joined: the write the tree writer belongs to decides
            return
        path = layer_path(name)
        head, _, tail = path.rpartition("/")
        tmp = f"{head}/.tmp-{tail}" if head else f".tmp-{tail}"
        try:
            with host.writing(atomic=True) as w:
                if head:
                    w.create_group(head)
                w.delete(tmp)
                create_layer_array(w, tmp, self.shape, self.dtype, self._chunks, shards=self._shards)
                self._inner = w.target(tmp, prefix=self.prefix, label=self.where)
                yield
                w.move(tmp, path)
                touch(w)
        finally:
            self._inner = None
            host.refresh()


def _rebuild_layer_target(inner: Any, where: str, prefix: str) -> LayerTarget:
    self = LayerTarget.__new__(LayerTarget)
    self._inner = inner
    self._host = None
    self._name = None
    self.where = self.label = where
    self.shape = tuple(inner.shape)
    self.dtype = np.dtype(inner.dtype)
    self.chunk_shape = tuple(inner.chunk_shape)
    self.prefix = prefix
    return self


def _prepare(ds: LoomConnectionLike, name: str, value: Any) -> tuple[Any, tuple[int, ...], np.dtype]:
    from dask_loom.loom._layers import LoomLayer, MemoryLoomLayer

    where = f"{ds.filename}: layer '{name}'"
    if isinstance(value, MemoryLoomLayer):
        value = value.values
    if isinstance(value, LoomLayer):
        value = value.to_dask()
    if isinstance(value, str):
        dt = check_dtype(value, where)
        if 0 in ds.shape:
            raise ValueError(f"{where}: cannot create an empty layer in a file without a main matrix")
        return None, ds.shape, dt
    if not (issparse(value) or hasattr(value, "dask")):
        value = np.asarray(value)
    if value.ndim != 2:
        raise ValueError(f"{where}: a layer must be 2-D, got shape {value.shape}")
    dt = check_dtype(value.dtype, where)
    shape = tuple(int(s) for s in value.shape)
    if ds.shape != (0, 0) and shape != ds.shape:
        others = [k for k in ds.layers.keys() if k != name]
        if name != "" or others:
            raise ValueError(f"{where}: all layers must have same shape {ds.shape}, got {shape}")
    return value, shape, dt


def create_layer_array(
    w: Any,
    path: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...],
    *,
    fill: bool = False,
    shards: Any = "auto",
    sample: Any = None,
) -> None:
    """Create a layer dataset with loompy's settings (gzip 2, columns resizable).

    In a ``.loom.zarr`` the layer is sharded: *shards* ``"auto"`` picks
    :func:`layer_shards` of the inner *chunks* (sized by what they store when
    a *sample* of the values is given), ``None`` writes it unsharded.
    """
    kw: dict[str, Any] = {}
    if is_zarr_writer(w):
        kw["shards"] = layer_shards(shape, dtype, chunks, sample=sample) if isinstance(shards, str) else shards
    w.create_array(
        path,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        maxshape=(shape[0], None),
        compression="gzip",
        compression_opts=2,
        fillvalue=0 if fill else None,
        **kw,
    )


def is_zarr_host(host: LayerHost) -> bool:
    """True when the connection behind *host* is a ``.loom.zarr``."""
    from dask_loom.loom._zarrtree import ZarrTree

    return isinstance(host.tree, ZarrTree)


def fill_layer(
    compute_kwargs: dict[str, Any], w: Any, path: str, value: Any, *, where: str, prefix: str = "loom-write"
) -> None:
    """Write *value* (numpy, sparse or dask) into the layer array *path* of the open write *w*.

    *compute_kwargs* (``scheduler``, ``client``) say where the graph runs.
    """
    store(value, LayerTarget.on(w, path, where, prefix=prefix), **compute_kwargs)


def write_layer(ds: LoomConnectionLike, name: str, value: Any, *, chunks: Any = None) -> None:
    """Create or replace a whole layer (``ds.layers[name] = value``), as one transaction."""
    host = ds.__dask_loom_layer_host__()
    host.check_writable()
    check_name("Layer", name, ds.filename, allow_empty=True)
    value, shape, dt = _prepare(ds, name, value)
    target = LayerTarget(
        ds,
        name,
        dtype=dt,
        chunks=default_chunks(shape, chunks, zarr=is_zarr_host(host)),
        shape=shape,
        sample=value,
    )
    if value is None:
        with target.transaction():
            pass  # a layer of zeros (the fill value): nothing to write
        return
    store(value, target, **host.compute_kwargs())


def write_layer_region(ds: LoomConnectionLike, name: str, key: Any, value: Any) -> None:
    """``ds.layers[name][rows, cols] = value`` with numpy (outer) semantics.

    Each band of whole stored chunks that the selection touches is read,
    updated in memory and written back once through the layer's target
    (:meth:`LayerTarget.on`), in the connection's write (a transaction unless
    ``dask_loom.atomic-writes`` is off).
    """
    host = ds.__dask_loom_layer_host__()
    host.check_writable()
    where = f"{ds.filename}: layer '{name}'"
    layer_shape = host.shape(name)
    dt = np.dtype(host.dtype(name))
    sels = normalize_key(key, layer_shape, where=where)
    target_shape = tuple(s.count for s in sels if s.kind != "int")
    values = np.broadcast_to(np.asarray(value), target_shape)
    check_values(values, where)
    full = values.reshape(tuple(s.count for s in sels))
    uniq_vals = full
    for ax, s in enumerate(sels):
        if s.kind == "array":
            # Last write wins for duplicated positions, as in numpy.
            last = np.zeros(len(s.unique), dtype=np.int64)
            last[s.inverse] = np.arange(len(s.inverse))
            uniq_vals = np.take(uniq_vals, last, axis=ax)
    path = layer_path(name)
    with host.writing() as w:
        # The layer's own target: the bands below are whole chunks, encoded as store() would.
        target = LayerTarget.on(w, path, where)
        per_axis = []
        for s, n, c in zip(sels, layer_shape, target.chunk_shape):
            pos = np.arange(s.start, s.stop) if s.kind in ("int", "range") else s.unique
            per_axis.append((pos, selection_bands(n, c, np.unique(pos // c), 64)))
        rows, cols = per_axis[0][0], per_axis[1][0]
        for b0r, b1r in per_axis[0][1]:
            ri = np.flatnonzero((rows >= b0r) & (rows < b1r))
            for b0c, b1c in per_axis[1][1]:
                ci = np.flatnonzero((cols >= b0c) & (cols < b1c))
                if not len(ri) or not len(ci):
                    continue
                region = (slice(b0r, b1r), slice(b0c, b1c))
                # Partly covered chunks: read, update in memory, write back whole.
                block = np.array(w.read(path, region), dtype=dt)
                block[np.ix_(rows[ri] - b0r, cols[ci] - b0c)] = uniq_vals[np.ix_(ri, ci)]
                target.write_block(region, block)
        touch(w, path)
