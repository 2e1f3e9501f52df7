"""dask_loom: Loom, AnnData collections, Zarr and OME-Arrow as chunk-aligned dask arrays.

``import dask_loom as loompy`` runs existing loompy code; every layer is also
a lazy dask array whose blocks are whole stored chunks, and operations run as
task graphs on dask's threaded scheduler or a ``dask.distributed`` cluster.
"""

from importlib.metadata import PackageNotFoundError, version

from dask_loom import _config
from dask_loom.anndata import MappedCollection, MappedIterableDataset
from dask_loom.blocks import from_source, plan_blocks
from dask_loom.loom import (
    AttributeManager,
    GlobalAttributeManager,
    GraphManager,
    LayerManager,
    LoomConnection,
    LoomLayer,
    LoomValidator,
    LoomView,
    MemoryLoomLayer,
    ViewManager,
    _zarrtree,  # registers .loom.zarr containers with connect/new/create
    combine,
    combine_faster,
    connect,
    create,
    new,
)
from dask_loom.loom._convert import convert
from dask_loom.ome import (
    LazyTensorView,
    TensorView,
    convert_to_ome_arrow,
    ome_tiff_to_ome_arrow,
    ome_zarr_to_ome_arrow,
    open_ome_arrow,
    read_ome_tiff,
    read_ome_zarr,
    to_ome_arrow,
    to_ome_parquet,
    write_ome_arrow_dataset,
)
from dask_loom.zarr import ZarrArray, ZarrGroup, ZarrNode, open_zarr, to_zarr

try:
    __version__ = version("dask_loom")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = (
    "AttributeManager",
    "GlobalAttributeManager",
    "GraphManager",
    "LayerManager",
    "LazyTensorView",
    "LoomConnection",
    "LoomLayer",
    "LoomValidator",
    "LoomView",
    "MappedCollection",
    "MappedIterableDataset",
    "MemoryLoomLayer",
    "TensorView",
    "ViewManager",
    "ZarrArray",
    "ZarrGroup",
    "ZarrNode",
    "__version__",
    "combine",
    "combine_faster",
    "connect",
    "convert",
    "convert_to_ome_arrow",
    "create",
    "from_source",
    "new",
    "ome_tiff_to_ome_arrow",
    "ome_zarr_to_ome_arrow",
    "open_ome_arrow",
    "open_zarr",
    "plan_blocks",
    "read_ome_tiff",
    "read_ome_zarr",
    "to_ome_arrow",
    "to_ome_parquet",
    "to_zarr",
    "write_ome_arrow_dataset",
)
