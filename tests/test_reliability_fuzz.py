"""Property-based fuzzing (hypothesis) of indexing and of the metadata parsers.

* ``normalize_key`` against numpy: every key numpy accepts gives numpy's
  positions; every key numpy refuses is refused with an ``IndexError``.
* ``zarr.json`` / ``.zarray`` / ``.zattrs`` documents and OME-Arrow record
  dicts with random corruptions (a field deleted, replaced by a random JSON
  value, the document cut short): the reader answers with a typed error or
  the correct value — never another exception type, never a hang (30 s).
  "Correct" is what the peer (zarr-python, ome-arrow) reads from the same
  damaged input when it reads it, else the original data.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import dask
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom._indexing import normalize_key
from tests._reliability import is_typed, record, run_limited

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

# Examples per property (CI: 150; the published table: DASK_LOOM_FUZZ_EXAMPLES=2000).
FUZZ = settings(
    max_examples=int(os.environ.get("DASK_LOOM_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=list(HealthCheck)
)
_tally: dict[str, dict[str, int]] = {}


def _count(name: str, outcome: str) -> None:
    _tally.setdefault(name, {}).setdefault(outcome, 0)
    _tally[name][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _publish():
    yield
    for name, counts in _tally.items():
        total = sum(counts.values())
        record(
            "fuzz",
            name,
            injected=_WHAT[name],
            times=total,
            result=", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + "; no other exception, no hang",
            ok=True,
        )


_WHAT = {
    "normalize_key vs numpy": "random 2-D shapes and keys: ints, slices with any step, int arrays (negative, out of range, 2-D), bool masks of any length, Ellipsis, too many axes",
    "zarr.json (v3) corruptions": "a field of an array's zarr.json deleted or replaced by a random JSON value, or the text cut short",
    ".zarray/.zattrs (v2) corruptions": "a field of .zarray or .zattrs deleted or replaced by a random JSON value, or the text cut short",
    "OME-Arrow record corruptions": "a field of a record dict (outside pixel values) deleted or replaced by a random value",
}


# -- indexing -----------------------------------------------------------------------------------


def _axis_key(n: int) -> st.SearchStrategy[Any]:
    ints = st.integers(-2 * n - 2, 2 * n + 2)
    return st.one_of(
        ints,
        st.builds(slice, st.none() | ints, st.none() | ints, st.none() | st.integers(-4, 4).filter(bool)),
        st.lists(ints, max_size=8).map(lambda v: np.array(v, dtype=np.int64)),
        st.lists(st.booleans(), min_size=max(0, n - 1), max_size=n + 1).map(np.array),
        st.lists(ints, min_size=1, max_size=4).map(lambda v: np.array(v).reshape(1, -1)),
    )


@st.composite
def shape_and_key(draw: Any) -> tuple[tuple[int, int], Any]:
    shape = (draw(st.integers(0, 7)), draw(st.integers(0, 7)))
    n_keys = draw(st.integers(0, 3))
    keys = [draw(_axis_key(shape[min(i, 1)])) for i in range(n_keys)]
    if keys and draw(st.booleans()):
        keys.insert(draw(st.integers(0, len(keys))), Ellipsis)
    return shape, tuple(keys) if draw(st.booleans()) or len(keys) != 1 else keys[0]


def _numpy_positions(shape: tuple[int, int], key: Any) -> list[np.ndarray]:
    """numpy's outer-indexing answer: the positions each axis selects."""
    if not isinstance(key, tuple):
        key = (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis")
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    if len(key) > len(shape):
        raise IndexError("too many indices")
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape):
        if isinstance(k, np.ndarray) and k.ndim != 1:
            # Deliberate: each axis is selected on its own (outer indexing), by 1-D keys only.
            raise IndexError("index arrays must be 1-D")
        if isinstance(k, np.ndarray) and k.size == 0:
            k = k.astype(np.int64)  # deliberate: an empty array selects nothing, as an empty list does
        pos = np.arange(n)[k]
        out.append(np.atleast_1d(pos))
    return out


@FUZZ
@given(shape_and_key())
def test_normalize_key_matches_numpy(case):
    shape, key = case
    try:
        expected = _numpy_positions(shape, key)
    except IndexError:
        expected = None
    refused: IndexError | None = None
    try:
        got = [s.positions() for s in normalize_key(key, shape, where="fuzz")]
    except IndexError as exc:
        refused = exc
    if refused is not None:
        assert expected is None, f"{key!r} on {shape}: refused ({refused}), numpy selects {expected}"
        assert "fuzz" in str(refused)  # names the array
        _count("normalize_key vs numpy", "refused with IndexError as numpy does")
        return
    assert expected is not None, f"{key!r} on {shape}: accepted ({got}), numpy refuses it"
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    _count("normalize_key vs numpy", "positions equal to numpy's")


# -- metadata documents ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**15])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["float64", "int8", "<f8", "|b1", "NaN", "Infinity", "bytes", "blosc", "regular", "C", "F", "v2"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


@st.composite
def corrupted(draw: Any, doc: dict[str, Any], *, skip: tuple[str, ...] = ()) -> bytes:
    """A damaged copy of *doc*: a field deleted or replaced, or the JSON text cut short."""
    how = draw(st.sampled_from(["replace", "replace", "delete", "cut"]))
    if how == "cut":
        text = json.dumps(doc)
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    d = copy.deepcopy(doc)
    paths = [p for p in _paths(d) if not any(s in p for s in skip)]
    path = draw(st.sampled_from(paths))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return json.dumps(d).encode()


