"""Fixtures of the service tier (catalog, retention, prune/GC, jobs, audit)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from repo.repository import Repository


@pytest.fixture
def repo_path(tmp_path: Path) -> str:
    loc = str(tmp_path / "repo")
    Repository.init(loc, b"pw", pack_size=256 * 1024)  # tiny packs so multi-pack and compaction paths run
    return loc


@pytest.fixture
def repo(repo_path: str) -> Iterator[Repository]:
    r = Repository.open(repo_path, lambda: b"pw")
    yield r
    r.close()


@pytest.fixture
def cli_env(repo_path: str) -> dict[str, str]:
    return {"IHB_REPO": repo_path, "IHB_PASSPHRASE": "pw"}
