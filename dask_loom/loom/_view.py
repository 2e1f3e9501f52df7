"""``ds.view[rows, cols]``: in-memory views with layers, attributes and graphs sliced."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.loom._attrs import AttributeManager, GlobalAttributeManager
from dask_loom.loom._graphs import GraphManager
from dask_loom.loom._layers import LayerManager, MemoryLoomLayer

if TYPE_CHECKING:
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["LoomView", "ViewManager"]


class LoomView:
    """A slice of a Loom file held in memory, with loompy's ``LoomView`` API.

    Layers are read eagerly (every layer's selection in one graph); attributes
    and graphs are sliced lazily, on first access, and share the parent's
    cached values.
    """

    def __init__(
        self,
        layers: LayerManager,
        row_attrs: AttributeManager | dict,
        col_attrs: AttributeManager | dict,
        row_graphs: GraphManager | None,
        col_graphs: GraphManager | None,
        *,
        filename: str,
        file_attrs: GlobalAttributeManager | None,
    ) -> None:
        self.filename = filename
        self.layers = self.layer = layers
        self.ra = self.row_attrs = row_attrs
        self.ca = self.col_attrs = col_attrs
        self.row_graphs = row_graphs
        self.col_graphs = col_graphs
        self.attrs = file_attrs
        first = next(iter(layers.keys()), None)
        self.shape = layers[first].shape if first is not None else (0, 0)

    @property
    def view(self) -> ViewManager:
        """``view.view[rows, cols]``: a view of the view.

        Made on access rather than held: a held manager referring back to the
        view would make a reference cycle, and a scan's band (tens of MB)
        would then wait for the cyclic garbage collector instead of being
        freed, or reused, as soon as the caller drops the view.
        """
        return ViewManager(self)

    def __getitem__(self, thing: Any) -> Any:
        if isinstance(thing, str):
            return self.layers[thing]
        return self.layers[""][thing]

    def permute(self, ordering: np.ndarray, *, axis: int) -> None:
        """Permute the view in memory along *axis* (layers, attributes and graphs)."""
        ordering = np.asarray(ordering)
        self.layers._permute(ordering, axis=axis)
        attrs = self.ra if axis == 0 else self.ca
        if isinstance(attrs, AttributeManager):
            attrs._permute(ordering)
        graphs = self.row_graphs if axis == 0 else self.col_graphs
        if graphs is not None:
            graphs._permute(ordering)
        first = next(iter(self.layers.keys()), None)
        self.shape = self.layers[first].shape if first is not None else self.shape

    def __repr__(self) -> str:
        return f"<LoomView of {self.filename} shape={self.shape} layers={self.layers.keys()}>"


class ViewManager:
    """``ds.view``: index with ``[rows, cols]`` to get a :class:`LoomView`."""

    def __init__(self, ds: LoomConnectionLike | LoomView) -> None:
        self.ds = ds

    def __getitem__(self, key: Any) -> LoomView:
        if not isinstance(key, tuple) or len(key) != 2:
            raise ValueError("Slice must be a 2-tuple")
        rows, cols = key
        ds = self.ds
        if isinstance(ds, LoomView):
            layers = LayerManager(
                None, {k: MemoryLoomLayer(k, ds.layers[k][rows, cols]) for k in ds.layers.keys()}
            )
        else:
            arrays = ds.__dask_loom_layer_host__().read(ds.layers.keys(), (rows, cols))
            layers = LayerManager(None, {k: MemoryLoomLayer(k, v) for k, v in arrays.items()})
        r = _as_index(rows)
        c = _as_index(cols)
        return LoomView(
            layers,
            ds.ra[r],
            ds.ca[c],
            ds.row_graphs[r] if ds.row_graphs is not None else None,
            ds.col_graphs[c] if ds.col_graphs is not None else None,
            filename=ds.filename,
            file_attrs=ds.attrs,
        )


def _as_index(thing: Any) -> Any:
    if isinstance(thing, list):
        return np.asarray(thing)
    if isinstance(thing, (int, np.integer)):
        return slice(int(thing), int(thing) + 1) if int(thing) != -1 else slice(-1, None)
    return thing
