"""``lamindb.core.MappedCollection`` pointed at dask_loom's."""

from dask_loom import MappedCollection

__all__ = ["MappedCollection"]
