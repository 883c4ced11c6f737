"""Fixtures for the running-VM backup tests: the test guest (tests/guest), a repository, and helpers that
drive the guest, pause it and compare each restore point with what QEMU itself serves for the disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.hypervisor.qmp import GuestAgent, QMPClient
from repo.repository import Repository
from tests.guest.fixtures import guest_kernel, start_guest
from tests.guest.vm import GuestVM
from tests.util import ihb

__all__ = ["guest_kernel", "start_guest"]

PASSPHRASE = "vm-test-pw"


@pytest.fixture
def repo_env(tmp_path: Path) -> dict[str, str]:
    """A fresh repository; the env that points the `ihb` CLI at it."""
    loc = str(tmp_path / "repo")
    Repository.init(loc, PASSPHRASE.encode(), pack_size=1 << 20)
    return {"IHB_REPO": loc, "IHB_PASSPHRASE": PASSPHRASE}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """Short directory for UNIX sockets (pytest's tmp_path can exceed the 107-byte limit)."""
    d = Path(tempfile.mkdtemp(prefix="ihbvmt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def ihb_json(env: dict[str, str], *args: str, check: bool = True, timeout: float = 300) -> tuple[int, Any]:
    """Run `ihb ... --json`; (exit status, parsed stdout)."""
    p = ihb(*args, "--json", env=env, check=check, timeout=timeout)
    out = p.stdout.decode()
    try:
        return p.returncode, json.loads(out)
    except ValueError:
        raise AssertionError(f"ihb {' '.join(args)}: not JSON (rc {p.returncode}):\n{out}\n{p.stderr.decode()}") from None


def guest_sh(vm: GuestVM, script: str, timeout: float = 120) -> bytes:
    """Run a shell script in the guest through its agent, on a connection of our own that is closed
    afterwards: the agent's chardev serves one client at a time, and ihb needs it next."""
    with GuestAgent(vm.qga_path, timeout=timeout) as ga:
        ga.ping(timeout=60)
        return ga.exec_command(["/bin/sh", "-c", script], timeout=timeout).check().stdout


def ihb_bitmaps(qmp: QMPClient) -> dict[str, list[dict[str, Any]]]:
    """node -> ihb dirty bitmaps on it (name, count, recording, persistent)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for n in qmp.execute("query-named-block-nodes", flat=True):
        bms = [b for b in n.get("dirty-bitmaps") or [] if str(b.get("name", "")).startswith("ihb-")]
        if bms:
            out[n["node-name"]] = bms
    return out


def leftovers(qmp: QMPClient) -> list[str]:
    """QEMU objects a backup run creates; none may remain after a run that ended (even by failure)."""
    found = [f"export {e['id']}" for e in qmp.execute("query-block-exports")]
    found += [f"job {j['device']}" for j in qmp.execute("query-block-jobs")]
    found += [f"node {n['node-name']}" for n in qmp.execute("query-named-block-nodes", flat=True)
              if n["node-name"].startswith("ihb-")]
    return found


def compare_with_live(vm: GuestVM, env: dict[str, str], snapshot: str, disks: list[str], work: Path,
                      sock: Path) -> dict[str, str]:
    """Restore each disk of ``snapshot`` with `ihb restore-disk` and `qemu-img compare` it with the live
    disk as QEMU serves it (an NBD export of the disk node: the image file on the host may lag behind
    QEMU's qcow2 metadata cache). The VM must be paused. Returns disk -> qemu-img's verdict line."""
    assert vm.qmp.execute("query-status")["status"] != "running", "pause the VM before comparing"
    vm.qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    verdicts: dict[str, str] = {}
    try:
        for d in disks:
            target = work / f"restored-{snapshot[:8]}-{d}.raw"
            ihb("restore-disk", "--force", snapshot, d, str(target), env=env)
            vm.qmp.execute("block-export-add", type="nbd", id=f"cmp-{d}", name=d, writable=False,
                           **{"node-name": d})
            try:
                p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(target),
                                    f"nbd+unix:///{d}?socket={sock}"], capture_output=True, text=True, timeout=120)
            finally:
                vm.qmp.execute("block-export-del", id=f"cmp-{d}")
                vm.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=30, match=lambda e, d=d: e["data"]["id"] == f"cmp-{d}")
            verdicts[d] = (p.stdout + p.stderr).strip()
            assert p.returncode == 0, f"restore point {snapshot[:8]} disk {d} differs from the live disk: {verdicts[d]}"
            target.unlink()
    finally:
        vm.qmp.execute("nbd-server-stop")
    return verdicts
