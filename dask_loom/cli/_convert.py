"""``dask-loom convert``: a Loom container between ``.loom`` and ``.loom.zarr``, into AnnData, or an image to OME-Arrow."""

from __future__ import annotations

import argparse
import time

from dask_loom.cli._common import announce, compute_options, progress, say, validate_option

__all__: list[str] = []


def convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="source: a Loom container (.loom or .loom.zarr) or an image (OME-TIFF, OME-Zarr); path or URL",
    )
    p.add_argument(
        "dst",
        nargs="?",
        help="target: *.loom.zarr → Loom in Zarr, *.zarr or *.h5ad → AnnData (Zarr v3, sharded), "
        "*.parquet → OME-Arrow, else HDF5 .loom; a Loom target is replaced if it exists",
    )
    p.add_argument(
        "--reshard",
        action="store_true",
        help="rewrite SRC (a .loom.zarr, or a Zarr array) in place as sharded Zarr v3; no DST",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing AnnData target (otherwise it is an error)",
    )
    p.add_argument(
        "--chunks",
        metavar="ROWS,COLS",
        help="chunk shape of the target's layers (default: 128,128 inner chunks in shards for .loom.zarr, 64,64 for .loom); for an image, the tile shape",
    )
    validate_option(p)
    compute_options(p)


def _is_image(src: str, dst: str) -> bool:
    from dask_loom.ome import image_kind

    return image_kind(src) is not None or dst.rstrip("/").lower().endswith((".parquet", ".pq"))


def _is_anndata(dst: str) -> bool:
    name = dst.rstrip("/").lower()
    return name.endswith(".h5ad") or (name.endswith(".zarr") and not name.endswith(".loom.zarr"))


def cmd_convert(args: argparse.Namespace) -> int:
    chunks = tuple(int(c) for c in args.chunks.split(",")) if args.chunks else None
    if args.reshard:
        if args.dst is not None:
            raise SystemExit("dask-loom convert: --reshard rewrites SRC in place; give no DST")
        from dask_loom.zarr._reshard import reshard

        with announce(args) as target:
            done = reshard(args.src, chunks=chunks, scheduler=target, progress=progress(args))
        say(
            f"resharded {', '.join(done)} in {args.src}"
            if done
            else f"{args.src}: already sharded, nothing to do"
        )
        return 0
    if args.dst is None:
        raise SystemExit("dask-loom convert: give SRC and DST (or --reshard SRC)")
    if _is_anndata(str(args.dst)) and not _is_image(args.src, args.dst):
        from dask_loom.analysis import write_anndata

        if chunks is not None:
            raise ValueError(
                f"{args.dst}: --chunks applies to Loom and image targets; AnnData is written in row bands"
            )
        with announce(args) as target:
            t0 = time.perf_counter()
            write_anndata(
                args.src,
                args.dst,
                overwrite=args.overwrite,
                validate=args.validate,
                scheduler=target,
                progress=progress(args),
            )
        say(f"wrote {args.dst} (AnnData) in {time.perf_counter() - t0:.2f} s")
        return 0
    if _is_image(args.src, args.dst):
        from dask_loom.ome import convert_to_ome_arrow

        with announce(args) as target:
            t0 = time.perf_counter()
            convert_to_ome_arrow(args.src, args.dst, chunk_shape=chunks, scheduler=target)
        say(f"wrote {args.dst} in {time.perf_counter() - t0:.2f} s")
        return 0
    from dask_loom.loom._convert import convert

    with announce(args) as target:
        convert(
            args.src,
            args.dst,
            chunks=chunks,
            validate=args.validate,
            scheduler=target,
            progress=progress(args),
        )
    say(f"wrote {args.dst}")
    return 0
