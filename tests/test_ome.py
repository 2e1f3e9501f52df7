"""OME-Arrow: reading (records, Parquet, typed chunk datasets), tensor views, dask, writers, converters.

References: numpy on the same pixels, the real ``BR00117006.ome.parquet`` and
OME-TIFF samples (pins from shared/data/MANIFEST.md), tifffile, and the
``ome-arrow`` package itself (reader and writer) where it is installed.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time

import dask
import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dask.utils import key_split
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import (
    CorruptChunkError,
    MissingDependencyError,
    OMEArrowError,
    SelectionError,
    UnsupportedDtypeError,
)
from dask_loom.ome import _read
from dask_loom.ome._schema import OME_ARROW_BYTE_STRUCT, OME_ARROW_STRUCT, choose_chunk_shape

REAL = "ome/BR00117006.ome.parquet"
TZCHW = "TZCHW"
X = "\u00d7"  # the multiplication sign in messages


def ref_view(arr5: np.ndarray, *, t=None, z=None, c=None, roi=None, layout=None) -> np.ndarray:
    """numpy reference of a TensorView selection on a TCZYX array."""
    T, C, Z, Y, X = arr5.shape

    def idx(v, n):
        if v is None:
            return list(range(n))
        if isinstance(v, int):
            return [v % n]
        if isinstance(v, slice):
            return list(range(*v.indices(n)))
        return [i % n for i in v]

    ti, zi, ci = idx(t, T), idx(z, Z), idx(c, C)
    x, y, w, h = roi or (0, 0, X, Y)
    out = arr5[ti][:, ci][:, :, zi][..., y : y + h, x : x + w].transpose(0, 2, 1, 3, 4)  # TZCHW
    lay = (layout or ("CHW" if len(ti) == 1 and len(zi) == 1 else TZCHW)).upper().replace("Y", "H").replace("X", "W")
    for d in reversed(TZCHW):
        if d not in lay:
            out = out.squeeze(axis=TZCHW.index(d))
    cur = [d for d in TZCHW if d in lay]
    return out.transpose([cur.index(d) for d in lay])


@pytest.fixture(scope="module")
def arr5() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 60000, size=(2, 3, 4, 40, 50)).astype(np.uint16)


@pytest.fixture(scope="module")
def records(arr5):
    """The same image as records of every kind: ours, and ome-arrow's when installed."""
    recs = {
        "ours-list": dask_loom.to_ome_arrow(arr5, chunk_shape=(2, 16, 16)),
        "ours-bytes": dask_loom.to_ome_arrow(arr5, chunk_shape=(3, 16, 32), chunk_encoding="bytes"),
        "ours-zstd": dask_loom.to_ome_arrow(arr5, chunk_shape=(1, 40, 50), chunk_encoding="bytes", chunk_compression="zstd"),
    }
    try:
        import ome_arrow
    except ImportError:
        return recs
    recs["ref-list"] = ome_arrow.from_numpy(arr5, chunk_shape=(2, 16, 16))
    recs["ref-bytes"] = ome_arrow.from_numpy(arr5, chunk_shape=(3, 16, 16), chunk_encoding="bytes")
    recs["ref-planes"] = ome_arrow.from_numpy(arr5, build_chunks=False)
    return recs


# --------------------------------------------------------------------------- real file


def _pixels(path, column, row):
    rec = pq.read_table(path, columns=[column]).column(column)[row].as_py()
    pm = rec["pixels_meta"]
    return np.asarray(rec["planes"][0]["pixels"]).reshape(pm["size_y"], pm["size_x"])


@pytest.mark.parametrize("kind", ["AGP_OMEArrow_ORIG", "DNA_OMEArrow_ORIG", "RNA_OMEArrow_ORIG", "DNA_OMEArrow_LABL", "RNA_OMEArrow_LABL"])
def test_real_file_images(data_dir, kind):
    path = data_dir / REAL
    col = f"Image_FileName_Orig{kind}"
    sizes = [(72, 84), (67, 84), (73, 97)]
    for row in range(3):
        v = dask_loom.open_ome_arrow(path, column=col, row_index=row)
        a = v.to_numpy()
        assert v.layout == "CHW"
        assert a.shape == (1, *sizes[row])
        assert a.dtype == np.uint16
        np.testing.assert_array_equal(a[0], _pixels(path, col, row))
        assert v.image.meta.version == "0.0.2"
    pins = {"AGP_OMEArrow_ORIG": 728941, "DNA_OMEArrow_ORIG": 366165, "RNA_OMEArrow_ORIG": 735088,
            "DNA_OMEArrow_LABL": 20400, "RNA_OMEArrow_LABL": 96135}
    assert int(dask_loom.open_ome_arrow(path, column=col).to_numpy().sum()) == pins[kind]


def test_real_file_default_column_and_lazy(data_dir):
    path = data_dir / REAL
    v = dask_loom.open_ome_arrow(path)  # auto-detected by struct shape, as ome-arrow does
    assert v.image.column == "Image_FileName_OrigAGP_OMEArrow_ORIG"
    lazy = dask_loom.open_ome_arrow(path, row_index=2, lazy=True, layout="YX")
    assert lazy.layout == "HW"
    assert lazy.shape == (73, 97)
    assert int(lazy.to_numpy().sum()) == int(_pixels(path, "Image_FileName_OrigAGP_OMEArrow_ORIG", 2).sum())
    assert int(v.to_dask().sum().compute()) == 728941


def test_real_file_comp_pixel_count_error(data_dir):
    path = data_dir / REAL
    for row, (n, want, dims) in enumerate([(18144, 6048, (84, 72)), (16884, 5628, (84, 67)), (21243, 7081, (97, 73))]):
        with pytest.raises(OMEArrowError) as ei:
            dask_loom.open_ome_arrow(path, column="Image_FileName_OrigDNA_OMEArrow_COMP", row_index=row)
        msg = str(ei.value)
        assert "Image_FileName_OrigDNA_OMEArrow_COMP" in msg
        assert f"row {row}" in msg
        assert f"{n} values, expected {want} = {dims[0]} {X} {dims[1]} {X} 1" in msg
    lazy = dask_loom.open_ome_arrow(path, column="Image_FileName_OrigRNA_OMEArrow_COMP", lazy=True)
    with pytest.raises(OMEArrowError, match="18144 values"):
        lazy.to_numpy()


