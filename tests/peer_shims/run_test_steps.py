"""Run one test function of a peer's test module step by step; print the failing steps as JSON.

Usage: ``python run_test_steps.py TEST_FILE FUNCTION FIXTURE...``.  The
module is loaded with the shims beside this script first on ``sys.path``.
Each top-level statement of FUNCTION becomes a step: a step that raises is
recorded (its first source line and the error) and the next step runs, so
one deliberate difference does not hide the checks after it.  Fixture
functions named on the command line are called (undecorated) for the
function's arguments.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import traceback
import warnings


def step_name(stmt: ast.stmt) -> str:
    """A step's name: the statement on one line; a ``with`` block by its header and first statement."""
    if isinstance(stmt, ast.With):
        header = ", ".join(ast.unparse(item) for item in stmt.items)
        return f"with {header}: {ast.unparse(stmt.body[0]).splitlines()[0]}"
    return ast.unparse(stmt).splitlines()[0]


def _steps_of(tree: ast.Module, function: str) -> ast.Module:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.decorator_list and any(
            "fixture" in ast.unparse(d) for d in node.decorator_list
        ):
            node.decorator_list = []  # fixtures become plain functions
        if isinstance(node, ast.FunctionDef) and node.name == function:
            wrapped = []
            for i, stmt in enumerate(node.body):
                record = ast.parse(f"__record__({i}, {stmt.lineno}, {step_name(stmt)!r}, __exc__)").body[0]
                handler = ast.ExceptHandler(type=ast.Name("BaseException", ast.Load()), name="__exc__", body=[record])
                wrapped.append(ast.Try(body=[stmt], handlers=[handler], orelse=[], finalbody=[]))
            node.body = wrapped
    return ast.fix_missing_locations(tree)


def main() -> None:
    path, function, *fixtures = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    source = open(path, encoding="utf-8").read()
    tree = _steps_of(ast.parse(source, path), function)
    failures: list[dict[str, object]] = []

    def record(step: int, line: int, text: str, exc: BaseException) -> None:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        tb = traceback.extract_tb(exc.__traceback__)
        failures.append(
            {"step": step, "line": line, "source": text, "error": f"{type(exc).__name__}: {exc}".strip()[:300],
             "at": f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""}
        )  # fmt: skip

    namespace: dict[str, object] = {"__name__": "peer_test_module", "__file__": path, "__record__": record}
    warnings.simplefilter("ignore")
    exec(compile(tree, path, "exec"), namespace)
    steps = [step_name(t.body[0]) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function for t in n.body]
    namespace[function](*[namespace[f]() for f in fixtures])
    print(json.dumps({"steps": steps, "failures": failures}))


if __name__ == "__main__":
    main()
