"""The loompy API over chunk-aligned task graphs."""

from dask_loom.loom._attrs import AttributeManager, GlobalAttributeManager
from dask_loom.loom._combine import combine, combine_faster
from dask_loom.loom._connection import LoomConnection, connect, new
from dask_loom.loom._create import create
from dask_loom.loom._graphs import GraphManager
from dask_loom.loom._layers import LayerManager, LoomLayer, MemoryLoomLayer
from dask_loom.loom._validator import LoomValidator
from dask_loom.loom._view import LoomView, ViewManager
from dask_loom.loom._write import LayerTarget

__all__ = [
    "AttributeManager",
    "GlobalAttributeManager",
    "GraphManager",
    "LayerManager",
    "LayerTarget",
    "LoomConnection",
    "LoomLayer",
    "LoomValidator",
    "LoomView",
    "MemoryLoomLayer",
    "ViewManager",
    "combine",
    "combine_faster",
    "connect",
    "create",
    "new",
]
