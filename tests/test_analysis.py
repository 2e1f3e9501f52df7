"""The analysis door: sparse blocks, lazy AnnData, the scanpy recipe, conversion into AnnData.

Everything is checked against an independent reference on the same data: the
numpy arrays loompy wrote (``loompy_file``), loompy's and anndata's own readers
(``anndata.io.read_loom``, ``scanpy.read_loom``, ``anndata.read_h5ad`` /
``read_zarr``), and scanpy in memory for the recipe.  Files are small and
generated (plus the real Loom files of ``../shared/data/loom``); a small
``dask_loom.block-size`` makes several blocks out of them.
"""

from __future__ import annotations

import pathlib
import shutil
import warnings

import dask
import dask.array as da
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import AnnDataFormatError, DaskLoomError, ElementNotFoundError, UnsupportedDtypeError

anndata = pytest.importorskip("anndata")
sc = pytest.importorskip("scanpy")

SMALL_BLOCKS = {"dask_loom.block-size": "48KiB"}  # several blocks on the 300 x 517 reference


def dense(x) -> np.ndarray:
    """numpy of a matrix, a CSR matrix or a dask array of either."""
    if isinstance(x, da.Array):
        x = x.compute(scheduler="sync")
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@pytest.fixture(scope="module")
def zarr_twin(loompy_file, tmp_path_factory):
    path, _ = loompy_file
    out = tmp_path_factory.mktemp("twin") / "ref.loom.zarr"
    with dask.config.set(SMALL_BLOCKS):  # small shards: the layers have several stored units
        dask_loom.convert(path, out, scheduler="sync")
    return out


@pytest.fixture(params=["loom", "loom.zarr"])
def loom_path(request, loompy_file, zarr_twin):
    """The loompy-written reference (``.loom``) or its ``.loom.zarr`` copy, with the reference arrays."""
    path, ref = loompy_file
    return (path if request.param == "loom" else zarr_twin), ref


def stored_chunks(path: pathlib.Path, layer: str) -> tuple[int, int]:
    """The layer's chunk shape as the file's own library reports it (h5py or zarr-python)."""
    internal = "matrix" if layer == "" else f"layers/{layer}"
    if str(path).endswith(".zarr"):
        import zarr

        return tuple(zarr.open_group(str(path), mode="r")[internal].chunks)
    with h5py.File(path, "r") as f:
        return tuple(f[internal].chunks)


def assert_aligned(
    chunks: tuple[tuple[int, ...], ...], stored: tuple[int, ...], shape: tuple[int, ...]
) -> None:
    """Every block boundary is a stored-chunk boundary or the array's edge."""
    for axis, sizes in enumerate(chunks):
        edges = np.cumsum(sizes)
        assert edges[-1] == shape[axis]
        inner = edges[:-1]
        assert np.all(inner % stored[axis] == 0), (axis, sizes, stored)


# -- 1. sparse, chunk-aligned blocks -----------------------------------------------------------


@pytest.mark.parametrize("layer", ["", "spliced"])
def test_sparse_blocks_equal_dense_and_align_with_chunks(loom_path, layer):
    path, ref = loom_path
    stored = stored_chunks(path, layer)
    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(path, "r") as ds:
        views = [ds.layers[layer].to_dask(sparse=True), ds.dask(layer, sparse=True)]
        for x in views:
            assert x.shape == ref[layer].shape
            assert isinstance(x._meta, sp.csr_matrix)
            assert x.numblocks[0] * x.numblocks[1] > 1  # the small block size gives several blocks
            assert_aligned(x.chunks, stored, x.shape)
            assert x.dtype == ref[layer].dtype
            for idx in np.ndindex(*x.numblocks):
                block = x.blocks[idx].compute(scheduler="sync")
                assert type(block) is sp.csr_matrix
                assert block.has_canonical_format
                sl = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(x.chunks, idx))
                np.testing.assert_array_equal(block.toarray(), ref[layer][sl])
        np.testing.assert_array_equal(dense(views[0]), ref[layer])
        # The dense view covers the same blocks.
        assert ds.layers[layer].to_dask().chunks == views[0].chunks


def test_sparse_reductions_match_numpy_without_densifying(loom_path, monkeypatch):
    path, ref = loom_path
    m = ref[""].astype(np.float64)
    labels = ref["ca"]["Clusters"]

    def refuse(*args, **kwargs):
        raise AssertionError("a sparse block was densified")

    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(path, "r") as ds:
        x = ds.layers[""].to_dask(sparse=True)
        # Reductions on CSR blocks must not go through a dense copy of the block.
        monkeypatch.setattr(sp.csr_matrix, "toarray", refuse)
        monkeypatch.setattr(sp.csr_matrix, "todense", refuse)
        funcs = [np.sum, np.mean, np.std, np.var, np.min, np.max, np.count_nonzero]
        for axis in (0, 1):
            got = dask_loom.map(x, funcs, axis=axis, scheduler="sync")
            for f, v in zip(funcs, got):
                np.testing.assert_allclose(v, f(m, axis=1 - axis), rtol=1e-6, err_msg=f.__name__)
        res, cats = dask_loom.aggregate(
            x, labels, axis=1, func=["sum", "mean", "count_nonzero"], return_labels=True, scheduler="sync"
        )
    monkeypatch.undo()
    np.testing.assert_array_equal(cats, np.unique(labels))
    for f, v in zip(["sum", "mean", "count_nonzero"], res):
        want = np.stack([getattr(np, f)(m[:, labels == c], axis=1) for c in cats], axis=1)
        np.testing.assert_allclose(v, want, rtol=1e-6, err_msg=f)


