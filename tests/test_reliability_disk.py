"""Disk full while writing: a small tmpfs mounted by the test.

Each write is made to run out of space (random, incompressible data larger
than what is free).  It must fail with a clear error — an ``OSError`` (a
``dask_loom.errors.StoreError``) whose message names the file and says the
device is full — leave the original whole (same digest, validates), and
leave no temporary files behind taking the space.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid

import numpy as np
import pytest

import dask_loom
from dask_loom.errors import StoreError
from tests._faults import any_digest, any_valid, is_valid_zarr, zarr_digest
from tests._reliability import record

pytestmark = [pytest.mark.reliability]

MiB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path):
    """Mount a tmpfs of a given size; yields ``mount(size_bytes) -> path``."""
    mounted: list[str] = []

    def mount(size: int) -> str:
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a size-limited file system")
        d = str(tmp_path / f"mnt-{uuid.uuid4().hex[:6]}")
        os.makedirs(d)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip() or r.returncode}); disk-full tests need root")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", d], capture_output=True)


def _noise(shape, seed=0) -> np.ndarray:
    # Incompressible: gzip cannot shrink it below what the test reserves.
    return np.random.default_rng(seed).random(shape).astype("f4")


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _leftovers(d: str) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith(".dlpart-") or (".dask-loom-" in n and n.endswith(".tmp"))]


def _check_error(exc: BaseException, name: str) -> None:
    assert isinstance(exc, OSError), type(exc)
    text = str(exc)
    assert name in text, text  # names the file or store
    assert "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC, text


def _small_loom(path: str, shape=(256, 512)) -> None:
    dask_loom.create(path, _noise(shape), {"Gene": np.arange(shape[0])}, {"CellID": np.arange(shape[1])}, chunks=(64, 64))


CASES = {
    # name: (container, operation on the file at `path` that needs more space than is free)
    "create (replace a .loom)": ("loom", lambda p: dask_loom.create(p, _noise((1024, 2048), 1), {"G": np.arange(1024)}, {"C": np.arange(2048)})),
    "permute .loom": ("loom", lambda p: _with(p, lambda ds: ds.permute(np.arange(ds.shape[1])[::-1].copy(), axis=1))),
    "layer write .loom": ("loom", lambda p: _with(p, lambda ds: ds.layers.__setitem__("big", _noise((256, 512), 2)))),
    "add_columns .loom": ("loom", lambda p: _with(p, lambda ds: ds.add_columns(_noise((256, 2048), 3), {"CellID": np.arange(2048)}))),
    "layer write .loom.zarr": ("zarr", lambda p: _with(p, lambda ds: ds.layers.__setitem__("big", _noise((256, 512), 4)))),
    "add_columns .loom.zarr": ("zarr", lambda p: _with(p, lambda ds: ds.add_columns(_noise((256, 2048), 5), {"CellID": np.arange(2048)}))),
    "convert .loom -> .loom.zarr": ("conv", lambda p: dask_loom.convert(p, p + ".zarr", chunks=(64, 64), scheduler="threads")),
    "to_zarr (replace an array)": ("array", lambda p: dask_loom.to_zarr(_noise((1024, 1024), 6), p, "x", chunks=(128, 128), scheduler="threads")),
}


def _with(path: str, fn) -> None:
    with dask_loom.connect(path) as ds:
        fn(ds)


@pytest.mark.parametrize("case", list(CASES))
def test_disk_full(tiny_fs, case):
    kind, op = CASES[case]
    d = tiny_fs(int(2.5 * MiB))
    if kind == "loom":
        path = os.path.join(d, "x.loom")
        _small_loom(path)  # ~0.5 MiB of noise
        target = path
    elif kind == "zarr":
        path = os.path.join(d, "x.loom.zarr")
        src = os.path.join(os.path.dirname(d), f"src-{uuid.uuid4().hex[:6]}.loom")
        _small_loom(src)
        dask_loom.convert(src, path, chunks=(64, 64), scheduler="sync")
        target = path
    elif kind == "conv":
        path = os.path.join(d, "x.loom")
        _small_loom(path)
        dask_loom.convert(path, path + ".zarr", chunks=(64, 64), scheduler="sync")  # the old store at the target name
        target = path + ".zarr"
    else:
        import zarr

        path = os.path.join(d, "arrays.zarr")
        g = zarr.open_group(path, mode="w")
        g.create_array("x", data=_noise((300, 300), 7), chunks=(100, 100))
        target = path
    # Fill the disk: what is left cannot hold a second copy of the data (0.5 MiB of noise).
    with open(os.path.join(d, "ballast"), "wb") as fh:
        fh.write(b"\0" * max(0, _free(d) - int(0.3 * MiB)))
    before = any_digest(target) if kind != "array" else zarr_digest(target)
    free_before = _free(d)
    with pytest.raises(OSError) as info:
        op(path)
    _check_error(info.value, os.path.basename(target))
    after = any_digest(target) if kind != "array" else zarr_digest(target)
    ok, why = any_valid(target) if kind != "array" else is_valid_zarr(target, loom=False)
    assert ok, why
    assert after == before  # the original is whole and unchanged
    assert _leftovers(d) == []  # nothing half-written left taking the space
    assert _free(d) >= free_before - 64 * 1024  # (lock files aside)
    record(
        "disk-full",
        case,
        injected="tmpfs of 2.5 MiB mounted by the test, filled to 0.3 MiB free; the write needs more (random, incompressible data)",
        times=1,
        result=f"{type(info.value).__name__}: {str(info.value).replace(d + os.sep, '')[:110]}…; original unchanged and valid, no temporary files left",
        ok=True,
    )
    assert isinstance(info.value, StoreError), type(info.value)
