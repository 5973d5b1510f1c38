"""Shared fixtures: tiny random model directories, a run directory with stats, the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see editscale.cli


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Prepared model directories (safetensors + manifest) of the four tiny architectures."""
    from editscale.models.fetch import prepare_model

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            prepare_model(f"tiny:{arch}", root / arch)
            cache[arch] = root / arch
        return cache[arch]

    return get
