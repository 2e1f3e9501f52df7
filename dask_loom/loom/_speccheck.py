"""loompy's spec checks over a container's tree (HDF5 or Zarr), used by the connection and ``LoomValidator``."""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_loom.loom._common import read_spec_version

__all__ = ["SpecValidator"]

MATRIX_TYPES = [
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
]
VERTEX_TYPES = MATRIX_TYPES[3:]
WEIGHT_TYPES = MATRIX_TYPES[:3]


def _dt(info: Any) -> str:
    return "string" if str(info.dtype).startswith("|S") else str(info.dtype)


class SpecValidator:
    """The spec checks of a Loom container's tree (``validate_tree``), below the connection.

    :class:`~dask_loom.loom.LoomValidator` adds what needs a connection
    (``validate(path)`` and the naming conventions); a connection validates
    with this class when it opens a file.

    Parameters
    ----------
    version
        Spec version to validate against, or ``None`` to read it from the file.
    """

    def __init__(self, version: str | None = None) -> None:
        self.version = version
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.summary: list[str] = []

    def _check(self, condition: bool, message: str) -> bool:
        if not condition:
            self.errors.append(message)
        return condition

    def _warn(self, condition: bool, message: str) -> bool:
        if not condition:
            self.warnings.append(message)
        return condition

    def validate_tree(self, tree: Any, name: str = "") -> bool:
        """Spec checks on an open container tree."""
        from dask_loom.errors import LoomFormatError

        if self.version is None:
            try:
                self.version = read_spec_version(tree)
            except LoomFormatError as exc:  # e.g. /attrs/LOOM_SPEC_VERSION is a group
                self.errors.append(str(exc))
                self.version = "0.0.0"
        ok = self.validate_spec(tree) and not self.errors
        if not ok:
            self.errors.append("For help, see http://linnarssonlab.org/loompy/format/")
        return ok

    def _is_dataset(self, t: Any, path: str, what: str) -> bool:
        """False (with an error naming *what* and *path*) when *path* is a group where the spec wants a dataset."""
        return self._check(not t.is_group(path), f"{what} (/{path}) is a group, not a dataset")

    def _is_group(self, t: Any, path: str, what: str) -> bool:
        """False (with an error) when *path* exists but is a dataset where the spec wants a group."""
        return self._check(
            not t.exists(path) or t.is_group(path), f"{what} (/{path}) is a dataset, not a group"
        )

    def validate_spec(self, t: Any) -> bool:
        """The format checks (loompy's ``validate_spec``) on a container tree.

        Unlike loompy's (which raises ``AttributeError``), a group where the
        spec wants a dataset, or the reverse, is reported as an error naming
        the path.
        """
        out = self.summary.append
        v3 = self.version == "3.0.0"
        for group in ("row_attrs", "col_attrs"):
            if self._check(t.exists(group), f"'{group}' group is missing"):
                self._is_group(t, group, f"'{group}'")
        for group in ("layers", "row_graphs", "col_graphs", "row_edges", "col_edges"):
            self._is_group(t, group, f"'{group}'")
        out("Global attributes:")
        if v3:
            if self._check(t.is_group("attrs"), "Global attributes missing"):
                for a in t.children("attrs"):
                    if self._is_dataset(t, f"attrs/{a}", f"Global attribute '{a}'"):
                        out(f"{a} (dataset)")
        else:
            self._is_group(t, "attrs", "'attrs'")
            for key, value in t.attrs("/").items():
                if isinstance(value, str):
                    self.warnings.append(
                        f"Global attribute '{key}' has dtype string, which will be deprecated in future Loom versions"
                    )
                elif isinstance(value, bytes):
                    self.warnings.append(
                        f"Global attribute '{key}' has dtype bytes, which will be deprecated in future Loom versions"
                    )
                out(f"{key}")
        shape: tuple[int, ...] = (0, 0)
        if self._check(t.exists("matrix"), "Main matrix missing") and self._is_dataset(
            t, "matrix", "Main matrix"
        ):
            info = t.info("matrix")
            self._check(str(info.dtype) in MATRIX_TYPES, f"Main matrix dtype={info.dtype} is not allowed")
            shape = info.shape
            out(f"Layers shape={shape}:")
            out(f"Main matrix {info.dtype}")
        for layer in t.children("layers"):
            if not self._is_dataset(t, f"layers/{layer}", f"Layer '{layer}'"):
                continue
            info = t.info(f"layers/{layer}")
            self._check(
                info.shape == shape,
                f"Layer '{layer}' shape {info.shape} does not match main matrix shape {shape}",
            )
            self._check(str(info.dtype) in MATRIX_TYPES, f"Layer '{layer}' dtype={info.dtype} is not allowed")
            out(f"{layer} {info.dtype}")
        expected = np.object_ if v3 else np.bytes_
        for axis, (group, label) in enumerate((("row_attrs", "Row"), ("col_attrs", "Column"))):
            out(f"{label} attributes:")
            if not t.exists(group):
                continue
            kind = "row" if axis == 0 else "column"
            for a in t.children(group):
                path = f"{group}/{a}"
                if t.is_group(path):
                    self.errors.append(f"{label} attribute '{a}' is a group, not a dataset")
                    continue
                info = t.info(path)
                first = info.shape[0] if info.shape else 0
                self._check(
                    first == shape[axis],
                    f"{label} attribute '{a}' shape {first} first dimension does not match {kind} dimension {shape}",
                )
                is_string = info.kind == "string" and (
                    (v3 and info.dtype.kind == "O") or (not v3 and info.dtype.kind == "S")
                )
                self._check(
                    str(info.dtype) in MATRIX_TYPES
                    or is_string
                    or (info.kind == "plain" and np.issubdtype(info.dtype, expected)),
                    f"{label} attribute '{a}' dtype {info.dtype} is not allowed",
                )
                out(f"{a} {_dt(info)} {info.shape if len(info.shape) > 1 else ''}")
        for group, label in (("row_graphs", "Row"), ("col_graphs", "Column")):
            out(f"{label} graphs:")
            for g in t.children(group):
                base = f"{group}/{g}"
                if not self._check(
                    t.is_group(base), f"{label} graph '{g}' (/{base}) is a dataset, not a group"
                ):
                    continue
                lens = []
                for vec, kinds, what in (
                    ("a", VERTEX_TYPES, "integer"),
                    ("b", VERTEX_TYPES, "integer"),
                    ("w", WEIGHT_TYPES, "float"),
                ):
                    desc = {"a": "start vertices", "b": "end vertices", "w": "vertex weights"}[vec]
                    if self._check(
                        t.exists(f"{base}/{vec}"),
                        f"{label} graph '{g}' is missing vector '{vec}', denoting {desc}",
                    ):
                        if not self._is_dataset(t, f"{base}/{vec}", f"{label} graph '{g}' vector '{vec}'"):
                            continue
                        info = t.info(f"{base}/{vec}")
                        self._check(
                            str(info.dtype) in kinds, f"/{group}/{g}/{vec}.dtype {info.dtype} must be {what}"
                        )
                        lens.append(info.shape[0] if info.shape else 0)
                self._check(
                    len(set(lens)) <= 1,
                    f"{label} graph '{g}' sparse vectors a, b and w must have equal length",
                )
                out(f"    '{g}' with {lens[0] if lens else 0} edges")
        return not self.errors