@st.composite
def loom_matrices(draw):
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 40))
    c0, c1 = draw(st.integers(1, n)), draw(st.integers(1, m))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    x = (rng.integers(-4, 9, (n, m)) * (rng.random((n, m)) < density)).astype(
        draw(st.sampled_from(["f4", "f8", "i4", "u2"]))
    )
    return x, (c0, c1), seed


@settings(max_examples=15, deadline=None)
@given(loom_matrices(), st.sampled_from(["numba", "numpy"]), st.integers(64, 4096))
def test_sparse_reduction_property(tmp_path_factory, arg, kernels, block):
    """Any matrix, chunking and block size: per-gene and per-cell sums/means/non-zeros on CSR blocks equal numpy's."""
    x, chunks, seed = arg
    path = tmp_path_factory.mktemp("prop") / "p.loom"
    with h5py.File(path, "w") as f:  # a minimal Loom file with the drawn chunk shape
        f.create_dataset("matrix", data=x, chunks=chunks, compression="gzip")
        for g in ("layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs"):
            f.create_group(g)
    labels = np.random.default_rng(seed).integers(0, 3, x.shape[1])
    with dask.config.set({"dask_loom.block-size": block, "dask_loom.kernels": kernels}):
        with dask_loom.connect(path, "r", validate=False) as ds:
            s = ds.layers[""].to_dask(sparse=True)
            t = ds.to_anndata().X
            assert_aligned(s.chunks, chunks, x.shape)
            assert_aligned(t.chunks, chunks[::-1], x.shape[::-1])
            funcs = [np.sum, np.mean, np.count_nonzero, np.max]
            want = x.astype(np.float64)
            for axis in (0, 1):
                for f, v in zip(funcs, dask_loom.map(s, funcs, axis=axis, scheduler="sync")):
                    np.testing.assert_allclose(v, f(want, axis=1 - axis), rtol=1e-6, err_msg=f.__name__)
                # The transposed (cells x genes) view reduces to the same numbers.
                for f, v in zip(funcs, dask_loom.map(t, funcs, axis=1 - axis, scheduler="sync")):
                    np.testing.assert_allclose(v, f(want, axis=1 - axis), rtol=1e-6, err_msg=f.__name__)
            got = dask_loom.aggregate(s, labels, axis=1, func="sum", scheduler="sync")
    cats = np.unique(labels)
    np.testing.assert_allclose(
        got, np.stack([want[:, labels == c].sum(axis=1) for c in cats], axis=1), rtol=1e-6
    )


# -- 2. lazy AnnData ---------------------------------------------------------------------------


def test_to_anndata_equals_connect_and_reference(loom_path):
    path, ref = loom_path
    with dask.config.set(SMALL_BLOCKS), dask_loom.connect(path, "r") as ds:
        a = ds.to_anndata()
        stored = stored_chunks(path, "")
        n_genes, n_cells = ds.shape
        assert a.shape == (n_cells, n_genes)
        assert isinstance(a.X, da.Array) and isinstance(a.X._meta, sp.csr_matrix)
        # Full-width row bands of whole chunks: scanpy's PCA wants chunks[1] == n_vars.
        assert a.X.chunks[1] == (n_genes,)
        assert len(a.X.chunks[0]) > 1
        assert_aligned(a.X.chunks, stored[::-1], a.shape)
        np.testing.assert_array_equal(dense(a.X), ds[:, :].T)
        np.testing.assert_array_equal(dense(a.layers["spliced"]), ds.layers["spliced"][:, :].T)
        d = ds.to_anndata(sparse=False, layers=[])
        assert isinstance(d.X._meta, np.ndarray) and not d.layers
        np.testing.assert_array_equal(dense(d.X), ref[""].T)
        ca, ra = ds.ca, ds.ra
    np.testing.assert_array_equal(dense(a.X), ref[""].T)
    np.testing.assert_array_equal(dense(a.layers["spliced"]), ref["spliced"].T)
    assert list(a.obs_names) == list(ref["ca"]["CellID"]) == list(ca["CellID"])
    assert list(a.var_names) == list(ref["ra"]["Gene"]) == list(ra["Gene"])
    np.testing.assert_array_equal(a.obs["Clusters"], ref["ca"]["Clusters"])
    np.testing.assert_array_equal(a.obs["ClusterName"], ref["ca"]["ClusterName"])
    np.testing.assert_allclose(a.obs["Total"], ref["ca"]["Total"])
    np.testing.assert_array_equal(a.var["Accession"], ref["ra"]["Accession"])
    np.testing.assert_allclose(a.var["Score"], ref["ra"]["Score"])
    np.testing.assert_allclose(a.varm["PCA"], ref["ra"]["PCA"])
    assert (a.obsp["KNN"] != ref["KNN"].tocsr()).nnz == 0
    assert (a.varp["RKNN"] != ref["RKNN"].tocsr()).nnz == 0


