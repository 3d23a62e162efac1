"""Imports run one way: streaming -> schemas -> batch_index; dev machinery (devtools, bench) above them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(package: str) -> dict[str, set[str]]:
    """module file -> the top-level packages it imports (at any depth of the module)."""
    out = {}
    for path in sorted((REPO / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        out[f"{package}/{path.name}"] = names
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
    for path in sorted((REPO / "batch_index").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert "pyspark" not in top or path.name == "spark_job.py", path.name