def test_real_file_null_column(data_dir):
    with pytest.raises(OMEArrowError, match=r"Image_FileName_OrigAGP_OMEArrow_LABL.*type null"):
        dask_loom.open_ome_arrow(data_dir / REAL, column="Image_FileName_OrigAGP_OMEArrow_LABL")
    with pytest.raises(OMEArrowError, match=r"no column 'nope'.*Image_FileName_OrigAGP_OMEArrow_ORIG"):
        dask_loom.open_ome_arrow(data_dir / REAL, column="nope")
    with pytest.raises(OMEArrowError, match=r"Metadata_ImageNumber.*not an OME-Arrow struct"):
        dask_loom.open_ome_arrow(data_dir / REAL, column="Metadata_ImageNumber")
    with pytest.raises(OMEArrowError, match="row_index 3 out of range"):
        dask_loom.open_ome_arrow(data_dir / REAL, row_index=3)


def test_real_file_equals_ome_arrow(data_dir):
    ome_arrow = pytest.importorskip("ome_arrow")
    path = str(data_dir / REAL)
    for k in ("AGP_OMEArrow_ORIG", "RNA_OMEArrow_LABL"):
        for row in range(3):
            col = f"Image_FileName_Orig{k}"
            with pytest.warns(UserWarning, match="schema differs"):  # ome-arrow normalises the 0.0.2 schema
                ref = ome_arrow.OMEArrow(path, column_name=col, row_index=row).tensor_view(layout="YX").to_numpy()
            np.testing.assert_array_equal(dask_loom.open_ome_arrow(path, column=col, row_index=row, layout="YX").to_numpy(), ref)


# --------------------------------------------------------------------------- views vs reference

CASES = [
    {},
    {"t": 1},
    {"t": 1, "z": 2},
    {"c": [2, 0]},
    {"t": [1, 0, 1], "z": slice(1, 4), "c": -1, "roi": (3, 5, 20, 17)},
    {"roi3d": (1, 2, 1, 30, 20, 2)},
    {"roi_nd": (1, 2, 30, 40)},
    {"roi_nd": (0, 1, 2, 2, 30, 40), "roi_type": "2d_timelapse"},
    {"roi_nd": (1, 2, 5, 3, 30, 40), "roi_type": "3d"},
    {"roi_nd": (1, 1, 2, 3, 2, 3, 30, 40)},
    {"tile": (1, 2)},
    {"t": 0, "z": 1, "layout": "YXC"},
    {"t": 0, "z": 0, "c": 1, "layout": "YX"},
    {"layout": "CZYX", "t": 1},
    {"layout": "tzcyx"},
    {"t": 0, "layout": "ZYX", "channel_policy": "first"},
    {"dtype": "float32", "t": 1, "z": 3},
]


@pytest.mark.parametrize("form", ["scalar", "array", "chunked", "dict"])
def test_views_match_numpy_and_ome_arrow(records, arr5, form):
    try:
        import ome_arrow
    except ImportError:
        ome_arrow = None
    for name, rec in records.items():
        data = {"scalar": rec, "array": pa.repeat(rec, 1), "chunked": pa.chunked_array([pa.repeat(rec, 1)]),
                "dict": rec.as_py()}[form]
        for kw in CASES:
            kw = dict(kw)
            if "tile" in kw and "planes" in name:
                continue
            tile = kw.get("tile")
            if tile is not None:
                g = rec["chunk_grid"].as_py()
                if tile[0] * g["chunk_y"] >= 40 or tile[1] * g["chunk_x"] >= 50:
                    with pytest.raises(SelectionError, match="out of bounds"):
                        dask_loom.TensorView(data, **kw)
                    continue
            v = dask_loom.TensorView(data, **kw)
            if tile is not None:
                kw = {"roi": (tile[1] * g["chunk_x"], tile[0] * g["chunk_y"], min(g["chunk_x"], 50 - tile[1] * g["chunk_x"]),
                              min(g["chunk_y"], 40 - tile[0] * g["chunk_y"]))}
            sel = {k: kw.get(k) for k in ("t", "z", "c", "roi", "layout")}
            if "roi3d" in kw:
                x, y, z0, w, h, dd = kw["roi3d"]
                sel.update(roi=(x, y, w, h), z=slice(z0, z0 + dd))
            if "roi_nd" in kw:
                r = kw["roi_nd"]
                typ = kw.get("roi_type") or {4: "2d", 8: "4d"}[len(r)]
                if typ == "2d":
                    sel["roi"] = (r[1], r[0], r[3] - r[1], r[2] - r[0])
                elif typ == "2d_timelapse":
                    sel.update(t=slice(r[0], r[3]), roi=(r[2], r[1], r[5] - r[2], r[4] - r[1]))
                elif typ == "3d":
                    sel.update(z=slice(r[0], r[3]), roi=(r[2], r[1], r[5] - r[2], r[4] - r[1]))
                else:
                    sel.update(t=slice(r[0], r[4]), z=slice(r[1], r[5]), roi=(r[3], r[2], r[7] - r[3], r[6] - r[2]))
            if kw.get("channel_policy") == "first":
                sel["c"] = [0]
            want = ref_view(arr5, **sel).astype(kw.get("dtype", "uint16"))
            got = v.to_numpy()
            assert got.dtype == want.dtype, (name, kw)
            assert got.shape == want.shape == v.shape, (name, kw)
            np.testing.assert_array_equal(got, want)
            assert got.strides == v.strides
            if ome_arrow is not None and not (form == "dict" and "zstd" in name):
                r = ome_arrow.TensorView(data, **kw)
                assert (r.layout, r.shape) == (v.layout, v.shape)
                np.testing.assert_array_equal(r.to_numpy(), got)
                if kw.get("channel_policy") != "first":  # ome-arrow reads every channel, then drops
                    assert r.strides == v.strides
            if form == "array" and name in ("ours-bytes", "ref-planes") and len(kw) < 3:
                np.testing.assert_array_equal(v.to_dask().compute(scheduler="sync"), got)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_selection_property(records, arr5, data):
    T, C, Z, Y, X = arr5.shape

    def index(n):
        return st.one_of(
            st.none(),
            st.integers(-n, n - 1),
            st.builds(slice, st.integers(0, n - 1), st.integers(1, n), st.sampled_from([None, 1, 2])),
            st.lists(st.integers(-n, n - 1), min_size=1, max_size=4),
        )

    t, z, c = data.draw(index(T)), data.draw(index(Z)), data.draw(index(C))
    x = data.draw(st.integers(0, X - 1))
    y = data.draw(st.integers(0, Y - 1))
    roi = (x, y, data.draw(st.integers(1, X - x)), data.draw(st.integers(1, Y - y)))
    name = data.draw(st.sampled_from(sorted(records)))
    for s in (t, z, c):
        if isinstance(s, slice) and not range(*s.indices(100)):
            return
    if any(isinstance(s, slice) and not range(*s.indices(n)) for s, n in ((t, T), (z, Z), (c, C))):
        return
    v = dask_loom.TensorView(records[name], t=t, z=z, c=c, roi=roi, layout="TZCYX")
    want = ref_view(arr5, t=t, z=z, c=c, roi=roi, layout="TZCYX")
    np.testing.assert_array_equal(v.to_numpy(), want)
    np.testing.assert_array_equal(v.to_dask().compute(scheduler="sync"), want)