def _peer_read(reader, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(str(path), **kwargs)


@pytest.mark.parametrize("peer", ["anndata", "scanpy"])
@pytest.mark.parametrize(
    ("kwargs"),
    [{}, {"sparse": False, "X_name": "", "cleanup": True}, {"obsm_mapping": {"pair": ["Clusters", "Total"]}}],
)
def test_read_loom_equals_the_peers(loompy_file, zarr_twin, peer, kwargs):
    """dask_loom.read_loom(...) with scanpy's parameters: the peers' AnnData, lazily (and from .loom.zarr too)."""
    path, ref = loompy_file
    reader = anndata.io.read_loom if peer == "anndata" else sc.read_loom
    want = _peer_read(reader, path, **kwargs)
    for src in (path, zarr_twin):
        got = dask_loom.read_loom(src, **kwargs)
        assert isinstance(got.X, da.Array)
        assert got.shape == want.shape
        assert got.X.dtype == want.X.dtype
        assert sp.issparse(got.X._meta) == sp.issparse(want.X)
        np.testing.assert_array_equal(dense(got.X), dense(want.X))
        assert sorted(got.layers) == sorted(want.layers)
        for k in want.layers:
            if kwargs.get("sparse", True):
                # loompy's LoomLayer.sparse() widens every layer to float64; ours keep the stored dtype.
                assert got.layers[k].dtype == ref[k if k != "matrix" else ""].dtype, k
            else:
                assert got.layers[k].dtype == want.layers[k].dtype, k
            np.testing.assert_array_equal(dense(got.layers[k]), dense(want.layers[k]))
        pd.testing.assert_index_equal(got.obs_names, want.obs_names)
        pd.testing.assert_index_equal(got.var_names, want.var_names)
        assert sorted(got.obs.columns) == sorted(want.obs.columns)
        assert sorted(got.var.columns) == sorted(want.var.columns)
        for frame, peer_frame in ((got.obs, want.obs), (got.var, want.var)):
            for c in peer_frame.columns:
                np.testing.assert_array_equal(np.asarray(frame[c]), np.asarray(peer_frame[c]), err_msg=c)
        assert sorted(got.obsm) == sorted(want.obsm) and sorted(got.varm) == sorted(want.varm)
        for m, r in ((got.obsm, want.obsm), (got.varm, want.varm)):
            for k in r:
                np.testing.assert_allclose(
                    np.asarray(m[k], dtype=float), np.asarray(r[k], dtype=float), err_msg=k
                )
        assert got.uns.get("loom-obs", {}).keys() == want.uns.get("loom-obs", {}).keys()
        assert got.uns.get("loom-var", {}).keys() == want.uns.get("loom-var", {}).keys()
    eager = dask_loom.read_loom(path, lazy=False, **kwargs)
    assert not isinstance(eager.X, da.Array)
    np.testing.assert_array_equal(dense(eager.X), dense(want.X))


def _real_looms(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((root / "loom").rglob("*.loom"))


def test_read_loom_opens_every_real_file_connect_opens(data_dir):
    files = _real_looms(data_dir)
    if not files:
        pytest.skip(f"no .loom files under {data_dir / 'loom'}")
    opened = peer_checked = 0
    for fn in files:
        try:
            with dask_loom.connect(fn, "r", validate=False) as ds:
                matrix = ds[:, :]
                names = ds.layers.keys()
                layers = {k: ds.layers[k][:, :] for k in names if k}
        except DaskLoomError:
            continue  # a file connect refuses is out of scope here
        opened += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            got = dask_loom.read_loom(
                fn,
                sparse=True,
                cleanup=False,
                X_name="spliced",
                obs_names="CellID",
                var_names="Gene",
                dtype="float32",
            )
        assert got.shape == matrix.shape[::-1], fn.name
        np.testing.assert_allclose(dense(got.X), matrix.T.astype("float32"), err_msg=fn.name)
        for k, v in layers.items():
            np.testing.assert_array_equal(dense(got.layers[k]), v.T, err_msg=f"{fn.name}: {k}")
        try:
            want = _peer_read(anndata.io.read_loom, fn, validate=False)
        except Exception:
            continue
        peer_checked += 1
        np.testing.assert_allclose(dense(got.X), dense(want.X), err_msg=fn.name)
        pd.testing.assert_index_equal(got.obs_names, want.obs_names)
        pd.testing.assert_index_equal(got.var_names, want.var_names)
        for frame, peer_frame in ((got.obs, want.obs), (got.var, want.var)):
            for c in set(peer_frame.columns) & set(frame.columns):
                w = np.asarray(peer_frame[c])
                if w.dtype.names:  # anndata keeps a one-field compound attribute as is; we hold its field
                    w = w[w.dtype.names[0]]
                np.testing.assert_array_equal(np.asarray(frame[c]), w, err_msg=f"{fn.name}: {c}")
    assert opened == len(files), "connect should open every real Loom file"
    assert peer_checked >= 5


def _mapped_files(tmp: pathlib.Path) -> tuple[list[str], list]:
    """Three AnnData files written by anndata (h5ad CSR, Zarr v3 dense, h5ad CSC), genes partly shared."""
    rng = np.random.default_rng(7)
    refs, paths = [], []
    layout = [
        (70, [f"g{j}" for j in range(12)], "h5ad", sp.csr_matrix),
        (55, [f"g{j}" for j in range(3, 15)], "zarr", np.asarray),
        (40, [f"g{j}" for j in range(14, 1, -1)], "h5ad", sp.csc_matrix),
    ]
    for i, (n, genes, fmt, kind) in enumerate(layout):
        x = (rng.negative_binomial(2, 0.4, (n, len(genes))) * (rng.random((n, len(genes))) < 0.4)).astype(
            "float32"
        )
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n)), "n_counts": x.sum(1)},
            index=[f"f{i}_c{k}" for k in range(n)],
        )
        a = anndata.AnnData(kind(x), obs=obs, var=pd.DataFrame(index=genes))
        a.layers["counts"] = sp.csr_matrix(x.astype("int32"))
        a.obsm["emb"] = rng.random((n, 2)).astype("float32")
        p = tmp / f"m{i}.{fmt}"
        with warnings.catch_warnings(), anndata.settings.override(zarr_write_format=3):
            warnings.simplefilter("ignore")
            a.write_h5ad(p) if fmt == "h5ad" else a.write_zarr(p)
        refs.append(a)
        paths.append(str(p))
    return paths, refs


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    return _mapped_files(tmp_path_factory.mktemp("mapped"))


