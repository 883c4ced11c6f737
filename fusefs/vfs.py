"""What a repository looks like as a tree, without FUSE (ops.py only translates to pyfuse3).

Layout of a whole-repository mount::

    by-host/<host>/<time>/...        file-level restore points (the backed-up tree)
    by-host/<host>/latest         -> <time> of the newest one
    vms/<vm>/<time>/<disk>.raw       image-level restore points: raw disks of their virtual size
    vms/<vm>/latest               -> <time>
    by-id/<snapshot id>/...          either kind, by full id (a unique prefix of 8+ digits also works)

``--snapshot ID`` puts one restore point at the root instead.

Inodes are deterministic: a hash of (parent inode, name), and of (view root, hard-link group) for hard
links, so a number never changes for the life of the mount even after the kernel forgets it, and the
same restore point under two paths (``by-host`` and ``by-id``) never aliases a directory. Only inodes
the kernel holds are in memory, and they keep a locator (directory page id, index), not the node.

Directories are read page by page (tree.py pages of ~1000 entries); a ``readdir`` offset is
(page << 32 | index), a stable key, so a directory of millions of entries is never loaded whole.

Reads: offsets map to chunks by bisect (files) or division (images); decompressed chunks sit in one
bounded LRU per mount; sequential reads prefetch the next chunks on worker threads, and concurrent
requests for one chunk share a single fetch.

Every method may be called from any thread. Under ``call_nowait`` a call that would need repository
I/O raises ``WouldBlock`` before changing any state, so the adapter can answer cached requests on the
event loop and send the rest to a worker thread.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, cast

import msgpack

from repo import format as fmt
from repo.errors import IhbError, IntegrityError
from repo.reader import ChunkCache
from repo.snapshot import DiskRecord, Snapshot
from repo.tree import TYPE_DIR, TYPE_FILE, TYPE_LINK, Node, root_node, unpack

log = logging.getLogger(__name__)

ROOT_INO = 1
FIRST_HASHED_INO = 1024  # numbers below are never produced by the hash
IMMUTABLE_TTL = 300.0  # restore point contents never change: the kernel may cache entries and attributes
VIRTUAL_TTL = 1.0  # the listing levels change when restore points land
REFRESH_INTERVAL = 1.5  # at most one repository re-scan per this many seconds
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024  # decompressed chunks kept per mount (--cache-size)
READAHEAD_MIN = 1024 * 1024
READAHEAD_MAX = 16 * 1024 * 1024
PREFETCH_BATCH = 4  # chunks per readahead task (1 MiB of a 256 KiB-chunk image)
TREE_PAGES_CACHED = 128  # decoded directory pages (each up to 1000 entries)
MAP_PAGES_CACHED = 64  # image chunk-map pages (each maps 1 GiB at 256 KiB chunks)
BLKSIZE = 1024 * 1024  # st_blksize: cp and friends size their buffers from it
_ZEROS = memoryview(bytes(4 * 1024 * 1024))


class RestorePointSource(Protocol):
    """The narrow part of ``repo.repository.Repository`` the view reads through."""

    def snapshots(self) -> list[Snapshot]: ...
    def get_blob(self, kind: int, blob_id: bytes) -> bytes: ...
    def get_blob_view(self, kind: int, blob_id: bytes) -> bytes | memoryview: ...
    def sync_index(self) -> tuple[int, int]: ...


# --- non-blocking mode --------------------------------------------------------------------------------
class WouldBlock(Exception):
    """The call needs repository I/O; retry it on a worker thread."""


_tls = threading.local()
T = TypeVar("T")


def call_nowait(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` if it can finish from memory, else raise WouldBlock (with no state changed)."""
    _tls.nowait = True
    try:
        return fn(*args)
    finally:
        _tls.nowait = False


def _may_block() -> None:
    if getattr(_tls, "nowait", False):
        raise WouldBlock


class DamagedChunk(IntegrityError):
    """A chunk, directory page or map page failed to load: only reads that need it fail."""

    def __init__(self, chunk_id: bytes, message: str) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id


# --- inode numbers ------------------------------------------------------------------------------------
def child_ino(parent: int, name: bytes) -> int:
    """Deterministic inode of ``name`` in directory ``parent`` (63 bits: also a readdir offset)."""
    h = hashlib.blake2b(parent.to_bytes(8, "little") + name, digest_size=8).digest()
    v = int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return v if v >= FIRST_HASHED_INO else v + FIRST_HASHED_INO


def safe_name(s: str) -> bytes:
    """A host, VM or disk name as one path component."""
    b = s.encode("utf-8", "surrogateescape").replace(b"/", b"_").replace(b"\0", b"_")
    return b"_" + b if b in (b"", b".", b"..") else b


class Attr(NamedTuple):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    ttl: float


# --- caches -------------------------------------------------------------------------------------------
V = TypeVar("V")


