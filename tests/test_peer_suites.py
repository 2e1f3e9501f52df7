"""The peers' own test suites, run against dask_loom with the peer's import pointed at it.

loompy 3.0.8's ``tests/`` run with ``import loompy`` giving ``dask_loom``;
ome-arrow 0.1.0's ``tests/test_tensor.py`` run with ``ome_arrow.tensor.TensorView``
and ``LazyTensorView`` (also as used by ``OMEArrow.tensor_view``) replaced by
dask_loom's.  The peers' code is never part of this repository: the tests come
from the peer's sdist, found at test time (``$DASK_LOOM_PEER_SDISTS``, a folder
holding ``loompy-3.0.8.tar.gz`` / ``ome_arrow-0.1.0.tar.gz``; else fetched once
with ``pip download --no-binary :all:`` into ``~/.cache/dask_loom-peer-sdists``),
and skipped with the reason when it cannot be found.

Each suite first runs against the peer itself, to show that the environment
shims are right (every test passes), then against dask_loom: the failures must
be exactly the listed ones, each named in the docs as a deliberate difference.

Environment shims (the suites predate numpy 2 and h5py 3, and fail against the
peers themselves without them): loompy's tests use ``np.int`` (removed in numpy
1.24) and ``h5py.File(name)`` expecting h5py 2's default mode ``"a"`` (h5py 3
opens read-only); the shim restores both for that run only.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

LOOMPY = ("loompy", "3.0.8", "loompy-3.0.8.tar.gz")
OME_ARROW = ("ome-arrow", "0.1.0", "ome_arrow-0.1.0.tar.gz")

#: loompy tests that fail against dask_loom, each named in docs/differences.md (none today).
LOOMPY_EXPECTED_FAILURES: set[str] = set()

#: ome-arrow tests that fail against dask_loom, each named in docs/ome.md.
OME_ARROW_EXPECTED_FAILURES = {
    # private attributes of ome-arrow's implementation (``_data``, ``_data_py_dict``)
    "test_tensor_view_chunk_policy_modes",
    "test_scan_tensor_view_to_numpy_avoids_python_record_materialization",
    "test_scan_chunked_parquet_tensor_view_avoids_python_record_materialization",
    # no StructScalar -> as_py() conversion, so no warning about it
    "test_dlpack_arrow_mode_single_plane",
    # LazyTensorView.layout normalised like TensorView.layout
    "test_lazy_tensor_view_with_layout_defers_materialization",
    # a layout dropping a non-singleton axis is refused when the view is built
    "test_layout_drop_non_singleton_errors",
}


def _sdist(project: str, version: str, filename: str) -> pathlib.Path:
    """The peer's sdist: from $DASK_LOOM_PEER_SDISTS, the cache, or pip (once); skip when none can be had."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        have = installed(project)
    except PackageNotFoundError:
        pytest.skip(f"{project} is not installed")
    if have != version:  # the suite is compared with the installed peer first
        pytest.skip(f"{project} {have} is installed; these checks run {project} {version}'s suite against {version}")
    env = os.environ.get("DASK_LOOM_PEER_SDISTS")
    if env:
        path = pathlib.Path(env) / filename
        if path.exists():
            return path
        pytest.skip(f"{filename} is not in $DASK_LOOM_PEER_SDISTS={env}")
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "dask_loom-peer-sdists"
    path = cache / filename
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"{project}=={version}", "--no-binary", ":all:", "--no-deps", "-d", str(cache), "-q"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{project} {version} sdist not found and 'pip download' failed ({exc}); set DASK_LOOM_PEER_SDISTS")
    if p.returncode != 0 or not path.exists():
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{project} {version} sdist not found and 'pip download' failed ({last}); set DASK_LOOM_PEER_SDISTS")
    return path


