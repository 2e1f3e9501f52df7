"""AnnData elements read by on-disk encoding: obs columns, indexes, matrices.

One registry maps an element's encoding (the ``encoding-type`` attribute, or
what older writers left instead) to its reader, the way anndata's own
``IORegistry`` does.  Every generation found in real files is covered:

* anndata < 0.7: ``obs``/``var``/``obsm`` as HDF5 compound datasets, categories
  in ``uns/<column>_categories``, ``h5sparse_format`` sparse groups, ``raw.X``
  as a root key;
* anndata 0.7: ``dataframe@0.1.0``, categorical codes whose ``categories``
  attribute points into ``obs/__categories``;
* anndata >= 0.8: ``categorical``, ``string-array``, ``nullable-integer``,
  ``nullable-boolean``, ``nullable-string-array``, ``csr_matrix``,
  ``csc_matrix`` and dense ``array`` elements, in h5ad and zarr v2/v3.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from dask_loom._lazy import isna
from dask_loom.anndata._store import AnnStore, attr, child, is_group, keys_of, to_str_array
from dask_loom.errors import AnnDataFormatError
from dask_loom.hdf5._files import reading_values

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Column",
    "MatrixMeta",
    "describe_matrix",
    "element",
    "encoding_of",
    "file_n_obs",
    "map_labels",
    "obs_columns",
    "read_column",
    "read_index",
    "read_names",
    "record_field",
]

_SPARSE = {"csr_matrix": "csr", "csc_matrix": "csc"}


def encoding_of(node: Any) -> str:
    """The element's encoding type, inferred for writers that left no attribute."""
    et = attr(node, "encoding-type")
    if et:
        return str(et)
    fmt = attr(node, "h5sparse_format")
    if fmt:
        return f"{fmt}_matrix"
    if is_group(node):
        keys = set(keys_of(node))
        if {"data", "indices", "indptr"} <= keys:
            return "csr_matrix"
        if "codes" in keys and "categories" in keys:
            return "categorical"
        if "values" in keys and "mask" in keys:
            return "nullable"
        if attr(node, "_index") is not None:
            return "dataframe"
        return "dict"
    if node.dtype.names:
        return "record"
    if node.dtype.kind in "SUOT":
        return "string-array"
    return "array"


def element(store: AnnStore, node: Any, key: str) -> Any:
    """``node[key]``, ``None`` when absent; an element the container cannot open raises.

    zarr-python refuses some metadata older writers produced (record arrays
    with sub-array fields, as anndata < 0.7 wrote ``obsm``): that is an
    unreadable element, not a missing one.
    """
    try:
        if key not in node:
            return None
        return node[key]
    except KeyError:
        return None
    except (ValueError, TypeError) as exc:
        raise AnnDataFormatError(f"{store.name}: element '{key}' cannot be opened ({exc})") from exc


def record_field(store: AnnStore, node: Any, field: str, where: str) -> np.ndarray:
    """One field of a record (compound) array, as anndata < 0.7 stored obs, var and obsm.

    h5py reads a single field; zarr-python cannot select fields of a
    structured array (it fails inside its codec pipeline), so the records
    are read whole (they are one row per cell) and the field taken here.
    """
    if isinstance(node, h5py.Dataset):
        return node[field]
    try:
        records = node[...]
    except (ValueError, TypeError) as exc:
        raise AnnDataFormatError(f"{store.name}: {where} is a record array zarr-python cannot read ({exc})") from exc
    return records[field]


def read_array(node: Any) -> np.ndarray:
    """A whole array, strings decoded to ``str``."""
    if isinstance(node, h5py.Dataset):
        with reading_values():
            if h5py.check_string_dtype(node.dtype) is not None:
                return np.asarray(node.asstr()[()], dtype=object)
            return to_str_array(node[()])
    return to_str_array(node[...])


# -- obs columns --------------------------------------------------------------------


