"""Fixtures for the object-store tier: real S3 servers started here, never mocked.

SeaweedFS runs once per session (3-4 s to start); Ceph RGW once for the module that asks for it
(~8 s for a fresh cluster). A store that cannot be started FAILS the test with the reason and the
install command (tests/s3/install_stores.sh); nothing here skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3.stores import ACCESS_KEY, SECRET_KEY, CephRGW, SeaweedFS, StoreUnavailable


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        store.start()
    except StoreUnavailable as e:
        store.stop()
        pytest.fail(f"SeaweedFS could not be started: {e}", pytrace=False)
    yield store
    store.stop()


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephRGW]:
    store = CephRGW(tmp_path_factory.mktemp("ceph"))
    try:
        store.up()
    except StoreUnavailable as e:
        store.down()
        pytest.fail(f"Ceph RGW could not be started: {e}", pytrace=False)
    yield store
    store.down()


@pytest.fixture(autouse=True)
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials through the environment (never in the URL, which ends up in messages), short
    retry budgets and lock leases so failure paths finish quickly."""
    monkeypatch.setenv("IHB_S3_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("IHB_S3_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("IHB_S3_RETRY_SECONDS", "20")
    monkeypatch.setenv("IHB_S3_LOCK_LEASE", "20")
    monkeypatch.setenv("IHB_PASSPHRASE", "pw")


def new_location(endpoint: str, prefix: str = "repo") -> str:
    """A fresh bucket per call, so tests never see each other's objects."""
    host = endpoint.split("://", 1)[1]
    return f"s3://{host}/ihb-{uuid.uuid4().hex[:12]}/{prefix}?tls=0"


@pytest.fixture
def s3_location(seaweed: SeaweedFS) -> str:
    return new_location(seaweed.endpoint)


def write_tree(root: Path, seed: int, mib: int, files: int = 6) -> None:
    """Incompressible files plus a few small ones and an empty dir (exercises all node kinds cheaply)."""
    import random

    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    each = mib * 1024 * 1024 // files
    for i in range(files):
        (root / f"blob{i}.bin").write_bytes(rnd.randbytes(each))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "text.txt").write_text("hello\n" * 1000)
    (root / "empty").mkdir(exist_ok=True)
    os.symlink("sub/text.txt", root / "link")


# --- in-process helpers: the CLI costs ~1-3 s per call on a loaded machine, so tests use it for the
# steps whose user-facing behaviour they check and the library for the rest.
def api_backup(location: str, src: Path, host: str = "testhost", pw: bytes = b"pw") -> str:
    from repo.backup import BackupOptions, backup_paths
    from repo.repository import Repository

    with Repository.open(location, lambda: pw) as repo:
        return backup_paths(repo, [str(src)], BackupOptions(host=host)).id


def api_snapshot_ids(location: str, pw: bytes = b"pw") -> list[str]:
    from repo.repository import Repository

    with Repository.open(location, lambda: pw) as repo:
        return [s.id for s in repo.snapshots()]


def api_restore(location: str, sid: str, out: Path, pw: bytes = b"pw") -> Path:
    from repo.repository import Repository
    from repo.restore import restore_snapshot

    with Repository.open(location, lambda: pw) as repo:
        snap = repo.get_snapshot(sid)
        _stats, errors = restore_snapshot(repo, snap, str(out))
        assert not errors, errors
        return out / snap.paths[0].lstrip("/")


def api_check(location: str, read_data: bool = True, pw: bytes = b"pw") -> dict[str, object]:
    from repo.check import check_repository
    from repo.repository import Repository

    with Repository.open(location, lambda: pw) as repo:
        rep = check_repository(repo, read_data=read_data)
    assert rep.ok, rep.to_obj()
    return rep.to_obj()