# --------------------------------------------------------------------------- pushdown


def _count_decodes(monkeypatch):
    calls = []
    orig = _read._Payload.unit

    def unit(self, i, shape, fallback):
        calls.append(i)
        return orig(self, i, shape, fallback)

    monkeypatch.setattr(_read._Payload, "unit", unit)
    return calls


def test_record_decodes_only_touched_chunks(records, arr5, monkeypatch):
    calls = _count_decodes(monkeypatch)
    rec = records["ours-list"]  # chunks (1, 1, 2, 16, 16): a 3 x 4 grid of 16-pixel tiles, 2 z-slabs
    v = dask_loom.TensorView(rec, t=1, c=2, z=[0, 1], roi=(20, 5, 10, 8))  # one tile column, one row, one slab
    np.testing.assert_array_equal(v.to_numpy(), ref_view(arr5, t=1, c=2, z=[0, 1], roi=(20, 5, 10, 8)))
    assert len(calls) == 1
    calls.clear()
    dask_loom.TensorView(rec, t=0, c=0, z=3, roi=(10, 10, 30, 20), layout="YX").to_numpy()
    assert len(calls) == 2 * 3  # y tiles 0..1, x tiles 0..2


def test_dataset_reads_only_touched_row_groups(tmp_path, arr5, monkeypatch):
    ds = tmp_path / "ds"
    info = dask_loom.write_ome_arrow_dataset({"a": arr5}, ds, chunk_shape=(1, 1, 2, 16, 16))
    assert info["chunk_count"] == 2 * 3 * 2 * 3 * 4
    assert pq.ParquetFile(ds / "chunks.parquet").metadata.num_row_groups == info["chunk_count"]
    groups = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **k):
        groups.append(i)
        return orig(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    v = dask_loom.open_ome_arrow(ds, t=1, c=[0, 2], z=3, roi=(17, 33, 10, 5))
    assert groups == []  # opening reads metadata and the index only
    np.testing.assert_array_equal(v.to_numpy(), ref_view(arr5, t=1, c=[0, 2], z=3, roi=(17, 33, 10, 5)))
    # chunk ids run t, c, z-slab, y-tile, x-tile: (1, c, 1, 2, 1)
    assert sorted(groups) == sorted(((1 * 3 + c) * 2 + 1) * 12 + 2 * 4 + 1 for c in (0, 2))


def test_parquet_record_open_reads_no_pixels(tmp_path, arr5, monkeypatch):
    p = dask_loom.to_ome_parquet(arr5, tmp_path / "a.ome.parquet", chunk_shape=(2, 16, 16))
    cols = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **k):
        cols.extend(columns or ["<all>"])
        return orig(self, i, columns=columns, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    v = dask_loom.open_ome_arrow(p, c=1, layout="TZCYX")
    assert v.shape == (2, 4, 1, 40, 50)
    assert v.dtype == np.uint16
    assert cols
    assert not any(c.endswith((".pixels.list.element", ".pixel_bytes")) for c in cols)
    np.testing.assert_array_equal(v.to_numpy(), ref_view(arr5, c=[1], layout="TZCYX"))
    assert any(".chunks." in c and "pixels" in c for c in cols)
    assert not any(".planes." in c and "pixels" in c for c in cols)


# --------------------------------------------------------------------------- dask


def test_to_dask_blocks_are_chunks(records, arr5):
    v = dask_loom.TensorView(records["ours-list"], layout="TZCYX")
    d = v.to_dask()
    assert d.chunks == ((1, 1), (2, 2), (1, 1, 1), (16, 16, 8), (16, 16, 16, 2))
    assert {key_split(k) for k in d.__dask_graph__()} == {"ome-read", "original-ome-read"}  # the record: one key
    np.testing.assert_array_equal(d.compute(), arr5.transpose(0, 2, 1, 3, 4))
    assert d.name == v.to_dask().name  # deterministic
    # selection and layout applied lazily, blocks still whole chunks clipped by the ROI
    s = dask_loom.TensorView(records["ours-list"], t=1, c=[2, 0], roi=(10, 3, 30, 30), layout="CZYX").to_dask()
    assert s.chunks == ((1, 1), (2, 2), (13, 16, 1), (6, 16, 8))
    np.testing.assert_array_equal(s.compute(), ref_view(arr5, t=1, c=[2, 0], roi=(10, 3, 30, 30), layout="CZYX"))
    auto = dask_loom.TensorView(records["ours-list"], layout="TZCYX").to_dask(chunks="auto")
    assert auto.npartitions == 1
    planes = dask_loom.TensorView(pa.repeat(records["ours-zstd"], 1), layout="TCZYX").to_dask()
    assert planes.chunksize == (1, 1, 1, 40, 50)


def test_to_dask_builds_without_reading(tmp_path, arr5, monkeypatch):
    ds = tmp_path / "ds"
    dask_loom.write_ome_arrow_dataset(arr5, ds, chunk_shape=(1, 1, 4, 20, 25))

    def boom(*a, **k):
        raise AssertionError("read while building the graph")

    lazy = dask_loom.open_ome_arrow(ds, lazy=True, c=1, layout="TZYX")
    monkeypatch.setattr(_read.DatasetImage, "fetch", boom)
    d = lazy.to_dask()
    m = d.mean(axis=(0, 1))
    assert m.shape == (40, 50)
    monkeypatch.undo()
    np.testing.assert_allclose(m.compute(), arr5[:, 1].mean(axis=(0, 1)))


@pytest.mark.cluster
def test_channel_statistics_on_cluster(tmp_path, local_cluster):
    rng = np.random.default_rng(3)
    big = rng.integers(0, 4096, size=(2, 3, 8, 192, 160)).astype(np.uint16)
    src = da.from_array(big, chunks=(1, 1, 8, 96, 160))
    ds = tmp_path / "big"
    dask_loom.write_ome_arrow_dataset(src, ds, chunk_shape=(1, 1, 4, 64, 64), client=local_cluster)
    rec = dask_loom.to_ome_parquet(src, tmp_path / "big.ome.parquet", chunk_shape=(4, 64, 64))
    memory = pa.repeat(dask_loom.to_ome_arrow(src, chunk_shape=(4, 64, 64)), 1)
    for path in (ds, rec, memory):
        v = dask_loom.open_ome_arrow(path, layout="CTZYX")
        d = v.to_dask()
        assert len(pickle.dumps(v.image)) < 50_000 or path is memory  # file images travel as specs
        stats = (d.mean(axis=(1, 2, 3, 4)), d.std(axis=(1, 2, 3, 4)), d.max(axis=(1, 2, 3, 4)))
        got = dask_loom.cluster.compute(*stats, client=local_cluster)
        np.testing.assert_allclose(got[0], big.mean(axis=(0, 2, 3, 4)))
        np.testing.assert_allclose(got[1], big.std(axis=(0, 2, 3, 4)))
        np.testing.assert_array_equal(got[2], big.max(axis=(0, 2, 3, 4)))
        threaded = dask_loom.cluster.compute(stats[0], scheduler="threads")[0]
        np.testing.assert_allclose(threaded, got[0])


# --------------------------------------------------------------------------- lazy


def test_lazy_view(records, arr5):
    calls = []

    def loader():
        calls.append(1)
        return records["ours-bytes"]

    lazy = dask_loom.LazyTensorView(loader=loader, t=1, layout="ZCYX")
    assert lazy.device == "cpu"
    assert lazy.layout == "ZCHW"
    assert not calls
    sub = lazy.select(c=slice(0, 2), roi=(5, 5, 10, 10))
    assert sub.shape == (4, 2, 10, 10)
    assert calls == [1]
    np.testing.assert_array_equal(sub.to_numpy(), ref_view(arr5, t=1, c=slice(0, 2), roi=(5, 5, 10, 10), layout="ZCYX"))
    assert sub.collect() is sub.collect()
    assert calls == [1]
    w = lazy.with_layout("TZCYX")
    assert w.layout == "TZCHW"
    assert w.shape == (1, 4, 3, 40, 50)
    bad = dask_loom.LazyTensorView(loader=loader, layout="YX")
    with pytest.raises(SelectionError, match="drops non-singleton dimension 'T'"):
        bad.collect()
    with pytest.raises(SelectionError, match="letters"):
        dask_loom.LazyTensorView(loader=loader, layout="TQ")


def test_open_lazy_defers_everything(tmp_path, arr5):
    missing = tmp_path / "later.ome.parquet"
    lazy = dask_loom.open_ome_arrow(missing, lazy=True, t=0, z=0)
    assert lazy.device == "cpu"
    with pytest.raises(FileNotFoundError):
        lazy.collect()
    dask_loom.to_ome_parquet(arr5, missing)
    again = pickle.loads(pickle.dumps(dask_loom.open_ome_arrow(missing, lazy=True, t=0, z=0)))
    assert again.layout == "CHW"
    assert again.shape == (3, 40, 50)
    np.testing.assert_array_equal(again.to_numpy(), arr5[0, :, 0])
    rec = again._loader()
    assert isinstance(rec, pa.StructArray)
    assert len(rec) == 1


# --------------------------------------------------------------------------- dlpack, torch, jax


def test_dlpack_modes(records, arr5):
    v = dask_loom.TensorView(records["ours-list"], t=1, c=2, layout="ZYX")
    cap = v.to_dlpack(mode="numpy")
    np.testing.assert_array_equal(np.from_dlpack(cap), arr5[1, 2])
    with pytest.raises(RuntimeError, match="consumed"):
        np.from_dlpack(cap)
    # arrow mode: exactly one stored chunk with shape_z == 1 -> zero-copy 1-D values
    rec = pa.repeat(dask_loom.to_ome_arrow(arr5, chunk_shape=(1, 16, 16)), 1)  # Arrow-backed, as read from Parquet
    one = dask_loom.TensorView(rec, t=0, z=2, c=1, tile=(1, 2))
    flat = np.from_dlpack(one.to_dlpack())
    assert flat.ndim == 1
    np.testing.assert_array_equal(flat.reshape(16, 16), arr5[0, 1, 2, 16:32, 32:48])
    raw = rec.field("chunks").flatten().field("pixels").values
    lo, hi = raw.buffers()[1].address, raw.buffers()[1].address + raw.buffers()[1].size
    assert lo <= flat.ctypes.data < hi  # shares the record's memory
    with pytest.raises(SelectionError, match="match one stored unit"):
        dask_loom.TensorView(rec, t=0, z=2, c=1).to_dlpack()
    with pytest.raises(SelectionError, match="shape_z == 1"):
        dask_loom.TensorView(records["ours-list"], t=0, z=0, c=0, tile=(0, 0)).to_dlpack()
    with pytest.raises(SelectionError, match="single"):
        dask_loom.TensorView(rec, t=0, c=1).to_dlpack(mode="arrow")
    byte = dask_loom.to_ome_arrow(arr5.astype(np.float32), chunk_shape=(1, 40, 50))
    got = np.from_dlpack(dask_loom.TensorView(byte, t=1, z=3, c=0).to_dlpack(mode="arrow"))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, arr5[1, 0, 3].ravel().astype(np.float32))
    with pytest.raises(SelectionError, match="compressed"):
        dask_loom.TensorView(records["ours-zstd"], t=0, z=0, c=0).to_dlpack(mode="arrow")
    with pytest.raises(SelectionError, match="device"):
        v.to_dlpack(device="tpu")


