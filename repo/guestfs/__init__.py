"""Read the partitions and file systems inside a raw VM disk image, in-process and read-only.

Why in-process: the appliance kernel has no vfat/ntfs drivers, no partition scanning on loop
devices and no module loading, and a disk image in the repository is not a block device anyway.
Everything here reads through a :class:`ByteSource` (``size`` + ``read_at``), so the same code
serves the FUSE ``<disk>.files/`` view, ``ihb restore-file``, the catalog indexer and the VM
backup's free-block skipping (:func:`find_free_extents`).

Layers, each importing only those before it::

    source      ByteSource protocol, file/slice/mapped sources, cached file-object adapter
    errors      GuestDiskError and subclasses carrying a one-line ``reason``
    volumes     GPT / MBR / LVM2 / whole-disk detection -> Volume
    filesystems ext2/3/4, XFS, FAT, exFAT, NTFS behind one GuestFS API (dissect underneath)
    disk        open_disk(): volumes + file system or reason, stable tree names
    freemap     free (unallocated) disk extents per the guest's own allocation metadata

Layer rule (as for all of ``repo``): nothing here imports ``fusefs``, ``appliance``, pyfuse3 or
click.
"""

from __future__ import annotations

from repo.guestfs.disk import DiskVolume, GuestDisk, open_disk
from repo.guestfs.errors import (
    DamagedFilesystem,
    EncryptedVolume,
    GuestDiskError,
    PartitionTableError,
    UnsupportedFilesystem,
)
from repo.guestfs.filesystems import (
    FileType,
    GuestFile,
    GuestFS,
    GuestStat,
    detect_filesystem,
    open_filesystem,
)
from repo.guestfs.freemap import FreeMap, VolumeFreeInfo, align_extents, find_free_extents
from repo.guestfs.source import ByteSource, FileByteSource, MappedSource, SliceSource, SourceReader
from repo.guestfs.volumes import PartitionTable, Volume, find_volumes

__all__ = [
    "ByteSource",
    "DamagedFilesystem",
    "DiskVolume",
    "EncryptedVolume",
    "FileByteSource",
    "FileType",
    "FreeMap",
    "GuestDisk",
    "GuestDiskError",
    "GuestFS",
    "GuestFile",
    "GuestStat",
    "MappedSource",
    "PartitionTable",
    "PartitionTableError",
    "SliceSource",
    "SourceReader",
    "UnsupportedFilesystem",
    "Volume",
    "VolumeFreeInfo",
    "align_extents",
    "detect_filesystem",
    "find_free_extents",
    "find_volumes",
    "open_disk",
    "open_filesystem",
]
