"""Whole-file rewrites and growth: ``permute``, ``add_columns``, ``add_loom``, ``export`` (``combine`` is in ``_combine``).

Every operation here is one transaction (``Tree.writing(atomic=True)``):
the result appears at the end all at once, or not at all.  Data move in
bands of whole stored chunks: every layer is written by :func:`dask_loom.store`
into the layer's chunk target (:class:`~dask_loom.loom._write.LayerTarget`),
whose tasks encode the chunks in parallel while the single writer stores them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._lazy import issparse
from dask_loom.blocks import from_source, plan_blocks, store
from dask_loom.blocks._readahead import read_ahead
from dask_loom.loom._attrs import hold_in_memory
from dask_loom.loom._common import AXIS_ATTRS, AXIS_GRAPHS
from dask_loom.loom._layerhost import LayerHost, layer_path
from dask_loom.loom._layers import as_layer_dict
from dask_loom.loom._store import init_layout, put_attr, put_graph, touch
from dask_loom.loom._write import (
    LayerTarget,
    check_dtype,
    check_values,
    create_layer_array,
    default_chunks,
    is_zarr_writer,
)
from dask_loom.ops._graph import task_name
from dask_loom.ops._map import nbytes_of, read_into_buffer

if TYPE_CHECKING:
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["add_columns", "add_loom", "export", "permute"]


def _host(ds: LoomConnectionLike) -> LayerHost:
    # All these operations use of the connection besides its public API.
    return ds.__dask_loom_layer_host__()


# --- permute ---------------------------------------------------------------------------------


class _PermutedSource:
    """A layer read in a new order along one axis: a chunk source (task prefix ``loom-permute``).

    Blocks are bands spanning the permuted axis whole, so every stored chunk
    is read once; the reordered band goes to the new layer's target.  With
    ``gather=False`` a block is the band in the old order, and the write task
    gathers it while cutting it into chunks (:class:`_PermutingTarget`).
    """

    prefix = "loom-permute"

    def __init__(self, source: Any, ordering: np.ndarray, axis: int, *, gather: bool = True) -> None:
        self.source = source
        self.ordering = ordering
        self.axis = axis
        self.gather = gather
        self.shape = tuple(source.shape)
        self.dtype = source.dtype
        self.chunk_shape = tuple(source.chunk_shape)
        self.label = getattr(source, "label", "the layer")

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("PermutedSource", tokenize(self.source), tokenize(self.ordering), self.axis, self.gather)

    def read_block(self, region: tuple[slice, ...]) -> np.ndarray:
        full = (
            (region[0], slice(0, self.shape[1])) if self.axis == 1 else (slice(0, self.shape[0]), region[1])
        )
        if not self.gather:  # a fresh array: it travels to the write task
            return read_ahead(self.source, full)
        # np.take, not fancy indexing: 2.5 against 8.6 ns an element for a column
        # gather of a full-width float32 band (3.4x, the largest cost of a permute).
        band = read_into_buffer(self.source, full)
        return np.take(band, self.ordering[region[self.axis]], axis=self.axis)


class _PermutingTarget:
    """A layer target fed bands in the old order: each write task gathers its band while cutting chunks.

    The gather and the cut are one pass over the band (the compiled
    ``gather_cut``) instead of ``np.take`` writing a reordered copy that the
    encoder then reads again.  Only for blocks spanning the permuted axis whole.
    """

    def __init__(self, target: Any, ordering: np.ndarray, axis: int) -> None:
        self.target = target
        self.ordering = ordering
        self.axis = axis
        self.shape = target.shape
        self.dtype = target.dtype
        self.chunk_shape = target.chunk_shape
        self.prefix = target.prefix
        self.label = target.label

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return ("PermutingTarget", tokenize(self.target), tokenize(self.ordering), self.axis)

    def encode_block(self, region: tuple[slice, ...], data: Any) -> Any:
        return self.target.encode_gathered(region, data, self.ordering, self.axis)

    def store_payload(self, payload: Any) -> None:
        self.target.store_payload(payload)

    def transaction(self) -> Any:
        return self.target.transaction()


def _copy_layer_permuted(
    ds: Any, w: Any, name: str, path: str, ordering: np.ndarray | None, axis: int
) -> None:
    src = _host(ds).source(name)
    info = _host(ds).info(name)
    shape = tuple(info.shape)
    chunks = info.inner_chunks or (tuple(info.chunks) if info.chunks else default_chunks(shape))
    create_layer_array(w, path, shape, info.dtype, chunks, sample=ds.layers[name])
    target = LayerTarget.on(w, path, f"{ds.filename}: layer '{name}'")
    if ordering is None:
        ordering = np.arange(shape[axis])
    # Full-width row bands for a column permutation (and vice versa): every
    # stored chunk is read once and written once, memory is one band per worker.
    unit = tuple(int(np.lcm(a, b)) for a, b in zip(src.chunk_shape, target.chunk_shape))  # whole in both
    plan = plan_blocks(shape, unit, np.dtype(info.dtype).itemsize, band_axis=0 if axis == 1 else 1)
    # Bands whose blocks span the permuted axis whole are gathered in the write task.
    whole = len(plan[axis]) == 1
    x = from_source(_PermutedSource(src, ordering, axis, gather=not whole), chunks=plan)
    store(x, _PermutingTarget(target, ordering, axis) if whole else target, **_host(ds).compute_kwargs())


def _global_items(ds: Any) -> dict[str, Any]:
    # CreationDate is kept: permuting a file does not create it (loompy permutes in place).
    return {k: ds.attrs[k] for k in ds.attrs.keys() if k != "LOOM_SPEC_VERSION"}


def _put_attr_any(w: Any, axis: int, name: str, values: np.ndarray, *, n: int) -> None:
    if values.dtype.names is not None:  # compound attributes are copied as stored
        w.create_group(AXIS_ATTRS[axis])
        w.create_array(f"{AXIS_ATTRS[axis]}/{name}", data=values, compression="gzip", compression_opts=2)
        return
    put_attr(w, axis, name, values, n=n, stamp=False)


def permute(ds: LoomConnectionLike, ordering: Any, axis: int) -> None:
    """Permute every layer, attribute and graph along *axis*, out of core and crash-safe.

    The permuted file is written beside the old one (memory bounded by one
    band per worker) and replaces it by one atomic rename at the end: a
    process killed at any moment leaves a valid file in either the old or the
    new order.  *ordering* must be a permutation of ``range(shape[axis])``.
    """
    _host(ds).check_writable()
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, not {axis!r}")
    n = ds.shape[axis]
    order = np.asarray(ordering).ravel()
    if order.dtype.kind not in "iu" or len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(
            f"{ds.filename}: ordering must be a permutation of 0..{n - 1} (got {len(order)} values of dtype {order.dtype})"
        )
    order = order.astype(np.int64)
    globals_ = _global_items(ds)
    attrs = [{k: ds.ra[k] for k in ds.ra.keys()}, {k: ds.ca[k] for k in ds.ca.keys()}]
    graphs = [
        {k: ds.row_graphs[k] for k in ds.row_graphs.keys()},
        {k: ds.col_graphs[k] for k in ds.col_graphs.keys()},
    ]
    from dask_loom.loom._graphs import slice_graph

    with _host(ds).writing(atomic=True, fresh=True) as w:
        init_layout(w, globals_)
        for name in ds.layers.keys():
            _copy_layer_permuted(ds, w, name, layer_path(name), order, axis)
        for ax in (0, 1):
            for k, v in attrs[ax].items():
                _put_attr_any(w, ax, k, v[order] if ax == axis else v, n=ds.shape[ax])
            for k, g in graphs[ax].items():
                put_graph(w, ax, k, slice_graph(g, order, n) if ax == axis else g, stamp=False)
        touch(w, AXIS_ATTRS[axis], AXIS_GRAPHS[axis])
    _host(ds).refresh()
    _host(ds).reopen()


# --- export ------------------------------------------------------------------------------------


def _format_rows(rows: np.ndarray, prefixes: list[str]) -> str:
    return "".join(p + "".join(str(v) + "\t" for v in row) + "\n" for p, row in zip(prefixes, rows))


def export(
    ds: LoomConnectionLike, out_file: str | os.PathLike[str], layer: str | None = None, format: str = "tab"
) -> None:
    """Write a layer with its row and column attributes as tab-separated text, byte-identical to loompy.

    Streamed: row bands are read and formatted by tasks, two ahead of the
    writer, into a temporary file renamed at the end.
    """
    from dask import delayed

    from dask_loom.ops._prefetch import prefetched

    if format != "tab":
        raise ValueError(f"export format {format!r} is not supported; only 'tab' is")
    _host(ds).check_open()
    src = _host(ds).source("" if layer is None else layer)
    ra_keys, ca_keys = ds.ra.keys(), ds.ca.keys()
    ra = [ds.ra[k] for k in ra_keys]
    n, m = ds.shape
    bands = plan_blocks((n, m), src.chunk_shape, np.dtype(src.dtype).itemsize, band_axis=0)[0]
    bounds = np.cumsum((0, *bands))
    format_band = delayed(_format_band, pure=True)

    def job(r0: int, r1: int) -> Any:
        prefixes = ["".join(str(a[i]) + "\t" for a in ra) + "\t" for i in range(r0, r1)]
        return format_band(src, r0, r1, m, prefixes, dask_key_name=task_name("loom-export", src, r0, r1))

    out_file = os.fspath(out_file)
    tmp = out_file + ".dask-loom.tmp"
    try:
        with open(tmp, "w") as f:
            for k in ca_keys:
                f.write("\t" * len(ra_keys) + k + "\t" + "".join(str(v) + "\t" for v in ds.ca[k]) + "\n")
            f.write("".join(k + "\t" for k in ra_keys) + "\t" + "\t" * m + "\n")
            jobs = (lambda a=int(a), b=int(b): job(a, b) for a, b in itertools.pairwise(bounds) if b > a)
            for text in prefetched(jobs, depth=2, nbytes=nbytes_of(src), **_host(ds).compute_kwargs()):
                f.write(text)
        os.replace(tmp, out_file)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _format_band(src: Any, r0: int, r1: int, m: int, prefixes: list[str]) -> str:
    band = src.read_block((slice(r0, r1), slice(0, m)))
    return _format_rows(band, prefixes)


# --- growing a file: add_columns / add_loom -----------------------------------------------------


def _is_dask(x: Any) -> bool:
    import dask

    return dask.is_dask_collection(x) and hasattr(x, "chunks")


def _as_input(v: Any) -> Any:
    return v if issparse(v) or _is_dask(v) else np.asarray(v)


def _take_rows(block: np.ndarray, order: np.ndarray) -> np.ndarray:
    return block[order]


def _append_columns(ds: Any, w: Any, path: str, start: int, x: Any, where: str) -> None:
    """Write *x* (numpy, scipy.sparse or dask; every row) at columns ``start…`` of the grown layer *path*.

    A chunk column that already holds columns (*start* not on a chunk
    boundary) is read, completed with the first new columns and written back
    whole; the rest goes to :func:`dask_loom.store` as whole chunks.
    """
    target = LayerTarget.on(w, path, where)
    n_rows, n_new = (int(v) for v in x.shape)
    cw = target.chunk_shape[1]
    c0 = start // cw * cw
    if start > c0 and n_new:
        k = min(c0 + cw - start, n_new)
        first = x[:, :k]
        if _is_dask(first):
            from dask_loom.cluster import compute

            first = compute(first, **_host(ds).compute_kwargs())[0]
        first = first.toarray() if issparse(first) else np.asarray(first)
        head = np.asarray(w.read(path, (slice(None), slice(c0, start))))
        block = np.concatenate(
            [head.astype(target.dtype, copy=False), first.astype(target.dtype, copy=False)], axis=1
        )
        target.write_block((slice(0, n_rows), slice(c0, start + k)), block)
        x = x[:, k:]
        start += k
    if x.shape[1]:
        if _is_dask(x):
            # Full-height column bands of whole chunks (from here on, start is a chunk boundary).
            x = x.rechunk(plan_blocks(tuple(x.shape), target.chunk_shape, target.dtype.itemsize, band_axis=1))
        store(x, target, at=(0, start), **_host(ds).compute_kwargs())


def _fill_for(values: np.ndarray, n: int, fill: Any) -> np.ndarray:
    if fill is None:
        fill = "" if values.dtype.kind in "OUS" else np.zeros(1, values.dtype)[0]
    return np.full((n, *values.shape[1:]), fill, dtype=values.dtype if values.dtype.kind != "U" else object)


def _merge_col_attrs(
    ds: Any, incoming: dict[str, np.ndarray], n_new: int, fill_values: Any
) -> dict[str, np.ndarray]:
    """The column attributes after appending *n_new* columns (loompy's rules)."""
    out: dict[str, np.ndarray] = {}
    existing = {k: ds.ca[k] for k in ds.ca.keys()}
    for k, old in existing.items():
        new = incoming.get(k)
        if new is None:
            if fill_values is None:
                continue  # not supplied: dropped from the file, as loompy does
            fv = fill_values.get(k) if isinstance(fill_values, dict) else None
            if isinstance(fill_values, dict) and k not in fill_values:
                continue
            new = _fill_for(old, n_new, fv)
        new = np.asarray(new)
        if new.shape[1:] != old.shape[1:]:
            continue  # mismatched trailing dimensions: deleted, as loompy does
        if old.dtype.kind in "OUS" or new.dtype.kind in "OUS":
            out[k] = np.concatenate([old.astype(object), new.astype(str).astype(object)])
        else:
            out[k] = np.concatenate([old, new.astype(np.result_type(old.dtype, new.dtype))])
    if ds.shape[1] == 0:
        for k, v in incoming.items():
            out[k] = np.asarray(v)
    return out


def _check_append(ds: Any, names: list[str], n_rows: int, where: str) -> None:
    if ds.shape == (0, 0):
        return
    have = set(ds.layers.keys())
    missing = have - set(names)
    extra = set(names) - have
    if missing:
        raise KeyError(f"{where}: every layer must be supplied; missing {sorted(missing)}")
    if extra:
        raise KeyError(f"{where}: layers {sorted(extra)} do not exist in the file")
    if n_rows != ds.shape[0]:
        raise ValueError(f"{where}: the new columns have {n_rows} rows, the file has {ds.shape[0]}")


def _append(
    ds: Any,
    layer_values: dict[str, Any],
    dtypes: dict[str, Any],
    n_rows: int,
    n_new: int,
    col_attrs: dict[str, np.ndarray],
    row_attrs: dict[str, np.ndarray] | None,
    *,
    col_graphs: dict[str, Any] | None = None,
    globals_set: dict[str, Any] | None = None,
    globals_del: Iterable[str] = (),
) -> None:
    """Append *n_new* columns to every layer (numpy, scipy.sparse or dask, ``(n_rows, n_new)``) and rewrite the column attributes, atomically."""
    from dask_loom.loom._store import put_global

    old_m = ds.shape[1]
    empty = ds.shape == (0, 0)
    where = ds.filename
    with _host(ds).writing(atomic=True) as w:
        for name, value in layer_values.items():
            path = layer_path(name)
            if tuple(value.shape) != (n_rows, n_new):
                raise ValueError(
                    f"{where}: layer '{name}' brings shape {tuple(value.shape)}, expected {(n_rows, n_new)}"
                )
            if empty:
                dt = check_dtype(dtypes[name], f"{where}: layer '{name}'")
                create_layer_array(
                    w, path, (n_rows, 0), dt, default_chunks((n_rows, max(64, n_new)), zarr=is_zarr_writer(w))
                )
            try:
                w.resize(path, (n_rows, old_m + n_new))
            except (TypeError, ValueError, OSError) as exc:
                raise ValueError(
                    f"{where}: layer '{name}' cannot grow along columns (fixed maximum shape): {exc}"
                ) from None
            _append_columns(ds, w, path, old_m, value, f"{where}: layer '{name}'")
        if row_attrs:
            for k, v in row_attrs.items():
                put_attr(w, 0, k, v, n=n_rows, stamp=False)
        for k in list(w.children("col_attrs")):
            if k not in col_attrs:
                w.delete(f"col_attrs/{k}")
        for k, v in col_attrs.items():
            _put_attr_any(w, 1, k, np.asarray(v), n=old_m + n_new)
        for k, g in (col_graphs or {}).items():
            put_graph(w, 1, k, g, stamp=False)
        in_group = w.is_group("attrs")
        for k, v in (globals_set or {}).items():
            put_global(w, k, v, in_group=in_group)
        for k in globals_del:
            if in_group:
                w.delete(f"attrs/{k}")
            else:
                w.del_attr("/", k)
        touch(w, "col_attrs", *(layer_path(n) for n in layer_values))
    _host(ds).refresh()
    _host(ds).reopen()


def add_columns(
    ds: LoomConnectionLike,
    layers: Any,
    col_attrs: dict[str, Any],
    *,
    row_attrs: dict[str, Any] | None = None,
    fill_values: Any = None,
) -> None:
    """Append columns (all layers at once) and their attributes, all-or-nothing."""
    _host(ds).check_writable()
    # numpy and sparse columns are in memory, as in loompy; dask columns stay lazy
    # (their NaN/Inf check runs in the write's tasks).
    lay = {k: _as_input(v) for k, v in as_layer_dict(layers).items()}
    where = ds.filename
    if "" not in lay and ds.shape == (0, 0):
        raise ValueError(f"{where}: the main matrix (layer '') must be supplied")
    shapes = {k: v.shape for k, v in lay.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: all supplied layers must have the same shape, got {shapes}")
    n_rows, n_new = next(iter(shapes.values()))
    _check_append(ds, list(lay), n_rows, where)
    if ds.shape == (0, 0) and not row_attrs:
        raise ValueError(f"{where}: row_attrs must be given when adding columns to an empty file")
    col_attrs = {k: np.asarray(v) for k, v in (col_attrs or {}).items()}
    for k, v in col_attrs.items():
        if v.shape[0] != n_new:
            raise ValueError(
                f"{where}: column attribute '{k}' has {v.shape[0]} values for {n_new} new columns"
            )
    for k, v in lay.items():
        if not _is_dask(v):
            check_values(v, f"{where}: layer '{k}'")
    merged = _merge_col_attrs(ds, col_attrs, n_new, fill_values)
    if ds.shape != (0, 0) and fill_values is None:
        merged = {k: v for k, v in merged.items() if k in col_attrs}
    ra = None
    if ds.shape == (0, 0):
        ra = {k: np.asarray(v) for k, v in (row_attrs or {}).items()}
        for k, v in ra.items():
            if v.shape[0] != n_rows:
                raise ValueError(f"{where}: row attribute '{k}' has {v.shape[0]} values, expected {n_rows}")
    _append(ds, lay, {k: v.dtype for k, v in lay.items()}, n_rows, n_new, merged, ra)


def add_loom(
    ds: LoomConnectionLike,
    other: LoomConnectionLike,
    key: str | None = None,
    fill_values: Any = None,
    batch_size: int = 1000,
    convert_attrs: bool = False,
    include_graphs: bool = False,
) -> None:
    """Append the columns of another Loom file, open read-only (*other*, never modified), atomically.

    Rows are matched on the row attribute *key* when given.  Every layer of
    this file must exist in the other; its extra layers are ignored.  With
    *convert_attrs*, global attributes that differ become constant column
    attributes of the combined file (the other file is not touched, unlike
    loompy).  With *include_graphs*, column graphs present in both files are
    joined block-diagonally (loompy raises a shape error).  *batch_size* is
    accepted as loompy's; columns move in blocks of whole stored chunks
    (``dask_loom.block-size``), written through :func:`dask_loom.store`.
    """
    import scipy.sparse as sp

    _host(ds).check_writable()
    where = f"{ds.filename} + {other.filename}"
    if ds.shape != (0, 0) and other.shape[0] != ds.shape[0]:
        raise ValueError(f"{where}: the files have {ds.shape[0]} and {other.shape[0]} rows")
    names = ds.layers.keys() if ds.shape != (0, 0) else other.layers.keys()
    for n in names:
        if n not in other.layers:
            raise ValueError(f"{where}: layer '{n}' is missing from {other.filename}")
    row_order = None
    if key is not None:
        mine, theirs = np.asarray(ds.ra[key]), np.asarray(other.ra[key])
        if not np.array_equal(np.sort(mine), np.sort(theirs)):
            raise ValueError(f"{where}: the values of row attribute '{key}' differ between the files")
        row_order = np.argsort(theirs, kind="stable")[
            np.argsort(np.argsort(mine, kind="stable"), kind="stable")
        ]
    m2 = other.shape[1]
    incoming = {k: other.ca[k] for k in other.ca.keys()}
    globals_set: dict[str, Any] = {}
    globals_del: list[str] = []
    if convert_attrs:
        for k in sorted(set(ds.attrs.keys()) | set(other.attrs.keys())):
            if k in ("LOOM_SPEC_VERSION", "CreationDate", "last_modified"):
                continue
            a, b = ds.attrs.get(k), other.attrs.get(k)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or a != b:
                if k in ds.ca or k in incoming:
                    continue
                incoming[k] = (
                    np.array([b] * m2, dtype=object if isinstance(b, str) or b is None else None)
                    if b is not None
                    else np.array([""] * m2, dtype=object)
                )
                mine_vals = (
                    np.array([a] * ds.shape[1], dtype=object if isinstance(a, str) or a is None else None)
                    if a is not None
                    else np.array([""] * ds.shape[1], dtype=object)
                )
                hold_in_memory(ds.ca, k, mine_vals)
                if k in ds.attrs:
                    globals_del.append(k)
    merged = _merge_col_attrs(ds, incoming, m2, fill_values)
    if fill_values is None and ds.shape != (0, 0):
        merged = {k: v for k, v in merged.items() if k in incoming}
    graphs = None
    if include_graphs:
        graphs = {}
        for g in ds.col_graphs.keys():
            if g in other.col_graphs.keys():
                graphs[g] = sp.block_diag([ds.col_graphs[g], other.col_graphs[g]], format="coo")

    def columns(layer: str) -> Any:
        # The other file's layer, lazily, in full-height column bands of whole chunks (rows reordered per band).
        x = from_source(_host(other).source(layer), band_axis=1)
        if row_order is not None:
            x = x.map_blocks(functools.partial(_take_rows, order=row_order), dtype=x.dtype)
        return x

    ra = None
    if ds.shape == (0, 0):
        ra = {k: other.ra[k] for k in other.ra.keys()}
    _append(
        ds,
        {n: columns(n) for n in names},
        {n: _host(other).dtype(n) for n in names},
        other.shape[0],
        m2,
        merged,
        ra,
        col_graphs=graphs,
        globals_set=globals_set,
        globals_del=globals_del,
    )
