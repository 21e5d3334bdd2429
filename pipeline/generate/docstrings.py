"""The built-in offline text corpus: docstrings of the installed Python environment.

Order: the standard library first, then site-packages; within each, top-level modules and then
their submodules sorted by dotted name; within a file, module/class/function docstrings in source
order. Only docstrings of >= 200 characters (after inspect.cleandoc) are kept, each once.
Source files are read with `ast`, never imported (imports are slow and have side effects).

Parsing all of site-packages takes about a minute, so the corpus is built lazily one top-level
module at a time and each is cached as a JSONL file under
$SAEFLOW_CACHE/docstrings/<environment key>/ (atomic writes): a run that needs a few MB of text
parses only the stdlib and the first few packages, and later runs read the cache.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from pipeline.files import write_text_atomically
from pipeline.generate.cache import cache_root, stable_hash

CORPUS_VERSION = 1  # bump when extraction rules change, so old caches are not reused
MIN_CHARS = 200
SKIP_DIRS = {"__pycache__", "test", "tests", "idle_test", "site-packages", "dist-packages"}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Docstring:
    part: str  # "stdlib" or "site-packages"
    module: str  # dotted module name the docstring comes from
    text: str


@dataclass(frozen=True)
class _Unit:
    """One top-level module or package: the unit of parsing and caching."""

    part: str
    name: str
    path: Path  # a .py file or a package directory


def python_roots() -> list[tuple[str, Path]]:
    """(part, directory): the stdlib, then each distinct site-packages directory."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]).resolve())]
    for key in ("purelib", "platlib"):
        path = Path(paths[key]).resolve()
        if path.is_dir() and all(path != seen for _, seen in roots):
            roots.append(("site-packages", path))
    return roots


@lru_cache(maxsize=1)
def environment_key() -> str:
    """Changes when Python or any installed distribution (name-version) changes.

    Distributions are read from the *.dist-info / *.egg-info entry names of the site-packages
    directories (name and version are in the name); importlib.metadata takes ~2 s for this.
    """
    roots = python_roots()
    distributions = sorted(
        entry.name
        for part, root in roots
        if part == "site-packages"
        for entry in root.iterdir()
        if entry.name.endswith((".dist-info", ".egg-info"))
    )
    return stable_hash(
        {
            "corpus": CORPUS_VERSION,
            "min_chars": MIN_CHARS,
            "python": sys.version,
            "roots": [[part, str(path)] for part, path in roots],
            "distributions": distributions,
        }
    )


def iter_docstrings() -> Iterator[Docstring]:
    """Every docstring of the corpus in its fixed order, built and cached lazily."""
    cache_dir = cache_root() / "docstrings" / environment_key()
    seen: set[bytes] = set()
    for unit in _units():
        for doc in _unit_docstrings(unit, cache_dir):
            digest = hashlib.sha1(doc.text.encode()).digest()
            if digest not in seen:  # vendored copies and overloads repeat docstrings
                seen.add(digest)
                yield doc


def _units() -> list[_Unit]:
    units = []
    for part, root in python_roots():
        entries = []
        for entry in root.iterdir():
            if entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
                entries.append(_Unit(part, entry.stem, entry))
            elif entry.is_dir() and entry.name.isidentifier() and entry.name not in SKIP_DIRS:
                entries.append(_Unit(part, entry.name, entry))
        units.extend(sorted(entries, key=lambda unit: unit.name))
    return units


def _unit_docstrings(unit: _Unit, cache_dir: Path) -> list[Docstring]:
    shard = cache_dir / f"{unit.part}-{unit.name}.jsonl"
    if shard.is_file():
        rows = [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines()]
        return [Docstring(unit.part, module, text) for module, text in rows]
    docs = [Docstring(unit.part, module, text) for module, text in _parse_unit(unit)]
    write_text_atomically(shard, "".join(json.dumps([doc.module, doc.text]) + "\n" for doc in docs))
    return docs


def _parse_unit(unit: _Unit) -> Iterator[tuple[str, str]]:
    for module, path in _module_files(unit):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, OSError):
            continue  # Python-2 files, templates, unreadable files: not part of the corpus
        nodes = [node for node in ast.walk(tree) if isinstance(node, DOC_NODES)]
        nodes.sort(key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))
        for node in nodes:
            text = ast.get_docstring(node, clean=True)  # inspect.cleandoc: dedent, strip
            if text and len(text) >= MIN_CHARS:
                yield module, text


def _module_files(unit: _Unit) -> list[tuple[str, Path]]:
    """(dotted module name, file) for every .py file of a unit, sorted by module name."""
    if unit.path.is_file():
        return [(unit.name, unit.path)]
    files = []
    for path in unit.path.rglob("*.py"):
        relative = path.relative_to(unit.path).parts
        if any(part in SKIP_DIRS or not part.isidentifier() for part in relative[:-1]):
            continue
        parts = [unit.name, *relative[:-1]]
        if path.stem != "__init__":
            parts.append(path.stem)
        files.append((".".join(parts), path))
    return sorted(files)
