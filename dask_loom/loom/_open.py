"""Open the tree of a Loom container: a Zarr group (``.loom.zarr``) or an HDF5 file."""

from __future__ import annotations

from dask_loom.loom._tree import Tree, is_zarr_spec
from dask_loom.storage import FileSpec

__all__ = ["open_tree"]


def open_tree(spec: FileSpec, *, mode: str = "r") -> Tree:
    """The :class:`Tree` for a container: a Zarr group (``.loom.zarr``), else HDF5."""
    if is_zarr_spec(spec):
        # Imported here: zarr costs half a second that an HDF5 user never needs.
        from dask_loom.loom._zarrtree import ZarrTree

        return ZarrTree(spec, mode=mode)
    from dask_loom.loom._tree import HDF5Tree

    return HDF5Tree(spec)
