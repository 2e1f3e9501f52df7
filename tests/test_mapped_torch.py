"""MappedCollection and MappedIterableDataset inside torch's DataLoader (workers: fork and spawn)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
from test_mapped import _joint_reference, _write  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dask_loom import MappedCollection, MappedIterableDataset  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("mapped_torch"))


def _check_batches(mc, batches, order, ref):
    seen = 0
    for batch in batches:
        n = batch["X"].shape[0]
        idx = order[seen : seen + n]
        np.testing.assert_array_equal(batch["X"].numpy(), ref[idx])
        np.testing.assert_array_equal(batch["_store_idx"].numpy(), mc.storage_idx[idx])
        expect = [mc[int(i)]["cell_type"] for i in idx]
        got = batch["cell_type"].numpy()
        for e, g in zip(expect, got):
            assert (np.isnan(g) and e is np.nan) or g == e
        seen += n
    assert seen == len(order)


@pytest.mark.parametrize(
    ("workers", "context", "parallel"),
    [(0, None, False), (2, "fork", False), (2, "spawn", True)],
)
def test_dataloader_getitems(files, workers, context, parallel):
    paths, refs = files
    mc = MappedCollection(paths, obs_keys=["cell_type", "batch"], obsm_keys="emb", layers_keys=["X", "counts"], join="outer", parallel=parallel)
    _, mats = _joint_reference(refs, "outer")
    ref = np.concatenate(mats)
    order = np.random.default_rng(0).permutation(mc.n_obs)
    loader = DataLoader(
        mc,
        batch_size=16,
        sampler=order.tolist(),
        num_workers=workers,
        multiprocessing_context=context,
        worker_init_fn=MappedCollection.torch_worker_init_fn if workers else None,
    )
    _check_batches(mc, list(loader), order, ref)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_iterable_dataset_workers(files, context):
    paths, refs = files
    mc = MappedCollection(paths, obs_keys="cell_type", join="outer")
    _, mats = _joint_reference(refs, "outer")
    ref = np.concatenate(mats)
    ds = MappedIterableDataset(mc, 8, block_size=4, preload_blocks=2, seed=3)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    seen = []
    for batch in loader:
        idx = batch["_index"].numpy()
        np.testing.assert_array_equal(batch["X"].numpy(), ref[idx])
        codes = batch["cell_type"].numpy()
        assert codes.dtype == np.float64  # a missing label per file: NaN, as mc[i] gives
        seen.append(idx)
    seen = np.concatenate(seen)
    assert sorted(seen.tolist()) == list(range(mc.n_obs))  # two workers, every row exactly once
    # the same epoch again is the same order; set_epoch changes it
    again = np.concatenate([b["_index"].numpy() for b in DataLoader(ds, batch_size=None, num_workers=0)])
    ds.set_epoch(1)
    other = np.concatenate([b["_index"].numpy() for b in DataLoader(ds, batch_size=None, num_workers=0)])
    assert sorted(again.tolist()) == sorted(other.tolist())
    assert not np.array_equal(again, other)


def test_iterable_sparse_tensors(files):
    paths, refs = files
    mc = MappedCollection(paths, join="inner")
    _, mats = _joint_reference(refs, "inner")
    ref = np.concatenate(mats)
    for batch in MappedIterableDataset(mc, 10, sparse=True, seed=0):
        assert batch["X"].layout == torch.sparse_csr
        np.testing.assert_array_equal(batch["X"].to_dense().numpy(), ref[batch["_index"].numpy()])


def test_torch_model_step(files):
    """A batch feeds a model directly (scvi-tools style: X float, labels as class indices)."""
    paths, _ = files
    mc = MappedCollection(paths, obs_keys="batch", join="inner")
    model = torch.nn.Linear(mc.n_vars, len(mc.encoders["batch"]))
    loss_fn = torch.nn.CrossEntropyLoss()
    kept = 0
    for batch in MappedIterableDataset(mc, 16, seed=0):
        y = batch["batch"]
        keep = ~torch.isnan(y)  # file 1 has no `batch`: NaN labels, left out of the loss
        if not keep.any():
            continue
        loss = loss_fn(model(batch["X"][keep].float()), y[keep].long())
        loss.backward()
        assert np.isfinite(loss.item())
        kept += int(keep.sum())
    assert kept == pd.notna(mc.get_merged_labels("batch")).sum() < mc.n_obs
