"""Which disk bytes the guest file systems mark as free, so a VM backup can skip them.

Why: a VM disk is mostly blocks of deleted files and never-used space. Reading them from the
hypervisor, hashing and storing them costs time and space for nothing; restoring them as zeroes
loses nothing the guest can see. But a block reported free that the guest still uses is *data
loss in the backup*, silently. So this module is built for one property: every byte it returns
is unallocated in the guest's own metadata, and whenever that metadata is missing, ambiguous,
inconsistent or fails its checksum, the affected region is treated as used.

What is supported (everything else is "all used"):

* **ext2/3/4** - block bitmaps per group, checked against the group descriptor (checksums when
  the file system has them, free counts, its own metadata blocks marked). ``BLOCK_UNINIT`` groups
  are computed as the kernel does (all free except superblock backup, GDT, reserved GDT and any
  group's bitmaps/inode tables placed there), only when group checksums make the flag
  trustworthy. A journal that needs recovery (image of a running guest) is scanned completely
  and every journaled copy of a bitmap or descriptor block is OR-ed in, so blocks allocated by
  not-yet-checkpointed transactions stay "used". bigalloc, external journals, fast-commit
  journals and file systems marked as having errors are skipped.
* **FAT12/16/32** - a cluster is free only if it is free in *every* FAT copy.
* **XFS** (v4 and v5) - per allocation group, the by-block free-space B+tree of the AGF, every
  block checked (magic, level, and on v5 CRC, owner AG, location and UUID), cross-checked against
  the by-size tree, ``agf_freeblks`` and ``agf_longest``; AGFL blocks (reserved for btree growth)
  and the trees' own blocks must lie outside every free extent. Any mismatch: that AG is used.
  Only when recovering the log would change no free-space metadata (see
  :func:`_xfs_log_must_be_clean`): after a clean unmount, or a frozen/idle XFS whose log holds
  nothing but superblock updates. A copy of a busy or crashed XFS is all used.
* **NTFS** - clusters whose ``$Bitmap`` bit is clear, only when ``$Volume`` is not dirty and the
  ``$LogFile`` is provably clean (empty, or every restart area says clean); the bitmap's length
  must fit the cluster count, and every cluster any in-use MFT record points to must be marked
  used (the whole $MFT is read: it also catches a copy of a volume ntfs-3g had mounted, which
  keeps no log). A Windows volume that is in use, hibernated or "fast-started" is all used.

Never reported free: anything outside a recognised file system (partition gaps hold boot loaders
such as GRUB's core.img), partition tables, LVM metadata, swap.
"""

from __future__ import annotations

import bisect
import logging
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from repo.guestfs.filesystems import crc32c_raw
from repo.guestfs.source import ByteSource, SourceReader, read_exact
from repo.guestfs.volumes import Volume, find_volumes

__all__ = ["FreeMap", "VolumeFreeInfo", "align_extents", "find_free_extents", "volume_free_extents"]

log = logging.getLogger(__name__)


class _Skip(Exception):
    """The volume's free space cannot be determined safely; the reason is the message."""


@dataclass(frozen=True)
class VolumeFreeInfo:
    """Per-volume outcome: how much was found free, or why the volume was treated as fully used."""

    index: int
    scheme: str
    fs: str
    free_bytes: int
    note: str = ""


@dataclass
class FreeMap:
    """Free byte ranges of a disk: sorted, merged, absolute ``(offset, length)`` pairs."""

    extents: list[tuple[int, int]]
    volumes: list[VolumeFreeInfo] = field(default_factory=list)

    @property
    def free_bytes(self) -> int:
        return sum(length for _off, length in self.extents)

    def is_free(self, offset: int, length: int) -> bool:
        """True if all of ``[offset, offset + length)`` lies inside one free extent."""
        idx = bisect.bisect_right(self.extents, (offset, float("inf"))) - 1
        if idx < 0:
            return False
        start, size = self.extents[idx]
        return start <= offset and offset + length <= start + size


def find_free_extents(source: ByteSource) -> FreeMap:
    """Free extents of every supported file system on the disk ``source``."""
    table = find_volumes(source)
    extents: list[tuple[int, int]] = []
    infos: list[VolumeFreeInfo] = []
    for vol in table.volumes:
        kind, rel, note = volume_free_extents(vol)
        free = 0
        for off, length in rel:
            for d_off, d_len in vol.disk_ranges(off, length):
                extents.append((d_off, d_len))
                free += d_len
        infos.append(VolumeFreeInfo(vol.index, vol.scheme, kind, free, note))
    return FreeMap(_merge(extents), infos)


def volume_free_extents(vol: Volume) -> tuple[str, list[tuple[int, int]], str]:
    """``(fs kind, free ranges relative to the volume, note)``; no ranges when unsure."""
    src = vol.source
    head = src.read_at(0, 2048)
    kind, reader = _detect(head)
    if reader is None:
        return kind, [], "no supported file system; treated as used"
    try:
        return kind, reader(src), ""
    except _Skip as exc:
        log.info("volume %d: free space not used: %s", vol.index, exc)
        return kind, [], str(exc)
    except (OSError, ValueError, struct.error) as exc:
        log.warning("volume %d: free-space metadata unreadable, treated as used: %s", vol.index, exc)
        return kind, [], f"metadata unreadable: {exc}"


def _detect(head: bytes) -> tuple[str, Callable[[ByteSource], list[tuple[int, int]]] | None]:
    from repo.guestfs.filesystems import _looks_like_fat

    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext", _ext_free
    if head[:4] == b"XFSB":
        return "xfs", _xfs_free
    if head[3:11] == b"NTFS    ":
        return "ntfs", _ntfs_free
    if head[3:11] != b"EXFAT   " and _looks_like_fat(head + bytes(4096 - len(head))):
        return "vfat", _fat_free
    return "", None


