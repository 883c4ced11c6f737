"""The file catalog: where a file with this name, or under this path, exists across restore points, and
how one file changed over time, answered from the LMDB index without touching the repository.

Why this shape (keys: the ``repo/index.py`` docstring, docs/format.md §5). Ten million catalogued
entries are mostly the *same* files seen again in the next restore point, so storage and query cost
follow distinct files, not entries:

* a *lineage* groups the restore points whose files are compared with each other (tenant, host, kind
  and backed-up paths, or the guest volume for files inside VM images); its restore points get
  consecutive ordinals;
* each distinct ``(host, path)`` gets a path id; a file's history in a lineage is a list of *runs*
  ``(first ordinal, last ordinal, size, mtime, type, digest)``, extended in place while the file stays
  the same. ``versions`` is the list of runs, which is exactly "only where it changed";
* names are looked up through ``cat_names`` (lower-cased name -> path ids, LMDB duplicates): an exact
  name is one seek, ``nginx*`` a prefix range, ``*.conf`` a prefix range of ``cat_rnames`` (reversed
  names), and only patterns with no literal prefix or suffix (``*ginx*``) scan the distinct names;
* path prefixes (``/etc/nginx/``) are a range of ``cat_pathkey`` per host.

Measured on synthetic catalogs of 10 million entries (``bench/catalog_bench.py``, figures in its
docstring): exact names, prefixes, path prefixes and ``versions`` answer in milliseconds, ``*ginx*``
in 0.1-0.3 s, broad globs returning 1000 hits in 0.03 s warm and up to 1.3 s from a cold disk.

Feeding the catalog. ``index_snapshot`` covers files restore points (called at the end of a backup,
after the commit, docs/format.md §8). Anything else feeds ``Catalog.add(snap, entries, ...)`` with any
iterable of ``(path, size, mtime_ns, digest)`` or ``(path, size, mtime_ns, digest, type)`` tuples
(``path`` absolute, str or bytes; ``digest`` any bytes identifying the content, or None; ``type`` one
of ``f d l c b p s``). For files inside a VM image restore point (repo/guestfs), one call per volume::

    disk = open_disk(ImageSource(repo, snap, disk_record))       # whatever ByteSource reads the image
    for vol in disk.filesystems():
        Catalog(repo.index).add(snap, walk_guestfs(vol.fs), host=snap.vm or snap.host,
                                source=f"image:{disk_record.name}:{vol.name}")

``walk_guestfs`` only needs ``fs.scandir(path) -> (name, stat)`` with ``stat.size``, ``stat.mtime_ns``
and ``stat.type``; the guest's files then appear under the VM's name with their guest paths, so one
``find /etc/nginx/nginx.conf`` lists agents and VMs alike. ``source`` keeps the volumes of one VM in
separate lineages.

Consistency: entries are written in batches; the ``S`` row of a restore point is written last, so a
restore point whose indexing was interrupted is re-indexed (idempotently: the lineage remembers the
ordinal it reserved) by ``rebuild``. Prune calls ``forget_snapshot``; runs left without a restore
point are skipped by queries and dropped by ``rebuild(clear=True)``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3
import lmdb
import msgpack

from .snapshot import Snapshot
from .tree import TYPE_DIR, TreeReader, root_node

if TYPE_CHECKING:
    from .index import Index
    from .repository import Repository

log = logging.getLogger(__name__)

CATALOG_VERSION = b"1"
# Value of a ``cat_runs`` row (docs/format.md §5): last ordinal, size, mtime_ns, type; then the digest.
CAT_RUN = struct.Struct(">IQqc")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
O_VAL = struct.Struct(">32sQ")  # ``O`` rows: snapshot id, time_ns
BATCH = 20000  # entries per write transaction: short enough not to stall a backup's index commits
GLOB_CHARS = frozenset("*?[")

EntryTuple = tuple[Any, ...]


@dataclass(frozen=True)
class Version:
    """One state of a file and the restore points that hold it."""

    host: str
    path: str
    type: str
    size: int
    mtime_ns: int
    digest: bytes | None
    snapshots: list[tuple[str, int]]  # (snapshot id, time_ns), oldest first

    @property
    def first(self) -> tuple[str, int]:
        return self.snapshots[0]

    @property
    def last(self) -> tuple[str, int]:
        return self.snapshots[-1]

    def to_obj(self) -> dict[str, Any]:
        def t(ns: int) -> str:
            return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.UTC).isoformat().replace("+00:00", "Z")

        return {"host": self.host, "path": self.path, "type": self.type, "size": self.size,
                "mtime": t(self.mtime_ns), "mtime_ns": self.mtime_ns,
                "digest": self.digest.hex() if self.digest else None, "restore_points": len(self.snapshots),
                "first": {"snapshot": self.first[0], "time": t(self.first[1])},
                "last": {"snapshot": self.last[0], "time": t(self.last[1])},
                "snapshots": [s for s, _ in self.snapshots]}


@dataclass
class FindResult:
    hits: list[Version] = field(default_factory=list)
    truncated: bool = False  # more matches than ``limit``
    scanned_names: int = 0  # distinct names examined (0 for exact and path-prefix queries)
    uncatalogued: int = 0  # files restore points not (yet) in the catalog: `ihb catalog rebuild`


# --- helpers --------------------------------------------------------------------------------------------
def _b(p: str | bytes) -> bytes:
    return p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape")


def _s(p: bytes) -> str:
    return p.decode("utf-8", "surrogateescape")


def fold(name: bytes) -> bytes:
    """The catalog's case fold of a name (lookup keys are folded, matches are re-checked exactly)."""
    return _s(name).lower().encode("utf-8", "surrogateescape")