def test_to_torch_and_jax(records, arr5):
    torch = pytest.importorskip("torch")
    v = dask_loom.TensorView(records["ours-list"], t=0, c=1, z=1, layout="YX")
    t = v.to_torch(mode="numpy")
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.uint16
    np.testing.assert_array_equal(t.numpy(), arr5[0, 1, 1])
    one = dask_loom.TensorView(records["ours-list"], t=0, c=0, z=0, tile=(0, 0))
    with pytest.raises(SelectionError):
        one.to_torch()  # the chunk holds two z planes
    lazy = dask_loom.open_ome_arrow(records["ours-bytes"], lazy=True, t=1, layout="ZCYX")
    np.testing.assert_array_equal(lazy.to_torch(mode="numpy").numpy(), arr5[1].transpose(1, 0, 2, 3))
    jax = pytest.importorskip("jax")
    j = v.to_jax(mode="numpy")
    assert isinstance(j, jax.Array)
    np.testing.assert_array_equal(np.asarray(j), arr5[0, 1, 1])


def test_missing_optional_dependency(records, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setitem(sys.modules, "jax.numpy", None)
    v = dask_loom.TensorView(records["ours-list"], t=0, z=0)
    with pytest.raises(RuntimeError, match="Torch is not installed"):
        v.to_torch(mode="numpy")
    with pytest.raises(MissingDependencyError, match="JAX is not installed"):
        v.to_jax(mode="numpy")


# --------------------------------------------------------------------------- iteration


def _arrays(it):
    return [np.from_dlpack(x).copy() for x in it]


def test_iteration_matches_ome_arrow(records, arr5):
    rec = records["ours-list"]
    v = dask_loom.TensorView(rec, roi=(3, 4, 40, 30))
    batches = _arrays(v.iter_dlpack(batch_size=1, mode="numpy"))
    assert [b.shape for b in batches] == [(1, 4, 3, 30, 40)] * 2
    np.testing.assert_array_equal(batches[1][0], ref_view(arr5, t=1, roi=(3, 4, 40, 30), layout="ZCYX"))
    tiles = _arrays(v.iter_dlpack(tile_size=(16, 32), mode="numpy"))
    assert [t.shape[-2:] for t in tiles] == [(16, 32), (16, 8), (14, 32), (14, 8)]
    ome_arrow = pytest.importorskip("ome_arrow")
    r = ome_arrow.TensorView(rec, roi=(3, 4, 40, 30))
    for kw in ({"batch_size": 1, "shuffle": True, "seed": 3}, {"tile_size": (7, 9), "shuffle": True, "seed": 11}, {}):
        ours = _arrays(v.iter_dlpack(mode="numpy", prefetch=2, **kw))
        ref = _arrays(r.iter_dlpack(mode="numpy", **kw))
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            np.testing.assert_array_equal(a, b)
    for kw in ({"tile_size": (3, 16, 16)}, {"tile_size": (2, 25, 17), "shuffle": True, "seed": 5}):
        ours = _arrays(v.iter_tiles_3d(prefetch=1, **kw))
        ref = _arrays(r.iter_tiles_3d(**kw))
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(SelectionError, match="numpy"):
        next(v.iter_tiles_3d(tile_size=(1, 4, 4), mode="arrow"))
    with pytest.raises(SelectionError, match="prefetch"):
        next(v.iter_dlpack(prefetch=-1))


def test_prefetch_reads_ahead_in_background():
    loaded: list[tuple[int, str]] = []
    lock = threading.Lock()

    def plane_loader(t, z, c):
        with lock:
            loaded.append((t, threading.current_thread().name))
        return np.full((40, 50), t, np.uint16)

    big = dask_loom.to_ome_arrow(np.zeros((6, 1, 1, 40, 50), np.uint16))
    v = dask_loom.TensorView(big, plane_loader=plane_loader)
    it = v.iter_dlpack(batch_size=1, prefetch=2, mode="numpy")
    first = np.from_dlpack(next(it))
    assert first.shape == (1, 1, 1, 40, 50)
    assert int(first.max()) == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            ahead = {t for t, _ in loaded}
        if {1, 2} <= ahead:
            break
        time.sleep(0.01)
    assert {1, 2} <= ahead  # batches 1 and 2 were read while the caller held batch 0
    assert all(name != threading.main_thread().name for _, name in loaded)
    assert [int(np.from_dlpack(b).max()) for b in it] == [1, 2, 3, 4, 5]
    loaded.clear()
    sync = [int(np.from_dlpack(b).max()) for b in v.iter_dlpack(batch_size=2, mode="numpy")]
    assert sync == [1, 3, 5]
    assert {n for _, n in loaded} == {threading.current_thread().name}


# --------------------------------------------------------------------------- writers


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64", "int64"])
def test_writers_are_dtype_exact(tmp_path, dtype):
    rng = np.random.default_rng(1)
    a = (rng.normal(0, 300, size=(2, 2, 3, 21, 34)) * (1.37 if "float" in dtype else 1)).astype(dtype)
    rec = dask_loom.to_ome_arrow(a, chunk_shape=(2, 8, 16))
    assert rec.type == (OME_ARROW_STRUCT if dtype == "uint16" else OME_ARROW_BYTE_STRUCT)
    assert rec["pixels_meta"]["type"].as_py() == dtype
    assert len(rec["planes"]) == 0
    v = dask_loom.TensorView(rec, layout="TCZYX")
    assert v.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(v.to_numpy(), a)
    p = dask_loom.to_ome_parquet(da.from_array(a, chunks=(1, 1, 2, 10, 34)), tmp_path / f"{dtype}.ome.parquet", chunk_shape=(2, 8, 16))
    np.testing.assert_array_equal(dask_loom.open_ome_arrow(p, layout="TCZYX").to_numpy(), a)
    z = dask_loom.to_ome_parquet(a, tmp_path / f"{dtype}.z.ome.parquet", chunk_shape=(3, 8, 8), chunk_compression="zstd",
                                 compression=None)
    np.testing.assert_array_equal(dask_loom.open_ome_arrow(z, layout="TCZYX").to_numpy(), a)
    ds = tmp_path / f"{dtype}.ds"
    dask_loom.write_ome_arrow_dataset([a], ds, chunk_shape=(1, 1, 2, 8, 16))
    np.testing.assert_array_equal(dask_loom.open_ome_arrow(ds, layout="TCZYX").to_numpy(), a)
    try:
        import ome_arrow
    except ImportError:
        return
    np.testing.assert_array_equal(ome_arrow.TensorView(rec, layout="TCZYX").to_numpy(), a)
    for path in (p, z):
        o = ome_arrow.OMEArrow(str(path), column_name="image")
        np.testing.assert_array_equal(o.tensor_view(layout="TCZYX").to_numpy(), a)
    np.testing.assert_array_equal(ome_arrow.OMEArrowDataset(ds).read_image("image-00000"), a)


def test_parquet_file_layout(tmp_path, arr5):
    p = dask_loom.to_ome_parquet(arr5, tmp_path / "x.ome.parquet", name="cells", channel_names=["a", "b", "c"],
                                 physical_size_x=0.5, physical_size_z=2.0)
    pf = pq.ParquetFile(p)
    assert pf.metadata.num_rows == 1
    assert pf.schema_arrow.names == ["image"]
    assert pf.schema_arrow.field("image").type == OME_ARROW_STRUCT
    md = pf.schema_arrow.metadata
    assert md[b"ome.arrow.type"] == b"ome.arrow"
    assert md[b"ome.arrow.version"] == b"0.1.0"
    v = dask_loom.open_ome_arrow(p)
    assert v.meta.channel_names == ["a", "b", "c"]
    assert v.meta.name == "cells"
    assert v.meta.physical_size["physical_size_x"] == 0.5
    assert v.meta.physical_size["physical_size_z"] == 2.0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary files left
    ome_arrow = pytest.importorskip("ome_arrow")
    o = ome_arrow.OMEArrow(p, column_name="image")
    assert o.info()["shape"] == arr5.shape
    assert [ch["name"] for ch in o.data.as_py()["pixels_meta"]["channels"]] == ["a", "b", "c"]


class Recorder:
    """An array-like that serves slices and records every request."""

    def __init__(self, arr: np.ndarray, fail_after: int | None = None) -> None:
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim
        self.requests: list[int] = []
        self.fail_after = fail_after

    def __getitem__(self, key):
        if self.fail_after is not None and len(self.requests) >= self.fail_after:
            raise OSError("disk went away")
        out = self.arr[key]
        self.requests.append(out.size)
        return out


def test_writers_stream_block_by_block(tmp_path):
    a = np.random.default_rng(2).integers(0, 9, size=(2, 2, 8, 64, 64)).astype(np.uint16)
    with dask.config.set({"dask_loom.block-size": "32KiB"}):
        for write in (
            lambda src: dask_loom.to_ome_parquet(src, tmp_path / "s.ome.parquet", chunk_shape=(2, 32, 32)),
            lambda src: dask_loom.write_ome_arrow_dataset(src, tmp_path / "s.ds", chunk_shape=(1, 1, 2, 32, 32), overwrite=True),
            lambda src: dask_loom.to_ome_arrow(src, chunk_shape=(2, 32, 32)),
        ):
            src = Recorder(a)
            write(src)
            assert sum(src.requests) == a.size
            assert len(src.requests) == 8  # 64 chunks of 4 KiB, 8 per 32 KiB block
            assert max(src.requests) * 2 <= 32 * 1024  # whole-chunk blocks of at most the block size
    np.testing.assert_array_equal(dask_loom.open_ome_arrow(tmp_path / "s.ome.parquet", layout="TCZYX").to_numpy(), a)
    np.testing.assert_array_equal(dask_loom.open_ome_arrow(tmp_path / "s.ds", layout="TCZYX").to_numpy(), a)


def test_record_page_limit(tmp_path, monkeypatch):
    from dask_loom.ome import _write

    monkeypatch.setattr(_write, "_PAGE_LIMIT", 64 << 10)
    with pytest.raises(OMEArrowError, match=r"one Parquet data page, limited to 2 GiB.*write_ome_arrow_dataset"):
        dask_loom.to_ome_parquet(np.zeros((4, 100, 100), np.uint16), tmp_path / "big.ome.parquet")
    assert os.listdir(tmp_path) == []
    small = dask_loom.to_ome_parquet(np.zeros((4, 100, 100), np.uint16), tmp_path / "ok.ome.parquet", chunk_compression="zstd")
    assert dask_loom.open_ome_arrow(small, layout="ZYX").shape == (4, 100, 100)


def test_failed_write_leaves_nothing(tmp_path):
    a = np.ones((1, 1, 4, 64, 64), np.uint16)
    with dask.config.set({"dask_loom.block-size": "16KiB"}):
        with pytest.raises(OSError, match="disk went away"):
            dask_loom.to_ome_parquet(Recorder(a, fail_after=1), tmp_path / "f.ome.parquet", chunk_shape=(1, 32, 32))
        with pytest.raises(OSError, match="disk went away"):
            dask_loom.write_ome_arrow_dataset(Recorder(a, fail_after=1), tmp_path / "f.ds", chunk_shape=(1, 1, 1, 32, 32))
    assert os.listdir(tmp_path) == []


def test_dataset_options(tmp_path, arr5):
    info = dask_loom.write_ome_arrow_dataset({"x": arr5, "y": arr5[:, :1] // 2}, tmp_path / "d", chunk_shape=(1, 1, 4, 16, 16),
                                             chunk_rows_per_row_group=5)
    assert info["image_ids"] == ["x", "y"]
    assert pq.ParquetFile(tmp_path / "d" / "chunks.parquet").metadata.num_row_groups == -(-72 // 5) + -(-24 // 5)
    np.testing.assert_array_equal(dask_loom.open_ome_arrow(tmp_path / "d", image_id="y", layout="TCZYX").to_numpy(), arr5[:, :1] // 2)
    with pytest.raises(FileExistsError):
        dask_loom.write_ome_arrow_dataset(arr5, tmp_path / "d")
    with pytest.raises(OMEArrowError, match="no image_id 'z'"):
        dask_loom.open_ome_arrow(tmp_path / "d", image_id="z")
    f = dask_loom.write_ome_arrow_dataset(arr5.astype(np.int32) - 100, tmp_path / "e", pixel_dtype="uint16", clamp=True)
    assert dask_loom.open_ome_arrow(tmp_path / "e").dtype == np.uint16
    assert f["chunk_shape"] == (1, 1, 4, 40, 50)
    with pytest.raises(UnsupportedDtypeError, match="outside uint16"):
        dask_loom.write_ome_arrow_dataset(arr5.astype(np.int32) - 100, tmp_path / "g", pixel_dtype="uint16", clamp=False)
    assert not (tmp_path / "g").exists()


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, n) for n in (2, 3, 4, 23, 31)]),
    chunk=st.tuples(st.integers(1, 4), st.integers(1, 23), st.integers(1, 31)),
    dtype=st.sampled_from(["uint8", "int16", "uint16", "float32", "int64"]),
    encoding=st.sampled_from(["auto", "bytes"]),
)
def test_writer_roundtrip_property(shape, chunk, dtype, encoding):
    a = (np.arange(np.prod(shape)).reshape(shape) * 37 % 1000 - (200 if dtype[0] in "if" else 0)).astype(dtype)
    rec = dask_loom.to_ome_arrow(da.from_array(a, chunks=(1, 2, 3, 10, 10)), chunk_shape=chunk, chunk_encoding=encoding)
    v = dask_loom.TensorView(rec, layout="TCZYX")
    np.testing.assert_array_equal(v.to_numpy(), a)
    d = v.to_dask()
    assert d.chunksize[2:] == tuple(min(c, s) for c, s in zip(chunk, shape[2:]))
    np.testing.assert_array_equal(d.compute(scheduler="sync"), a)


