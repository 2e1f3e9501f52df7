"""The format-agnostic operations: ``dask_loom.map``, ``aggregate``, ``scan``, ``permute``.

Each accepts a Loom layer or connection, a ``ZarrArray``, a
``MappedCollection``, a ``TensorView``/``LazyTensorView``, a dask array or any
chunk source (ops._sources), checks its arguments against it before any task
runs, and runs one task graph named after the format (``loom-map``,
``zarr-aggregate``, ``h5ad-scan`` ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dask_loom.errors import OperationError, ReadOnlyError, UnsupportedDtypeError
from dask_loom.ops._sources import SourceInfo, resolve

__all__ = ["aggregate", "map", "permute", "scan"]

#: Functions ``aggregate`` computes (partial sums, so one pass whatever their number).
AGGREGATE_FUNCS = ("sum", "mean", "var", "std", "min", "max", "count_nonzero")
_FAST_GROUP = ("sum", "mean", "var", "std", "min", "max")  # also what the 2-D column path computes


def _compute_kw(info: SourceInfo, scheduler: Any, client: Any) -> dict[str, Any]:
    if scheduler is not None or client is not None:
        return {"scheduler": scheduler, "client": client}
    return dict(info.compute)


def _numbers(info: SourceInfo, what: str) -> None:
    if info.dtype.kind not in "biuf":
        raise UnsupportedDtypeError(f"{what}: {info.label} holds {info.dtype} values; it needs numbers")


def _nbytes(info: SourceInfo) -> int:
    return int(np.prod(info.source_shape, dtype=np.float64)) * info.dtype.itemsize


def map(
    x: Any,
    f_list: Sequence[Callable[[np.ndarray], Any] | str],
    *,
    axis: int = 0,
    chunksize: int = 1000,
    selection: Any = None,
    layer: str | None = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
    split_every: int = 8,
) -> list[np.ndarray]:
    """Apply functions along one axis of any chunked array: one value per index along *axis*.

    Like loompy's ``ds.map``, for arrays of any dimension: for each index
    along *axis*, each function reduces everything else (for a 2-D array and
    ``axis=0``, one value per row).  Recognised reductions — ``sum``, ``mean``,
    ``std``, ``var``, ``min``, ``max``, ``count_nonzero`` and their ``nan``
    variants, as numpy functions or names — share one blockwise pass of
    whole stored chunks with a tree reduction (CSR blocks stay sparse); any
    other function is called on each vector (the flattened values at one
    index, dense) on bands of about *chunksize* vectors.

    Parameters
    ----------
    x
        A ``LoomLayer`` or ``LoomConnection`` (its main layer, or *layer*), a
        ``ZarrArray``, a ``MappedCollection`` (its joined ``X`` or *layer*;
        rows are cells), a ``TensorView``/``LazyTensorView``, a dask array, or
        any :class:`~dask_loom.blocks.ChunkSource`.
    f_list
        Functions (or names), each returning a number for a vector.
    axis
        The axis whose indices get one value each.
    chunksize
        Vectors per band for per-vector functions (rounded to whole chunks).
    selection
        Bool mask or indices of the entries of the other axis to include
        (2-D arrays with one source only, as loompy's ``selection``).
    layer
        The layer of a connection or collection (default: the main matrix / ``X``).
    scheduler, client, progress
        Where the graph runs (default: the embedded thread pool, or a
        connection's own), and whether to show a progress bar.
    split_every
        Fan-in of the tree reduction.

    Returns
    -------
    list of numpy.ndarray
        One float64 array of length ``shape[axis]`` per function.

    Raises
    ------
    dask_loom.errors.UnsupportedSourceError
        *x* is not chunked storage (a numpy array, a list ...).
    dask_loom.errors.OperationError
        An axis *x* lacks, an unknown function name, *f_list* not a list.

    Examples
    --------
    >>> import numpy as np, dask.array as da, dask_loom
    >>> x = da.from_array(np.arange(24.0).reshape(2, 3, 4), chunks=(1, 2, 2))
    >>> mean, top = dask_loom.map(x, [np.mean, np.max], axis=1)
    >>> mean
    array([ 7.5, 11.5, 15.5])
    >>> top
    array([15., 19., 23.])
    >>> dask_loom.map(x, [lambda v: v[0]], axis=0)[0]
    array([ 0., 12.])
    """
    from dask_loom.ops._engine import map_graph_nd, run_graph, vector_graph
    from dask_loom.ops._kernels import recognise
    from dask_loom.ops._map import _empty_results, map_source

    what = "dask_loom.map"
    if not isinstance(f_list, (list, tuple)):
        raise OperationError(f"{what}: f_list must be a list of functions or names, not {type(f_list).__name__}")
    funcs = list(f_list)
    for f in funcs:
        if isinstance(f, str):
            if recognise(f) is None:
                raise OperationError(f"{what}: unknown function name {f!r}; names are {sorted(_names())}, or pass a callable")
        elif not callable(f):
            raise OperationError(f"{what}: {f!r} is neither a function nor a function name")
    info = resolve(x, layer=layer, what=what)
    sa = info.source_axis(axis, what)
    _numbers(info, what)
    kw = _compute_kw(info, scheduler, client)
    prefix = f"{info.format}-map"
    shape = info.source_shape
    if info.array is None and len(info.parts) == 1 and len(shape) == 2 and not info.sparse:
        # One 2-D source: the fused kernels over decoded chunks (Loom's map).
        return map_source(info.parts[0], funcs, axis=sa, chunksize=chunksize, selection=selection, prefix=prefix, split_every=split_every, progress=progress, **kw)
    if selection is not None:
        raise OperationError(f"{what}: selection= applies to a 2-D array of one file; {info.label} is not one (select with a view instead)")
    n_out = shape[sa]
    reduced = math.prod(s for d, s in enumerate(shape) if d != sa)
    if not funcs or n_out == 0 or reduced == 0:
        return _empty_results(funcs, n_out, info.dtype, None if reduced else np.empty(0, dtype=np.int64))
    reductions = [recognise(f) for f in funcs]
    if all(r is not None for r in reductions):
        dsk, outs, assemble = map_graph_nd(info, reductions, sa, prefix=prefix, split_every=split_every)  # type: ignore[arg-type]
        deps: tuple[Any, ...] = (info.array,) if info.array is not None else ()
    else:
        # names become their numpy functions: every function is called per vector here
        called = [getattr(np, r.name) if isinstance(f, str) and r is not None else f for f, r in zip(funcs, reductions)]
        dsk, outs, assemble, deps = vector_graph(info, called, sa, prefix=prefix, chunksize=chunksize)
    return assemble(run_graph(prefix, dsk, outs, dependencies=deps, progress=progress, nbytes=_nbytes(info), **kw))


def _names() -> list[str]:
    from dask_loom.ops._kernels import REDUCTIONS

    return list(REDUCTIONS)


def _group_labels(info: SourceInfo, labels: Any, n: int, axis: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, distinct labels)``: one code per index along *axis* (``-1``: left out)."""
    if isinstance(labels, str):
        if info.labels is None:
            raise OperationError(
                f"{what}: labels={labels!r} names an obs key, but {info.label} has no obs; pass one label per index along axis {axis}"
            )
        if axis != 0:
            raise OperationError(f"{what}: obs key {labels!r} labels the rows (cells) of {info.label}: use axis=0, not {axis}")
        codes, cats = info.labels(labels)
        codes = np.asarray(codes, dtype=np.int64)
        # categories no selected row has are no group (a count, not np.unique: no sort, no numpy.ma import)
        present = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(cats)))
        lut = np.full(len(cats), -1, dtype=np.int64)
        lut[present] = np.arange(len(present))
        return np.where(codes >= 0, lut[np.maximum(codes, 0)], -1), np.asarray(cats)[present]
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise OperationError(
            f"{what}: {info.label} has {n} entries along axis {axis}, but the labels have shape {arr.shape} (one label per entry)"
        )
    try:
        cats, codes = np.unique(arr, return_inverse=True)
    except TypeError as exc:
        raise OperationError(f"{what}: the labels for {info.label} cannot be sorted ({exc}); give labels of one type") from None
    return codes.ravel().astype(np.int64), cats


