"""Group reductions of a band: integer bands are cast to float64 a slice at a time.

Reference: numpy-groupies' ``aggregate`` (the peer the kernels answer to) on
the same band, with the slices made a few columns wide so every band is cut.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_loom.ops import _kernels as K

npg = pytest.importorskip("numpy_groupies")

FUNCS = ["sum", "mean", "var", "std", "sumofsquares", "nansum", "nanmean", "nanvar"]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 7),
    cols=st.integers(1, 40),
    n_groups=st.integers(1, 6),
    dtype=st.sampled_from(["uint16", "int32", "int64", "bool"]),
    cast=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_integer_bands_equal_numpy_groupies(rows, cols, n_groups, dtype, cast, seed):
    rng = np.random.default_rng(seed)
    # Every group non-empty (GroupPlan's contract: aggregate numbers the labels present).
    idx = rng.permutation(np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, size=cols)]))
    band = rng.integers(0, 2 if dtype == "bool" else 60_000, size=(rows, len(idx))).astype(dtype)
    plan = K.GroupPlan(idx, n_groups)
    for func in FUNCS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(K, "TILE_BYTES", 8 * cast)  # slices of cast // rows columns
            got = K.group_reduce(band, plan, func)
        assert got.shape == (rows, n_groups) and got.dtype == np.float64
        if rows == 0:
            continue  # numpy-groupies refuses an empty band
        want = npg.aggregate(idx, band.astype(np.float64), func=func, axis=1, size=n_groups, fill_value=0)
        if func in ("sum", "sumofsquares", "nansum"):
            np.testing.assert_array_equal(got, want, err_msg=func)  # whole numbers: exact
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6, err_msg=func)


def test_a_large_uint16_band_is_cast_in_slices():
    """The cast is bounded: at most a few MiB of float64 at a time, not four times the band."""
    import tracemalloc

    rng = np.random.default_rng(1)
    band = ((rng.random((256, 65536)) < 0.07) * rng.integers(1, 50, size=(256, 65536))).astype(np.uint16)
    plan = K.GroupPlan(rng.integers(0, 50, size=65536), 50)
    tracemalloc.start()
    try:
        got = K.group_reduce(band, plan, "var")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    oh_bytes = 65536 * 50 * 8
    assert peak < oh_bytes + 4 * K.TILE_BYTES + (4 << 20), peak  # a whole-band cast: 128 MiB, twice
    x = band.astype(np.float64)
    want = npg.aggregate(plan.idx, x, func="var", axis=1, size=50, fill_value=0)
    np.testing.assert_allclose(got, want, rtol=1e-9)
