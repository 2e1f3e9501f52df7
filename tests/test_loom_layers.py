"""``LoomLayer`` and its host: every layer method goes through the ``LayerHost``, which stays valid
when a write replaces the file (an HDF5 transaction renames a new file over the old one)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import dask_loom
from dask_loom.errors import ReadOnlyError


@pytest.fixture(params=["loom", "loom.zarr"])
def writable(request, loompy_file, tmp_path):
    """A writable copy of the loompy-written reference file, as .loom (HDF5) or .loom.zarr."""
    path, ref = loompy_file
    if request.param == "loom":
        dst = tmp_path / "w.loom"
        shutil.copy(path, dst)
    else:
        dst = tmp_path / "w.loom.zarr"
        dask_loom.convert(path, dst, scheduler="sync")
    return dst, ref


class _NoPrivates:
    """Stands in for ``layer.ds``: refuses every member but ``filename``, so a call-back shows."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def __getattr__(self, name: str):
        raise AssertionError(f"LoomLayer reached into its connection: ds.{name}")


def test_a_layer_uses_only_its_host(writable):
    path, ref = writable
    main = ref[""]
    with dask_loom.connect(path, scheduler="sync") as ds:
        layer = ds.layers[""]
        spliced = ds.layers["spliced"]
        layer.ds = spliced.ds = _NoPrivates(ds.filename)
        assert layer.shape == main.shape and layer.dtype == "float32" and spliced.dtype == "int32"
        np.testing.assert_array_equal(layer[:, :], main)
        np.testing.assert_array_equal(spliced[[5, 1, 1], 10:40:3], ref["spliced"][[5, 1, 1], 10:40:3])
        np.testing.assert_array_equal(layer.to_dask().compute(), main)
        np.testing.assert_array_equal(layer.dask[:50].compute(), main[:50])
        np.testing.assert_array_equal(layer.to_dask(sparse=True).compute().toarray(), main)
        np.testing.assert_array_equal(layer.sparse(rows=np.arange(10)).toarray(), main[:10])
        (sums,) = layer.map([np.sum], axis=0)
        np.testing.assert_allclose(sums, main.sum(axis=1, dtype="float64"))
        np.testing.assert_allclose(dask_loom.map(spliced, [np.max], axis=1)[0], ref["spliced"].max(axis=0))
        assert isinstance(layer.last_modified(), str)
        assert "shape=(300, 517)" in repr(layer)
        # Writes: a region through the layer, and the whole file permuted through dask_loom.permute.
        layer[2, 3:6] = np.array([7.0, 8.0, 9.0])
        expect = main.copy()
        expect[2, 3:6] = [7.0, 8.0, 9.0]
        np.testing.assert_array_equal(layer[:4, :8], expect[:4, :8])
        order = np.arange(main.shape[1])[::-1]
        dask_loom.permute(layer, order, axis=1)
        np.testing.assert_array_equal(layer[:, :], expect[:, order])
        np.testing.assert_array_equal(spliced[:, :], ref["spliced"][:, order])


def test_a_layer_taken_before_a_write_reads_the_new_file(writable):
    path, ref = writable
    main = ref[""]
    with dask_loom.connect(path, scheduler="sync") as ds:
        layer, spliced = ds.layers[""], ds["spliced"]
        assert spliced.dtype == "int32"
        first = layer._source()
        # The whole file rewritten and swapped in (HDF5: a new file renamed over the old).
        order = np.random.default_rng(0).permutation(main.shape[0])
        ds.permute(order, axis=0)
        assert layer._source() is not first  # re-resolved after the write, not the old chunk index
        np.testing.assert_array_equal(layer[:, :], main[order])
        np.testing.assert_array_equal(layer.to_dask().compute(), main[order])
        # A layer replaced with another dtype: the old LoomLayer object sees the new one.
        ds.layers["spliced"] = np.full(main.shape, 0.5, dtype="float64")
        assert spliced.dtype == "float64"
        np.testing.assert_array_equal(spliced[:3, :3], np.full((3, 3), 0.5))
    with dask_loom.connect(path, "r") as again:
        np.testing.assert_array_equal(again[:, :], main[order])


def test_a_closed_or_read_only_connection_still_guards_its_layers(writable):
    path, ref = writable
    with dask_loom.connect(path, "r", scheduler="sync") as ds:
        layer = ds.layers[""]
        np.testing.assert_array_equal(layer[:2, :2], ref[""][:2, :2])
        with pytest.raises(ReadOnlyError, match="read-only"):
            layer[0, 0] = 1.0
        with pytest.raises(ReadOnlyError, match="opened with mode='r'"):
            dask_loom.permute(layer, np.arange(ref[""].shape[1]), axis=1)
    with pytest.raises(ValueError, match="closed"):
        layer[:2, :2]
    with pytest.raises(ValueError, match="closed"):
        layer.to_dask()


def test_the_layer_manager_uses_only_the_host(writable):
    path, ref = writable
    main = ref[""]
    with dask_loom.connect(path, scheduler="sync") as ds:
        layers = ds.layers
        object.__setattr__(layers, "ds", _NoPrivates(ds.filename))
        assert layers.keys() == ["", "spliced"]
        np.testing.assert_array_equal(layers["spliced"][:5, :5], ref["spliced"][:5, :5])
        got = layers[[0, 7, 7], 100:103]
        np.testing.assert_array_equal(got[""][:, :], main[[0, 7, 7], 100:103])
        np.testing.assert_array_equal(got["spliced"][:, :], ref["spliced"][[0, 7, 7], 100:103])
        layers["twice"] = main * 2
        np.testing.assert_array_equal(layers["twice"][:, :], main * 2)
        del layers["twice"]
        assert layers.keys() == ["", "spliced"]
        with pytest.raises(KeyError, match="not found in"):
            layers["twice"]
    with dask_loom.connect(path, "r") as again:
        assert again.layers.keys() == ["", "spliced"]


def test_a_source_built_across_a_write_is_not_kept(writable, monkeypatch):
    path, ref = writable
    with dask_loom.connect(path, scheduler="sync") as ds:
        host = ds._layer_host
        real, built = host.tree.source, []

        def racing(p, **kw):
            got = real(p, **kw)
            built.append(p)
            if len(built) == 1:
                host.invalidate()  # another thread's write finished meanwhile
            return got

        monkeypatch.setattr(host.tree, "source", racing)
        layer = ds.layers["spliced"]
        np.testing.assert_array_equal(layer[:3, :3], ref["spliced"][:3, :3])
        assert layer._source() is layer._source()  # built again once, then kept
        assert built == ["layers/spliced", "layers/spliced"]
