"""Disk images as fixed-size chunk maps: full images, changed extents over a previous restore point,
and random reads of any byte range.

A disk's map has one entry per ``chunk_size`` block: a chunk id, or None for a block that reads as
zeros (never stored). Entries are grouped in pages of IMAGE_MAP_PAGE, stored as IMAGE_MAP blobs; an
incremental backup rewrites only the pages it touches, the others keep their ids (and dedup).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgpack

from . import format as fmt
from .errors import IntegrityError, InvalidArgument
from .reader import ChunkSource
from .repository import BlobWriter, Repository
from .snapshot import DiskRecord
from .workers import Pipeline

PAGE = fmt.IMAGE_MAP_PAGE
#: Chunks go to a worker in batches of about this many bytes: per task (a Future, a queue hand-off, a
#: thread wake-up) rather than per chunk, which at 64 KiB chunks cost more than hashing them.
BATCH_BYTES = 1024 * 1024


class _Slot:
    """A map entry whose chunk is in a batch: its id is ``fut.result()[i]`` once the batch is submitted."""

    __slots__ = ("fut", "i")

    def __init__(self, i: int) -> None:
        self.fut: Future[list[bytes]] | None = None
        self.i = i

    def result(self) -> bytes:
        assert self.fut is not None
        return self.fut.result()[self.i]


def _resolved(e: Any) -> bytes | None:
    return e.result() if isinstance(e, (Future, _Slot)) else e


def load_page(repo: Repository, page_id: bytes | None) -> list[bytes | None]:
    if page_id is None:
        return [None] * PAGE
    entries = msgpack.unpackb(repo.get_blob(fmt.BlobKind.IMAGE_MAP, page_id))
    if not isinstance(entries, list) or len(entries) != PAGE:
        raise IntegrityError(f"image map page {page_id.hex()[:16]} is malformed")
    return entries


class ImageWriter:
    """Writes one disk. Extents must arrive in increasing, non-overlapping offset order (a full copy, or
    the dirty extents of a bitmap), which keeps one page and one chunk buffer in memory at a time."""

    def __init__(self, repo: Repository, writer: BlobWriter, pipe: Pipeline, name: str, size: int,
                 base: DiskRecord | None = None, chunk_size: int | None = None) -> None:
        self.repo, self.writer, self.pipe = repo, writer, pipe
        self.name, self.size = name, size
        self.cs = base.chunk_size if base is not None else (chunk_size or repo.config.image_chunk_size)
        if base is not None and chunk_size and chunk_size != base.chunk_size:
            raise InvalidArgument("an incremental must use its base's chunk size")
        self.nchunks = (size + self.cs - 1) // self.cs
        npages = (self.nchunks + PAGE - 1) // PAGE
        base_pages = list(base.pages) if base is not None else []
        if base is not None and base.size != size:
            # A resized disk: keep what overlaps, the rest reads as zeros until written.
            base_pages = base_pages[:npages]
        self.pages: list[Any] = base_pages + [None] * (npages - len(base_pages))
        self._page_no = -1
        self._page: list[Any] = []
        self._page_dirty = False
        self._chunk_no = -1
        self._buf: bytearray | None = None
        self._zero = bytes(self.cs)
        self._batch: list[bytes] = []
        self._batch_slots: list[_Slot] = []
        self._batch_bytes = 0
        self._sealer: ThreadPoolExecutor | None = None
        self._pos = 0
        self.stats = {"written": 0, "zero_chunks": 0, "data_chunks": 0, "base_reads": 0, "batches": 0}

    # --- pages ------------------------------------------------------------------------------------------
    def _goto_page(self, pno: int) -> None:
        if pno == self._page_no:
            return
        self._seal_page()
        self._page_no = pno
        self._page = load_page(self.repo, _resolved(self.pages[pno]))
        self._page_dirty = False

    def _seal_page(self) -> None:
        """Store the current page once its chunks are stored, on a thread of its own: waiting here for
        the page's last batch (and then compressing and sealing it) stalled the copy at every page
        boundary, and an incremental of scattered changes crosses one every few dozen chunks. A thread
        apart from the pipeline's workers, which it waits for and which never wait for it."""
        if self._page_no < 0 or not self._page_dirty:
            return
        self._submit_batch()
        if self._sealer is None:
            self._sealer = ThreadPoolExecutor(1, thread_name_prefix="ihb-map-page")
        self.pages[self._page_no] = self._sealer.submit(self._store_page, self._page)
        self._page_dirty = False

    def _store_page(self, page: list[Any]) -> bytes | None:
        entries = [_resolved(e) for e in page]
        if all(e is None for e in entries):
            return None
        return self.writer.add(fmt.BlobKind.IMAGE_MAP, msgpack.packb(entries))

    def _set(self, idx: int, entry: Any) -> None:
        self._goto_page(idx // PAGE)
        self._page[idx % PAGE] = entry
        self._page_dirty = True

    def _get(self, idx: int) -> bytes | None:
        self._goto_page(idx // PAGE)
        e = self._page[idx % PAGE]
        if isinstance(e, _Slot) and e.fut is None:
            self._submit_batch()
        return _resolved(e)

    # --- chunks -----------------------------------------------------------------------------------------
    def _chunk_len(self, idx: int) -> int:
        return min(self.cs, self.size - idx * self.cs)

    def _store(self, idx: int, data: bytes) -> None:
        if data == self._zero[: len(data)]:
            self.stats["zero_chunks"] += 1
            self._set(idx, None)
        else:
            self.stats["data_chunks"] += 1
            slot = _Slot(len(self._batch))
            self._batch.append(data)
            self._batch_slots.append(slot)
            self._batch_bytes += len(data)
            self._set(idx, slot)
            if self._batch_bytes >= BATCH_BYTES:
                self._submit_batch()

    def _submit_batch(self) -> None:
        if not self._batch:
            return
        batch, slots = self._batch, self._batch_slots
        self._batch, self._batch_slots, self._batch_bytes = [], [], 0
        add = self.writer.add
        self.stats["batches"] += 1
        fut = self.pipe.submit(lambda: [add(fmt.BlobKind.DATA, d) for d in batch])
        for slot in slots:
            slot.fut = fut

    def _flush_chunk(self) -> None:
        if self._buf is not None:
            self._store(self._chunk_no, bytes(self._buf))
        self._buf = None
        self._chunk_no = -1

    def _buffer_for(self, idx: int) -> bytearray:
        if self._chunk_no != idx:
            self._flush_chunk()
            self._chunk_no = idx
            old = self._get(idx)
            if old is None:
                self._buf = bytearray(self._chunk_len(idx))
            else:
                self.stats["base_reads"] += 1
                self._buf = bytearray(self.repo.get_blob(fmt.BlobKind.DATA, old))
        assert self._buf is not None
        return self._buf

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset < self._pos:
            raise InvalidArgument(f"image extents must be written in order ({offset} < {self._pos})")
        if offset + len(data) > self.size:
            raise InvalidArgument(f"write past the end of disk {self.name} ({offset + len(data)} > {self.size})")
        mv = memoryview(data)
        self.stats["written"] += len(mv)
        pos = offset
        while mv:
            idx, within = divmod(pos, self.cs)
            clen = self._chunk_len(idx)
            n = min(clen - within, len(mv))
            if within == 0 and n == clen and self._chunk_no != idx:
                self._flush_chunk()
                self._store(idx, bytes(mv[:n]))
            else:
                buf = self._buffer_for(idx)
                buf[within : within + n] = mv[:n]
                if within + n == clen:
                    self._flush_chunk()
            mv = mv[n:]
            pos += n
        self._pos = pos

    def zero(self, offset: int, length: int) -> None:
        """Mark a range as reading zeros (a hole, discarded, or free in the guest filesystem)."""
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            idx, within = divmod(pos, self.cs)
            clen = self._chunk_len(idx)
            n = min(clen - within, end - pos)
            if within == 0 and n == clen and self._chunk_no != idx:
                self._flush_chunk()
                self._set(idx, None)
                self.stats["zero_chunks"] += 1
            else:
                self.write(pos, self._zero[:n])
            pos += n
        self._pos = max(self._pos, end)

    def finish(self) -> DiskRecord:
        self._flush_chunk()
        self._submit_batch()
        self._seal_page()
        try:
            pages = [_resolved(p) for p in self.pages]
        finally:
            if self._sealer is not None:
                self._sealer.shutdown(wait=False)
        return DiskRecord(self.name, self.size, self.cs, pages, dict(self.stats))


class ImageReader:
    """Random reads of a stored disk: offset // chunk_size gives the chunk, no scanning."""

    def __init__(self, repo: Repository, disk: DiskRecord, source: ChunkSource | None = None) -> None:
        self.repo = repo
        self.disk = disk
        self.size = disk.size
        self.cs = disk.chunk_size
        self.source = source or ChunkSource(repo)
        self._pages: OrderedDict[int, list[bytes | None]] = OrderedDict()
        self._lock = threading.Lock()

    def entry(self, idx: int) -> bytes | None:
        pno = idx // PAGE
        with self._lock:
            page = self._pages.get(pno)
            if page is not None:
                self._pages.move_to_end(pno)
        if page is None:
            pid = self.disk.pages[pno] if pno < len(self.disk.pages) else None
            page = load_page(self.repo, pid)
            with self._lock:
                self._pages[pno] = page
                while len(self._pages) > 64:
                    self._pages.popitem(last=False)
        return page[idx % PAGE]

    def read_chunk(self, idx: int) -> bytes | None:
        """Plaintext of block ``idx``, or None if it reads as zeros."""
        cid = self.entry(idx)
        return None if cid is None else self.source.get(cid)

    def read(self, offset: int, size: int) -> bytes:
        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        out = []
        pos = offset
        while pos < end:
            idx, within = divmod(pos, self.cs)
            n = min(self.cs - within, end - pos)
            data = self.read_chunk(idx)
            out.append(bytes(n) if data is None else data[within : within + n])
            pos += n
        return b"".join(out)

    def extents(self) -> list[tuple[int, int, bool]]:
        """(offset, length, has_data) runs: holes for zero chunks (SEEK_HOLE, sparse restores)."""
        runs: list[tuple[int, int, bool]] = []
        nchunks = (self.size + self.cs - 1) // self.cs
        for idx in range(nchunks):
            has = self.entry(idx) is not None
            off = idx * self.cs
            ln = min(self.cs, self.size - off)
            if runs and runs[-1][2] == has:
                o, l0, h = runs[-1]
                runs[-1] = (o, l0 + ln, h)
            else:
                runs.append((off, ln, has))
        return runs


def restore_disk(repo: Repository, disk: DiskRecord, fd: int, *, is_block: bool, changed_only: bool = False,
                 verify: bool = True, progress: Any = None) -> dict[str, int]:
    """Write a stored disk to ``fd`` (file or block device).

    Holes stay holes in a file (it is truncated to size first). On a block device zeros must be written,
    unless ``changed_only``: then every block of the target is read, hashed with the repository's id
    key and rewritten only if it differs, so restoring a large disk after a small change is quick.
    With ``verify``, what was written is read back and must hash to the stored ids.
    """
    from .reader import shared_pool
    from .workers import ordered_map

    reader = ImageReader(repo, disk)
    env = repo.envelope
    cs = disk.chunk_size
    nchunks = (disk.size + cs - 1) // cs
    stats = {"written": 0, "skipped_same": 0, "holes": 0, "verified": 0}
    if not is_block and not changed_only:
        os.ftruncate(fd, 0)
    if not is_block:
        os.ftruncate(fd, disk.size)
    zero = bytes(cs)

    def work(idx: int) -> tuple[int, bytes | None, bytes | None]:
        cid = reader.entry(idx)
        off, ln = idx * cs, min(cs, disk.size - idx * cs)
        if changed_only:
            cur = os.pread(fd, ln, off)
            want_zero = cid is None
            if (want_zero and cur == zero[:ln]) or (not want_zero and env.chunk_id(cur) == cid):
                return idx, cid, b""  # already right
        if cid is None:
            return idx, None, None
        return idx, cid, reader.source.get(cid)

    for idx, _cid, data in ordered_map(work, range(nchunks), shared_pool(), 16):
        off, ln = idx * cs, min(cs, disk.size - idx * cs)
        if data == b"":
            stats["skipped_same"] += 1
        elif data is None:
            if is_block or changed_only:
                os.pwrite(fd, zero[:ln], off)
                stats["written"] += ln
            else:
                stats["holes"] += 1
        else:
            os.pwrite(fd, data, off)
            stats["written"] += ln
        if progress is not None:
            progress(idx + 1, nchunks)
    os.fsync(fd)
    if verify:
        for idx in range(nchunks):
            cid = reader.entry(idx)
            off, ln = idx * cs, min(cs, disk.size - idx * cs)
            cur = os.pread(fd, ln, off)
            ok = cur == zero[:ln] if cid is None else env.chunk_id(cur) == cid
            if not ok:
                raise IntegrityError(f"verification failed: block {idx} (offset {off}) of the target differs "
                                     "from the restore point")
            stats["verified"] += 1
    return stats
