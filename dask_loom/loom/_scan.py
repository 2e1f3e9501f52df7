"""``scan``: batches of rows or columns as views, read as graphs with read-ahead."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.delayed import Delayed, delayed

from dask_loom._config import get_config
from dask_loom.loom._layers import LayerManager, MemoryLoomLayer
from dask_loom.loom._view import LoomView
from dask_loom.ops._bandpool import BandPool
from dask_loom.ops._prefetch import prefetched
from dask_loom.ops._scan import band_reads, fill_band

if TYPE_CHECKING:
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["band_job", "scan"]

WHAT = ("col_attrs", "row_attrs", "layers", "col_graphs", "row_graphs")


def _assemble(
    names: list[str],
    shapes: list[tuple[int, ...]],
    dtypes: list[Any],
    places: list[list[Any]],
    axis: int,
    ordering: Any,
    selection: Any,
    pool: BandPool | None,
    *parts: Any,
) -> dict[str, np.ndarray]:
    out = {}
    it = iter(parts)
    for name, shape, dt, pl in zip(names, shapes, dtypes, places):
        # One task read the whole band (into a pooled buffer): no second copy.
        arr = fill_band(shape, dt, pl, [next(it) for _ in pl], pool)
        if ordering is not None:
            arr = arr[:, ordering] if axis == 0 else arr[ordering, :]
        if selection is not None:
            arr = arr[selection, :] if axis == 0 else arr[:, selection]
        out[name] = arr
    return out


def band_job(
    sources: list[Any],
    names: list[str],
    axis: int,
    start: int,
    stop: int,
    n_other: int,
    ordering: Any,
    selection: Any,
    *,
    pool: BandPool | None = None,
) -> Delayed:
    """One band ``[start, stop)`` along *axis* of several layers, as one ``Delayed`` dict.

    The band is read as ``dask_loom.scan`` reads any source's bands
    (:func:`dask_loom.ops._scan.band_reads`); *n_other* is the other axis's length.
    With *pool*, bands are decoded into its reused buffers.
    """
    parts, shapes, dtypes, places = band_reads(sources, axis, start, stop, prefix="loom-scan", pool=pool)
    # dask_key_name names the call's task (delayed's name= would only name the function object).
    return delayed(_assemble, pure=True)(
        names,
        shapes,
        dtypes,
        places,
        axis,
        ordering,
        selection,
        pool,
        *parts,
        dask_key_name=f"loom-batch-{parts[0].key[0].split('-')[-1]}-{start}",
    )


def scan(
    ds: LoomConnectionLike,
    *,
    items: Any = None,
    axis: int | None = None,
    layers: Iterable[str] | str | None = None,
    key: str | None = None,
    batch_size: int = 512,
    what: Iterable[str] = WHAT,
    prefetch: int | None = None,
    scheduler: Any = None,
    client: Any = None,
) -> Iterator[tuple[int, np.ndarray, LoomView]]:
    """Yield ``(ix, indexes, view)`` batches exactly as loompy's ``scan`` does.

    Bands start at multiples of *batch_size*; bands without selected items are
    skipped; ``indexes`` are absolute positions in *items* order (duplicates
    kept).  Unlike loompy, a band whose selection happens to have the band's
    width keeps the requested order (loompy then yields the band in natural
    order), and the other axis's attributes and graphs are shared by every
    view (sliced once, lazily), not copied per batch.  The next ``prefetch``
    bands (``dask_loom.scan-prefetch``, default 2) are read while the caller
    works on the current one.  Bands are decoded into a few reused buffers
    (:class:`~dask_loom.ops._bandpool.BandPool`), never into one the caller
    still refers to in any form: a view or array kept stays as it was.
    """
    what = list(what)
    if "layers" not in what:
        raise ValueError(
            "Layers must be included in 'what' parameter (but you can select specific layers using 'layers')"
        )
    unknown = set(what) - set(WHAT)
    if unknown:
        raise ValueError(f"Unknown items in 'what': {sorted(unknown)}; allowed: {list(WHAT)}")
    if axis is None:
        raise ValueError("Axis must be given (0 = rows, 1 = cols)")
    if axis not in (0, 1):
        raise ValueError("axis must be 0 or 1")
    host = ds.__dask_loom_layer_host__()  # all the scan uses of the connection besides its public API
    host.check_open()
    if layers is None:
        names = ds.layers.keys()
    elif isinstance(layers, str):
        names = [layers]
    else:
        names = list(layers)
    for n in names:
        if n not in ds.layers:
            raise KeyError(f"Layer '{n}' not found in {ds.filename}")
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch_size = int(batch_size)
    size = ds.shape[axis]
    other = ds.shape[1 - axis]
    if items is None:
        items = np.arange(size)
    elif isinstance(items, (int, np.integer)) and not isinstance(items, bool):
        if axis == 0:
            raise TypeError("An integer 'items' (start column) is only allowed with axis=1")
        items = np.arange(int(items), size)
    else:
        items = np.asarray(items)
        if items.dtype.kind == "b":
            if len(items) != size:
                raise ValueError(f"items mask has {len(items)} entries, expected {size}")
            items = np.flatnonzero(items)
        elif items.dtype.kind not in "iu" and items.size:
            raise TypeError(f"items must be integer indices or a bool mask, not {items.dtype}")
        items = items.astype(np.int64)
        if items.size and (items.min() < 0 or items.max() >= size):
            raise IndexError(f"{ds.filename}: items out of range for axis {axis} of size {size}")
    ordering = None
    if key is not None:
        attrs = ds.ra if axis == 1 else ds.ca
        ordering = np.argsort(attrs[key])  # numpy's default sort, as loompy (ties in the same order)
    other_index = ordering if ordering is not None else slice(None)
    # Shared by every batch: the other axis's attributes and graphs, sliced once.
    other_attrs = (ds.ra if axis == 1 else ds.ca)[other_index]
    other_graphs = (ds.row_graphs if axis == 1 else ds.col_graphs)[other_index]
    sources = [host.source(n) for n in names]
    bands: list[tuple[int, int, np.ndarray | None]] = []
    for ix in range(0, size, batch_size):
        stop = min(size, ix + batch_size)
        sel = items[(items >= ix) & (items < stop)] - ix
        if not len(sel):
            continue
        natural = len(sel) == stop - ix and np.array_equal(sel, np.arange(stop - ix))
        bands.append((ix, stop, None if natural else sel))
    depth = int(get_config("scan-prefetch") if prefetch is None else prefetch)
    # Bands held at once: the caller's, the read-ahead ones, the one being
    # decoded, one the caller is letting go of; more than that are allocated.
    pool = BandPool((depth + 3) * len(names))

    def jobs() -> Iterator[Any]:
        for ix, stop, sel in bands:
            yield lambda ix=ix, stop=stop, sel=sel: band_job(
                sources, names, axis, ix, stop, other, ordering, sel, pool=pool
            )

    kw = host.compute_kwargs()
    if scheduler is not None or client is not None:
        kw = {"scheduler": scheduler, "client": client}
    # Bands go to this process anyway: threads (no transfer between processes)
    # unless a cluster is given or configured.
    for (ix, stop, sel), arrays in zip(bands, prefetched(jobs(), depth=depth, **kw)):
        lm = LayerManager(None, {n: MemoryLoomLayer(n, arrays[n]) for n in names})
        index = np.arange(ix, stop) if sel is None else ix + sel
        own_attrs = (ds.ca if axis == 1 else ds.ra)[index if sel is not None else slice(ix, stop)]
        own_graphs = (ds.col_graphs if axis == 1 else ds.row_graphs)[
            index if sel is not None else slice(ix, stop)
        ]
        ra = (other_attrs if axis == 1 else own_attrs) if "row_attrs" in what else {}
        ca = (own_attrs if axis == 1 else other_attrs) if "col_attrs" in what else {}
        rg = (other_graphs if axis == 1 else own_graphs) if "row_graphs" in what else None
        cg = (own_graphs if axis == 1 else other_graphs) if "col_graphs" in what else None
        view = LoomView(lm, ra, ca, rg, cg, filename=ds.filename, file_attrs=ds.attrs)
        yield ix, index, view
