"""Image restore points come back every way: single files from ext4/FAT/NTFS inside them, a whole
disk bare-metal (also only the changed blocks), and over NBD with a copy-on-write overlay."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guestfs.conftest import Images, images  # noqa: F401  (session fixture: real images)
from tests.util import ihb


@pytest.fixture(scope="module")
def image_repo(tmp_path_factory: pytest.TempPathFactory, images: Images) -> dict[str, str]:  # noqa: F811
    base = tmp_path_factory.mktemp("imgrepo")
    env = {"IHB_REPO": str(base / "repo"), "IHB_PASSPHRASE": "pw", "IHB_TESTONLY_WEAK_KDF": "1",
           "IHB_CACHE_DIR": str(base / "cache")}
    ihb("init", "--image-chunk-size", "65536", env=env)
    for vm, img in (("gptvm", images.gpt), ("mbrvm", images.mbr)):
        out = json.loads(ihb("backup-image", "--vm", vm, "--disk", "vda", str(img), "--json", env=env).stdout)
        assert out["disk_stats"]["zero_bytes"] > 0  # unallocated space was not read
    return env


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize(("vm", "volume_hint"), [("gptvm", "ext4"), ("gptvm", "vfat"), ("mbrvm", "ntfs"),
                                                 ("mbrvm", "ext2")])
def test_restore_file_from_guest_filesystems(tmp_path: Path, image_repo: dict[str, str], images: Images,  # noqa: F811
                                             vm: str, volume_hint: str) -> None:
    # find the volume name the CLI understands, from the error listing when no volume is given
    p = ihb("restore-file", f"{vm}@latest", "vda:/hello.txt", str(tmp_path), env=image_repo, check=False)
    assert p.returncode == 2 and "say which volume" in p.stderr.decode()
    names = [n.strip().split(" ")[0] for n in p.stderr.decode().split("one of:")[1].split(",")]
    vol = next(n for n in names if n.endswith(volume_hint) or volume_hint in n)
    tree = images.fat_tree if "fat" in volume_hint else images.tree
    for guest_path in ("/hello.txt", "/big.bin", "/dir/ñandú €.txt"):
        dest = tmp_path / (vol + guest_path.replace("/", "_"))
        ihb("restore-file", f"{vm}@latest", f"vda:{vol}{guest_path}", str(dest), env=image_repo)
        assert _sha(dest) == tree.sha256(guest_path), f"{vol}{guest_path} differs"
    ihb("restore-file", f"{vm}@latest", f"vda:{vol}/dir", str(tmp_path / "dir"), env=image_repo)
    assert (tmp_path / "dir" / "sub" / "deep.txt").read_bytes() == b"deep file\n" * 100
    assert len(list((tmp_path / "dir" / "many").iterdir())) == 40


def test_unreadable_volume_says_why(tmp_path: Path, image_repo: dict[str, str]) -> None:
    p = ihb("restore-file", "gptvm@latest", "vda:/x", str(tmp_path), env=image_repo, check=False)
    err = p.stderr.decode()
    assert "LUKS" in err and "Traceback" not in err


def test_restore_disk_bare_metal_and_changed_only(tmp_path: Path, image_repo: dict[str, str], images: Images) -> None:  # noqa: F811
    out = tmp_path / "disk.raw"
    ihb("restore-disk", "gptvm@latest", "vda", str(out), env=image_repo)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), str(images.gpt)], check=True)
    assert os.stat(out).st_blocks * 512 < os.stat(out).st_size  # holes stayed holes
    with open(out, "r+b") as f:  # damage a few blocks; --changed-only rewrites just those
        for off in (5 << 20, 20 << 20, 33 << 20):
            f.seek(off)
            f.write(os.urandom(3000))
    res = json.loads(ihb("restore-disk", "gptvm@latest", "vda", str(out), "--changed-only", "--json",
                         env=image_repo).stdout)
    assert 0 < res["written"] <= 4 * 65536 and res["skipped_same"] > 100
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), str(images.gpt)], check=True)


def test_nbd_export_with_overlay(tmp_path: Path, image_repo: dict[str, str], images: Images) -> None:  # noqa: F811
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "nbd-export", "mbrvm@latest", "--socket",
                             str(sock), "--overlay-dir", str(tmp_path / "ov")], env={**os.environ, **image_repo},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        url = f"nbd+unix:///vda?socket={sock}"
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(images.mbr)], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1000000 20000", url], check=True,
                       capture_output=True)
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 1000000 20000", url], capture_output=True,
                           text=True, check=True)
        assert "Pattern verification failed" not in r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.wait(20)
    # the restore point itself is unchanged
    out = tmp_path / "after.raw"
    ihb("restore-disk", "mbrvm@latest", "vda", str(out), env=image_repo)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), str(images.mbr)], check=True)


def test_mount_shows_files_inside_images(tmp_path: Path, image_repo: dict[str, str], images: Images) -> None:  # noqa: F811
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ihb("mount", str(mnt), env=image_repo)
    try:
        assert os.path.ismount(mnt)
        base = mnt / "vms" / "gptvm" / "latest" / "vda.files"
        vols = sorted(os.listdir(base))
        ext4 = next(v for v in vols if v.endswith("ext4"))
        fat = next(v for v in vols if "fat" in v)
        luks = next(v for v in vols if "luks" in v)
        assert _sha(base / ext4 / "big.bin") == images.tree.sha256("/big.bin")
        assert _sha(base / fat / "dir" / "ñandú €.txt") == images.fat_tree.sha256("/dir/ñandú €.txt")
        assert os.readlink(base / ext4 / "link") == "hello.txt"
        assert os.getxattr(base / ext4 / "hello.txt", "user.comment") == b"guest xattr"
        assert os.stat(base / ext4 / "hello.txt").st_mtime == 1614834368
        assert "LUKS" in (base / luks / "NOT-READABLE.txt").read_text()
        subprocess.run(["cp", "-a", str(base / ext4 / "dir"), str(tmp_path / "copied")], check=True)
        assert (tmp_path / "copied" / "sub" / "deep.txt").read_bytes() == b"deep file\n" * 100
        ntfs = mnt / "vms" / "mbrvm" / "latest" / "vda.files"
        nvol = next(v for v in os.listdir(ntfs) if v.endswith("ntfs"))
        assert _sha(ntfs / nvol / "big.bin") == images.tree.sha256("/big.bin")
    finally:
        ihb("umount", str(mnt), env=image_repo, check=False)


def test_catalog_covers_files_inside_images(tmp_path: Path, image_repo: dict[str, str]) -> None:
    src = tmp_path / "srv"
    src.mkdir()
    (src / "hello.txt").write_text("on a physical server")
    ihb("backup", "--host", "web1", str(src), env=image_repo)
    rows = json.loads(ihb("find", "hello.txt", "--json", env=image_repo).stdout)["matches"]
    hosts = {r.get("host") for r in rows}
    assert {"gptvm", "mbrvm", "web1"} <= hosts, rows
    assert ihb("check", env=image_repo).returncode == 0