class _LRU(Generic[V]):
    """A small locked LRU of decoded pages; a miss loads outside the lock (and never in nowait mode)."""

    def __init__(self, load: Callable[[bytes], V], max_items: int) -> None:
        self._load = load
        self._max = max_items
        self._d: OrderedDict[bytes, V] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key: bytes) -> V:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
                return v
        _may_block()
        v = self._load(key)
        with self._lock:
            self.loads += 1
            self._d[key] = v
            while len(self._d) > self._max:
                self._d.popitem(last=False)
        return v


class TreePage:
    """A decoded directory page, plus its entries as nodes per parent directory (built on the first
    listing, so listing a cached directory again costs no decoding or hashing)."""

    __slots__ = ("nodes", "names", "children")

    def __init__(self, nodes: list[Node], names: list[bytes]) -> None:
        self.nodes = nodes
        self.names = names
        self.children: dict[int, list[TreeNode]] = {}  # parent inode -> nodes (pages are shared by content)


class ChunkFetcher:
    """get(chunk id) through one bounded LRU of plaintext, with concurrent requests for a chunk sharing
    one fetch, and prefetch() running fetches on a small pool so decryption uses every core."""

    def __init__(self, repo: RestorePointSource, cache_bytes: int, threads: int | None = None) -> None:
        self.repo = repo
        self.cache = ChunkCache(cache_bytes)
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads or max(2, os.cpu_count() or 2), thread_name_prefix="ihb-fuse-ra")
        self.stats = {"hits": 0, "fetches": 0, "prefetches": 0, "waits": 0}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:  # fills cancelled before they ran: their waiters get an error, not a hang
            left = list(self._inflight.values())
            self._inflight.clear()
        for fut in left:
            if not fut.done():
                fut.set_exception(OSError(errno.EIO, "the mount is closing"))

    def cached(self, cid: bytes) -> bool:
        return self.cache.get(cid) is not None

    def get(self, cid: bytes) -> bytes:
        v = self.cache.get(cid)
        if v is not None:
            self.stats["hits"] += 1
            return v
        _may_block()
        with self._lock:
            fut = self._inflight.get(cid)
            mine = fut is None
            if fut is None:
                fut = self._inflight[cid] = Future()
        if not mine:
            self.stats["waits"] += 1
            return fut.result()
        self.stats["fetches"] += 1
        self._fill(cid, fut)
        return fut.result()

    def _fill(self, cid: bytes, fut: Future[bytes]) -> None:
        """Load a chunk claimed in ``_inflight``; the outcome goes to its future, never raised here."""
        try:
            data = self._load(cid)
            self.cache.put(cid, data)
            with contextlib.suppress(InvalidStateError):  # close() failed it meanwhile
                fut.set_result(data)
        except BaseException as e:
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(e)
        finally:
            with self._lock:
                self._inflight.pop(cid, None)

    def _load(self, cid: bytes) -> bytes:
        try:
            return self.repo.get_blob_view(fmt.BlobKind.DATA, cid)
        except IntegrityError as e:
            raise DamagedChunk(cid, str(e)) from e

    def pending(self, cids: Iterable[bytes]) -> list[Future[bytes]]:
        """Futures of the chunks not cached, fetching on the pool those not in flight yet: the event
        loop can await them without a worker thread of its own blocking on them (one wake-up, not three)."""
        futs, claimed = self._claim(cids)
        self._submit_fills(claimed)
        return futs

    def prefetch(self, cids: Iterable[bytes]) -> None:
        """Start fetching chunks not cached nor in flight; errors surface on the foreground read.
        Consecutive chunks go to one task (PREFETCH_BATCH at a time): fewer thread hand-offs."""
        _, claimed = self._claim(cids)
        self.stats["prefetches"] += len(claimed)
        self._submit_fills(claimed)

    def _claim(self, cids: Iterable[bytes]) -> tuple[list[Future[bytes]], list[tuple[bytes, Future[bytes]]]]:
        """In-flight futures of ``cids`` (not cached); the ones created here are returned as claimed too.
        A claimed chunk is in ``_inflight`` from now on, so a reader arriving first waits for its fill."""
        futs: list[Future[bytes]] = []
        claimed: list[tuple[bytes, Future[bytes]]] = []
        with self._lock:
            for cid in cids:
                if self.cache.get(cid) is not None:
                    continue
                fut = self._inflight.get(cid)
                if fut is None:
                    fut = self._inflight[cid] = Future()
                    claimed.append((cid, fut))
                futs.append(fut)
        return futs, claimed

    def _submit_fills(self, claimed: list[tuple[bytes, Future[bytes]]]) -> None:
        for i in range(0, len(claimed), PREFETCH_BATCH):
            try:
                self._pool.submit(self._fill_all, claimed[i : i + PREFETCH_BATCH])
            except RuntimeError as e:  # pool shut down (unmounting): nobody may wait forever
                for cid, fut in claimed[i:]:
                    with self._lock:
                        self._inflight.pop(cid, None)
                    fut.set_exception(e)
                return

    def _fill_all(self, batch: list[tuple[bytes, Future[bytes]]]) -> None:
        for cid, fut in batch:
            self._fill(cid, fut)
            if fut.exception() is not None:  # reported once by the read that needs the chunk
                log.debug("prefetch of chunk %s failed: %s", cid.hex()[:16], fut.exception())

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pool.submit(fn, *args)


