"""``LoomConnection`` and ``connect``: loompy's connection API over chunk-aligned task graphs."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._config import get_config
from dask_loom.errors import FileBeingWrittenError, LoomFormatError, LoomValidationError, ReadOnlyError
from dask_loom.loom._attrs import AttributeManager, GlobalAttributeManager
from dask_loom.loom._common import (
    AXIS_ATTRS,
    AXIS_GRAPHS,
    LEGACY_GRAPHS,
    global_value,
    is_spec3,
    read_spec_version,
)
from dask_loom.loom._create import _spec, creating
from dask_loom.loom._deprecated import _Deprecated
from dask_loom.loom._graphs import GraphManager, graph_matrix
from dask_loom.loom._layerhost import LayerHost, layer_path, node_timestamp
from dask_loom.loom._layers import LayerManager
from dask_loom.loom._open import open_tree
from dask_loom.loom._speccheck import SpecValidator
from dask_loom.loom._store import init_layout, put_attr, put_global, put_graph, touch
from dask_loom.loom._values import materialize
from dask_loom.loom._view import ViewManager
from dask_loom.storage import FileSpec

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["LoomConnection", "connect", "new", "open_tree"]

class LoomConnection(_Deprecated):
    """A connection to a Loom file (``.loom`` HDF5, or the same layout in Zarr).

    Parameters
    ----------
    filename
        Path or URL (``s3://…``, ``gs://…``, ``https://…``, ``memory://…``).
    mode
        ``"r+"`` (read/write, default, as in loompy) or ``"r"``.  Unlike
        loompy, an ``r+`` connection holds the HDF5 file open for writing only
        while a write runs, so other readers are never locked out.
    validate
        Check the file against the Loom spec first (as loompy does).
    spec_version
        Accepted for loompy compatibility (loompy ignores it too).
    storage_options
        fsspec options for URLs (credentials, endpoint …).
    scheduler, client
        Where this connection's graphs run by default (see
        :func:`dask_loom.cluster.resolve_scheduler`).

    Examples
    --------
    >>> import dask_loom, numpy as np, tempfile, os
    >>> fn = os.path.join(tempfile.mkdtemp(), "x.loom")
    >>> dask_loom.create(fn, np.arange(12.0).reshape(3, 4), {"Gene": np.array(["a", "b", "c"])}, {"CellID": np.arange(4)})
    >>> with dask_loom.connect(fn, "r") as ds:
    ...     print(ds.shape, ds.ra.Gene.tolist(), ds[1, :].tolist())
    (3, 4) ['a', 'b', 'c'] [4.0, 5.0, 6.0, 7.0]
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        mode: str = "r+",
        *,
        validate: bool = True,
        spec_version: str = "3.0.0",
        storage_options: dict[str, Any] | None = None,
        scheduler: Any = None,
        client: Any = None,
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"Mode must be either 'r' or 'r+', not {mode!r}")
        spec = FileSpec.from_path(filename, storage_options)
        self._spec = spec
        self.filename = os.fspath(filename) if not spec.is_local else spec.url
        # A remote .loom.zarr is known to exist by its root document (the tree's first
        # read), a remote HDF5 file by the size its opening asks for: asking first would
        # cost more requests on an object store.
        remote_zarr = not spec.is_local and spec.url.rstrip("/").endswith(".zarr")
        if spec.is_local and not spec.exists():
            raise FileNotFoundError(errno.ENOENT, f"File '{filename}' not found", os.fspath(filename))
        try:
            self._tree = open_tree(spec, mode=mode)
        except LoomFormatError:
            if remote_zarr and not spec.exists():
                raise FileNotFoundError(
                    errno.ENOENT, f"File '{filename}' not found", os.fspath(filename)
                ) from None
            raise
        self._mode = mode
        if mode == "r+" and getattr(self._tree, "read_only", False):
            raise ReadOnlyError(
                f"{self.filename}: this container is read-only here (HDF5 on an object store); connect with mode='r'"
            )
        self._scheduler = scheduler
        self._client = client
        self._closed = False
        self._write_lock = threading.RLock()
        writable = mode == "r+" and not getattr(self._tree, "read_only", False)
        why = "the connection is read-only (opened with mode='r')"
        if mode == "r+":
            why = "it is read-only here (HDF5 on an object store)"
        # One host for the connection's life: layers taken before a write stay valid after it.
        self._layer_host = LayerHost(
            self._tree,
            self.filename,
            check_open=self._check_open,
            compute_kwargs=self._compute_kwargs,
            write_layer=self._write_layer,
            write_region=self._write_layer_region,
            delete_layer=self._delete_layer,
            permute=self._permute_in_place if writable else None,
            read_only=why,
            check_writable=self._check_writable,
            writing=self._writing,
            refresh=self._refresh_shape,
            reopen=self._open_managers,
        )
        # One handle for the dozens of small reads of opening and validating (17 ms -> 5 ms).
        with self._tree.session():
            self._check_loom()
            if validate:
                lv = SpecValidator()
                if not lv.validate_tree(self._tree, self.filename):
                    raise LoomValidationError(
                        "\n".join(lv.errors)
                        + f"\n{self.filename} does not appear to be a valid Loom file according to Loom spec version '{lv.version}'",
                        filename=self.filename,
                        version=str(lv.version),
                        errors=lv.errors,
                    )
            self._open_managers()

    # -- opening ---------------------------------------------------------------------

    def _check_loom(self) -> None:
        t = self._tree
        try:
            has = [t.exists(p) for p in ("matrix", "row_attrs", "col_attrs")]
        except (LoomFormatError, FileBeingWrittenError):
            raise
        except OSError as exc:
            raise LoomFormatError(f"{self.filename}: not a readable Loom file ({exc})") from None
        if not any(has):
            raise LoomFormatError(f"{self.filename}: not a Loom file (no /matrix, /row_attrs or /col_attrs)")
        # Nodes of the wrong kind would fail later with a bare AttributeError/TypeError.
        if has[0] and t.is_group("matrix"):
            raise LoomFormatError(f"{self.filename}: '/matrix' is a group where the Loom spec wants a dataset")
        for group in ("layers", *AXIS_ATTRS, *AXIS_GRAPHS, *LEGACY_GRAPHS, "attrs"):
            if (has[AXIS_ATTRS.index(group) + 1] if group in AXIS_ATTRS else t.exists(group)) and not t.is_group(group):
                raise LoomFormatError(f"{self.filename}: '/{group}' is a dataset where the Loom spec wants a group")
        self._spec_version = read_spec_version(t)

    def _open_managers(self) -> None:
        self._refresh_shape()
        self._warned: set[str] = set()
        self.layers = self.layer = LayerManager(self)
        self.ra = self.row_attrs = AttributeManager(self, axis=0)
        self.ca = self.col_attrs = AttributeManager(self, axis=1)
        self.attrs = GlobalAttributeManager(self)
        self.row_graphs = GraphManager(self, axis=0)
        self.col_graphs = GraphManager(self, axis=1)
        self.view = ViewManager(self)

    def _refresh_shape(self) -> None:
        self._layer_host.invalidate()
        if self._tree.exists("matrix"):
            self._shape = tuple(int(s) for s in self._tree.info("matrix").shape)
        else:
            self._shape = (0, 0)

    # -- basic properties ------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)`` of the main matrix (``(0, 0)`` for an empty file)."""
        return self._shape

    @shape.setter
    def shape(self, value: tuple[int, int]) -> None:
        self._shape = tuple(value)

    @property
    def mode(self) -> str:
        """``"r"`` or ``"r+"``."""
        return self._mode

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def spec_version(self) -> str:
        """The Loom spec version the file declares (``"0.0.0"`` if none)."""
        return self._spec_version

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.filename}: the connection is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._mode != "r+":
            raise ReadOnlyError(f"{self.filename}: the connection is read-only (opened with mode='r')")

    def _compute_kwargs(self) -> dict[str, Any]:
        return {"scheduler": self._scheduler, "client": self._client}

    def close(self, suppress_warning: bool = False) -> None:
        """Close the connection; later access raises."""
        if self._closed:
            if not suppress_warning:
                warnings.warn(f"{self.filename}: connection was already closed", UserWarning, stacklevel=2)
            return
        self._closed = True
        self._shape = (0, 0)
        from dask_loom.hdf5 import invalidate

        with contextlib.suppress(Exception):
            invalidate(self._spec, keep_indexes=True)  # a reopening of the unchanged file reuses them

    def __enter__(self) -> LoomConnection:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        empty = not self._closed and 0 in self._shape and getattr(self, "_created", False)
        self.close(True)
        if empty and exc_type is None:
            raise ValueError(
                f"Newly created loom file '{self.filename}' must be filled with data before leaving the 'with' block"
            )

    def __repr__(self) -> str:
        if self._closed:
            return f"<LoomConnection to {self.filename} (closed)>"
        return (
            f"<LoomConnection to {self.filename} ({self._mode}), shape {self.shape}, "
            f"layers {self.layers.keys()}, {len(self.ra)} row attrs, {len(self.ca)} col attrs>"
        )

    def _repr_html_(self) -> str:
        from html import escape

        if self._closed:
            return f"<p>LoomConnection to {escape(self.filename)} (closed)</p>"
        rows = "".join(
            f"<tr><td>{escape(repr(k))}</td><td>{escape(str(v.shape))}</td><td>{escape(v.dtype)}</td></tr>"
            for k, v in self.layers.items()
        )
        return (
            f"<p><b>LoomConnection</b> {escape(self.filename)} — shape {self.shape}, spec {escape(self.spec_version)}</p>"
            f"<table><tr><th>layer</th><th>shape</th><th>dtype</th></tr>{rows}</table>"
            f"<p>row attrs: {escape(', '.join(self.ra.keys()))}<br>col attrs: {escape(', '.join(self.ca.keys()))}</p>"
        )

    # -- indexing ----------------------------------------------------------------------

    def __getitem__(self, thing: Any) -> Any:
        """``ds["x"]`` → layer ``x``; ``ds[rows, cols]`` → numpy array of the main matrix."""
        self._check_open()
        if isinstance(thing, str):
            return self.layers[thing]
        return self.layers[""][thing]

    def __setitem__(self, thing: Any, value: Any) -> None:
        if isinstance(thing, str):
            self.layers[thing] = value
        else:
            self.layers[""][thing] = value

    # -- layer internals ----------------------------------------------------------------

    # The layers' facts live in the LayerHost: the operations take them from ds.__dask_loom_layer_host__().

    @staticmethod
    def _layer_path(name: str) -> str:
        return layer_path(name)

    def dask(self, layer: str = "", *, chunks: Any = None, band_axis: int | None = None, sparse: bool = False) -> Any:
        """A layer as a lazy dask array whose blocks are whole stored chunks (CSR blocks with ``sparse=True``)."""
        return self.layers[layer].to_dask(chunks=chunks, band_axis=band_axis, sparse=sparse)

    def to_anndata(
        self,
        *,
        layers: Any = None,
        sparse: bool = True,
        X_name: str = "",
        obs_names: str | None = "CellID",
        var_names: str | None = "Gene",
        obsm_mapping: dict[str, Any] | None = None,
        varm_mapping: dict[str, Any] | None = None,
        dtype: Any = None,
    ) -> Any:
        """The file as a lazy ``anndata.AnnData`` with cells as rows (needs anndata).

        ``X`` is layer *X_name* (default the main matrix) and ``layers`` the
        named layers (or those in *layers*), all dask arrays of the Loom layers
        transposed lazily, each block a full-width band of whole stored chunks
        (``scipy.sparse.csr_matrix`` with ``sparse=True``).  ``obs``/``var``
        come from the column/row attributes (*obs_names*/*var_names* as index
        where present, enum attributes as categoricals), multi-column and
        compound attributes become ``obsm``/``varm``, graphs ``obsp``/``varp``.
        See :mod:`dask_loom.analysis`.
        """
        from dask_loom._doors import converter

        return converter("loom", "anndata")(
            self,
            X_name=X_name,
            layers=[layers] if isinstance(layers, str) else layers,
            sparse=sparse,
            obs_names=obs_names,
            var_names=var_names,
            obsm_mapping=obsm_mapping or {},
            varm_mapping=varm_mapping or {},
            dtype=dtype,
        )

    def to_xarray(self, *, row_dim: str = "gene", col_dim: str = "cell", layers: Any = None, chunks: Any = None) -> Any:
        """The file as a lazy ``xarray.Dataset``: layers over ``(row_dim, col_dim)``, attributes as coordinates.

        Layers are this connection's chunk-aligned dask arrays (``loom-read``
        tasks); see :mod:`dask_loom._xarray` for the layout and
        ``xr.open_dataset(path, engine="loom")`` for the same without a connection.
        """
        from dask_loom._doors import converter

        return converter("loom", "xarray")(self, row_dim=row_dim, col_dim=col_dim, layers=layers, chunks=chunks)

    # -- attribute internals --------------------------------------------------------

    def _attr_names(self, axis: int) -> list[str]:
        group = AXIS_ATTRS[axis]
        names = []
        n = self._shape[axis]
        for child in self._tree.children(group):
            path = f"{group}/{child}"
            if self._tree.is_group(path):
                # Nested groups (LoomExperiment) are flattened as "group/name"
                # when their arrays have one value per row/column.
                for sub in self._tree.children(path):
                    subpath = f"{path}/{sub}"
                    if self._tree.is_group(subpath):
                        self._warn_once(subpath, "a group nested two levels deep")
                        continue
                    shape = self._tree.info(subpath).shape
                    if shape and (shape[0] == n or n == 0):
                        names.append(f"{child}/{sub}")
                    else:
                        self._warn_once(subpath, f"{shape[0] if shape else 0} values where {n} were expected")
                continue
            names.append(child)
        return names

    def _warn_once(self, path: str, why: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if path not in warned:
            warned.add(path)
            warnings.warn(f"{self.filename}: skipped attribute '{path}' ({why})", UserWarning, stacklevel=5)

    def _capped_info(self, path: str, what: str) -> Any:
        """The node's info, refusing declared sizes over ``dask_loom.max-metadata-bytes`` before any read."""
        info = self._tree.info(path)
        cap = _metadata_cap()
        if int(np.prod(info.shape, dtype=object)) * max(1, info.dtype.itemsize) > cap:
            raise LoomFormatError(
                f"{self.filename}: {what} '{path}' declares shape {info.shape} ({info.dtype}), "
                f"larger than the {cap}-byte cap (dask_loom.max-metadata-bytes)"
            )
        return info

    def _read_attr(self, axis: int, name: str) -> np.ndarray:
        path = f"{AXIS_ATTRS[axis]}/{name}"
        info = self._capped_info(path, "attribute")
        n = self._shape[axis]
        if n and (not info.shape or info.shape[0] != n):
            raise LoomFormatError(
                f"{self.filename}: attribute '{path}' has {info.shape[0] if info.shape else 0} values, expected {n}"
            )
        raw = self._tree.read(path)
        return materialize(raw, kind=info.kind, enum=info.enum, spec=self._spec_version)

    # -- global attributes ----------------------------------------------------------

    def _globals_in_group(self) -> bool:
        return self._tree.is_group("attrs")

    def _global_names(self) -> list[str]:
        if self._globals_in_group():
            return self._tree.children("attrs")
        return list(self._tree.attrs("/").keys())

    def _read_global(self, name: str) -> Any:
        if self._globals_in_group():
            self._capped_info(f"attrs/{name}", "global attribute")
            value = self._tree.read(f"attrs/{name}")
        else:
            value = self._tree.attrs("/")[name]
        return global_value(value, self._spec_version)

    # -- graph internals -----------------------------------------------------------------

    def _graph_group(self, axis: int) -> str | None:
        for group in (AXIS_GRAPHS[axis], LEGACY_GRAPHS[axis]):
            if self._tree.is_group(group):
                return group
        return None

    def _graph_names(self, axis: int) -> list[str]:
        names: list[str] = []
        for group in (AXIS_GRAPHS[axis], LEGACY_GRAPHS[axis]):
            for child in self._tree.children(group):
                if child not in names:
                    names.append(child)
        return names

    def _read_graph(self, axis: int, name: str) -> sp.coo_matrix:
        n = self._shape[axis]
        for group in (AXIS_GRAPHS[axis], LEGACY_GRAPHS[axis]):
            path = f"{group}/{name}"
            if self._tree.is_group(path):
                break
            if self._tree.exists(path):
                raise LoomFormatError(f"{self.filename}: '/{path}' is a dataset where the Loom spec wants a group (a, b, w)")
        else:
            raise AttributeError(f"'{name}' is not a graph in {self.filename}")
        for k in ("a", "b", "w"):
            self._capped_info(f"{path}/{k}", "graph array")
        a, b, w = (np.asarray(self._tree.read(f"{path}/{k}")) for k in ("a", "b", "w"))
        return graph_matrix(self.filename, path, a, b, w, n)

    # -- timestamps ----------------------------------------------------------------

    def _node_timestamp(self, path: str) -> str:
        return node_timestamp(self._tree, path)

    def last_modified(self) -> str:
        """When the file was last modified (the root ``last_modified`` timestamp), or now if it has none."""
        self._check_open()
        return self._node_timestamp("/")

    def get_changes_since(self, timestamp: str) -> dict[str, list[str]]:
        """Names of attributes, graphs and layers modified after *timestamp*."""
        self._check_open()
        out: dict[str, list[str]] = {}
        for key, axis in (("row_graphs", 0), ("col_graphs", 1)):
            group = self._graph_group(axis)
            out[key] = [g for g in self._graph_names(axis) if group and self._node_timestamp(f"{group}/{g}") > timestamp and self._has_ts(f"{group}/{g}")]
        for key, axis in (("row_attrs", 0), ("col_attrs", 1)):
            names = self.ra.keys() if axis == 0 else self.ca.keys()
            out[key] = [a for a in names if self._has_ts(f"{AXIS_ATTRS[axis]}/{a}") and self._node_timestamp(f"{AXIS_ATTRS[axis]}/{a}") > timestamp]
        out["layers"] = [
            name for name in self.layers.keys()
            if self._has_ts(self._layer_path(name)) and self._node_timestamp(self._layer_path(name)) > timestamp
        ]
        return out

    def _has_ts(self, path: str) -> bool:
        return "last_modified" in self._tree.attrs(path)

    # -- computations -----------------------------------------------------------------

    def map(
        self,
        f_list: list[Callable[[np.ndarray], Any] | str],
        *,
        axis: int = 0,
        chunksize: int = 1000,
        selection: np.ndarray | None = None,
        layer: str = "",
        scheduler: Any = None,
        client: Any = None,
        progress: bool = False,
    ) -> list[np.ndarray]:
        """Apply functions along rows (``axis=0``) or columns (``axis=1``) as one task graph.

        Parameters
        ----------
        f_list
            Functions, each called on a row (or column) vector and returning a
            number.  Recognised reductions — ``sum``, ``mean``, ``std``,
            ``var``, ``min``, ``max``, ``count_nonzero`` and their ``nan``
            variants, as numpy functions or names — all run together in one
            blockwise pass with a tree reduction; anything else is called per
            vector on full-width bands.
        axis
            0 for one value per row, 1 for one value per column.
        chunksize
            Rows (columns) per band for per-vector functions; a hint, rounded
            to whole stored chunks.
        selection
            Bool mask or sorted indices of the columns (rows) to include.
        layer
            Which layer (default the main matrix).
        scheduler, client, progress
            Where to run, and whether to show a progress bar.

        Returns
        -------
        list of numpy.ndarray
            One float64 array of length ``shape[axis]`` per function.
        """
        self._check_open()
        kw = self._compute_kwargs()
        if scheduler is not None or client is not None:
            kw = {"scheduler": scheduler, "client": client}
        return self.layers[layer].map(f_list, axis=axis, chunksize=chunksize, selection=selection, progress=progress, **kw)

    def scan(
        self,
        *,
        items: Any = None,
        axis: int | None = None,
        layers: Any = None,
        key: str | None = None,
        batch_size: int = 512,
        what: Any = ("col_attrs", "row_attrs", "layers", "col_graphs", "row_graphs"),
        prefetch: int | None = None,
        scheduler: Any = None,
        client: Any = None,
    ) -> Iterator[tuple[int, np.ndarray, Any]]:
        """Scan across an axis, yielding ``(ix, indexes, view)`` batches as loompy does.

        Batches are read as task graphs, ``prefetch`` of them ahead of the one
        being consumed (default ``dask_loom.scan-prefetch`` = 2).  See
        :func:`dask_loom.loom._scan.scan` for the deliberate differences.
        """
        from dask_loom.loom._scan import scan

        return scan(self, items=items, axis=axis, layers=layers, key=key, batch_size=batch_size, what=what, prefetch=prefetch, scheduler=scheduler, client=client)

    def aggregate(
        self,
        out_file: str | os.PathLike[str] | None = None,
        select: np.ndarray | None = None,
        group_by: str | np.ndarray = "Clusters",
        aggr_by: str = "mean",
        aggr_ca_by: dict[str, str] | None = None,
        layer: str = "",
        aggr_ca_if_equal: bool = False,
        *,
        scheduler: Any = None,
        client: Any = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Aggregate columns by a label: the matrix with *aggr_by*, attributes with *aggr_ca_by*.

        Runs as a group-by graph over full-width row bands (never the whole
        layer in memory); a layer whose bands would pass a block is grouped
        over blocks of about the block size instead.  Returns the ``(n_rows, n_groups)`` float64 matrix
        (groups in sorted label order) and, with *out_file*, writes it as a
        Loom file with all row attributes and the aggregated column
        attributes, as loompy does.  See :func:`dask_loom.loom._aggregate.aggregate`
        for the deliberate differences from loompy.
        """
        from dask_loom.loom._aggregate import aggregate

        return aggregate(self, out_file, select, group_by, aggr_by, aggr_ca_by, layer, aggr_ca_if_equal, scheduler=scheduler, client=client, progress=progress)

    def permute(self, ordering: np.ndarray, axis: int) -> None:
        """Permute the file along *axis*: every layer, attribute and graph, out of core.

        Crash-safe: the permuted file is written beside the old one and swapped
        in at the end, so a killed process leaves the old or the new order,
        whole.  *ordering* must be a permutation of ``range(shape[axis])``.
        """
        from dask_loom.ops import permute

        permute(self, ordering, axis=axis)

    def _permute_in_place(self, ordering: np.ndarray, axis: int, *, scheduler: Any = None, client: Any = None) -> None:
        # What dask_loom.permute calls for a layer: a layer stands for its file, so every
        # layer, attribute and graph moves together (the ``permute`` of a SourceInfo).
        from dask_loom.loom._modify import permute

        if scheduler is None and client is None:
            permute(self, ordering, axis)
            return
        saved = self._scheduler, self._client  # the write runs where this call says, not where the connection would
        self._scheduler, self._client = scheduler, client
        try:
            permute(self, ordering, axis)
        finally:
            self._scheduler, self._client = saved

    def __dask_loom_layer_host__(self) -> LayerHost:
        """What the Loom operations use of this connection besides its public API (:class:`LayerHost`)."""
        return self._layer_host

    def __dask_loom_source__(self, layer: str | None = None) -> Any:
        """A layer (default the main matrix) as the operations (``dask_loom.map`` ...) read it."""
        self._check_open()
        return self.layers["" if layer is None else layer].__dask_loom_source__()

    def export(self, out_file: str | os.PathLike[str], layer: str | None = None, format: str = "tab") -> None:
        """Export a layer and the attributes as tab-separated text (byte-identical to loompy)."""
        from dask_loom.loom._modify import export

        export(self, out_file, layer, format)

    def add_columns(self, layers: Any, col_attrs: dict[str, Any], *, row_attrs: dict[str, Any] | None = None, fill_values: Any = None) -> None:
        """Append columns of every layer and their attributes, all or nothing.

        *layers* is an array (the main matrix), a dict of arrays or a
        ``LayerManager``; every existing layer must be supplied.  Column
        attributes not supplied are deleted unless *fill_values* (a dict, or
        ``"auto"`` for zeros/empty strings) gives them values, as in loompy.
        """
        from dask_loom.loom._modify import add_columns

        add_columns(self, layers, col_attrs, row_attrs=row_attrs, fill_values=fill_values)

    def add_loom(
        self,
        other_file: str | os.PathLike[str],
        key: str | None = None,
        fill_values: Any = None,
        batch_size: int = 1000,
        convert_attrs: bool = False,
        include_graphs: bool = False,
    ) -> None:
        """Append the columns of another Loom file (see :func:`dask_loom.loom._modify.add_loom`)."""
        from dask_loom.loom._modify import add_loom

        self._check_writable()
        with connect(other_file, "r", validate=False) as other:
            add_loom(self, other, key, fill_values, batch_size, convert_attrs, include_graphs)

    def sparse(self, rows: Any = None, cols: Any = None, layer: str | None = None, *, dtype: Any = None) -> sp.coo_matrix:
        """A layer (default: the main matrix) as ``scipy.sparse.coo_matrix``, built blockwise."""
        return self.layers["" if layer is None else layer].sparse(rows=rows, cols=cols, dtype=dtype)

    # -- writes --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, *, atomic: bool = False, fresh: bool = False) -> Iterator[Any]:
        self._check_writable()
        # Small writes (attributes, graphs, regions, deletions) are transactions too unless
        # dask_loom.atomic-writes is off: an in-place HDF5 write killed half-way can leave
        # chunks that no longer decode (measured in tests/test_reliability_kill.py).
        atomic = atomic or fresh or bool(get_config("atomic-writes"))
        try:
            with self._write_lock, self._tree.writing(atomic=atomic, fresh=fresh) as w:
                yield w
        finally:
            self._layer_host.invalidate()

    def _touch(self, w: Any, *paths: str) -> None:
        touch(w, *paths)

    def _spec3_strings(self) -> bool:
        return is_spec3(self._spec_version) or self._spec_version == "0.0.0"

    def _write_attr(self, axis: int, name: str, value: Any) -> None:
        self._check_writable()
        with self._writing() as w:
            put_attr(w, axis, name, value, n=self._shape[axis], spec3=self._spec3_strings())

    def _delete_attr(self, axis: int, name: str) -> None:
        with self._writing() as w:
            w.delete(f"{AXIS_ATTRS[axis]}/{name}")
            self._touch(w, AXIS_ATTRS[axis])

    def _write_global(self, name: str, value: Any) -> None:
        self._check_writable()
        in_group = self._globals_in_group() or is_spec3(self._spec_version)
        with self._writing() as w:
            put_global(w, name, value, in_group=in_group)
            self._touch(w)

    def _delete_global(self, name: str) -> None:
        in_group = self._globals_in_group()
        with self._writing() as w:
            if in_group:
                w.delete(f"attrs/{name}")
            else:
                w.del_attr("/", name)

    def _write_graph(self, axis: int, name: str, g: sp.coo_matrix) -> None:
        with self._writing() as w:
            put_graph(w, axis, name, g)

    def _delete_graph(self, axis: int, name: str) -> None:
        with self._writing() as w:
            w.delete(f"{AXIS_GRAPHS[axis]}/{name}")
            self._touch(w, AXIS_GRAPHS[axis])

    def _write_layer(self, name: str, value: Any) -> None:
        from dask_loom.loom._write import write_layer

        write_layer(self, name, value)

    def _write_layer_region(self, name: str, key: Any, value: Any) -> None:
        from dask_loom.loom._write import write_layer_region

        write_layer_region(self, name, key, value)

    def _delete_layer(self, name: str) -> None:
        with self._writing() as w:
            w.delete(self._layer_path(name))
            self._touch(w)


def _metadata_cap() -> int:
    from dask.utils import parse_bytes

    v = get_config("max-metadata-bytes")
    return parse_bytes(v) if isinstance(v, str) else int(v)


def connect(
    filename: str | os.PathLike[str],
    mode: str = "r+",
    *,
    validate: bool = True,
    spec_version: str = "3.0.0",
    storage_options: dict[str, Any] | None = None,
    scheduler: Any = None,
    client: Any = None,
) -> LoomConnection:
    """Open a Loom file (``.loom`` HDF5 or ``.loom.zarr``), locally or on an object store.

    Same signature and defaults as ``loompy.connect``; see
    :class:`LoomConnection` for the extra keyword options.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    dask_loom.errors.LoomFormatError
        The file is not Loom (or fails validation when ``validate=True``).
    """
    return LoomConnection(
        filename,
        mode,
        validate=validate,
        spec_version=spec_version,
        storage_options=storage_options,
        scheduler=scheduler,
        client=client,
    )


def new(
    filename: str | os.PathLike[str],
    *,
    file_attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LoomConnection:
    """Create an empty Loom file and return an ``r+`` connection to it (shape ``(0, 0)``).

    Writes loompy's layout: ``/attrs`` (``LOOM_SPEC_VERSION = "3.0.0"``,
    ``CreationDate``, then *file_attrs*) and the empty groups ``/layers``,
    ``/row_attrs``, ``/col_attrs``, ``/row_graphs``, ``/col_graphs``.  An
    existing file is replaced.  Fill it with :meth:`LoomConnection.add_columns`.
    """
    spec = _spec(filename, storage_options)
    with creating(spec) as w:
        init_layout(w, file_attrs)
    ds = LoomConnection(spec.url if spec.is_local else os.fspath(filename), "r+", validate=False, storage_options=storage_options)
    ds._created = True
    return ds
