"""One call from "a VM disk image" to "its volumes, each with a file system or a reason why not".

Why: the FUSE view, ``ihb restore-file`` and the catalog indexer all need the same thing - a
stable, human-readable tree of what is inside a disk - and must show unreadable volumes (LUKS,
swap, damaged) as an explanation instead of failing the whole disk. Names are derived only from
the partition table and the file-system type, so the same backup always produces the same tree:

* ``p1-vfat``, ``p2-ext4``, ``p3-luks`` ... one per partition (Linux partition numbers);
* ``fs`` when the disk has no partition table and holds a file system directly;
* ``lvm-<vg>-<lv>-<type>`` for each logical volume of an LVM2 physical volume on the disk
  (the PV's own partition is listed as ``pN-lvm`` with a note).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from repo.guestfs.errors import EncryptedVolume, GuestDiskError
from repo.guestfs.filesystems import GuestFS, open_filesystem
from repo.guestfs.source import ByteSource
from repo.guestfs.volumes import Volume, find_volumes, is_lvm_pv

__all__ = ["DiskVolume", "GuestDisk", "open_disk"]

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass
class DiskVolume:
    """A volume and the outcome of opening it: exactly one of ``fs`` / ``error`` is set."""

    volume: Volume
    name: str
    fs: GuestFS[Any] | None = None
    error: GuestDiskError | None = None

    @property
    def reason(self) -> str | None:
        """Why the volume has no readable file system, in one sentence (``None`` if it has one)."""
        return self.error.reason if self.error is not None else None

    @property
    def label(self) -> str:
        return self.fs.label if self.fs is not None else ""

    def note(self) -> str:
        """Text for the note file the FUSE view places in an unreadable volume's directory."""
        v = self.volume
        lines = [
            f"volume: {self.name}",
            f"partition: {v.index} ({v.scheme}), type {v.type}" + (f", name {v.name!r}" if v.name else ""),
            f"disk bytes: {v.start}-{v.start + v.size} ({v.size} bytes)",
        ]
        if self.error is not None:
            lines.append(f"not readable: {self.error.reason}")
        elif self.fs is not None:
            lines.append(f"file system: {self.fs.kind}, label {self.fs.label!r}, uuid {self.fs.uuid}")
            lines.extend(f"warning: {w}" for w in self.fs.warnings)
        return "\n".join(lines) + "\n"


@dataclass
class GuestDisk:
    """The interpreted disk: partition scheme, volumes in tree order, and disk-level notes."""

    source: ByteSource
    scheme: str
    volumes: list[DiskVolume]
    problems: list[str] = field(default_factory=list)

    def volume(self, name: str) -> DiskVolume:
        """The volume with tree name ``name``; ``KeyError`` if there is none."""
        for dv in self.volumes:
            if dv.name == name:
                return dv
        raise KeyError(name)

    def filesystems(self) -> list[DiskVolume]:
        """Volumes that opened as a file system."""
        return [dv for dv in self.volumes if dv.fs is not None]


def open_disk(source: ByteSource) -> GuestDisk:
    """Find the volumes of ``source`` and open every file system that can be opened.

    Never raises for a single bad volume: its :class:`DiskVolume` carries the error instead.
    A damaged partition table is reported as a :class:`~repo.guestfs.errors.GuestDiskError`.
    """
    table = find_volumes(source)
    out: list[DiskVolume] = []
    used: set[str] = set()
    for vol in table.volumes:
        fs: GuestFS[Any] | None = None
        error: GuestDiskError | None = None
        kind: str
        if vol.scheme != "lvm" and is_lvm_pv(vol.source):
            kind = "lvm"
            error = GuestDiskError("LVM2 physical volume; its logical volumes are listed separately")
        else:
            try:
                fs = open_filesystem(vol.source)
                kind = fs.kind
            except EncryptedVolume as exc:
                error, kind = exc, "luks" if "LUKS" in exc.reason else "encrypted"
            except GuestDiskError as exc:
                error, kind = exc, _kind_from_reason(exc.reason)
        out.append(DiskVolume(vol, _unique(_base_name(vol, kind), used), fs, error))
    return GuestDisk(source, table.scheme, out, list(table.problems))


def _base_name(vol: Volume, kind: str) -> str:
    if vol.scheme == "none":
        return "fs" if kind not in ("unknown", "empty") else f"disk-{kind}"
    if vol.scheme == "lvm":
        return "lvm-" + _UNSAFE.sub("_", vol.name.replace("/", "-")) + f"-{kind}"
    return f"p{vol.index}-{kind}"


def _kind_from_reason(reason: str) -> str:
    low = reason.lower()
    for word in ("swap", "btrfs", "reiserfs", "empty", "lvm"):
        if word in low:
            return word
    if low.startswith("damaged"):
        return "damaged"
    return "unknown"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 2
    while candidate in used:
        candidate = f"{name}.{n}"
        n += 1
    used.add(candidate)
    return candidate
