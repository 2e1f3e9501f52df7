"""The notebooks in notebooks/: committed without outputs, and each one runs (nbclient) on the real data."""

from __future__ import annotations

import json
import pathlib
import subprocess

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _committed() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", "notebooks/*.ipynb"], cwd=REPO, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.stdout.split()


def test_there_are_the_four_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01-loom-with-xarray.ipynb",
        "02-distributed-aggregate.ipynb",
        "03-torch-mapped-collection.ipynb",
        "04-ome-arrow-tiles.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    """Outputs and execution counts never reach git; the file is valid nbformat 4."""
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
        assert not cell.get("attachments"), f"{path.name} cell {i} has attachments"
        # Per-cell run metadata (execution timings, collapsed/scrolled state) is noise too.
        assert not set(cell.metadata) & {"execution", "collapsed", "scrolled"}, f"{path.name} cell {i}: {cell.metadata}"
    assert "widgets" not in nb.metadata, f"{path.name} carries widget state"


def test_committed_notebooks_are_stripped():
    """Also what git holds (a notebook saved with outputs after the last check would show here)."""
    committed = _committed()
    if not committed:
        pytest.skip("not a git checkout")
    for rel in committed:
        blob = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=REPO, capture_output=True, text=True)
        if blob.returncode != 0:  # staged but not committed yet
            continue
        nb = json.loads(blob.stdout)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [], rel
                assert cell["execution_count"] is None, rel


def test_stripped_check_catches_outputs(tmp_path):
    """The check above is not vacuous: an executed-looking cell fails it."""
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    code.execution_count = 1
    bad = tmp_path / NOTEBOOKS[0].name
    nbformat.write(nb, bad)
    with pytest.raises(AssertionError, match="has outputs"):
        test_notebook_is_stripped(bad)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, data_dir, monkeypatch):
    """Execute the notebook in a fresh kernel; its own asserts check values against the data's pins."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("DASK_LOOM_TEST_DATA", str(data_dir))
    # Local runs: no inherited scheduler or scratch folder from a deployment.
    for var in ("DASK_SCHEDULER_ADDRESS", "DASK_LOOM_SCHEDULER", "SCRATCH_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # Every code cell ran.
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
