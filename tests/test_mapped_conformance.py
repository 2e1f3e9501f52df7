"""MappedCollection conformance with lamindb 2.12.1 and anndata (issue 12, items 14-20).

Each test pins one behaviour against an independent reference: anndata's
reading of the same files, numpy, or lamindb's documented semantics (its
``MappedCollection`` source and its own ``test_mapped``).
"""

from __future__ import annotations

import json
import os
import re
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from dask_loom import MappedCollection
from dask_loom.errors import AnnDataFormatError, CollectionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = "anndata/scanpy-pbmc68k/10x_pbmc68k_reduced_legacy.h5ad"


def _same(a, b) -> bool:
    """Labels equal, a missing one (NaN) equal only to a missing one."""
    if pd.isna(a) or pd.isna(b):
        return bool(pd.isna(a) and pd.isna(b))
    return a == b


# -- 14: the anndata < 0.7 Zarr layout ----------------------------------------------------


def _write_pre07_zarr(h5_path, store) -> None:
    """Rewrite a pre-0.7 h5ad as anndata < 0.7's ``write_zarr`` laid it out (zarr v2).

    obs and var are record arrays with fixed-width byte strings, categories
    in ``uns/<column>_categories``, X dense, raw as a root key ``raw.X``
    (that writer densified sparse matrices).
    """
    g = zarr.open_group(store, mode="w", zarr_format=2)
    with h5py.File(h5_path, "r") as f:
        g.create_array("X", data=f["X"][...], chunks=(100, f["X"].shape[1]))
        for key in ("obs", "var"):
            records = f[key][...]
            g.create_array(key, data=records, chunks=(len(records),))
        raw = f["raw.X"]
        shape = tuple(int(n) for n in raw.attrs["h5sparse_shape"])
        dense = sp.csr_matrix((raw["data"][...], raw["indices"][...], raw["indptr"][...]), shape=shape).toarray()
        g.create_array("raw.X", data=dense, chunks=(100, shape[1]))
        uns = g.create_group("uns")
        for key in f["uns"]:
            if key.endswith("_categories"):
                uns.create_array(key, data=f["uns"][key][...])


@pytest.fixture(scope="module")
def pre07_zarr(data_dir, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("pre07") / "pbmc68k_legacy.zarr")
    _write_pre07_zarr(data_dir / LEGACY, store)
    return store


def test_pre07_zarr_record_obs_var(pre07_zarr, data_dir):
    # the layout is the one the issue names: a record obs/var with an 'index' byte-string field
    assert zarr.open_array(f"{pre07_zarr}/var", mode="r").dtype.descr[0] == ("index", "|S13")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ad.read_zarr(pre07_zarr)  # anndata reads it: the reference
    keys = ["bulk_labels", "louvain", "phase", "n_genes", "percent_mito"]
    mc = MappedCollection([pre07_zarr], layers_keys=["X", "raw.X"], obs_keys=keys, encode_labels=["bulk_labels", "phase"])
    assert mc.shape == ref.shape
    assert list(mc.var_joint) == list(ref.var_names)
    assert mc.encoders["bulk_labels"] == {c: i for i, c in enumerate(sorted(ref.obs["bulk_labels"].cat.categories))}
    legacy_raw = ad.read_h5ad(data_dir / "anndata/scanpy-pbmc68k/10x_pbmc68k_reduced_2025.h5ad").raw.X
    rows = [0, 1, 350, 699]
    for i, item in zip(rows, mc.__getitems__(rows)):
        np.testing.assert_array_equal(item["X"], ref.X[i])
        assert item["X"].dtype == ref.X.dtype
        np.testing.assert_array_equal(item["raw.X"], legacy_raw[i].toarray().ravel())
        assert item["bulk_labels"] == mc.encoders["bulk_labels"][ref.obs["bulk_labels"].iloc[i]]
        assert item["louvain"] == ref.obs["louvain"].iloc[i]
        assert item["n_genes"] == ref.obs["n_genes"].iloc[i]
        assert item["percent_mito"] == ref.obs["percent_mito"].iloc[i]
    df = mc.obs_to_dask(["louvain", "n_genes"]).compute(scheduler="sync")
    assert list(df.index) == list(ref.obs_names)
    assert list(df["louvain"].astype(str)) == list(ref.obs["louvain"].astype(str))
    np.testing.assert_array_equal(df["n_genes"].to_numpy(), ref.obs["n_genes"].to_numpy())
    np.testing.assert_array_equal(mc.to_dask().compute(scheduler="sync"), ref.X)


