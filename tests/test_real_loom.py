"""Every Loom file in the shared real-data folder opens with the values its MANIFEST pins."""

from __future__ import annotations

import base64
import json
import warnings
import zlib

import h5py
import loompy
import numpy as np
import pytest

import dask_loom
from dask_loom.errors import LoomFormatError


def _open(data_dir, rel):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = dask_loom.connect(data_dir / "loom" / rel, "r", validate=False)
    return ds, [str(x.message) for x in w]


@pytest.mark.parametrize(
    "rel, shape, spec, total, dtype",
    [
        ("loompy-test/test_2018-07.loom", (1000, 100), "2.0.1", 100.0, "float64"),
        ("loompy-test/test_2019.loom", (20, 200), "3.0.0", 0.0, "float64"),
        ("kb-python/genes.loom", (17, 29), "3.0.0", 2.0, "float32"),
        ("loomexperiment/L1_DRG_20_example.loom", (20, 20), "2.0.1", 1039.0, "float64"),
        ("loomexperiment/legacy-2018/L1_abrev_2018-05.loom", (10, 10), "0.0.0", 270.0, "float64"),
        ("loomexperiment/legacy-2018/example_2018-02.loom", (20, 6), "0.0.0", 14.508639329800227, "float64"),
        ("loomexperiment/legacy-2018/rle_example_2018.loom", (200, 6), "0.0.0", 10696.957564388831, "float64"),
        ("loomexperiment/legacy-2018/scle_example_2018.loom", (200, 100), "0.0.0", 100297.0, "int32"),
        ("loomexperiment/legacy-2018/sle_example_2018.loom", (200, 6), "0.0.0", 10657.231921882729, "float64"),
        ("scopeloomr/example.loom", (50, 100), "0.0.0", 2418.0, "float64"),
    ],
)
def test_every_file_opens_with_pinned_values(data_dir, rel, shape, spec, total, dtype):
    ds, _ = _open(data_dir, rel)
    with ds:
        assert ds.shape == shape and ds.spec_version == spec
        m = ds[:, :]
        assert str(m.dtype) == dtype
        assert float(m.sum()) == pytest.approx(total, rel=1e-12)
        with loompy.connect(str(data_dir / "loom" / rel), "r", validate=False) as lp:
            np.testing.assert_array_equal(m, lp[:, :])
            for name in lp.layers.keys():
                np.testing.assert_array_equal(ds.layers[name][:, :], lp.layers[name][:, :])
        # map runs on every writer's chunking.
        np.testing.assert_allclose(ds.map([np.sum], axis=1)[0], m.sum(axis=0))


def test_loompy_2018_diagonal(data_dir):
    ds, _ = _open(data_dir, "loompy-test/test_2018-07.loom")
    with ds:
        m = ds[:, :]
        np.testing.assert_array_equal(np.flatnonzero(m.ravel()), np.arange(100) * 100 + np.arange(100))
        np.testing.assert_array_equal(ds.ra.g_id, np.arange(1000))
        np.testing.assert_array_equal(ds.ca.c_id, np.arange(100))
        assert ds.attrs.LOOM_SPEC_VERSION == "2.0.1"
        assert isinstance(ds.attrs.CreationDate, str)


def test_loompy_2019_strings(data_dir):
    ds, _ = _open(data_dir, "loompy-test/test_2019.loom")
    with ds:
        # The file holds A..I, L, J..S (read here with h5py as the reference).
        with h5py.File(data_dir / "loom/loompy-test/test_2019.loom", "r") as f:
            raw = [b.decode() for b in f["row_attrs/Gene"][()]]
        assert ds.ra.Gene.tolist() == raw and raw[0] == "A" and raw[-1] == "S"
        assert ds.ra.Gene.dtype == object


def test_kb_python_entries_and_names(data_dir):
    ds, _ = _open(data_dir, "kb-python/genes.loom")
    with ds:
        m = ds[:, :]
        np.testing.assert_array_equal(np.argwhere(m), [[0, 9], [0, 15]])
        assert ds.ra.var_names[0] == "ENSMUSG00000026034"
        assert ds.ca.obs_names[9] == "CGTAGCGTCATTATCC" and ds.ca.obs_names[15] == "GATTCAGTCCACGTGG"


