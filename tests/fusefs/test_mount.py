"""Real mounts: `ihb mount` in a subprocess, read with ordinary tools and syscalls, compared with the
sources byte for byte and field by field."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fusefs.mount import MountError, _daemonize, mount_entry
from repo import format as fmt
from repo.backup import BackupOptions, backup_paths
from repo.tree import TreeReader, root_node

from .conftest import BIG_DIR_ENTRIES, ROOT, Data, Env, Mount, make_env
from .treegen import NON_UTF8, MiB, big_dir_name, compare, describe


def tree_path(m: Mount, data: Data, via: str = "host") -> Path:
    """Where the generated source tree shows up in the mount."""
    inner = str(data.src).lstrip("/")
    if via == "host":
        return m.mp / "by-host" / "alpha" / data.files_snap.time_label() / inner
    return m.mp / "by-id" / data.files_snap.id / inner


def test_tree_is_byte_and_metadata_identical(mounted: Mount, data: Data) -> None:
    for via in ("host", "id"):
        dst = tree_path(mounted, data, via)
        res = subprocess.run(["diff", "-r", "--no-dereference", str(data.src), str(dst)], capture_output=True)
        lines = [ln for ln in res.stdout.decode(errors="replace").splitlines()
                 if not (ln.startswith("File ") and ln.endswith("is a fifo"))]  # diff cannot compare fifos
        assert not lines and not res.stderr, res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
        assert compare(describe(data.src), describe(dst)) == []
    # Reading through the mount (with the kernel's cache) gives the same bytes again.
    theirs = os.path.join(os.fsencode(tree_path(mounted, data)), NON_UTF8)
    with open(theirs, "rb") as f, open(os.path.join(os.fsencode(data.src), NON_UTF8), "rb") as g:
        assert f.read() == g.read()


def test_layout_and_links(mounted: Mount, data: Data) -> None:
    mp = mounted.mp
    assert sorted(os.listdir(mp)) == ["by-host", "by-id", "vms"]
    assert {"alpha", "bighost"} <= set(os.listdir(mp / "by-host"))
    assert os.readlink(mp / "vms" / "vm1" / "latest") == data.image_snap.time_label()
    disks = mp / "vms" / "vm1" / "latest"
    assert sorted(n for n in os.listdir(disks) if n.endswith(".raw")) == ["disk0.raw", "efi_vars.raw"]
    assert os.stat(disks / "disk0.raw").st_size == data.disk.size
    assert (mp / "by-id" / data.big_snap.id[:12] / "big").is_dir()
    st = os.statvfs(mp)
    assert st.f_namemax == 255
    with pytest.raises(OSError) as e:
        open(tree_path(mounted, data) / "text.txt", "r+b")
    assert e.value.errno == errno.EROFS


def test_sparse_files_and_seek(mounted: Mount, data: Data) -> None:
    """pyfuse3 3.5 has no lseek handler, so the kernel answers SEEK_DATA/SEEK_HOLE itself and sees the
    whole file as data: holes are read as zeros without I/O but are not reported. This test pins that
    limitation down; the model (vfs extents) knows the holes."""
    p = tree_path(mounted, data) / "sparse.img"
    size = os.stat(p).st_size
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == size
    finally:
        os.close(fd)
    assert os.stat(p).st_blocks * 512 < size, "st_blocks still reports the data actually stored"


def test_image_random_concurrent_reads(mounted: Mount, data: Data) -> None:
    disk = mounted.mp / "vms" / "vm1" / data.image_snap.time_label() / "disk0.raw"
    spec = data.disk
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(disk, os.O_RDONLY)
        try:
            for i in range(150):
                if i % 3 == 0:  # around an island, where the data is
                    off, island = rng.choice(spec.islands)
                    off = max(0, off - rng.randrange(0, 70000))
                else:
                    off = rng.randrange(0, spec.size)
                n = rng.choice([512, 4096, 65536, 300_000, MiB, 3 * MiB])
                got = os.pread(fd, n, off)
                if got != spec.expected(off, n):
                    errors.append(f"thread {seed}: mismatch at {off}+{n}")
                    return
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # And the whole disk sequentially, 4 MiB at a time (zeros compared without building expectations).
    zero = bytes(4 * MiB)
    with open(disk, "rb", buffering=0) as f:
        off = 0
        while off < spec.size:
            block = f.read(4 * MiB)
            exp = spec.expected(off, len(block))
            assert block == exp if exp != zero[: len(exp)] else block == zero[: len(block)], f"at {off}"
            off += len(block)
    small = mounted.mp / "vms" / "vm1" / "latest" / "efi_vars.raw"
    assert small.read_bytes() == data.small_disk.expected(0, data.small_disk.size)


def test_huge_directory_lists_and_looks_up(mounted: Mount, data: Data) -> None:
    big = mounted.mp / "by-id" / data.big_snap.id / "big"
    t0 = time.monotonic()
    names = os.listdir(big)
    listed = time.monotonic() - t0
    assert len(names) == BIG_DIR_ENTRIES
    assert set(names) == {big_dir_name(i).decode() for i in range(BIG_DIR_ENTRIES)}
    rng = random.Random(9)
    for i in rng.sample(range(BIG_DIR_ENTRIES), 300):
        st = os.stat(big / big_dir_name(i).decode())
        assert st.st_mtime_ns == 1_650_000_000_000_000_000 + i
    assert not (big / "entry-1000000").exists()
    count = subprocess.run(f"find '{big}' | wc -l", shell=True, capture_output=True, text=True).stdout.strip()
    assert int(count) == BIG_DIR_ENTRIES + 1
    assert listed < 60


def test_new_backup_appears_while_mounted(mounted: Mount, data: Data, tmp_path: Path) -> None:
    host_dir = mounted.mp / "by-host" / "alpha"
    before = set(os.listdir(host_dir))
    src = tmp_path / "second"
    src.mkdir()
    (src / "new.txt").write_bytes(b"landed while mounted\n")
    with data.env.open() as repo:
        snap = backup_paths(repo, [str(src)], BackupOptions(host="alpha"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = set(os.listdir(host_dir))
        if snap.time_label() in now:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the new restore point did not appear: {sorted(before)} -> {sorted(now)}")
    assert os.readlink(host_dir / "latest") == snap.time_label()
    assert (host_dir / "latest" / str(src).lstrip("/") / "new.txt").read_bytes() == b"landed while mounted\n"
    assert (mounted.mp / "by-id" / snap.id).is_dir()


def _damage(env: Env, path: Path, index: int) -> tuple[bytes, list[list[object]]]:
    """Flip a byte in the middle of chunk ``index`` of the backed-up ``path``; returns its id and the
    file's content list."""
    with env.open() as repo:
        snap = repo.get_snapshot("latest")
        node = TreeReader(repo).resolve(root_node(snap.tree), str(path))
        content = node["c"]
        cid = content[index][0]
        loc = repo.index.get_chunk(cid)
    with open(os.path.join(env.repo, fmt.pack_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))
    return cid, content