def test_pre07_zarr_unreadable_obsm_names_the_store(pre07_zarr, tmp_path):
    """A record obsm with sub-array fields, which zarr-python 3 (and so anndata) cannot open: a typed error."""
    import shutil

    store = tmp_path / "with_obsm.zarr"
    shutil.copytree(pre07_zarr, store)
    (store / "obsm").mkdir()
    fields = [["X_pca", "<f4", [3]], ["X_umap", "<f8", [2]]]
    meta = {"zarr_format": 2, "shape": [700], "chunks": [700], "dtype": fields, "compressor": None,
            "fill_value": None, "filters": None, "order": "C"}  # fmt: skip
    (store / "obsm" / ".zarray").write_text(json.dumps(meta))
    records = np.zeros(700, dtype=[(n, t, tuple(s)) for n, t, s in fields])
    (store / "obsm" / "0").write_bytes(records.tobytes())
    with pytest.raises(AnnDataFormatError, match=r"with_obsm\.zarr: element 'obsm' cannot be opened"):
        MappedCollection([str(store)], obsm_keys="X_pca")
    # the rest of the store still reads
    assert MappedCollection([str(store)]).shape == (700, 765)


# -- 15: lamindb's ValueErrors ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """lamindb's own test data: two 2 x 3 files (h5ad dense, zarr CSR), obs feat1/feat2 = A, B."""
    d = tmp_path_factory.mktemp("lamindb_like")
    var = pd.DataFrame(index=["MYC", "TCF7", "GATA1"])
    obs = pd.DataFrame({"feat1": pd.Categorical(["A", "B"]), "feat2": pd.Categorical(["A", "B"])}, index=["0", "1"])
    a = ad.AnnData(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), obs=obs, var=var)
    b = ad.AnnData(sp.csr_matrix(np.array([[1, 2, 5], [4, 5, 8]], dtype=np.float64)), obs=obs.copy(), var=var)
    other = ad.AnnData(np.ones((2, 3), np.float32), obs=obs.copy(), var=pd.DataFrame(index=["A", "B", "C"]))
    paths = [str(d / "part_one.h5ad"), str(d / "part_two.zarr"), str(d / "other_vars.h5ad")]
    a.write_h5ad(paths[0])
    b.write_zarr(paths[1])
    other.write_h5ad(paths[2])
    return paths, (a, b, other)


@pytest.mark.parametrize(
    ("kwargs", "files"),
    [
        ({"encode_labels": ["feat1"]}, [0, 1]),  # encode_labels without obs_keys
        ({"obs_keys": "feat1", "encode_labels": ["feat3"]}, [0, 1]),  # encode_labels not in obs_keys
        ({"obs_keys": "feat1", "unknown_label": {"feat3": "Unknown"}}, [0, 1]),  # unknown_label key not encoded
        ({"obs_keys": "feat1", "join": "inner"}, [0, 2]),  # no shared variables
    ],
)
def test_lamindb_value_errors(two_files, kwargs, files):
    """What lamindb raises as ValueError is a CollectionError that ``except ValueError`` catches."""
    paths, _ = two_files
    with pytest.raises(ValueError) as info:
        MappedCollection([paths[i] for i in files], **kwargs)
    assert isinstance(info.value, CollectionError)


# -- 16: an unknown_label that no file holds -----------------------------------------------------


