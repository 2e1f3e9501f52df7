"""MappedCollection against anndata (the reference reader), lamindb (the peer) and real files."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
import zipfile
from functools import reduce

import anndata as ad
import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_loom import MappedCollection
from dask_loom.anndata import open_store
from dask_loom.cluster import compute
from dask_loom.errors import (
    AnnDataFormatError,
    CollectionError,
    CollectionIndexError,
    ElementNotFoundError,
)

CELL_TYPES = np.array(["B", "T", "NK", "Mono"], dtype=object)


def _obs(n: int, seed: int, *, batch: bool = True, nullable: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ct = pd.Categorical(rng.choice(CELL_TYPES[: 3 + seed % 2], n), categories=CELL_TYPES[: 3 + seed % 2])
    ct[3] = np.nan  # one missing label per file
    df = pd.DataFrame({"cell_type": ct, "n": rng.integers(0, 3, n).astype(np.int64)}, index=[f"f{seed}c{i}" for i in range(n)])
    if batch:
        df["batch"] = pd.Categorical([f"b{seed}"] * (n - 2) + ["shared"] * 2)
    if nullable:
        v = pd.array(rng.integers(0, 5, n), dtype="Int64")
        v[1] = pd.NA
        df["count_na"] = v
    return df


def _counts(shape: tuple[int, int], seed: int, density: float = 0.4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.negative_binomial(2, 0.4, size=shape) * (rng.random(shape) < density)).astype(np.float32)


def _write(tmp) -> tuple[list[str], list[ad.AnnData]]:
    """Four files: dense h5ad, CSR zarr v2, sharded CSR zarr v3 (float64), zipped zarr with CSC X."""
    warnings.simplefilter("ignore")
    paths, refs = [], []
    # 0: h5ad, dense X, CSR int layer, obsm, nullable column
    a = ad.AnnData(_counts((30, 6), 0), obs=_obs(30, 0, nullable=True), var=pd.DataFrame(index=[f"g{i}" for i in range(6)]))
    a.layers["counts"] = sp.csr_matrix(_counts((30, 6), 10).astype(np.int32))
    a.obsm["emb"] = np.random.default_rng(0).random((30, 2)).astype(np.float32)
    paths.append(str(tmp / "a.h5ad"))
    a.write_h5ad(paths[-1])
    refs.append(a)
    # 1: zarr v2 directory, CSR X, other var order and genes, no `batch`, no `counts`
    b = ad.AnnData(
        sp.csr_matrix(_counts((25, 5), 1)), obs=_obs(25, 1, batch=False), var=pd.DataFrame(index=["g5", "g4", "g2", "g6", "g7"])
    )
    b.obsm["emb"] = np.random.default_rng(1).random((25, 2)).astype(np.float32)
    paths.append(str(tmp / "b.zarr"))
    b.write_zarr(paths[-1])
    refs.append(b)
    # 2: zarr v3, X CSR float64 in shards of 4 chunks
    c = ad.AnnData(
        sp.csr_matrix(_counts((40, 6), 2).astype(np.float64)), obs=_obs(40, 2), var=pd.DataFrame(index=["g3", "g0", "g1", "g2", "g4", "g5"])
    )
    c.layers["counts"] = sp.csr_matrix(_counts((40, 6), 12).astype(np.int32))
    c.obsm["emb"] = np.random.default_rng(2).random((40, 2)).astype(np.float32)
    paths.append(str(tmp / "c.zarr"))
    with ad.settings.override(zarr_write_format=3):
        c.write_zarr(paths[-1])
        import zarr

        g = zarr.open_group(paths[-1], mode="r+", use_consolidated=False)
        del g["X"]
        ad.io.write_elem(g, "X", c.X, dataset_kwargs={"chunks": (16,), "shards": (64,)})
        zarr.consolidate_metadata(paths[-1])
    refs.append(c)
    # 3: zipped zarr v2, X stored CSC
    d = ad.AnnData(sp.csc_matrix(_counts((20, 6), 3)), obs=_obs(20, 3), var=pd.DataFrame(index=[f"g{i}" for i in range(1, 7)]))
    d.obsm["emb"] = np.random.default_rng(3).random((20, 2)).astype(np.float32)
    tmpdir = tmp / "d.zarr"
    d.write_zarr(str(tmpdir))
    paths.append(str(tmp / "d.zarr.zip"))
    with zipfile.ZipFile(paths[-1], "w") as zf:
        for root, _dirs, files in os.walk(tmpdir):
            for fn in files:
                full = os.path.join(root, fn)
                zf.write(full, os.path.relpath(full, tmpdir))
    shutil.rmtree(tmpdir)
    refs.append(d)
    warnings.resetwarnings()
    return paths, refs


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("mapped"))


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _joint_reference(refs, join):
    var_list = [pd.Index(r.var_names) for r in refs]
    if join == "inner":
        joint = reduce(pd.Index.intersection, var_list)
    else:
        joint = reduce(pd.Index.union, var_list)
    mats = []
    for r in refs:
        df = pd.DataFrame(_dense(r.X), columns=r.var_names)
        mats.append(df.reindex(columns=joint, fill_value=0).to_numpy())
    return joint, mats


def _ref_label(value, encoder):
    if pd.isna(value):
        return None
    return encoder[value] if encoder is not None else value


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_items_equal_anndata(coll, join):
    paths, refs = coll
    mc = MappedCollection(paths, layers_keys=["X", "counts"], obs_keys=["cell_type", "batch", "n"], obsm_keys="emb", join=join)
    joint, mats = _joint_reference(refs, join)
    assert list(mc.var_joint) == list(joint)
    assert mc.shape == (sum(r.n_obs for r in refs), len(joint))
    cats = sorted(set().union(*[set(r.obs["cell_type"].cat.categories) for r in refs]))
    assert mc.encoders["cell_type"] == {c: i for i, c in enumerate(cats)}
    assert mc.get_merged_categories("batch") == sorted({"b0", "b2", "b3", "shared"})
    k = 0
    for f, r in enumerate(refs):
        for row in range(r.n_obs):
            item = mc[k]
            assert list(item) == ["_store_idx", "X", "counts", "obsm_emb", "cell_type", "batch", "n"]
            assert item["_store_idx"] == f
            assert isinstance(item["_store_idx"], np.integer)
            np.testing.assert_array_equal(item["X"], mats[f][row])
            assert item["X"].dtype == r.X.dtype  # each file's stored dtype (float32, float64), as lamindb
            if "counts" in r.layers:
                np.testing.assert_array_equal(
                    item["counts"], pd.DataFrame(_dense(r.layers["counts"]), columns=r.var_names).reindex(columns=joint, fill_value=0).to_numpy()[row]
                )
                assert item["counts"].dtype == np.int32
            else:  # documented fill: a layer absent from a file gives a row of 0 (integer dtype)
                assert (item["counts"] == 0).all()
                assert len(item["counts"]) == len(joint)
            np.testing.assert_array_equal(item["obsm_emb"], r.obsm["emb"][row])
            ct = r.obs["cell_type"].iloc[row]
            if pd.isna(ct):
                assert item["cell_type"] is np.nan
            else:
                assert item["cell_type"] == mc.encoders["cell_type"][ct]
                assert type(item["cell_type"]) is int
            if "batch" in r.obs:
                assert item["batch"] == mc.encoders["batch"][r.obs["batch"].iloc[row]]
            else:
                assert item["batch"] is np.nan
            assert item["n"] == mc.encoders["n"][r.obs["n"].iloc[row]]
            k += 1
    mc.close()
    assert mc.closed


def test_join_none_and_equal_vars(coll):
    paths, refs = coll
    mc = MappedCollection([paths[0], paths[0]], join="inner")
    assert mc.join_vars is None
    assert mc.var_indices is None
    assert list(mc.var_joint) == list(refs[0].var_names)
    mc2 = MappedCollection(paths[:2], join=None)
    assert mc2.shape == (55, None)
    assert mc2.var_joint is None
    assert mc2.original_shapes == [(30, None), (25, None)]
    np.testing.assert_array_equal(mc2[30]["X"], _dense(refs[1].X)[0])
    with pytest.raises(CollectionError, match="different widths"):
        mc2.to_dask()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-115, 114), min_size=0, max_size=40))
def test_getitems_equal_getitem(coll_mc, idx):
    mc = coll_mc
    batch = mc.__getitems__(idx)
    assert len(batch) == len(idx)
    for i, item in zip(idx, batch):
        one = mc[i]
        assert list(item) == list(one)
        for k in one:
            if isinstance(one[k], np.ndarray):
                np.testing.assert_array_equal(item[k], one[k])
            elif one[k] is np.nan:
                assert item[k] is np.nan
            else:
                assert item[k] == one[k]


@pytest.fixture(scope="module")
def coll_mc(coll):
    paths, _ = coll
    return MappedCollection(paths, layers_keys=["X", "counts"], obs_keys=["cell_type", "batch"], obsm_keys=["emb"], join="outer")


def test_unknown_label_filter_and_weights(coll):
    paths, refs = coll
    obs = pd.concat([r.obs[["cell_type"]].astype(object) for r in refs])
    mc = MappedCollection(paths, obs_keys=["cell_type", "batch"], unknown_label={"cell_type": "NK"}, encode_labels=["cell_type"])
    assert mc.encoders["cell_type"]["NK"] == -1
    ref = obs["cell_type"].to_numpy()
    for k in np.flatnonzero(ref == "NK")[:3]:
        assert mc[int(k)]["cell_type"] == -1
    assert isinstance(mc[0]["batch"], str)  # not encoded: the label itself
    # weights: 1 / class count, NaN (missing, or file without the key) its own class
    labels = mc.get_merged_labels("cell_type")
    assert len(labels) == mc.n_obs
    w = mc.get_label_weights("cell_type")
    counts = pd.Series(labels.astype(str)).value_counts()
    np.testing.assert_allclose(w, 1.0 / counts[labels.astype(str)].to_numpy())
    both = mc.get_label_weights(["cell_type", "batch"], scaler=10, return_categories=True)
    assert set(both) == {f"{a}__{b}" for a, b in zip(labels.astype(str), mc.get_merged_labels("batch").astype(str))}
    # a label no file holds is accepted, as lamindb does: it gets no code
    absent = MappedCollection(paths, obs_keys="cell_type", unknown_label="Platypus")
    assert absent.encoders["cell_type"] == {c: i for i, c in enumerate(sorted(set(CELL_TYPES)))}
    # obs_filter: AND over columns, NaN matches missing, a file without the column gives no rows
    f = MappedCollection(paths, obs_keys="cell_type", obs_filter={"cell_type": ["B", np.nan], "batch": ("shared", "b0")})
    keep = []
    for r in refs:
        if "batch" not in r.obs:
            keep.append(np.zeros(r.n_obs, bool))
            continue
        ct = r.obs["cell_type"].astype(object)
        keep.append(((ct == "B") | ct.isna()).to_numpy() & r.obs["batch"].isin(["shared", "b0"]).to_numpy())
    assert f.n_obs_list == [int(k.sum()) for k in keep]
    np.testing.assert_array_equal(f.indices, np.concatenate([np.flatnonzero(k) for k in keep]))
    assert len(f.get_merged_labels("cell_type")) == f.n_obs
    with pytest.warns(FutureWarning):
        MappedCollection(paths[:1], obs_keys="cell_type", obs_filter=("cell_type", "B"))


def test_csc_and_zip_equal_anndata(coll):
    paths, refs = coll
    mc = MappedCollection(paths[3:])
    assert open_store(paths[3]).kind == "zarr-zip"
    ref = _dense(refs[3].X)
    got = np.stack([mc[i]["X"] for i in range(mc.n_obs)])
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(mc.to_dask().compute(), ref)


def test_to_dask(coll, local_cluster):
    paths, refs = coll
    mc = MappedCollection(paths, layers_keys=["X", "counts"], obs_keys="cell_type", join="outer")
    _joint, mats = _joint_reference(refs, "outer")
    ref = np.concatenate(mats)
    x = mc.to_dask(target_bytes=256)
    assert x.shape == ref.shape
    assert x.dtype == np.float64
    assert all(k[0].startswith("mapped-read-") for k in dict(x.__dask_graph__()))
    # every block lies inside one file
    edges = np.cumsum((0, *x.chunks[0]))
    assert set(np.cumsum(mc.n_obs_list)) <= set(edges.tolist())
    assert len(x.chunks[0]) > len(paths)
    np.testing.assert_array_equal(x.compute(scheduler="threads"), ref)
    (mean,) = compute(x.mean(axis=0), client=local_cluster)
    np.testing.assert_allclose(mean, ref.mean(axis=0))
    s = mc.to_dask(sparse=True)
    blocks = s.compute(scheduler="sync")
    assert sp.issparse(blocks)
    np.testing.assert_array_equal(blocks.toarray(), ref)
    per_gene = s.map_blocks(lambda b: np.asarray(b.sum(axis=0)), chunks=(1, s.shape[1]), dtype=s.dtype, meta=np.empty((0, 0))).sum(axis=0)
    np.testing.assert_allclose(per_gene.compute(scheduler="threads"), ref.sum(axis=0))
    # obs_filter applied to the dask view as well
    f = MappedCollection(paths, obs_filter={"cell_type": "B"}, join="outer")
    keep = np.concatenate([(r.obs["cell_type"] == "B").to_numpy() for r in refs])
    np.testing.assert_array_equal(f.to_dask().compute(), ref[keep])
    with pytest.raises(ElementNotFoundError, match="spliced"):
        mc.to_dask("spliced")


def test_obs_and_xarray(coll):
    paths, refs = coll
    mc = MappedCollection(paths, obs_keys=["cell_type", "batch", "n"], join="inner")
    ddf = mc.obs_to_dask()
    assert ddf.npartitions == len(paths)
    df = ddf.compute()
    ref = pd.concat([r.obs for r in refs], join="outer")
    assert list(df.index) == list(ref.index)
    assert list(df["cell_type"].astype(object).fillna("NA")) == list(ref["cell_type"].astype(object).fillna("NA"))
    assert list(df["batch"].astype(object).fillna("NA")) == list(ref["batch"].astype(object).fillna("NA"))
    np.testing.assert_array_equal(df["n"].to_numpy(dtype=float), ref["n"].to_numpy(dtype=float))
    with dask.config.set(scheduler="sync"):
        ds = mc.to_xarray()
    assert ds["X"].dims == ("obs", "var")
    assert list(ds["var"].values) == list(mc.var_joint)
    assert list(ds["obs_names"].values) == list(ref.index)
    _joint, mats = _joint_reference(refs, "inner")
    np.testing.assert_array_equal(ds["X"].values, np.concatenate(mats))


def test_iter_batches(coll):
    paths, refs = coll
    mc = MappedCollection(paths, layers_keys=["X", "counts"], obs_keys=["cell_type", "batch"], obsm_keys="emb", join="outer")
    _joint, mats = _joint_reference(refs, "outer")
    ref = np.concatenate(mats)
    codes = np.array([np.nan if pd.isna(v) else mc.encoders["cell_type"][v] for r in refs for v in r.obs["cell_type"]])
    runs = [list(mc.iter_batches(8, block_size=4, preload_blocks=3, seed=7)) for _ in range(2)]
    for a, b in zip(*runs):  # deterministic with a seed
        np.testing.assert_array_equal(a["_index"], b["_index"])
    order = np.concatenate([b["_index"] for b in runs[0]])
    assert sorted(order.tolist()) == list(range(mc.n_obs))  # every row exactly once
    assert [len(b["_index"]) for b in runs[0]] == [8] * (mc.n_obs // 8) + ([mc.n_obs % 8] if mc.n_obs % 8 else [])
    assert not np.array_equal(order, np.arange(mc.n_obs))
    other = np.concatenate([b["_index"] for b in mc.iter_batches(8, block_size=4, preload_blocks=3, seed=8)])
    assert not np.array_equal(order, other)
    for b in runs[0]:
        np.testing.assert_array_equal(b["X"], ref[b["_index"]])
        np.testing.assert_array_equal(b["cell_type"], codes[b["_index"]])
        np.testing.assert_array_equal(b["_store_idx"], mc.storage_idx[b["_index"]])
        for j, i in enumerate(b["_index"][:2]):
            item = mc[int(i)]
            np.testing.assert_array_equal(b["obsm_emb"][j], item["obsm_emb"])
            np.testing.assert_array_equal(b["counts"][j], item["counts"])
    seq = np.concatenate([b["_index"] for b in mc.iter_batches(16, shuffle=False)])
    np.testing.assert_array_equal(seq, np.arange(mc.n_obs))
    dl = list(mc.iter_batches(16, drop_last=True, seed=1, prefetch=0))
    assert all(len(b["_index"]) == 16 for b in dl)
    assert len(dl) == mc.n_obs // 16
    sparse = list(mc.iter_batches(16, sparse=True, seed=3))
    assert all(sp.issparse(b["X"]) for b in sparse)
    for b in sparse:
        np.testing.assert_array_equal(b["X"].toarray(), ref[b["_index"]])
    # shards (ranks x workers) partition the epoch
    seen = np.concatenate(
        [
            b["_index"]
            for rank in range(2)
            for w in range(3)
            for b in __import__("dask_loom.anndata._loader", fromlist=["x"]).iter_batches(
                mc, 5, seed=11, block_size=3, rank=rank, world_size=2, worker=w, num_workers=3
            )
        ]
    )
    assert sorted(seen.tolist()) == list(range(mc.n_obs))


def test_batch_diversity(coll):
    """Block shuffling mixes labels almost like a fully random order (entropy per batch)."""
    paths, _refs = coll
    mc = MappedCollection(paths, obs_keys="batch", encode_labels=True)

    def entropy(codes):
        _, c = np.unique(codes, return_counts=True)
        p = c / c.sum()
        return float(-(p * np.log2(p)).sum())

    codes_all = np.concatenate(mc._codes["batch"])
    block = np.mean([entropy(b["batch"]) for b in mc.iter_batches(16, block_size=4, preload_blocks=8, seed=0)])
    rand = np.mean([entropy(codes_all[np.random.default_rng(0).permutation(mc.n_obs)[i : i + 16]]) for i in range(0, mc.n_obs, 16)])
    seq = np.mean([entropy(b["batch"]) for b in mc.iter_batches(16, shuffle=False)])
    assert seq < block <= rand + 0.5
    assert block > 0.6 * rand


def test_pickle_and_spec(coll):
    paths, _ = coll
    mc = MappedCollection(paths, obs_keys="cell_type", join="outer")
    mc2 = pickle.loads(pickle.dumps(mc))
    for i in (0, 31, 60, 114):
        np.testing.assert_array_equal(mc2[i]["X"], mc[i]["X"])


def test_bad_input(coll, tmp_path, data_dir):
    paths, _refs = coll
    with pytest.raises(FileNotFoundError, match=r"nope.h5ad"):
        MappedCollection([paths[0], str(tmp_path / "nope.h5ad")])
    txt = tmp_path / "notes.h5ad"
    txt.write_text("hello")
    with pytest.raises(AnnDataFormatError, match=r"notes.h5ad.*not an AnnData"):
        MappedCollection([str(txt)])
    with pytest.raises(AnnDataFormatError, match=r"test_2019.loom.*no 'obs'"):
        MappedCollection([str(data_dir / "loom/loompy-test/test_2019.loom")])
    with pytest.raises(ElementNotFoundError, match="layer 'spliced' is absent from every file"):
        MappedCollection(paths, layers_keys="spliced")
    with pytest.raises(ElementNotFoundError, match="obs column 'tissue'"):
        MappedCollection(paths, obs_keys="tissue")
    disjoint = tmp_path / "disjoint.h5ad"
    ad.AnnData(np.ones((2, 2), np.float32), var=pd.DataFrame(index=["zz1", "zz2"])).write_h5ad(disjoint)
    with pytest.raises(CollectionError, match="shared variables"):
        MappedCollection([paths[0], str(disjoint)], join="inner")
    mc = MappedCollection(paths[:2])
    with pytest.raises(CollectionIndexError, match=r"index 55 is out of range.*55 rows"):
        mc[55]
    with pytest.raises(CollectionIndexError):
        mc.__getitems__([0, -56])
    # obs of another length than X
    bad = tmp_path / "bad.h5ad"
    shutil.copy(paths[0], bad)
    import h5py

    with h5py.File(bad, "r+") as f:
        idx = f["obs/_index"][:-1]
        attrs = dict(f["obs/_index"].attrs)
        del f["obs/_index"]
        f["obs/_index"] = idx
        f["obs/_index"].attrs.update(attrs)
    with pytest.raises(AnnDataFormatError, match=r"bad.h5ad: X has 30 rows but obs has 29.*'obs'"):
        MappedCollection([str(bad)])
    with pytest.raises(CollectionError, match="encode_labels"):
        MappedCollection(paths, obs_keys="cell_type", encode_labels=["batch"])


# -- real files -------------------------------------------------------------------------

H5AD = [
    "anndata-archives/v0.7.0/adata.h5ad",
    "anndata-archives/v0.7.8/adata.h5ad",
    "anndataR/example.h5ad",
    "cellrank/adata_100.h5ad",
    "cellrank/adata_50.h5ad",
    "cellxgene-schema/example_invalid_CL.h5ad",
    "cellxgene-schema/example_valid.h5ad",
    "cellxgene-schema/example_valid_2025-08.h5ad",
    "cellxgene/1e4dfec4-c0b2-46ad-a04e-ff3ffb3c0a8f.h5ad",
    "cellxgene/nan.h5ad",
    "kb-python/genes.h5ad",
    "scanpy-pbmc68k/10x_pbmc68k_reduced_2025.h5ad",
    "scanpy-pbmc68k/10x_pbmc68k_reduced_legacy.h5ad",
    "scanpy-tests/kbet-sim.h5ad",
    "scanpy-tests/neighbors_shortcut_ref.h5ad",
    "scanpy-tests/t-cells.h5ad",
    "scvelo-tests/dentategyrus_100obs_preprocessed.h5ad",
    "scvelo-tests/dentategyrus_50obs.h5ad",
    "scvelo-tests/dentategyrus_50obs_preprocessed.h5ad",
    "scvelo-tests/pancreas_100obs_preprocessed.h5ad",
    "scvelo-tests/pancreas_50obs.h5ad",
    "scvelo-tests/pancreas_50obs_preprocessed.h5ad",
    "squidpy/ligrec_pvalues_reference.h5ad",
    "squidpy/test_data.h5ad",
    "zellkonverter/krumsiek11.h5ad",
    "zellkonverter/krumsiek11_augmented_v0-8.h5ad",
]


def _categorical_columns(obs: pd.DataFrame) -> list[str]:
    return [c for c in obs.columns if isinstance(obs[c].dtype, pd.CategoricalDtype)][:3]


@pytest.mark.parametrize("rel", H5AD)
def test_real_h5ad_equal_anndata(data_dir, rel):
    path = data_dir / "anndata" / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ad.read_h5ad(path)
    cats = _categorical_columns(ref.obs)
    mc = MappedCollection([str(path)], obs_keys=cats or None, encode_labels=False)
    x = _dense(ref.X)
    assert mc.shape == ref.shape
    rows = sorted({0, ref.n_obs // 2, ref.n_obs - 1})
    items = mc.__getitems__(rows)
    for r, item in zip(rows, items):
        np.testing.assert_array_equal(item["X"], x[r])  # NaN positions included
        for c in cats:
            v = ref.obs[c].iloc[r]
            assert (item[c] is np.nan) if pd.isna(v) else item[c] == v
    np.testing.assert_array_equal(mc.to_dask().compute(scheduler="sync"), x)
    np.testing.assert_array_equal(list(mc.var_joint), list(ref.var_names))


def test_real_legacy_equals_2025(data_dir):
    """pre-0.7 compound obs/obsm, h5sparse raw.X and uns categories read as the >= 0.8 file."""
    base = data_dir / "anndata/scanpy-pbmc68k"
    keys = ["bulk_labels", "louvain", "phase", "n_genes"]
    kw = {"layers_keys": ["X", "raw.X"], "obs_keys": keys, "obsm_keys": ["X_pca"], "encode_labels": ["bulk_labels", "phase"]}
    old = MappedCollection([str(base / "10x_pbmc68k_reduced_legacy.h5ad")], **kw)
    new = MappedCollection([str(base / "10x_pbmc68k_reduced_2025.h5ad")], **kw)
    assert old.encoders == new.encoders
    ref = ad.read_h5ad(base / "10x_pbmc68k_reduced_2025.h5ad")
    for i in (0, 350, 699):
        a, b = old[i], new[i]
        assert list(a) == list(b)
        for k in keys:
            assert a[k] == b[k]
        np.testing.assert_array_equal(a["X"], b["X"])
        np.testing.assert_array_equal(a["raw.X"], ref.raw.X[i].toarray().ravel())
        np.testing.assert_array_equal(a["obsm_X_pca"], ref.obsm["X_pca"][i])
        np.testing.assert_array_equal(b["obsm_X_pca"], ref.obsm["X_pca"][i])


def test_real_nullable_and_csc(data_dir):
    path = data_dir / "anndata/anndataR/example.h5ad"
    ref = ad.read_h5ad(path)
    mc = MappedCollection([str(path)], layers_keys=["counts", "csc_counts"], obs_keys=["IntNA", "BoolNA", "leiden"], encode_labels=["leiden"])
    for i in (0, 1, 2, 49):
        item = mc[i]
        np.testing.assert_array_equal(item["csc_counts"], item["counts"])
        np.testing.assert_array_equal(item["counts"], ref.layers["counts"][i].toarray().ravel())
        for k in ("IntNA", "BoolNA"):
            v = ref.obs[k].iloc[i]
            assert (item[k] is np.nan) if pd.isna(v) else item[k] == v
    assert mc[0]["IntNA"] is np.nan
    assert mc[1]["BoolNA"] is np.nan
    assert np.bincount(mc.get_merged_labels("leiden").astype(int)).tolist() == ref.obs["leiden"].value_counts(sort=False).tolist()


def test_real_zarr_archives(data_dir):
    for v in ("v0.7.0", "v0.7.8"):
        base = data_dir / "anndata/anndata-archives" / v
        z = MappedCollection([str(base / "adata.zarr.zip")], layers_keys=["X", "array", "sparse"], obs_keys=["obs_cat", "cat_ordered", "int64"], obsm_keys="array")
        h = MappedCollection([str(base / "adata.h5ad")], layers_keys=["X", "array", "sparse"], obs_keys=["obs_cat", "cat_ordered", "int64"], obsm_keys="array")
        assert z.encoders == h.encoders
        for i in (0, 29):
            a, b = z[i], h[i]
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # anndata 0.11.4: no X at all
    with pytest.raises(ElementNotFoundError, match="layer 'X' is absent"):
        MappedCollection([str(data_dir / "anndata/anndata-archives/v0.11.4/adata.zarr.zip")])
    # anndataR's R writer: 1-based categorical codes and no `ordered` attribute
    store = data_dir / "anndata/anndataR/example_2024-11.zarr"
    with pytest.raises(AnnDataFormatError, match="obs/leiden"):
        MappedCollection([str(store)], obs_keys="leiden")
    mc = MappedCollection([str(store)], layers_keys=["X", "csc_counts"])
    ref = ad.read_h5ad(data_dir / "anndata/anndataR/example.h5ad")
    np.testing.assert_allclose(mc.to_dask().compute(), ref.X.toarray(), atol=2.4e-7 * 100, rtol=1e-6)
    np.testing.assert_array_equal(mc.to_dask("csc_counts").compute(), ref.layers["csc_counts"].toarray())


# -- the peer: lamindb -----------------------------------------------------------------


def test_same_items_as_lamindb(coll):
    lamin = pytest.importorskip("lamindb.core._mapped_collection")
    paths, _ = coll
    paths = paths[:3]  # lamindb refuses CSC (file 3)
    kw = {"obs_keys": ["cell_type", "n"], "obsm_keys": ["emb"], "join": "outer"}
    ours = MappedCollection(paths, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lamin.MappedCollection(paths, **kw)
    assert ours.encoders == theirs.encoders
    assert list(ours.var_joint) == list(theirs.var_joint)
    assert ours.original_shapes == theirs.original_shapes
    for i in range(0, ours.n_obs, 7):
        a, b = ours[i], theirs[i]
        assert list(a) == list(b)
        for k in b:
            if isinstance(b[k], np.ndarray):
                np.testing.assert_array_equal(a[k], b[k])
                assert a[k].dtype == b[k].dtype  # each file's stored dtype
            elif b[k] is np.nan:
                assert a[k] is np.nan
            else:
                assert a[k] == b[k]
                assert type(a[k]) is type(b[k])
    np.testing.assert_allclose(ours.get_label_weights("cell_type"), theirs.get_label_weights("cell_type"))


# -- cloud ------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_collection(coll, s3_server):
    s3fs = pytest.importorskip("s3fs")
    paths, _ = coll
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = s3_server["bucket"]
    urls = []
    for p in paths:
        name = os.path.basename(p)
        target = f"{bucket}/mapped/{name}"
        if os.path.isdir(p):
            fs.put(p, target, recursive=True)
        else:
            fs.put(p, target)
        urls.append(f"s3://{target}")
    local = MappedCollection(paths, obs_keys="cell_type", join="outer")
    remote = MappedCollection(urls, obs_keys="cell_type", join="outer", storage_options=s3_server["storage_options"])
    assert remote.shape == local.shape
    assert remote.encoders == local.encoders
    idx = list(range(0, local.n_obs, 3))
    for a, b in zip(remote.__getitems__(idx), local.__getitems__(idx)):
        np.testing.assert_array_equal(a["X"], b["X"])
        assert a["cell_type"] is b["cell_type"] or a["cell_type"] == b["cell_type"]
    np.testing.assert_array_equal(remote.to_dask().compute(scheduler="threads"), local.to_dask().compute())
