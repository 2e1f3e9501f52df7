"""lamindb 2.12.1's own ``test_mapped``, run against dask_loom's MappedCollection.

The peer's test module is taken at test time from the lamindb-core 2.12.1
sdist (``$DASK_LOOM_LAMINDB_SDIST``: the ``.tar.gz`` or its unpacked folder;
otherwise ``pip download`` into ``~/.cache/dask_loom/peers``); it is never
part of this repository.  It runs in a subprocess with ``lamindb`` replaced by
``tests/peer_shims/lamindb`` (no database: artifacts are files in a
temporary folder, ``Collection.mapped`` builds a ``dask_loom.MappedCollection``)
and every top-level statement of ``test_mapped`` as its own step.  The steps
that fail must be exactly those that ``docs/differences-mapped.md`` lists as
deliberate differences.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIMS = REPO / "tests" / "peer_shims"
SDIST = "lamindb_core-2.12.1.tar.gz"
MEMBER = "lamindb_core-2.12.1/tests/pydata/test_collection.py"


def _sdist() -> Path:
    given = os.environ.get("DASK_LOOM_LAMINDB_SDIST")
    if given:
        path = Path(given)
        if not path.exists():
            pytest.skip(f"DASK_LOOM_LAMINDB_SDIST={given} does not exist")
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dask_loom" / "peers"
    if (cache / SDIST).exists():
        return cache / SDIST
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(cache), "lamindb-core==2.12.1"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"lamindb-core 2.12.1 sdist not found and could not be downloaded ({exc}); set DASK_LOOM_LAMINDB_SDIST")
    if done.returncode or not (cache / SDIST).exists():
        pytest.skip(
            "lamindb-core 2.12.1 sdist not found and `pip download` failed "
            f"({done.stderr.strip().splitlines()[-1:] or done.returncode}); set DASK_LOOM_LAMINDB_SDIST"
        )
    return cache / SDIST


def _peer_test_module(tmp_path: Path) -> Path:
    src = _sdist()
    target = tmp_path / "test_collection.py"
    if src.is_dir():
        found = src / "tests" / "pydata" / "test_collection.py"
        if not found.exists():
            pytest.skip(f"{src} has no tests/pydata/test_collection.py")
        target.write_bytes(found.read_bytes())
        return target
    with tarfile.open(src) as tf:
        try:
            member = tf.extractfile(MEMBER)
        except KeyError:
            member = None
        if member is None:
            pytest.skip(f"{src} has no {MEMBER}")
        target.write_bytes(member.read())
    return target


def _documented_failures() -> set[str]:
    text = (REPO / "docs" / "differences-mapped.md").read_text(encoding="utf-8")
    section = text[text.index("## lamindb's own `test_mapped`") :]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))


def test_lamindb_test_mapped_fails_only_on_documented_differences(tmp_path):
    module = _peer_test_module(tmp_path)
    import dask_loom

    # the subprocess imports the dask_loom this test process imported
    package_root = str(Path(dask_loom.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(SHIMS / "run_test_steps.py"), str(module), "test_mapped", "adata", "adata2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["steps"]) > 80  # the whole test ran, step by step
    failing = {f["source"]: f["error"] for f in result["failures"]}
    documented = _documented_failures()
    assert documented, "docs/differences-mapped.md lists no failing step"
    assert set(failing) == documented, json.dumps(result["failures"], indent=1)
    # each documented step fails for the documented reason
    missing_key = next(k for k in failing if "feat_missing" in k)
    assert failing[missing_key].startswith("ElementNotFoundError") and "X_missing" in failing[missing_key]
    csc = next(k for k in failing if "collection_csc" in k)
    assert "DID NOT RAISE" in failing[csc]