def test_loomexperiment_byte_array_roots_and_float_graphs(data_dir):
    ds, _ = _open(data_dir, "loomexperiment/L1_DRG_20_example.loom")
    with ds:
        assert ds.attrs.CreatedWith == "LoomExperiment-1.3.3"
        assert ds.ra.Gene[:2].tolist() == ["Nnat", "Rasl10a"]
        assert set(ds.ca.Class) == {"Neurons"}
        assert ds.ca.CellID[0] == "10X43_2_ACTCGAGTTCAG-"
        assert len(ds.ca) == 104 and len(ds.ra) == 8
        with pytest.warns(UserWarning, match="col_graphs/KNN/a.*float64"):
            knn = ds.col_graphs.KNN
        assert knn.nnz == 282 and knn.row.dtype.kind == "i"
        with h5py.File(data_dir / "loom/loomexperiment/L1_DRG_20_example.loom", "r") as f:
            np.testing.assert_array_equal(knn.row, f["col_graphs/KNN/a"][()].astype(int))
        assert ds.col_graphs.MKNN.nnz == 152


def test_nested_groups_are_skipped_by_name(data_dir):
    ds, msgs = _open(data_dir, "loomexperiment/legacy-2018/L1_abrev_2018-05.loom")
    with ds:
        ds.ra.keys()
    assert any("row_attrs/granges1" in m for m in msgs)
    with pytest.raises(LoomFormatError, match="col_graphs/KNN/a.*1-based"):
        ds2, _ = _open(data_dir, "loomexperiment/legacy-2018/L1_abrev_2018-05.loom")
        with ds2:
            ds2.col_graphs.KNN


def test_nested_groups_flattened_when_per_row(data_dir):
    ds, _ = _open(data_dir, "loomexperiment/legacy-2018/rle_example_2018.loom")
    with ds:
        assert "GRanges/start" in ds.ra
        assert ds.ra["GRanges/seqnames"][0] == "chr1"
        assert ds.ra["GRanges/feature_id"][0] == "ID001"
        assert ds.ca.Treatment[0] == "ChIP"
    ds, _ = _open(data_dir, "loomexperiment/legacy-2018/scle_example_2018.loom")
    with ds:
        assert ds.ca["reducedDims/PCA"].shape == (100, 5)
        assert ds.ca["reducedDims/tSNE"].shape == (100, 2)
        assert ds.layers["logcounts"].shape == (200, 100)


def test_scope_compound_enum_and_metadata(data_dir):
    ds, _ = _open(data_dir, "scopeloomr/example.loom")
    with ds:
        emb = ds.ca.Embedding
        assert emb.dtype.names == ("_X", "_Y") and emb.shape == (100,)
        assert ds.ra.Regulons.dtype.names == ("gene_5", "gene_7", "gene_21", "gene_36")
        assert ds.ra.Gene[0] == "gene_1" and ds.ca.CellID[99] == "cell_100"
        meta = json.loads(zlib.decompress(base64.b64decode(ds.attrs.MetaData)))
        assert meta["embeddings"] == [{"id": "-1", "name": "t-SNE on full expression matrix"}]
        assert ds.col_graphs.keys() == [] and ds.row_graphs.keys() == []


def test_legacy_file_is_not_modified(data_dir, tmp_path):
    import hashlib
    import shutil

    src = data_dir / "loom/scopeloomr/example.loom"
    path = tmp_path / "example.loom"
    shutil.copy(src, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with dask_loom.connect(path, "r+", validate=False) as ds:  # loompy's r+ renames *_edges in place
        ds[:, :]
        ds.col_graphs.keys()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_unicode_strings_round_trip(tmp_path):
    path = tmp_path / "u.loom"
    names = np.array(["café", "ü", "a&amp;b", "日本"])
    dask_loom.create(path, np.ones((4, 2), "f4"), {"Gene": names}, {"CellID": np.array(["x", "y"])})
    with dask_loom.connect(path, "r") as ds:
        assert ds.ra.Gene.tolist() == names.tolist()
    with h5py.File(path, "r") as f:
        assert f["row_attrs/Gene"][0] == "café".encode()
