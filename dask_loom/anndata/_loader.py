"""The fast loader: block-shuffled batches read ahead in the background.

An epoch is a random permutation of *blocks* (``block_size`` consecutive
rows of one file).  Blocks are taken ``preload_blocks`` at a time; each such
*fetch* is read with one request per contiguous run (sorted, coalesced,
files read concurrently), its rows are shuffled in memory and cut into
batches.  A background thread keeps up to ``prefetch`` fetches ready, so
memory stays bounded by about ``(prefetch + 2) x block_size x preload_blocks``
rows.  The block order is the same on every worker and rank (same seed); each
takes every ``S``-th block (``S = world_size x num_workers``), so an epoch
yields every row exactly once across all of them.

This is the sampling scheme of scDataset's ``BlockShuffling`` and annbatch's
loader; sparse rows stay CSR until a batch is cut.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._config import get_config
from dask_loom._lazy import issparse
from dask_loom._threads import read_ahead
from dask_loom.anndata._plan import MISSING_CODE

if TYPE_CHECKING:
    import scipy.sparse as sp

    from dask_loom.anndata._plan import CollectionLike

__all__ = ["MappedIterableDataset", "iter_batches", "plan_epoch"]



def plan_epoch(
    n_obs_list: list[int],
    *,
    block_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    shard: int = 0,
    n_shards: int = 1,
) -> list[tuple[int, int, int]]:
    """Blocks ``(file, first, stop)`` (positions within a file's rows) this shard reads, in order.

    Examples
    --------
    >>> plan_epoch([5, 3], block_size=2, shuffle=False, seed=0, epoch=0)
    [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 0, 2), (1, 2, 3)]
    """
    blocks = [(f, a, min(a + block_size, n)) for f, n in enumerate(n_obs_list) for a in range(0, n, block_size)]
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        blocks = [blocks[i] for i in order]
    return blocks[shard::n_shards]


class _Fetch:
    """Rows of one fetch, in joined var space, plus their labels and positions."""

    def __init__(self, arrays: dict[str, Any]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["_index"])

    def take(self, order: np.ndarray) -> _Fetch:
        return _Fetch({k: _rows(v, order) for k, v in self.arrays.items()})

    def cut(self, a: int, b: int) -> _Fetch:
        return _Fetch({k: v[a:b] for k, v in self.arrays.items()})

    @staticmethod
    def concat(parts: list[_Fetch]) -> _Fetch:
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].arrays.keys()
        return _Fetch({k: _stack([p.arrays[k] for p in parts]) for k in keys})


def _rows(v: Any, order: np.ndarray) -> Any:
    return v[order]


def _stack(parts: list[Any]) -> Any:
    if any(issparse(p) for p in parts):
        import scipy.sparse as sp

        parts = [p if issparse(p) else sp.csr_matrix(p) for p in parts]
        return _vstack_csr(parts)
    return np.concatenate(parts)


def _vstack_csr(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
    """Row-stack CSR matrices by concatenating their buffers (scipy's vstack re-validates)."""
    import scipy.sparse as sp

    dtype = np.result_type(*[p.dtype for p in parts])
    nnz = np.cumsum([0, *[p.nnz for p in parts]])
    indptr = np.concatenate([[0], *[p.indptr[1:].astype(np.int64) + off for p, off in zip(parts, nnz[:-1])]])
    data = np.concatenate([p.data.astype(dtype, copy=False) for p in parts])
    indices = np.concatenate([p.indices for p in parts])
    n = sum(p.shape[0] for p in parts)
    return sp.csr_matrix((data, indices, indptr), shape=(n, parts[0].shape[1]))


def _read_fetch(mc: CollectionLike, blocks: list[tuple[int, int, int]], sparse: bool) -> _Fetch:
    by_file: dict[int, list[np.ndarray]] = {}
    for f, a, b in blocks:
        by_file.setdefault(f, []).append(np.arange(a, b))
    file_rows = {}
    positions = {}
    for f, pos in by_file.items():
        p = np.sort(np.concatenate(pos))
        positions[f] = p
        file_rows[f] = mc.indices_list[f][p]
    mats = mc._read_rows(file_rows, sparse=None)
    parts = []
    for f in sorted(file_rows):
        rows = file_rows[f]
        arrays: dict[str, Any] = {
            "_index": mc._offsets[f] + positions[f],
            "_store_idx": np.full(len(rows), f, dtype=np.int64),
        }
        for key in mc._plans:
            arrays[key] = mats[(f, key)]
        for key in mc.obs_keys or []:
            arrays[key] = _labels(mc, key, f, rows)
        parts.append(_Fetch(arrays))
    return _Fetch.concat(parts)


def _labels(mc: CollectionLike, key: str, f: int, rows: np.ndarray) -> np.ndarray:
    if key in mc._codes:
        codes = mc._codes[key][f][rows]
        if key not in mc._nan_coded:
            return codes
        # The same values as mc[i]: NaN where the label is missing or the file lacks the key.
        out = codes.astype(np.float64)
        out[codes == MISSING_CODE] = np.nan
        return out
    col = mc._columns[key][f]
    if col is None:
        return np.full(len(rows), np.nan, dtype=object)
    return np.asarray(col.labels()[rows], dtype=object)


def _emit(batch: _Fetch, sparse: bool, dense_keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.arrays.items():
        if k in dense_keys:
            if k.startswith("obsm_") or not sparse:
                v = v.toarray() if issparse(v) else v
            elif not issparse(v):
                import scipy.sparse as sp

                v = sp.csr_matrix(v)
        out[k] = v
    return out


def iter_batches(
    mc: CollectionLike,
    batch_size: int,
    *,
    shuffle: bool = True,
    block_size: int | None = None,
    preload_blocks: int | None = None,
    seed: int | None = None,
    drop_last: bool = False,
    sparse: bool = False,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    prefetch: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield batches of a :class:`MappedCollection`, block-shuffled, read ahead in the background.

    Parameters
    ----------
    mc
        The collection.
    batch_size
        Rows per batch (the last one may be smaller unless ``drop_last``).
    shuffle
        Permute blocks, and rows within each fetch; ``False`` reads in order.
    block_size
        Consecutive rows per block (default ``dask_loom.loader-block-size``, 256).
        Smaller blocks give more random batches, larger ones faster reads.
    preload_blocks
        Blocks read together and shuffled together (default
        ``dask_loom.loader-preload-blocks``, 32).
    seed
        Makes the epoch reproducible; with ``None`` a fresh seed is drawn.
        Ranks and workers splitting one epoch must share the seed.
    drop_last
        Drop this shard's last incomplete batch.
    sparse
        Layers as ``scipy.sparse.csr_matrix`` batches instead of dense arrays.
    epoch
        Epoch number, mixed into the seed (as ``DistributedSampler.set_epoch``).
    rank, world_size, worker, num_workers
        This reader's share: shard ``rank * num_workers + worker`` of
        ``world_size * num_workers``.
    prefetch
        Fetches read ahead in the background (default ``dask_loom.loader-prefetch``, 2).

    Yields
    ------
    dict
        ``"_index"`` (int64 positions in the collection), ``"_store_idx"``,
        one 2-D array per layer key and ``obsm_<key>``, and per obs key the
        encoded labels or the labels themselves (object array) when not
        encoded.  Encoded labels are int64 (``-1`` for ``unknown_label``);
        a key with a missing label anywhere in the collection (or a file
        without it) gives float64 with NaN there, so each row's label equals
        ``mc[i][key]``.  Layers use the key's common dtype across files.

    Examples
    --------
    >>> import anndata as ad, numpy as np, os, tempfile
    >>> fn = os.path.join(tempfile.mkdtemp(), "a.h5ad")
    >>> ad.AnnData(np.arange(20, dtype="f4").reshape(10, 2)).write_h5ad(fn)
    >>> from dask_loom import MappedCollection
    >>> mc = MappedCollection([fn])
    >>> batches = list(mc.iter_batches(4, block_size=2, seed=0))
    >>> [len(b["_index"]) for b in batches], sorted(np.concatenate([b["_index"] for b in batches]).tolist())
    ([4, 4, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    block_size = int(block_size or get_config("loader-block-size"))
    preload_blocks = int(preload_blocks or get_config("loader-preload-blocks"))
    prefetch = int(prefetch if prefetch is not None else get_config("loader-prefetch"))
    if block_size < 1 or preload_blocks < 1:
        raise ValueError(f"block_size and preload_blocks must be positive, got {block_size}, {preload_blocks}")
    if not (0 <= rank < world_size) or not (0 <= worker < num_workers):
        raise ValueError(f"rank {rank} of {world_size} / worker {worker} of {num_workers} is not a valid shard")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    n_shards = world_size * num_workers
    shard = rank * num_workers + worker
    blocks = plan_epoch(
        mc.n_obs_list, block_size=block_size, shuffle=shuffle, seed=seed, epoch=epoch, shard=shard, n_shards=n_shards
    )
    groups = [blocks[i : i + preload_blocks] for i in range(0, len(blocks), preload_blocks)]
    rng = np.random.default_rng([seed, epoch, shard, 1])
    dense_keys = list(mc._plans)
    return _batches(mc, groups, batch_size, shuffle, drop_last, sparse, prefetch, rng, dense_keys)


def _batches(
    mc: CollectionLike,
    groups: list[list[tuple[int, int, int]]],
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    sparse: bool,
    prefetch: int,
    rng: np.random.Generator,
    dense_keys: list[str],
) -> Iterator[dict[str, Any]]:
    fetches = _prefetched(mc, groups, sparse, prefetch)
    carry: _Fetch | None = None
    try:
        for fetch in fetches:
            n = len(fetch)
            order = rng.permutation(n) if shuffle else np.arange(n)
            pos = 0
            if carry is not None and len(carry):
                # The batch that straddles two fetches: the previous one's rest plus this one's first rows.
                need = min(n, batch_size - len(carry))
                carry = _Fetch.concat([carry, fetch.take(order[:need])])
                pos = need
                if len(carry) < batch_size:
                    continue
                yield _emit(carry, sparse, dense_keys)
                carry = None
            # Each batch gathers its rows straight from the fetch (no permuted copy of the fetch).
            while pos + batch_size <= n:
                yield _emit(fetch.take(order[pos : pos + batch_size]), sparse, dense_keys)
                pos += batch_size
            carry = fetch.take(order[pos:]) if pos < n else None
        if carry is not None and len(carry) and not drop_last:
            yield _emit(carry, sparse, dense_keys)
    finally:
        with contextlib.suppress(Exception):
            fetches.close()  # type: ignore[attr-defined]


def _prefetched(
    mc: CollectionLike, groups: list[list[tuple[int, int, int]]], sparse: bool, prefetch: int
) -> Iterator[_Fetch]:
    # One background thread reads the fetches in order, *prefetch* of them ahead: each
    # fetch is already parallel over files and ranges (map_threads on the I/O pool).
    thunks = (functools.partial(_read_fetch, mc, g, sparse) for g in groups)
    return read_ahead(thunks, max(0, prefetch), workers=1, name="dask-loom-prefetch")


def _register_with_torch() -> None:
    # torch's DataLoader picks the iterable-style fetcher by isinstance(); a
    # virtual subclass keeps torch optional (imported only when installed).
    try:
        from torch.utils.data import IterableDataset
    except ImportError:
        return
    IterableDataset.register(MappedIterableDataset)


class MappedIterableDataset:
    """A torch ``IterableDataset`` of block-shuffled batches (see :func:`iter_batches`).

    Use it with ``DataLoader(ds, batch_size=None, num_workers=k)``: each
    worker (and each rank of ``torch.distributed``) reads its own share of
    the blocks, so an epoch yields every row exactly once.  Call
    :meth:`set_epoch` before each epoch for a new order.  Batches hold torch
    tensors (sparse CSR tensors with ``sparse=True``; labels that are not
    encoded stay lists of values).

    Parameters
    ----------
    collection
        A :class:`~dask_loom.MappedCollection`.
    batch_size, shuffle, block_size, preload_blocks, drop_last, sparse, prefetch
        As for :func:`iter_batches`.
    seed
        Base seed; drawn once here when ``None``, so every worker shares it.
    rank, world_size
        Override what ``torch.distributed`` reports.
    as_tensors
        Convert arrays to torch tensors (default) or yield numpy/scipy.
    """

    def __init__(
        self,
        collection: CollectionLike,
        batch_size: int,
        *,
        shuffle: bool = True,
        block_size: int | None = None,
        preload_blocks: int | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        sparse: bool = False,
        prefetch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        as_tensors: bool = True,
    ) -> None:
        _register_with_torch()
        self.collection = collection
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.block_size = block_size
        self.preload_blocks = preload_blocks
        self.seed = int(np.random.SeedSequence().entropy % (2**63)) if seed is None else int(seed)
        self.drop_last = drop_last
        self.sparse = sparse
        self.prefetch = prefetch
        self.rank = rank
        self.world_size = world_size
        self.as_tensors = as_tensors
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the block order of *epoch* (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int, int, int]:
        rank, world = self.rank, self.world_size
        worker, n_workers = 0, 1
        try:
            import torch.distributed as dist
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            if info is not None:
                worker, n_workers = info.id, info.num_workers
            if rank is None and dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
        except ImportError:
            pass
        return int(rank or 0), int(world or 1), worker, n_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, n_workers = self._shard()
        it = iter_batches(
            self.collection,
            self.batch_size,
            shuffle=self.shuffle,
            block_size=self.block_size,
            preload_blocks=self.preload_blocks,
            seed=self.seed,
            drop_last=self.drop_last,
            sparse=self.sparse,
            epoch=self.epoch,
            rank=rank,
            world_size=world,
            worker=worker,
            num_workers=n_workers,
            prefetch=self.prefetch,
        )
        if not self.as_tensors:
            yield from it
            return
        for batch in it:
            yield _to_torch(batch)


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return _tensors(batch, torch)


def _tensors(batch: dict[str, Any], torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if issparse(v):
            v = v.tocsr()
            out[k] = torch.sparse_csr_tensor(
                torch.from_numpy(v.indptr.astype(np.int64)),
                torch.from_numpy(v.indices.astype(np.int64)),
                torch.from_numpy(v.data),
                size=v.shape,
                check_invariants=False,  # built from a valid scipy CSR matrix
            )
        elif isinstance(v, np.ndarray) and v.dtype != object:
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        else:
            out[k] = list(v)
    return out
