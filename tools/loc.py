"""Count lines of code in a Python tree: physical lines minus blank lines, comment-only lines and
docstrings (a string expression that is the first statement of a module, class or function).

    python tools/loc.py [lib] [--per-file]

The lines-of-code budget of ``lib/`` is asserted in tests/test_repo.py.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers (1-based) covered by the docstrings of ``tree``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines holding at least one token that is not a comment, a docstring or white space."""
    skip = docstring_lines(ast.parse(source))
    seen: set[int] = set()
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in ignored:
            continue
        for line in range(tok.start[0], tok.end[0] + 1):
            if line not in skip:
                seen.add(line)
    return len(seen)


def count(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (code lines, physical lines)}`` of every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        out[str(path.relative_to(root))] = (code_lines(text), len(text.splitlines()))
    return out


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0] if args else "lib")
    counts = count(root)
    if "--per-file" in argv:
        for name, (code, physical) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
            print(f"{code:6d} {physical:6d}  {name}")
    code = sum(c for c, _ in counts.values())
    physical = sum(p for _, p in counts.values())
    print(f"{root}: {code} lines of code, {physical} physical lines, {len(counts)} files")


if __name__ == "__main__":
    main(sys.argv[1:])
