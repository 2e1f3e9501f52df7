"""Pseudobulk without pandas or scipy (issue 13): the same numbers.

Opening a MappedCollection and aggregating its CSR rows by an obs key runs on
numpy alone: var names stay object arrays until ``var_joint`` is asked for,
labels are mapped by dictionary, and rows are added into their groups from
the stored CSR arrays (``csr_row_group_partials``).  Each piece is checked
against pandas, scipy or anndata doing the same thing; that a cold process
imports neither is checked in ``test_first_call``.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import dask_loom
from dask_loom._lazy import isna, isna_numpy
from dask_loom.anndata._elems import map_labels
from dask_loom.ops._kernels import csr_group_partials, csr_row_group_partials


@given(
    st.integers(0, 40),
    st.integers(1, 9),
    st.floats(0, 1),
    st.integers(1, 5),
    st.integers(1, 50),
    st.sampled_from(["f4", "f8", "i4", "u2"]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_row_group_kernel_matches_scipy_and_numpy(n, m, density, n_groups, piece, dtype, special, seed):
    """Sums, squares, counts and sizes by row group, in pieces of any size, unsorted indices."""
    rng = np.random.default_rng(seed)
    dense = (rng.integers(-5, 6, (n, m)) * (rng.random((n, m)) < density)).astype(dtype)
    if special and dense.dtype.kind == "f" and n:
        dense[rng.integers(0, n), rng.integers(0, m)] = np.nan
        dense[rng.integers(0, n), rng.integers(0, m)] = np.inf
    x = sp.csr_matrix(dense)
    # indices unsorted within each row (as a join leaves them): reverse every row's entries
    data, indices = x.data.copy(), x.indices.copy()
    for r in range(n):
        a, b = x.indptr[r], x.indptr[r + 1]
        data[a:b], indices[a:b] = data[a:b][::-1], indices[a:b][::-1]
    idx = rng.integers(0, n_groups, n)
    needs = ("n", "nnz", "s1", "s2")
    got = csr_row_group_partials(data, indices, x.indptr, m, idx, n_groups, needs, piece_entries=piece)
    ref = csr_group_partials(x, 0, idx, n_groups, needs)
    d = dense.astype(np.float64)
    for key, want in (
        ("s1", [d[idx == g].sum(axis=0) for g in range(n_groups)]),
        ("s2", [(d[idx == g] ** 2).sum(axis=0) for g in range(n_groups)]),
        ("nnz", [(d[idx == g] != 0).sum(axis=0) for g in range(n_groups)]),
        ("n", [np.full(m, (idx == g).sum()) for g in range(n_groups)]),
    ):
        assert got[key].shape == (n_groups, m) and got[key].dtype == np.float64
        np.testing.assert_allclose(
            got[key],
            np.array(want, dtype=np.float64).reshape(n_groups, m),
            rtol=1e-12,
            equal_nan=True,
            err_msg=key,
        )
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, equal_nan=True, err_msg=key)


def test_row_group_kernel_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="min"):
        csr_row_group_partials(
            np.ones(1), np.zeros(1, np.int32), np.array([0, 1]), 1, np.zeros(1, np.int64), 1, ["min"]
        )


@pytest.mark.parametrize(
    "values",
    [
        np.array(["a", None, np.nan, "b", float("nan")], dtype=object),
        np.array([1.5, np.nan, -np.inf]),
        np.array([1, 2, 3]),
        np.array(["2020-01-01", "NaT"], dtype="datetime64[D]"),
        np.array([b"x", None, 3, np.float32("nan"), np.datetime64("NaT")], dtype=object),
        np.array([], dtype=object),
    ],
)
def test_isna_without_pandas_agrees_with_pandas(values):
    np.testing.assert_array_equal(isna_numpy(values), pd.isna(values))
    np.testing.assert_array_equal(isna(values), pd.isna(values))
    for v in values.tolist():
        assert isna_numpy(v) == pd.isna(v), v


def test_map_labels_agrees_with_pandas_map():
    labels = np.array(["T", "B", None, np.nan, "NK", "x", 3, 3.0, True], dtype=object)
    encoder = {"B": 0, "NK": 1, "T": 2, 3: 3}
    want = pd.Series(labels, dtype=object).map(encoder).fillna(-1).to_numpy(dtype=np.int64)
    got = map_labels(labels, encoder, -1)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(map_labels(np.array([], dtype=object), encoder, -2), np.empty(0, np.int64))


def _write_plain_labels(path, labels: np.ndarray) -> None:
    """Replace obs/ct by a plain string array (anndata writes strings as categoricals)."""
    import h5py

    with h5py.File(path, "r+") as f:
        del f["obs/ct"]
        ds = f["obs"].create_dataset("ct", data=np.asarray(labels, dtype=object), dtype=h5py.string_dtype())
        ds.attrs["encoding-type"] = "string-array"
        ds.attrs["encoding-version"] = "0.2.0"


@pytest.fixture(scope="module")
def joined_files(tmp_path_factory):
    """Three CSR h5ad files with different genes (one shared core); labels categorical, or plain strings (the third)."""
    import anndata as ad

    root = tmp_path_factory.mktemp("cold")
    rng = np.random.default_rng(5)
    genes = [
        [f"g{k}" for k in range(12)],
        [f"g{k}" for k in (11, 3, 0, 5, 7, 2, 20, 21)],
        [f"g{k}" for k in range(2, 14)],
    ]
    paths, adatas = [], []
    for i, names in enumerate(genes):
        n = 30 + 7 * i
        x = (rng.integers(0, 9, (n, len(names))) * (rng.random((n, len(names))) < 0.3)).astype("f4")
        ct = rng.choice(["B", "T", "NK"], n).astype(object)
        if i == 0:
            ct[[4, 17]] = np.nan  # missing labels: in no group
        obs = pd.DataFrame({"ct": pd.Categorical(ct)}, index=[f"f{i}c{j}" for j in range(n)])
        a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=names))
        paths.append(root / f"j{i}.h5ad")
        a.write_h5ad(paths[-1])
        if i == 2:
            _write_plain_labels(paths[-1], ct)
        adatas.append(a)
    return paths, adatas


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_pseudobulk_of_joined_files_matches_anndata(joined_files, join):
    """CSR rows moved into joined var space, labels categorical in some files and plain strings in another."""
    import anndata as ad

    paths, adatas = joined_files
    joined = ad.concat(adatas, join=join)
    x = np.asarray(joined.X.toarray(), dtype=np.float64)
    labels = joined.obs["ct"].astype(object).to_numpy()
    keep = ~pd.isna(labels)
    with dask_loom.MappedCollection(paths, obs_keys="ct", join=join) as mc:
        (s, m, v), cats = dask_loom.aggregate(
            mc, "ct", axis=0, func=["sum", "mean", "var"], return_labels=True
        )
        order = [list(mc.var_joint).index(g) for g in joined.var_names]
    assert list(cats) == ["B", "NK", "T"]
    for k, c in enumerate(cats):
        rows = x[keep & (labels == c)]
        np.testing.assert_allclose(s[k, order], rows.sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(m[k, order], rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(v[k, order], rows.var(axis=0), rtol=1e-9, atol=1e-12)


def test_var_names_are_read_without_pandas_and_offered_as_indexes(joined_files):
    paths, adatas = joined_files
    with dask_loom.MappedCollection(paths[:1] * 2, obs_keys="ct") as mc:  # the same genes twice: no join
        assert mc.join_vars is None
        assert isinstance(mc.var_joint, pd.Index)
        assert list(mc.var_joint) == list(adatas[0].var_names)
        assert mc.shape == (2 * adatas[0].n_obs, adatas[0].n_vars)
        assert [list(v) for v in mc.var_list] == [list(adatas[0].var_names)] * 2
        assert mc.check_vars_sorted() is False  # g0, g1, g10, g11, g2: not sorted as strings
        assert mc.check_vars_non_aligned(list(adatas[0].var_names)) == []
    with dask_loom.MappedCollection(paths, join=None) as mc:
        assert mc.var_joint is None and mc.var_list is None


def test_issparse_while_another_thread_imports_scipy(monkeypatch):
    """scipy.sparse is imported lazily now: a thread asking while another imports it (a half-made module) waits."""
    import types

    from dask_loom._lazy import issparse

    monkeypatch.setitem(sys.modules, "scipy.sparse", types.ModuleType("scipy.sparse"))  # no attributes yet
    assert issparse(sp.csr_matrix(np.eye(2)))
    assert not issparse(np.eye(2))
