"""AnnData collections: lamindb's ``MappedCollection`` API, a dask view and a fast batch loader; matrix elements as chunk targets."""

from dask_loom.anndata._loader import MappedIterableDataset, iter_batches
from dask_loom.anndata._mapped import FILL_VALUES, MappedCollection
from dask_loom.anndata._store import AnnStore, open_store
from dask_loom.anndata._target import SparseTarget, anndata_target

__all__ = [
    "FILL_VALUES",
    "AnnStore",
    "MappedCollection",
    "MappedIterableDataset",
    "SparseTarget",
    "anndata_target",
    "iter_batches",
    "open_store",
]