def test_mapped_to_anndata_equals_the_files(mapped):
    paths, refs = mapped
    want = anndata.concat(refs, join="inner")
    with dask_loom.MappedCollection(
        paths, layers_keys=["X", "counts"], obs_keys=["cell_type", "n_counts"], obsm_keys="emb", join="inner"
    ) as mc:
        a = mc.to_anndata()
        assert isinstance(a.X, da.Array) and isinstance(a.X._meta, sp.csr_matrix)
        assert a.shape == want.shape
        # Columns follow the collection's joint var order; compare by gene.
        order = want.var_names.get_indexer(a.var_names)
        assert (order >= 0).all()
        np.testing.assert_array_equal(dense(a.X), dense(want.X)[:, order])
        np.testing.assert_array_equal(dense(a.layers["counts"]), dense(want.layers["counts"])[:, order])
        np.testing.assert_array_equal(dense(mc.to_dask("X")), dense(a.X))
        pd.testing.assert_index_equal(a.obs_names, want.obs_names)
        np.testing.assert_array_equal(a.obs["cell_type"].astype(str), want.obs["cell_type"].astype(str))
        np.testing.assert_allclose(a.obs["n_counts"], want.obs["n_counts"])
        assert list(a.obs["store_idx"]) == [p for p, r in zip(paths, refs) for _ in range(r.n_obs)]
        np.testing.assert_allclose(dense(a.obsm["emb"]), want.obsm["emb"])
        with pytest.raises(ElementNotFoundError, match="m0.h5ad"):
            mc.to_anndata(obs_keys=["no_such_column"])
        with pytest.raises(ElementNotFoundError, match="no_such_layer"):
            mc.to_anndata(layers=["no_such_layer"])


# -- 4. the recipe -----------------------------------------------------------------------------


def _counts(n_genes: int, n_cells: int, seed: int) -> np.ndarray:
    """Negative-binomial counts with gene-specific means (genes x cells, Loom's layout)."""
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.4, 3.0, size=n_genes)[:, None]
    return rng.negative_binomial(2, 2 / (2 + mu), size=(n_genes, n_cells)).astype("float32")