def test_image_kind(data_dir, tmp_path):
    from dask_loom.ome import image_kind

    assert image_kind(data_dir / "ome" / "examplehuman" / "AS_09125_050116030001_D03f00d0.tif") == "tiff"
    assert image_kind(data_dir / REAL) == "ome-arrow"
    assert image_kind(data_dir / "loom" / "loompy-test" / "test_2018-07.loom") is None
    assert image_kind(tmp_path / "missing.tif") is None


def test_chunk_shape_choice():
    assert choose_chunk_shape((4, 3, 32, 2048, 2048), "uint16") == (1, 1, 16, 256, 256)
    assert choose_chunk_shape((1, 1, 1, 72, 84), "uint16") == (1, 1, 1, 72, 84)
    assert choose_chunk_shape((1, 1, 1, 8192, 8192), "uint8") == (1, 1, 1, 1024, 1024)
    rec = dask_loom.to_ome_arrow(np.zeros((3, 300, 200), np.uint16))
    assert rec["chunk_grid"].as_py()["chunk_z"] == 3
    assert len(rec["chunks"]) == 1
    with pytest.raises(SelectionError, match="one \\(t, c\\)"):
        dask_loom.to_ome_arrow(np.zeros((2, 2, 4, 4), np.uint8), chunk_shape=(2, 1, 1, 4, 4))


