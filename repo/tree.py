"""File trees as paged directory objects, so a directory of a million entries streams.

A node is a msgpack map with short keys (docs/format.md §6.2):

``n`` name (bytes)        ``t`` type: f d l c b p s   ``m`` st_mode    ``u``/``g`` uid/gid
``U``/``G`` user/group    ``s`` size                  ``mt``/``at``/``ct`` times in ns
``nl`` link count         ``hl`` hard-link group key  ``x`` xattrs {name: value} (ACLs are xattrs)
``l`` symlink target      ``r`` rdev                  ``c`` content [[chunk id | None, length], ...]
``d`` directory pages [[first name, page id], ...]; each page is a TREE blob holding a sorted list
of nodes. Unchanged directories produce identical pages and so deduplicate across restore points.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgpack

from . import format as fmt
from .errors import IntegrityError, PathNotFound

Node = dict[str, Any]

TYPE_FILE, TYPE_DIR, TYPE_LINK, TYPE_CHR, TYPE_BLK, TYPE_FIFO, TYPE_SOCK = "fdlcbps"


def pack_node(node: Node) -> bytes:
    return msgpack.packb(node, use_bin_type=True)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"tree object malformed: {e}") from None


class BlobSink(Protocol):
    def add(self, kind: int, data: bytes | memoryview, blob_id: bytes | None = None) -> bytes: ...


class DirBuilder:
    """Collects a directory's entries in name order and emits full pages as it goes."""

    def __init__(self, sink: BlobSink) -> None:
        self.sink = sink
        self.pages: list[list[Any]] = []
        self._cur: list[Node | Callable[[], Node | None]] = []
        self._first: bytes | None = None
        self._bytes = 0

    def add(self, name: bytes, node: Node | Callable[[], Node | None], approx_size: int = 128) -> None:
        """``node`` may be a callable resolved when the page is sealed (content still hashing)."""
        if not self._cur:
            self._first = name
        self._cur.append(node)
        self._bytes += approx_size
        if len(self._cur) >= fmt.TREE_PAGE_ENTRIES or self._bytes >= fmt.TREE_PAGE_BYTES:
            self._emit()

    def _emit(self) -> None:
        # A resolver may return None: the entry turned out unreadable and is left out.
        nodes = [x for x in (n() if callable(n) else n for n in self._cur) if x is not None]
        page = msgpack.packb(nodes, use_bin_type=True)
        pid = self.sink.add(fmt.BlobKind.TREE, page)
        self.pages.append([self._first, pid])
        self._cur, self._first, self._bytes = [], None, 0

    def finish(self) -> list[list[Any]]:
        if self._cur:
            self._emit()
        return self.pages


class BlobSource(Protocol):
    def get_blob(self, kind: int, blob_id: bytes) -> bytes: ...


class TreeReader:
    """Reads directory pages with a bounded cache; shared by restore, ls, diff and the FUSE view."""

    def __init__(self, source: BlobSource, cache_pages: int = 256) -> None:
        self.source = source
        self._cache: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._max = cache_pages
        self._lock = threading.Lock()

    def page(self, page_id: bytes) -> list[Node]:
        with self._lock:
            p = self._cache.get(page_id)
            if p is not None:
                self._cache.move_to_end(page_id)
                return p
        p = unpack(self.source.get_blob(fmt.BlobKind.TREE, page_id))
        if not isinstance(p, list):
            raise IntegrityError(f"tree page {page_id.hex()[:16]} malformed")
        with self._lock:
            self._cache[page_id] = p
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return p

    def children(self, node: Node) -> Iterator[Node]:
        for _first, pid in node.get("d", ()):
            yield from self.page(pid)

    def lookup(self, node: Node, name: bytes) -> Node | None:
        pages = node.get("d") or []
        if not pages:
            return None
        firsts = [p[0] for p in pages]
        i = bisect.bisect_right(firsts, name) - 1
        if i < 0:
            return None
        entries = self.page(pages[i][1])
        names = [e["n"] for e in entries]
        j = bisect.bisect_left(names, name)
        if j < len(entries) and names[j] == name:
            return entries[j]
        return None

    def resolve(self, root: Node, path: str | bytes) -> Node:
        """Follow a '/'-separated path from the root (no symlinks followed)."""
        p = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        node = root
        for comp in [c for c in p.split(b"/") if c and c != b"."]:
            if node.get("t") != TYPE_DIR:
                raise PathNotFound(f"{path!r}: {comp.decode(errors='replace')!r} is inside a non-directory")
            nxt = self.lookup(node, comp)
            if nxt is None:
                raise PathNotFound(f"{p.decode(errors='replace')} is not in this restore point; list it with `ihb ls`")
            node = nxt
        return node

    def walk(self, node: Node, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
        """Depth-first, name order; directories are yielded before their contents."""
        for child in self.children(node):
            path = prefix + b"/" + child["n"] if prefix else child["n"]
            yield path, child
            if child.get("t") == TYPE_DIR:
                yield from self.walk(child, path)


def root_node(snapshot_tree: bytes | None) -> Node:
    if snapshot_tree is None:
        raise IntegrityError("restore point has no file tree")
    n = unpack(snapshot_tree)
    if not isinstance(n, dict) or n.get("t") != TYPE_DIR:
        raise IntegrityError("restore point root is not a directory")
    return n


def content_size(node: Node) -> int:
    return sum(ln for _, ln in node.get("c", ()))
