"""The analysis door: Loom files and AnnData collections as lazy ``anndata.AnnData``.

``read_loom`` (scanpy's signature, lazy by default), ``LoomConnection.to_anndata``
and ``MappedCollection.to_anndata`` hand scanpy an AnnData whose ``X`` is a
dask array of whole stored chunks (CSR blocks where the data are sparse);
``write_anndata`` streams any of them to AnnData Zarr or h5ad.  Formats never
import this package; their ``to_anndata`` methods import it when called.
"""

from dask_loom.analysis._loom import layer_cells_by_genes, loom_to_anndata, read_loom
from dask_loom.analysis._mapped import mapped_to_anndata
from dask_loom.analysis._write import write_anndata

__all__ = ["layer_cells_by_genes", "loom_to_anndata", "mapped_to_anndata", "read_loom", "write_anndata"]
