"""An OME-Arrow typed chunk dataset as a chunk target (the dataset writer's half of the block layer).

A dataset (``chunks.parquet``, ``images.parquet``, ``index.parquet``,
``_ome_arrow_dataset.json``) is one Parquet stream of chunk rows, so it has
one writer, as HDF5: :meth:`OMEDatasetTarget.encode_block` (in any task) cuts
a block of whole chunks into chunks, casts them (clamping or refusing values
outside the stored dtype) and returns their bytes; :meth:`store_payload` (in
the caller, in order) appends them as rows through a ``ParquetWriter``, one
chunk per row group by default.  The whole dataset is written in a hidden
folder beside the output that replaces it at commit: a failed or
interrupted write leaves the old dataset (or none), never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_loom.blocks._target import BlockTarget
from dask_loom.errors import UnsupportedDtypeError

__all__ = ["OMEDatasetTarget"]

# Writers hold a few blocks at once: keep each well below dask_loom.block-size
# so a stream stays within a few hundred MiB.
WRITE_BLOCK_BYTES = 32 << 20



def _cast(chunk: np.ndarray, dtype: np.dtype | None, clamp: bool, start: tuple[int, ...], label: str) -> np.ndarray:
    if dtype is None or chunk.dtype == dtype:
        return chunk
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = (chunk.min(), chunk.max()) if chunk.size else (0, 0)
        if lo < info.min or hi > info.max:
            if not clamp:
                raise UnsupportedDtypeError(
                    f"{label}: the chunk at TCZYX {start} holds values {lo}..{hi} outside {dtype} "
                    f"{info.min}..{info.max}; pass clamp=True to clip them"
                )
            chunk = np.clip(chunk, info.min, info.max)
    return chunk.astype(dtype)


class _Dataset:
    """An OME-Arrow chunk dataset being written: a hidden folder beside *out*, renamed over it at commit."""

    def __init__(self, out: str, *, compression: str | None, chunk_rows_per_row_group: int, build_physical_index: bool) -> None:
        self.out = out
        self.compression = compression
        self.rows_per_group = int(chunk_rows_per_row_group)
        self.build_physical_index = build_physical_index
        self.tmp: str | None = None
        self.writer: Any = None
        self.schema: Any = None
        self.md: dict[bytes, bytes] = {}
        self.image_rows: list[dict[str, Any]] = []
        self.index_cols: dict[str, list[Any]] = {}
        self.first_choice: dict[str, Any] | None = None
        self.chunk_id = 0
        self.row_group = 0
        self.pending: list[dict[str, Any]] = []
        self.ids: set[str] = set()

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Dataset]:
        import pyarrow.parquet as pq

        from dask_loom.ome._schema import (
            CHUNK_TABLE_SCHEMA,
            INDEX_TABLE_SCHEMA,
            OME_ARROW_TYPE,
            OME_ARROW_VERSION,
        )

        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.", dir=os.path.dirname(os.path.abspath(self.out)))
        self.md = {
            b"ome.arrow.type": OME_ARROW_TYPE.encode(),
            b"ome.arrow.version": OME_ARROW_VERSION.encode(),
            b"ome.arrow.layout": b"typed-chunk-dataset",
        }
        self.schema = CHUNK_TABLE_SCHEMA.with_metadata(self.md)
        self.index_cols = {f.name: [] for f in INDEX_TABLE_SCHEMA}
        try:
            self.writer = pq.ParquetWriter(
                os.path.join(self.tmp, "chunks.parquet"), self.schema, compression=self.compression,
                use_dictionary=["image_id", "dtype"], write_statistics=[*list("tczyx"), "chunk_id"],
            )
            with self.writer:
                yield self
            self._finish()
            self._swap_in()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        finally:
            self.writer = None

    def flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.Table.from_pylist(self.pending, schema=self.schema), row_group_size=len(self.pending))
            self.row_group += 1
            self.pending = []

    def add_chunk(self, image_id: str, start: tuple[int, ...], shape: tuple[int, ...], dtype: str, data: bytes) -> None:
        rec = {
            "image_id": image_id, "chunk_id": self.chunk_id,
            **{a: int(v) for a, v in zip("tczyx", start)},
            **{f"shape_{a}": int(v) for a, v in zip("tczyx", shape)},
            "dtype": dtype,
            "pixel_bytes": data,
        }
        for key in ("image_id", "chunk_id", *"tczyx", *[f"shape_{a}" for a in "tczyx"]):
            self.index_cols[key].append(rec[key])
        self.index_cols["row_group_id"].append(self.row_group)
        self.index_cols["row_index_in_group"].append(len(self.pending))
        self.index_cols["fragment_path"].append("chunks.parquet")
        self.pending.append(rec)
        self.chunk_id += 1
        if len(self.pending) >= self.rows_per_group:
            self.flush()

    def _finish(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from dask_loom import __version__
        from dask_loom.ome._schema import (
            DATASET_MANIFEST,
            IMAGE_TABLE_SCHEMA,
            INDEX_TABLE_SCHEMA,
            OME_ARROW_TYPE,
            OME_ARROW_VERSION,
        )

        assert self.tmp is not None
        images_schema = IMAGE_TABLE_SCHEMA.append(pa.field("physical_json", pa.string())).with_metadata(self.md)
        pq.write_table(pa.Table.from_pylist(self.image_rows, schema=images_schema), os.path.join(self.tmp, "images.parquet"),
                       compression=self.compression)
        if self.build_physical_index:
            pq.write_table(
                pa.Table.from_pydict(self.index_cols, schema=INDEX_TABLE_SCHEMA.with_metadata(self.md)),
                os.path.join(self.tmp, "index.parquet"),
                compression=self.compression,
            )
        manifest = {
            "type": OME_ARROW_TYPE,
            "version": OME_ARROW_VERSION,
            "layout": "typed-chunk-dataset",
            "image_count": len(self.image_rows),
            "chunk_count": self.chunk_id,
            "choice": {**(self.first_choice or {}), "compression": self.compression},
            "package_versions": {"dask_loom": __version__, "pyarrow": pa.__version__, "numpy": np.__version__},
        }
        with open(os.path.join(self.tmp, DATASET_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)

    def _swap_in(self) -> None:
        assert self.tmp is not None
        if os.path.exists(self.out):
            old = self.out + f".old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        else:
            os.replace(self.tmp, self.out)


class OMEDatasetTarget(BlockTarget):
    """One image of an OME-Arrow typed chunk dataset, as a chunk target.

    Parameters
    ----------
    output_path
        The dataset folder (replaced at commit when it exists).
    shape
        TCZYX shape of the image.
    dtype
        Stored pixel dtype.
    chunk_shape
        TCZYX chunk shape (see :func:`dask_loom.ome.choose_chunking`).
    image_id
        The image's id in the dataset.
    source_dtype
        The pixel dtype of the input (default *dtype*); blocks are cast to it
        first, then to *dtype* chunk by chunk.
    clamp
        Clip values outside *dtype*'s range (``False``: refuse them).
    meta, layout, compression, chunk_rows_per_row_group, build_physical_index
        Image metadata (name, channels, physical sizes), the layout name
        recorded, and the dataset's Parquet settings.

    Notes
    -----
    Standalone, the target's transaction writes a one-image dataset.
    :func:`dask_loom.write_ome_arrow_dataset` writes several: each image's
    target joins the dataset's transaction and commits its image row.

    Examples
    --------
    >>> import numpy as np, tempfile, os, dask_loom
    >>> from dask_loom.ome import OMEDatasetTarget
    >>> d = os.path.join(tempfile.mkdtemp(), "ds")
    >>> a = np.arange(2 * 3 * 40 * 50, dtype="uint16").reshape(1, 2, 3, 40, 50)
    >>> t = OMEDatasetTarget(d, a.shape, a.dtype, chunk_shape=(1, 1, 3, 16, 16), image_id="img")
    >>> dask_loom.store(a, t, scheduler="sync")
    >>> bool((dask_loom.open_ome_arrow(d).to_numpy() == a[0, :, :].transpose(1, 0, 2, 3)).all())
    True
    """

    @property
    def block_bytes(self) -> int:  # type: ignore[override]
        """Blocks of in-memory input: at most 32 MiB (a few are held at once), or ``dask_loom.block-size``."""
        from dask_loom._config import block_size_bytes

        return min(block_size_bytes(), WRITE_BLOCK_BYTES)

    def __init__(
        self,
        output_path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: Any,
        *,
        chunk_shape: tuple[int, ...],
        image_id: str = "image-00000",
        source_dtype: Any = None,
        clamp: bool = True,
        meta: dict[str, Any] | None = None,
        layout: str = "block",
        compression: str | None = "zstd",
        chunk_rows_per_row_group: int = 1,
        build_physical_index: bool = True,
        prefix: str = "ome-write",
        dataset: _Dataset | None = None,
    ) -> None:
        from dask_loom.errors import SelectionError
        from dask_loom.ome._schema import pixel_dtype

        self.out = os.fspath(output_path)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 5 or len(chunk_shape) != 5:
            raise SelectionError(f"{self.out}: shape {self.shape} and chunk_shape {tuple(chunk_shape)} must be TCZYX")
        self.dtype = pixel_dtype(np.dtype(dtype), what="pixel dtype")
        self.source_dtype = pixel_dtype(np.dtype(source_dtype if source_dtype is not None else dtype), what="array dtype")
        self.chunk_shape = tuple(max(1, min(int(c), n)) for c, n in zip(chunk_shape, self.shape))
        self.image_id = str(image_id)
        self.clamp = bool(clamp)
        self.meta = dict(meta or {})
        self.layout = layout
        self.prefix = prefix
        self.label = f"{self.out}: image {self.image_id!r}"
        self._settings = {
            "compression": compression,
            "chunk_rows_per_row_group": chunk_rows_per_row_group,
            "build_physical_index": build_physical_index,
        }
        self._dataset = dataset

    def __dask_tokenize__(self) -> Any:
        return ("OMEDatasetTarget", self.out, self.image_id, self.shape, self.dtype.str, self.chunk_shape, self.clamp, self.prefix)

    def __reduce__(self) -> Any:
        # Tasks encode only: no dataset writer travels with them.
        return (
            _rebuild,
            (self.out, self.shape, self.dtype, self.chunk_shape, self.image_id, self.source_dtype, self.clamp, self.prefix, self.label),
        )

    # -- the two halves ---------------------------------------------------------------------

    def encode_block(self, region: tuple[slice, ...], data: Any) -> list[tuple[tuple[int, ...], tuple[int, ...], str, bytes]]:
        """The block's chunks in C order, cast to the stored dtype: ``(start, shape, dtype name, bytes)``."""
        self.check_region(region)
        block = np.asarray(data)
        expect = tuple(r.stop - r.start for r in region)
        if block.shape != expect:
            raise ValueError(f"{self.label}: a block of shape {block.shape} does not fit region {region}")
        if block.dtype != self.source_dtype:
            block = block.astype(self.source_dtype.newbyteorder("="))
        elif not block.dtype.isnative:
            block = block.astype(block.dtype.newbyteorder("="))
        origin = tuple(r.start for r in region)
        out = []
        for idx in np.ndindex(*[-(-b // c) for b, c in zip(block.shape, self.chunk_shape)]):
            sl = tuple(slice(i * c, min((i + 1) * c, b)) for i, c, b in zip(idx, self.chunk_shape, block.shape))
            start = tuple(o + s.start for o, s in zip(origin, sl))
            ch = _cast(block[sl], self.dtype if self.dtype != self.source_dtype else None, self.clamp, start, self.image_id)
            out.append((start, tuple(ch.shape), np.dtype(ch.dtype).name, np.ascontiguousarray(ch).tobytes()))
        return out

    def store_payload(self, payload: list[tuple[tuple[int, ...], tuple[int, ...], str, bytes]]) -> None:
        """Append the block's chunks as rows of ``chunks.parquet`` (in the writer, in order)."""
        if self._dataset is None or self._dataset.writer is None:
            raise RuntimeError(f"{self.label}: payloads are stored inside the target's transaction")
        for start, shape, dtype, data in payload:
            self._dataset.add_chunk(self.image_id, start, shape, dtype, data)

    # -- the transaction --------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._dataset is not None and self._dataset.writer is not None:
            # Inside write_ome_arrow_dataset: the dataset's transaction decides.
            yield
            self._commit_image()
            return
        self._dataset = _Dataset(self.out, **self._settings)
        try:
            with self._dataset.writing():
                yield
                self._commit_image()
        finally:
            self._dataset = None

    def _commit_image(self) -> None:
        from dask_loom.ome._schema import channel_record, default_channels

        ds = self._dataset
        assert ds is not None
        ds.flush()  # an image never shares a row group with the next one
        meta = self.meta
        t, c, z, y, x = self.shape
        chans = meta.get("channels") or default_channels(c, meta.get("channel_names"))
        phys = {f"physical_size_{a}": meta.get(f"physical_size_{a}") for a in "xyz"}
        unit = meta.get("physical_size_unit")
        for a in "xyz":
            u = meta.get(f"physical_size_{a}_unit") or unit
            if u is not None:
                phys[f"physical_size_{a}_unit"] = u
        ds.image_rows.append(
            {
                "image_id": self.image_id,
                "name": str(meta.get("name") or self.image_id),
                "image_type": meta.get("image_type"),
                "dtype": self.dtype.name,
                "size_t": t, "size_c": c, "size_z": z, "size_y": y, "size_x": x,
                "layout": self.layout,
                **{f"chunk_{a}": int(v) for a, v in zip("tczyx", self.chunk_shape)},
                "compression": ds.compression,
                "channels_json": json.dumps([channel_record(ch, i) for i, ch in enumerate(chans)]),
                "physical_json": json.dumps({k: v for k, v in phys.items() if v is not None}),
            }
        )
        if ds.first_choice is None:
            ds.first_choice = {"layout": self.layout, "chunk_shape": self.chunk_shape}


def _rebuild(
    out: str, shape: tuple[int, ...], dtype: Any, chunk_shape: tuple[int, ...], image_id: str, source_dtype: Any,
    clamp: bool, prefix: str, label: str,
) -> OMEDatasetTarget:
    t = OMEDatasetTarget(out, shape, dtype, chunk_shape=chunk_shape, image_id=image_id, source_dtype=source_dtype, clamp=clamp, prefix=prefix)
    t.label = label
    return t
