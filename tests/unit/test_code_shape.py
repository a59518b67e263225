"""Small pieces: no function over 60 lines and no class over 250 lines in src/,
except where the line that opens it carries a ``# long: <why>`` comment."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def too_long(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit, kind = MAX_FUNCTION_LINES, "def"
            elif isinstance(node, ast.ClassDef):
                limit, kind = MAX_CLASS_LINES, "class"
            else:
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            opening = lines[node.lineno - 1]
            if length > limit and "# long:" not in opening:
                where = path.relative_to(root.parent)
                found.append(f"{where}:{node.lineno} {kind} {node.name}: {length} lines")
    return found


def test_no_function_or_class_is_longer_than_the_limit_without_a_reason() -> None:
    assert too_long() == []


def test_the_check_sees_a_long_function_and_accepts_a_stated_reason(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():  # long: a table\n{body}\n")
    assert too_long(tmp_path) == [f"{tmp_path.name}/m.py:1 def f: 71 lines"]


MAX_MODULE_LINES = 600


def too_big(root: Path = SRC) -> list[str]:
    """Modules over MAX_MODULE_LINES: one concern each, so none grows past a screenful
    of screens (issue 21)."""
    return [
        f"{path.relative_to(root.parent)}: {count} lines"
        for path in sorted(root.rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]


def test_no_module_in_src_is_longer_than_600_lines() -> None:
    assert too_big() == []


def test_the_module_check_sees_a_long_module(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("x = 1\n" * 601)
    (tmp_path / "small.py").write_text("x = 1\n" * 600)
    assert too_big(tmp_path) == [f"{tmp_path.name}/big.py: 601 lines"]