def test_unknown_label_absent_everywhere_accepted(two_files):
    paths, _ = two_files
    # lamindb: the label is removed from the merged categories only if present, so it gets no code
    mc = MappedCollection(paths[:2], obs_keys=["feat1", "feat2"], unknown_label="Unknown")
    assert mc.encoders == {"feat1": {"A": 0, "B": 1}, "feat2": {"A": 0, "B": 1}}
    assert [mc[i]["feat1"] for i in range(4)] == [0, 1, 0, 1]
    per_key = MappedCollection(paths[:2], obs_keys=["feat1", "feat2"], unknown_label={"feat1": "Unknown", "feat2": "A"})
    assert per_key.encoders == {"feat1": {"A": 0, "B": 1}, "feat2": {"A": -1, "B": 0}}
    assert [per_key[i]["feat2"] for i in range(4)] == [-1, 0, -1, 0]


# -- 17: items keep each file's stored dtype ------------------------------------------------------


@pytest.mark.parametrize("join", ["inner", "outer", None])
def test_item_dtype_is_the_files(two_files, join):
    """dtype=None: h5ad float32 rows stay float32 next to a float64 Zarr file (lamindb's per-file dtype)."""
    paths, refs = two_files
    mc = MappedCollection(paths[:2], join=join, obsm_keys=None)
    for i in range(4):
        f, row = divmod(i, 2)
        item = mc[i]
        expect = refs[f].X[row].toarray().ravel() if sp.issparse(refs[f].X) else refs[f].X[row]
        assert item["X"].dtype == refs[f].X.dtype
        np.testing.assert_array_equal(item["X"], expect)
    batch = mc.__getitems__([3, 0])
    assert [b["X"].dtype for b in batch] == [np.float64, np.float32]
    # a collection-wide array needs one dtype: dask and batches use the common one
    assert mc.to_dask().dtype == np.float64
    assert next(mc.iter_batches(4, shuffle=False))["X"].dtype == np.float64
    cast = MappedCollection(paths[:2], join=join, dtype="float16")
    assert {cast[i]["X"].dtype for i in range(4)} == {np.dtype(np.float16)}


# -- 18: items and batches agree on labels; missing values are not categories ----------------------


@pytest.fixture(scope="module")
def lacking_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("lacking")
    var = pd.DataFrame(index=["a", "b", "c"])
    rng = np.random.default_rng(0)
    obs1 = pd.DataFrame(
        {
            "ct": pd.Categorical(rng.choice(["x", "y", "z"], 40)),
            "n": pd.array(rng.integers(0, 4, 40), dtype="Int64"),
        },
        index=[f"a{i}" for i in range(40)],
    )
    obs1.loc[obs1.index[5], "ct"] = np.nan
    obs1.loc[obs1.index[[2, 9]], "n"] = pd.NA
    one = ad.AnnData(rng.random((40, 3)).astype(np.float32), obs=obs1, var=var)
    two = ad.AnnData(rng.random((30, 3)).astype(np.float32), obs=pd.DataFrame(index=[f"b{i}" for i in range(30)]), var=var)
    paths = [str(d / "one.h5ad"), str(d / "two.zarr")]
    one.write_h5ad(paths[0])
    two.write_zarr(paths[1])  # lacks both obs keys
    return paths, one


@pytest.mark.parametrize("encode", [True, False])
def test_epoch_labels_equal_items(lacking_key, encode):
    paths, _ = lacking_key
    mc = MappedCollection(paths, obs_keys=["ct", "n"], encode_labels=encode)
    items = [mc[i] for i in range(mc.n_obs)]
    seen = []
    for batch in mc.iter_batches(7, block_size=4, preload_blocks=2, seed=5):
        for j, i in enumerate(batch["_index"].tolist()):
            seen.append(i)
            for key in ("ct", "n"):
                assert _same(batch[key][j], items[i][key]), (i, key, batch[key][j], items[i][key])
    assert sorted(seen) == list(range(mc.n_obs))
    if encode:  # missing labels exist: float with NaN, the same values as the items'
        assert next(mc.iter_batches(5, shuffle=False))["ct"].dtype == np.float64
        full = MappedCollection(paths[:1], obs_keys="ct", obs_filter={"ct": ["x", "y", "z"]})
        assert next(full.iter_batches(5, shuffle=False))["ct"].dtype == np.int64  # nothing missing: int codes


