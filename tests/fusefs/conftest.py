"""Fixtures for the FUSE tests: one repository with generated trees, a 2 GiB image and a 100,000-entry
directory; real mounts as ``python -m appliance.cli mount -f`` subprocesses that fail (never skip)
when FUSE is unusable; and a sweep of dead ihb mounts left by earlier runs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusefs.mount import mount_entry
from repo.backup import BackupOptions, backup_paths
from repo.repository import Repository
from repo.snapshot import Snapshot

from .treegen import ImageSpec, make_image_spec, make_tree, store_big_dir, store_image

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "fuse-test-pw"
GiB = 1024**3
BIG_DIR_ENTRIES = 100_000


def fuse_problem() -> str | None:
    """Why real mounts cannot work here (pyfuse3's fuse_test_marker diagnostics), or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module, or pass --device /dev/fuse to the container)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


@pytest.fixture(scope="session")
def fuse_ok() -> None:
    why = fuse_problem()
    if why:
        pytest.fail(f"FUSE mount tests cannot run: {why}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def sweep_dead_mounts() -> Iterator[None]:
    """Unmount ihb mounts whose process died (stat gives ENOTCONN) left by an aborted earlier run."""
    def sweep() -> None:
        try:
            with open("/proc/self/mountinfo") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split()
            if " - fuse.ihb " not in line:
                continue
            mp = parts[4].replace("\\040", " ")
            try:
                os.stat(mp)
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    subprocess.run(["fusermount3", "-uz", mp], capture_output=True)

    sweep()
    yield
    sweep()


@dataclass
class Env:
    home: Path
    repo: str

    def vars(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IHB_")}
        env.update({
            "IHB_TESTONLY_WEAK_KDF": "1",
            "IHB_CACHE_DIR": str(self.home / "cache"),
            "IHB_CONFIG_DIR": str(self.home / "etc"),
            "IHB_DATA_DIR": str(self.home / "data"),
            "IHB_REPO": self.repo,
            "IHB_PASSPHRASE": PASSPHRASE,
            "PYTHONPATH": str(ROOT),
        })
        return env

    def open(self) -> Repository:
        return Repository.open(self.repo, lambda: PASSPHRASE.encode(), cache_dir=str(self.home / "cache"))


def make_env(base: Path, pack_size: int = 1024 * 1024) -> Env:
    base.mkdir(parents=True, exist_ok=True)
    env = Env(base, str(base / "repo"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IHB_TESTONLY_WEAK_KDF", "1")
        Repository.init(env.repo, PASSPHRASE.encode(), pack_size=pack_size)
    return env


@dataclass
class Data:
    env: Env
    src: Path
    files_snap: Snapshot
    image_snap: Snapshot
    disk: ImageSpec
    small_disk: ImageSpec
    big_snap: Snapshot


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """The shared repository: a generated tree (host alpha), a 2 GiB sparse image (vm1) and a
    100,000-entry directory (host bighost)."""
    base = tmp_path_factory.mktemp("fuse")
    env = make_env(base / "home")
    src = base / "src"
    make_tree(src)
    disk = make_image_spec(2 * GiB, 48)
    small = make_image_spec(64 * 1024 * 1024 + 4096 * 3, 3, seed=5)
    with env.open() as repo:
        files_snap = backup_paths(repo, [str(src)], BackupOptions(host="alpha"))
        assert not files_snap.errors, files_snap.errors
        image_snap = store_image(repo, "vm1", {"disk0": disk, "efi/vars": small})
        big = store_big_dir(repo, BIG_DIR_ENTRIES)
    return Data(env, src, files_snap, image_snap, disk, small, big)


# --- mounts ---------------------------------------------------------------------------------------------
class Mount:
    """``ihb mount -f`` in a subprocess; stderr (the mount's log) goes to a file."""

    def __init__(self, env: Env, mountpoint: Path, *args: str) -> None:
        self.env = env
        self.mp = mountpoint
        self.mp.mkdir(parents=True, exist_ok=True)
        self.log_path = mountpoint.parent / f"{mountpoint.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "appliance.cli", "mount", "-f", *args, str(mountpoint)]
        self.proc = subprocess.Popen(cmd, env=env.vars(), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_for_mount()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def mounted(self) -> bool:
        e = mount_entry(str(self.mp))
        return e is not None and e[1] == "fuse.ihb"

    def wait_for_mount(self, timeout: float = 30.0) -> None:
        """Poll /proc/self/mountinfo; fail at once, with the mount's log, if the process ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ihb mount exited with {self.proc.returncode} before mounting:\n{self.log()}")
            if self.mounted():
                os.listdir(self.mp)  # serving, not just mounted
                return
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"{self.mp} was not mounted within {timeout} s:\n{self.log()}")

    def unmount(self, timeout: float = 30.0) -> None:
        """fusermount3 -u, which must succeed, and the process must then exit 0."""
        res = subprocess.run(["fusermount3", "-u", str(self.mp)], capture_output=True, text=True)
        if res.returncode != 0:
            self.kill()
            pytest.fail(f"fusermount3 -u {self.mp} failed: {res.stderr.strip()}\n{self.log()}")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack into the log
            time.sleep(1)
            log = self.log()
            self.kill()
            pytest.fail(f"ihb mount did not exit within {timeout} s of unmounting:\n{log}")
        self._log.close()
        assert rc == 0, f"ihb mount exited {rc}:\n{self.log()}"
        assert not self.mounted()

    def kill(self) -> None:
        """The fallback: lazy unmount, then kill the process."""
        subprocess.run(["fusermount3", "-uz", str(self.mp)], capture_output=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None or self.mounted():
            self.unmount()


@pytest.fixture(scope="session")
def mounted(data: Data, fuse_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """The whole repository mounted once; most checks run inside this one mount."""
    m = Mount(data.env, tmp_path_factory.mktemp("mnt") / "all", "--cache-size", "64")
    try:
        yield m
    finally:
        if m.proc.poll() is None:
            m.unmount()
        else:
            m.kill()