# --------------------------------------------------------------------------- converters

SAMPLES = {
    "single-channel.ome.tiff": 3489081,
    "multi-channel.ome.tiff": 10441999,
    "z-series.ome.tiff": 17430078,
    "time-series.ome.tif": 24387471,
    "multi-channel-z-series.ome.tiff": 51894749,
    "multi-channel-time-series.ome.tiff": 72684796,
    "4D-series.ome.tiff": 121422316,
    "multi-channel-4D-series.ome.tiff": 361565588,
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_convert_ome_sample_tiffs(data_dir, tmp_path, name):
    tifffile = pytest.importorskip("tifffile")
    src = data_dir / "ome" / "ome-artificial-5d-datasets" / name
    want = tifffile.imread(src)
    axes = tifffile.TiffFile(src).series[0].axes
    for dst in (tmp_path / "x.ome.parquet", tmp_path / "x.ds"):
        out = dask_loom.convert_to_ome_arrow(src, dst)
        v = dask_loom.open_ome_arrow(out, layout=axes)
        got = v.to_numpy()
        assert got.dtype == np.int8
        assert got.dtype.isnative
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert int(got.astype(np.int64).sum()) == SAMPLES[name]
        assert v.meta.name == name
        assert int(got.min()) == -1


def test_convert_plain_tiff_and_int8_lists(data_dir, tmp_path):
    src = data_dir / "ome" / "examplehuman" / "AS_09125_050116030001_D03f00d1.tif"
    v = dask_loom.open_ome_arrow(dask_loom.convert_to_ome_arrow(src, tmp_path / "p.ome.parquet"), layout="TCZYX")
    assert v.shape == (1, 1, 1, 512, 512)
    assert v.dtype == np.uint8
    assert int(v.to_numpy().astype(np.int64).sum()) == 2766334
    neg = data_dir / "ome" / "ome-artificial-5d-datasets" / "single-channel.ome.tiff"
    with pytest.raises(UnsupportedDtypeError, match=r"int8 values -1\.\.96 outside uint16"):
        dask_loom.convert_to_ome_arrow(neg, tmp_path / "n.ome.parquet", chunk_encoding="list")
    assert not (tmp_path / "n.ome.parquet").exists()
    with pytest.raises(FileExistsError):
        dask_loom.convert_to_ome_arrow(src, tmp_path / "p.ome.parquet")
    with pytest.raises(OMEArrowError, match="neither TIFF"):
        dask_loom.convert_to_ome_arrow(data_dir / "MANIFEST.md", tmp_path / "m.ome.parquet")


def test_convert_keeps_channel_names_and_physical_sizes(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = np.arange(2 * 3 * 4 * 30 * 40, dtype=np.uint16).reshape(2, 3, 4, 30, 40)
    src = tmp_path / "m.ome.tif"
    tifffile.imwrite(src, a, ome=True, photometric="minisblack", metadata={
        "axes": "TCZYX", "Name": "cells", "Channel": {"Name": ["DNA", "ER", "Mito"]},
        "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "PhysicalSizeZ": 2.0})
    for dst in (tmp_path / "m.ome.parquet", tmp_path / "m.ds"):
        v = dask_loom.open_ome_arrow(dask_loom.convert_to_ome_arrow(src, dst), layout="TCZYX")
        np.testing.assert_array_equal(v.to_numpy(), a)
        assert v.meta.channel_names == ["DNA", "ER", "Mito"]
        assert v.meta.name == "cells"
        ps = v.meta.physical_size
        assert ps["physical_size_x"] == pytest.approx(0.65)
        assert ps["physical_size_z"] == 2.0
        assert ps["physical_size_x_unit"] == "µm"
    ome_arrow = pytest.importorskip("ome_arrow")
    rec = ome_arrow.OMEArrow(str(tmp_path / "m.ome.parquet"), column_name="image").data.as_py()
    assert [c["name"] for c in rec["pixels_meta"]["channels"]] == ["DNA", "ER", "Mito"]


def test_convert_ome_zarr(tmp_path):
    writers = pytest.importorskip("bioio_ome_zarr.writers")
    a = np.random.default_rng(4).integers(0, 4000, size=(2, 3, 5, 60, 70)).astype(np.uint16)
    src = str(tmp_path / "img.ome.zarr")
    w = writers.OMEZarrWriter(
        src, level_shapes=[a.shape, (2, 3, 5, 30, 35)], dtype=a.dtype, chunk_shape=[(1, 1, 2, 32, 32)] * 2,
        image_name="cells", channels=[writers.Channel(label=n, color=c) for n, c in (("DNA", "0000FF"), ("ER", "00FF00"), ("Mito", "FF0000"))],
        axes_units=[None, None, "micrometer", "micrometer", "micrometer"], physical_pixel_size=[1.0, 1.0, 2.0, 0.5, 0.5])
    w.write_full_volume(a)
    arr, _ = dask_loom.read_ome_zarr(src)
    assert arr.chunksize == (1, 1, 2, 32, 32)
    for dst in (tmp_path / "z.ome.parquet", tmp_path / "z.ds"):
        v = dask_loom.open_ome_arrow(dask_loom.convert_to_ome_arrow(src, dst), layout="TCZYX")
        np.testing.assert_array_equal(v.to_numpy(), a)
        assert v.meta.channel_names == ["DNA", "ER", "Mito"]
        assert v.meta.physical_size["physical_size_y"] == 0.5
        assert v.meta.physical_size["physical_size_z"] == 2.0
    lvl1, m1 = dask_loom.read_ome_zarr(src, level=1)
    assert lvl1.shape == (2, 3, 5, 30, 35)
    assert m1["physical_size_x"] == 1.0
    with pytest.raises(OMEArrowError, match="level 2 out of range"):
        dask_loom.read_ome_zarr(src, level=2)


# --------------------------------------------------------------------------- bad input


def test_parquet_without_ome_column(tmp_path):
    p = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2], "s": pa.array([{"x": 1}, {"x": 2}])}), p)
    with pytest.raises(OMEArrowError, match=r"plain\.parquet: no OME-Arrow column.*\['a', 's'\]"):
        dask_loom.open_ome_arrow(p)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(OMEArrowError, match="not a readable Parquet file"):
        dask_loom.open_ome_arrow(tmp_path / "junk.parquet")


