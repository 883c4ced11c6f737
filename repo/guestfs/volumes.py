"""Find the volumes on a guest disk: GPT, MBR (with logical partitions), LVM2, or a bare file system.

Why our own MBR/GPT parser rather than dissect.volume's: the byte ranges found here are also what
:mod:`repo.guestfs.freemap` uses to tell the VM backup which disk blocks it may skip, so they must
be exact. dissect.volume (3.18) computes GPT partition sizes one sector short, numbers logical
partitions after the primary slots, checks no GPT CRCs and never falls back to the backup GPT.
The formats are small and stable, so owning ~200 lines buys certainty. LVM2 metadata is a text
format with many segment types; there we reuse dissect.volume's metadata parser and only map
the simple, overwhelmingly common case (linear segments on physical volumes of this disk).

Partition numbers follow Linux: GPT entry index + 1; MBR primaries 1-4, logicals from 5.
"""

from __future__ import annotations

import logging
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from repo.guestfs.errors import PartitionTableError
from repo.guestfs.source import ByteSource, MappedSource, Run, SliceSource, SourceReader

__all__ = ["PartitionTable", "Volume", "find_volumes", "looks_like_filesystem_boot_sector"]

log = logging.getLogger(__name__)

SECTOR = 512
_GPT_SIGNATURE = b"EFI PART"
_LVM_LABEL = b"LABELONE"
_LVM_TYPE = b"LVM2 001"
_MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_MBR_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128  # a longer EBR chain is a loop or garbage

# Friendly names for the partition types a VM disk actually carries. The on-disk value is always
# kept in Volume.type_id; this only makes listings readable.
GPT_TYPES: dict[str, str] = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "44479540-f297-41b2-9aff-d131d5f0458a": "Linux root (x86)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "Linux LUKS",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
}
MBR_TYPES: dict[int, str] = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x06: "FAT16",
    0x07: "NTFS/exFAT",
    0x0B: "FAT32",
    0x0C: "FAT32 (LBA)",
    0x0E: "FAT16 (LBA)",
    0x11: "Hidden FAT12",
    0x16: "Hidden FAT16",
    0x17: "Hidden NTFS",
    0x1B: "Hidden FAT32",
    0x1C: "Hidden FAT32 (LBA)",
    0x27: "Windows recovery",
    0x82: "Linux swap",
    0x83: "Linux",
    0x8E: "Linux LVM",
    0xEF: "EFI System",
    0xFD: "Linux RAID",
}