def _extract(sdist: pathlib.Path, dest: pathlib.Path, members: tuple[str, ...]) -> pathlib.Path:
    """Extract the sdist's files under *members* (``tests/`` …) into *dest*; returns the project root."""
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        wanted = [m for m in tar.getmembers() if any(m.name.startswith(f"{root}/{x}") for x in members)]
        tar.extractall(dest, members=wanted, filter="data")
    return dest / root


def _run(root: pathlib.Path, tests: list[str], conftest_extra: str, tmp: pathlib.Path) -> tuple[set[str], set[str], str]:
    """Run pytest on *tests* in a subprocess, in *root* (loompy's suite writes ``test.loom`` there).

    Returns the passed tests (``class::name``), the names of the failed ones and the output.
    """
    conftest = root / "tests" / "conftest.py"
    original = conftest.read_text() if conftest.exists() else ""
    conftest.write_text(original + "\n\n# --- added by dask_loom's tests/test_peer_suites.py ---\n" + textwrap.dedent(conftest_extra))
    report = tmp / f"report-{len(list(tmp.iterdir()))}.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-p", "no:randomly", f"--junitxml={report}",
           "-o", "addopts=", "--rootdir", str(root), "-W", "ignore::DeprecationWarning"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    conftest.write_text(original)
    if not report.exists():
        raise AssertionError(f"pytest did not run:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    passed, failed = set(), set()
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(name)
        elif case.find("skipped") is None:
            passed.add(f"{case.get('classname')}::{name}")  # loompy has two test_get methods
    return passed, failed, p.stdout[-6000:]


LOOMPY_SHIMS = """
import h5py
import numpy as np

if not hasattr(np, "int"):  # removed in numpy 1.24; the suite uses it
    np.int = int


class _File(h5py.File):  # h5py 2's default mode, which the suite expects
    def __init__(self, name, mode="a", *args, **kwargs):
        super().__init__(name, mode, *args, **kwargs)


h5py.File = _File
"""

POINT_LOOMPY = """
import sys

import dask_loom

sys.modules["loompy"] = dask_loom
"""

POINT_OME_ARROW = """
import ome_arrow.core
import ome_arrow.tensor

import dask_loom.ome

for _module in (ome_arrow.tensor, ome_arrow.core):
    _module.TensorView = dask_loom.ome.TensorView
    _module.LazyTensorView = dask_loom.ome.LazyTensorView
"""


def _documented(names: set[str], doc: pathlib.Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = sorted(n for n in names if n not in text)
    assert not missing, f"expected peer-test failures not named in {doc.name}: {missing}"


@pytest.mark.slow
def test_loompy_suite(tmp_path):
    root = _extract(_sdist(*LOOMPY), tmp_path / "src", ("tests/",))
    passed, failed, out = _run(root, ["tests"], LOOMPY_SHIMS, tmp_path)
    assert not failed and len(passed) >= 7, f"loompy's own suite fails against loompy itself (shims wrong?):\n{out}"
    passed, failed, out = _run(root, ["tests"], LOOMPY_SHIMS + POINT_LOOMPY, tmp_path)
    assert failed == LOOMPY_EXPECTED_FAILURES, out
    assert len(passed) >= 7
    _documented(LOOMPY_EXPECTED_FAILURES, DOCS / "differences.md")


@pytest.mark.slow
def test_ome_arrow_tensor_suite(tmp_path):
    root = _extract(_sdist(*OME_ARROW), tmp_path / "src", ("tests/",))
    passed, failed, out = _run(root, ["tests/test_tensor.py"], "", tmp_path)
    assert not failed and len(passed) >= 20, f"ome-arrow's own tensor tests fail against ome-arrow itself:\n{out}"
    passed, failed, out = _run(root, ["tests/test_tensor.py"], POINT_OME_ARROW, tmp_path)
    assert failed == OME_ARROW_EXPECTED_FAILURES, out
    assert len(passed) >= 20
    _documented(OME_ARROW_EXPECTED_FAILURES, DOCS / "ome.md")
