"""The reference stays readable: no function outside the command line is longer than 40 code
lines (docstrings, comments and blank lines not counted)."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "minadept"
LIMIT = 40


def _code_lines(source: str, node: ast.AST) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not its docstring."""
    lines = set(range(node.lineno, node.end_lineno + 1))
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines & code)


def long_functions(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = _code_lines(source, node)
            if n > LIMIT:
                out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} has {n} code lines")
    return out


def test_counting_is_right():
    src = 'def f(x):\n    """Doc\n    more doc."""\n    # a comment\n\n    y = x\n    return (y +\n            1)\n'
    assert _code_lines(src, ast.parse(src).body[0]) == 4          # def, y = x, and the two-line return


def test_no_function_outside_the_cli_is_over_40_code_lines():
    found = [msg for p in sorted(SRC.rglob("*.py")) if p.name != "cli.py" for msg in long_functions(p)]
    assert not found, "\n".join(found)