@dataclass
class Column:
    """One obs column of one file, fully read (codes are small; values are one vector).

    ``kind`` is ``"categorical"`` (``codes`` + ``categories``), ``"nullable"``
    (``values`` + ``mask``, True = missing) or ``"plain"`` (``values``).
    """

    kind: str
    values: np.ndarray | None = None
    codes: np.ndarray | None = None
    categories: np.ndarray | None = None
    mask: np.ndarray | None = None
    ordered: bool = False

    def __len__(self) -> int:
        return len(self.codes if self.codes is not None else self.values)  # type: ignore[arg-type]

    def missing(self) -> np.ndarray:
        """True where the label is missing (categorical code -1, nullable mask, float NaN)."""
        if self.kind == "categorical":
            return self.codes < 0  # type: ignore[operator]
        if self.kind == "nullable":
            return np.asarray(self.mask, dtype=bool)
        v = self.values
        if v.dtype.kind == "f":  # type: ignore[union-attr]
            return np.isnan(v)  # type: ignore[arg-type]
        if v.dtype == object:  # type: ignore[union-attr]
            return isna(v)
        return np.zeros(len(v), dtype=bool)  # type: ignore[arg-type]

    def item(self, i: int) -> Any:
        """The label of row *i* as lamindb returns it (``np.nan`` when missing)."""
        if self.kind == "categorical":
            code = int(self.codes[i])  # type: ignore[index]
            if code < 0:
                return np.nan
            if len(self.categories) == 0:  # type: ignore[arg-type]
                return code
            return self.categories[code]  # type: ignore[index]
        if self.kind == "nullable" and self.mask[i]:  # type: ignore[index]
            return np.nan
        return self.values[i]  # type: ignore[index]

    def labels(self) -> np.ndarray:
        """Every row's label, ``np.nan`` where missing (lamindb's ``_get_labels``)."""
        if self.kind == "categorical":
            cats = self.categories
            codes = self.codes
            if len(cats) == 0:  # type: ignore[arg-type]
                return np.full(len(codes), np.nan, dtype=object)  # type: ignore[arg-type]
            out = cats[np.where(codes < 0, 0, codes)].astype(object)  # type: ignore[index,operator]
            out[codes < 0] = np.nan  # type: ignore[operator]
            return out
        if self.kind == "nullable":
            m = np.asarray(self.mask, dtype=bool)
            if not m.any():
                return self.values  # type: ignore[return-value]
            vals = self.values.astype(float if self.values.dtype.kind == "f" else object)  # type: ignore[union-attr]
            vals[m] = np.nan
            return vals
        return self.values  # type: ignore[return-value]

    def category_values(self) -> list[Any]:
        """Distinct labels: the categories of a categorical, else the distinct present values."""
        if self.kind == "categorical":
            return list(self.categories)  # type: ignore[arg-type]
        vals = self.values[~self.missing()]  # type: ignore[index]
        if vals.dtype == object:  # first appearance, as pandas.unique (no pandas import for labels)
            return list(dict.fromkeys(vals))
        return list(np.unique(vals))


def map_labels(labels: np.ndarray, encoder: dict[Any, int], default: int) -> np.ndarray:
    """``encoder[label]`` per label as int64, *default* for labels it lacks (missing ones too).

    What ``pd.Series(labels).map(encoder).fillna(default)`` gives, in one
    pass of dictionary look-ups (no pandas import for string labels).
    """
    return np.fromiter(map(encoder.get, labels, itertools.repeat(default)), dtype=np.int64, count=len(labels))


ColumnReader = Callable[[Any, Any, str, str, AnnStore], Column]
_COLUMN_READERS: dict[str, ColumnReader] = {}


def register_column(*encodings: str) -> Callable[[ColumnReader], ColumnReader]:
    """Register a reader for obs columns of the given encoding types."""

    def deco(fn: ColumnReader) -> ColumnReader:
        for e in encodings:
            _COLUMN_READERS[e] = fn
        return fn

    return deco


