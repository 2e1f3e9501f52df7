"""dask_loom: Loom, AnnData collections, Zarr and OME-Arrow as chunk-aligned dask arrays.

``import dask_loom as loompy`` runs existing loompy code; every layer is also
a lazy dask array whose blocks are whole stored chunks, and operations run as
task graphs on dask's threaded scheduler or a ``dask.distributed`` cluster.
"""

import importlib
from typing import TYPE_CHECKING, Any

from dask_loom import _config  # the dask_loom.* defaults and DASK_LOOM_* variables

if TYPE_CHECKING:
    from dask_loom.analysis import read_loom, write_anndata
    from dask_loom.blocks import from_source, plan_blocks, store
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
        combine,
        combine_faster,
        connect,
        create,
        new,
    )
    from dask_loom.ops import aggregate, map, permute, scan
# Everything loads on first use: `import dask_loom` costs little more than
# `import dask` (dask-loom info and --help never pay for dask.array, zarr,
# scipy or pyarrow), which also matters because xarray imports every
# installed engine when it lists them.
_LOOM = "dask_loom.loom"
_LAZY = {
    "AttributeManager": _LOOM,
    "GlobalAttributeManager": _LOOM,
    "GraphManager": _LOOM,
    "LayerManager": _LOOM,
    "LoomConnection": _LOOM,
    "LoomLayer": _LOOM,
    "LoomValidator": _LOOM,
    "LoomView": _LOOM,
    "MemoryLoomLayer": _LOOM,
    "ViewManager": _LOOM,
    "combine": _LOOM,
    "combine_faster": _LOOM,
    "connect": _LOOM,
    "create": _LOOM,
    "new": _LOOM,
    "from_source": "dask_loom.blocks",
    "plan_blocks": "dask_loom.blocks",
    "store": "dask_loom.blocks",
    "MappedCollection": "dask_loom.anndata",
    "MappedIterableDataset": "dask_loom.anndata",
    "convert": "dask_loom.loom._convert",
    "reshard": "dask_loom.zarr._reshard",
    "LazyTensorView": "dask_loom.ome",
    "TensorView": "dask_loom.ome",
    "convert_to_ome_arrow": "dask_loom.ome",
    "ome_tiff_to_ome_arrow": "dask_loom.ome",
    "ome_zarr_to_ome_arrow": "dask_loom.ome",
    "open_ome_arrow": "dask_loom.ome",
    "read_ome_tiff": "dask_loom.ome",
    "read_ome_zarr": "dask_loom.ome",
    "to_ome_arrow": "dask_loom.ome",
    "to_ome_parquet": "dask_loom.ome",
    "write_ome_arrow_dataset": "dask_loom.ome",
    "ZarrArray": "dask_loom.zarr",
    "ZarrGroup": "dask_loom.zarr",
    "ZarrNode": "dask_loom.zarr",
    "open_zarr": "dask_loom.zarr",
    "to_zarr": "dask_loom.zarr",
    "aggregate": "dask_loom.ops",
    "map": "dask_loom.ops",
    "permute": "dask_loom.ops",
    "scan": "dask_loom.ops",
    "read_loom": "dask_loom.analysis",
    "write_anndata": "dask_loom.analysis",
    "pp": "dask_loom.pp",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_loom' has no attribute {name!r}")
    mod = importlib.import_module(module)
    # Subpackages (dask_loom.pp) are their own value.
    value = mod if module == f"{__name__}.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dask_loom")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


__version__ = _version()

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
    "aggregate",
    "combine",
    "combine_faster",
    "connect",
    "convert",
    "convert_to_ome_arrow",
    "create",
    "from_source",
    "map",
    "new",
    "ome_tiff_to_ome_arrow",
    "ome_zarr_to_ome_arrow",
    "open_ome_arrow",
    "open_zarr",
    "permute",
    "plan_blocks",
    "pp",
    "read_loom",
    "read_ome_tiff",
    "reshard",
    "read_ome_zarr",
    "scan",
    "store",
    "to_ome_arrow",
    "to_ome_parquet",
    "to_zarr",
    "write_anndata",
    "write_ome_arrow_dataset",
)
