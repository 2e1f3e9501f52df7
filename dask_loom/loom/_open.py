"""Open the tree of a Loom container: a Zarr group (``.loom.zarr``) or an HDF5 file."""

from __future__ import annotations

from typing import Any

from dask_loom.loom._tree import Tree, is_zarr_spec
from dask_loom.storage import FileSpec

__all__ = ["open_tree"]


def open_tree(spec: FileSpec, *, mode: str = "r") -> Tree:
    """The :class:`Tree` for a container: a Zarr group (``.loom.zarr``), else HDF5."""
    if is_zarr_spec(spec):
        early = _early_reads(spec)
        # Imported here: zarr costs half a second that an HDF5 user never needs.
        from dask_loom.loom._zarrtree import ZarrTree

        return ZarrTree(spec, mode=mode, early=early)
    from dask_loom.loom._tree import HDF5Tree

    return HDF5Tree(spec)


# What opening a remote .loom.zarr reads first: the root document and the spec version.
_FIRST_KEYS = ["zarr.json", "attrs/LOOM_SPEC_VERSION/c"]


def _early_reads(spec: FileSpec) -> Any:
    """Requests for what opening a remote ``.loom.zarr`` reads first, sent before zarr-python is imported (or ``None``)."""
    if spec.is_local:
        return None
    from dask_loom.storage._obstore import LIST_LIMIT, EarlyReads, is_native

    if not is_native(spec.url):
        return None
    try:
        return EarlyReads(spec.url.rstrip("/"), dict(spec.storage_options), _FIRST_KEYS, listing_limit=LIST_LIMIT)
    except Exception:
        return None  # options the store will refuse with a typed error: it says so when it opens