def _rev(folded: bytes) -> bytes:
    return _s(folded)[::-1].encode("utf-8", "surrogateescape")


def content_digest(content: list[list[Any]] | None) -> bytes | None:
    """16 bytes identifying a file's content from its chunk list (ids are keyed, so this leaks nothing)."""
    if not content:
        return None
    return blake3.blake3(msgpack.packb(content, use_bin_type=True)).digest(16)


def glob_regex(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    """``*`` and ``?`` do not cross ``/``; ``**`` does; ``[...]`` and ``[!...]`` are classes."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _literal_ends(pattern: str) -> tuple[str, str]:
    """The literal text before the first and after the last glob character."""
    first = min((pattern.find(c) for c in GLOB_CHARS if c in pattern), default=-1)
    if first < 0:
        return pattern, pattern
    last = max(pattern.rfind(c) for c in GLOB_CHARS if c in pattern)
    if pattern[last] == "[":
        last = pattern.find("]", last)
        if last < 0:
            last = len(pattern) - 1
    return pattern[:first], pattern[last + 1 :]


def _literal_segments(pattern: str) -> list[str]:
    """The literal runs of a glob (``*ab?cd[xy]e`` -> ``ab``, ``cd``, ``e``)."""
    segs, cur, i = [], "", 0
    while i < len(pattern):
        c = pattern[i]
        if c in "*?":
            segs.append(cur)
            cur = ""
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                cur += c
            else:
                segs.append(cur)
                cur = ""
                i = j
        else:
            cur += c
        i += 1
    segs.append(cur)
    return [x for x in segs if x]


def _prefix_range(cur: lmdb.Cursor, prefix: bytes, nodup: bool = True) -> Iterator[bytes]:
    if not cur.set_range(prefix):
        return
    for k in cur.iternext_nodup(keys=True, values=False) if nodup else cur.iternext(keys=True, values=False):
        if not k.startswith(prefix):
            return
        yield bytes(k)


def walk_guestfs(fs: Any, top: str = "/") -> Iterator[EntryTuple]:
    """Catalog entries of a guest file system (repo/guestfs ``GuestFS``): (path, size, mtime, None, type)."""
    types = {0o100000: "f", 0o040000: "d", 0o120000: "l", 0o020000: "c", 0o060000: "b", 0o010000: "p",
             0o140000: "s"}
    stack = [top.rstrip("/") or ""]
    while stack:
        d = stack.pop()
        try:
            entries = list(fs.scandir(d or "/"))
        except OSError as e:
            log.warning("catalog: cannot list %s in the guest: %s", d or "/", e)
            continue
        for name, st in entries:
            p = f"{d}/{name}"
            t = types.get(getattr(st.type, "value", 0), "f")
            yield p, int(st.size), int(st.mtime_ns), None, t
            if t == "d":
                stack.append(p)


def tree_entries(repo: Repository, snap: Snapshot) -> Iterator[EntryTuple]:
    """Catalog entries of a files restore point, from its tree."""
    tree = TreeReader(repo, cache_pages=64)
    for path, node in tree.walk(root_node(snap.tree)):
        t = node.get("t", "f")
        yield (b"/" + path, int(node.get("s", 0)), int(node.get("mt", 0)),
               content_digest(node.get("c")) if t == "f" else (_b(node["l"]) if t == "l" else None), t)


def lineage_source(snap: Snapshot) -> str:
    """What makes restore points comparable: same backed-up paths (files) or same disks (image)."""
    if snap.kind == "files":
        return "files:" + "\0".join(sorted(snap.paths))
    return "image:" + ",".join(sorted(d.name for d in snap.disks))


# --- the catalog ----------------------------------------------------------------------------------------
class Catalog:
    """Reads and writes the catalog sub-databases of one ``Index``."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.db = index.db
        self._check_version()

    def _check_version(self) -> None:
        with self.index.read_txn() as txn:
            v = txn.get(b"v", db=self.db["catalog"])
            other = txn.stat(self.db["cat_runs"])["entries"] or txn.stat(self.db["cat_paths"])["entries"]
        if v == CATALOG_VERSION:
            return
        if v is not None or other:
            # An older layout, or `check --repair` cleared only the ``catalog`` db: start over.
            log.info("catalog layout %s is not %s; it is rebuilt", v, CATALOG_VERSION)
            self.clear()
        else:
            with self.index.write_txn() as txn:
                txn.put(b"v", CATALOG_VERSION, db=self.db["catalog"])

    def clear(self) -> None:
        with self.index.write_txn() as txn:
            for n in ("catalog", "cat_pathkey", "cat_paths", "cat_names", "cat_rnames", "cat_runs"):
                txn.drop(self.db[n], delete=False)
            txn.put(b"v", CATALOG_VERSION, db=self.db["catalog"])

    # --- lineages ---------------------------------------------------------------------------------------
    def _lineage(self, txn: lmdb.Transaction, tenant: str, host: str, kind: str, source: str) -> tuple[int, dict[str, Any]]:
        meta = self.db["catalog"]
        key = b"L" + blake3.blake3(msgpack.packb([tenant, host, kind, source])).digest(16)
        v = txn.get(key, db=meta)
        if v is not None:
            lid = U32.unpack(v)[0]
            return lid, msgpack.unpackb(txn.get(b"l" + U32.pack(lid), db=meta), raw=False)
        nv = txn.get(b"N", db=meta)
        lid = U32.unpack(nv)[0] if nv else 1
        txn.put(b"N", U32.pack(lid + 1), db=meta)
        txn.put(key, U32.pack(lid), db=meta)
        rec = {"tenant": tenant, "host": host, "kind": kind, "source": source, "next": 1, "head": 0, "pending": None}
        txn.put(b"l" + U32.pack(lid), msgpack.packb(rec), db=meta)
        txn.put(b"H" + host.encode() + b"\0" + U32.pack(lid), b"", db=meta)
        return lid, rec

    def _lineages_of(self, txn: lmdb.Transaction, host: str) -> list[tuple[int, dict[str, Any]]]:
        meta = self.db["catalog"]
        cur = txn.cursor(db=meta)
        out = []
        for k in _prefix_range(cur, b"H" + host.encode() + b"\0", nodup=False):
            lid = U32.unpack(k[-4:])[0]
            out.append((lid, msgpack.unpackb(txn.get(b"l" + k[-4:], db=meta), raw=False)))
        return out

    def hosts(self) -> list[str]:
        with self.index.read_txn() as txn:
            cur = txn.cursor(db=self.db["catalog"])
            return sorted({_s(k[1 : k.index(b"\0")]) for k in _prefix_range(cur, b"H", nodup=False)})

    def has_snapshot(self, sid: str) -> bool:
        with self.index.read_txn() as txn:
            return txn.get(b"S" + sid.encode(), db=self.db["catalog"]) is not None

    def snapshot_ids(self) -> set[str]:
        with self.index.read_txn() as txn:
            cur = txn.cursor(db=self.db["catalog"])
            return {_s(k[1:]) for k in _prefix_range(cur, b"S", nodup=False)}

    # --- ingest -----------------------------------------------------------------------------------------
    def add(self, snap: Snapshot, entries: Iterable[EntryTuple], *, host: str | None = None,
            source: str | None = None) -> int:
        """Catalogue one restore point's files. ``entries``: (path, size, mtime_ns, digest[, type]).

        Restore points of a lineage must arrive oldest first; an older one arriving late makes the whole
        lineage be re-indexed by the caller (``rebuild``), so this raises ``OutOfOrder`` then."""
        host = host or snap.vm or snap.host
        tenant = str(snap.meta.get("tenant", ""))
        source = source or lineage_source(snap)
        meta = self.db["catalog"]
        sid_key = b"S" + snap.id.encode()
        with self.index.write_txn() as txn:
            if txn.get(sid_key, db=meta) is not None:
                return 0
            lid, rec = self._lineage(txn, tenant, host, snap.kind, source)
            if rec.get("pending") and rec["pending"][0] == snap.id:
                ordinal = rec["pending"][1]  # resuming an interrupted indexing
            else:
                if snap.time_ns < rec["head"]:
                    raise OutOfOrder(lid)
                ordinal = rec["next"]
                rec["next"] = ordinal + 1
                rec["pending"] = [snap.id, ordinal]
                rec["head"] = snap.time_ns
                txn.put(b"l" + U32.pack(lid), msgpack.packb(rec), db=meta)
        count = 0
        batch: list[EntryTuple] = []
        for e in entries:
            batch.append(e)
            if len(batch) >= BATCH:
                count += self._add_batch(lid, ordinal, host, batch)
                batch = []
        if batch:
            count += self._add_batch(lid, ordinal, host, batch)
        with self.index.write_txn() as txn:
            rec = msgpack.unpackb(txn.get(b"l" + U32.pack(lid), db=meta), raw=False)
            rec["pending"] = None
            txn.put(b"l" + U32.pack(lid), msgpack.packb(rec), db=meta)
            txn.put(b"O" + U32.pack(lid) + U32.pack(ordinal), O_VAL.pack(bytes.fromhex(snap.id), snap.time_ns), db=meta)
            txn.put(sid_key, msgpack.packb([lid, ordinal, snap.time_ns, count]), db=meta)
        return count

    def _add_batch(self, lid: int, ordinal: int, host: str, batch: list[EntryTuple]) -> int:
        db = self.db
        hostb = host.encode() + b"\0"
        lidb = U32.pack(lid)
        ordb = U32.pack(ordinal)
        n = 0
        with self.index.write_txn() as txn:
            meta = db["catalog"]
            pv = txn.get(b"P", db=meta)
            next_pid = U64.unpack(pv)[0] if pv else 1
            runs = txn.cursor(db=db["cat_runs"])
            new_names: list[bytes] = []
            for e in batch:
                path = _b(e[0])
                size, mtime = int(e[1]), int(e[2])
                digest = bytes(e[3]) if e[3] else b""
                if len(digest) > 16:
                    digest = blake3.blake3(digest).digest(16)
                typ = (e[4] if len(e) > 4 and e[4] else "f").encode()[:1]
                pk = hostb + path
                pidb = txn.get(pk, db=db["cat_pathkey"])
                if pidb is None:
                    pidb = U64.pack(next_pid)
                    next_pid += 1
                    txn.put(pk, pidb, db=db["cat_pathkey"])
                    txn.put(pidb, pk, db=db["cat_paths"])
                    name = fold(path.rsplit(b"/", 1)[-1])
                    if txn.get(name, db=db["cat_names"]) is None:
                        new_names.append(name)
                        txn.put(_rev(name), b"", db=db["cat_rnames"])
                    txn.put(name, pidb, db=db["cat_names"], dupdata=True)
                else:
                    pidb = bytes(pidb)
                base = lidb + pidb
                value = CAT_RUN.pack(ordinal, size, mtime, typ) + digest
                # The newest run of this file in this lineage: the last key below base + (ordinal + 1).
                key = base + ordb
                if runs.set_range(base + U32.pack(ordinal + 1)):
                    found = runs.prev()
                else:
                    found = runs.last()
                if found and runs.key()[:12] == base:
                    rk, rv = bytes(runs.key()), bytes(runs.value())
                    first = U32.unpack(rk[12:])[0]
                    last = CAT_RUN.unpack_from(rv)[0]
                    same = rv[4:] == value[4:]
                    if first == ordinal:
                        key = rk  # re-indexing after an interruption: overwrite
                    elif same and last in (ordinal - 1, ordinal):
                        key = rk  # unchanged since the previous restore point: extend the run
                        value = CAT_RUN.pack(ordinal, size, mtime, typ) + digest
                txn.put(key, value, db=db["cat_runs"])
                n += 1
            txn.put(b"P", U64.pack(next_pid), db=meta)
            if new_names:
                self._append_names(txn, new_names)
        return n

    # --- the flat list of distinct names ----------------------------------------------------------------
    # Distinct folded names also go to ``<index dir>/catalog-names`` (NUL-terminated, append-only), so a
    # glob without a usable literal prefix or suffix (``*ginx*``) is one sequential read and a memmem
    # scan, not millions of B-tree steps through an index mapped for random access. ``F`` in the
    # ``catalog`` db holds the committed length: bytes past it belong to a batch that never committed
    # and are cut off by the next append; a file shorter than ``F`` (lost cache file) is rebuilt from
    # ``cat_rnames``. Appends happen inside the LMDB write transaction, which serialises processes.
    @property
    def names_path(self) -> str:
        return os.path.join(self.index.path, "catalog-names")

    def _append_names(self, txn: lmdb.Transaction, names: list[bytes]) -> None:
        meta = self.db["catalog"]
        fv = txn.get(b"F", db=meta)
        committed = U64.unpack(fv)[0] if fv else 0
        fd = os.open(self.names_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < committed:
                os.close(fd)
                fd = -1
                committed = self._rewrite_names(txn)
                fd = os.open(self.names_path, os.O_RDWR | os.O_CLOEXEC)
            os.ftruncate(fd, committed)
            data = b"".join(nm + b"\0" for nm in names)
            os.pwrite(fd, data, committed)
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        txn.put(b"F", U64.pack(committed + len(data)), db=meta)

    def _rewrite_names(self, txn: lmdb.Transaction) -> int:
        data = b"".join(_rev(bytes(k)) + b"\0" for k in txn.cursor(db=self.db["cat_rnames"]).iternext(values=False))
        tmp = self.names_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.names_path)
        return len(data)

    def _scan_names(self, txn: lmdb.Transaction, literal: bytes) -> Iterator[bytes]:
        """Every distinct folded name containing ``literal`` (all names if it is empty)."""
        fv = txn.get(b"F", db=self.db["catalog"])
        size = U64.unpack(fv)[0] if fv else 0
        try:
            with open(self.names_path, "rb") as f:
                data = f.read(size)
        except FileNotFoundError:
            data = b""
        if len(data) < size or (fv is None and txn.stat(self.db["cat_rnames"])["entries"]):
            # the cache file was lost: answer from the B-tree (the next add rewrites the file)
            keys = (_rev(bytes(k)) for k in txn.cursor(db=self.db["cat_rnames"]).iternext(values=False))
            yield from (k for k in keys if literal in k)
            return
        if not literal:
            yield from (x for x in data.split(b"\0") if x)
            return
        i = data.find(literal)
        while i >= 0:
            a = data.rfind(b"\0", 0, i) + 1
            e = data.find(b"\0", i)
            yield data[a:e]
            i = data.find(literal, e)

    def forget_snapshot(self, sid: str) -> bool:
        """Drop a deleted restore point from queries (its runs stay until a rebuild with ``clear``)."""
        meta = self.db["catalog"]
        with self.index.write_txn() as txn:
            v = txn.get(b"S" + sid.encode(), db=meta)
            if v is None:
                return False
            lid, ordinal = msgpack.unpackb(v)[:2]
            txn.delete(b"O" + U32.pack(lid) + U32.pack(ordinal), db=meta)
            txn.delete(b"S" + sid.encode(), db=meta)
        return True

    def drop_lineage(self, lid: int) -> None:
        """Forget a lineage's runs and restore points (to re-index it in time order)."""
        meta = self.db["catalog"]
        lidb = U32.pack(lid)
        with self.index.write_txn() as txn:
            cur = txn.cursor(db=self.db["cat_runs"])
            if cur.set_range(lidb):
                while cur.key()[:4] == lidb:
                    if not cur.delete():
                        break
            cur = txn.cursor(db=meta)
            for k in list(_prefix_range(cur, b"O" + lidb, nodup=False)):
                sid = O_VAL.unpack(txn.get(k, db=meta))[0].hex()
                txn.delete(b"S" + sid.encode(), db=meta)
                txn.delete(k, db=meta)
            rec = msgpack.unpackb(txn.get(b"l" + lidb, db=meta), raw=False)
            rec.update(next=1, head=0, pending=None)
            txn.put(b"l" + lidb, msgpack.packb(rec), db=meta)

    # --- queries ----------------------------------------------------------------------------------------
    def _candidates_by_name(self, txn: lmdb.Transaction, name_pat: str, result: FindResult) -> Iterator[bytes]:
        """Path ids whose (folded) base name may match ``name_pat``."""
        names = txn.cursor(db=self.db["cat_names"])
        folded = name_pat.lower()
        if not GLOB_CHARS & set(folded):
            key = _b(folded)
            if names.set_key(key):
                for v in names.iternext_dup():
                    yield bytes(v)
            return
        rx = glob_regex(folded)
        pre, suf = _literal_ends(folded)
        inner = max(_literal_segments(folded), key=len, default="")
        if len(pre) >= 3 and len(pre) >= len(suf):
            keys: Iterator[bytes] = _prefix_range(names, _b(pre))
        elif len(suf) >= 3:
            rcur = txn.cursor(db=self.db["cat_rnames"])
            keys = (_rev(k) for k in _prefix_range(rcur, _rev(_b(suf)), nodup=False))
        else:
            keys = self._scan_names(txn, _b(inner))
        look = txn.cursor(db=self.db["cat_names"])
        for k in keys:
            result.scanned_names += 1
            if rx.match(_s(k)) and look.set_key(k):
                for v in look.iternext_dup():
                    yield bytes(v)

    def _candidates_by_prefix(self, txn: lmdb.Transaction, prefix: bytes, hosts: list[str]) -> Iterator[bytes]:
        cur = txn.cursor(db=self.db["cat_pathkey"])
        for h in hosts:
            base = h.encode() + b"\0" + prefix
            if not cur.set_range(base):
                continue
            for k, v in cur:
                if not k.startswith(base):
                    break
                yield bytes(v)

    def _versions_of(self, txn: lmdb.Transaction, pidb: bytes, host: str, lineages: list[tuple[int, dict[str, Any]]],
                     since_ns: int | None, tenant: str | None, path: str) -> list[Version]:
        out = []
        runs = txn.cursor(db=self.db["cat_runs"])
        meta = txn.cursor(db=self.db["catalog"])
        for lid, rec in lineages:
            if tenant is not None and rec.get("tenant", "") != tenant:
                continue
            base = U32.pack(lid) + pidb
            if not runs.set_range(base):
                continue
            for k, v in runs:
                if k[:12] != base:
                    break
                first = U32.unpack(k[12:])[0]
                last, size, mtime, typ = CAT_RUN.unpack_from(v)
                digest = bytes(v[CAT_RUN.size :]) or None
                snaps = []
                lo = b"O" + k[:4] + U32.pack(first)
                hi = b"O" + k[:4] + U32.pack(last)
                if meta.set_range(lo):
                    for ok, ov in meta:
                        if ok > hi:
                            break
                        sid, t = O_VAL.unpack(ov)
                        if since_ns is None or t >= since_ns:
                            snaps.append((sid.hex(), t))
                if snaps:
                    out.append(Version(host, path, typ.decode(), size, mtime, digest, snaps))
        return out

    def find(self, pattern: str, host: str | None = None, since_ns: int | None = None, tenant: str | None = None,
             limit: int = 1000, ignore_case: bool = False) -> FindResult:
        """Files whose base name matches a glob (``nginx.conf``, ``*.conf``), whose path matches a path glob
        (``/etc/*/nginx.conf``), or that lie under a path (``/etc/nginx`` or ``/etc/nginx/``). One
        ``Version`` per file state, with the restore points (at or after ``since_ns``) that hold it."""
        result = FindResult()
        if not pattern:
            return result
        is_path = "/" in pattern
        has_glob = bool(GLOB_CHARS & set(pattern))
        with self.index.read_txn() as txn:
            hosts = [host] if host else self.hosts_in(txn)
            # Lineages that can contribute at all (tenant, and a newest restore point after --since):
            # candidates of other hosts are dropped after one lookup, and no lineage means no answer.
            lineages = {h: [(lid, rec) for lid, rec in self._lineages_of(txn, h)
                            if (tenant is None or rec.get("tenant", "") == tenant)
                            and (since_ns is None or rec.get("head", 0) >= since_ns)] for h in hosts}
            lineages = {h: ls for h, ls in lineages.items() if ls}
            hosts = sorted(lineages)
            if not lineages:
                return result
            pcur = txn.cursor(db=self.db["cat_paths"])
            if not is_path:
                rx = glob_regex(pattern, ignore_case)
                cands = self._candidates_by_name(txn, pattern, result)
                check: Callable[[bytes], bool] = lambda p: bool(rx.match(_s(p.rsplit(b"/", 1)[-1])))  # noqa: E731
            elif not has_glob:
                root = pattern.rstrip("/") or "/"
                exact = _b(root)
                sub = exact.rstrip(b"/") + b"/"
                cands = self._candidates_by_prefix(txn, exact, hosts)
                check = lambda p: p == exact or p.startswith(sub)  # noqa: E731
            else:
                rx = glob_regex(pattern, ignore_case)
                base = pattern.rsplit("/", 1)[1]
                pre_path = _literal_ends(pattern)[0]
                bpre, bsuf = _literal_ends(base)
                if base and (not GLOB_CHARS & set(base) or max(len(bpre), len(bsuf)) >= 3
                             or len(pre_path) <= 1) and "**" not in base:
                    cands = self._candidates_by_name(txn, base, result)
                else:
                    cands = self._candidates_by_prefix(txn, _b(pre_path), hosts)
                check = lambda p: bool(rx.match(_s(p)))  # noqa: E731
            seen: set[bytes] = set()
            for pidb in cands:
                if pidb in seen:
                    continue
                seen.add(pidb)
                pk = pcur.get(pidb)
                if pk is None:
                    continue
                h, _, path = bytes(pk).partition(b"\0")
                hs = _s(h)
                if hs not in lineages or not check(path):
                    continue
                vs = self._versions_of(txn, pidb, hs, lineages[hs], since_ns, tenant, _s(path))
                for v in _merge(vs):
                    if len(result.hits) >= limit:
                        result.truncated = True
                        break
                    result.hits.append(v)
                if result.truncated:
                    break
        result.hits.sort(key=lambda v: (v.host, v.path, v.first[1]))
        return result

    def hosts_in(self, txn: lmdb.Transaction) -> list[str]:
        cur = txn.cursor(db=self.db["catalog"])
        return sorted({_s(k[1 : k.index(b"\0")]) for k in _prefix_range(cur, b"H", nodup=False)})

    def versions(self, host: str, path: str, tenant: str | None = None) -> list[Version]:
        """The states of one file across the host's restore points, oldest first, one per change."""
        p = _b("/" + path.lstrip("/"))
        with self.index.read_txn() as txn:
            pidb = txn.get(host.encode() + b"\0" + p, db=self.db["cat_pathkey"])
            if pidb is None:
                return []
            vs = self._versions_of(txn, bytes(pidb), host, self._lineages_of(txn, host), None, tenant, _s(p))
        return _merge(vs)

    def stats(self) -> dict[str, int]:
        with self.index.read_txn() as txn:
            st = {n: int(txn.stat(self.db[n])["entries"]) for n in ("cat_paths", "cat_runs", "cat_rnames")}
            cur = txn.cursor(db=self.db["catalog"])
            snaps = [msgpack.unpackb(txn.get(k, db=self.db["catalog"])) for k in _prefix_range(cur, b"S", nodup=False)]
        return {"restore_points": len(snaps), "entries": sum(s[3] for s in snaps), "paths": st["cat_paths"],
                "runs": st["cat_runs"], "names": st["cat_rnames"]}


class OutOfOrder(Exception):
    """A restore point older than its lineage's newest catalogued one (internal: triggers a re-index)."""

    def __init__(self, lineage: int) -> None:
        super().__init__(f"lineage {lineage}")
        self.lineage = lineage


def _merge(vs: list[Version]) -> list[Version]:
    """Order by first restore point and fold adjacent equal states (same file seen by two lineages)."""
    if len(vs) <= 1:
        return vs
    items = sorted(((t, sid, v) for v in vs for sid, t in v.snapshots), key=lambda x: x[0])
    out: list[Version] = []
    for t, sid, v in items:
        if out and (out[-1].type, out[-1].size, out[-1].mtime_ns, out[-1].digest) == (v.type, v.size, v.mtime_ns, v.digest):
            out[-1].snapshots.append((sid, t))
        else:
            out.append(Version(v.host, v.path, v.type, v.size, v.mtime_ns, v.digest, [(sid, t)]))
    return out


# --- repository-level entry points ----------------------------------------------------------------------
def index_snapshot(repo: Repository, snap: Snapshot) -> int:
    """Catalogue a files restore point (image restore points are fed by the guest-filesystem indexer)."""
    if snap.kind != "files" or snap.tree is None:
        return 0
    cat = Catalog(repo.index)
    try:
        return cat.add(snap, tree_entries(repo, snap))
    except OutOfOrder as e:
        return _reindex_lineage(repo, cat, e.lineage)


def _reindex_lineage(repo: Repository, cat: Catalog, lid: int) -> int:
    with repo.index.read_txn() as txn:
        rec = msgpack.unpackb(txn.get(b"l" + U32.pack(lid), db=cat.db["catalog"]), raw=False)
    cat.drop_lineage(lid)
    n = 0
    for s in repo.snapshots():
        if (s.kind == rec["kind"] and (s.vm or s.host) == rec["host"] and str(s.meta.get("tenant", "")) == rec["tenant"]
                and lineage_source(s) == rec["source"] and s.tree is not None):
            n += cat.add(s, tree_entries(repo, s))
    return n


def rebuild(repo: Repository, clear: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Catalogue every files restore point not yet in the catalog (all of them with ``clear``), oldest
    first; forget catalogued restore points that no longer exist. ``check --repair`` calls this."""
    cat = Catalog(repo.index)
    if clear:
        cat.clear()
    snaps = repo.snapshots()
    existing = {s.id for s in snaps}
    forgotten = sum(cat.forget_snapshot(sid) for sid in cat.snapshot_ids() - existing)
    todo = [s for s in snaps if s.kind == "files" and s.tree is not None and not cat.has_snapshot(s.id)]
    entries = 0
    for i, s in enumerate(todo):
        if progress:
            progress(f"cataloguing restore point {i + 1}/{len(todo)} ({s.short_id})")
        entries += index_snapshot(repo, s)
    return {"indexed": len(todo), "entries": entries, "forgotten": forgotten}


def uncatalogued(repo: Repository, cat: Catalog | None = None) -> int:
    cat = cat or Catalog(repo.index)
    have = cat.snapshot_ids()
    return sum(1 for s in repo.snapshots() if s.kind == "files" and s.id not in have)


def find(repo: Repository, pattern: str, host: str | None = None, since_ns: int | None = None,
         tenant: str | None = None, limit: int = 1000, ignore_case: bool = False) -> FindResult:
    cat = Catalog(repo.index)
    r = cat.find(pattern, host=host, since_ns=since_ns, tenant=tenant, limit=limit, ignore_case=ignore_case)
    r.uncatalogued = uncatalogued(repo, cat)
    return r


def versions(repo: Repository, host: str, path: str, tenant: str | None = None) -> list[Version]:
    return Catalog(repo.index).versions(host, path, tenant)


__all__ = ["Catalog", "FindResult", "Version", "content_digest", "find", "glob_regex", "index_snapshot",
           "rebuild", "tree_entries", "uncatalogued", "versions", "walk_guestfs", "TYPE_DIR"]
