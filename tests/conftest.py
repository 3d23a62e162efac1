"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WFDB_DIR_ENV = "ECG_WFDB_DIR"


@pytest.fixture(scope="session")
def wfdb_dir() -> Path:
    """Directory of the real WFDB sample records (100, a103l).

    ``$ECG_WFDB_DIR`` if set, else ``<repo root>/../shared/data/wfdb`` (CI clones the repo with
    ``shared/`` beside it). Tests that need it are skipped, with the reason, when it is missing.
    """
    path = Path(os.environ.get(WFDB_DIR_ENV) or REPO_ROOT.parent / "shared" / "data" / "wfdb")
    if not (path / "100.hea").is_file():
        pytest.skip(f"WFDB sample records not found in {path} (set {WFDB_DIR_ENV})")
    return path
