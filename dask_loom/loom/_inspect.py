"""A readable description of a Loom file, with the writer quirks found in it."""

from __future__ import annotations

from typing import Any

from dask_loom.loom._common import AXIS_ATTRS, LEGACY_GRAPHS, is_spec3

__all__ = ["describe", "quirks"]


def quirks(ds: Any) -> list[str]:
    """Deviations from what loompy 3 writes, each named with its path."""
    host = ds.__dask_loom_layer_host__()
    t = host.tree
    out = []
    v = ds.spec_version
    if v == "0.0.0":
        out.append("no LOOM_SPEC_VERSION (pre-spec writer)")
    root = t.attrs("/")
    spec_attr = root.get("LOOM_SPEC_VERSION")
    if spec_attr is not None and getattr(spec_attr, "shape", ()) not in ((), None):
        out.append("LOOM_SPEC_VERSION stored as a 1-element array (R writers)")
    for g in LEGACY_GRAPHS:
        if t.is_group(g):
            out.append(
                f"legacy graph group /{g} (read as {g.replace('edges', 'graphs')}, file left unchanged)"
            )
    for axis, group in enumerate(AXIS_ATTRS):
        for child in t.children(group):
            path = f"{group}/{child}"
            if t.is_group(path):
                out.append(
                    f"nested group /{path} (flattened where per-{('row', 'column')[axis]}, else skipped)"
                )
                continue
            info = t.info(path)
            if info.kind == "compound":
                out.append(f"compound attribute /{path} {info.dtype} (read as a structured array)")
            elif info.kind == "enum":
                out.append(f"HDF5 enum attribute /{path} (read as labels)")
            elif is_spec3(v) and info.dtype.kind == "S":
                out.append(f"fixed-length bytes /{path} in a spec-3 file (loompy's validator rejects this)")
    for group in ("row_graphs", "col_graphs", *LEGACY_GRAPHS):
        for g in t.children(group):
            if t.exists(f"{group}/{g}/a") and t.info(f"{group}/{g}/a").dtype.kind == "f":
                out.append(f"float graph indices /{group}/{g}/a (spec requires integers)")
    for name in ds.layers.keys():
        info = host.info(name)
        src = host.source(name)
        layout = getattr(src, "layout", None)
        if layout is not None and not layout.fast:
            out.append(f"layer {name!r}: {layout.why_slow} (read through h5py, without parallel decoding)")
        if info.chunks and tuple(info.chunks) != tuple(min(64, s) for s in info.shape):
            out.append(
                f"layer {name!r}: chunks {tuple(info.chunks)} (loompy writes {tuple(min(64, s) for s in info.shape)})"
            )
    return out


def describe(ds: Any, notes: list[str] | None = None) -> str:
    """The text ``dask-loom info`` prints."""
    lines = [
        f"{ds.filename}",
        f"  Loom spec {ds.spec_version}, shape {ds.shape[0]} rows x {ds.shape[1]} columns",
    ]
    lines.append("  layers:")
    host = ds.__dask_loom_layer_host__()
    for name in ds.layers.keys():
        info = host.info(name)
        comp = (
            f"{info.compression}" + (f" {info.compression_opts}" if info.compression_opts is not None else "")
            if info.compression
            else "uncompressed"
        )
        lines.append(f"    {name!r:<16} {info.dtype!s:<8} chunks {info.chunks} {comp}")
    for label, mgr in (("row attributes", ds.ra), ("column attributes", ds.ca)):
        lines.append(f"  {label} ({len(mgr)}):")
        for k in mgr.keys():
            info = host.tree.info(f"{AXIS_ATTRS[0 if mgr is ds.ra else 1]}/{k}")
            shape = "" if len(info.shape) == 1 else f" {info.shape}"
            lines.append(f"    {k:<24} {info.kind if info.kind != 'plain' else str(info.dtype)}{shape}")
    for label, gm in (("row graphs", ds.row_graphs), ("column graphs", ds.col_graphs)):
        lines.append(f"  {label}: " + (", ".join(gm.keys()) or "(none)"))
    lines.append("  global attributes: " + (", ".join(ds.attrs.keys()) or "(none)"))
    found = quirks(ds) + [n for n in (notes or []) if n not in quirks(ds)]
    lines.append("  writer quirks: " + ("none found" if not found else ""))
    lines.extend(f"    - {q}" for q in found)
    return "\n".join(lines)
