"""Errors raised while interpreting a guest disk.

Why typed errors with a plain-language ``reason``: the FUSE view shows a volume it cannot open as
a directory holding a note, and ``ihb restore-file`` prints one line. Both need to say *why* (the
volume is LUKS-encrypted, the file system is unknown, the superblock is damaged) without a
traceback. Path-level problems inside a readable file system (no such file, not a directory)
are raised as the standard ``OSError`` subclasses instead, because the FUSE adapter maps
``OSError.errno`` to ``FUSEError`` in one place.
"""

from __future__ import annotations

from repo.errors import IhbError

__all__ = [
    "DamagedFilesystem",
    "EncryptedVolume",
    "GuestDiskError",
    "PartitionTableError",
    "UnsupportedFilesystem",
]


class GuestDiskError(IhbError):
    """The contents of a VM disk image could not be interpreted."""

    exit_code = 50

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedFilesystem(GuestDiskError):
    """The volume holds no file system that guestfs can read (unknown, swap, btrfs, ...)."""

    exit_code = 51


class EncryptedVolume(GuestDiskError):
    """The volume is encrypted (LUKS, BitLocker); its files cannot be read without the key."""

    exit_code = 52


class DamagedFilesystem(GuestDiskError):
    """The file system was recognised but its metadata is inconsistent or unreadable."""

    exit_code = 53


class PartitionTableError(GuestDiskError):
    """The partition table is present but unusable (bad GPT in both copies, looping EBR chain)."""

    exit_code = 54
