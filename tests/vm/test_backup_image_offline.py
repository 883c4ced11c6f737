"""`ihb backup-image` of offline images: holes of a sparse raw file and unallocated or zero clusters of a
qcow2 are recorded as holes without being read; the restored disk is byte-identical."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.util import ihb
from tests.vm.conftest import ihb_json

MiB = 1 << 20


@pytest.fixture
def sparse_raw(tmp_path: Path) -> Path:
    """64 MiB: 1 MiB data at 0, 2 MiB at 10 MiB, 1 MiB of *allocated* zeros at 30 MiB, the rest holes."""
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(0)
        f.write(os.urandom(MiB))
        f.seek(10 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(30 * MiB)
        f.write(bytes(MiB))
    return p


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_raw_sparse_holes_not_read(sparse_raw: Path, tmp_path: Path, repo_env: dict[str, str]) -> None:
    assert _allocated(sparse_raw) <= 4 * MiB + 64 * 1024, "the scratch file system does not keep holes"
    _, out = ihb_json(repo_env, "backup-image", "--vm", "offline", "--disk", "d0", str(sparse_raw))
    st = out["disk_stats"]
    assert st["read_bytes"] == 4 * MiB  # data + the allocated zeros, never the 60 MiB of holes
    assert st["zero_bytes"] == 60 * MiB
    assert out["stats"]["new_bytes"] < 3 * MiB + 256 * 1024  # the allocated zeros are not stored either
    restored = tmp_path / "restored.raw"
    ihb("restore-disk", out["id"], "d0", str(restored), env=repo_env)
    assert restored.read_bytes() == sparse_raw.read_bytes()
    assert _allocated(restored) <= 3 * MiB + 512 * 1024  # restored sparse, zeros became holes


def test_qcow2_unallocated_and_zero_clusters_not_read(sparse_raw: Path, tmp_path: Path,
                                                      repo_env: dict[str, str]) -> None:
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(sparse_raw), str(qcow)], check=True)
    # a zero cluster (allocated in the L2 table, flagged zero): must not be read either
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 40M 1M", str(qcow)], check=True, capture_output=True)
    _, out = ihb_json(repo_env, "backup-image", "--vm", "offline", "--disk", "d0", str(qcow))
    st = out["disk_stats"]
    assert st["read_bytes"] == 3 * MiB, st  # qemu-img convert dropped the zeros; only real data is read
    assert st["zero_bytes"] == 61 * MiB
    restored = tmp_path / "restored.raw"
    ihb("restore-disk", out["id"], "d0", str(restored), env=repo_env)
    assert restored.read_bytes() == sparse_raw.read_bytes()