def test_selection_errors(records):
    rec = records["ours-list"]
    with pytest.raises(SelectionError, match=rf"roi \(x=40, y=0, w=20, h=5\) is out of bounds for the 50 {X} 40"):
        dask_loom.TensorView(rec, roi=(40, 0, 20, 5))
    with pytest.raises(SelectionError, match="T index 2 out of range"):
        dask_loom.TensorView(rec, t=2)
    with pytest.raises(SelectionError, match="layout 'TZHW' drops non-singleton dimension 'C'"):
        dask_loom.TensorView(rec, layout="TZYX")
    assert dask_loom.TensorView(rec, layout="TZYX", channel_policy="first").shape == (2, 4, 40, 50)
    with pytest.raises(SelectionError, match="tile \\(3, 0\\) is out of bounds"):
        dask_loom.TensorView(rec, tile=(3, 0))
    with pytest.raises(SelectionError, match="only one of roi_nd"):
        dask_loom.TensorView(rec, roi=(0, 0, 1, 1), roi_nd=(0, 0, 1, 1))
    with pytest.raises(SelectionError, match="ambiguous"):
        dask_loom.TensorView(rec, roi_nd=(0, 0, 0, 1, 1, 1))
    with pytest.raises(SelectionError, match="repeats"):
        dask_loom.TensorView(rec, layout="CCYX")
    with pytest.raises(SelectionError, match="channel_policy"):
        dask_loom.TensorView(rec, channel_policy="last")
    with pytest.raises(TypeError, match="unexpected keyword"):
        dask_loom.open_ome_arrow(rec, roi2=(0, 0, 1, 1))