# --- content readers ----------------------------------------------------------------------------------
Piece = tuple[bytes | None, int, int]  # chunk id (None: zeros), start and end within the chunk


class ContentReader:
    """Random reads of one file's or disk's bytes."""

    size: int

    def __init__(self, fetcher: ChunkFetcher) -> None:
        self.fetcher = fetcher

    def pieces(self, off: int, end: int) -> Iterator[Piece]:
        raise NotImplementedError

    def read(self, off: int, size: int, out: bytearray | None = None) -> bytes | memoryview:
        """The bytes at [off, off+size), clipped at the end. A read spanning chunks is assembled in ``out``
        when given (the caller's reusable buffer; the view returned is valid until it is reused)."""
        if off >= self.size or size <= 0:
            return b""
        end = min(self.size, off + size)
        parts: list[bytes | memoryview] = []
        for cid, lo, hi in self.pieces(off, end):
            n = hi - lo
            if cid is None:
                parts.append(_ZEROS[:n] if n <= len(_ZEROS) else bytes(n))
                continue
            data = self.fetcher.get(cid)
            if len(data) < hi:
                raise DamagedChunk(cid, f"chunk {cid.hex()[:16]} is shorter than its recorded length")
            parts.append(memoryview(data)[lo:hi])
        if len(parts) == 1:
            return parts[0]  # zero-copy: a view of the cached chunk
        if out is None or len(out) < end - off:
            return b"".join(parts)
        pos = 0
        for p in parts:
            out[pos : pos + len(p)] = p
            pos += len(p)
        return memoryview(out)[:pos]

    def read_at(self, offset: int, size: int) -> bytes:
        """repo.guestfs ByteSource: blocking, clipped at the end, safe from several threads."""
        return bytes(self.read(offset, size))

    def chunk_ids(self, off: int, end: int) -> list[bytes]:
        return [cid for cid, _, _ in self.pieces(off, min(end, self.size)) if cid is not None]

    def extents(self) -> list[tuple[int, int, bool]]:
        """(offset, length, has_data) runs; holes are chunks that read as zeros without I/O."""
        runs: list[tuple[int, int, bool]] = []
        pos = 0
        for cid, lo, hi in self.pieces(0, self.size):
            has, n = cid is not None, hi - lo
            if runs and runs[-1][2] == has:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, has)
            else:
                runs.append((pos, n, has))
            pos += n
        return runs


class FileReader(ContentReader):
    """A file's content list; the chunk holding an offset is found by bisect on cumulative sizes."""

    def __init__(self, fetcher: ChunkFetcher, content: list[list[Any]]) -> None:
        super().__init__(fetcher)
        self.content = content
        self.starts: list[int] = []
        pos = 0
        for _, ln in content:
            self.starts.append(pos)
            pos += ln
        self.size = pos

    def pieces(self, off: int, end: int) -> Iterator[Piece]:
        i = bisect.bisect_right(self.starts, off) - 1
        pos = off
        while pos < end and i < len(self.content):
            cid, ln = self.content[i]
            start = self.starts[i]
            lo, hi = pos - start, min(ln, end - start)
            if hi > lo:
                yield cid, lo, hi
            pos = start + hi
            i += 1


class DiskReader(ContentReader):
    """A VM disk: offset // chunk_size is the map entry, no scanning."""

    def __init__(self, fetcher: ChunkFetcher, disk: DiskRecord, map_pages: _LRU[list[bytes | None]]) -> None:
        super().__init__(fetcher)
        self.disk = disk
        self.size = disk.size
        self.cs = disk.chunk_size
        self._maps = map_pages

    def entry(self, idx: int) -> bytes | None:
        pno, within = divmod(idx, fmt.IMAGE_MAP_PAGE)
        pid = self.disk.pages[pno] if pno < len(self.disk.pages) else None
        if pid is None:
            return None
        return self._maps.get(pid)[within]

    def pieces(self, off: int, end: int) -> Iterator[Piece]:
        pos = off
        while pos < end:
            idx, within = divmod(pos, self.cs)
            n = min(self.cs - within, end - pos)
            yield self.entry(idx), within, within + n
            pos += n