def aggregate(
    x: Any,
    labels: Any,
    *,
    axis: int = 1,
    func: str | Sequence[str] = "sum",
    return_labels: bool = False,
    layer: str | None = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
    split_every: int = 8,
) -> Any:
    """Group one axis of any chunked array by label and reduce each group.

    The result is a numpy array shaped like *x* with *axis* replaced by the
    sorted distinct labels.  For a ``MappedCollection``, *labels* may name an
    obs key (rows are cells, so ``axis=0``): pseudobulk,
    ``dask_loom.aggregate(mc, "cell_type", axis=0)``, with CSR files kept
    sparse (sparse one-hot products); rows whose label is missing are left
    out.  Several functions (``func=["sum", "mean"]``) share one pass.

    Parameters
    ----------
    x
        Anything :func:`dask_loom.map` accepts.
    labels
        One label per index along *axis* (any sortable values), or, for a
        collection, the name of an obs key.
    axis
        The axis grouped (default 1: the columns of a Loom layer).
    func
        ``"sum"``, ``"mean"``, ``"var"``, ``"std"`` (population, ``ddof=0``),
        ``"min"``, ``"max"``, ``"count_nonzero"``, or a list of them.
    return_labels
        Also return the sorted distinct labels (the result's order).
    layer, scheduler, client, progress, split_every
        As for :func:`dask_loom.map`.

    Returns
    -------
    numpy.ndarray or list of numpy.ndarray
        float64; a list (one per function) when *func* is a list; with
        *return_labels*, a tuple ``(result, labels)``.

    Raises
    ------
    dask_loom.errors.OperationError
        Labels of the wrong length, an unknown function, an obs key for an
        object without obs.

    Examples
    --------
    >>> import numpy as np, dask.array as da, dask_loom
    >>> x = da.from_array(np.arange(12.0).reshape(3, 4), chunks=2)
    >>> dask_loom.aggregate(x, ["b", "a", "b", "a"], axis=1, func="sum", return_labels=True)
    (array([[ 4.,  2.],
           [12., 10.],
           [20., 18.]]), array(['a', 'b'], dtype='<U1'))
    >>> dask_loom.aggregate(x, [0, 0, 1], axis=0, func=["mean", "max"])[1]
    array([[ 4.,  5.,  6.,  7.],
           [ 8.,  9., 10., 11.]])
    """
    from dask_loom.ops._aggregate import aggregate_columns
    from dask_loom.ops._engine import group_graph, run_graph

    what = "dask_loom.aggregate"
    funcs = [func] if isinstance(func, str) else list(func)
    bad = [f for f in funcs if f not in AGGREGATE_FUNCS]
    if bad or not funcs:
        raise OperationError(f"{what}: unknown function(s) {bad or func!r}; aggregate computes {list(AGGREGATE_FUNCS)}")
    info = resolve(x, layer=layer, what=what)
    sa = info.source_axis(axis, what)
    _numbers(info, what)
    axis = int(axis) % info.ndim
    codes, cats = _group_labels(info, labels, info.shape[axis], axis, what)
    n_groups = len(cats)
    shape = info.source_shape
    kw = _compute_kw(info, scheduler, client)
    prefix = f"{info.format}-aggregate"
    drop = bool((codes < 0).any())
    if n_groups == 0 or not math.prod(shape):
        results = [np.zeros(tuple(n_groups if d == sa else s for d, s in enumerate(shape))) for _ in funcs]
    elif info.array is None and len(info.parts) == 1 and len(shape) == 2 and sa == 1 and not info.sparse and len(funcs) == 1 and funcs[0] in _FAST_GROUP:
        # One 2-D source grouped by column: full-width row bands (blocks where too wide), group sums from the decoded chunks (Loom's aggregate).
        keep = np.flatnonzero(codes >= 0) if drop else None
        m = aggregate_columns(
            info.parts[0], codes if keep is None else codes[keep], n_groups, funcs[0], select=keep, prefix=prefix, progress=progress, **kw
        )
        results = [m]
    else:
        idx = np.where(codes < 0, n_groups, codes) if drop else codes
        dsk, outs, assemble = group_graph(info, idx, n_groups + drop, funcs, sa, prefix=prefix, split_every=split_every)
        deps = (info.array,) if info.array is not None else ()
        results = assemble(run_graph(prefix, dsk, outs, dependencies=deps, progress=progress, nbytes=_nbytes(info), **kw))
        if drop:
            results = [np.take(r, np.arange(n_groups), axis=sa) for r in results]
    results = [info.to_view(r) for r in results]
    out: Any = results if not isinstance(func, str) else results[0]
    return (out, cats) if return_labels else out