def test_damaged_pack_gives_eio_for_that_range_only(fuse_ok: None, tmp_path: Path) -> None:
    env = make_env(tmp_path / "home", pack_size=128 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    blob = random.Random(5).randbytes(12 * MiB)
    (src / "victim").write_bytes(blob)
    (src / "other").write_bytes(b"unaffected\n" * 1000)
    with env.open() as repo:
        backup_paths(repo, [str(src)], BackupOptions(host="h"))
    cid, content = _damage(env, src / "victim", 1)
    starts = [0]
    for _, ln in content:
        starts.append(starts[-1] + int(ln))  # type: ignore[call-overload]
    m = Mount(env, tmp_path / "mnt")
    try:
        victim = m.mp / "by-host" / "h" / "latest" / str(src).lstrip("/") / "victim"
        fd = os.open(victim, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one request per read: exact ranges
            assert os.pread(fd, 65536, 0) == blob[:65536]
            for _ in range(3):
                with pytest.raises(OSError) as e:
                    os.pread(fd, 4096, starts[1] + 8192)
                assert e.value.errno == errno.EIO
            last = starts[-2]
            assert os.pread(fd, 65536, last) == blob[last : last + 65536]
        finally:
            os.close(fd)
        assert (victim.parent / "other").read_bytes() == b"unaffected\n" * 1000
        assert m.proc.poll() is None and "victim" in os.listdir(victim.parent)  # the mount stays up
        log = m.log()
        assert log.count(cid.hex()) == 1, f"the damaged chunk must be logged exactly once:\n{log}"
    finally:
        m.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(sig: int, data: Data, fuse_ok: None, tmp_path: Path) -> None:
    m = Mount(data.env, tmp_path / "mnt", "--snapshot", data.files_snap.id[:8])
    try:
        # --snapshot puts that restore point at the root.
        inner = m.mp / str(data.src).lstrip("/")
        assert (inner / "text.txt").read_bytes() == (data.src / "text.txt").read_bytes()
        busy = open(inner / "random-3m", "rb")  # noqa: SIM115 - an open file must not block the exit
        m.proc.send_signal(sig)
        rc = m.proc.wait(20)
        busy.close()
        assert rc == 0, m.log()
        assert not m.mounted(), "a dead mount point was left behind"
        assert os.listdir(m.mp) == []  # a plain, usable directory again
    finally:
        m.kill()


def test_background_mount_and_umount(data: Data, fuse_ok: None, tmp_path: Path) -> None:
    mp = tmp_path / "bg"
    mp.mkdir()
    env = data.env.vars()
    run = [sys.executable, "-m", "appliance.cli"]
    # Relative repository and mount point: the daemon changes directory to / and must not care.
    rel_env = {**env, "IHB_REPO": os.path.relpath(data.env.repo, tmp_path)}
    res = subprocess.run([*run, "mount", "--cache-size", "16M", "bg"], env=rel_env, cwd=tmp_path,
                         capture_output=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr.decode()
        entry = mount_entry(str(mp))
        assert entry is not None and entry[1] == "fuse.ihb"
        with open(f"/sys/class/bdi/{entry[0]}/read_ahead_kb") as f:
            assert int(f.read()) >= 4096, "the mount's read-ahead was not raised"
        again = subprocess.run([*run, "mount", str(mp)], env=env, cwd=ROOT, capture_output=True, timeout=60)
        assert again.returncode == 45 and b"already an ihb mount" in again.stderr
        assert (mp / "by-id" / data.files_snap.id).is_dir()
    finally:
        res = subprocess.run([*run, "umount", str(mp)], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    deadline = time.monotonic() + 10
    while mount_entry(str(mp)) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mount_entry(str(mp)) is None
    assert os.listdir(mp) == []
    # Errors reach the terminal with their exit codes.
    bad = subprocess.run([*run, "mount", "--snapshot", "ffffffff", str(mp)], env=env, cwd=ROOT, capture_output=True,
                         timeout=60)
    assert bad.returncode == 20 and b"no restore point" in bad.stderr
    missing = subprocess.run([*run, "mount", str(tmp_path / "nope")], env=env, cwd=ROOT, capture_output=True,
                             timeout=60)
    assert missing.returncode == 45 and b"create the directory first" in missing.stderr
    for size, says in (("lots", b"use a number"), ("4M", b"below the 8 MiB")):
        p = subprocess.run([*run, "mount", "--cache-size", size, str(mp)], env=env, cwd=ROOT, capture_output=True,
                           timeout=60)
        assert p.returncode == 2 and says in p.stderr and b"Traceback" not in p.stderr, p.stderr
        assert mount_entry(str(mp)) is None
    notmounted = subprocess.run([*run, "umount", str(mp)], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert notmounted.returncode == 45 and b"cannot unmount" in notmounted.stderr


def test_daemon_failure_reaches_the_parent() -> None:
    """The background path: a daemon that fails before it is ready makes the parent raise its reason,
    and one that dies without a word is reported too."""
    def fails(notify: object) -> None:
        raise MountError("the repository vanished")

    with pytest.raises(MountError, match="the repository vanished"):
        _daemonize(fails)
    with pytest.raises(MountError, match="ended before the filesystem was ready"):
        _daemonize(lambda notify: os._exit(7))


def test_teardown_fallback_when_busy(data: Data, fuse_ok: None, tmp_path: Path) -> None:
    """The fixture's error path: fusermount3 -u refuses a busy mount, the fallback (-z + kill) cleans up."""
    m = Mount(data.env, tmp_path / "busy", "--snapshot", data.big_snap.id)
    cwd = os.getcwd()
    os.chdir(m.mp / "big")
    try:
        res = subprocess.run(["fusermount3", "-u", str(m.mp)], capture_output=True, text=True)
        assert res.returncode != 0 and "busy" in res.stderr.lower()
        m.kill()
    finally:
        os.chdir(cwd)
    assert not m.mounted() and m.proc.poll() is not None
    assert os.listdir(m.mp) == []