@dataclass(frozen=True)
class Volume:
    """One readable region of the disk that may hold a file system.

    ``start``/``size`` are absolute disk bytes for a partition or a whole-disk volume. A logical
    volume may be scattered: its exact disk ranges are in ``extents`` (for a partition that is
    the single range ``((start, size),)``). ``source`` reads the volume's bytes.
    """

    index: int
    """Partition number (Linux numbering), 0 for a whole-disk volume, 1.. for LVs in scan order."""
    scheme: str
    """``gpt``, ``mbr``, ``lvm`` or ``none`` (no partition table)."""
    start: int
    size: int
    type: str
    """Human-readable partition type ("Linux filesystem", "EFI System", "LVM LV")."""
    type_id: str
    """Raw type: GPT type GUID, MBR type byte as ``0x83``, ``lvm``, or ``""``."""
    name: str = ""
    """GPT partition name, or ``VG/LV`` for a logical volume."""
    uuid: str = ""
    """GPT partition GUID or LVM LV id."""
    extents: tuple[tuple[int, int], ...] = ()
    source: ByteSource = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def disk_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Map ``[offset, offset + length)`` of the volume to absolute disk ``(offset, length)`` ranges."""
        if isinstance(self.source, (SliceSource, MappedSource)):
            return self.source.to_parent(offset, length)
        end = min(offset + length, self.size)
        return [(self.start + offset, end - offset)] if end > offset else []


@dataclass(frozen=True)
class PartitionTable:
    """What :func:`find_volumes` found: the scheme, the volumes, and per-container problems."""

    scheme: str
    volumes: tuple[Volume, ...]
    problems: tuple[str, ...] = ()
    """Human-readable notes about parts that could not be interpreted (e.g. an unsupported LV)."""


def find_volumes(disk: ByteSource, *, expand_lvm: bool = True) -> PartitionTable:
    """Detect the partition table of ``disk`` and list its volumes.

    Order of checks: GPT (primary, then backup header), MBR, then "the whole disk is one volume".
    A physical volume of LVM2 (a partition or the whole disk) is replaced by its logical volumes
    when ``expand_lvm`` is true and its metadata can be mapped.
    """
    head = disk.read_at(0, 2 * 4096)
    for sector_size in (SECTOR, 4096):
        if head[sector_size : sector_size + 8] == _GPT_SIGNATURE or (
            sector_size == SECTOR and _has_protective_mbr(head)
        ):
            gpt = _parse_gpt(disk, sector_size)
            if gpt is not None:
                return _expand(disk, PartitionTable("gpt", tuple(gpt)), expand_lvm)
    if _has_protective_mbr(head):
        raise PartitionTableError("GPT disk whose primary and backup partition tables are both damaged")
    mbr = _parse_mbr(disk, head[:SECTOR])
    if mbr is not None:
        return _expand(disk, PartitionTable("mbr", tuple(mbr)), expand_lvm)
    whole = Volume(
        index=0,
        scheme="none",
        start=0,
        size=disk.size,
        type="whole disk",
        type_id="",
        extents=((0, disk.size),),
        source=SliceSource(disk, 0, disk.size),
    )
    return _expand(disk, PartitionTable("none", (whole,)), expand_lvm)


# --- MBR -------------------------------------------------------------------------------------------

_MBR_ENTRY = struct.Struct("<B3sB3sII")


def looks_like_filesystem_boot_sector(sector: bytes) -> bool:
    """True if sector 0 is a FAT/NTFS/exFAT boot sector rather than an MBR.

    Both end in ``55 AA``; a partitionless FAT disk would otherwise be read as an MBR with four
    garbage entries taken from its boot code.
    """
    if len(sector) < SECTOR:
        return False
    oem = sector[3:11]
    if oem in (b"NTFS    ", b"EXFAT   ") or oem.startswith(b"-FVE-FS-"):
        return True
    jump_ok = (sector[0] == 0xEB and sector[2] == 0x90) or sector[0] == 0xE9
    if not jump_ok:
        return False
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    sectors_per_cluster = sector[13]
    reserved = int.from_bytes(sector[14:16], "little")
    fats = sector[16]
    return (
        bytes_per_sector in (512, 1024, 2048, 4096)
        and sectors_per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
        and reserved >= 1
        and fats in (1, 2)
    )


def _has_protective_mbr(head: bytes) -> bool:
    if head[510:512] != b"\x55\xaa":
        return False
    return any(head[446 + 16 * i + 4] == _MBR_PROTECTIVE for i in range(4))


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """``(slot, type, first_lba, sectors)`` of the non-empty entries."""
    out = []
    for slot in range(4):
        boot, _chs1, ptype, _chs2, lba, count = _MBR_ENTRY.unpack_from(sector, 446 + 16 * slot)
        if ptype == 0 or count == 0:
            continue
        if boot not in (0x00, 0x80):
            raise ValueError(f"bad boot flag {boot:#x}")
        out.append((slot, ptype, lba, count))
    return out


def _parse_mbr(disk: ByteSource, sector: bytes) -> list[Volume] | None:
    if sector[510:512] != b"\x55\xaa" or looks_like_filesystem_boot_sector(sector):
        return None
    try:
        entries = _mbr_entries(sector)
    except ValueError:
        return None
    disk_sectors = disk.size // SECTOR
    if not entries or any(lba == 0 for _s, _t, lba, _c in entries):
        return None
    if all(lba >= disk_sectors for _s, _t, lba, _c in entries):
        return None
    volumes: list[Volume] = []
    for slot, ptype, lba, count in entries:
        if lba >= disk_sectors:
            log.warning("MBR partition %d starts beyond the end of the disk; ignored", slot + 1)
            continue
        if ptype in _MBR_EXTENDED:
            volumes.extend(_parse_ebr_chain(disk, lba))
            continue
        volumes.append(_mbr_volume(disk, slot + 1, ptype, lba, count))
    return volumes


def _parse_ebr_chain(disk: ByteSource, ext_lba: int) -> list[Volume]:
    """Walk the chain of extended boot records; logical partitions are numbered from 5."""
    out: list[Volume] = []
    ebr_lba = ext_lba
    seen: set[int] = set()
    number = 5
    while ebr_lba not in seen and len(seen) < _MAX_LOGICAL:
        seen.add(ebr_lba)
        sector = disk.read_at(ebr_lba * SECTOR, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
            break
        try:
            entries = _mbr_entries(sector)
        except ValueError:
            break
        next_lba = None
        for _slot, ptype, lba, count in entries:
            if ptype in _MBR_EXTENDED:
                next_lba = ext_lba + lba  # the link is relative to the extended partition
            else:
                out.append(_mbr_volume(disk, number, ptype, ebr_lba + lba, count))
                number += 1
        if next_lba is None:
            break
        ebr_lba = next_lba
    else:
        if ebr_lba in seen:
            log.warning("extended partition chain loops at sector %d; stopped", ebr_lba)
    return out


def _mbr_volume(disk: ByteSource, number: int, ptype: int, lba: int, count: int) -> Volume:
    start = lba * SECTOR
    size = min(count * SECTOR, max(0, disk.size - start))
    return Volume(
        index=number,
        scheme="mbr",
        start=start,
        size=size,
        type=MBR_TYPES.get(ptype, f"type {ptype:#04x}"),
        type_id=f"{ptype:#04x}",
        extents=((start, size),),
        source=SliceSource(disk, start, size),
    )


# --- GPT -------------------------------------------------------------------------------------------

_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


def _parse_gpt(disk: ByteSource, sector_size: int) -> list[Volume] | None:
    """Parse the primary GPT, falling back to the backup at the last LBA; ``None`` if neither is valid."""
    last_lba = disk.size // sector_size - 1
    for lba in (1, last_lba):
        parsed = _parse_gpt_at(disk, sector_size, lba)
        if parsed is not None:
            if lba != 1:
                log.warning("primary GPT header is damaged; using the backup header")
            return parsed
    return None


def _parse_gpt_at(disk: ByteSource, sector_size: int, lba: int) -> list[Volume] | None:
    raw = disk.read_at(lba * sector_size, sector_size)
    if len(raw) < _GPT_HEADER.size or raw[:8] != _GPT_SIGNATURE:
        return None
    (_sig, _rev, hdr_size, hdr_crc, _res, cur_lba, _backup, _first, _last, _guid, array_lba, count, entry_size,
     array_crc) = _GPT_HEADER.unpack_from(raw)  # fmt: skip
    if not 92 <= hdr_size <= sector_size or cur_lba != lba:
        return None
    check = bytearray(raw[:hdr_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hdr_crc:
        return None
    if entry_size < _GPT_ENTRY.size or count > 16384:
        return None
    array = disk.read_at(array_lba * sector_size, count * entry_size)
    if len(array) != count * entry_size or zlib.crc32(array) != array_crc:
        return None
    volumes = []
    for i in range(count):
        type_guid, part_guid, first, last, _attrs, name_raw = _GPT_ENTRY.unpack_from(array, i * entry_size)
        if type_guid == bytes(16):
            continue
        start = first * sector_size
        size = (last - first + 1) * sector_size
        if last < first or start >= disk.size:
            log.warning("GPT entry %d lies outside the disk; ignored", i + 1)
            continue
        size = min(size, disk.size - start)
        type_id = str(uuid.UUID(bytes_le=type_guid))
        volumes.append(
            Volume(
                index=i + 1,
                scheme="gpt",
                start=start,
                size=size,
                type=GPT_TYPES.get(type_id, type_id),
                type_id=type_id,
                name=name_raw.decode("utf-16-le", "replace").split("\0", 1)[0],
                uuid=str(uuid.UUID(bytes_le=part_guid)),
                extents=((start, size),),
                source=SliceSource(disk, start, size),
            )
        )
    return volumes


# --- LVM2 ------------------------------------------------------------------------------------------


def is_lvm_pv(source: ByteSource) -> bool:
    """True if the volume carries an LVM2 physical-volume label in one of its first four sectors."""
    head = source.read_at(0, 4 * SECTOR)
    return any(
        head[i * SECTOR : i * SECTOR + 8] == _LVM_LABEL
        and head[i * SECTOR + 24 : i * SECTOR + 32] == _LVM_TYPE
        for i in range(4)
    )


def _expand(disk: ByteSource, table: PartitionTable, expand_lvm: bool) -> PartitionTable:
    if not expand_lvm:
        return table
    pvs = [v for v in table.volumes if is_lvm_pv(v.source)]
    if not pvs:
        return table
    problems = list(table.problems)
    try:
        lvs, lv_problems = _logical_volumes(disk, pvs)
    except Exception as exc:  # dissect raises assorted errors on bad metadata
        problems.append(f"LVM2 metadata could not be read: {exc}")
        return PartitionTable(table.scheme, table.volumes, tuple(problems))
    problems.extend(lv_problems)
    return PartitionTable(table.scheme, table.volumes + tuple(lvs), tuple(problems))


def _logical_volumes(disk: ByteSource, pvs: list[Volume]) -> tuple[list[Volume], list[str]]:
    """Map the visible linear LVs of every volume group whose physical volumes are all on this disk."""
    from dissect.volume.lvm.physical import LVM2Device

    problems: list[str] = []
    by_pv_id: dict[str, Volume] = {}
    metadata_by_vg: dict[str, dict[str, Any]] = {}
    for pv in pvs:
        dev = LVM2Device(SourceReader(pv.source))
        by_pv_id[dev.id] = pv
        meta = dev.metadata or {}
        for name, vg in meta.items():
            if isinstance(vg, dict) and "physical_volumes" in vg:
                prev = metadata_by_vg.get(name)
                if prev is None or vg.get("seqno", 0) > prev.get("seqno", 0):
                    metadata_by_vg[name] = vg
    out: list[Volume] = []
    index = 0
    for vg_name, vg in sorted(metadata_by_vg.items()):
        extent = int(vg["extent_size"]) * SECTOR
        pv_map: dict[str, tuple[Volume, int]] = {}
        for pv_name, pv in vg.get("physical_volumes", {}).items():
            part = by_pv_id.get(str(pv["id"]).replace("-", ""))
            if part is not None:
                pv_map[pv_name] = (part, int(pv["pe_start"]) * SECTOR)
        for lv_name, lv in sorted(vg.get("logical_volumes", {}).items()):
            if "VISIBLE" not in lv.get("status", []):
                continue
            index += 1
            try:
                runs = _lv_runs(lv, extent, pv_map)
            except ValueError as exc:
                problems.append(f"logical volume {vg_name}/{lv_name}: {exc}")
                continue
            source = MappedSource(disk, runs)
            merged = _merge([(r.parent_offset, r.length) for r in runs if r.parent_offset is not None])
            out.append(
                Volume(
                    index=index,
                    scheme="lvm",
                    start=runs[0].parent_offset or 0,
                    size=source.size,
                    type="LVM logical volume",
                    type_id="lvm",
                    name=f"{vg_name}/{lv_name}",
                    uuid=str(lv.get("id", "")),
                    extents=tuple(merged),
                    source=source,
                )
            )
    return out, problems


def _lv_runs(lv: dict[str, Any], extent: int, pv_map: dict[str, tuple[Volume, int]]) -> list[Run]:
    segments = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
    segments.sort(key=lambda s: int(s["start_extent"]))
    runs: list[Run] = []
    pos = 0
    for seg in segments:
        kind = seg.get("type")
        length = int(seg["extent_count"]) * extent
        if int(seg["start_extent"]) * extent != pos:
            raise ValueError("segments leave a gap")
        if kind == "striped" and int(seg.get("stripe_count", 1)) == 1:
            pv_name, pe = seg["stripes"][0], int(seg["stripes"][1])
            if pv_name not in pv_map:
                raise ValueError(f"physical volume {pv_name} is not on this disk")
            part, pe_start = pv_map[pv_name]
            vol_off = pe_start + pe * extent
            if vol_off + length > part.size:
                raise ValueError("segment runs past the end of its physical volume")
            disk_ranges = part.disk_ranges(vol_off, length)
            for d_off, d_len in disk_ranges:
                runs.append(Run(pos, d_len, d_off))
                pos += d_len
        elif kind == "zero":
            runs.append(Run(pos, length, None))
            pos += length
        else:
            raise ValueError(f"unsupported segment type {kind!r} (only linear LVs are read)")
    if not runs:
        raise ValueError("no segments")
    return runs


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= off:
            prev_off, prev_len = out[-1]
            out[-1] = (prev_off, max(prev_len, off + length - prev_off))
        else:
            out.append((off, length))
    return out
