"""Where disk bytes come from: raw files, block devices, qcow2 images (through qemu-nbd) and QEMU's
own NBD exports of a running VM. Each source says which extents hold data and which read as zeros,
so that holes, zeros and discarded blocks are recorded without being read or stored.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from repo.errors import SourceError
from repo.extents import data_extents

from .nbd import STATUS_ZERO, NBDClient, NBDError

BLKGETSIZE64 = 0x80081272
READ_UNIT = 4 << 20
READ_AHEAD = 8  # read units received ahead of the chunking (in_background)


class DiskSource(Protocol):
    size: int

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, has_data) runs covering the disk; has_data False = reads as zeros."""
        ...

    def read_many(self, extents: Iterable[tuple[int, int]]) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def _split(extents: Iterable[tuple[int, int]], unit: int = READ_UNIT) -> Iterator[tuple[int, int]]:
    for off, ln in extents:
        while ln > 0:
            n = min(unit, ln)
            yield off, n
            off += n
            ln -= n


class FileSource:
    """A raw image file or a block device, read with pread; SEEK_DATA/SEEK_HOLE skips holes."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if self.is_block:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise SourceError(f"{path} is neither a regular file nor a block device")
        self.path = path

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        if self.is_block:
            yield 0, self.size, True
        else:
            yield from data_extents(self.fd, self.size)

    def read_many(self, extents: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        for off, ln in _split(extents):
            data = os.pread(self.fd, ln, off)
            if len(data) != ln:
                raise SourceError(f"{self.path}: short read at {off} (the source shrank?)")
            yield data

    def close(self) -> None:
        os.close(self.fd)


class NBDSource:
    """A disk behind an NBD server: base:allocation gives holes and zeros; an optional dirty bitmap
    context restricts reads to changed blocks."""

    def __init__(self, client: NBDClient, dirty_bitmap: str | None = None,
                 process: subprocess.Popen[bytes] | None = None, tmpdir: str | None = None) -> None:
        self.client = client
        self.size = client.size
        self.bitmap = f"qemu:dirty-bitmap:{dirty_bitmap}" if dirty_bitmap else None
        self._proc = process
        self._tmpdir = tmpdir
        self._maps: dict[str, list[tuple[int, int, int]]] | None = None

    def _map(self, context: str) -> list[tuple[int, int, int]]:
        """One block-status pass for the allocation map and the dirty bitmap together (see
        ``NBDClient.block_statuses``); both describe the same point in time, the fleecing snapshot."""
        if self._maps is None:
            self._maps = self.client.block_statuses(["base:allocation"] + ([self.bitmap] if self.bitmap else []))
        return self._maps[context]

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        for off, ln, flags in self._map("base:allocation"):
            yield off, ln, not flags & STATUS_ZERO

    def dirty_extents(self) -> Iterator[tuple[int, int]]:
        """Changed extents from the dirty bitmap, merged."""
        if self.bitmap is None:
            raise SourceError("no dirty bitmap was exported with this disk")
        cur: tuple[int, int] | None = None
        for off, ln, flags in self._map(self.bitmap):
            if not flags & 1:
                continue
            if cur is not None and cur[0] + cur[1] == off:
                cur = (cur[0], cur[1] + ln)
            else:
                if cur is not None:
                    yield cur
                cur = (off, ln)
        if cur is not None:
            yield cur

    def read_many(self, extents: Iterable[tuple[int, int]]) -> Iterator[bytearray]:
        yield from self.client.read_many(_split(extents))

    def close(self) -> None:
        self.client.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def open_qemu_image(path: str, fmt: str | None = None) -> NBDSource:
    """Serve an image file (qcow2, vmdk, ...) read-only with qemu-nbd on a private socket: no temporary
    raw copy, and qemu's own allocation map tells holes and zeros."""
    if shutil.which("qemu-nbd") is None:
        raise SourceError("qemu-nbd is not installed (Debian package qemu-utils)")
    tmp = tempfile.mkdtemp(prefix="ihb-nbd-")
    sock = os.path.join(tmp, "nbd.sock")
    args = ["qemu-nbd", "--read-only", "--persistent", "--shared=4", "--socket", sock, "--export-name", "disk"]
    if fmt:
        args += ["-f", fmt]
    proc = subprocess.Popen([*args, path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            shutil.rmtree(tmp, ignore_errors=True)
            raise SourceError(f"qemu-nbd cannot open {path}: {err.splitlines()[-1] if err else 'unknown error'}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SourceError(f"qemu-nbd did not start for {path}")
        time.sleep(0.02)
    try:
        client = NBDClient(unix=sock, export="disk", meta=["base:allocation"])
    except (OSError, NBDError) as e:
        proc.kill()
        raise SourceError(f"cannot read {path} through qemu-nbd: {e}") from None
    return NBDSource(client, process=proc, tmpdir=tmp)


def open_source(path: str) -> DiskSource:
    """Pick the reader for a path: qcow2 (by magic) through qemu-nbd, else raw file / block device."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    if magic == b"QFI\xfb":
        return open_qemu_image(path, "qcow2")
    return FileSource(path)