def scan(
    x: Any,
    *,
    axis: int = 0,
    batch_size: int = 512,
    sparse: bool = False,
    layer: str | None = None,
    prefetch: int | None = None,
    scheduler: Any = None,
    client: Any = None,
) -> Iterator[tuple[int, Any]]:
    """Iterate over bands of *batch_size* along *axis*: ``(start, block)``, read ahead.

    Each block is ``x[start:start + batch_size]`` along *axis* (everything
    else whole) as numpy; with ``sparse=True`` a 2-D block is a
    ``scipy.sparse.csr_matrix`` (CSR files are never densified, a collection's
    files are joined).  The next ``prefetch`` bands (``dask_loom.scan-prefetch``,
    default 2) are read while the caller works on the current one.

    Parameters
    ----------
    x
        Anything :func:`dask_loom.map` accepts.
    axis
        The axis cut into bands.
    batch_size
        Indices per band (the last band may be shorter).
    sparse
        Blocks as CSR (2-D only).
    layer, scheduler, client
        As for :func:`dask_loom.map`.
    prefetch
        Bands read ahead.

    Yields
    ------
    tuple of (int, numpy.ndarray or scipy.sparse.csr_matrix)

    Examples
    --------
    >>> import numpy as np, dask.array as da, dask_loom
    >>> x = da.from_array(np.arange(10).reshape(5, 2), chunks=2)
    >>> [(start, b.tolist()) for start, b in dask_loom.scan(x, batch_size=2)]
    [(0, [[0, 1], [2, 3]]), (2, [[4, 5], [6, 7]]), (4, [[8, 9]])]
    """
    from dask_loom.ops._scan import scan_info

    what = "dask_loom.scan"
    info = resolve(x, layer=layer, what=what)
    sa = info.source_axis(axis, what)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or int(batch_size) <= 0:
        raise OperationError(f"{what}: batch_size must be a positive integer, not {batch_size!r} ({info.label})")
    if sparse and info.ndim != 2:
        raise OperationError(f"{what}: sparse=True gives CSR matrices, which are 2-D; {info.label} has shape {info.shape}")
    kw = _compute_kw(info, scheduler, client)
    return scan_info(info, sa, batch_size=int(batch_size), sparse=bool(sparse), prefetch=prefetch, **kw)


