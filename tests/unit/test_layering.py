"""Imports run one way: streaming -> schemas -> batch_index; dev machinery (devtools, bench) above them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(package: str) -> dict[str, set[str]]:
    """module file -> the top-level packages it imports (at any depth of the module)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        out[path.relative_to(REPO).as_posix()] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("schemas", {"streaming", "devtools", "bench", "pyspark"}),
    ("batch_index", {"streaming", "schemas", "devtools", "bench"}),
    ("streaming", {"devtools", "bench", "tests"}),
])
def test_the_service_never_imports_what_sits_above_it(package: str, forbidden: set[str]) -> None:
    offenders = {m: sorted(names & forbidden) for m, names in _imports(package).items() if names & forbidden}
    assert not offenders, offenders


def test_only_the_spark_module_of_batch_index_imports_pyspark_at_module_level() -> None:
    for path in sorted((REPO / "batch_index").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert "pyspark" not in top or path.relative_to(REPO).as_posix() == "batch_index/build/spark_job.py", path


def _batch_index_imports() -> dict[str, set[str]]:
    """module file -> the ``batch_index`` sub-packages or top modules it imports (``batch_index.engine``, ...)."""
    out = {}
    for path in sorted((REPO / "batch_index").rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                       else [])
            names.update(".".join(m.split(".")[:2]) for m in modules if m.startswith("batch_index."))
        out[path.relative_to(REPO).as_posix()] = names
    return out


@pytest.mark.parametrize("package, allowed", [
    # the corpus and the engine sit at the bottom: the search, the build and the CLIs are made of them
    ("batch_index/corpus/", {"batch_index.errors", "batch_index.corpus"}),
    ("batch_index/engine/", {"batch_index.errors", "batch_index.engine", "batch_index.index_files"}),
    ("batch_index/index_files.py", {"batch_index.errors"}),
    ("batch_index/search.py", {"batch_index.errors", "batch_index.engine", "batch_index.corpus",
                               "batch_index.index_files"}),
])
def test_batch_index_sub_packages_import_downwards_only(package: str, allowed: set[str]) -> None:
    offenders = {m: sorted(names - allowed) for m, names in _batch_index_imports().items()
                 if m.startswith(package) and names - allowed}
    assert not offenders, offenders