class OpenFile:
    """One open file: its reader and the sequential-read detector that drives readahead.

    ``after_read`` is called from one thread (the event loop), so its state needs no lock."""

    def __init__(self, reader: ContentReader, origin: str | None, readahead_max: int) -> None:
        self.reader = reader
        self.origin = origin  # restore point id, marked suspect when a chunk is damaged
        self._ra_max = readahead_max
        self._window = 0
        self._last_end = -1
        self._ra_to = 0

    def read(self, off: int, size: int, out: bytearray | None = None) -> bytes | memoryview:
        return self.reader.read(off, size, out)

    def after_read(self, off: int, size: int) -> None:
        """Grow the window on sequential access (kernel readahead reorders a little) and prefetch."""
        end = min(off + size, self.reader.size)
        slack = max(size, READAHEAD_MIN)
        if self._last_end >= 0 and abs(off - self._last_end) <= slack:
            self._window = min(max(self._window * 2, READAHEAD_MIN), self._ra_max)
            self._last_end = max(self._last_end, end)
        else:
            self._window, self._ra_to, self._last_end = 0, 0, end
            return
        if self._window <= 0:
            return
        start = max(end, self._ra_to)
        stop = min(end + self._window, self.reader.size)
        if stop - start < min(self._window // 4, READAHEAD_MIN) and stop < self.reader.size:
            return  # top up in batches, not per request
        if start >= stop:
            return
        self._ra_to = stop
        self.reader.fetcher.submit(self._prefetch, start, stop)

    def _prefetch(self, start: int, stop: int) -> None:
        try:
            self.reader.fetcher.prefetch(self.reader.chunk_ids(start, stop))
        except Exception as e:  # a damaged map page: the foreground read reports it
            log.debug("readahead failed: %s", e)


# --- the nodes ----------------------------------------------------------------------------------------
class VNode:
    """One inode of the view. Subclasses answer only what their kind supports."""

    __slots__ = ("ino",)

    def __init__(self, ino: int) -> None:
        self.ino = ino

    def attr(self) -> Attr:
        raise NotImplementedError

    def is_dir(self) -> bool:
        return False

    def lookup(self, name: bytes) -> VNode | None:
        raise OSError(errno.ENOTDIR, "not a directory")

    def entries(self, start: int) -> Iterator[tuple[int, bytes, VNode]]:
        """(offset of the next entry, name, child) from offset ``start`` (0 = beginning), in order."""
        raise OSError(errno.ENOTDIR, "not a directory")

    def readlink(self) -> bytes:
        raise OSError(errno.EINVAL, "not a symbolic link")

    def xattrs(self) -> dict[bytes, bytes]:
        return {}

    def reader(self) -> ContentReader:
        raise OSError(errno.EISDIR if self.is_dir() else errno.EINVAL, "not a regular file")

    def origin(self) -> str | None:
        return None


class SnapView:
    """One restore point's file tree mounted at one place (``ino`` is its root inode)."""

    __slots__ = ("ino", "vfs", "snap", "root")

    def __init__(self, vfs: Vfs, ino: int, snap: Snapshot) -> None:
        self.ino = ino
        self.vfs = vfs
        self.snap = snap
        self.root = root_node(snap.tree)


def tree_attr(ino: int, n: Node, ttl: float = IMMUTABLE_TTL) -> Attr:
    get = n.get
    t = get("t")
    if t == TYPE_FILE:
        content = get("c")
        if content:
            size = data = 0
            for cid, ln in content:
                size += ln
                if cid is not None:
                    data += ln
        else:
            size = data = 0
    elif t == TYPE_LINK:
        size, data = len(get("l") or b""), 0
    else:
        size, data = (0 if t == TYPE_DIR else get("s", 0)), 0
    mt = get("mt", 0)
    return Attr(ino, get("m", 0), get("nl", 1), get("u", 0), get("g", 0), size, get("r", 0), (data + 511) // 512,
                get("at", mt), mt, get("ct", mt), ttl)


class TreeNode(VNode):
    """An entry of a restore point's file tree, kept as a locator: (directory page id, index)."""

    __slots__ = ("view", "page", "idx", "_attr")

    def __init__(self, ino: int, view: SnapView, page: bytes | None, idx: int, attr: Attr | None = None) -> None:
        super().__init__(ino)
        self.view, self.page, self.idx, self._attr = view, page, idx, attr

    def node(self) -> Node:
        if self.page is None:
            return self.view.root
        return self.view.vfs.tree_page(self.page).nodes[self.idx]

    def attr(self) -> Attr:
        # Kept from the listing or lookup that made this node: getattr never needs the page again.
        a = self._attr
        if a is None:
            a = self._attr = tree_attr(self.ino, self.node())
        return a

    def is_dir(self) -> bool:
        return self.node().get("t") == TYPE_DIR

    def origin(self) -> str | None:
        return self.view.snap.id

    def _child(self, page: bytes, idx: int, n: Node) -> TreeNode:
        hl = n.get("hl")
        if hl is not None and n.get("t") != TYPE_DIR:
            ino = child_ino(self.view.ino, b"\0hl\0" + str(hl).encode())
        else:
            ino = child_ino(self.ino, n["n"])
        return TreeNode(ino, self.view, page, idx, tree_attr(ino, n))

    def _pages(self) -> list[list[Any]]:
        n = self.node()
        if n.get("t") != TYPE_DIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        return n.get("d") or []

    def lookup(self, name: bytes) -> VNode | None:
        pages = self._pages()
        i = bisect.bisect_right([p[0] for p in pages], name) - 1
        if i < 0:
            return None
        pid = pages[i][1]
        pg = self.view.vfs.tree_page(pid)
        j = bisect.bisect_left(pg.names, name)
        if j < len(pg.names) and pg.names[j] == name:
            return self._child(pid, j, pg.nodes[j])
        return None

    def entries(self, start: int) -> Iterator[tuple[int, bytes, VNode]]:
        pages = self._pages()
        p, i = start >> 32, start & 0xFFFF_FFFF
        while p < len(pages):
            pid = pages[p][1]
            pg = self.view.vfs.tree_page(pid)
            kids = pg.children.get(self.ino)
            if kids is None:
                kids = pg.children[self.ino] = [self._child(pid, j, n) for j, n in enumerate(pg.nodes)]
            n = len(kids)
            for j in range(i, n):
                yield (p << 32) | (j + 1) if j + 1 < n else (p + 1) << 32, pg.names[j], kids[j]
            p, i = p + 1, 0

    def readlink(self) -> bytes:
        n = self.node()
        if n.get("t") != TYPE_LINK:
            raise OSError(errno.EINVAL, "not a symbolic link")
        target = n.get("l") or b""
        return target if isinstance(target, bytes) else str(target).encode("utf-8", "surrogateescape")

    def xattrs(self) -> dict[bytes, bytes]:
        x = self.node().get("x") or {}
        return {(k if isinstance(k, bytes) else str(k).encode()): v for k, v in x.items()}

    def reader(self) -> ContentReader:
        n = self.node()
        if n.get("t") != TYPE_FILE:
            return super().reader()
        return FileReader(self.view.vfs.fetcher, n.get("c") or [])


class LinkNode(VNode):
    """A symbolic link made up by the view (``latest``)."""

    __slots__ = ("target", "time_ns", "vfs")

    def __init__(self, ino: int, vfs: Vfs, target: bytes, time_ns: int) -> None:
        super().__init__(ino)
        self.vfs, self.target, self.time_ns = vfs, target, time_ns

    def attr(self) -> Attr:
        t = self.time_ns
        return Attr(self.ino, stat.S_IFLNK | 0o777, 1, self.vfs.uid, self.vfs.gid, len(self.target), 0, 0,
                    t, t, t, VIRTUAL_TTL)

    def readlink(self) -> bytes:
        return self.target


class DiskNode(VNode):
    """``<disk>.raw``: a VM disk as a raw image of its virtual size."""

    __slots__ = ("vfs", "snap", "disk")

    def __init__(self, ino: int, vfs: Vfs, snap: Snapshot, disk: DiskRecord) -> None:
        super().__init__(ino)
        self.vfs, self.snap, self.disk = vfs, snap, disk

    def attr(self) -> Attr:
        t = self.snap.time_ns
        return Attr(self.ino, stat.S_IFREG | 0o400, 1, self.vfs.uid, self.vfs.gid, self.disk.size, 0,
                    (self.disk.size + 511) // 512, t, t, t, IMMUTABLE_TTL)

    def reader(self) -> ContentReader:
        return self.vfs.disk_reader(self.disk)

    def origin(self) -> str | None:
        return self.snap.id


class VirtualDir(VNode):
    """A directory made up by the view. Children are rebuilt when the catalog changes; entries are
    ordered by child inode, and the inode is the readdir offset (stable across refreshes)."""

    __slots__ = ("vfs", "_table", "time_ns")
    ttl = VIRTUAL_TTL
    live = True  # follows the catalog (re-scanned, rate-limited, when looked into)

    def __init__(self, ino: int, vfs: Vfs, time_ns: int | None = None) -> None:
        super().__init__(ino)
        self.vfs = vfs
        self.time_ns = time_ns if time_ns is not None else vfs.mount_time_ns
        self._table: tuple[int, dict[bytes, VNode], list[int], list[bytes], int] | None = None

    def build(self) -> dict[bytes, VNode]:
        raise NotImplementedError

    def _current(self) -> tuple[int, dict[bytes, VNode], list[int], list[bytes], int]:
        gen = self.vfs.catalog.generation() if self.live else 0  # fixed contents: built once
        tab = self._table
        if tab is None or tab[0] != gen:
            kids = self.build()
            order = sorted((c.ino, name) for name, c in kids.items())
            ndirs = sum(1 for c in kids.values() if isinstance(c, VirtualDir) or
                        (isinstance(c, TreeNode) and c.page is None))
            tab = (gen, kids, [o[0] for o in order], [o[1] for o in order], ndirs)
            self._table = tab
        return tab

    def is_dir(self) -> bool:
        return True

    def attr(self) -> Attr:
        tab = self._table  # no re-scan just for attributes
        ndirs = tab[4] if tab is not None else 0
        t = self.time_ns
        return Attr(self.ino, stat.S_IFDIR | 0o555, 2 + ndirs, self.vfs.uid, self.vfs.gid, 0, 0, 0, t, t, t, self.ttl)

    def lookup(self, name: bytes) -> VNode | None:
        return self._current()[1].get(name)

    def entries(self, start: int) -> Iterator[tuple[int, bytes, VNode]]:
        _, kids, inos, names, _ = self._current()
        for k in range(bisect.bisect_right(inos, start), len(inos)):
            yield inos[k], names[k], kids[names[k]]


class RootDir(VirtualDir):
    __slots__ = ()

    def build(self) -> dict[bytes, VNode]:
        v = self.vfs
        return {
            b"by-host": v.intern(HostsDir(child_ino(self.ino, b"by-host"), v, kind="files")),
            b"vms": v.intern(HostsDir(child_ino(self.ino, b"vms"), v, kind="image")),
            b"by-id": v.intern(ByIdDir(child_ino(self.ino, b"by-id"), v)),
        }


class HostsDir(VirtualDir):
    """``by-host/`` (file restore points by host) or ``vms/`` (image restore points by VM)."""

    __slots__ = ("kind",)

    def __init__(self, ino: int, vfs: Vfs, kind: str) -> None:
        super().__init__(ino, vfs)
        self.kind = kind

    def build(self) -> dict[bytes, VNode]:
        groups = self.vfs.catalog.groups(self.kind)
        out: dict[bytes, VNode] = {}
        for name, snaps in groups.items():
            out[name] = self.vfs.intern(PointsDir(child_ino(self.ino, name), self.vfs, self.kind, name,
                                                  snaps[-1][1].time_ns))
        return out


class PointsDir(VirtualDir):
    """``by-host/<host>/`` or ``vms/<vm>/``: one directory per restore point, and ``latest``."""

    __slots__ = ("kind", "name")

    def __init__(self, ino: int, vfs: Vfs, kind: str, name: bytes, time_ns: int) -> None:
        super().__init__(ino, vfs, time_ns)
        self.kind, self.name = kind, name

    def build(self) -> dict[bytes, VNode]:
        snaps = self.vfs.catalog.groups(self.kind).get(self.name, [])
        out: dict[bytes, VNode] = {}
        for label, snap in snaps:
            out[label] = self.vfs.restore_point_root(child_ino(self.ino, label), snap)
        if snaps:
            label, snap = snaps[-1]
            self.time_ns = snap.time_ns
            # A new target gets a new inode, so the kernel never serves a stale link.
            out[b"latest"] = LinkNode(child_ino(self.ino, b"latest\0" + label), self.vfs, label, snap.time_ns)
        return out


class ByIdDir(VirtualDir):
    __slots__ = ()

    def build(self) -> dict[bytes, VNode]:
        return {sid.encode(): self.vfs.restore_point_root(child_ino(self.ino, sid.encode()), snap)
                for sid, snap in self.vfs.catalog.by_id().items()}

    def lookup(self, name: bytes) -> VNode | None:
        hit = super().lookup(name)
        if hit is not None or len(name) < 8:
            return hit
        try:
            prefix = name.decode("ascii").lower()
        except UnicodeDecodeError:
            return None
        found = [s for sid, s in self.vfs.catalog.by_id().items() if sid.startswith(prefix)]
        if len(found) != 1:
            return None
        # Its own inode (from the typed name), so it never aliases the full-id directory.
        return self.vfs.restore_point_root(child_ino(self.ino, name), found[0])


@dataclass(frozen=True)
class DiskContext:
    """What a disk-children provider gets: the restore point, the disk, and where its entries go."""

    vfs: Vfs
    snapshot: Snapshot
    disk: DiskRecord
    dir_ino: int

    def child_ino(self, name: bytes) -> int:
        return child_ino(self.dir_ino, name)

    def reader(self) -> DiskReader:
        """Blocking random reads of the disk (call from worker threads)."""
        return self.vfs.disk_reader(self.disk)


DiskChildrenProvider = Callable[[DiskContext], Iterable[tuple[bytes, VNode]]]
_disk_children: list[DiskChildrenProvider] = []


def register_disk_children(provider: DiskChildrenProvider) -> Callable[[], None]:
    """Add entries next to every ``<disk>.raw`` (the hook for ``<disk>.files/``, browsing the files
    inside a VM image through repo/guestfs). A provider returns (name, node) pairs; nodes are VNode
    subclasses whose inodes come from ``ctx.child_ino(name)`` (and, below them, ``child_ino``). It runs
    on a worker thread the first time the image directory is opened; an IhbError or OSError it
    raises is logged and only hides its entries. Returns a function that removes the provider."""
    _disk_children.append(provider)
    return lambda: _disk_children.remove(provider)


class ImageDir(VirtualDir):
    """An image restore point: ``<disk>.raw`` per disk, plus whatever providers add."""

    __slots__ = ("snap",)
    ttl = IMMUTABLE_TTL
    live = False

    def __init__(self, ino: int, vfs: Vfs, snap: Snapshot) -> None:
        super().__init__(ino, vfs, snap.time_ns)
        self.snap = snap

    def build(self) -> dict[bytes, VNode]:
        if _disk_children:
            _may_block()
        out: dict[bytes, VNode] = {}
        for disk in self.snap.disks:
            name = safe_name(disk.name) + b".raw"
            out[name] = DiskNode(child_ino(self.ino, name), self.vfs, self.snap, disk)
        for disk in self.snap.disks:
            ctx = DiskContext(self.vfs, self.snap, disk, self.ino)
            for provider in _disk_children:
                try:
                    for name, node in provider(ctx):
                        if name in out:
                            log.warning("disk view entry %r of %s clashes; hidden", name, self.snap.short_id)
                        else:
                            out[name] = node
                except (IhbError, OSError) as e:
                    log.warning("restore point %s disk %s: %s", self.snap.short_id, disk.name, e)
        return out


# --- the catalog of restore points --------------------------------------------------------------------
class Catalog:
    """The restore points, re-read from the repository at most every ``interval`` seconds."""

    def __init__(self, repo: RestorePointSource, interval: float = REFRESH_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._gen = 0
        self._ids: tuple[str, ...] = ()
        self._groups: dict[str, dict[bytes, list[tuple[bytes, Snapshot]]]] = {"files": {}, "image": {}}
        self._by_id: dict[str, Snapshot] = {}
        self.refreshes = 0

    def generation(self, refresh: bool = True) -> int:
        if refresh and self.clock() - self._last >= self.interval:
            _may_block()
            self.refresh()
        return self._gen

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and self.clock() - self._last < self.interval:
                return
            try:
                self.repo.sync_index()
            except (IhbError, OSError) as e:  # keep serving what we know
                log.warning("cannot re-scan the repository: %s", e)
            snaps = self.repo.snapshots()
            self._last = self.clock()
            self.refreshes += 1
            ids = tuple(s.id for s in snaps)
            if ids == self._ids:
                return
            groups: dict[str, dict[bytes, list[tuple[bytes, Snapshot]]]] = {"files": {}, "image": {}}
            for s in snaps:  # sorted by (time, id): labels stay put as new restore points land
                kind = "image" if s.kind == "image" else "files"
                name = safe_name(s.vm or s.host) if kind == "image" else safe_name(s.host)
                lst = groups[kind].setdefault(name, [])
                label = s.time_label().encode()
                if any(lb == label for lb, _ in lst):
                    label += b"-" + s.short_id.encode()
                lst.append((label, s))
            self._groups, self._by_id, self._ids = groups, {s.id: s for s in snaps}, ids
            self._gen += 1

    def groups(self, kind: str) -> dict[bytes, list[tuple[bytes, Snapshot]]]:
        return self._groups[kind]

    def by_id(self) -> dict[str, Snapshot]:
        return self._by_id


# --- the view -----------------------------------------------------------------------------------------
class Vfs:
    """The inode table, open files and caches of one mount."""

    def __init__(self, repo: RestorePointSource, *, snapshot: Snapshot | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, refresh_interval: float = REFRESH_INTERVAL,
                 threads: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mount_time_ns = time.time_ns()
        self.fetcher = ChunkFetcher(repo, cache_bytes, threads)
        self.readahead_max = max(READAHEAD_MIN, min(READAHEAD_MAX, cache_bytes // 4))
        self.catalog = Catalog(repo, refresh_interval, clock)
        self._trees: _LRU[TreePage] = _LRU(self._load_tree_page, TREE_PAGES_CACHED)
        self._maps: _LRU[list[bytes | None]] = _LRU(self._load_map_page, MAP_PAGES_CACHED)
        self._views: dict[int, SnapView] = {}
        self._lock = threading.Lock()
        self._nodes: dict[int, list[Any]] = {}  # ino -> [node, lookup count]
        self._handles: dict[int, OpenFile] = {}
        self._next_fh = 1
        self.suspect: dict[str, set[bytes]] = {}  # restore point id -> damaged chunk ids seen
        self.single = snapshot
        root: VNode
        if snapshot is None:
            self.catalog.refresh(force=True)
            root = RootDir(ROOT_INO, self)
        else:
            root = self.restore_point_root(ROOT_INO, snapshot)
        self._nodes[ROOT_INO] = [root, 1 << 62]

    def close(self) -> None:
        self.fetcher.close()

    # --- building blocks used by the nodes ---------------------------------------------------------------
    def intern(self, node: VirtualDir) -> VirtualDir:
        """Reuse the live object for a virtual directory, so its cached table survives rebuilds."""
        with self._lock:
            e = self._nodes.get(node.ino)
        return e[0] if e is not None and type(e[0]) is type(node) else node

    def restore_point_root(self, ino: int, snap: Snapshot) -> VNode:
        if snap.kind == "image":
            return ImageDir(ino, self, snap)
        with self._lock:
            view = self._views.get(ino)
            if view is None or view.snap.id != snap.id:
                view = self._views[ino] = SnapView(self, ino, snap)
        return TreeNode(ino, view, None, 0)

    def tree_page(self, pid: bytes) -> TreePage:
        return self._trees.get(pid)

    def _load_tree_page(self, pid: bytes) -> TreePage:
        try:
            nodes = unpack(self.repo.get_blob(fmt.BlobKind.TREE, pid))
        except IntegrityError as e:
            raise DamagedChunk(pid, f"directory page {pid.hex()[:16]}: {e}") from e
        if not isinstance(nodes, list):
            raise DamagedChunk(pid, f"directory page {pid.hex()[:16]} is malformed")
        return TreePage(nodes, [n["n"] for n in nodes])

    def _load_map_page(self, pid: bytes) -> list[bytes | None]:
        try:
            entries = msgpack.unpackb(self.repo.get_blob(fmt.BlobKind.IMAGE_MAP, pid))
        except IntegrityError as e:
            raise DamagedChunk(pid, f"image map page {pid.hex()[:16]}: {e}") from e
        except ValueError as e:
            raise DamagedChunk(pid, f"image map page {pid.hex()[:16]} is malformed: {e}") from e
        if not isinstance(entries, list) or len(entries) != fmt.IMAGE_MAP_PAGE:
            raise DamagedChunk(pid, f"image map page {pid.hex()[:16]} is malformed")
        return cast(list[bytes | None], entries)

    def disk_reader(self, disk: DiskRecord) -> DiskReader:
        return DiskReader(self.fetcher, disk, self._maps)

    # --- inode table ---------------------------------------------------------------------------------------
    def node(self, ino: int) -> VNode:
        e = self._nodes.get(ino)
        if e is None:
            raise OSError(errno.ESTALE, f"inode {ino} is not known")
        return cast(VNode, e[0])

    def remember(self, node: VNode) -> None:
        """The kernel now holds one more reference (lookup, or a readdirplus entry it accepted)."""
        with self._lock:
            e = self._nodes.get(node.ino)
            if e is None:
                self._nodes[node.ino] = [node, 1]
            else:
                e[1] += 1

    def remember_all(self, nodes: Iterable[VNode]) -> None:
        with self._lock:
            table = self._nodes
            for node in nodes:
                e = table.get(node.ino)
                if e is None:
                    table[node.ino] = [node, 1]
                else:
                    e[1] += 1

    def forget(self, ino: int, n: int) -> None:
        with self._lock:
            e = self._nodes.get(ino)
            if e is None or ino == ROOT_INO:
                return
            e[1] -= n
            if e[1] <= 0:
                del self._nodes[ino]

    def known_inodes(self) -> int:
        return len(self._nodes)

    # --- operations ---------------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attr:
        child = self.node(parent).lookup(name)
        if child is None:
            raise OSError(errno.ENOENT, "no such entry")
        a = child.attr()
        self.remember(child)
        return a

    def getattr(self, ino: int) -> Attr:
        return self.node(ino).attr()

    def readlink(self, ino: int) -> bytes:
        return self.node(ino).readlink()

    def readdir(self, ino: int, start: int, limit: int = 64) -> list[tuple[int, bytes, Attr, VNode]]:
        """Up to ``limit`` entries after offset ``start``; the caller remembers the ones it hands over."""
        out = []
        for nxt, name, child in self.node(ino).entries(start):
            out.append((nxt, name, child.attr(), child))
            if len(out) >= limit:
                break
        return out

    def getxattr(self, ino: int, name: bytes) -> bytes:
        v = self.node(ino).xattrs().get(name)
        if v is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return v

    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.node(ino).xattrs())

    def open(self, ino: int) -> int:
        node = self.node(ino)
        h = OpenFile(node.reader(), node.origin(), self.readahead_max)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = h
        return fh

    def handle(self, fh: int) -> OpenFile:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "bad file handle")
        return h

    def origin(self, fh: int) -> str | None:
        h = self._handles.get(fh)
        return h.origin if h is not None else None

    def inode_origin(self, ino: int) -> str | None:
        """The restore point an inode belongs to, for error reports."""
        e = self._nodes.get(ino)
        return cast(VNode, e[0]).origin() if e is not None else None

    def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return self.handle(fh).read(off, size)

    def release(self, fh: int) -> None:
        with self._lock:
            self._handles.pop(fh, None)

    def mark_suspect(self, snapshot_id: str | None, chunk_id: bytes) -> bool:
        """Record a damaged chunk; True the first time it is seen (log it then)."""
        with self._lock:
            seen = self.suspect.setdefault(snapshot_id or "?", set())
            if chunk_id in seen:
                return False
            seen.add(chunk_id)
            return True

    def statfs(self) -> dict[str, int]:
        snaps = self.catalog.by_id() if self.single is None else {self.single.id: self.single}
        return {"bsize": BLKSIZE, "frsize": 4096, "files": len(snaps), "namemax": 255}