def align_extents(extents: list[tuple[int, int]], granularity: int) -> list[tuple[int, int]]:
    """Shrink each extent to whole ``granularity``-aligned units (for fixed-size backup chunks).

    A chunk may be skipped only if it is free in its entirety, so extents are rounded inwards.
    """
    out = []
    for off, length in extents:
        start = -(-off // granularity) * granularity
        end = (off + length) // granularity * granularity
        if end > start:
            out.append((start, end - start))
    return out


# === ext2/3/4 =====================================================================================

_SB = 1024
_COMPAT_HAS_JOURNAL = 0x4
_COMPAT_SPARSE_SUPER2 = 0x200
_COMPAT_FAST_COMMIT = 0x400
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_INCOMPAT_FLEX_BG = 0x200
_INCOMPAT_CSUM_SEED = 0x2000
_RO_SPARSE_SUPER = 0x1
_RO_GDT_CSUM = 0x10
_RO_BIGALLOC = 0x200
_RO_METADATA_CSUM = 0x400
_STATE_VALID = 0x1
_STATE_ERROR = 0x2
_BG_BLOCK_UNINIT = 0x2

_JBD2_MAGIC = 0xC03B3998
_JBD2_DESCRIPTOR = 1
_JBD2_INCOMPAT_64BIT = 0x2
_JBD2_INCOMPAT_CSUM_V2 = 0x8
_JBD2_INCOMPAT_CSUM_V3 = 0x10
_JBD2_INCOMPAT_FAST_COMMIT = 0x20
_JBD2_FLAG_ESCAPE = 1
_JBD2_FLAG_SAME_UUID = 2
_JBD2_FLAG_LAST_TAG = 8


@dataclass
class _ExtSuper:
    block_size: int
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    groups: int
    desc_size: int
    descs_per_block: int
    compat: int
    incompat: int
    ro_compat: int
    reserved_gdt: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    uuid: bytes
    csum_seed: int
    journal_inum: int
    state: int

    @property
    def has_group_csum(self) -> bool:
        return bool(self.ro_compat & (_RO_GDT_CSUM | _RO_METADATA_CSUM))

    @property
    def metadata_csum(self) -> bool:
        return bool(self.ro_compat & _RO_METADATA_CSUM)

    def group_first_block(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group

    def group_blocks(self, group: int) -> int:
        return min(self.blocks_per_group, self.blocks_count - self.group_first_block(group))

    def has_super(self, group: int) -> bool:
        """Linux ``ext4_bg_has_super``."""
        if group == 0:
            return True
        if self.compat & _COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.ro_compat & _RO_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        return any(_is_power(group, base) for base in (3, 5, 7))

    def gdt_blocks(self) -> int:
        return -(-self.groups // self.descs_per_block)

    def base_meta_blocks(self, group: int) -> int:
        """Blocks at the start of ``group`` used by superblock, GDT and reserved GDT (``ext4_num_base_meta_clusters``)."""
        num = 1 if self.has_super(group) else 0
        meta_bg = bool(self.incompat & _INCOMPAT_META_BG)
        if not meta_bg or group < self.first_meta_bg * self.descs_per_block:
            if self.has_super(group):
                num += (self.first_meta_bg if meta_bg else self.gdt_blocks()) + self.reserved_gdt
        else:
            first = group - group % self.descs_per_block
            if group in (first, first + 1, first + self.descs_per_block - 1):
                num += 1
        return num

    def descriptor_block(self, nr: int) -> int:
        """Disk block holding GDT block ``nr`` (Linux ``descriptor_loc``)."""
        if not self.incompat & _INCOMPAT_META_BG or nr < self.first_meta_bg:
            return self.first_data_block + nr + 1
        group = self.descs_per_block * nr
        return self.group_first_block(group) + (1 if self.has_super(group) else 0)


def _is_power(n: int, base: int) -> bool:
    p = base
    while p < n:
        p *= base
    return p == n


def _read_ext_super(src: ByteSource) -> _ExtSuper:
    sb = src.read_at(_SB, 1024)
    if len(sb) < 1024 or sb[56:58] != b"\x53\xef":
        raise _Skip("no ext superblock")
    (blocks_lo,) = struct.unpack_from("<I", sb, 4)
    first_data_block, log_bs, log_cs, bpg, cpg = struct.unpack_from("<IIIII", sb, 20)
    (state,) = struct.unpack_from("<H", sb, 58)
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    uuid = sb[104:120]
    (reserved_gdt,) = struct.unpack_from("<H", sb, 206)
    (journal_inum,) = struct.unpack_from("<I", sb, 224)
    (desc_size_raw,) = struct.unpack_from("<H", sb, 254)
    (first_meta_bg,) = struct.unpack_from("<I", sb, 260)
    (blocks_hi,) = struct.unpack_from("<I", sb, 336)
    backup_bgs = struct.unpack_from("<II", sb, 588)
    (checksum_seed,) = struct.unpack_from("<I", sb, 624)
    if ro_compat & _RO_METADATA_CSUM:
        (stored,) = struct.unpack_from("<I", sb, 1020)
        if crc32c_raw(0xFFFFFFFF, sb[:1020]) != stored:
            raise _Skip("superblock checksum mismatch")
    if log_bs > 6:
        raise _Skip(f"implausible block size 2^{10 + log_bs}")
    if ro_compat & _RO_BIGALLOC or log_cs != log_bs or cpg != bpg:
        raise _Skip("bigalloc file systems are not evaluated")
    if incompat & _INCOMPAT_JOURNAL_DEV:
        raise _Skip("external journal device")
    block_size = 1024 << log_bs
    blocks_count = blocks_lo | ((blocks_hi << 32) if incompat & _INCOMPAT_64BIT else 0)
    if bpg == 0 or bpg > 8 * block_size or bpg % 8:
        raise _Skip(f"implausible blocks per group {bpg}")
    if blocks_count * block_size > src.size:
        raise _Skip("file system is larger than its volume (truncated image?)")
    if first_data_block != (1 if block_size == 1024 else 0) and first_data_block != 0:
        raise _Skip(f"implausible first data block {first_data_block}")
    desc_size = desc_size_raw if incompat & _INCOMPAT_64BIT else 32
    if desc_size < 32 or desc_size > block_size or desc_size & (desc_size - 1):
        raise _Skip(f"implausible group descriptor size {desc_size}")
    groups = -(-(blocks_count - first_data_block) // bpg)
    if ro_compat & _RO_METADATA_CSUM:
        seed = checksum_seed if incompat & _INCOMPAT_CSUM_SEED else crc32c_raw(0xFFFFFFFF, uuid)
    else:
        seed = 0
    return _ExtSuper(
        block_size=block_size,
        blocks_count=blocks_count,
        first_data_block=first_data_block,
        blocks_per_group=bpg,
        groups=groups,
        desc_size=desc_size,
        descs_per_block=block_size // desc_size,
        compat=compat,
        incompat=incompat,
        ro_compat=ro_compat,
        reserved_gdt=reserved_gdt,
        first_meta_bg=first_meta_bg,
        backup_bgs=(backup_bgs[0], backup_bgs[1]),
        uuid=uuid,
        csum_seed=seed,
        journal_inum=journal_inum,
        state=state,
    )


@dataclass
class _GroupDesc:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks: int
    flags: int
    bitmap_csum: int
    bitmap_csum_bits: int  # 0 (no checksum), 16 or 32
    valid: bool


def _parse_desc(sb: _ExtSuper, group: int, raw: bytes) -> _GroupDesc:
    wide = sb.desc_size >= 64
    bb_lo, ib_lo, it_lo, free_lo, _free_inodes, _dirs, flags, _excl, bbcs_lo = struct.unpack_from(
        "<IIIHHHHIH", raw
    )
    bb, ib, it, free = bb_lo, ib_lo, it_lo, free_lo
    bbcs = bbcs_lo
    if wide:
        bb_hi, ib_hi, it_hi, free_hi = struct.unpack_from("<IIIH", raw, 0x20)
        bb |= bb_hi << 32
        ib |= ib_hi << 32
        it |= it_hi << 32
        free |= free_hi << 16
        (bbcs_hi,) = struct.unpack_from("<H", raw, 0x38)
        bbcs |= bbcs_hi << 16
    valid = True
    if sb.has_group_csum:
        (stored,) = struct.unpack_from("<H", raw, 0x1E)
        valid = stored == _desc_checksum(sb, group, raw)
    bits = 0
    if sb.metadata_csum:
        bits = 32 if wide else 16
    return _GroupDesc(bb, ib, it, free, flags, bbcs, bits, valid)


def _desc_checksum(sb: _ExtSuper, group: int, raw: bytes) -> int:
    le_group = struct.pack("<I", group)
    body = raw[:0x1E] + b"\0\0" + raw[0x20 : sb.desc_size]
    if sb.metadata_csum:
        return crc32c_raw(crc32c_raw(sb.csum_seed, le_group), body) & 0xFFFF
    crc = _crc16(0xFFFF, sb.uuid)
    crc = _crc16(crc, le_group)
    crc = _crc16(crc, raw[:0x1E])
    if sb.incompat & _INCOMPAT_64BIT and sb.desc_size > 0x20:
        crc = _crc16(crc, raw[0x20 : sb.desc_size])
    return crc


_CRC16_TABLE: list[int] = []


def _crc16(crc: int, data: bytes) -> int:
    """Linux ``crc16`` (polynomial 0x8005, bit-reflected), as used by ``uninit_bg`` descriptors."""
    if not _CRC16_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
            _CRC16_TABLE.append(c)
    for b in data:
        crc = (crc >> 8) ^ _CRC16_TABLE[(crc ^ b) & 0xFF]
    return crc


def _ext_free(src: ByteSource) -> list[tuple[int, int]]:
    sb = _read_ext_super(src)
    if sb.state & _STATE_ERROR:
        raise _Skip("file system is marked as having errors")
    has_journal = bool(sb.compat & _COMPAT_HAS_JOURNAL)
    if not has_journal and not sb.state & _STATE_VALID:
        raise _Skip("file system without a journal was not cleanly unmounted")
    bs = sb.block_size

    # Group descriptors, block by block.
    descs: list[_GroupDesc] = []
    gdt_block_of_group: dict[int, int] = {}
    for nr in range(sb.gdt_blocks()):
        block = sb.descriptor_block(nr)
        raw = src.read_at(block * bs, bs)
        if len(raw) != bs:
            raise _Skip("group descriptor table unreadable")
        for i in range(sb.descs_per_block):
            group = nr * sb.descs_per_block + i
            if group >= sb.groups:
                break
            gdt_block_of_group[group] = block
            descs.append(_parse_desc(sb, group, raw[i * sb.desc_size : (i + 1) * sb.desc_size]))

    # Every group's own metadata, indexed by the group it physically lies in.
    meta_in_group: dict[int, list[tuple[int, int]]] = {}
    inode_table_blocks = _inode_table_blocks(src, sb)
    for d in descs:
        for start, count in ((d.block_bitmap, 1), (d.inode_bitmap, 1), (d.inode_table, inode_table_blocks)):
            _add_meta(sb, meta_in_group, start, count)

    journal_copies: dict[int, list[bytes]] = {}
    recovering = bool(sb.incompat & _INCOMPAT_RECOVER)
    if recovering:
        if sb.compat & _COMPAT_FAST_COMMIT:
            raise _Skip("journal with fast commits needs recovery")
        wanted = {d.block_bitmap for d in descs} | set(gdt_block_of_group.values())
        journal_copies = _journal_copies(src, sb, wanted)

    bitmap_bytes = sb.blocks_per_group // 8
    free: list[tuple[int, int]] = []
    for g, d in enumerate(descs):
        first = sb.group_first_block(g)
        nblocks = sb.group_blocks(g)
        if not d.valid:
            log.warning("ext group %d: descriptor checksum mismatch; treated as used", g)
            continue
        if not sb.first_data_block <= d.block_bitmap < sb.blocks_count:
            log.warning("ext group %d: bitmap location out of range; treated as used", g)
            continue
        uninit = sb.has_group_csum and bool(d.flags & _BG_BLOCK_UNINIT)
        moved = False
        # Bitmap checksums of every known version of this descriptor: on disk and journaled.
        csums = {d.bitmap_csum}
        idx = g % sb.descs_per_block
        for copy in journal_copies.get(gdt_block_of_group[g], []):
            jd = _parse_desc(sb, g, copy[idx * sb.desc_size : (idx + 1) * sb.desc_size])
            moved = moved or jd.block_bitmap != d.block_bitmap
            csums.add(jd.bitmap_csum)
            if not jd.flags & _BG_BLOCK_UNINIT:
                uninit = False  # the journal holds a newer descriptor in which the group is initialised
        if moved:
            log.warning("ext group %d: journal moves its bitmap; treated as used", g)
            continue
        bitmap = bytearray(bitmap_bytes)
        base = sb.base_meta_blocks(g)
        _set_bits(bitmap, 0, min(base, nblocks))
        if uninit:
            for start, count in meta_in_group.get(g, ()):
                _set_bits(bitmap, start - first, count)
        else:
            raw = src.read_at(d.block_bitmap * bs, bitmap_bytes)
            if len(raw) != bitmap_bytes:
                log.warning("ext group %d: bitmap unreadable; treated as used", g)
                continue
            if d.bitmap_csum_bits:
                crc = crc32c_raw(sb.csum_seed, raw)
                mask = 0xFFFF if d.bitmap_csum_bits == 16 else 0xFFFFFFFF
                if crc & mask not in csums:
                    log.warning("ext group %d: block bitmap checksum mismatch; treated as used", g)
                    continue
            # The group's metadata must already be marked; if not, the bitmap is not trustworthy.
            if not _bits_set(raw, 0, min(base, nblocks)) or not all(
                _bits_set(raw, start - first, count) for start, count in meta_in_group.get(g, ())
            ):
                log.warning("ext group %d: bitmap does not mark the group's own metadata; treated as used", g)
                continue
            _or_into(bitmap, raw)
        for copy in journal_copies.get(d.block_bitmap, []):
            _or_into(bitmap, copy[:bitmap_bytes])
        runs = list(_zero_runs(bytes(bitmap), nblocks))
        if sum(n for _s, n in runs) > d.free_blocks:
            log.warning("ext group %d: bitmap shows more free blocks than its descriptor; treated as used", g)
            continue
        free.extend(((first + s) * bs, n * bs) for s, n in runs)
    return _merge(free)


def _inode_table_blocks(src: ByteSource, sb: _ExtSuper) -> int:
    raw = src.read_at(_SB, 1024)
    (inodes_per_group,) = struct.unpack_from("<I", raw, 40)
    (inode_size,) = struct.unpack_from("<H", raw, 88)
    (rev,) = struct.unpack_from("<I", raw, 76)
    if rev == 0:
        inode_size = 128
    return -(-(inodes_per_group * inode_size) // sb.block_size)


def _add_meta(sb: _ExtSuper, into: dict[int, list[tuple[int, int]]], start: int, count: int) -> None:
    """Record blocks ``[start, start + count)`` under each group they fall into."""
    while count > 0:
        if start < sb.first_data_block or start >= sb.blocks_count:
            return
        group = (start - sb.first_data_block) // sb.blocks_per_group
        end_of_group = sb.group_first_block(group) + sb.blocks_per_group
        take = min(count, end_of_group - start)
        into.setdefault(group, []).append((start, take))
        start += take
        count -= take


def _journal_copies(src: ByteSource, sb: _ExtSuper, wanted: set[int]) -> dict[int, list[bytes]]:
    """Every journaled copy of the blocks in ``wanted``, from anywhere in the log.

    Scanning the whole log (not just the live part from ``s_start``) and ignoring revokes can
    only add copies; OR-ing extra copies only marks more blocks used, which is safe.
    """
    if not sb.journal_inum:
        raise _Skip("journal needs recovery but is not inside the file system")
    from dissect.extfs import ExtFS

    try:
        fs = ExtFS(SourceReader(src))
        runs = fs.get_inode(sb.journal_inum).dataruns()
    except Exception as exc:
        raise _Skip(f"journal needs recovery but its inode is unreadable: {exc}") from exc
    bs = sb.block_size
    jmap: list[int | None] = []
    for block, count in runs:
        jmap.extend([None] * count if not block else range(block, block + count))

    def jread(index: int, count: int = 1) -> bytes:
        parts = []
        for i in range(index, index + count):
            fsb = jmap[i] if i < len(jmap) else None
            parts.append(bytes(bs) if fsb is None else src.read_at(fsb * bs, bs))
        return b"".join(parts)

    jsb = jread(0)
    magic, btype = struct.unpack_from(">II", jsb)
    if magic != _JBD2_MAGIC or btype not in (3, 4):
        raise _Skip("journal needs recovery but its superblock is invalid")
    j_bs, maxlen, j_first = struct.unpack_from(">III", jsb, 12)
    incompat = struct.unpack_from(">I", jsb, 40)[0] if btype == 4 else 0
    if j_bs != bs or maxlen > len(jmap) or j_first == 0 or j_first >= maxlen:
        raise _Skip("journal needs recovery but its geometry is implausible")
    if incompat & _JBD2_INCOMPAT_FAST_COMMIT:
        raise _Skip("journal with fast commits needs recovery")
    if incompat & _JBD2_INCOMPAT_CSUM_V3:
        tag_bytes = 16
    else:
        tag_bytes = 12 if incompat & _JBD2_INCOMPAT_64BIT else 8
        if incompat & _JBD2_INCOMPAT_CSUM_V2:
            tag_bytes += 2
    tail = 4 if incompat & (_JBD2_INCOMPAT_CSUM_V2 | _JBD2_INCOMPAT_CSUM_V3) else 0
    csum3 = bool(incompat & _JBD2_INCOMPAT_CSUM_V3)
    wide = bool(incompat & _JBD2_INCOMPAT_64BIT)

    copies: dict[int, list[bytes]] = {}
    span = maxlen - j_first
    step = 256
    for chunk_start in range(j_first, maxlen, step):
        n = min(step, maxlen - chunk_start)
        chunk = jread(chunk_start, n)
        for k in range(n):
            if struct.unpack_from(">II", chunk, k * bs) != (_JBD2_MAGIC, _JBD2_DESCRIPTOR):
                continue
            desc = chunk[k * bs : (k + 1) * bs]
            pos, j = 12, 0
            while pos + tag_bytes <= bs - tail:
                if csum3:
                    blocknr, flags, hi = struct.unpack_from(">III", desc, pos)
                else:
                    blocknr, _csum, flags = struct.unpack_from(">IHH", desc, pos)
                    hi = struct.unpack_from(">I", desc, pos + 8)[0] if wide else 0
                target = blocknr | ((hi << 32) if wide else 0)
                pos += tag_bytes
                if not flags & _JBD2_FLAG_SAME_UUID:
                    pos += 16
                j += 1
                if target in wanted:
                    jblock = j_first + (chunk_start + k - j_first + j) % span
                    data = bytearray(jread(jblock))
                    if flags & _JBD2_FLAG_ESCAPE:
                        struct.pack_into(">I", data, 0, _JBD2_MAGIC)
                    copies.setdefault(target, []).append(bytes(data))
                if flags & _JBD2_FLAG_LAST_TAG:
                    break
    if copies:
        log.info("journal holds %d copies of bitmap/descriptor blocks", sum(map(len, copies.values())))
    return copies


# === FAT ==========================================================================================


def _fat_free(src: ByteSource) -> list[tuple[int, int]]:
    bs = src.read_at(0, 512)
    bps = int.from_bytes(bs[11:13], "little")
    spc = bs[13]
    reserved = int.from_bytes(bs[14:16], "little")
    nfats = bs[16]
    root_entries = int.from_bytes(bs[17:19], "little")
    total = int.from_bytes(bs[19:21], "little") or int.from_bytes(bs[32:36], "little")
    fat_size = int.from_bytes(bs[22:24], "little") or int.from_bytes(bs[36:40], "little")
    if not bps or not spc or not nfats or not fat_size:
        raise _Skip("implausible FAT boot sector")
    root_sectors = (root_entries * 32 + bps - 1) // bps
    first_data = reserved + nfats * fat_size + root_sectors
    if total * bps > src.size or first_data >= total:
        raise _Skip("FAT file system is larger than its volume")
    clusters = (total - first_data) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    fats = []
    for i in range(nfats):
        raw = src.read_at((reserved + i * fat_size) * bps, fat_size * bps)
        if len(raw) != fat_size * bps:
            raise _Skip("FAT unreadable")
        fats.append(raw)
    if (clusters + 2) * bits > fat_size * bps * 8:
        raise _Skip("FAT too small for the cluster count")
    cs = spc * bps
    data_off = first_data * bps
    free: list[tuple[int, int]] = []
    run_start, run_len = -1, 0
    for cluster in range(2, clusters + 2):
        if all(_fat_entry(raw, cluster, bits) == 0 for raw in fats):
            if run_len and run_start + run_len == cluster:
                run_len += 1
            else:
                if run_len:
                    free.append((data_off + (run_start - 2) * cs, run_len * cs))
                run_start, run_len = cluster, 1
    if run_len:
        free.append((data_off + (run_start - 2) * cs, run_len * cs))
    return free


def _fat_entry(fat: bytes, cluster: int, bits: int) -> int:
    if bits == 32:
        return int.from_bytes(fat[cluster * 4 : cluster * 4 + 4], "little") & 0x0FFFFFFF
    if bits == 16:
        return int.from_bytes(fat[cluster * 2 : cluster * 2 + 2], "little")
    off = cluster + cluster // 2
    value = int.from_bytes(fat[off : off + 2], "little")
    return value >> 4 if cluster & 1 else value & 0xFFF


# === XFS ==========================================================================================
#
# Free space of each allocation group is the by-block-number free-space B+tree (bnobt) of its AGF,
# cross-checked against the by-size tree (cntbt), agf_freeblks and agf_longest. Blocks on the AGFL
# are never in these trees (they are reserved for btree growth) and are additionally required not
# to overlap any reported extent. The on-disk AGFs are only the current truth when the log holds
# nothing that recovery would replay, so the log must end with an unmount record (written by a
# clean unmount and by freeze); otherwise the whole file system is treated as used.

_XFS_SB_CRC_OFF = 224
_XFS_AGF_CRC_OFF = 216
_XFS_AGFL_CRC_OFF = 32
_XFS_AGFL_HDR_V5 = 36
_XFS_BTREE_CRC_OFF = 52
_XFS_BTREE_HDR_V5 = 56
_XFS_BTREE_HDR_V4 = 16
_XFS_BTREE_MAXLEVELS = 9
_XFS_INCOMPAT_META_UUID = 0x4
#: v5 incompat features whose AG free-space structures this reader understands: ftype, sparse
#: inodes, meta_uuid, bigtime, nrext64, exchange-range, parent pointers. Anything else (metadir
#: and realtime groups, needsrepair = 0x10) makes the file system "all used".
_XFS_INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80
#: finobt, rmapbt, reflink, inobtcount
_XFS_RO_COMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8
_XLOG_HEADER_MAGIC = 0xFEEDBABE
_XLOG_UNMOUNT_TRANS = 0x20
_XLOG_VERSION_2 = 2
_XLOG_HEADER_CYCLE_SIZE = 32 * 1024
_XLOG_SEARCH_BACK = 4096  # basic blocks searched back from the head for the last record header
_XLOG_EXT_HEADER_SIZE = 4 + 4 * 64  # sizeof(struct xlog_rec_ext_header): xh_cycle, xh_cycle_data[64]
_XLOG_CONTINUE_TRANS = 0x4
_XLOG_WAS_CONT_TRANS = 0x8
_XLOG_MAX_RECORD = 256 * 1024 + 64 * 1024  # largest in-core log buffer plus stripe padding
_XFS_TRANSACTION_CLIENT = 0x69
_XFS_LOG_CLIENT = 0xAA
_XFS_TRANS_HEADER_MAGIC_LE = b"NART"  # 0x5452414e; log items are in the writer's byte order
_XFS_LI_BUF = 0x123C
_BB = 512


@dataclass
class _XfsSuper:
    block_size: int
    sect_size: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    v5: bool
    uuid: bytes  # the UUID stamped into metadata blocks (sb_meta_uuid with the META_UUID feature)
    fs_uuid: bytes
    log_start: int  # file system block number of the internal log
    log_blocks: int

    def ag_byte(self, agno: int, agbno: int) -> int:
        return (agno * self.agblocks + agbno) * self.block_size

    def ag_length(self, agno: int) -> int:
        return min(self.agblocks, self.dblocks - agno * self.agblocks)

    def fsb_to_byte(self, fsb: int) -> int:
        return self.ag_byte(fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1))


def _xfs_crc_ok(buf: bytes, off: int) -> bool:
    """XFS metadata checksum: CRC32C of the buffer with the (little-endian) CRC field zeroed."""
    (stored,) = struct.unpack_from("<I", buf, off)
    crc = crc32c_raw(0xFFFFFFFF, buf[:off] + b"\0\0\0\0" + buf[off + 4 :])
    return stored == (~crc & 0xFFFFFFFF)


def _read_xfs_super(src: ByteSource) -> _XfsSuper:
    sb = src.read_at(0, 512)
    if len(sb) < 512 or sb[:4] != b"XFSB":
        raise _Skip("no XFS superblock")
    (block_size,) = struct.unpack_from(">I", sb, 4)
    (dblocks,) = struct.unpack_from(">Q", sb, 8)
    (log_start,) = struct.unpack_from(">Q", sb, 48)
    agblocks, agcount, _rbmblocks, log_blocks = struct.unpack_from(">IIII", sb, 84)
    versionnum, sect_size = struct.unpack_from(">HH", sb, 100)
    blocklog, sectlog, agblklog, inprogress = sb[120], sb[121], sb[124], sb[126]
    incompat, _log_incompat = struct.unpack_from(">II", sb, 216)
    (ro_compat,) = struct.unpack_from(">I", sb, 212)
    version = versionnum & 0xF
    if version not in (4, 5):
        raise _Skip(f"XFS superblock version {version} is not evaluated")
    v5 = version == 5
    if not 512 <= sect_size <= 32768 or sect_size != 1 << sectlog:
        raise _Skip(f"implausible XFS sector size {sect_size}")
    sb = src.read_at(0, sect_size)
    if len(sb) != sect_size:
        raise _Skip("XFS superblock unreadable")
    if v5 and not _xfs_crc_ok(sb, _XFS_SB_CRC_OFF):
        raise _Skip("XFS superblock checksum mismatch")
    if inprogress:
        raise _Skip("XFS mkfs did not finish (sb_inprogress)")
    if v5 and incompat & ~_XFS_INCOMPAT_KNOWN:
        raise _Skip(
            f"XFS incompatible features {incompat:#x} are not evaluated (or the file system needs repair)"
        )
    if v5 and ro_compat & ~_XFS_RO_COMPAT_KNOWN:
        raise _Skip(f"XFS read-only-compatible features {ro_compat:#x} are not evaluated")
    if not 512 <= block_size <= 65536 or block_size != 1 << blocklog or block_size < sect_size:
        raise _Skip(f"implausible XFS block size {block_size}")
    if (
        not agblocks
        or not agcount
        or agblklog > 31
        or agblocks > 1 << agblklog
        or agblocks <= 1 << agblklog >> 1
    ):
        raise _Skip("implausible XFS allocation group geometry")
    if not (agcount - 1) * agblocks < dblocks <= agcount * agblocks:
        raise _Skip("XFS size does not match its allocation groups")
    if dblocks * block_size > src.size:
        raise _Skip("file system is larger than its volume (truncated image?)")
    if not log_start:
        raise _Skip("external XFS log: its cleanness cannot be checked")
    uuid = sb[32:48]
    meta_uuid = sb[248:264] if v5 and incompat & _XFS_INCOMPAT_META_UUID else uuid
    return _XfsSuper(
        block_size,
        sect_size,
        dblocks,
        agblocks,
        agcount,
        agblklog,
        v5,
        meta_uuid,
        uuid,
        log_start,
        log_blocks,
    )


def _xfs_free(src: ByteSource) -> list[tuple[int, int]]:
    sb = _read_xfs_super(src)
    log_agno = sb.log_start >> sb.agblklog
    log_agbno = sb.log_start & ((1 << sb.agblklog) - 1)
    if log_agno >= sb.agcount or log_agbno + sb.log_blocks > sb.ag_length(log_agno) or sb.log_blocks < 64:
        raise _Skip("XFS internal log lies outside its allocation group")
    _xfs_log_must_be_clean(src, sb, sb.ag_byte(log_agno, log_agbno), sb.log_blocks * sb.block_size)
    free: list[tuple[int, int]] = []
    for agno in range(sb.agcount):
        try:
            extents = _xfs_ag_free(src, sb, agno)
        except _Skip as exc:
            log.warning("xfs AG %d: %s; treated as used", agno, exc)
            continue
        if agno == log_agno:
            end = log_agbno + sb.log_blocks
            if any(start < end and log_agbno < start + count for start, count in extents):
                log.warning("xfs AG %d: free space overlaps the log; treated as used", agno)
                continue
        bs = sb.block_size
        free.extend((sb.ag_byte(agno, start), count * bs) for start, count in extents)
    return _merge(free)


def _xfs_ag_free(src: ByteSource, sb: _XfsSuper, agno: int) -> list[tuple[int, int]]:
    """Free extents ``(agbno, count)`` of one AG, or :class:`_Skip` when anything is off."""
    ss = sb.sect_size
    base = sb.ag_byte(agno, 0)
    length = sb.ag_length(agno)
    agf = src.read_at(base + ss, ss)
    if len(agf) != ss or agf[:4] != b"XAGF":
        raise _Skip("AGF magic missing")
    version, seqno, agf_length = struct.unpack_from(">III", agf, 4)
    bno_root, cnt_root = struct.unpack_from(">II", agf, 16)
    bno_level, cnt_level = struct.unpack_from(">II", agf, 28)
    flfirst, fllast, flcount, freeblks, longest = struct.unpack_from(">IIIII", agf, 40)
    if sb.v5 and not _xfs_crc_ok(agf, _XFS_AGF_CRC_OFF):
        raise _Skip("AGF checksum mismatch")
    if version != 1 or seqno != agno or agf_length != length:
        raise _Skip("AGF version, sequence number or length is wrong")
    if sb.v5 and agf[64:80] != sb.uuid:
        raise _Skip("AGF belongs to another file system")
    if freeblks > length or longest > freeblks:
        raise _Skip("AGF free counters are implausible")
    header_blocks = -(-4 * ss // sb.block_size)  # superblock, AGF, AGI, AGFL sectors
    reserved = set(range(header_blocks))
    reserved |= _xfs_agfl_blocks(src, sb, agno, flfirst, fllast, flcount)
    v5 = sb.v5
    bno, bno_nodes = _xfs_alloc_btree(src, sb, agno, bno_root, bno_level, b"AB3B" if v5 else b"ABTB")
    cnt, cnt_nodes = _xfs_alloc_btree(src, sb, agno, cnt_root, cnt_level, b"AB3C" if v5 else b"ABTC")
    if any(b >= length for b in reserved | bno_nodes | cnt_nodes):
        raise _Skip("AG metadata block out of range")
    prev_end = 0
    for start, count in bno:
        if count == 0 or start < prev_end or start + count > length:
            raise _Skip("free-space btree records overlap, are unsorted or leave the AG")
        prev_end = start + count
    if cnt != sorted(cnt, key=lambda r: (r[1], r[0])):
        raise _Skip("by-size free-space btree is unsorted")
    if sorted(cnt) != bno:
        raise _Skip("by-block and by-size free-space btrees disagree")
    if sum(c for _s, c in bno) != freeblks or max((c for _s, c in bno), default=0) != longest:
        raise _Skip("free-space btree disagrees with the AGF free counters")
    used = sorted(reserved | bno_nodes | cnt_nodes)
    for start, count in bno:
        i = bisect.bisect_left(used, start)
        if i < len(used) and used[i] < start + count:
            raise _Skip(f"block {used[i]} is AG metadata but inside a free extent")
    return bno


def _xfs_agfl_blocks(
    src: ByteSource, sb: _XfsSuper, agno: int, first: int, last: int, count: int
) -> set[int]:
    ss = sb.sect_size
    agfl = src.read_at(sb.ag_byte(agno, 0) + 3 * ss, ss)
    if len(agfl) != ss:
        raise _Skip("AGFL unreadable")
    hdr = 0
    if sb.v5:
        hdr = _XFS_AGFL_HDR_V5
        if agfl[:4] != b"XAFL" or struct.unpack_from(">I", agfl, 4)[0] != agno or agfl[8:24] != sb.uuid:
            raise _Skip("AGFL header is wrong")
        if not _xfs_crc_ok(agfl, _XFS_AGFL_CRC_OFF):
            raise _Skip("AGFL checksum mismatch")
    size = (ss - hdr) // 4
    if count > size or first >= size or last >= size:
        raise _Skip("AGFL indexes out of range")
    if count and (first + count - 1) % size != last:
        raise _Skip("AGFL first/last/count disagree")
    blocks = {struct.unpack_from(">I", agfl, hdr + 4 * ((first + i) % size))[0] for i in range(count)}
    if len(blocks) != count:
        raise _Skip("AGFL lists a block twice")
    return blocks


def _xfs_alloc_btree(
    src: ByteSource, sb: _XfsSuper, agno: int, root: int, levels: int, magic: bytes
) -> tuple[list[tuple[int, int]], set[int]]:
    """All leaf records ``(startblock, blockcount)`` in tree order, and the tree's own blocks."""
    if not 1 <= levels <= _XFS_BTREE_MAXLEVELS:
        raise _Skip(f"implausible {magic.decode()} btree height {levels}")
    bs = sb.block_size
    length = sb.ag_length(agno)
    hdr = _XFS_BTREE_HDR_V5 if sb.v5 else _XFS_BTREE_HDR_V4
    records: list[tuple[int, int]] = []
    nodes: set[int] = set()
    stack = [(root, levels - 1)]
    while stack:
        agbno, level = stack.pop()
        if agbno >= length or agbno in nodes:
            raise _Skip(f"{magic.decode()} btree pointer out of range or looping")
        nodes.add(agbno)
        block = src.read_at(sb.ag_byte(agno, agbno), bs)
        if len(block) != bs or block[:4] != magic:
            raise _Skip(f"{magic.decode()} btree block {agbno}: bad magic")
        blevel, numrecs = struct.unpack_from(">HH", block, 4)
        if sb.v5:
            daddr, owner = struct.unpack_from(">Q", block, 16)[0], struct.unpack_from(">I", block, 48)[0]
            if daddr != sb.ag_byte(agno, agbno) // _BB or owner != agno or block[32:48] != sb.uuid:
                raise _Skip(f"{magic.decode()} btree block {agbno}: wrong owner or location")
            if not _xfs_crc_ok(block, _XFS_BTREE_CRC_OFF):
                raise _Skip(f"{magic.decode()} btree block {agbno}: checksum mismatch")
        if blevel != level:
            raise _Skip(f"{magic.decode()} btree block {agbno}: level {blevel}, expected {level}")
        if level == 0:
            if numrecs > (bs - hdr) // 8 or (numrecs == 0 and levels > 1):
                raise _Skip(f"{magic.decode()} btree block {agbno}: implausible record count")
            vals = struct.unpack_from(f">{2 * numrecs}I", block, hdr)
            records.extend(zip(vals[0::2], vals[1::2], strict=True))
            continue
        maxrecs = (bs - hdr) // 12
        if not 1 <= numrecs <= maxrecs:
            raise _Skip(f"{magic.decode()} btree block {agbno}: implausible key count")
        ptrs = struct.unpack_from(f">{numrecs}I", block, hdr + 8 * maxrecs)
        stack.extend((p, level - 1) for p in reversed(ptrs))  # depth first, left to right
    return records, nodes


def _xfs_log_must_be_clean(src: ByteSource, sb: _XfsSuper, start: int, size: int) -> None:
    """:class:`_Skip` unless recovery of the log would change no free-space metadata.

    Two cases are accepted, everything else (a log copied from a running or crashed system)
    makes the whole file system "used":

    * the last record is an unmount record ending at the head (clean unmount, as
      ``xlog_check_unmount_rec`` decides);
    * every record from the tail to the head logs nothing but the primary superblock buffer:
      the log of an idle or frozen XFS, which "covers" itself with such dummy transactions after
      all metadata has been written in place. Write-ahead logging means any AGF, AGFL or btree
      change not yet written in place would be in this range.
    """
    xlog = _XfsLog(src, sb, start, size)
    last = xlog.last_record()
    if last.end != xlog.head:
        raise _Skip("XFS log: last record does not end at the head (torn write)")
    ops = list(last.ops())
    if len(ops) == 1 and ops[0][2] & _XLOG_UNMOUNT_TRANS:
        return
    xlog.require_only_superblock_since(last.tail_lsn)


@dataclass
class _XlogRecord:
    blk: int
    cycle: int
    tail_lsn: int
    num_logops: int
    end: int  # log block after the record
    data: bytes  # the record's payload with the cycle-stamped words restored

    def ops(self) -> Iterator[tuple[int, int, int, bytes]]:
        """``(tid, clientid, flags, payload)`` of each log operation in the record."""
        pos = 0
        for _ in range(self.num_logops):
            if pos + 12 > len(self.data):
                raise _Skip("XFS log record: operations overrun the record")
            tid, length, clientid, flags = struct.unpack_from(">IIBB", self.data, pos)
            payload = self.data[pos + 12 : pos + 12 + length]
            if len(payload) != length:
                raise _Skip("XFS log record: operation overruns the record")
            pos += 12 + length
            yield tid, clientid, flags, payload


class _XfsLog:
    """The internal log: cycle numbers of all basic blocks, the head, and verified records.

    Every 512-byte basic block of the log begins with the cycle number it was written in (a
    record header holds it in its second word). The log is read completely - its size is about
    1/2000 of the file system's - and must consist of one run of cycle ``C`` from its start,
    followed only by blocks of cycle ``C - 1``: the head is at the change. Anything else (a
    torn or out-of-order write of a live log) means not provably clean.
    """

    def __init__(self, src: ByteSource, sb: _XfsSuper, start: int, size: int) -> None:
        from array import array

        self.src, self.sb, self.start = src, sb, start
        self.nbb = size // _BB
        cycles = array("I")
        step = 1 << 20
        for off in range(0, size, step):
            raw = src.read_at(start + off, min(step, size - off))
            if len(raw) != min(step, size - off):
                raise _Skip("XFS log unreadable")
            words = array("I", raw)
            if sys.byteorder == "little":
                words.byteswap()
            first, second = words[0::128], words[1::128]
            cycles.extend(
                c2 if c1 == _XLOG_HEADER_MAGIC else c1 for c1, c2 in zip(first, second, strict=True)
            )
        cycle = cycles[0]
        head = next((i for i, c in enumerate(cycles) if c != cycle), self.nbb)
        if cycle == 0 or any(c != cycle - 1 for c in cycles[head:]):
            raise _Skip("XFS log is not cleanly written (needs recovery or was copied while in use)")
        self.cycles = cycles
        self.head = head % self.nbb

    def bb(self, index: int, count: int = 1) -> bytes:
        return b"".join(
            self.src.read_at(self.start + (i % self.nbb) * _BB, _BB) for i in range(index, index + count)
        )

    def last_record(self) -> _XlogRecord:
        for back in range(1, min(_XLOG_SEARCH_BACK, self.nbb) + 1):
            blk = (self.head - back) % self.nbb
            if struct.unpack_from(">I", self.bb(blk))[0] == _XLOG_HEADER_MAGIC:
                return self.record(blk)
        raise _Skip("no XFS log record header before the head")

    def record(self, blk: int) -> _XlogRecord:
        """The record whose header is at ``blk``, checked (position, UUID, CRC) and un-stamped."""
        hdr = self.bb(blk)
        magic, h_cycle, h_version, h_len, h_lsn, tail_lsn = struct.unpack_from(">IIIIQQ", hdr)
        (h_crc,) = struct.unpack_from("<I", hdr, 32)
        (num_logops,) = struct.unpack_from(">i", hdr, 40)
        (h_size,) = struct.unpack_from(">i", hdr, 320)
        if (
            magic != _XLOG_HEADER_MAGIC
            or h_cycle != self.cycles[blk]
            or h_lsn != (h_cycle << 32 | blk)
            or hdr[304:320] != self.sb.fs_uuid
            or not 0 <= h_len <= _XLOG_MAX_RECORD
            or num_logops < 0
        ):
            raise _Skip(f"XFS log record header at block {blk} is inconsistent")
        hblks = 1
        if h_version & _XLOG_VERSION_2 and h_size > _XLOG_HEADER_CYCLE_SIZE:
            hblks = -(-h_size // _XLOG_HEADER_CYCLE_SIZE)
        data_bbs = -(-h_len // _BB)
        body = self.bb(blk, hblks + data_bbs)
        ext = body[_BB : hblks * _BB]
        data = bytearray(body[hblks * _BB :])
        # xlog_cksum: the header, the extended headers the record's *length* needs, the data.
        # mkfs writes its records with a zero CRC, which Linux accepts; its own never are zero.
        n_ext = max(0, -(-h_len // _XLOG_HEADER_CYCLE_SIZE) - 1) if h_version & _XLOG_VERSION_2 else 0
        summed_ext = b"".join(ext[j * _BB : j * _BB + _XLOG_EXT_HEADER_SIZE] for j in range(n_ext))
        # sizeof(struct xlog_rec_header) is 328 on 64-bit Linux (trailing padding), 324 on 32-bit
        if h_crc and not any(_xfs_crc_ok(hdr[:n] + summed_ext + bytes(data[:h_len]), 32) for n in (328, 324)):
            raise _Skip(f"XFS log record at block {blk}: checksum mismatch")
        per = _XLOG_HEADER_CYCLE_SIZE // _BB
        for i in range(data_bbs):  # xlog_unpack_data: put back the words the cycle stamp replaced
            j, k = divmod(i, per)
            src = hdr if j == 0 else ext[(j - 1) * _BB : j * _BB]
            off = 44 + 4 * k if j == 0 else 4 + 4 * k
            if len(src) < off + 4:
                raise _Skip(f"XFS log record at block {blk}: extended headers missing")
            data[i * _BB : i * _BB + 4] = src[off : off + 4]
        end = (blk + hblks + data_bbs) % self.nbb
        return _XlogRecord(blk, h_cycle, tail_lsn, num_logops, end, bytes(data[:h_len]))

    def require_only_superblock_since(self, tail_lsn: int) -> None:
        """:class:`_Skip` unless the records from ``tail_lsn`` to the head log only the superblock."""
        blk, cycle = tail_lsn & 0xFFFFFFFF, tail_lsn >> 32
        if blk >= self.nbb or self.cycles[blk] != cycle:
            raise _Skip("XFS log tail is not in the log")
        regions_left: dict[int, int] = {}  # tid -> regions still to come of the current log item
        seen = 0
        while blk != self.head:
            rec = self.record(blk)
            for tid, clientid, flags, payload in rec.ops():
                if flags & (_XLOG_CONTINUE_TRANS | _XLOG_WAS_CONT_TRANS):
                    raise _Skip("XFS log has a transaction split across records (in use)")
                if clientid == _XFS_LOG_CLIENT or not payload:
                    continue  # unmount record, or the empty start/commit operations
                if clientid != _XFS_TRANSACTION_CLIENT:
                    raise _Skip("XFS log has an operation of an unknown client")
                if regions_left.get(tid, 0):
                    regions_left[tid] -= 1  # a data region of the item being logged
                    continue
                if payload[:4] == _XFS_TRANS_HEADER_MAGIC_LE:
                    continue
                itype, nregions = struct.unpack_from("<HH", payload.ljust(4, b"\0"))
                if itype != _XFS_LI_BUF or len(payload) < 16 or not nregions:
                    raise _Skip("XFS log holds metadata changes not yet written in place (needs recovery)")
                (daddr,) = struct.unpack_from("<q", payload, 8)
                if daddr != 0:
                    raise _Skip("XFS log holds metadata changes not yet written in place (needs recovery)")
                regions_left[tid] = nregions - 1
            blk = rec.end
            seen += 1
            if seen > self.nbb:
                raise _Skip("XFS log records do not lead to the head")


# === NTFS =========================================================================================
#
# A cluster is free when its bit in the $Bitmap file (MFT record 6) is clear. The bitmap on disk
# is only complete when nothing is pending in the $LogFile: Windows logs metadata changes and
# applies them later, so a volume in use (or hibernated, or "fast startup") can have clusters
# allocated that the on-disk bitmap does not show yet. The volume is therefore evaluated only when
# the $LogFile is provably clean (every restart page says "clean", or the log is empty, as ntfs-3g
# leaves it) and $Volume is not marked dirty.

_NTFS_VOLUME_IS_DIRTY = 0x0001
_NTFS_RESTART_VOLUME_IS_CLEAN = 0x0002
_NTFS_LOGFILE_NO_CLIENT = 0xFFFF
_NTFS_BLOCK = 512
_NTFS_RECORD_IN_USE = 0x0001


def _ntfs_free(src: ByteSource) -> list[tuple[int, int]]:
    from dissect.ntfs import NTFS
    from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE as T

    boot = src.read_at(0, 512)
    bps = int.from_bytes(boot[11:13], "little")
    spc_raw = boot[13]
    spc = 1 << (256 - spc_raw) if spc_raw > 0x80 else spc_raw
    total_sectors = int.from_bytes(boot[40:48], "little")
    if bps not in (512, 1024, 2048, 4096) or not spc or spc & (spc - 1):
        raise _Skip("implausible NTFS boot sector")
    cs = bps * spc
    if total_sectors * bps > src.size:
        raise _Skip("file system is larger than its volume (truncated image?)")
    clusters = total_sectors // spc
    try:
        fs = NTFS(SourceReader(src))
        if fs.cluster_size != cs:
            raise _Skip("NTFS cluster size disagrees with the boot sector")
        info = fs.mft.get(3).attributes[T.VOLUME_INFORMATION]
        raw_info = info[0].data() if info else b""
    except _Skip:
        raise
    except Exception as exc:
        raise _Skip(f"NTFS metadata unreadable: {exc}") from exc
    if len(raw_info) < 12:
        raise _Skip("$Volume has no volume information")
    if int.from_bytes(raw_info[10:12], "little") & _NTFS_VOLUME_IS_DIRTY:
        raise _Skip("NTFS volume is marked dirty")
    _ntfs_logfile_must_be_clean(_ntfs_stream(fs, 2, clusters))
    bitmap_stream = _ntfs_stream(fs, 6, clusters)
    needed = -(-clusters // 8)
    if not needed <= bitmap_stream.size <= -(-needed // 8) * 8:
        raise _Skip(f"$Bitmap is {bitmap_stream.size} bytes for {clusters} clusters")
    bitmap = bitmap_stream.read(0, bitmap_stream.size)
    free: list[tuple[int, int]] = []
    step = 4096
    for pos in range(0, needed, step):
        part = bitmap[pos : pos + step]
        base = pos * 8
        nbits = min(8 * len(part), clusters - base)
        if not any(part):
            free.append((base, nbits))
        else:
            free.extend((base + s, n) for s, n in _zero_runs(part, nbits))
    free = _merge(free)
    starts = [s for s, _n in free]
    for segment, lcn, count in _ntfs_mft_runs(src, _ntfs_stream(fs, 0, clusters), fs._record_size, cs):
        i = bisect.bisect_right(starts, lcn) - 1
        j = bisect.bisect_left(starts, lcn + count)
        if lcn + count > clusters or any(s < lcn + count and lcn < s + n for s, n in free[max(i, 0) : j]):
            raise _Skip(f"$Bitmap marks clusters used by MFT record {segment} as free")
    return [(s * cs, n * cs) for s, n in free]


def _ntfs_mft_runs(
    src: ByteSource, mft: _NtfsStream, record_size: int, cs: int
) -> Iterator[tuple[int, int, int]]:
    """``(record, lcn, count)`` of every non-resident attribute extent of every in-use MFT record.

    The $Bitmap is trusted only if it marks all of these used - the check chkdsk does. It
    catches what no flag shows: a volume copied while ntfs-3g (which keeps no log) had it
    mounted, with a file's clusters recorded in its MFT record before the bitmap was written.
    Every attribute extent lives in some MFT record, so no attribute list needs resolving.
    """
    if record_size < _NTFS_BLOCK or record_size & (record_size - 1) or not mft.runs:
        raise _Skip("implausible MFT record size")
    segment = 0
    total = mft.size // record_size
    for lcn, count in mft.runs:
        for off in range(0, count * cs, 1 << 20):
            raw = read_exact(src, lcn * cs + off, min(1 << 20, count * cs - off))
            for pos in range(0, len(raw) - record_size + 1, record_size):
                if segment >= total:
                    return
                rec = raw[pos : pos + record_size]
                if rec[:4] == b"FILE" and int.from_bytes(rec[22:24], "little") & _NTFS_RECORD_IN_USE:
                    for run in _ntfs_record_runs(_ntfs_fixup(rec, "MFT record")):
                        yield (segment, *run)
                elif rec[:4] == b"BAAD":
                    raise _Skip(f"MFT record {segment} is marked bad")
                segment += 1


def _ntfs_record_runs(rec: bytes) -> Iterator[tuple[int, int]]:
    pos = int.from_bytes(rec[20:22], "little")
    while pos + 8 <= len(rec):
        atype, length = struct.unpack_from("<II", rec, pos)
        if atype == 0xFFFFFFFF:
            return
        if length < 16 or pos + length > len(rec):
            raise _Skip("MFT record with a malformed attribute")
        if rec[pos + 8]:  # non-resident
            mp = pos + int.from_bytes(rec[pos + 0x20 : pos + 0x22], "little")
            yield from _ntfs_mapping_pairs(rec[mp : pos + length])
        pos += length
    raise _Skip("MFT record without an attribute end marker")


def _ntfs_mapping_pairs(data: bytes) -> Iterator[tuple[int, int]]:
    """Decode an NTFS run list into ``(lcn, count)``; sparse runs are left out."""
    pos, lcn = 0, 0
    while pos < len(data) and data[pos]:
        len_size, off_size = data[pos] & 0xF, data[pos] >> 4
        if not 0 < len_size <= 8 or off_size > 8 or pos + 1 + len_size + off_size > len(data):
            raise _Skip("malformed NTFS run list")
        count = int.from_bytes(data[pos + 1 : pos + 1 + len_size], "little", signed=True)
        if count <= 0:
            raise _Skip("malformed NTFS run list")
        if off_size:
            lcn += int.from_bytes(
                data[pos + 1 + len_size : pos + 1 + len_size + off_size], "little", signed=True
            )
            if lcn < 0:
                raise _Skip("malformed NTFS run list")
            yield lcn, count
        pos += 1 + len_size + off_size


@dataclass
class _NtfsStream:
    """The unnamed data stream of a metafile, checked to be plain clusters on disk."""

    size: int
    runs: list[tuple[int, int]]  # (lcn, count)
    handle: Any

    def read(self, offset: int, size: int) -> bytes:
        self.handle.seek(offset)
        data: bytes = self.handle.read(size)
        if len(data) != min(size, self.size - offset):
            raise _Skip("NTFS metafile unreadable")
        return data


def _ntfs_stream(fs: Any, segment: int, clusters: int) -> _NtfsStream:
    """Open metafile ``segment``; :class:`_Skip` if any of it would read as made-up zeroes."""
    from dissect.ntfs.c_ntfs import ATTRIBUTE_FLAG_COMPRESSION_MASK, ATTRIBUTE_FLAG_ENCRYPTED

    try:
        rec = fs.mft.get(segment)
        attrs = rec._get_stream_attributes("")
        size = rec.size("")
        if attrs[0].header.resident:
            return _NtfsStream(size, [], attrs.open())
        if any(a.header.flags & (ATTRIBUTE_FLAG_COMPRESSION_MASK | ATTRIBUTE_FLAG_ENCRYPTED) for a in attrs):
            raise _Skip(f"metafile {segment} is compressed or encrypted")
        first = min(attrs, key=lambda a: a.header.lowest_vcn)
        valid = first.header.header.Form.Nonresident.ValidDataLength
        runs = list(attrs.dataruns())
        handle = attrs.open()
    except _Skip:
        raise
    except Exception as exc:
        raise _Skip(f"metafile {segment} unreadable: {exc}") from exc
    cs = fs.cluster_size
    if valid < size:
        raise _Skip(f"metafile {segment} has unwritten data (valid length {valid} < size {size})")
    if any(lcn is None for lcn, _n in runs):
        raise _Skip(f"metafile {segment} is sparse")
    if sum(n for _l, n in runs) * cs < size or any(lcn + n > clusters for lcn, n in runs):
        raise _Skip(f"metafile {segment} runs do not cover its size or leave the volume")
    return _NtfsStream(size, runs, handle)


def _ntfs_logfile_must_be_clean(logfile: _NtfsStream) -> None:
    """:class:`_Skip` unless the $LogFile is empty or every restart page in it says "clean".

    Probes the places a restart page can start (0, 512, 1 KiB, 2 KiB, ... as ntfs-3g's
    ``ntfs_check_logfile`` does). A restart page whose update sequence does not verify, a log
    with records but no restart page, and a restart area with clients in use but without the
    ``RESTART_VOLUME_IS_CLEAN`` flag all mean "not provably clean".
    """
    empty, restarts = True, 0
    pos = 0
    while pos < logfile.size:
        block = logfile.read(pos, _NTFS_BLOCK)
        magic = block[:4]
        if block != b"\xff" * _NTFS_BLOCK:
            empty = False
        if magic == b"RCRD":
            break
        if magic in (b"RSTR", b"CHKD"):
            restarts += 1
            page_size = int.from_bytes(block[16:20], "little")
            if page_size < _NTFS_BLOCK or page_size & (page_size - 1) or pos + page_size > logfile.size:
                raise _Skip("$LogFile restart page has an implausible size")
            page = _ntfs_fixup(logfile.read(pos, page_size))
            ra = int.from_bytes(page[24:26], "little")
            if ra % 8 or ra + 16 > page_size:
                raise _Skip("$LogFile restart area out of range")
            in_use = int.from_bytes(page[ra + 12 : ra + 14], "little")
            flags = int.from_bytes(page[ra + 14 : ra + 16], "little")
            if in_use != _NTFS_LOGFILE_NO_CLIENT and not flags & _NTFS_RESTART_VOLUME_IS_CLEAN:
                raise _Skip("NTFS $LogFile is not clean (volume in use, hibernated or not shut down)")
        pos = pos << 1 if pos else _NTFS_BLOCK
    if not empty and not restarts:
        raise _Skip("$LogFile has records but no readable restart page")


def _ntfs_fixup(page: bytes, what: str = "$LogFile restart page") -> bytes:
    """Apply and verify an NTFS update sequence array (torn multi-sector writes fail here)."""
    usa_ofs = int.from_bytes(page[4:6], "little")
    usa_count = int.from_bytes(page[6:8], "little")
    if usa_count - 1 != len(page) // _NTFS_BLOCK or usa_ofs + 2 * usa_count > _NTFS_BLOCK:
        raise _Skip(f"{what} has a bad update sequence array")
    out = bytearray(page)
    usn = page[usa_ofs : usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * _NTFS_BLOCK
        if out[end - 2 : end] != usn:
            raise _Skip(f"{what} is torn (update sequence mismatch)")
        out[end - 2 : end] = page[usa_ofs + 2 * i : usa_ofs + 2 * i + 2]
    return bytes(out)


# === bit helpers ==================================================================================

_BITS = [format(i, "08b")[::-1] for i in range(256)]  # LSB first, as ext bitmaps are
_NOT_FULL = re.compile(rb"[^\xff]+")
_ZEROS = re.compile(r"0+")


def _zero_runs(bitmap: bytes, nbits: int) -> Iterator[tuple[int, int]]:
    """Maximal runs of clear bits in ``bitmap[0:nbits]`` as ``(first_bit, count)``."""
    limit = (nbits + 7) // 8
    for m in _NOT_FULL.finditer(bitmap, 0, limit):
        start_byte, end_byte = m.span()
        bits = "".join(_BITS[b] for b in bitmap[start_byte:end_byte])
        for z in _ZEROS.finditer(bits):
            s = start_byte * 8 + z.start()
            e = min(start_byte * 8 + z.end(), nbits)
            if e > s:
                yield s, e - s


def _set_bits(bitmap: bytearray, first: int, count: int) -> None:
    end = min(first + count, len(bitmap) * 8)
    for bit in range(max(first, 0), end):
        bitmap[bit >> 3] |= 1 << (bit & 7)


def _bits_set(raw: bytes, first: int, count: int) -> bool:
    end = min(first + count, len(raw) * 8)
    return all(raw[bit >> 3] >> (bit & 7) & 1 for bit in range(max(first, 0), end))


def _or_into(bitmap: bytearray, other: bytes) -> None:
    n = min(len(bitmap), len(other))
    merged = int.from_bytes(bitmap[:n], "little") | int.from_bytes(other[:n], "little")
    bitmap[:n] = merged.to_bytes(n, "little")


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] >= off:
            prev_off, prev_len = out[-1]
            out[-1] = (prev_off, max(prev_len, off + length - prev_off))
        else:
            out.append((off, length))
    return out
