"""The connection as the rest of the Loom package sees it.

:class:`~dask_loom.loom.LoomConnection` is the façade: it creates the
managers (layers, attributes, graphs, views) and delegates its operations
(scan, aggregate, export, add_columns, writes) to the modules that implement
them.  Those modules need a connection but must not import its module (that
would be an import cycle, ``tests/test_architecture.py``): they name this
protocol instead.  It lists exactly the members they use, so it is also the
map of how tightly they are tied to the connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

    from dask_loom.loom._layerhost import LayerHost

__all__ = ["LoomConnectionLike"]


class LoomConnectionLike(Protocol):
    """What the managers and operations of :mod:`dask_loom.loom` use of a ``LoomConnection``."""

    filename: str
    # The managers (LayerManager, AttributeManager, GraphManager, ViewManager) are
    # typed loosely: their modules name this protocol, so naming them back here
    # would be a (type-only) import cycle.
    layers: Any
    ra: Any
    ca: Any
    attrs: Any
    row_graphs: Any
    col_graphs: Any
    view: Any

    @property
    def shape(self) -> tuple[int, int]: ...

    # All that ds.layers, each LoomLayer and the operations (scan, aggregate, layer writes,
    # permute, add_columns, add_loom, export, combine, convert, views, to_xarray,
    # to_anndata, info) use of the connection besides its public API; the private
    # members below are for the attribute and graph managers only.
    def __dask_loom_layer_host__(self) -> LayerHost: ...

    @property
    def mode(self) -> str: ...

    # -- attributes, global attributes, graphs
    def _attr_names(self, axis: int) -> list[str]: ...
    def _read_attr(self, axis: int, name: str) -> np.ndarray: ...
    def _write_attr(self, axis: int, name: str, value: Any) -> None: ...
    def _delete_attr(self, axis: int, name: str) -> None: ...
    def _global_names(self) -> list[str]: ...
    def _read_global(self, name: str) -> Any: ...
    def _write_global(self, name: str, value: Any) -> None: ...
    def _delete_global(self, name: str) -> None: ...
    def _graph_names(self, axis: int) -> list[str]: ...
    def _read_graph(self, axis: int, name: str) -> sp.coo_matrix: ...
    def _write_graph(self, axis: int, name: str, g: sp.coo_matrix) -> None: ...
    def _delete_graph(self, axis: int, name: str) -> None: ...