def _check_codes(codes: np.ndarray, n_cats: int, where: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise AnnDataFormatError(f"{where}: categorical codes have dtype {codes.dtype}, expected integers")
    codes = codes.astype(np.int64, copy=False)
    if len(codes) and (codes.min() < -1 or codes.max() >= n_cats):
        raise AnnDataFormatError(
            f"{where}: categorical codes outside -1..{n_cats - 1} (found {int(codes.min())}..{int(codes.max())} "
            f"for {n_cats} categories); refusing to shift labels"
        )
    return codes


@register_column("categorical")
def _categorical(root: Any, obs: Any, key: str, where: str, store: AnnStore) -> Column:
    node = obs[key]
    cats = read_array(node["categories"])
    ordered_attr = attr(node, "ordered")
    if ordered_attr is None and child(node, "ordered") is not None:
        # anndataR wrote `ordered` as a child array instead of an attribute.
        raise AnnDataFormatError(
            f"{store.name}: {where} has no 'ordered' attribute (found an 'ordered' array instead: "
            "not the AnnData categorical encoding)"
        )
    codes = _check_codes(node["codes"][...], len(cats), f"{store.name}: {where}")
    return Column("categorical", codes=codes, categories=cats, ordered=bool(ordered_attr or False))


@register_column("nullable-integer", "nullable-boolean", "nullable-string-array", "nullable")
def _nullable(root: Any, obs: Any, key: str, where: str, store: AnnStore) -> Column:
    node = obs[key]
    return Column("nullable", values=read_array(node["values"]), mask=np.asarray(node["mask"][...], dtype=bool))


@register_column("array", "string-array")
def _plain(root: Any, obs: Any, key: str, where: str, store: AnnStore) -> Column:
    node = obs[key]
    values = read_array(node)
    cats_node = _legacy_categories(root, obs, node, key)
    if cats_node is not None:  # anndata 0.7: integer codes pointing into __categories
        cats = read_array(cats_node)
        return Column("categorical", codes=_check_codes(values, len(cats), f"{store.name}: {where}"), categories=cats)
    if values.ndim != 1:
        raise AnnDataFormatError(f"{store.name}: {where} has shape {values.shape}, expected one value per row")
    return Column("plain", values=values)


def _legacy_categories(root: Any, obs: Any, node: Any, key: str) -> Any:
    cats_group = child(obs, "__categories")
    if cats_group is not None and child(cats_group, key) is not None:
        return cats_group[key]
    ref = node.attrs.get("categories") if "categories" in node.attrs else None
    if ref is None:
        return None
    if isinstance(ref, h5py.Reference):
        return root[ref]
    if isinstance(ref, (str, bytes)):
        ref = ref.decode() if isinstance(ref, bytes) else ref
        return child(obs, ref) if child(obs, ref) is not None else child(root, ref)
    return None


def _record_column(root: Any, obs: Any, key: str, where: str, store: AnnStore) -> Column:
    values = to_str_array(record_field(store, obs, key, where))
    uns = child(root, "uns")
    cats_node = child(uns, f"{key}_categories") if uns is not None else None
    if cats_node is not None:
        cats = read_array(cats_node)
        return Column("categorical", codes=_check_codes(values, len(cats), f"{store.name}: {where}"), categories=cats)
    return Column("plain", values=values)


def obs_columns(root: Any) -> list[str]:
    """Names of the obs columns of a file (without the index)."""
    obs = child(root, "obs")
    if obs is None:
        return []
    if not is_group(obs):
        return [n for n in (obs.dtype.names or ()) if n not in ("index", "_index")]
    index_key = attr(obs, "_index", "_index")
    return [k for k in keys_of(obs) if k not in (index_key, "__categories")]


def read_column(store: AnnStore, key: str) -> Column:
    """Read obs column *key* of a file (raises KeyError when absent)."""
    with store.locked() as root:
        obs = root["obs"]
        where = f"obs/{key}"
        if not is_group(obs):
            if key not in (obs.dtype.names or ()):
                raise KeyError(key)
            return _record_column(root, obs, key, where, store)
        node = child(obs, key)
        if node is None:
            raise KeyError(key)
        enc = encoding_of(node)
        reader = _COLUMN_READERS.get(enc)
        if reader is None:
            raise AnnDataFormatError(f"{store.name}: {where} has encoding {enc!r}, which is not an obs column encoding")
        return reader(root, obs, key, where, store)


def read_index(store: AnnStore, elem: str) -> pd.Index:
    """The index (obs or var names) of dataframe *elem*, as strings."""
    import pandas as pd

    return pd.Index(read_names(store, elem))


def read_names(store: AnnStore, elem: str) -> np.ndarray:
    """The index (obs or var names) of dataframe *elem*, as an object array of ``str`` (no pandas)."""
    with store.locked() as root:
        node = child(root, elem)
        if node is None:
            raise AnnDataFormatError(f"{store.name}: no '{elem}' element")
        if is_group(node):
            key = attr(node, "_index", "_index")
            idx_node = child(node, key)
            if idx_node is None:
                raise AnnDataFormatError(f"{store.name}: {elem} names its index '{key}' but has no such array")
            values = read_array(idx_node)
        else:
            names = node.dtype.names or ()
            field = next((n for n in ("index", "_index") if n in names), None)
            if field is None:
                raise AnnDataFormatError(f"{store.name}: {elem} is a record array without an 'index' field")
            values = to_str_array(record_field(store, node, field, f"{elem}/{field}"))
    if values.dtype == object:
        return values.astype(str).astype(object)
    return np.asarray([str(v) for v in values], dtype=object)


def df_length(store: AnnStore, elem: str) -> int | None:
    with store.locked() as root:
        node = child(root, elem)
        if node is None:
            return None
        if not is_group(node):
            return int(node.shape[0])
        key = attr(node, "_index", "_index")
        idx_node = child(node, key)
        return None if idx_node is None else int(idx_node.shape[0])


# -- matrices -----------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixMeta:
    """A 2-D element of one file: where it is, how it is stored, its shape.

    ``fmt`` is ``"dense"``, ``"csr"``, ``"csc"`` or ``"field"`` (a field of a
    pre-0.7 compound ``obsm`` dataset, named by ``field``).  ``chunk_rows`` is
    the storage unit along rows (rows per chunk or shard; 1 when contiguous).
    """

    path: str
    fmt: str
    shape: tuple[int, int]
    dtype: str
    chunk_rows: int
    field: str | None = None


def _row_unit(node: Any) -> int:
    shards = getattr(node, "shards", None)
    if shards:
        return int(shards[0])
    chunks = getattr(node, "chunks", None)
    return int(chunks[0]) if chunks else 1


def describe_matrix(store: AnnStore, path: str, *, field: str | None = None) -> MatrixMeta:
    """Describe the matrix at *path* (KeyError when absent)."""
    with store.locked() as root:
        node = child(root, path)
        if node is None:
            raise KeyError(path)
        where = f"{store.name}: {path}"
        if field is not None:
            sub = node.dtype[field]
            k = int(np.prod(sub.shape)) if sub.shape else 1
            return MatrixMeta(path, "field", (int(node.shape[0]), k), np.dtype(sub.base).str, _row_unit(node), field)
        if is_group(node):
            enc = encoding_of(node)
            fmt = _SPARSE.get(enc)
            if fmt is None:
                raise AnnDataFormatError(f"{where} has encoding {enc!r}; expected a dense array, csr_matrix or csc_matrix")
            shape = attr(node, "shape") or attr(node, "h5sparse_shape")
            if shape is None or len(shape) != 2:
                raise AnnDataFormatError(f"{where}: sparse matrix without a 2-D 'shape' attribute")
            data = child(node, "data")
            indptr = child(node, "indptr")
            if data is None or indptr is None or child(node, "indices") is None:
                raise AnnDataFormatError(f"{where}: sparse matrix lacks data/indices/indptr")
            major = int(shape[0] if fmt == "csr" else shape[1])
            if int(indptr.shape[0]) != major + 1:
                raise AnnDataFormatError(
                    f"{where}: indptr has {int(indptr.shape[0])} entries, expected {major + 1} for shape {tuple(shape)}"
                )
            return MatrixMeta(path, fmt, (int(shape[0]), int(shape[1])), np.dtype(data.dtype).str, _row_unit(data))
        if node.dtype.names:
            raise AnnDataFormatError(f"{where} is a record array; name one of its fields {node.dtype.names}")
        if node.ndim == 1:
            return MatrixMeta(path, "dense", (int(node.shape[0]), 1), np.dtype(node.dtype).str, _row_unit(node))
        if node.ndim != 2:
            raise AnnDataFormatError(f"{where} has {node.ndim} dimensions, expected 2")
        if node.dtype.kind not in "biufc":
            raise AnnDataFormatError(f"{where} has dtype {node.dtype}, expected numbers")
        return MatrixMeta(path, "dense", (int(node.shape[0]), int(node.shape[1])), np.dtype(node.dtype).str, _row_unit(node))


def layer_path(store: AnnStore, key: str) -> str | None:
    """Where layer *key* (``"X"``, ``"raw.X"`` or a ``layers`` name) lives in a file."""
    with store.locked() as root:
        if key == "X":
            return "X" if child(root, "X") is not None else None
        if key == "raw.X":
            raw = child(root, "raw")
            if raw is not None and is_group(raw) and child(raw, "X") is not None:
                return "raw/X"
            return "raw.X" if child(root, "raw.X") is not None else None
        layers = child(root, "layers")
        if layers is not None and is_group(layers) and child(layers, key) is not None:
            return f"layers/{key}"
    return None


def obsm_meta(store: AnnStore, key: str) -> MatrixMeta | None:
    with store.locked() as root:
        obsm = element(store, root, "obsm")
        if obsm is None:
            return None
        if not is_group(obsm):  # pre-0.7 compound obsm
            if key in (obsm.dtype.names or ()):
                return describe_matrix(store, "obsm", field=key)
            return None
        node = child(obsm, key)
        if node is None:
            return None
        if is_group(node) and encoding_of(node) == "dataframe":
            raise AnnDataFormatError(f"{store.name}: obsm/{key} is a dataframe; MappedCollection reads array obsm only")
    return describe_matrix(store, f"obsm/{key}")


def file_n_obs(store: AnnStore) -> int:
    """Rows of a file: X's rows, checked against obs; obs's length when X is absent."""
    with store.locked() as root:
        if element(store, root, "obs") is None:
            found = ", ".join(keys_of(root)[:12]) or "nothing"
            raise AnnDataFormatError(f"{store.name}: not an AnnData file (no 'obs' element; found {found})")
    n_obs_df = df_length(store, "obs")
    x = layer_path(store, "X")
    if x is None:
        if n_obs_df is None:
            raise AnnDataFormatError(f"{store.name}: obs has no index, and there is no X to count rows")
        return n_obs_df
    meta = describe_matrix(store, x)
    if n_obs_df is not None and n_obs_df != meta.shape[0]:
        raise AnnDataFormatError(f"{store.name}: X has {meta.shape[0]} rows but obs has {n_obs_df} (key 'obs')")
    return meta.shape[0]
