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

Never reported free: anything outside a recognised file system (partition gaps hold boot loaders
such as GRUB's core.img), partition tables, LVM metadata, swap.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from repo.guestfs.filesystems import crc32c_raw
from repo.guestfs.source import ByteSource, SourceReader
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
        import bisect

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
    try:
        if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
            return "ext", _ext_free(src), ""
        from repo.guestfs.filesystems import _looks_like_fat

        if head[3:11] not in (b"NTFS    ", b"EXFAT   ") and _looks_like_fat(head + bytes(4096 - len(head))):
            return "vfat", _fat_free(src), ""
    except _Skip as exc:
        log.info("volume %d: free space not used: %s", vol.index, exc)
        return "ext" if head[1080:1082] == b"\x53\xef" else "vfat", [], str(exc)
    except (OSError, ValueError, struct.error) as exc:
        log.warning("volume %d: free-space metadata unreadable, treated as used: %s", vol.index, exc)
        return "?", [], f"metadata unreadable: {exc}"
    if head[:4] == b"XFSB":
        return "xfs", [], "free space of XFS is not evaluated; treated as used"
    if head[3:11] == b"NTFS    ":
        return "ntfs", [], "free space of NTFS is not evaluated; treated as used"
    return "", [], "no supported file system; treated as used"


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