def permute(
    x: Any, ordering: Any, *, axis: int, layer: str | None = None, scheduler: Any = None, client: Any = None
) -> None:
    """Reorder *x* along *axis* in place, as a transaction: ``x_new[..., i, ...] = x_old[..., ordering[i], ...]``.

    Writable sources only: a Loom connection or layer (every layer, row or
    column attribute and graph of the file, as ``ds.permute``; a layer stands
    for its file) and Zarr arrays.  The permuted data are written beside the
    old ones and swapped in at the end, so a crash leaves the old or the new
    order, whole.

    Parameters
    ----------
    x
        A writable ``LoomConnection``/``LoomLayer`` or ``ZarrArray``.
    ordering
        A permutation of ``range(shape[axis])``.
    axis
        The axis reordered.
    layer
        Accepted for symmetry: a Loom file is permuted whole whichever layer is named.
    scheduler, client
        Where the graph runs (default: the embedded thread pool, or a connection's own).

    Raises
    ------
    dask_loom.errors.ReadOnlyError
        *x* is read-only (opened with ``mode="r"``, a collection, an image ...).
    dask_loom.errors.OperationError
        *ordering* is not a permutation of the axis.

    Examples
    --------
    >>> import numpy as np, zarr, dask_loom
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> zarr.create_array(s, name="x", shape=(3, 4), chunks=(2, 2), dtype="i4")[:] = np.arange(12).reshape(3, 4)
    >>> a = dask_loom.open_zarr(s, "x")
    >>> dask_loom.permute(a, [2, 0, 1], axis=0)
    >>> a.to_dask().compute().tolist()
    [[8, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7]]
    """
    what = "dask_loom.permute"
    info = resolve(x, layer=layer, what=what)
    sa = info.source_axis(axis, what)
    if info.permute is None:
        raise ReadOnlyError(f"{what}: {info.label} cannot be permuted in place: {info.read_only}")
    n = info.shape[int(axis) % info.ndim]
    order = np.asarray(ordering)
    if order.ndim != 1 or order.dtype.kind not in "iu" or len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        raise OperationError(
            f"{what}: the ordering for {info.label} must be a permutation of 0..{n - 1} along axis {axis} "
            f"(got {order.size} values of dtype {order.dtype}, shape {order.shape})"
        )
    info.permute(order.astype(np.int64), sa, scheduler=scheduler, client=client)