@pytest.fixture(scope="module")
def recipe_loom(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "r.loom"
    x = _counts(300, 450, 11)
    ra = {"Gene": np.array([f"gene{i}" for i in range(x.shape[0])])}
    ca = {
        "CellID": np.array([f"cell{i}" for i in range(x.shape[1])]),
        "batch": np.array(["a", "b", "c"])[np.arange(x.shape[1]) % 3],
    }
    dask_loom.create(str(path), x, ra, ca)
    return path


def _assert_same_hvg(got, want, flavor, rtol=2e-4):
    cols = ["highly_variable", "means"] + (
        ["variances", "variances_norm"] if flavor == "seurat_v3" else ["dispersions", "dispersions_norm"]
    )
    for c in cols:
        g, w = np.asarray(got.var[c]), np.asarray(want.var[c])
        if g.dtype == bool:
            np.testing.assert_array_equal(g, w, err_msg=c)
        else:
            np.testing.assert_allclose(
                g.astype(float), w.astype(float), rtol=rtol, atol=1e-6, equal_nan=True, err_msg=c
            )


def _assert_same_pca(got, want, rtol=1e-3):
    np.testing.assert_allclose(
        got.uns["pca"]["variance_ratio"], want.uns["pca"]["variance_ratio"], rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(got.uns["pca"]["variance"], want.uns["pca"]["variance"], rtol=rtol)
    g, w = np.asarray(dense(got.obsm["X_pca"]), dtype=float), np.asarray(want.obsm["X_pca"], dtype=float)
    # Up to the sign of each component.
    signs = np.sign(np.sum(g * w, axis=0))
    np.testing.assert_allclose(g * signs, w, rtol=rtol, atol=rtol * np.abs(w).max())
    np.testing.assert_allclose(np.abs(got.varm["PCs"]), np.abs(want.varm["PCs"]), atol=rtol)


def _recipe(lib, a, flavor, n_comps, batch_key=None):
    """normalise -> log1p -> variable genes -> PCA with *lib* (scanpy.pp or dask_loom.pp)."""
    if flavor == "seurat_v3":  # Seurat v3 ranks raw counts; normalise afterwards
        lib.highly_variable_genes(a, flavor=flavor, n_top_genes=120, batch_key=batch_key)
        lib.normalize_total(a, target_sum=1e4)
        lib.log1p(a)
    else:
        lib.normalize_total(a, target_sum=1e4)
        lib.log1p(a)
        lib.highly_variable_genes(a, flavor=flavor, n_top_genes=120, batch_key=batch_key)
    lib.pca(a, n_comps=n_comps)
    return a


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
@pytest.mark.parametrize("impl", ["scanpy-on-lazy", "dask_loom.pp"])
def test_recipe_on_lazy_anndata_equals_scanpy_in_memory(recipe_loom, flavor, impl):
    if impl == "scanpy-on-lazy" and flavor == "seurat_v3":
        pytest.skip(
            "scanpy 1.11's seurat_v3 calls np.putmask on the matrix, which a dask array refuses; dask_loom.pp covers it"
        )
    want = _recipe(sc.pp, _peer_read(sc.read_loom, recipe_loom, X_name=""), flavor, 50)
    with dask.config.set({"dask_loom.block-size": "64KiB"}):
        lazy = dask_loom.read_loom(recipe_loom, X_name="")
        assert len(lazy.X.chunks[0]) > 1
        got = _recipe(sc.pp if impl == "scanpy-on-lazy" else dask_loom.pp, lazy, flavor, 50)
    assert isinstance(got.X, da.Array)  # still lazy after the whole recipe
    np.testing.assert_allclose(dense(got.X), dense(want.X), rtol=1e-5, atol=1e-5)
    # scanpy's own dask path (its sparse-dask covariance PCA) lands up to ~2e-3 from its
    # in-memory result; dask_loom.pp stays within 1e-3 (float64 partial sums).
    loose = impl == "scanpy-on-lazy"
    _assert_same_hvg(got, want, flavor, rtol=2e-3 if loose else 2e-4)
    _assert_same_pca(got, want, rtol=1e-2 if loose else 1e-3)


def test_recipe_batches_and_real_file(recipe_loom, data_dir):
    """A batch key, and a real Loom file (LoomExperiment's scle example, 200 genes x 100 cells of counts)."""
    want = _recipe(sc.pp, _peer_read(sc.read_loom, recipe_loom, X_name=""), "seurat", 15, batch_key="batch")
    got = _recipe(dask_loom.pp, dask_loom.read_loom(recipe_loom, X_name=""), "seurat", 15, batch_key="batch")
    np.testing.assert_array_equal(got.var["highly_variable_nbatches"], want.var["highly_variable_nbatches"])
    _assert_same_hvg(got, want, "seurat")
    _assert_same_pca(got, want)
    fn = data_dir / "loom" / "loomexperiment" / "legacy-2018" / "scle_example_2018.loom"
    if not fn.exists():
        pytest.skip(f"{fn} is absent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lazy = dask_loom.read_loom(fn, X_name="")
    mem = anndata.AnnData(dense(lazy.X), obs=lazy.obs.copy(), var=lazy.var.copy())
    mem.X = sp.csr_matrix(mem.X)
    for flavor in ("seurat", "cell_ranger", "seurat_v3"):
        w = _recipe(sc.pp, mem.copy(), flavor, 10)
        g = _recipe(dask_loom.pp, lazy.copy(), flavor, 10)
        _assert_same_hvg(g, w, flavor)
        _assert_same_pca(g, w)


@pytest.mark.parametrize("blocks", ["csr-numba", "csr-numpy", "dense"])
def test_recipe_fused_passes_equal_scanpy_in_memory(recipe_loom, blocks, monkeypatch):
    """normalize_total -> log1p(base 2) -> seurat variable genes per batch -> PCA, on each kind of block.

    On CSR blocks with the compiled (numba) kernels every pass reads the counts and
    transforms each value itself: no block is ever transformed step by step.
    The Gram pass splits the columns into dense ones (one BLAS product) and
    sparse ones (stored values only): the data have both kinds in every block.
    """
    from dask_loom.pp import _kernels

    want = _peer_read(sc.read_loom, recipe_loom, X_name="")
    want.X = sp.csr_matrix(want.X)
    with dask.config.set(
        {
            "dask_loom.block-size": "64KiB",
            "dask_loom.kernels": blocks.removeprefix("csr-").replace("dense", "auto"),
        }
    ):
        got = dask_loom.read_loom(recipe_loom, X_name="", sparse=blocks != "dense")
        assert len(got.X.chunks[0]) > 1
        block = dense(got.X.blocks[0])
        detected = (block != 0).mean(axis=0)
        assert (detected >= _kernels.DENSE_FRACTION).any() and (
            (detected > 0) & (detected < _kernels.DENSE_FRACTION)
        ).any()
        if blocks == "csr-numba":

            def refuse(*args, **kwargs):
                raise AssertionError("a pass transformed a block step by step")

            monkeypatch.setattr(_kernels.Pending, "apply", refuse)
        for lib, a in ((sc.pp, want), (dask_loom.pp, got)):
            lib.normalize_total(a, target_sum=1e4)
            lib.log1p(a, base=2)
            lib.highly_variable_genes(a, flavor="seurat", n_top_genes=80, batch_key="batch")
            lib.pca(a, n_comps=20)
    np.testing.assert_array_equal(got.var["highly_variable_nbatches"], want.var["highly_variable_nbatches"])
    _assert_same_hvg(got, want, "seurat")
    _assert_same_pca(got, want)


# -- bad input ---------------------------------------------------------------------------------


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_non_numeric_layer_is_refused(loompy_file, tmp_path):
    src, _ = loompy_file
    path = tmp_path / "text.loom"
    shutil.copy(src, path)
    with h5py.File(path, "r+") as f:
        n, m = f["matrix"].shape
        f.create_dataset("layers/names", data=np.full((n, m), b"x", dtype="S1"), chunks=(64, 64))
    with dask_loom.connect(path, "r", validate=False) as ds:
        for make in (
            lambda: ds.layers["names"].to_dask(sparse=True),
            lambda: ds.to_anndata(layers=["names"]),
            lambda: ds.to_anndata(X_name="names", sparse=False),
        ):
            with pytest.raises(UnsupportedDtypeError, match="text.loom.*names.*not numeric"):
                make()
    with pytest.raises(UnsupportedDtypeError, match="text.loom"):
        dask_loom.read_loom(path, X_name="names")


def test_missing_keys_are_named(loompy_file):
    path, _ = loompy_file
    with dask_loom.connect(path, "r") as ds:
        with pytest.raises(ElementNotFoundError, match=r"ref.loom.*layer 'nope'"):
            ds.to_anndata(layers=["nope"])
        with pytest.raises(ElementNotFoundError, match=r"ref.loom.*column attribute 'nope'"):
            ds.to_anndata(obsm_mapping={"x": ["Total", "nope"]})
    with pytest.raises(ElementNotFoundError, match=r"ref.loom.*row attribute 'nope'"):
        dask_loom.read_loom(path, varm_mapping={"x": ["nope"]})


def test_csr_with_inconsistent_indptr_is_refused(tmp_path):
    a = anndata.AnnData(sp.csr_matrix(_counts(8, 30, 3).T))
    path = tmp_path / "bad.h5ad"
    a.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        indptr = f["X/indptr"][:]
        indptr[-1] += 5  # points past the stored data
        f["X/indptr"][...] = indptr
    with dask_loom.MappedCollection([str(path)]) as mc:
        with pytest.raises(AnnDataFormatError, match="bad.h5ad") as info:
            dense(mc.to_anndata().X)
    assert "indptr" in str(info.value)


# -- 3. conversion into AnnData, streamed --------------------------------------------------------


def _read_back(path: pathlib.Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_zarr(str(path)) if str(path).endswith(".zarr") else anndata.read_h5ad(path)


def _leftovers(folder: pathlib.Path, keep: set[str]) -> list[str]:
    """Entries of *folder* other than *keep* and their writer lock files (temporary copies, partial outputs)."""
    locks = {f".{k}.dask-loom.lock" for k in keep}
    return sorted(p.name for p in folder.iterdir() if p.name not in keep | locks)


@pytest.mark.parametrize("out", ["cells.zarr", "cells.h5ad"])
def test_write_anndata_reads_back_equal_to_connect(loom_path, tmp_path, out):
    path, ref = loom_path
    dst = tmp_path / out
    with dask.config.set({"dask_loom.block-size": "256KiB"}):
        dask_loom.write_anndata(path, dst, scheduler="threads")
    assert _leftovers(tmp_path, {out}) == []
    a = _read_back(dst)
    with dask_loom.connect(path, "r") as ds:
        X, spliced = ds[:, :], ds.layers["spliced"][:, :]
        ca, ra = ds.ca, ds.ra
        knn, rknn = ds.col_graphs["KNN"], ds.row_graphs["RKNN"]
    assert isinstance(a.X, sp.csr_matrix) and a.X.has_canonical_format
    assert a.X.dtype == X.dtype and a.layers["spliced"].dtype == spliced.dtype
    np.testing.assert_array_equal(a.X.toarray(), X.T)
    np.testing.assert_array_equal(a.layers["spliced"].toarray(), spliced.T)
    assert isinstance(a.layers["spliced"], sp.csr_matrix)
    assert list(a.obs_names) == list(ca["CellID"]) and list(a.var_names) == list(ra["Gene"])
    for c in ("Clusters", "ClusterName", "Total"):
        np.testing.assert_array_equal(np.asarray(a.obs[c]), ca[c], err_msg=c)
    for c in ("Accession", "Score"):
        np.testing.assert_array_equal(np.asarray(a.var[c]), ra[c], err_msg=c)
    np.testing.assert_allclose(a.varm["PCA"], ra["PCA"])
    assert (a.obsp["KNN"] != knn.tocsr()).nnz == 0 and (a.varp["RKNN"] != rknn.tocsr()).nnz == 0
    np.testing.assert_array_equal(a.X.toarray(), ref[""].T)
    if out.endswith(".zarr"):
        import zarr

        g = zarr.open_group(str(dst), mode="r")
        assert g.metadata.zarr_format == 3
        assert g.attrs["encoding-type"] == "anndata"
        data = g["X/data"]
        # Shards of about dask_loom.block-size (256 KiB of float32), whole chunks of 65,536 values.
        assert data.shards == (65536,) and data.chunks == (65536,)
        assert g["layers/spliced/indptr"].shape == (X.shape[1] + 1,)


def test_write_anndata_shards_follow_block_size(loompy_file, tmp_path):
    path, ref = loompy_file
    import zarr

    with dask.config.set({"dask_loom.block-size": "1MiB"}):
        dask_loom.write_anndata(path, tmp_path / "s.zarr", scheduler="sync")
    dask_loom.write_anndata(path, tmp_path / "u.zarr", sharded=False, scheduler="sync")
    s, u = (
        zarr.open_group(str(tmp_path / "s.zarr"), mode="r"),
        zarr.open_group(str(tmp_path / "u.zarr"), mode="r"),
    )
    assert s["X/data"].shards == (4 * 65536,)  # 1 MiB of float32 values
    assert u["X/data"].shards is None
    for g in (s, u):
        m = sp.csr_matrix(
            (g["X/data"][:], g["X/indices"][:], g["X/indptr"][:]), shape=tuple(g["X"].attrs["shape"])
        )
        np.testing.assert_array_equal(m.toarray(), ref[""].T)


@pytest.mark.parametrize("out", ["joined.zarr", "joined.h5ad"])
def test_write_anndata_from_mapped_collection(mapped, tmp_path, out):
    paths, refs = mapped
    want = anndata.concat(refs, join="inner")
    with dask_loom.MappedCollection(
        paths, layers_keys=["X", "counts"], obs_keys=["cell_type"], obsm_keys="emb", join="inner"
    ) as mc:
        lazy = mc.to_anndata()
        dask_loom.write_anndata(mc, tmp_path / out, scheduler="sync")
    a = _read_back(tmp_path / out)
    assert a.shape == want.shape and isinstance(a.X, sp.csr_matrix)
    order = want.var_names.get_indexer(a.var_names)
    assert list(a.var_names) == list(lazy.var_names)
    np.testing.assert_array_equal(a.X.toarray(), dense(want.X)[:, order])
    np.testing.assert_array_equal(a.layers["counts"].toarray(), dense(want.layers["counts"])[:, order])
    pd.testing.assert_index_equal(a.obs_names, want.obs_names)
    np.testing.assert_array_equal(a.obs["cell_type"].astype(str), want.obs["cell_type"].astype(str))
    np.testing.assert_allclose(a.obsm["emb"], want.obsm["emb"])
    assert _leftovers(tmp_path, {out}) == []


def test_write_anndata_refuses_an_existing_target(loompy_file, tmp_path):
    from dask_loom.errors import TargetExistsError

    path, ref = loompy_file
    for name in ("old.h5ad", "old.zarr"):
        dst = tmp_path / name
        dask_loom.write_anndata(path, dst, layers=[], scheduler="sync")
        before = _listing(dst) if dst.is_dir() else dst.read_bytes()
        with pytest.raises(TargetExistsError, match=f"{name}.*overwrite=True") as info:
            dask_loom.write_anndata(path, dst, scheduler="sync")
        assert isinstance(info.value, FileExistsError)
        assert (_listing(dst) if dst.is_dir() else dst.read_bytes()) == before
        dask_loom.write_anndata(path, dst, overwrite=True, scheduler="sync")
        a = _read_back(dst)
        assert list(a.layers) == ["spliced"]
        np.testing.assert_array_equal(a.layers["spliced"].toarray(), ref["spliced"].T)


def test_failed_conversion_leaves_nothing(loompy_file, tmp_path):
    src, _ = loompy_file
    text = tmp_path / "text.loom"
    shutil.copy(src, text)
    with h5py.File(text, "r+") as f:
        n, m = f["matrix"].shape
        f.create_dataset("layers/names", data=np.full((n, m), b"x", dtype="S1"), chunks=(64, 64))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.zarr", "a.h5ad"):
        with pytest.raises(UnsupportedDtypeError, match="text.loom.*names"):
            dask_loom.write_anndata(text, out / name, scheduler="sync")
    # A CSR whose indptr runs past its data: found while streaming, after some bands were written.
    bad = anndata.AnnData(sp.csr_matrix(_counts(8, 300, 5).T))
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with h5py.File(tmp_path / "bad.h5ad", "r+") as f:
        indptr = f["X/indptr"][:]
        indptr[-1] += 5
        f["X/indptr"][...] = indptr
    with dask_loom.MappedCollection([str(tmp_path / "bad.h5ad")]) as mc:
        for name in ("b.zarr", "b.h5ad"):
            with dask.config.set({"dask_loom.block-size": "4KiB"}):
                with pytest.raises(AnnDataFormatError, match="bad.h5ad"):
                    dask_loom.write_anndata(mc, out / name, scheduler="sync")
    assert _leftovers(out, set()) == []
    with pytest.raises(dask_loom.errors.FormatError, match="h5ad or"):
        dask_loom.write_anndata(src, out / "c.txt")
    with pytest.raises(dask_loom.errors.UnsupportedSchemeError, match="s3://bucket/c.zarr.*local"):
        dask_loom.write_anndata(src, "s3://bucket/c.zarr")


def test_cli_convert_into_anndata(loompy_file, tmp_path, capsys):
    from dask_loom.cli import main

    path, ref = loompy_file
    for name in ("cells.zarr", "cells.h5ad"):
        dst = tmp_path / name
        assert main(["convert", str(path), str(dst), "--scheduler", "sync"]) == 0
        assert f"wrote {dst} (AnnData)" in capsys.readouterr().err
        a = _read_back(dst)
        np.testing.assert_array_equal(a.X.toarray(), ref[""].T)
        np.testing.assert_array_equal(a.layers["spliced"].toarray(), ref["spliced"].T)
        assert list(a.obs_names) == list(ref["ca"]["CellID"])
        before = _listing(dst) if dst.is_dir() else dst.read_bytes()
        assert main(["convert", str(path), str(dst)]) == 1
        err = capsys.readouterr().err
        assert err == f"dask-loom convert: error: {dst}: exists; pass overwrite=True to replace it\n"
        assert (_listing(dst) if dst.is_dir() else dst.read_bytes()) == before
        assert main(["convert", str(path), str(dst), "--overwrite", "--scheduler", "sync"]) == 0
        np.testing.assert_array_equal(_read_back(dst).X.toarray(), ref[""].T)
    # A .loom.zarr target is still a Loom container.
    assert main(["convert", str(path), str(tmp_path / "c.loom.zarr"), "--scheduler", "sync"]) == 0
    with dask_loom.connect(tmp_path / "c.loom.zarr", "r") as ds:
        np.testing.assert_array_equal(ds[:, :], ref[""])
    assert main(["convert", str(path), str(tmp_path / "d.zarr"), "--chunks", "8,8"]) == 1
    assert "--chunks applies to Loom" in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists()


def test_docstring_examples_run():
    import doctest

    import dask_loom._csr
    import dask_loom.analysis._write

    for mod in (dask_loom.analysis._write, dask_loom._csr):
        failed, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
        assert tried and not failed, mod.__name__


@pytest.mark.s3
def test_lazy_anndata_and_conversion_from_object_store(s3_server, loompy_file, zarr_twin, tmp_path):
    """A .loom.zarr and an HDF5 .loom on S3 (a local S3 server): read_loom, to_anndata, write_anndata."""
    import uuid

    import s3fs

    path, ref = loompy_file
    opts = s3_server["storage_options"]
    prefix = f"{s3_server['bucket']}/{uuid.uuid4().hex}"
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(path), f"{prefix}/ref.loom")
    fs.put(str(zarr_twin), f"{prefix}/ref.loom.zarr", recursive=True)
    for name in ("ref.loom", "ref.loom.zarr"):
        url = f"s3://{prefix}/{name}"
        a = dask_loom.read_loom(url, X_name="", storage_options=opts)
        assert isinstance(a.X, da.Array) and isinstance(a.X._meta, sp.csr_matrix)
        np.testing.assert_array_equal(dense(a.X), ref[""].T.astype("float32"))
        np.testing.assert_array_equal(dense(a.layers["spliced"]), ref["spliced"].T)
        out = tmp_path / f"{name}.h5ad"
        dask_loom.write_anndata(url, out, storage_options=opts, scheduler="sync")
        back = _read_back(out)
        np.testing.assert_array_equal(back.X.toarray(), ref[""].T)
        assert list(back.obs_names) == list(ref["ca"]["CellID"])


@pytest.mark.parametrize(
    ("name", "out"),
    [
        ("scopeloomr/example.loom", "zarr"),  # compound attributes -> obsm/varm data frames
        ("loomexperiment/L1_DRG_20_example.loom", "h5ad"),  # graphs with float64 indices -> obsp
        ("loomexperiment/legacy-2018/scle_example_2018.loom", "zarr"),  # nested groups, 2-D attributes
    ],
)
def test_write_anndata_real_files(data_dir, tmp_path, name, out):
    fn = data_dir / "loom" / name
    if not fn.exists():
        pytest.skip(f"{fn} is absent")
    dst = tmp_path / f"x.{out}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dask_loom.write_anndata(fn, dst, scheduler="sync")
        want = dask_loom.read_loom(fn, X_name="", dtype=None, lazy=False)
    a = _read_back(dst)
    with dask_loom.connect(fn, "r", validate=False) as ds:
        np.testing.assert_array_equal(a.X.toarray(), ds[:, :].T)
    pd.testing.assert_index_equal(a.obs_names, want.obs_names)
    pd.testing.assert_index_equal(a.var_names, want.var_names)
    assert sorted(a.obsm) == sorted(want.obsm) and sorted(a.varm) == sorted(want.varm)
    assert sorted(a.obsp) == sorted(want.obsp)
    for m, r in ((a.obsm, want.obsm), (a.varm, want.varm)):
        for k in r:
            np.testing.assert_allclose(
                np.asarray(m[k], dtype=float), np.asarray(r[k], dtype=float), err_msg=k
            )
    for k in want.obsp:
        assert (a.obsp[k] != want.obsp[k]).nnz == 0
    for c in want.obs.columns:
        np.testing.assert_array_equal(np.asarray(a.obs[c]), np.asarray(want.obs[c]), err_msg=c)


def test_write_anndata_of_an_anndata_and_layer_choice(loompy_file, mapped, tmp_path):
    """An AnnData (the lazy one read_loom gives, or one in memory) is written as it is; *layers* picks layers."""
    path, ref = loompy_file
    lazy = dask_loom.read_loom(path, X_name="")
    dask_loom.write_anndata(lazy, tmp_path / "lazy.zarr", layers=["spliced"], scheduler="sync")
    a = _read_back(tmp_path / "lazy.zarr")
    assert list(a.layers) == ["spliced"]
    np.testing.assert_array_equal(a.X.toarray(), ref[""].T)
    np.testing.assert_array_equal(a.layers["spliced"].toarray(), ref["spliced"].T)
    mem = anndata.AnnData(
        ref[""].T.copy(), obs=pd.DataFrame(index=[f"c{i}" for i in range(ref[""].shape[1])])
    )
    dask_loom.write_anndata(mem, tmp_path / "mem.h5ad")
    np.testing.assert_array_equal(_read_back(tmp_path / "mem.h5ad").X.toarray(), ref[""].T)
    with pytest.raises(ElementNotFoundError, match="nope"):
        dask_loom.write_anndata(lazy, tmp_path / "no.zarr", layers=["nope"])
    paths, refs = mapped
    with dask_loom.MappedCollection(paths, layers_keys=["X", "counts"]) as mc:
        dask_loom.write_anndata(mc, tmp_path / "x_only.h5ad", layers=[], scheduler="sync")
    b = _read_back(tmp_path / "x_only.h5ad")
    assert not b.layers and b.n_obs == sum(r.n_obs for r in refs)
    assert _leftovers(tmp_path, {"lazy.zarr", "mem.h5ad", "x_only.h5ad"}) == []