def _base_store(fmt: int) -> tuple[Any, np.ndarray, dict[str, dict[str, Any]]]:
    import zarr

    from dask_loom.stores import MemoryStore

    s = MemoryStore()
    data = np.arange(12 * 10, dtype="f4").reshape(12, 10)
    kw = {"zarr_format": fmt}
    if fmt == 2:
        import numcodecs

        kw["compressors"] = numcodecs.Zlib(level=1)
    z = zarr.create_array(s, name="x", shape=data.shape, chunks=(5, 4), dtype="f4", fill_value=-1.0, attributes={"units": "m"}, **kw)
    z[...] = data
    docs = {k: json.loads(s.get(k)) for k in s.list() if k.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs") and k.startswith("x/")}
    return s, data, docs


_V3 = _base_store(3)
_V2 = _base_store(2)


#: A call still running after this long is a hang. Typical answers take 0.1 to 1.5 s; a fresh CI
#: machine running the suite on both cores, importing uncompiled modules, once took over 10 s.
HANG_S = 30.0


def _fuzz_zarr(name: str, base: tuple[Any, np.ndarray, dict[str, dict[str, Any]]], key: str, raw: bytes) -> None:
    import zarr

    from dask_loom.stores import MemoryStore

    store0, data, _ = base
    s = MemoryStore({k: store0.get(k) for k in store0.list()})
    s.set(key, raw)

    def peer() -> np.ndarray | None:
        # zarr-python's reading of the same window (only the chunks it touches),
        # unless a damaged chunk shape makes single chunks huge.
        z = zarr.open_array(s, path="x", mode="r")
        # Bytes, not elements: a damaged dtype can make 20 elements gigabytes (an xdist worker of
        # a CI run was killed by the kernel at 22 GB).
        if np.prod(z.chunks, dtype=object) * max(np.dtype(z.dtype).itemsize, 1) > 10**7:
            return None
        return np.asarray(z[tuple(slice(0, n) for n in data.shape[: z.ndim])])

    theirs = run_limited(peer, HANG_S)
    ref: Any = None if (theirs.error is not None or theirs.hung) else theirs.value

    def ours() -> np.ndarray:
        # A window at most the original's size: a damaged shape may declare terabytes,
        # which would be the caller's request to read, not the reader's fault; small blocks
        # so the window's block is not a million tiny (missing) chunks.
        # dask_loom.max-chunk-bytes (4 GiB by default) lowered: a chunk of a damaged shape or dtype
        # that a test would have to fill in memory is refused, with the same typed error.
        with dask.config.set({"dask_loom.max-chunk-bytes": "64MiB"}):
            x = dask_loom.open_zarr(s, "x", mode="r").to_dask(target_bytes="1MiB")
            return np.asarray(x[tuple(slice(0, n) for n in data.shape[: x.ndim])].compute(scheduler="sync"))

    out = run_limited(ours, HANG_S)
    assert not out.hung, f"{key} = {raw[:200]!r}: no answer within {HANG_S:.0f} s"
    if out.error is not None:
        assert is_typed(out.error), f"{key} = {raw[:300]!r}: untyped {type(out.error).__name__}: {out.error}"
        _count(name, "typed errors")
        return
    got = out.value
    if ref is not None and ref.shape == got.shape:
        np.testing.assert_array_equal(got, ref)
        _count(name, "read, equal to zarr-python's reading")
    else:
        np.testing.assert_array_equal(got, data)
        _count(name, "read, equal to the original data")


@FUZZ
@given(st.data())
def test_fuzz_zarr_json(data):
    raw = data.draw(corrupted(_V3[2]["x/zarr.json"]))
    _fuzz_zarr("zarr.json (v3) corruptions", _V3, "x/zarr.json", raw)


@FUZZ
@given(st.data(), st.sampled_from(["x/.zarray", "x/.zattrs"]))
def test_fuzz_zarray(data, key):
    raw = data.draw(corrupted(_V2[2][key]))
    _fuzz_zarr(".zarray/.zattrs (v2) corruptions", _V2, key, raw)


# -- OME-Arrow records ------------------------------------------------------------------------

_IMG = np.arange(2 * 12 * 10, dtype="uint16").reshape(2, 12, 10)
_REC = dask_loom.to_ome_arrow(_IMG, dim_order="ZYX", chunk_shape=(1, 8, 8)).as_py()
_REC = {k: v for k, v in _REC.items() if k != "acquisition_datetime"}


@st.composite
def corrupted_record(draw: Any) -> dict[str, Any]:
    d = copy.deepcopy(_REC)
    paths = [p for p in _paths(d) if "pixels" not in p]
    path = draw(st.sampled_from(paths))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return d


@FUZZ
@given(corrupted_record())
def test_fuzz_ome_records(rec):
    out = run_limited(lambda: np.asarray(dask_loom.open_ome_arrow(rec, layout="ZYX").to_numpy()), HANG_S)
    assert not out.hung
    if out.error is not None:
        assert is_typed(out.error), f"untyped {type(out.error).__name__}: {out.error}"
        _count("OME-Arrow record corruptions", "typed errors")
        return
    # The record format allows sparse chunk lists (absent chunks read as zeros, as
    # in ome-arrow): the reference is ome-arrow's own reading where it reads the record.
    try:
        from ome_arrow.export import to_numpy

        ref = np.asarray(to_numpy(copy.deepcopy(rec)))
    except Exception:
        ref = None
    got = np.asarray(out.value)
    if ref is not None and ref.size == got.size:
        np.testing.assert_array_equal(got.reshape(ref.shape), ref)
        _count("OME-Arrow record corruptions", "read, equal to ome-arrow's reading")
    else:
        np.testing.assert_array_equal(got.reshape(_IMG.shape), _IMG)
        _count("OME-Arrow record corruptions", "read, equal to the original pixels")
