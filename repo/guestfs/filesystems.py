"""A uniform read-only view of the file systems found inside guest volumes.

Why: three consumers (the FUSE ``<disk>.files/`` view, ``ihb restore-file`` and the catalog
indexer) want one small API - stat, list, read, readlink, xattrs - whatever the guest used:
ext2/3/4, XFS, FAT12/16/32, exFAT or NTFS. dissect parses the on-disk formats; this module
hides its per-format object models, fixes the gaps that matter for a faithful restore
(preallocated XFS extents and NTFS data past ValidDataLength read as zeroes, FAT 8.3 case
flags, 32-bit ext4 uid/gid, device numbers) and makes the result safe to use from threads.

Concurrency: dissect's parsers share one seekable file object per file system, so every call
into dissect runs under a per-file-system lock. File data is the exception: :meth:`GuestFS.open`
resolves the file's extents once and :meth:`GuestFile.read_at` then reads them straight from the
thread-safe :class:`~repo.guestfs.source.ByteSource`, so concurrent reads of big files neither
serialise nor pass through dissect's small-block streams.

Paths are POSIX-style (``/etc/hostname``) on every file system. Names that are not valid UTF-8
come back with ``surrogateescape`` (as ``os.listdir`` does), so ``os.fsencode`` restores the raw
bytes. Intermediate symlinks are followed inside the guest (absolute targets resolve against the
guest root); the last component is not (``stat`` is ``lstat``).
"""

from __future__ import annotations

import bisect
import calendar
import datetime as _dt
import enum
import errno
import logging
import os
import stat as _stat
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from repo.guestfs.errors import DamagedFilesystem, EncryptedVolume, GuestDiskError, UnsupportedFilesystem
from repo.guestfs.source import ByteSource, SourceReader

__all__ = [
    "FileType",
    "GuestFS",
    "GuestFile",
    "GuestStat",
    "detect_filesystem",
    "open_filesystem",
]

log = logging.getLogger(__name__)

#: Directories whose children map is kept for O(1) lookups. A FUSE ``readdir`` followed by one
#: ``lookup`` per entry would otherwise rescan the directory for every name.
DIR_CACHE_ENTRIES = 256
#: Directories with more entries than this are not cached (memory bound); lookups then scan.
DIR_CACHE_MAX_CHILDREN = 100_000
#: Symlinks followed while resolving one path before giving up with ``ELOOP`` (Linux uses 40).
MAX_SYMLINK_HOPS = 40


class FileType(enum.Enum):
    """The POSIX file type; ``value`` is the ``S_IFMT`` bits."""

    REG = _stat.S_IFREG
    DIR = _stat.S_IFDIR
    LNK = _stat.S_IFLNK
    CHR = _stat.S_IFCHR
    BLK = _stat.S_IFBLK
    FIFO = _stat.S_IFIFO
    SOCK = _stat.S_IFSOCK

    @classmethod
    def from_mode(cls, mode: int) -> FileType:
        try:
            return cls(_stat.S_IFMT(mode))
        except ValueError:
            return cls.REG


@dataclass(frozen=True, slots=True)
class GuestStat:
    """Attributes of one file inside the guest, in host conventions (ns timestamps, full st_mode).

    File systems without POSIX owners (FAT, exFAT, NTFS) report uid/gid 0 and a fixed mode
    (0755 directories, 0644 files, 0444 read-only files). ``ino`` is the file system's own
    inode/MFT number where it has one; FAT has none, so a stable number is derived from the
    directory position.
    """

    type: FileType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    nlink: int
    ino: int
    symlink_target: str | None = None
    rdev: int = 0

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIR

    @property
    def is_symlink(self) -> bool:
        return self.type is FileType.LNK

    @property
    def is_file(self) -> bool:
        return self.type is FileType.REG


