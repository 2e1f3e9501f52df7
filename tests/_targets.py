"""The chunk targets under test, each with an independent way to read back what it holds.

Every kind makes a target of a given shape, chunk shape and dtype (optionally
over old content written by the peer library first) and reads the stored
array back with the peer (h5py, zarr-python, ome-arrow, loompy), or returns
``None`` when no array is visible.  tests/test_store.py and
tests/test_target_conformance.py share them.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np


class Kind:
    """One kind of chunk target."""

    name = ""
    #: Leading axes the target always has (OME images are TCZYX): test shapes are 2-D after them.
    lead: tuple[int, ...] = ()
    #: Whether tasks on a process cluster can write it.
    cluster = True
    #: Whether an aborted write can leave the old content (False: "no array" is also allowed).
    keeps_old = True

    def full(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*self.lead, *shape)

    def full_chunks(self, chunks: tuple[int, ...]) -> tuple[int, ...]:
        return (*(1 for _ in self.lead), *chunks)

    def make(self, tmp: pathlib.Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, *, old: np.ndarray | None = None) -> Any:
        raise NotImplementedError  # pragma: no cover - every kind overrides it

    def read(self, tmp: pathlib.Path) -> np.ndarray | None:
        raise NotImplementedError  # pragma: no cover - every kind overrides it

    def leftovers(self, tmp: pathlib.Path) -> list[str]:
        """Temporary files or folders of a write left beside the data (none after a write ends)."""
        return sorted(
            p for p in os.listdir(tmp)
            if p.startswith((".dlpart-", ".ds.")) or (p.endswith(".tmp") and "dask-loom" in p)
        )

    def __repr__(self) -> str:
        return self.name


class HDF5(Kind):
    name = "hdf5"

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import h5py

        from dask_loom.hdf5 import HDF5Target

        fn = tmp / "t.h5"
        if old is not None:
            with h5py.File(fn, "a") as f:
                f.create_dataset("g/x", data=old, chunks=tuple(max(1, min(c, n)) for c, n in zip(chunks, old.shape)) if old.size else None, compression="gzip")
                f.create_dataset("other", data=np.arange(5))
        return HDF5Target(fn, "g/x", shape=shape, dtype=dtype, chunks=chunks)

    def read(self, tmp):
        import h5py

        fn = tmp / "t.h5"
        if not fn.exists():
            return None
        with h5py.File(fn, "r") as f:
            if "other" in f:
                assert f["other"][:].tolist() == [0, 1, 2, 3, 4]  # the rest of the file survives every write
            return f["g/x"][...] if "g/x" in f else None


class ZarrLocal(Kind):
    name = "zarr-local"
    shards = False
    zarr_format = 3

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import zarr

        from dask_loom.stores import LocalStore
        from dask_loom.zarr import ZarrTarget

        root = tmp / "t.zarr"
        if old is not None:
            g = zarr.open_group(str(root), mode="a", zarr_format=self.zarr_format)
            g.create_array("g/x", data=old, chunks=tuple(max(1, min(c, n)) for c, n in zip(chunks, old.shape)), overwrite=True)
            g.create_array("other", data=np.arange(5), chunks=(5,), overwrite=True)
        kw = {"shards": tuple(2 * c for c in chunks)} if self.shards else {}
        return ZarrTarget(LocalStore(root), "g/x", shape=shape, dtype=dtype, chunks=chunks, zarr_format=self.zarr_format, **kw)

    def _store(self, tmp):
        return str(tmp / "t.zarr") if (tmp / "t.zarr").exists() else None

    def read(self, tmp):
        import zarr

        where = self._store(tmp)
        if where is None:
            return None
        try:
            z = zarr.open_array(where, path="g/x", mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.NodeTypeValidationError, ValueError):
            return None
        with_other = zarr.open_group(where, mode="r")
        if "other" in with_other:
            assert with_other["other"][:].tolist() == [0, 1, 2, 3, 4]
        return z[...]


class ZarrSharded(ZarrLocal):
    name = "zarr-sharded"
    shards = True


class ZarrV2(ZarrLocal):
    name = "zarr-v2"
    zarr_format = 2


class ZarrS3(ZarrLocal):
    """An object store (the local S3 server): no rename, the metadata document is the commit marker."""

    name = "zarr-s3"
    keeps_old = False

    def __init__(self, server: dict[str, Any]) -> None:
        self.server = server

    def _url(self, tmp):
        # One prefix per test (tmp is unique), inside the shared bucket.
        return f"s3://{self.server['bucket']}/targets/{abs(hash(str(tmp))):x}/t.zarr"

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import zarr

        from dask_loom.storage._objectstore import open_store
        from dask_loom.zarr import ZarrTarget

        store = open_store(self._url(tmp), **self.server["storage_options"])
        if old is not None:
            g = zarr.open_group(store, mode="a")
            g.create_array("g/x", data=old, chunks=tuple(max(1, min(c, n)) for c, n in zip(chunks, old.shape)), overwrite=True)
        return ZarrTarget(store, "g/x", shape=shape, dtype=dtype, chunks=chunks)

    def _store(self, tmp):
        from dask_loom.storage._objectstore import open_store

        return open_store(self._url(tmp), **self.server["storage_options"])


class OME(Kind):
    name = "ome"
    lead = (1, 1, 1)

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import dask_loom
        from dask_loom.ome import OMEDatasetTarget

        out = tmp / "ds"
        if old is not None:
            dask_loom.write_ome_arrow_dataset({"img": old}, out, chunk_shape=chunks, overwrite=True, scheduler="sync")
        return OMEDatasetTarget(out, shape, dtype, chunk_shape=chunks, image_id="img")

    def read(self, tmp):
        import ome_arrow

        out = tmp / "ds"
        if not out.exists():
            return None
        return np.asarray(ome_arrow.OMEArrowDataset(str(out)).read_image("img"))


class LoomHDF5(Kind):
    """Layer 'L' of a .loom file (a target that owns its transaction: the connection's)."""

    name = "loom"
    suffix = ".loom"

    def path(self, tmp):
        return tmp / f"t{self.suffix}"

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import dask_loom
        from dask_loom.loom import LayerTarget

        fn = self.path(tmp)
        base = np.zeros(shape, "f4") if old is None or old.shape != tuple(shape) else old.astype("f4")
        dask_loom.create(str(fn), {"": base, **({"L": old} if old is not None else {})},
                         {"g": np.arange(shape[0])}, {"c": np.arange(shape[1])}, chunks=chunks, scheduler="sync")
        ds = dask_loom.connect(str(fn), "r+", validate=False)
        return LayerTarget(ds, "L", dtype=dtype, chunks=chunks)

    def read(self, tmp):
        import h5py

        fn = self.path(tmp)
        with h5py.File(fn, "r") as f:
            return f["layers/L"][...] if "layers/L" in f else None


class LoomZarr(LoomHDF5):
    name = "loom-zarr"
    suffix = ".loom.zarr"

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import dask

        # Layers are sharded; shards of 2 x 2 chunks here (at the default block-size this small
        # array would be one shard), so the suite checks the shard as the write unit.
        with dask.config.set({"dask_loom.block-size": 4 * int(np.prod(chunks)) * 4}):
            return super().make(tmp, shape, chunks, dtype, old=old)

    def read(self, tmp):
        import zarr

        g = zarr.open_group(str(self.path(tmp)), mode="r")
        return g["layers/L"][...] if "layers" in g and "L" in g["layers"] else None


class AnnData(Kind):
    """An AnnData matrix element, read back by anndata's own ``read_elem``."""

    encoding = "dense"
    suffix = ".h5ad"

    def __init__(self, encoding: str = "dense", suffix: str = ".h5ad") -> None:
        self.encoding = encoding
        self.suffix = suffix
        self.name = f"anndata-{encoding}-{suffix.strip('.')}"

    def path(self, tmp):
        return tmp / f"t{self.suffix}"

    def make(self, tmp, shape, chunks, dtype, *, old=None):
        import anndata
        import scipy.sparse as sp

        from dask_loom.anndata import anndata_target

        if old is not None:
            value = old if self.encoding == "dense" else (sp.csr_matrix(old) if self.encoding == "csr" else sp.csc_matrix(old))
            if self.suffix == ".h5ad":
                import h5py

                with h5py.File(self.path(tmp), "a") as f:
                    anndata.io.write_elem(f, "X", value)
                    anndata.io.write_elem(f, "other", np.arange(5))
            else:
                import zarr

                g = zarr.open_group(str(self.path(tmp)), mode="a", zarr_format=2)
                anndata.io.write_elem(g, "X", value)
                anndata.io.write_elem(g, "other", np.arange(5))
        band = chunks if self.encoding == "dense" else chunks[0 if self.encoding == "csr" else 1]
        if self.suffix == ".zarr" and self.encoding == "dense":
            import dask

            # Shards of 2 x 2 chunks (the default, block-size, would make one shard of this small
            # array): the write unit is the shard, and the suite checks it like a chunk.
            with dask.config.set({"dask_loom.block-size": 4 * int(np.prod(chunks)) * np.dtype(dtype).itemsize}):
                return anndata_target(self.path(tmp), "X", shape=shape, dtype=dtype, encoding=self.encoding, chunks=band)
        return anndata_target(self.path(tmp), "X", shape=shape, dtype=dtype, encoding=self.encoding, chunks=band)

    def read(self, tmp):
        import anndata

        fn = self.path(tmp)
        if not fn.exists():
            return None
        if self.suffix == ".h5ad":
            import h5py

            with h5py.File(fn, "r") as f:
                if "other" in f:
                    assert f["other"][:].tolist() == [0, 1, 2, 3, 4]
                if "X" not in f:
                    return None
                x = anndata.io.read_elem(f["X"])
        else:
            import zarr

            g = zarr.open_group(str(fn), mode="r")
            if "other" in g:
                assert g["other"][:].tolist() == [0, 1, 2, 3, 4]
            if "X" not in g:
                return None
            x = anndata.io.read_elem(g["X"])
        if self.encoding != "dense":
            assert type(x).__name__.startswith(self.encoding), f"read back as {type(x).__name__}"
            x = x.toarray()
        return np.asarray(x)


KINDS = [
    HDF5(), ZarrLocal(), ZarrSharded(), ZarrV2(), OME(), LoomHDF5(), LoomZarr(),
    AnnData("dense"), AnnData("csr"), AnnData("csc", ".zarr"), AnnData("dense", ".zarr"),
]
