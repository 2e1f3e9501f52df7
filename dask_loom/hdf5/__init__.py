"""HDF5 without h5py's global lock on the hot path (design decision 3); datasets as chunk targets."""

from dask_loom.hdf5._files import invalidate, open_h5_read, open_h5_write, read_ranges
from dask_loom.hdf5._layout import ChunkIndex, DatasetLayout
from dask_loom.hdf5._source import STATS, HDF5Source, dataset_layout, hdf5_to_dask
from dask_loom.hdf5._target import HDF5Target

__all__ = [
    "STATS",
    "ChunkIndex",
    "DatasetLayout",
    "HDF5Source",
    "HDF5Target",
    "dataset_layout",
    "hdf5_to_dask",
    "invalidate",
    "open_h5_read",
    "open_h5_write",
    "read_ranges",
]
