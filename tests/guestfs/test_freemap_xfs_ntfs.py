"""XFS and NTFS free-space maps: deleted files are found free, live files never are.

The images are made by the reference implementations (mkfs.xfs + the kernel's XFS, mkntfs +
ntfs-3g): files written, some deleted, unmounted. Then, independently of the reader under test:

* XFS: every live file's extents as the kernel reports them (FIEMAP through ``xfs_io``) lie
  outside the map, the deleted files' extents inside it; the map equals ``xfs_db freesp`` minus
  the AGFL blocks (reserved for btree growth, never free);
* NTFS: ``ntfscluster -c`` (libntfs scanning every MFT record) finds no owner in any free
  range, and the clusters that held the deleted files (found by their content) are free;
* both: poisoning every "free" byte of a copy leaves ``xfs_repair -n`` / ``ntfsfix -n`` clean
  and every file's sha256 unchanged when the copy is mounted.

Then the log: a copy of a busy XFS (recovery would change AGFs) is all used, a frozen one (its log
holds only superblock updates) is evaluated and survives poisoning plus kernel log recovery. Damaged
AGF/bnobt/AGFL blocks make their AG used; a dirty or in-use NTFS volume is all used.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo.guestfs import FileByteSource, FreeMap, find_free_extents
from tests.guestfs import images as im

MiB = im.MiB


@dataclass
class Built:
    img: Path
    sums: dict[str, str]  # live file -> sha256
    live: dict[str, list[tuple[int, int]]]  # live file -> byte extents on the image (XFS only)
    deleted: list[tuple[int, int]]  # byte ranges that held the deleted files
    deleted_bytes: int


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("XFS/NTFS free-map tests need root (loop mounts, FUSE)")


def _write_files(mnt: Path, rnd: random.Random) -> dict[str, bytes]:
    """Interleaved appends, so files end up fragmented and deleted space is scattered."""
    names = [f"d{i % 3}/file-{i:02d}.bin" for i in range(18)]
    for d in ("d0", "d1", "d2"):
        (mnt / d).mkdir(exist_ok=True)
    data = {n: b"" for n in names}
    for _round in range(4):
        for n in names:
            piece = rnd.randbytes(rnd.randrange(100_000, 900_000))
            with open(mnt / n, "ab") as f:
                f.write(piece)
            data[n] += piece
    (mnt / "small.txt").write_bytes(b"tiny file\n")
    data["small.txt"] = b"tiny file\n"
    os.sync()
    return data


def _fiemap(path: Path) -> list[tuple[int, int]]:
    out = im.run("xfs_io", "-r", "-c", "fiemap", path)
    ext = []
    for m in re.finditer(r"\[\d+\.\.\d+\]:\s+(\d+)\.\.(\d+)", out):
        a, b = int(m.group(1)), int(m.group(2))
        ext.append((a * 512, (b - a + 1) * 512))
    return ext


def _sums(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def xfs_v5(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build_xfs(tmp_path_factory.mktemp("xfs5"), "1")


@pytest.fixture(scope="module")
def xfs_v4(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """v4 (no CRCs): this kernel cannot mount it, so mkfs.xfs fills it from a protofile."""
    im.require("mkfs.xfs", "xfs_db", "xfs_repair")
    work = tmp_path_factory.mktemp("xfs4")
    rnd = random.Random(12)
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    for i in range(12):
        src = work / f"src-{i}.bin"
        src.write_bytes(rnd.randbytes(rnd.randrange(200_000, 3_000_000)))
        lines.append(f"file-{i:02d}.bin ---644 0 0 {src}")
    lines += ["$", ""]
    proto = work / "proto"
    proto.write_text("\n".join(lines))
    img = im.fs_image(work / "xfs.img", 300 * MiB)
    im.run("mkfs.xfs", "-q", "-f", "-m", "crc=0", "-p", proto, img)
    return Built(img, {}, {}, [], 0)


def _build_xfs(work: Path, crc: str) -> Built:
    _require_root()
    im.require("mkfs.xfs", "xfs_io", "xfs_db", "xfs_repair", "mount")
    img = im.fs_image(work / "xfs.img", 300 * MiB)
    im.run("mkfs.xfs", "-q", "-f", "-m", f"crc={crc}", img)
    mnt = work / "mnt"
    mnt.mkdir()
    im.run("mount", "-o", "loop", img, mnt)
    try:
        data = _write_files(mnt, random.Random(11))
        doomed = [n for n in data if n.endswith(("3.bin", "7.bin", "8.bin"))]
        deleted = [e for n in doomed for e in _fiemap(mnt / n)]
        for n in doomed:
            (mnt / n).unlink()
    finally:
        im.run("umount", mnt)
    # extents as they are once unmounted (speculative preallocation past EOF is freed at close)
    im.run("mount", "-o", "loop,ro", img, mnt)
    try:
        live = {n: _fiemap(mnt / n) for n in data if n not in doomed}
        sums = _sums(mnt)
    finally:
        im.run("umount", mnt)
    assert deleted and all(live[n] for n in live if n != "small.txt")
    return Built(img, sums, live, deleted, sum(len(data[n]) for n in doomed))


def _overlaps(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(o, n) for o, n in a if any(o < p + m and p < o + n for p, m in b)]


def _covered(ranges: list[tuple[int, int]], extents: list[tuple[int, int]]) -> bool:
    return all(any(p <= o and o + n <= p + m for p, m in extents) for o, n in ranges)


def test_xfs_free_map_spares_live_files(xfs_v5: Built, tmp_path: Path) -> None:
    built = xfs_v5
    fm = _check_against_xfs_db(built.img, tmp_path)
    for name, ext in built.live.items():
        assert not _overlaps(ext, fm.extents), f"{name}: extents reported free: {_overlaps(ext, fm.extents)}"
    assert _covered(built.deleted, fm.extents), "space of the deleted files must be reported free"
    assert fm.free_bytes > built.deleted_bytes
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    im.run("mount", "-o", "loop,ro", tmp_path / "poisoned.img", mnt)
    try:
        assert _sums(mnt) == built.sums
    finally:
        im.run("umount", mnt)
    print(
        f"\nxfs v5: {fm.free_bytes / MiB:.1f} MiB of 300 MiB free (deleted files: {built.deleted_bytes / MiB:.1f} MiB)"
    )


def test_xfs_v4_free_map_matches_xfs_db(xfs_v4: Built, tmp_path: Path) -> None:
    fm = _check_against_xfs_db(xfs_v4.img, tmp_path)
    print(f"\nxfs v4: {fm.free_bytes / MiB:.1f} MiB of 300 MiB free")


def _xfs_db_value(img: Path, *cmds: str) -> int:
    args = [a for c in cmds for a in ("-c", c)]
    return int(im.run("xfs_db", "-r", *args, img).split("=")[1])


def _check_against_xfs_db(img: Path, tmp_path: Path) -> FreeMap:
    """The map is xfs_db's free-space listing minus exactly the AGFL blocks; poisoning it is harmless."""
    fm = find_free_extents(FileByteSource(img))
    (info,) = fm.volumes
    assert info.fs == "xfs" and info.note == "", info
    bs = _xfs_db_value(img, "sb 0", "p blocksize")
    agblocks = _xfs_db_value(img, "sb 0", "p agblocks")
    agcount = _xfs_db_value(img, "sb 0", "p agcount")
    ref: set[int] = set()
    out = im.run("xfs_db", "-r", "-c", "freesp -d", img)
    for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M):
        agno, agbno, length = map(int, m.groups())
        ref.update(range(agno * agblocks + agbno, agno * agblocks + agbno + length))
    ours = {b for off, n in fm.extents for b in range(off // bs, (off + n) // bs)}
    flcount = sum(_xfs_db_value(img, f"agf {ag}", "p flcount") for ag in range(agcount))
    assert ours <= ref and len(ref - ours) == flcount
    poisoned = im.poisoned_copy(img, fm.extents, tmp_path / "poisoned.img")
    repair = subprocess.run(["xfs_repair", "-n", poisoned], capture_output=True, text=True, check=False)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    return fm


@pytest.mark.parametrize(
    ("mkfs_opts", "mount_opts"),
    [([], "loop"), (["-l", "su=65536", "-s", "size=4096"], "loop,logbsize=256k")],
    ids=["default", "log-stripe-256k-iclogs"],
)
def test_xfs_copied_while_in_use_is_all_used_but_frozen_is_evaluated(
    mkfs_opts: list[str], mount_opts: str, tmp_path: Path
) -> None:
    """A copy of a busy XFS needs log recovery that changes AGFs: all used. A frozen XFS has
    written everything in place and its log holds only superblock updates: evaluated, and the
    kernel's log recovery on the poisoned copy still finds every file intact."""
    _require_root()
    im.require("mkfs.xfs", "xfs_logprint", "xfs_repair", "fsfreeze", "mount")
    img = im.fs_image(tmp_path / "live.img", 300 * MiB)
    im.run("mkfs.xfs", "-q", "-f", *mkfs_opts, img)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    im.run("mount", "-o", mount_opts, img, mnt)
    try:
        _write_files(mnt, random.Random(3))
        shutil.copyfile(img, tmp_path / "crash.img")
        (mnt / "d0" / "file-00.bin").unlink()
        (mnt / "late.bin").write_bytes(random.Random(4).randbytes(2 * MiB))
        frozen_sums = _sums(mnt)  # before the freeze: reading a frozen fs would wait on atime updates
        im.run("fsfreeze", "-f", mnt)
        try:
            shutil.copyfile(img, tmp_path / "frozen.img")
        finally:
            im.run("fsfreeze", "-u", mnt)
    finally:
        im.run("umount", mnt)
    crash = tmp_path / "crash.img"
    assert "<DIRTY>" in im.run("xfs_logprint", "-t", crash)
    fm = find_free_extents(FileByteSource(crash))
    assert fm.extents == [] and "not yet written in place" in fm.volumes[0].note, fm.volumes

    frozen = tmp_path / "frozen.img"
    assert "<DIRTY>" in im.run("xfs_logprint", "-t", frozen)  # recovery would replay the covering records
    fm = find_free_extents(FileByteSource(frozen))
    assert fm.volumes[0].note == "" and fm.free_bytes > 100 * MiB, fm.volumes
    unmounted = find_free_extents(FileByteSource(img))
    assert _covered(fm.extents, unmounted.extents)
    poisoned = im.poisoned_copy(frozen, fm.extents, tmp_path / "poisoned.img")
    im.run("mount", "-o", "loop", poisoned, mnt)  # replays the log
    try:
        assert _sums(mnt) == frozen_sums
    finally:
        im.run("umount", mnt)
    repair = subprocess.run(["xfs_repair", "-n", poisoned], capture_output=True, text=True, check=False)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    print(f"\nfrozen xfs: {fm.free_bytes / MiB:.1f} MiB of 300 MiB free")


def _xfs_geometry(img: Path) -> tuple[int, int]:
    return _xfs_db_value(img, "sb 0", "p blocksize"), _xfs_db_value(img, "sb 0", "p agblocks")


def _ag_free(extents: list[tuple[int, int]], agno: int, ag_bytes: int) -> int:
    lo, hi = agno * ag_bytes, (agno + 1) * ag_bytes
    return sum(max(0, min(o + n, hi) - max(o, lo)) for o, n in extents)


@pytest.mark.parametrize("version", ["v5", "v4"])
@pytest.mark.parametrize("target", ["agf-freeblks", "bnobt-record", "agfl-entry"])
def test_damaged_xfs_ag_is_all_used(
    version: str, target: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    built: Built = request.getfixturevalue(f"xfs_{version}")
    img = tmp_path / "damaged.img"
    shutil.copyfile(built.img, img)
    bs, agblocks = _xfs_geometry(img)
    ag_bytes = bs * agblocks
    before = find_free_extents(FileByteSource(img))
    agno = 2
    assert _ag_free(before.extents, agno, ag_bytes) > 0
    ag = agno * ag_bytes
    with open(img, "r+b") as f:
        if target == "agf-freeblks":
            pos = ag + 512 + 52  # agf_freeblks: one block fewer, as if a block were allocated
        elif target == "bnobt-record":
            f.seek(ag + 512 + 16)
            (root,) = struct.unpack(">I", f.read(4))
            hdr = 56 if version == "v5" else 16
            pos = ag + root * bs + hdr + 4  # blockcount of the first free extent
        else:
            f.seek(ag + 512 + 40)
            flfirst, _fllast, flcount = struct.unpack(">III", f.read(12))
            assert flcount
            pos = ag + 3 * 512 + (36 if version == "v5" else 0) + 4 * flfirst  # AGFL block number
        f.seek(pos)
        (value,) = struct.unpack(">I", f.read(4))
        if target == "agfl-entry":  # the free list claims a block that the free-space btree lists as free
            first_free = min(o for o, _n in before.extents if ag <= o < ag + ag_bytes)
            value = (first_free - ag) // bs + 1
        else:
            value -= 1
        f.seek(pos)
        f.write(struct.pack(">I", value))
    after = find_free_extents(FileByteSource(img))
    assert _ag_free(after.extents, agno, ag_bytes) == 0, f"{target}: damaged AG {agno} must be all used"
    for other in (0, 1, 3):
        assert _ag_free(after.extents, other, ag_bytes) == _ag_free(before.extents, other, ag_bytes)


# === NTFS =========================================================================================

CLUSTER = 4096


@dataclass
class BuiltNtfs:
    img: Path
    sums: dict[str, str]
    live: dict[str, bytes]
    deleted: dict[str, bytes]


@pytest.fixture(scope="module")
def ntfs(tmp_path_factory: pytest.TempPathFactory) -> BuiltNtfs:
    _require_root()
    im.require("mkntfs", "ntfs-3g", "ntfscluster", "ntfsfix")
    work = tmp_path_factory.mktemp("ntfs")
    img = im.fs_image(work / "ntfs.img", 96 * MiB)
    im.run("mkntfs", "-q", "-F", "-Q", "-c", str(CLUSTER), "-L", "FREEMAP", img)
    with im.fuse_mounted(["ntfs-3g", os.fspath(img)], work / "mnt") as mnt:
        data = _write_files(mnt, random.Random(21))
        doomed = [n for n in data if n.endswith(("2.bin", "5.bin", "9.bin"))]
        for n in doomed:
            (mnt / n).unlink()
        os.sync()
        sums = _sums(mnt)
    live = {n: d for n, d in data.items() if n not in doomed}
    return BuiltNtfs(img, sums, live, {n: data[n] for n in doomed})


def _clusters_by_content(img: Path) -> dict[bytes, list[int]]:
    raw = img.read_bytes()
    where: dict[bytes, list[int]] = {}
    for i in range(len(raw) // CLUSTER):
        where.setdefault(hashlib.sha256(raw[i * CLUSTER : (i + 1) * CLUSTER]).digest(), []).append(i)
    return where


def _file_clusters(data: bytes, where: dict[bytes, list[int]]) -> list[int]:
    """Where each whole cluster of ``data`` lies on the image, found by content (random data is unique)."""
    out = []
    for k in range(len(data) // CLUSTER):
        hits = where.get(hashlib.sha256(data[k * CLUSTER : (k + 1) * CLUSTER]).digest(), [])
        assert len(hits) == 1, f"cluster {k} found {len(hits)} times"
        out.extend(hits)
    return out


def test_ntfs_free_map_spares_live_files(ntfs: BuiltNtfs, tmp_path: Path) -> None:
    fm = find_free_extents(FileByteSource(ntfs.img))
    (info,) = fm.volumes
    assert info.fs == "ntfs" and info.note == "", info
    free_clusters = {c for off, n in fm.extents for c in range(off // CLUSTER, (off + n) // CLUSTER)}
    assert all(off % CLUSTER == 0 and n % CLUSTER == 0 for off, n in fm.extents)

    where = _clusters_by_content(ntfs.img)
    for name, data in ntfs.live.items():
        hit = set(_file_clusters(data, where)) & free_clusters
        assert not hit, f"{name}: clusters {sorted(hit)[:10]} reported free"
    deleted = [c for data in ntfs.deleted.values() for c in _file_clusters(data, where)]
    assert deleted and set(deleted) <= free_clusters, "clusters of the deleted files must be reported free"

    # libntfs, scanning every MFT record, finds no owner for any free cluster
    for off, n in fm.extents:
        out = im.run("ntfscluster", "-c", f"{off // CLUSTER}-{(off + n) // CLUSTER - 1}", ntfs.img)
        assert "no inode found" in out, out

    poisoned = im.poisoned_copy(ntfs.img, fm.extents, tmp_path / "poisoned.img")
    im.run("ntfsfix", "-n", poisoned)
    with im.fuse_mounted(["ntfs-3g", "-o", "ro", os.fspath(poisoned)], tmp_path / "mnt") as mnt:
        assert _sums(mnt) == ntfs.sums
    total = ntfs.img.stat().st_size
    print(
        f"\nntfs: {fm.free_bytes / MiB:.1f} MiB of {total / MiB:.0f} MiB free "
        f"(deleted files: {sum(map(len, ntfs.deleted.values())) / MiB:.1f} MiB)"
    )


def _ntfs_runs(img: Path, segment: int) -> list[tuple[int, int]]:
    from dissect.ntfs import NTFS

    with open(img, "rb") as f:
        rec = NTFS(f).mft.get(segment)
        return [(lcn, n) for lcn, n in rec._get_stream_attributes("").dataruns()]


def _volume_flags_offset(img: Path) -> int:
    """Byte offset of the $VOLUME_INFORMATION flags in MFT record 3 (the $MFT starts contiguous)."""
    from dissect.ntfs import NTFS

    with open(img, "rb") as f:
        fs = NTFS(f)
        (mft_lcn, _n), *_ = _ntfs_runs(img, 0)
        rec_off = mft_lcn * fs.cluster_size + 3 * 1024
        f.seek(rec_off)
        rec = f.read(1024)
    pos = int.from_bytes(rec[0x14:0x16], "little")
    while True:
        atype, length = struct.unpack_from("<II", rec, pos)
        assert atype != 0xFFFFFFFF, "no $VOLUME_INFORMATION"
        if atype == 0x70:
            value = int.from_bytes(rec[pos + 0x14 : pos + 0x16], "little")
            return rec_off + pos + value + 10
        pos += length


def _restart_page(in_use: int, flags: int) -> bytes:
    """A 4 KiB $LogFile restart page (LFS 1.1) with a valid update sequence array."""
    page = bytearray(4096)
    page[0:4] = b"RSTR"
    struct.pack_into("<HHqIIHhh", page, 4, 30, 9, 0, 4096, 4096, 48, 1, 1)
    struct.pack_into("<qHHHH", page, 48, 0x1000, 1, 0xFFFF, in_use, flags)
    usn = b"\x01\x00"
    page[30:32] = usn
    for i in range(1, 9):
        page[30 + 2 * i : 32 + 2 * i] = page[i * 512 - 2 : i * 512]
        page[i * 512 - 2 : i * 512] = usn
    return bytes(page)


@pytest.mark.parametrize(
    ("damage", "used"),
    [
        ("volume-dirty", True),
        ("logfile-in-use", True),
        ("logfile-records-only", True),
        ("logfile-torn-restart", True),
        ("logfile-clean-restart", False),
        ("mft-marked-free", True),
        ("file-cluster-marked-free", True),
    ],
)
def test_ntfs_unclean_or_inconsistent_volume_is_all_used(
    ntfs: BuiltNtfs, damage: str, used: bool, tmp_path: Path
) -> None:
    img = tmp_path / "ntfs.img"
    shutil.copyfile(ntfs.img, img)
    (log_lcn, _n), *_ = _ntfs_runs(img, 2)
    log_off = log_lcn * CLUSTER
    with open(img, "r+b") as f:
        if damage == "volume-dirty":
            f.seek(_volume_flags_offset(img))
            f.write(b"\x01\x00")
        elif damage == "logfile-in-use":
            f.seek(log_off)
            f.write(_restart_page(in_use=0, flags=0) * 2)
        elif damage == "logfile-records-only":
            f.seek(log_off + 2 * 4096)
            f.write(b"RCRD" + bytes(4092))
            f.seek(log_off)
            f.write(b"RCRD" + bytes(4092))
        elif damage == "logfile-torn-restart":
            page = bytearray(_restart_page(in_use=0, flags=2))
            page[1022:1024] = b"\x07\x07"  # second sector written by an older update
            f.seek(log_off)
            f.write(bytes(page))
        elif damage == "logfile-clean-restart":
            f.seek(log_off)
            f.write(_restart_page(in_use=0, flags=2) + _restart_page(in_use=0xFFFF, flags=0))
        else:  # as if the bitmap had not been written yet (ntfs-3g keeps no log to tell)
            (bitmap_lcn, _n), *_ = _ntfs_runs(img, 6)
            if damage == "mft-marked-free":
                (cluster, _n), *_ = _ntfs_runs(img, 0)
            else:
                name, data = max(ntfs.live.items(), key=lambda kv: len(kv[1]))
                cluster = _file_clusters(data, _clusters_by_content(img))[-1]
            f.seek(bitmap_lcn * CLUSTER + cluster // 8)
            byte = f.read(1)[0]
            f.seek(bitmap_lcn * CLUSTER + cluster // 8)
            f.write(bytes([byte & ~(1 << (cluster % 8))]))
    fm = find_free_extents(FileByteSource(img))
    expected = {
        "volume-dirty": "marked dirty",
        "logfile-in-use": "$LogFile is not clean",
        "logfile-records-only": "no readable restart page",
        "logfile-torn-restart": "torn",
        "mft-marked-free": "MFT record 0",
        "file-cluster-marked-free": "used by MFT record",
    }
    if used:
        assert fm.extents == [] and expected[damage] in fm.volumes[0].note, fm.volumes
    else:
        assert fm.free_bytes == find_free_extents(FileByteSource(ntfs.img)).free_bytes, fm.volumes