class GuestFile(ABC):
    """Random-access reader of one file's contents; ``read_at`` is safe from several threads."""

    size: int

    @abstractmethod
    def read_at(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` (short only at end of file)."""

    def read_all(self) -> bytes:
        """The whole file; for small files and tests."""
        return self.read_at(0, self.size)

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield the file in order, ``chunk_size`` bytes at a time (for restore and hashing)."""
        for off in range(0, self.size, chunk_size):
            yield self.read_at(off, min(chunk_size, self.size - off))


class ExtentFile(GuestFile):
    """A file described by extents on its volume: reads go straight to the byte source.

    ``extents`` is a sorted list of ``(file_offset, length, volume_offset)``; ``volume_offset``
    ``None`` is a hole (sparse, unwritten or beyond the valid data length) that reads as zeroes.
    Parts of the file not covered by any extent also read as zeroes.
    """

    def __init__(self, source: ByteSource, size: int, extents: Sequence[tuple[int, int, int | None]]) -> None:
        self.source = source
        self.size = size
        self.extents = list(extents)
        self._starts = [e[0] for e in self.extents]

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        out = bytearray()
        pos = offset
        idx = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while pos < end:
            if idx < len(self.extents):
                f_off, length, v_off = self.extents[idx]
            else:
                f_off, length, v_off = end, 0, None
            if pos < f_off:  # gap before this extent: zeroes
                take = min(end, f_off) - pos
                out += bytes(take)
                pos += take
                continue
            if pos >= f_off + length:
                idx += 1
                continue
            take = min(end, f_off + length) - pos
            if v_off is None:
                out += bytes(take)
            else:
                data = self.source.read_at(v_off + pos - f_off, take)
                if len(data) != take:
                    raise OSError(errno.EIO, "file extent lies beyond the end of the volume")
                out += data
            pos += take
            idx += 1
        return bytes(out)


class BytesFile(GuestFile):
    """File contents held in memory (inline/resident data, small symlink bodies)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        return self._data[offset : offset + size]


class LockedStreamFile(GuestFile):
    """Fallback for data only dissect can decode (NTFS compression): a stream behind the fs lock."""

    def __init__(self, stream: Any, size: int, lock: threading.RLock) -> None:
        self._stream = stream
        self.size = size
        self._lock = lock

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        size = max(0, min(size, self.size - offset))
        with self._lock:
            try:
                self._stream.seek(offset)
                return bytes(self._stream.read(size))
            except (EOFError, ValueError, KeyError, IndexError, struct.error) as exc:
                raise OSError(errno.EIO, f"cannot decode file data: {exc}") from exc


N = TypeVar("N")


class GuestFS(ABC, Generic[N]):
    """A read-only file system inside a guest volume.

    Subclasses implement the ``_``-prefixed node primitives; path resolution, symlink handling,
    the directory cache and locking live here once.
    """

    #: Short type name used in tree names (``p1-ext4``): ext2/ext3/ext4, xfs, vfat, exfat, ntfs.
    kind: str = ""
    #: Whether names compare case-insensitively (FAT, exFAT, NTFS): lookups fall back to casefold.
    case_insensitive: ClassVar[bool] = False

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.label = ""
        self.uuid = ""
        self.block_size = 0
        #: Conditions worth telling the user (e.g. "journal needs recovery"); never fatal.
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._dir_cache: OrderedDict[int, dict[str, N]] = OrderedDict()

    # -- public API ------------------------------------------------------------------------------

    def stat(self, path: str) -> GuestStat:
        """``lstat`` of ``path``; raises ``FileNotFoundError``/``NotADirectoryError``/``OSError``."""
        with self._lock:
            return self._stat(self._resolve(path, follow_last=False))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except OSError:
            return False
        return True

    def listdir(self, path: str = "/") -> Iterator[str]:
        """Yield the names in a directory (no ``.``/``..``), streaming for large directories.

        The generator takes the lock per step, so other threads may use the file system
        between entries.
        """
        with self._lock:
            node = self._resolve(path, follow_last=True)
            st = self._stat(node)
            if not st.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
            cached = self._dir_cache.get(st.ino)
            if cached is not None:
                self._dir_cache.move_to_end(st.ino)
                names = list(cached)
        if cached is not None:
            yield from names
            return
        yield from self._stream_dir(node, st.ino)

    def scandir(self, path: str = "/") -> Iterator[tuple[str, GuestStat]]:
        """Yield ``(name, stat)`` for each entry: one pass for indexers and ``ls -l``-style views."""
        base = path.rstrip("/")
        for name in self.listdir(path):
            try:
                yield name, self.stat(f"{base}/{name}")
            except OSError as exc:
                log.warning("cannot stat %s/%s: %s", base, name, exc)

    def walk(self, top: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """``os.walk``-like traversal (top-down, symlinks to directories not followed)."""
        stack = [top]
        while stack:
            current = stack.pop()
            dirs: list[str] = []
            files: list[str] = []
            for name, st in self.scandir(current):
                (dirs if st.is_dir else files).append(name)
            yield current, dirs, files
            base = current.rstrip("/")
            stack.extend(f"{base}/{d}" for d in reversed(dirs))

    def open(self, path: str) -> GuestFile:
        """Open a regular file (symlinks followed) for random-access reading."""
        with self._lock:
            node = self._resolve(path, follow_last=True)
            st = self._stat(node)
            if st.is_dir:
                raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
            if st.type is not FileType.REG:
                raise OSError(errno.EINVAL, "Not a regular file", path)
            return self._open(node, st)

    def readlink(self, path: str) -> str:
        """Target of a symlink, as stored in the guest (``/``-separated)."""
        with self._lock:
            node = self._resolve(path, follow_last=False)
            st = self._stat(node)
            if st.symlink_target is None:
                raise OSError(errno.EINVAL, "Not a symbolic link", path)
            return st.symlink_target

    def xattrs(self, path: str) -> dict[str, bytes]:
        """Extended attributes (``user.``, ``security.``, ``trusted.``, ``system.`` names); ``{}`` if none."""
        with self._lock:
            return self._xattrs(self._resolve(path, follow_last=False))

    # -- primitives for subclasses ---------------------------------------------------------------

    @abstractmethod
    def _root(self) -> N: ...

    @abstractmethod
    def _children(self, node: N) -> Iterator[tuple[str, N]]:
        """Yield ``(name, child)`` of a directory node, excluding ``.`` and ``..``."""

    @abstractmethod
    def _stat(self, node: N) -> GuestStat: ...

    @abstractmethod
    def _open(self, node: N, st: GuestStat) -> GuestFile: ...

    def _xattrs(self, node: N) -> dict[str, bytes]:
        return {}

    # -- internals -------------------------------------------------------------------------------

    def _stream_dir(self, node: N, ino: int) -> Iterator[str]:
        children: dict[str, N] | None = {}
        gen = self._children(node)
        while True:
            with self._lock:
                try:
                    name, child = next(gen)
                except StopIteration:
                    break
                except (EOFError, ValueError, KeyError, IndexError, struct.error) as exc:
                    raise OSError(errno.EIO, f"damaged directory: {exc}") from exc
                if children is not None:
                    children[name] = child
                    if len(children) > DIR_CACHE_MAX_CHILDREN:
                        children = None
            yield name
        if children is not None:
            with self._lock:
                self._remember_dir(ino, children)

    def _remember_dir(self, ino: int, children: dict[str, N]) -> None:
        self._dir_cache[ino] = children
        self._dir_cache.move_to_end(ino)
        while len(self._dir_cache) > DIR_CACHE_ENTRIES:
            self._dir_cache.popitem(last=False)

    def _lookup(self, node: N, st: GuestStat, name: str) -> N | None:
        children = self._dir_cache.get(st.ino)
        if children is None:
            children = {}
            try:
                for child_name, child in self._children(node):
                    children[child_name] = child
            except (EOFError, ValueError, KeyError, IndexError, struct.error) as exc:
                raise OSError(errno.EIO, f"damaged directory: {exc}") from exc
            if len(children) <= DIR_CACHE_MAX_CHILDREN:
                self._remember_dir(st.ino, children)
        else:
            self._dir_cache.move_to_end(st.ino)
        found = children.get(name)
        if found is None and self.case_insensitive:
            folded = name.casefold()
            for child_name, child in children.items():
                if child_name.casefold() == folded:
                    return child
        return found

    def _resolve(self, path: str, *, follow_last: bool) -> N:
        if not isinstance(path, str):
            raise TypeError("path must be str")
        pending = [p for p in path.split("/") if p not in ("", ".")]
        pending.reverse()
        stack: list[N] = []  # ancestors of the current node, for ".."
        node = self._root()
        hops = 0
        walked: list[str] = []
        while pending:
            part = pending.pop()
            st = self._stat(node)
            if not st.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", "/" + "/".join(walked))
            if part == "..":
                if stack:
                    node = stack.pop()
                    walked.pop()
                continue
            child = self._lookup(node, st, part)
            if child is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            child_st = self._stat(child)
            if child_st.symlink_target is not None and (pending or follow_last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise OSError(errno.ELOOP, "Too many levels of symbolic links", path)
                target = child_st.symlink_target
                parts = [p for p in target.split("/") if p not in ("", ".")]
                if target.startswith("/"):
                    node, stack, walked = self._root(), [], []
                pending.extend(reversed(parts))
                continue
            stack.append(node)
            walked.append(part)
            node = child
        return node


# === ext2/3/4 =====================================================================================

_EXT_INCOMPAT_RECOVER = 0x4
_EXT_INCOMPAT_JOURNAL_DEV = 0x8
_EXT_INCOMPAT_INLINE_DATA = 0x8000
_EXT_INCOMPAT_ENCRYPT = 0x10000
_EXT_INCOMPAT_CASEFOLD = 0x20000
_EXT_RO_COMPAT_BIGALLOC = 0x200
_EXT_RO_COMPAT_METADATA_CSUM = 0x400
_EXT_INLINE_DATA_FL = 0x10000000
_EXT_ENCRYPT_FL = 0x800


def crc32c_raw(seed: int, data: bytes) -> int:
    """Linux ``crc32c_le(seed, data)``: CRC32C without the final inversion, as ext4/jbd2 use it."""
    return (~_crc32c()(data, (~seed) & 0xFFFFFFFF)) & 0xFFFFFFFF


def _crc32c() -> Callable[[bytes, int], int]:
    # dissect.util.hash rebinds the name ``crc32c`` between the native function and the
    # pure-Python module depending on import order; pick explicitly.
    from dissect.util import hash as _hash

    native = getattr(_hash, "crc32c_native", None)
    if native is not None:
        return getattr(native, "crc32c", native)  # type: ignore[no-any-return]
    from dissect.util.hash.crc32c import crc32c

    return crc32c


class ExtFS(GuestFS[Any]):
    """ext2/ext3/ext4 through dissect.extfs."""

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        from dissect.extfs import ExtFS as _DissectExtFS
        from dissect.extfs.c_ext import EXT2, EXT3

        raw_sb = source.read_at(1024, 1024)
        if len(raw_sb) < 1024 or raw_sb[56:58] != b"\x53\xef":
            raise UnsupportedFilesystem("not an ext2/3/4 file system")
        incompat, ro_compat = struct.unpack_from("<II", raw_sb, 96)
        if ro_compat & _EXT_RO_COMPAT_METADATA_CSUM:
            stored = struct.unpack_from("<I", raw_sb, 1020)[0]
            if crc32c_raw(0xFFFFFFFF, raw_sb[:1020]) != stored:
                raise DamagedFilesystem("damaged ext4 superblock: checksum mismatch")
        if ro_compat & _EXT_RO_COMPAT_BIGALLOC:
            raise UnsupportedFilesystem("ext4 with the bigalloc feature is not supported")
        if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
            raise UnsupportedFilesystem("external ext3/ext4 journal device (no files on it)")
        self._reader = SourceReader(source)
        try:
            self._fs = _DissectExtFS(self._reader)
        except (EOFError, ValueError, KeyError, IndexError, struct.error, NotImplementedError) as exc:
            raise DamagedFilesystem(f"damaged ext superblock: {exc}") from exc
        except Exception as exc:  # dissect.extfs.exceptions.Error and friends
            raise DamagedFilesystem(f"damaged ext superblock: {exc}") from exc
        fs = self._fs
        self.kind = {EXT2: "ext2", EXT3: "ext3"}.get(fs.type, "ext4")
        self.label = fs.volume_name
        self.uuid = str(fs.uuid)
        self.block_size = fs.block_size
        self._large_inodes = fs.sb.s_inode_size > 128
        if incompat & _EXT_INCOMPAT_RECOVER:
            self.warnings.append(
                "the journal needs recovery (image of a running system): changes from the last "
                "seconds before the snapshot may be missing"
            )
        if incompat & _EXT_INCOMPAT_ENCRYPT:
            self.warnings.append(
                "some directories may use ext4 encryption; their names and data are unreadable"
            )
        if incompat & _EXT_INCOMPAT_CASEFOLD:
            self.warnings.append("case-insensitive directories are listed but looked up case-sensitively")
        try:
            self._stat(fs.root)
        except Exception as exc:
            raise DamagedFilesystem(f"damaged ext file system: root directory unreadable: {exc}") from exc

    def _root(self) -> Any:
        return self._fs.root

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        for child in node.iterdir():
            if child.filename in (".", ".."):
                continue
            yield child.filename, child

    def _stat(self, node: Any) -> GuestStat:
        try:
            ino = node.inode
            mode = ino.i_mode
            ftype = FileType.from_mode(mode)
            uid = ino.i_uid | (ino.i_uid_high << 16)
            gid = ino.i_gid | (ino.i_gid_high << 16)
            target = None
            rdev = 0
            if ftype is FileType.LNK:
                target = self._symlink_target(node)
            elif ftype in (FileType.CHR, FileType.BLK):
                rdev = _ext_rdev(bytes(ino.i_block))
            return GuestStat(
                type=ftype,
                mode=mode,
                uid=uid,
                gid=gid,
                size=node.size,
                mtime_ns=node.mtime_ns,
                atime_ns=node.atime_ns,
                ctime_ns=node.ctime_ns,
                nlink=ino.i_links_count,
                ino=node.inum,
                symlink_target=target,
                rdev=rdev,
            )
        except OSError:
            raise
        except Exception as exc:
            raise OSError(errno.EIO, f"damaged inode {node.inum}: {exc}") from exc

    def _symlink_target(self, node: Any) -> str:
        ino = node.inode
        size = node.size
        ea_blocks = (self.block_size >> 9) if ino.i_file_acl_lo else 0
        if size < 60 and not ino.i_flags & _EXT_INLINE_DATA_FL and ino.i_blocks_lo - ea_blocks == 0:
            # fast symlink: the target lives in i_block itself (Linux ext4_inode_is_fast_symlink)
            return bytes(ino.i_block)[:size].decode(errors="surrogateescape")
        return self._open(node, None).read_all().decode(errors="surrogateescape")

    def _open(self, node: Any, st: GuestStat | None) -> GuestFile:
        ino = node.inode
        size = node.size
        if ino.i_flags & _EXT_ENCRYPT_FL:
            raise OSError(errno.EACCES, "file is encrypted with ext4 encryption")
        if ino.i_flags & _EXT_INLINE_DATA_FL:
            # i_block holds the first 60 bytes; the rest is the "system.data" xattr.
            data = bytes(ino.i_block)[: min(size, 60)]
            if size > 60:
                extra = {x.name: x.value for x in node.xattr}.get("system.data", b"")
                data += bytes(extra)
            return BytesFile(data[:size])
        bs = self.block_size
        try:
            runs = node.dataruns()
        except Exception as exc:
            raise OSError(errno.EIO, f"damaged extent tree in inode {node.inum}: {exc}") from exc
        return ExtentFile(self.source, size, _runs_to_extents(runs, bs))

    def _xattrs(self, node: Any) -> dict[str, bytes]:
        try:
            return {x.name: bytes(x.value) for x in node.xattr if x.name != "system.data"}
        except Exception as exc:
            raise OSError(errno.EIO, f"damaged extended attributes in inode {node.inum}: {exc}") from exc


def _ext_rdev(i_block: bytes) -> int:
    """Decode the device number Linux stores in ``i_block`` (old 8:8 or new 12:20 encoding)."""
    old, new = struct.unpack_from("<II", i_block)
    if old:
        return os.makedev((old >> 8) & 0xFF, old & 0xFF)
    return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def _runs_to_extents(
    runs: Sequence[tuple[int | None, int]], block_size: int
) -> list[tuple[int, int, int | None]]:
    """dissect runlists ``(block or None, count)`` -> ``(file_offset, length, volume_offset)``."""
    out: list[tuple[int, int, int | None]] = []
    pos = 0
    for block, count in runs:
        length = count * block_size
        if block is None or block == 0:  # block 0 is never file data: a hole in an indirect map
            out.append((pos, length, None))
        else:
            out.append((pos, length, block * block_size))
        pos += length
    return out


# === XFS ==========================================================================================

_XFS_ATTR_ROOT = 0x02
_XFS_ATTR_SECURE = 0x04
_XFS_ATTR_INCOMPLETE = 0x80


class XfsFS(GuestFS[Any]):
    """XFS (v4 and v5) through dissect.xfs."""

    kind = "xfs"

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        from dissect.xfs import XFS

        if source.read_at(0, 4) != b"XFSB":
            raise UnsupportedFilesystem("not an XFS file system")
        self._reader = SourceReader(source)
        try:
            self._fs = XFS(self._reader)
            root = self._fs.root
            _ = root.inode
        except Exception as exc:
            raise DamagedFilesystem(f"damaged xfs superblock: {exc}") from exc
        sb = self._fs.sb
        self.label = self._fs.name
        self.uuid = str(self._fs.uuid)
        self.block_size = self._fs.block_size
        self._agblocks = sb.sb_agblocks
        self._agblklog = sb.sb_agblklog

    def _root(self) -> Any:
        return self._fs.root

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        for child in node.iterdir():
            if child.filename in (".", ".."):
                continue
            yield child.filename, child

    def _stat(self, node: Any) -> GuestStat:
        try:
            d = node.inode
            mode = d.di_mode
            ftype = FileType.from_mode(mode)
            target = None
            rdev = 0
            if ftype is FileType.LNK:
                target = node.link
            elif ftype in (FileType.CHR, FileType.BLK):
                raw = node.datafork().read(4)
                dev = struct.unpack(">I", raw)[0] if len(raw) == 4 else 0
                rdev = os.makedev(dev >> 18, dev & 0x3FFFF)
            nlink = d.di_nlink if d.di_version >= 2 else d.di_onlink
            return GuestStat(
                type=ftype,
                mode=mode,
                uid=d.di_uid,
                gid=d.di_gid,
                size=d.di_size,
                mtime_ns=node.mtime_ns,
                atime_ns=node.atime_ns,
                ctime_ns=node.ctime_ns,
                nlink=nlink,
                ino=node.inum,
                symlink_target=target,
                rdev=rdev,
            )
        except OSError:
            raise
        except Exception as exc:
            raise OSError(errno.EIO, f"damaged inode {node.inum}: {exc}") from exc

    def _open(self, node: Any, st: GuestStat) -> GuestFile:
        from dissect.xfs.c_xfs import c_xfs

        fmt = node.inode.di_format
        if fmt == c_xfs.xfs_dinode_fmt.XFS_DINODE_FMT_LOCAL:
            return BytesFile(bytes(node.datafork().read(st.size)))
        bs = self.block_size
        extents: list[tuple[int, int, int | None]] = []
        try:
            for file_block, fsblock, count, unwritten in node._iter_blocks():
                agno, agbno = fsblock >> self._agblklog, fsblock & ((1 << self._agblklog) - 1)
                linear = agno * self._agblocks + agbno
                # Unwritten (preallocated) extents must read as zeroes, not as stale disk content.
                extents.append((file_block * bs, count * bs, None if unwritten else linear * bs))
        except Exception as exc:
            raise OSError(errno.EIO, f"damaged extent list in inode {node.inum}: {exc}") from exc
        extents.sort()
        return ExtentFile(self.source, st.size, extents)

    def _xattrs(self, node: Any) -> dict[str, bytes]:
        d = node.inode
        if not d.di_forkoff:
            return {}
        if d.di_aformat != 1:  # only the in-inode "shortform" attribute fork is decoded
            log.info("xfs inode %d keeps its xattrs in blocks; not decoded", node.inum)
            return {}
        buf = node.attrfork().read()
        if len(buf) < 4:
            return {}
        totsize, count = struct.unpack_from(">HB", buf)
        out: dict[str, bytes] = {}
        pos = 4
        for _ in range(count):
            if pos + 3 > min(len(buf), totsize):
                break
            namelen, valuelen, flags = buf[pos], buf[pos + 1], buf[pos + 2]
            name = buf[pos + 3 : pos + 3 + namelen].decode(errors="surrogateescape")
            value = buf[pos + 3 + namelen : pos + 3 + namelen + valuelen]
            pos += 3 + namelen + valuelen
            if flags & _XFS_ATTR_INCOMPLETE:
                continue
            prefix = (
                "trusted." if flags & _XFS_ATTR_ROOT else "security." if flags & _XFS_ATTR_SECURE else "user."
            )
            out[prefix + name] = bytes(value)
        return out


# === FAT12/16/32 ==================================================================================


@dataclass(slots=True)
class _FatNode:
    entry: Any
    ino: int


def _fat_time(date: int, time: int = 0, tenths: int = 0) -> int:
    """A FAT local date/time as Unix ns, taking local time as UTC (Linux ``vfat`` with ``tz=UTC``)."""
    if not date:
        return 0
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, sec2 = time >> 11, (time >> 5) & 0x3F, time & 0x1F
    try:
        when = _dt.datetime(year, max(month, 1), max(day, 1), hour, minute, min(sec2 * 2, 59))
    except ValueError:
        return 0
    return calendar.timegm(when.timetuple()) * 1_000_000_000 + tenths * 10_000_000


class FatFS(GuestFS[_FatNode]):
    """FAT12/16/32 (VFAT long names) through dissect.fat."""

    kind = "vfat"
    case_insensitive = True

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        from dissect.fat import fat as _fat

        self._reader = SourceReader(source)
        try:
            self._fs = _fat.FATFS(self._reader)
        except Exception as exc:
            raise DamagedFilesystem(f"damaged FAT boot sector: {exc}") from exc
        fs = self._fs
        self.variant = fs.type.name.lower()  # fat12 / fat16 / fat32
        self.label = fs.volume_label if fs.volume_label != "NO NAME" else ""
        self.uuid = f"{int(fs.volume_id, 16):08X}"[:4] + "-" + f"{int(fs.volume_id, 16):08X}"[4:]
        self.block_size = fs.cluster_size
        self._data_offset = fs.first_data_sector * fs.sector_size
        self._root_node = _FatNode(fs.root, 1)
        self._label_from_root()

    def _label_from_root(self) -> None:
        try:
            for entry in self._fs.root.iterdir():
                if entry.is_volume_id() and not entry.is_directory():
                    self.label = entry.short_name.replace(".", "").strip() or self.label
                    return
        except Exception as exc:
            raise DamagedFilesystem(f"damaged FAT root directory: {exc}") from exc

    def _root(self) -> _FatNode:
        return self._root_node

    def _children(self, node: _FatNode) -> Iterator[tuple[str, _FatNode]]:
        for index, entry in enumerate(node.entry.iterdir()):
            if entry.is_volume_id():
                continue
            name = _fat_name(entry)
            if name in (".", ".."):
                continue
            cluster = entry.cluster
            ino = cluster + 16 if cluster >= 2 else (1 << 40) + (node.ino << 16) + index
            yield name, _FatNode(entry, ino)

    def _stat(self, node: _FatNode) -> GuestStat:
        entry = node.entry
        if node is self._root_node:
            return GuestStat(FileType.DIR, _stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, 0, 2, 1)
        d = entry.dirent
        is_dir = entry.is_directory()
        perm = 0o755 if is_dir else (0o444 if entry.is_readonly() else 0o644)
        mtime = _fat_time(d.DIR_WrtDate, d.DIR_WrtTime)
        return GuestStat(
            type=FileType.DIR if is_dir else FileType.REG,
            mode=(_stat.S_IFDIR if is_dir else _stat.S_IFREG) | perm,
            uid=0,
            gid=0,
            size=0 if is_dir else d.DIR_FileSize,
            mtime_ns=mtime,
            atime_ns=_fat_time(d.DIR_LstAccDate) or mtime,
            ctime_ns=mtime,
            nlink=2 if is_dir else 1,
            ino=node.ino,
        )

    def _open(self, node: _FatNode, st: GuestStat) -> GuestFile:
        try:
            runs = node.entry.dataruns()
        except Exception as exc:
            raise OSError(errno.EIO, f"broken FAT cluster chain: {exc}") from exc
        cs = self._fs.cluster_size
        extents: list[tuple[int, int, int | None]] = []
        pos = 0
        for cluster_index, count in runs:
            extents.append((pos, count * cs, self._data_offset + cluster_index * cs))
            pos += count * cs
        if pos < st.size:
            raise OSError(errno.EIO, f"FAT cluster chain covers {pos} of {st.size} bytes")
        return ExtentFile(self.source, st.size, extents)


def _fat_name(entry: Any) -> str:
    """The long name if present, else the 8.3 name with the NT lower-case flags applied."""
    if entry.ldirents:
        return str(entry.name)
    raw = bytearray(entry.dirent.DIR_Name)
    if raw[0] == 0x05:
        raw[0] = 0xE5
    base = raw[:8].decode("cp437").rstrip()
    ext = raw[8:].decode("cp437").rstrip()
    flags = entry.dirent.DIR_NTRes
    if flags & 0x08:
        base = base.lower()
    if flags & 0x10:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


# === exFAT ========================================================================================


@dataclass(slots=True)
class _ExFatNode:
    name: str
    file: Any  # dissect FILE entry (metadata) or None for the root
    stream: Any
    children: Any  # OrderedDict name -> (file entry, children) for directories, None for files
    ino: int


class ExFatFS(GuestFS[_ExFatNode]):
    """exFAT through dissect.fat.exfat (which parses the whole tree when opened)."""

    kind = "exfat"
    case_insensitive = True

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        from dissect.fat import exfat as _exfat

        self._reader = SourceReader(source)
        try:
            self._fs = _exfat.ExFAT(self._reader)
        except Exception as exc:
            raise DamagedFilesystem(f"damaged exFAT boot sector: {exc}") from exc
        fs = self._fs
        self.label = str(getattr(fs, "volume_label", "") or "")
        serial = int(getattr(fs.vbr, "volume_serial", 0) or 0)
        self.uuid = f"{serial:08X}"[:4] + "-" + f"{serial:08X}"[4:]
        self.block_size = fs.cluster_size
        root = fs.files
        if len(root) == 1 and "/" in root:  # dissect wraps the tree in a synthetic "/" entry
            root = root["/"][1]
        self._root_node = _ExFatNode("", None, None, root, 1)

    def _root(self) -> _ExFatNode:
        return self._root_node

    def _children(self, node: _ExFatNode) -> Iterator[tuple[str, _ExFatNode]]:
        if node.children is None:
            return
        for name, (entry, sub) in node.children.items():
            stream = entry.stream
            cluster = stream.location if stream is not None else 0
            ino = cluster + 16 if cluster >= 2 else (1 << 40) + (node.ino << 16) + len(name)
            yield name, _ExFatNode(name, entry, stream, sub, ino)

    def _stat(self, node: _ExFatNode) -> GuestStat:
        if node.file is None:
            return GuestStat(FileType.DIR, _stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, 0, 2, 1)
        meta = node.file.metadata
        is_dir = bool(meta.attributes.directory)
        ro = bool(meta.attributes.read_only)
        perm = 0o755 if is_dir else (0o444 if ro else 0o644)
        mtime = _exfat_time(meta.modified_time, meta.modified_offset, meta.modified_timezone)
        atime = _exfat_time(meta.access_time, 0, meta.access_timezone) or mtime
        return GuestStat(
            type=FileType.DIR if is_dir else FileType.REG,
            mode=(_stat.S_IFDIR if is_dir else _stat.S_IFREG) | perm,
            uid=0,
            gid=0,
            size=0 if is_dir else node.stream.data_length,
            mtime_ns=mtime,
            atime_ns=atime,
            ctime_ns=mtime,
            nlink=2 if is_dir else 1,
            ino=node.ino,
        )

    def _open(self, node: _ExFatNode, st: GuestStat) -> GuestFile:
        stream = node.stream
        fs = self._fs
        cs = fs.cluster_size
        heap = fs.cluster_heap_sector * fs.sector_size
        valid = min(stream.valid_data_length, st.size)
        first = stream.location
        if st.size == 0 or first < 2:
            return BytesFile(b"")
        need = -(-stream.data_length // cs)
        if stream.flags.not_fragmented:
            chain_runs = [(first, need)]
        else:
            chain_runs = self._chain(first, need)
        extents: list[tuple[int, int, int | None]] = []
        pos = 0
        for cluster, count in chain_runs:
            extents.append((pos, count * cs, heap + (cluster - 2) * cs))
            pos += count * cs
        if pos < st.size:
            raise OSError(errno.EIO, f"exFAT cluster chain covers {pos} of {st.size} bytes")
        return ExtentFile(self.source, st.size, _clip_valid(extents, valid))

    def _chain(self, first: int, need: int) -> list[tuple[int, int]]:
        """Follow the FAT from ``first`` for ``need`` clusters, as ``(cluster, count)`` runs."""
        fat = self._fs.fat
        limit = self._fs.cluster_count + 2
        runs: list[tuple[int, int]] = []
        cluster = first
        for _ in range(need):
            if not 2 <= cluster < limit:
                raise OSError(errno.EIO, f"exFAT cluster chain points outside the volume ({cluster:#x})")
            if runs and runs[-1][0] + runs[-1][1] == cluster:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((cluster, 1))
            fat.seek(cluster * 4)
            cluster = struct.unpack("<I", fat.read(4))[0]
        return runs


def _exfat_time(stamp: int, centis: int, utc_offset: int) -> int:
    """exFAT timestamp (FAT date/time + 10 ms increments + UTC offset in 15-minute units)."""
    if not stamp:
        return 0
    base = _fat_time(stamp >> 16, stamp & 0xFFFF) + centis * 10_000_000
    if utc_offset & 0x80:
        quarter = utc_offset & 0x7F
        if quarter & 0x40:
            quarter -= 0x80
        base -= quarter * 15 * 60 * 1_000_000_000
    return base


def _clip_valid(extents: list[tuple[int, int, int | None]], valid: int) -> list[tuple[int, int, int | None]]:
    """Turn everything past ``valid`` bytes into holes: preallocated space holds stale data."""
    out: list[tuple[int, int, int | None]] = []
    for f_off, length, v_off in extents:
        if v_off is None or f_off + length <= valid:
            out.append((f_off, length, v_off))
        elif f_off >= valid:
            out.append((f_off, length, None))
        else:
            keep = valid - f_off
            out.append((f_off, keep, v_off))
            out.append((valid, length - keep, None))
    return out


# === NTFS =========================================================================================

_NTFS_ATTR_READONLY = 0x1
_NTFS_ATTR_SYSTEM = 0x4
_INTERIX_SYMLINK = b"IntxLNK\x01"
_NTFS_HIDDEN_SYSTEM_FILES = 16  # MFT records 0-15 are the $-metafiles; not shown


@dataclass(slots=True)
class _NtfsNode:
    segment: int
    record: Any = None


class NtfsFS(GuestFS[_NtfsNode]):
    """NTFS through dissect.ntfs; Windows symlinks and junctions appear as symlinks."""

    kind = "ntfs"
    case_insensitive = True

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        from dissect.ntfs import NTFS

        self._reader = SourceReader(source)
        try:
            self._fs = NTFS(self._reader)
            root = self._fs.mft.get(5)
            root.attributes  # noqa: B018 - parse now so damage is reported at open time
        except Exception as exc:
            raise DamagedFilesystem(f"damaged NTFS boot sector or $MFT: {exc}") from exc
        self.label = self._fs.volume_name or ""
        self.uuid = f"{self._fs.serial or 0:016X}"
        self.block_size = self._fs.cluster_size
        self._root_node = _NtfsNode(5, root)

    def _record(self, node: _NtfsNode) -> Any:
        if node.record is None:
            node.record = self._fs.mft.get(node.segment)
        return node.record

    def _root(self) -> _NtfsNode:
        return self._root_node

    def _children(self, node: _NtfsNode) -> Iterator[tuple[str, _NtfsNode]]:
        from dissect.ntfs.util import segment_reference

        record = self._record(node)
        seen: set[str] = set()
        for entry in record.iterdir(ignore_dos=True):
            attr = entry.attribute
            if attr is None:
                continue
            name = attr.file_name
            segment = segment_reference(entry.header.FileReference)
            if segment < _NTFS_HIDDEN_SYSTEM_FILES or name in (".", "..") or name in seen:
                continue
            seen.add(name)
            yield name, _NtfsNode(segment)

    def _stat(self, node: _NtfsNode) -> GuestStat:
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE as T

        try:
            rec = self._record(node)
            attrs = rec.attributes
            si = attrs[T.STANDARD_INFORMATION]
            target = self._reparse_target(rec) if rec.is_reparse_point() else None
            is_dir = rec.is_dir()
            if target is None and not is_dir and si and si.file_attributes & _NTFS_ATTR_SYSTEM:
                target = self._interix_target(rec)
            if target is not None:
                ftype, perm = FileType.LNK, 0o777
            elif is_dir:
                ftype, perm = FileType.DIR, 0o755
            else:
                ro = bool(si and si.file_attributes & _NTFS_ATTR_READONLY)
                ftype, perm = FileType.REG, 0o444 if ro else 0o644
            size = 0
            if ftype is FileType.REG and rec.has_stream(""):
                size = rec.size("")
            elif ftype is FileType.LNK:
                size = len(target.encode()) if target else 0
            names = [a for a in attrs[T.FILE_NAME] if a.flags != 2]  # 2 = DOS-only name
            mtime = si.last_modification_time_ns if si else 0
            return GuestStat(
                type=ftype,
                mode=ftype.value | perm,
                uid=0,
                gid=0,
                size=size,
                mtime_ns=mtime,
                atime_ns=si.last_access_time_ns if si else mtime,
                ctime_ns=si.last_change_time_ns if si else mtime,
                nlink=max(1, len(names)) if not is_dir else 1,
                ino=node.segment,
                symlink_target=target,
            )
        except OSError:
            raise
        except Exception as exc:
            raise OSError(errno.EIO, f"damaged MFT record {node.segment}: {exc}") from exc

    @staticmethod
    def _interix_target(rec: Any) -> str | None:
        """ntfs-3g stores Linux symlinks as small system files holding ``IntxLNK\\1`` + UTF-16 target."""
        if not rec.has_stream("") or not 8 < rec.size("") <= 8 + 2 * 4096:
            return None
        data = bytes(rec.open("").read())
        if not data.startswith(_INTERIX_SYMLINK):
            return None
        return data[len(_INTERIX_SYMLINK) :].decode("utf-16-le", "surrogatepass") or None

    @staticmethod
    def _reparse_target(rec: Any) -> str | None:
        if not (rec.is_symlink() or rec.is_mount_point()):
            return None  # other reparse points (dedup, cloud files) are shown as plain files
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE as T

        rp = rec.attributes[T.REPARSE_POINT]
        name = rp.print_name or rp.substitute_name or ""
        if name.startswith("\\??\\"):
            name = name[4:]
        relative = rec.is_symlink() and rp.relative
        if not relative and len(name) >= 2 and name[1] == ":":
            name = name[2:]  # drive letter: the guest root is the volume we are reading
        return name.replace("\\", "/") or None

    def _open(self, node: _NtfsNode, st: GuestStat) -> GuestFile:
        from dissect.ntfs.c_ntfs import ATTRIBUTE_FLAG_COMPRESSION_MASK, ATTRIBUTE_FLAG_ENCRYPTED

        rec = self._record(node)
        if not rec.has_stream(""):
            return BytesFile(b"")
        attrs = rec._get_stream_attributes("")
        header = attrs[0].header
        if header.resident:
            return BytesFile(bytes(attrs.open().read()))
        flags = header.flags
        if flags & ATTRIBUTE_FLAG_ENCRYPTED:
            raise OSError(errno.EACCES, "file is EFS-encrypted")
        if flags & ATTRIBUTE_FLAG_COMPRESSION_MASK:
            return LockedStreamFile(attrs.open(), st.size, self._lock)
        first = min((a for a in attrs if not a.header.resident), key=lambda a: a.header.lowest_vcn)
        valid = first.header.header.Form.Nonresident.ValidDataLength
        cs = self._fs.cluster_size
        extents: list[tuple[int, int, int | None]] = []
        pos = 0
        for lcn, count in attrs.dataruns():
            extents.append((pos, count * cs, None if lcn is None else lcn * cs))
            pos += count * cs
        return ExtentFile(self.source, st.size, _clip_valid(extents, min(valid, st.size)))


# === detection ====================================================================================

_Opener = Callable[[ByteSource], GuestFS[Any]]


def detect_filesystem(source: ByteSource) -> str:
    """Name the file system on ``source`` from its magic numbers, or raise a :class:`GuestDiskError`.

    Returns one of ``ext``, ``xfs``, ``ntfs``, ``exfat``, ``vfat``. The error's ``reason`` is the
    sentence the FUSE view and the CLI show: "LUKS-encrypted volume", "Linux swap space",
    "unknown filesystem (first bytes: ...)".
    """
    head = source.read_at(0, 4096)
    if len(head) < 512:
        raise UnsupportedFilesystem(f"volume too small for a file system ({source.size} bytes)")
    if head[:6] == b"LUKS\xba\xbe":
        version = struct.unpack_from(">H", head, 6)[0]
        raise EncryptedVolume(f"LUKS-encrypted volume (LUKS{version}); files cannot be read without the key")
    if head[3:11] == b"-FVE-FS-":
        raise EncryptedVolume("BitLocker-encrypted volume; files cannot be read without the recovery key")
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[1080:1082] == b"\x53\xef":
        return "ext"
    if _looks_like_fat(head):
        return "vfat"
    page = source.read_at(4096 - 10, 10) if source.size >= 4096 else b""
    if page == b"SWAPSPACE2" or page == b"SWAP-SPACE":
        raise UnsupportedFilesystem("Linux swap space (no files)")
    for i in range(4):
        if head[i * 512 : i * 512 + 8] == b"LABELONE":
            raise UnsupportedFilesystem("LVM2 physical volume whose logical volumes could not be mapped")
    btrfs = source.read_at(0x10040, 8)
    if btrfs == b"_BHRfS_M":
        raise UnsupportedFilesystem("btrfs file system (not supported)")
    if head[0x218:0x21E] in (b"ReIsEr", b"ReIsEr2Fs"[:6]):
        raise UnsupportedFilesystem("ReiserFS file system (not supported)")
    if not any(head):
        tail = source.read_at(0, 1 << 20)
        if not any(tail):
            raise UnsupportedFilesystem("empty volume (the first MiB is all zeroes)")
    raise UnsupportedFilesystem(f"unknown filesystem (first bytes: {head[:16].hex(' ')})")


def _looks_like_fat(head: bytes) -> bool:
    from repo.guestfs.volumes import looks_like_filesystem_boot_sector

    if head[510:512] != b"\x55\xaa" or not looks_like_filesystem_boot_sector(head[:512]):
        return False
    root_entries = int.from_bytes(head[17:19], "little")
    sectors_per_fat16 = int.from_bytes(head[22:24], "little")
    sectors_per_fat32 = int.from_bytes(head[36:40], "little")
    total = int.from_bytes(head[19:21], "little") or int.from_bytes(head[32:36], "little")
    return total > 0 and (sectors_per_fat16 > 0 or (sectors_per_fat32 > 0 and root_entries == 0))


_OPENERS: dict[str, _Opener] = {
    "ext": ExtFS,
    "xfs": XfsFS,
    "vfat": FatFS,
    "exfat": ExFatFS,
    "ntfs": NtfsFS,
}


def open_filesystem(source: ByteSource) -> GuestFS[Any]:
    """Detect and open the file system on ``source``; raises a :class:`GuestDiskError` with a reason."""
    kind = detect_filesystem(source)
    try:
        return _OPENERS[kind](source)
    except GuestDiskError:
        raise
    except OSError as exc:
        raise DamagedFilesystem(f"damaged {kind} file system: {exc}") from exc
    except Exception as exc:
        raise DamagedFilesystem(f"damaged {kind} file system: {type(exc).__name__}: {exc}") from exc
