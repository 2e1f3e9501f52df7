"""lamindb's ``MappedCollection`` over AnnData files, read by batch without h5py's lock.

Same constructor (positional order included), attributes, item dictionaries,
label encoders, weights, filters and join rules as
``lamindb.core.MappedCollection``; on top of that, batched reads
(``__getitems__``, used by torch's DataLoader), a dask view of the joined
collection (:meth:`MappedCollection.to_dask`) and a block-shuffled batch
loader (:meth:`MappedCollection.iter_batches`).

Deliberate differences from lamindb (bugs or gaps there) are listed in
``docs/differences-mapped.md``: CSC matrices are read (lamindb raises); every
item has the same keys (an element missing from one file is filled, see
:data:`FILL_VALUES`); ``get_merged_labels`` has one entry per row even when a
file lacks the key; missing values never become categories; and bad input
raises typed errors naming the file and the key.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dask_loom._threads import map_threads
from dask_loom.anndata._elems import (
    Column,
    MatrixMeta,
    describe_matrix,
    df_length,
    file_n_obs,
    layer_path,
    map_labels,
    obs_columns,
    obsm_meta,
    read_column,
    read_names,
)
from dask_loom.anndata._plan import FILL_VALUES, MISSING_CODE, _as_list, _is_missing, _LayerPlan
from dask_loom.anndata._store import AnnStore, open_store
from dask_loom.errors import CollectionError, CollectionIndexError, ElementNotFoundError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FILL_VALUES", "MappedCollection"]

class MappedCollection:
    """Map-style collection of AnnData files (h5ad and zarr), as lamindb's ``MappedCollection``.

    Virtually concatenates the files' rows; ``mc[i]`` returns a dict with
    ``"_store_idx"``, one dense row per layer key (``"X"`` is ``.X``,
    ``"raw.X"`` is ``.raw.X``), ``f"obsm_{key}"`` rows and obs labels
    (encoded to ``int`` unless ``encode_labels`` says otherwise; ``-1`` for
    ``unknown_label``; ``np.nan`` for a missing label).

    Parameters
    ----------
    path_list
        Paths or URLs (``s3://…``, ``gs://…``, ``memory://…``) of ``.h5ad``
        files and AnnData zarr stores (directories, v2 or v3, sharded, or
        zipped).  The container kind is detected from the content.
    layers_keys
        ``None`` → ``["X"]``; a string or list of ``"X"``, ``"raw.X"`` or
        names in ``.layers``.
    obs_keys
        ``.obs`` columns returned with each item.
    obsm_keys
        ``.obsm`` keys, returned as ``f"obsm_{key}"``.
    obs_filter
        ``{column: value or list of values}``; keeps rows matching every
        column (``np.nan`` among the values matches missing labels).  A file
        without the column contributes no rows.
    join
        ``"inner"`` or ``"outer"`` join of the ``var`` indexes, or ``None``
        (no join; rows keep each file's length).  ``"raw.X"`` is never joined.
    encode_labels
        ``True`` (all ``obs_keys``), a list of obs keys, or ``False``/``[]``.
    unknown_label
        A label (or ``{key: label}``) encoded as ``-1``; a label no file
        holds is accepted (it has no entry in the encoder).
    cache_categories
        Accepted for compatibility: obs columns are always read once at
        construction (they are small next to the matrices).
    parallel
        Accepted for compatibility: handles are opened per process (and
        after every ``fork``) whatever its value, so DataLoader workers need
        no ``worker_init_fn``.
    dtype
        Cast layer and obsm rows to this dtype; ``None`` keeps each file's
        stored dtype in items.
    storage_options
        fsspec options for URLs (credentials, endpoint).

    Notes
    -----
    Differences from lamindb 2.12 (its bugs and gaps, not copied):

    * CSC matrices are read (lamindb raises ``ValueError``); a CSC element is
      read whole once per process, since every row touches every column.
    * Every item has the same keys.  An element absent from a file is
      filled: NaN rows for float layers/obsm (``0`` for integer dtypes),
      ``np.nan`` for labels (see :data:`FILL_VALUES`).  Items keep each
      file's stored dtype (as lamindb's); batches and dask blocks, which
      span files, use the common dtype.
    * ``get_merged_labels`` returns one label per row (NaN for files without
      the key), so ``get_label_weights`` can feed a ``WeightedRandomSampler``.
    * Missing values (NaN, masked) are never categories of an encoder.
    * Errors are typed and name the file and the key: missing files,
      non-AnnData files, inconsistent row counts, keys absent from every
      file, an empty inner join, duplicate var names in a join, an index
      out of range.

    The full list, with the reasons, is ``docs/differences-mapped.md``.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> for i, genes in enumerate([["a", "b", "c"], ["b", "c", "d"]]):
    ...     obs = pd.DataFrame({"kind": pd.Categorical(["x", "y"])}, index=[f"c{i}0", f"c{i}1"])
    ...     x = np.arange(6, dtype="f4").reshape(2, 3) + 10 * i
    ...     ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(os.path.join(d, f"{i}.h5ad"))
    >>> mc = MappedCollection([os.path.join(d, "0.h5ad"), os.path.join(d, "1.h5ad")], obs_keys="kind")
    >>> mc.shape, list(mc.var_joint)
    ((4, 2), ['b', 'c'])
    >>> mc[2]
    {'_store_idx': np.int64(1), 'X': array([10., 11.], dtype=float32), 'kind': 0}
    >>> mc.close()
    """

    def __init__(
        self,
        path_list: Sequence[Any],
        layers_keys: str | list[str] | None = None,
        obs_keys: str | list[str] | None = None,
        obsm_keys: str | list[str] | None = None,
        obs_filter: dict[str, Any] | tuple[str, Any] | None = None,
        join: Literal["inner", "outer"] | None = "inner",
        encode_labels: bool | list[str] = True,
        unknown_label: str | dict[str, str] | None = None,
        cache_categories: bool = True,
        parallel: bool = False,
        dtype: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if join not in (None, "inner", "outer"):
            raise CollectionError(f"join must be None, 'inner' or 'outer', got {join!r}")
        if isinstance(path_list, (str, os.PathLike)):
            path_list = [path_list]
        path_list = list(path_list)
        if not path_list:
            raise CollectionError("MappedCollection needs at least one AnnData file")
        self.filtered = obs_filter is not None
        if self.filtered and not isinstance(obs_filter, dict):
            warnings.warn("Passing a tuple to `obs_filter` is deprecated, use a dictionary", FutureWarning, stacklevel=2)
            obs_filter = {obs_filter[0]: obs_filter[1]}  # type: ignore[index]
        self.layers_keys: list[str] = ["X"] if layers_keys is None else _as_list(layers_keys)  # type: ignore[assignment]
        self.obsm_keys = _as_list(obsm_keys)
        self.obs_keys = _as_list(obs_keys)
        if isinstance(encode_labels, list):
            if len(encode_labels) == 0:
                encode_labels = False
            elif self.obs_keys is None or not all(k in self.obs_keys for k in encode_labels):
                raise CollectionError(
                    f"All elements of `encode_labels` {encode_labels} should be in `obs_keys` {self.obs_keys}."
                )
        elif encode_labels:
            encode_labels = self.obs_keys if self.obs_keys is not None else False  # type: ignore[assignment]
        self.encode_labels = encode_labels
        if encode_labels and isinstance(unknown_label, dict):
            bad = [k for k in unknown_label if k not in encode_labels]  # type: ignore[operator]
            if bad:
                raise CollectionError(f"All keys of `unknown_label` should be in `encode_labels` and `obs_keys`; not {bad}.")
        self.unknown_label = unknown_label
        self.parallel = parallel
        self.cache_categories = cache_categories
        self.path_list = path_list
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._closed = False

        self.storages: list[AnnStore] = map_threads(lambda p: open_store(p, storage_options), path_list)
        self.conns: list[Any] = [None] * len(self.storages)
        n_obs_full = map_threads(file_n_obs, self.storages)
        self._n_obs_full: list[int] = [int(n) for n in n_obs_full]
        self._scan_keys()

        self._columns: dict[str, list[Column | None]] = {}
        wanted = list(dict.fromkeys([*(self.obs_keys or []), *((obs_filter or {}).keys())]))
        for key in wanted:
            self._columns[key] = self._read_columns(key, required=key in (self.obs_keys or []))
        self.encoders: dict[str, dict[Any, int]] = {}
        if self.obs_keys is not None and self.encode_labels:
            for key in self.encode_labels:  # type: ignore[union-attr]
                self.encoders[key] = self._make_encoder(key)

        self.n_obs_list: list[int] = []
        self.indices_list: list[np.ndarray] = []
        for i, n in enumerate(self._n_obs_full):
            if obs_filter:
                keep = self._filter_mask(i, obs_filter)
                idx = np.flatnonzero(keep)
            else:
                idx = np.arange(n)
            self.n_obs_list.append(len(idx))
            self.indices_list.append(idx.astype(np.int64))
        self.n_obs = int(sum(self.n_obs_list))
        self.indices = np.hstack(self.indices_list).astype(np.int64) if self.indices_list else np.empty(0, np.int64)
        self.storage_idx = np.repeat(np.arange(len(self.storages)), self.n_obs_list)
        self._offsets = np.concatenate(([0], np.cumsum(self.n_obs_list))).astype(np.int64)

        self.join_vars: Literal["inner", "outer"] | None = join
        self.var_indices: list[np.ndarray] | None = None
        # Var names stay object arrays until var_joint / var_list are asked for: an
        # aligned collection (the common case) is opened without importing pandas.
        self._var_joint: Any = None
        self.n_vars_list: list[int] | None = None
        self._var_names: list[np.ndarray] | None = None
        self._var_index: list[pd.Index] | None = None
        self.n_vars: int | None = None
        if self.join_vars is not None:
            self._make_join_vars()
            self.n_vars = len(self._var_joint)
        self._codes = {key: self._encoded_codes(key) for key in self.encoders}
        # Encoded keys with a missing label somewhere in the collection: their
        # batch arrays are float64 with NaN there (equal to the items' np.nan).
        self._nan_coded = {
            key
            for key, codes in self._codes.items()
            if any((c[rows] == MISSING_CODE).any() for c, rows in zip(codes, self.indices_list))
        }
        self._plans: dict[str, list[_LayerPlan]] = {}
        self._make_plans()

    # -- construction -------------------------------------------------------------

    def _scan_keys(self) -> None:
        def scan(store: AnnStore) -> tuple[dict[str, MatrixMeta | None], dict[str, MatrixMeta | None], set[str]]:
            layers: dict[str, MatrixMeta | None] = {}
            for key in self.layers_keys:
                path = layer_path(store, key)
                layers[key] = None if path is None else describe_matrix(store, path)
            obsm: dict[str, MatrixMeta | None] = {key: obsm_meta(store, key) for key in self.obsm_keys or []}
            with store.locked() as root:
                cols = set(obs_columns(root))
            return layers, obsm, cols

        scanned = map_threads(scan, self.storages)
        self._layer_meta = [s[0] for s in scanned]
        self._obsm_meta = [s[1] for s in scanned]
        self._cache_obs_keys = [s[2] for s in scanned]
        for i, (store, n) in enumerate(zip(self.storages, self._n_obs_full)):
            for kind, metas in (("layer", self._layer_meta[i]), ("obsm", self._obsm_meta[i])):
                for key, meta in metas.items():
                    if meta is not None and meta.shape[0] != n:
                        raise CollectionError(
                            f"{store.name}: {kind} '{key}' ({meta.path}) has {meta.shape[0]} rows but the file has {n} obs"
                        )
        names = [s.name for s in self.storages]
        for key in self.layers_keys:
            if all(m[key] is None for m in self._layer_meta):
                raise ElementNotFoundError(f"layer '{key}' is absent from every file: {names}")
        for key in self.obsm_keys or []:
            if all(m[key] is None for m in self._obsm_meta):
                raise ElementNotFoundError(f"obsm '{key}' is absent from every file: {names}")

    def _read_columns(self, key: str, *, required: bool) -> list[Column | None]:
        def one(i: int) -> Column | None:
            if key not in self._cache_obs_keys[i]:
                return None
            col = read_column(self.storages[i], key)
            if len(col) != self._n_obs_full[i]:
                raise CollectionError(
                    f"{self.storages[i].name}: obs column '{key}' has {len(col)} values for {self._n_obs_full[i]} rows"
                )
            return col

        cols = map_threads(one, range(len(self.storages)))
        if all(c is None for c in cols):
            raise ElementNotFoundError(
                f"obs column '{key}' is absent from every file: {[s.name for s in self.storages]}"
            )
        return cols

    def _unknown(self, key: str) -> Any:
        if isinstance(self.unknown_label, dict):
            return self.unknown_label.get(key)
        return self.unknown_label

    def _make_encoder(self, key: str) -> dict[Any, int]:
        cats = self.get_merged_categories(key)
        unknown = self._unknown(key)
        encoder: dict[Any, int] = {}
        # A label may be present in some collections and not in others (lamindb
        # accepts an absent one too): it then simply has no entry.
        if unknown is not None and unknown in cats:
            cats.remove(unknown)
            encoder[unknown] = -1
        encoder.update({cat: i for i, cat in enumerate(cats)})
        return encoder

    def _filter_mask(self, i: int, obs_filter: dict[str, Any]) -> np.ndarray:
        mask = np.ones(self._n_obs_full[i], dtype=bool)
        for key, values in obs_filter.items():
            if isinstance(values, tuple):
                values = list(values)
            elif not isinstance(values, list):
                values = [values]
            col = self._columns[key][i]
            if col is None:
                return np.zeros(self._n_obs_full[i], dtype=bool)
            labels = col.labels()
            present = [v for v in values if not _is_missing(v)]
            m = np.isin(labels, np.asarray(present, dtype=object)) if present else np.zeros(len(labels), bool)
            if len(present) < len(values):
                m |= col.missing()
            mask &= m
        return mask

    def _read_vars(self) -> None:
        self._var_names = map_threads(lambda s: read_names(s, "var"), self.storages)
        self._var_index = None
        self.n_vars_list = [len(v) for v in self._var_names]

    @property
    def var_list(self) -> list[pd.Index] | None:
        """The var names of each file (``None`` until a join or a ``check_vars_*`` call read them)."""
        if self._var_index is None and self._var_names is not None:
            import pandas as pd

            self._var_index = [pd.Index(v) for v in self._var_names]
        return self._var_index

    @var_list.setter
    def var_list(self, value: list[Any] | None) -> None:
        # As lamindb's attribute: ``None`` makes the next check_vars_* call read the names again.
        if value is None:
            self._var_names = self._var_index = None
        else:
            self._var_names = [np.asarray(v, dtype=object) for v in value]
            self._var_index = None
            self.n_vars_list = [len(v) for v in self._var_names]

    @property
    def var_joint(self) -> pd.Index | None:
        """The joined var names (``None`` without a join)."""
        if isinstance(self._var_joint, np.ndarray):
            import pandas as pd

            self._var_joint = pd.Index(self._var_joint)
        return self._var_joint

    @var_joint.setter
    def var_joint(self, value: Any) -> None:
        self._var_joint = value

    def _make_join_vars(self) -> None:
        if self._var_names is None:
            self._read_vars()
        names = self._var_names
        assert names is not None
        if all(np.array_equal(names[0], v) for v in names[1:]):
            self.join_vars = None
            self._var_joint = names[0]
            return
        import pandas as pd  # a real join: pandas' index set operations

        var_list = self.var_list
        assert var_list is not None
        for store, v in zip(self.storages, var_list):
            if not v.is_unique:
                dup = v[v.duplicated()][:5].tolist()
                raise CollectionError(
                    f"{store.name}: var names are not unique (e.g. {dup}); a {self.join_vars} join needs unique names"
                )
        if self.join_vars == "inner":
            self._var_joint = reduce(pd.Index.intersection, var_list)
            if len(self._var_joint) == 0:
                raise CollectionError(
                    "The provided AnnData objects don't have shared variables "
                    f"(files {[s.name for s in self.storages]}, key 'var').\nUse join='outer'."
                )
            self.var_indices = [v.get_indexer(self._var_joint) for v in var_list]
        else:
            self._var_joint = reduce(pd.Index.union, var_list)
            self.var_indices = [self._var_joint.get_indexer(v) for v in var_list]

    def _file_n_vars(self, i: int) -> int:
        if self.n_vars_list is not None:
            return self.n_vars_list[i]
        meta = self._layer_meta[i].get("X")
        if meta is not None:
            return meta.shape[1]
        n = df_length(self.storages[i], "var")
        return int(n or 0)

    def _make_plans(self) -> None:
        for key in self.layers_keys:
            metas = [m[key] for m in self._layer_meta]
            dtype = self._dtype or np.result_type(*[np.dtype(m.dtype) for m in metas if m is not None])
            raw_width = next(m.shape[1] for m in metas if m is not None)
            plans = []
            for i, (store, meta) in enumerate(zip(self.storages, metas)):
                if key == "raw.X":
                    join, var_idx, n_out = None, None, meta.shape[1] if meta is not None else raw_width
                elif self.join_vars is None:
                    join, var_idx = None, None
                    n_out = meta.shape[1] if meta is not None else (self.n_vars or self._file_n_vars(i))
                else:
                    join, var_idx, n_out = self.join_vars, self.var_indices[i], self.n_vars  # type: ignore[index,assignment]
                item_dtype = self._dtype or (np.dtype(meta.dtype) if meta is not None else dtype)
                plans.append(
                    _LayerPlan(store, meta, join=join, var_idx=var_idx, n_out=int(n_out), dtype=dtype, item_dtype=item_dtype)
                )
            self._plans[key] = plans
        for key in self.obsm_keys or []:
            metas = [m[key] for m in self._obsm_meta]
            dtype = self._dtype or np.result_type(*[np.dtype(m.dtype) for m in metas if m is not None])
            width = next(m.shape[1] for m in metas if m is not None)
            self._plans[f"obsm_{key}"] = [
                _LayerPlan(
                    s,
                    m,
                    join=None,
                    var_idx=None,
                    n_out=m.shape[1] if m is not None else width,
                    dtype=dtype,
                    item_dtype=self._dtype or (np.dtype(m.dtype) if m is not None else dtype),
                )
                for s, m in zip(self.storages, metas)
            ]

    def _encoded_codes(self, key: str) -> list[np.ndarray]:
        encoder = self.encoders[key]
        out = []
        for i, col in enumerate(self._columns[key]):
            n = self._n_obs_full[i]
            if col is None:
                out.append(np.full(n, MISSING_CODE, dtype=np.int64))
                continue
            if col.kind == "categorical":
                lut = np.array([encoder.get(c, MISSING_CODE) for c in col.categories], dtype=np.int64)  # type: ignore[union-attr]
                codes = col.codes
                out.append(np.where(codes < 0, MISSING_CODE, lut[np.maximum(codes, 0)] if len(lut) else MISSING_CODE))  # type: ignore[operator]
            else:
                out.append(map_labels(col.labels(), encoder, MISSING_CODE))
        return out

    # -- lamindb API ----------------------------------------------------------------

    def __len__(self) -> int:
        return self.n_obs

    @property
    def shape(self) -> tuple[int, int | None]:
        """Shape of the (virtually joined) collection."""
        return (self.n_obs, self.n_vars)

    @property
    def original_shapes(self) -> list[tuple[int, int | None]]:
        """Shapes of the files (with ``obs_filter`` applied)."""
        n_vars = self.n_vars_list if self.n_vars_list is not None else [None] * len(self.n_obs_list)
        return list(zip(self.n_obs_list, n_vars))

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (a later read reopens what it needs)."""
        return self._closed

    def close(self) -> None:
        """Release the handles this process holds on the files."""
        from dask_loom.anndata._read import forget
        from dask_loom.anndata._store import forget_root
        from dask_loom.hdf5._files import invalidate

        for s in self.storages:
            if s.kind == "h5ad":
                invalidate(s.spec, keep_indexes=True)  # a reopening of the unchanged file reuses them
            else:
                forget_root(s)
            forget(s)
        self._closed = True

    def __enter__(self) -> MappedCollection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MappedCollection({len(self.storages)} files, shape={self.shape}, layers={self.layers_keys}, "
            f"obs_keys={self.obs_keys}, obsm_keys={self.obsm_keys}, join={self.join_vars!r})"
        )

    @classmethod
    def torch_worker_init_fn(cls, worker_id: int) -> None:
        """``worker_init_fn`` for ``torch.utils.data.DataLoader``.

        Handles are per process already (and forgotten after ``fork``), so
        this only resets ``parallel`` as lamindb's does; ``Subset`` wrappers
        are looked through.
        """
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        ds = info.dataset if info is not None else None
        while ds is not None and not isinstance(ds, MappedCollection):
            ds = getattr(ds, "dataset", None) or getattr(ds, "collection", None)
        if ds is not None:
            ds.parallel = False

    def check_vars_sorted(self, ascending: bool = True) -> bool:
        """``True`` if the var names of every file are sorted."""
        if self._var_names is None:
            self._read_vars()
        attr_name = "is_monotonic_increasing" if ascending else "is_monotonic_decreasing"
        return all(getattr(v, attr_name) for v in self.var_list)  # type: ignore[union-attr]

    def check_vars_non_aligned(self, vars: pd.Index | list[str]) -> list[int]:
        """Indices of files whose var names differ from *vars*."""
        import pandas as pd

        if self._var_names is None:
            self._read_vars()
        target = pd.Index(vars)
        return [i for i, v in enumerate(self.var_list) if not v.equals(target)]  # type: ignore[arg-type]

    def get_merged_categories(self, label_key: str) -> list[Any]:
        """Sorted union over files of the categories (or distinct values) of an obs column."""
        cols = self._columns.get(label_key)
        if cols is None:
            cols = self._read_columns(label_key, required=True)
        merged: set[Any] = set()
        for col in cols:
            if col is not None:
                merged.update(v for v in col.category_values() if not _is_missing(v))
        return sorted(merged)

    def get_merged_labels(self, label_key: str) -> np.ndarray:
        """Every row's label (after ``obs_filter``); NaN where missing or where a file lacks the key."""
        cols = self._columns.get(label_key)
        if cols is None:
            cols = self._read_columns(label_key, required=True)
        parts = []
        for i, col in enumerate(cols):
            if col is None:
                parts.append(np.full(self.n_obs_list[i], np.nan, dtype=object))
                continue
            labels = col.labels()
            if self.filtered:
                labels = labels[self.indices_list[i]]
            parts.append(labels)
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            parts = [p.astype(object) for p in parts]
        return np.hstack(parts)

    def get_label_weights(
        self, obs_keys: str | list[str], scaler: float | None = None, return_categories: bool = False
    ) -> np.ndarray | dict[str, float]:
        """Weights ``1 / count`` (or ``scaler / (count + scaler)``) of each row's label.

        With several keys, labels are joined with ``"__"``; with
        ``return_categories=True`` a ``{label: weight}`` dict is returned.
        """
        keys = [obs_keys] if isinstance(obs_keys, str) else list(obs_keys)
        labels_list = [self.get_merged_labels(k).astype(str).astype("O") for k in keys]
        labels = ["__".join(x) for x in zip(*labels_list)] if len(labels_list) > 1 else labels_list[0]
        counter = Counter(labels)
        if return_categories:
            return {k: 1.0 / v if scaler is None else scaler / (v + scaler) for k, v in counter.items()}
        counts = np.array([counter[label] for label in labels])
        return 1.0 / counts if scaler is None else scaler / (counts + scaler)

    # -- items ------------------------------------------------------------------------

    def _normalise(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            if idx.size == 0:
                return idx.astype(np.int64)
            raise CollectionIndexError(f"MappedCollection indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        bad = (idx >= self.n_obs) | (idx < -self.n_obs)
        if bad.any():
            raise CollectionIndexError(
                f"index {int(idx[bad][0])} is out of range for a MappedCollection of {self.n_obs} rows "
                f"(files {[s.name for s in self.storages]})"
            )
        return np.where(idx < 0, idx + self.n_obs, idx)

    def _read_rows(
        self, file_rows: dict[int, np.ndarray], *, sparse: bool | None, items: bool = False
    ) -> dict[tuple[int, str], Any]:
        """Read sorted unique local rows of several files, every matrix key, concurrently.

        With *items*, each file's rows keep that file's dtype (as ``mc[i]``);
        otherwise all files are cast to the key's common dtype.
        """
        keys = list(self._plans)
        jobs = [(i, k) for i in file_rows for k in keys]

        def read(job: tuple[int, str]) -> Any:
            plan = self._plans[job[1]][job[0]]
            return plan.read(file_rows[job[0]], sparse=sparse, dtype=plan.item_dtype if items else None)

        results = map_threads(read, jobs)
        return dict(zip(jobs, results))

    def _label_value(self, key: str, i: int, row: int) -> Any:
        if key in self._codes:
            code = int(self._codes[key][i][row])
            return np.nan if code == MISSING_CODE else code
        col = self._columns[key][i]
        if col is None:
            return FILL_VALUES["label"]
        v = col.item(row)
        return v.decode("utf-8") if isinstance(v, bytes) else v

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if isinstance(idx, (slice, list, np.ndarray)):
            raise CollectionIndexError("MappedCollection[...] takes one integer; use __getitems__ for many")
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Items for many indices at once: per file sorted, coalesced into runs, read concurrently.

        torch's DataLoader calls this with each batch's indices; the values
        equal ``[self[i] for i in indices]``.
        """
        idx = self._normalise(indices)
        files = self.storage_idx[idx]
        local = self.indices[idx]
        file_rows: dict[int, np.ndarray] = {}
        inverse: dict[int, np.ndarray] = {}
        for f in np.unique(files).tolist():
            sel = files == f
            rows, inv = np.unique(local[sel], return_inverse=True)
            file_rows[f] = rows
            inverse[f] = inv
        blocks = self._read_rows(file_rows, sparse=False, items=True)
        pos_in_file = np.zeros(len(idx), dtype=np.int64)
        for f, inv in inverse.items():
            pos_in_file[files == f] = inv
        keys = list(self._plans)
        obs_keys = self.obs_keys or []
        out = []
        for j in range(len(idx)):
            f = int(files[j])
            p = int(pos_in_file[j])
            item: dict[str, Any] = {"_store_idx": np.int64(f)}
            for k in keys:
                item[k] = blocks[(f, k)][p]
            row = int(local[j])
            for k in obs_keys:
                item[k] = self._label_value(k, f, row)
            out.append(item)
        return out

    # -- dask view and fast loader (see _dask.py and _loader.py) -------------------

    def to_dask(self, layer: str = "X", *, sparse: bool = False, target_bytes: int | str | None = None) -> Any:
        """The joined ``(n_obs, n_vars)`` matrix of *layer* as a lazy dask array.

        Blocks are row ranges of one file each, aligned to its storage
        (whole chunks or shards of a dense array; row ranges of a CSR
        matrix of about ``target_bytes``); with ``sparse=True`` blocks are
        ``scipy.sparse.csr_matrix``.  Task names start with ``mapped-read``.
        """
        from dask_loom.anndata._dask import layer_to_dask

        return layer_to_dask(self, layer, sparse=sparse, target_bytes=target_bytes)

    def __dask_loom_source__(self, layer: str | None = None) -> Any:
        """A layer (default ``X``) as ``dask_loom.map``/``aggregate``/``scan`` read it: one source per file."""
        from dask_loom.anndata._source import collection_info

        return collection_info(self, layer)

    def to_anndata(
        self,
        *,
        layers: str | list[str] | None = None,
        sparse: bool = True,
        obs_keys: str | list[str] | None = None,
        target_bytes: int | str | None = None,
    ) -> Any:
        """The joined collection as one lazy ``anndata.AnnData`` (cells as rows).

        ``X`` (and ``layers``, from ``layers_keys``) are the dask arrays of
        :meth:`to_dask` (CSR blocks with ``sparse=True``); ``obs`` holds every
        obs column of the files (or *obs_keys*) with the merged categories and a
        ``store_idx`` categorical naming each row's file; ``var`` is the joined
        var index; ``obsm`` the dask arrays of ``obsm_keys``.  Needs anndata.
        """
        from dask_loom._doors import converter

        return converter("mapped", "anndata")(
            self,
            layers=[layers] if isinstance(layers, str) else layers,
            sparse=sparse,
            obs_keys=[obs_keys] if isinstance(obs_keys, str) else obs_keys,
            target_bytes=target_bytes,
        )

    def obs_to_dask(self, columns: str | list[str] | None = None) -> Any:
        """obs of the collection as a lazy dask DataFrame (one partition per file)."""
        from dask_loom.anndata._dask import obs_to_dask

        return obs_to_dask(self, columns)

    def to_xarray(self, layer: str = "X", *, obs_columns: str | list[str] | None = None, sparse: bool = False) -> Any:
        """An ``xarray.Dataset`` with the layer over dims ``(obs, var)``, lazily."""
        from dask_loom.anndata._dask import to_xarray

        return to_xarray(self, layer, obs_columns=obs_columns, sparse=sparse)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        block_size: int | None = None,
        preload_blocks: int | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        sparse: bool = False,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Block-shuffled batches: see :func:`dask_loom.anndata._loader.iter_batches`."""
        from dask_loom.anndata._loader import iter_batches

        return iter_batches(
            self,
            batch_size,
            shuffle=shuffle,
            block_size=block_size,
            preload_blocks=preload_blocks,
            seed=seed,
            drop_last=drop_last,
            sparse=sparse,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            prefetch=prefetch,
        )