def test_error_messages_start_as_ome_arrows(records):
    """Code that matches ome-arrow 0.1.0's messages keeps working: ours start with its exact wording."""
    ome_arrow = pytest.importorskip("ome_arrow")
    from ome_arrow.tensor import TensorView as RefView

    rec = records["ref-list"] if "ref-list" in records else records["ours-list"]
    ref = ome_arrow.OMEArrow(rec)
    cases = [
        (lambda: RefView(rec, chunk_policy="sideways"), lambda: dask_loom.TensorView(rec, chunk_policy="sideways")),
        (lambda: RefView(rec, channel_policy="last"), lambda: dask_loom.TensorView(rec, channel_policy="last")),
        (lambda: ref.tensor_view(z=0, roi3d=(0, 0, 0, 4, 4, 1)), lambda: dask_loom.TensorView(rec, z=0, roi3d=(0, 0, 0, 4, 4, 1))),
        (lambda: ref.tensor_view(t=0, z=0).to_dlpack(device="TPU"), lambda: dask_loom.TensorView(rec, t=0, z=0).to_dlpack(device="TPU")),
        (lambda: ref.tensor_view(t=0, z=0).to_dlpack(mode="pandas"), lambda: dask_loom.TensorView(rec, t=0, z=0).to_dlpack(mode="pandas")),
    ]
    for theirs, ours in cases:
        with pytest.raises(ValueError) as expected:
            theirs()
        with pytest.raises(SelectionError) as got:
            ours()
        assert str(got.value).startswith(str(expected.value)), (str(got.value), str(expected.value))
    assert str(got.value) == "Unsupported mode 'pandas'. Expected one of: arrow, numpy."


def test_unsupported_dtypes(records):
    with pytest.raises(UnsupportedDtypeError, match="complex64"):
        dask_loom.to_ome_arrow(np.zeros((4, 4), np.complex64))
    with pytest.raises(UnsupportedDtypeError, match="bool"):
        dask_loom.to_ome_arrow(np.zeros((4, 4), bool))
    with pytest.raises(UnsupportedDtypeError, match="float32 pixels cannot be stored exactly in uint16"):
        dask_loom.to_ome_arrow(np.zeros((4, 4), np.float32), chunk_encoding="list")
    d = records["ours-bytes"].as_py()
    d["pixels_meta"]["type"] = "complex64"
    with pytest.raises(UnsupportedDtypeError, match=r"pixels_meta\.type.*complex64"):
        dask_loom.TensorView(d)
    assert dask_loom.TensorView(d, dtype="uint16").dtype == np.uint16  # an explicit dtype still reads
    assert isinstance(UnsupportedDtypeError("x"), (TypeError, ValueError))


def test_corrupt_records(records):
    d = records["ours-bytes"].as_py()
    d["chunks"][3]["pixel_bytes"] = d["chunks"][3]["pixel_bytes"][:-2]
    with pytest.raises(OMEArrowError, match=r"chunks\[3\]\.pixel_bytes holds \d+ bytes, expected"):
        dask_loom.TensorView(d, layout="TZCYX").to_numpy()
    z = records["ours-zstd"].as_py()
    z["chunks"][0]["pixel_bytes"] = b"\x00" * 40
    with pytest.raises(CorruptChunkError, match=r"chunks\[0\]\.pixel_bytes do not decompress with 'zstd'"):
        dask_loom.TensorView(z, t=0, c=0, z=0).to_numpy()
    d = records["ours-list"].as_py()
    d["chunks"][1]["x"] = 48
    with pytest.raises(OMEArrowError, match=r"chunks\[1\] covers .* outside the image"):
        dask_loom.TensorView(d)
    d = records["ours-list"].as_py()
    d["type"] = "something.else"
    with pytest.raises(OMEArrowError, match=r"field 'type' is 'something\.else'"):
        dask_loom.TensorView(d)
    d = records["ours-list"].as_py()
    d["chunks"][2]["pixels"] = d["chunks"][2]["pixels"][:-1]
    with pytest.raises(OMEArrowError, match=rf"chunks\[2\]\.pixels holds 511 values, expected 512 = 2 {X} 16 {X} 16"):
        dask_loom.TensorView(d).to_numpy()


def test_memory_url(arr5, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    p = dask_loom.to_ome_parquet(arr5, tmp_path / "m.ome.parquet")
    fs = fsspec.filesystem("memory")
    with open(p, "rb") as f:
        fs.pipe("/ome-test/m.ome.parquet", f.read())
    try:
        v = dask_loom.open_ome_arrow("memory://ome-test/m.ome.parquet", t=1, c=0, layout="ZYX")
        np.testing.assert_array_equal(v.to_numpy(), arr5[1, 0])
    finally:
        fs.rm("/ome-test", recursive=True)