def test_nullable_missing_values_not_categories(lacking_key):
    """Deliberate (docs/differences-mapped.md): NaN is never a category, so codes stay 0..K-1."""
    paths, one = lacking_key
    mc = MappedCollection(paths, obs_keys="n")
    present = sorted(one.obs["n"].dropna().unique().tolist())
    assert mc.get_merged_categories("n") == present
    assert mc.encoders["n"] == {v: i for i, v in enumerate(present)}
    assert mc[2]["n"] is np.nan and mc[9]["n"] is np.nan
    assert mc[0]["n"] == mc.encoders["n"][one.obs["n"].iloc[0]]


# -- 19: obs_to_dask keeps integer dtypes ----------------------------------------------------------


def test_obs_to_dask_integer_dtypes(tmp_path):
    big = 2**53 + 1  # not representable in float64
    var = pd.DataFrame(index=["a", "b"])
    obs1 = pd.DataFrame(
        {
            "id": np.array([big, 1, 2], dtype=np.int64),
            "small": np.array([1, 2, 3], dtype=np.int32),
            "na": pd.array([big, None, 3], dtype="Int64"),
            "flag": np.array([True, False, True]),
        },
        index=["c0", "c1", "c2"],
    )
    obs2 = pd.DataFrame(
        {"id": np.array([big + 2, 7], dtype=np.int64), "small": np.array([4, 5], dtype=np.int32), "na": pd.array([5, 6], dtype="Int64")},
        index=["d0", "d1"],
    )
    paths = [str(tmp_path / "one.h5ad"), str(tmp_path / "two.zarr")]
    ad.AnnData(np.ones((3, 2), np.float32), obs=obs1, var=var).write_h5ad(paths[0])
    ad.AnnData(np.ones((2, 2), np.float32), obs=obs2, var=var).write_zarr(paths[1])
    ref = pd.concat([ad.read_h5ad(paths[0]).obs, ad.read_zarr(paths[1]).obs], join="outer")
    mc = MappedCollection(paths, obs_keys=["id", "small", "na", "flag"])
    ddf = mc.obs_to_dask()
    df = ddf.compute(scheduler="sync")
    assert dict(ddf.dtypes) == dict(df.dtypes)  # meta matches the partitions
    assert df["id"].dtype == np.int64 and df["id"].tolist() == [big, 1, 2, big + 2, 7]
    assert df["small"].dtype == np.int32
    assert df["na"].dtype == pd.Int64Dtype()  # values missing: nullable integers, exact
    assert df["na"].tolist()[0] == big and df["na"].isna().tolist() == [False, True, False, False, False]
    assert df["flag"].dtype == pd.BooleanDtype()  # the zarr file lacks it
    assert df["flag"].isna().tolist() == ref["flag"].isna().tolist()
    for key in ("id", "small", "na"):
        assert df[key].astype(object).where(df[key].notna(), None).tolist() == ref[key].astype(object).where(ref[key].notna(), None).tolist()
    only_first = MappedCollection(paths[:1], obs_keys=["flag"]).obs_to_dask().compute(scheduler="sync")
    assert only_first["flag"].dtype == np.bool_


# -- 20: the deliberate differences are written down ----------------------------------------------


def test_differences_page_linked_from_readme():
    page = os.path.join(REPO, "docs", "differences-mapped.md")
    assert os.path.exists(page)
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## AnnData collections: `MappedCollection`") :]
    section = section[: section.index("\n## ", 1)]
    assert "docs/differences-mapped.md" in section
    text = open(page, encoding="utf-8").read()
    for topic in ("CSC", "storage_options", "same keys", "filled", "NaN"):
        assert re.search(re.escape(topic), text), topic
