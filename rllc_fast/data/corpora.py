"""Built-in offline corpora made from the Python standard library on this machine.

- ``stdlib_code``: the source of its ``.py`` files (about 31 MB of real code);
- ``stdlib_prose``: their docstrings and comments (about 5 MB of English prose).

Files are taken in sorted path order, so a corpus is the same on every machine with the same
Python version. ``max_bytes`` caps the total size (whole files/passages are kept until the cap).
"""
from __future__ import annotations

import ast
import io
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator, List, Optional


def stdlib_files() -> List[Path]:
    """The standard library's ``.py`` files (site-packages excluded), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    return files


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _capped(texts: Iterator[str], max_bytes: Optional[int]) -> List[str]:
    out, total = [], 0
    for text in texts:
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            if not out:  # always give at least part of one text
                out.append(text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))
            break
        out.append(text)
        total += size
    return out


def stdlib_code(max_bytes: Optional[int] = None) -> List[str]:
    """Source texts of the standard library, one string per file."""
    return _capped((t for t in map(_read, stdlib_files()) if t), max_bytes)


def prose_of(source: str) -> List[str]:
    """The docstrings and comments of one Python source text (passages in source order)."""
    passages = []
    try:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 3:
                    passages.append(doc)
    except (SyntaxError, ValueError, RecursionError):
        pass
    comments = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if len(text.split()) >= 3 and not text.startswith("!"):
                    comments.append(text)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    if comments:
        passages.append(" ".join(comments))
    return passages


def stdlib_prose(max_bytes: Optional[int] = None) -> List[str]:
    """Docstrings and comments of the standard library's source, one string per passage."""

    def passages():
        for path in stdlib_files():
            text = _read(path)
            if text:
                yield from prose_of(text)

    return _capped(passages(), max_bytes)


CORPORA = {"stdlib_code": stdlib_code, "stdlib_prose": stdlib_prose}
