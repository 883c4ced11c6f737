"""Replication: copy restore points from one repository to another (``ihb sync``), restic-``copy`` style.

Why: restore points must also live off-site, on another appliance or bucket, and that copy must
survive the loss or compromise of the source.

How a restore point travels:

* Its tree pages (or image map pages) are read from the source, authenticated, and walked. Every
  chunk they reference is looked up in the target; only chunks the target lacks are read from the
  source, checked (AEAD, plus the plaintext must hash to its id), and written to the target.
* Both repositories normally have different keys, hence different keyed chunk ids. Chunks are then
  decrypted, re-id'ed with the target's id key and re-encrypted, and the pages that reference them are
  rewritten. A translation table (source id -> target id, in the target's local cache directory)
  makes the next run incremental without reading unchanged chunks again; an entry counts only while
  the target's index holds the target id, so a stale table costs time, never correctness. With the
  same key, ids are kept and the table is not needed.
* Verified on arrival, before the commit: every pack this run wrote is read back from the target and
  every blob in it authenticated and hashed (``verify="data"``, the default; ``"index"`` checks only
  pack trailers); every chunk the new restore point references must be in the target's index.
* The restore point object is written last (docs/format.md §8). An interrupted sync leaves only
  unreferenced packs behind; the next run finds their chunks in the target and continues there.

What the target may delete (pull-only, ransomware protection): the source is opened without a lock and
wrapped read-only, so a sync never writes or deletes anything there. Deletions at the source are never
mirrored. The target's own retention (``--keep-*``) is evaluated by the target over the copies that came
from this source only; source restore points dated in the future are refused, so forged times cannot
push genuine copies out of time-bucketed rules, and retention locks on the target (retention_lock.py)
always hold. ``--keep-last`` counts restore points and so *can* be pushed by a flood of new ones; prefer
the daily/weekly/monthly rules on a pull-only target.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from . import format as fmt
from .check import _verify_pack, referenced
from .errors import IntegrityError, InvalidArgument
from .pack import read_trailer
from .prune import delete_snapshot
from .repository import BlobWriter, Repository
from .retention import Policy, apply_policy
from .retention_lock import active_locks
from .snapshot import DiskRecord, Snapshot
from .tree import TYPE_DIR, pack_node, root_node, unpack
from .workers import default_threads

log = logging.getLogger(__name__)

SYNC_META = "sync"  # meta key on a copied restore point: {"repo": source repo id, "id": source restore point id}
FUTURE_SLACK_NS = 24 * 3600 * 10**9  # clock skew tolerated before a source restore point counts as forged


# --- the read-only source --------------------------------------------------------------------------------
class ReadOnlyStorage:
    """Wraps the source's storage: any write or delete is a bug and fails loudly."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.location = inner.location

    def __getattr__(self, name: str) -> Any:
        if name in ("put_bytes", "put_file", "delete", "lock", "prepare_init"):
            raise AttributeError(f"sync opened the source {self.location} read-only; {name} is not allowed")
        return getattr(self._inner, name)

    def exists(self, name: str) -> bool:
        return bool(self._inner.exists(name))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return bytes(self._inner.get(name, offset, length))

    def size(self, name: str) -> int:
        return int(self._inner.size(name))

    def list(self, prefix: str) -> Iterator[str]:
        return iter(self._inner.list(prefix))


# --- translation table -------------------------------------------------------------------------------------
class IdMap:
    """source chunk id -> target chunk id, persisted in the target's cache dir (SQLite, WAL)."""

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._mem: dict[bytes, bytes] = {}
        self._db: sqlite3.Connection | None = None
        self._pending = 0
        self._last_commit = time.monotonic()
        if path:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS idmap (src BLOB PRIMARY KEY, dst BLOB NOT NULL) WITHOUT ROWID")
            self._db.execute("BEGIN")

    def get(self, src: bytes) -> bytes | None:
        with self._lock:
            v = self._mem.get(src)
            if v is None and self._db is not None:
                row = self._db.execute("SELECT dst FROM idmap WHERE src = ?", (src,)).fetchone()
                if row is not None:
                    v = bytes(row[0])
            return v

    def put(self, src: bytes, dst: bytes) -> None:
        with self._lock:
            self._mem[src] = dst
            if self._db is not None:
                self._db.execute("INSERT OR REPLACE INTO idmap VALUES (?, ?)", (src, dst))
                self._pending += 1
                # Commit often: an interrupted run's entries are what lets the next one skip re-reading.
                if self._pending >= 256 or time.monotonic() - self._last_commit > 1.0:
                    self._commit_locked()
            if len(self._mem) > 200_000:
                self._mem.clear()

    def _commit_locked(self) -> None:
        if self._db is not None:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._pending = 0
            self._last_commit = time.monotonic()

    def commit(self) -> None:
        with self._lock:
            self._commit_locked()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.execute("COMMIT")
                self._db.close()
                self._db = None


# --- report ----------------------------------------------------------------------------------------------
@dataclass
class SyncReport:
    copied: list[dict[str, str]] = field(default_factory=list)  # {"source": id, "target": id}
    already: list[str] = field(default_factory=list)  # source ids already on the target
    refused: list[dict[str, str]] = field(default_factory=list)  # {"source": id, "reason": ...}
    not_copied_by_policy: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # target ids removed by the target's retention
    stats: dict[str, int] = field(default_factory=lambda: {
        "chunks_read": 0, "bytes_read": 0, "chunks_written": 0, "bytes_written": 0, "stored_bytes": 0,
        "packs_verified": 0, "blobs_verified": 0})
    dry_run: bool = False

    def to_obj(self) -> dict[str, Any]:
        return {"copied": self.copied, "already_present": self.already, "refused": self.refused,
                "not_copied_by_policy": self.not_copied_by_policy, "removed": self.removed, "stats": self.stats,
                "dry_run": self.dry_run}


# --- copying -----------------------------------------------------------------------------------------------
class _Copier:
    """Copies the blobs of restore points into the target through one BlobWriter (not re-entrant)."""

    def __init__(self, src: Repository, dst: Repository, idmap: IdMap, report: SyncReport, threads: int) -> None:
        self.src, self.dst, self.map, self.report = src, dst, idmap, report
        self.same_key = (src.key.master == dst.key.master and src.config.encryption == dst.config.encryption)
        self.writer: BlobWriter = dst.writer()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ihb-sync")
        self._stats_lock = threading.Lock()
        self.written_pages: list[tuple[int, bytes]] = []  # (kind, target id) of pages added this restore point

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _known(self, sid: bytes) -> bytes | None:
        """The target id of a source blob if the target already has it."""
        did = sid if self.same_key else self.map.get(sid)
        if did is not None and self.dst.has_blob(did):
            return did
        return None

    def _read(self, kind: int, sid: bytes) -> bytes:
        plain = self.src.get_blob(kind, sid)  # AEAD authenticates it under its id and kind
        if self.src.chunk_id(plain) != sid:
            raise IntegrityError(f"source chunk {sid.hex()[:16]} does not hash to its id; run `ihb check --read-data` "
                                 "on the source")
        with self._stats_lock:
            self.report.stats["chunks_read"] += 1
            self.report.stats["bytes_read"] += len(plain)
        return plain

    def _store(self, kind: int, sid: bytes, plain: bytes) -> bytes:
        did = sid if self.same_key else self.dst.chunk_id(plain)
        self.writer.add(kind, plain, did)
        if not self.same_key:
            self.map.put(sid, did)
        return did

    def _chunk(self, sid: bytes) -> bytes:
        did = self._known(sid)
        if did is not None:
            return did
        return self._store(fmt.BlobKind.DATA, sid, self._read(fmt.BlobKind.DATA, sid))

    def chunks(self, ids: Iterable[bytes]) -> dict[bytes, bytes]:
        uniq = list(dict.fromkeys(ids))
        return dict(zip(uniq, self.pool.map(self._chunk, uniq), strict=True))

    def tree_page(self, sid: bytes) -> bytes:
        did = self._known(sid)
        if did is not None:
            return did  # written (after all its children) by an earlier run, and verified then
        plain = self._read(fmt.BlobKind.TREE, sid)
        nodes = unpack(plain)
        if not isinstance(nodes, list):
            raise IntegrityError(f"source tree page {sid.hex()[:16]} is malformed")
        mapped = self.chunks(cid for n in nodes for cid, _ln in n.get("c", ()) if cid is not None)
        for n in nodes:
            if "c" in n:
                n["c"] = [[mapped[c] if c is not None else None, ln] for c, ln in n["c"]]
            if n.get("t") == TYPE_DIR and n.get("d"):
                n["d"] = [[first, self.tree_page(pid)] for first, pid in n["d"]]
        data = plain if self.same_key else msgpack.packb(nodes, use_bin_type=True)
        did = self._store(fmt.BlobKind.TREE, sid, data)
        self.written_pages.append((fmt.BlobKind.TREE, did))
        return did

    def image_page(self, sid: bytes) -> bytes:
        did = self._known(sid)
        if did is not None:
            return did
        plain = self._read(fmt.BlobKind.IMAGE_MAP, sid)
        entries = msgpack.unpackb(plain)
        if not isinstance(entries, list) or len(entries) != fmt.IMAGE_MAP_PAGE:
            raise IntegrityError(f"source image map page {sid.hex()[:16]} is malformed")
        mapped = self.chunks(e for e in entries if e)
        data = plain if self.same_key else msgpack.packb([mapped[e] if e else None for e in entries])
        did = self._store(fmt.BlobKind.IMAGE_MAP, sid, data)
        self.written_pages.append((fmt.BlobKind.IMAGE_MAP, did))
        return did

    def snapshot(self, snap: Snapshot, parent: str | None) -> Snapshot:
        """The target's version of ``snap``: same record, target ids, provenance in meta."""
        self.written_pages = []
        tree = snap.tree
        if snap.kind == "files":
            root = root_node(snap.tree)
            if root.get("d"):
                root["d"] = [[first, self.tree_page(pid)] for first, pid in root["d"]]
            tree = pack_node(root)
        disks = [DiskRecord(d.name, d.size, d.chunk_size, [self.image_page(p) if p else None for p in d.pages],
                            dict(d.stats)) for d in snap.disks]
        meta = dict(snap.meta)
        meta[SYNC_META] = {"repo": self.src.config.repo_id, "id": snap.id}
        return replace(snap, id="", tree=tree, disks=disks, meta=meta, parent=parent)


def _origin(s: Snapshot) -> tuple[str, str] | None:
    o = s.meta.get(SYNC_META)
    if isinstance(o, dict) and isinstance(o.get("repo"), str) and isinstance(o.get("id"), str):
        return o["repo"], o["id"]
    return None


def _verify_arrival(dst: Repository, new_packs: Iterable[bytes], snap: Snapshot, mode: str, report: SyncReport) -> None:
    """Everything this restore point needs is in the target, readable and authentic: before the commit."""
    for pid in new_packs:
        name = fmt.pack_name(pid)
        if mode == "data":
            count, bad, err = _verify_pack(dst, name)
            if err or bad:
                raise IntegrityError(f"sync: pack {name} failed verification on the target after upload: "
                                     f"{err or f'{len(bad)} damaged blobs'}; the restore point was not committed")
            report.stats["blobs_verified"] += count
        else:
            read_trailer(dst.storage, dst.envelope, name)
        report.stats["packs_verified"] += 1
    missing = 0
    for cid, where in referenced(dst, snap):
        if not dst.has_blob(cid):
            missing += 1
            log.error("sync: %s: chunk %s missing on the target", where, cid.hex()[:16])
    if missing:
        raise IntegrityError(f"sync: {missing} chunks of restore point {snap.short_id} are missing on the target; "
                             "it was not committed")


def sync(
    src: Repository,
    dst: Repository,
    *,
    hosts: Sequence[str] = (),
    tags: Sequence[str] = (),
    policy: Policy | None = None,
    verify: str = "data",
    dry_run: bool = False,
    map_path: str | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> SyncReport:
    """Copy the source's restore points the target lacks (oldest first), then apply the target's retention.

    ``src`` should have been opened with ``lock=False``; it is wrapped read-only here.
    """
    if verify not in ("data", "index"):
        raise InvalidArgument("verify must be 'data' or 'index'")
    if src.config.repo_id == dst.config.repo_id:
        raise InvalidArgument("source and target are the same repository")
    if not isinstance(src.storage, ReadOnlyStorage):
        src.storage = ReadOnlyStorage(src.storage)  # type: ignore[assignment]
    report = SyncReport(dry_run=dry_run)
    say = progress or (lambda _m: None)
    src_id, dst_id = src.config.repo_id, dst.config.repo_id

    def wanted(s: Snapshot) -> bool:
        return (not hosts or s.host in hosts or (s.vm or "") in hosts) and (not tags or any(t in s.tags for t in tags))

    dst_snaps = dst.snapshots()
    # Already there: a copy of it from this source, or it is itself a copy of a target restore point.
    have = {o[1]: s.id for s in dst_snaps if (o := _origin(s)) and o[0] == src_id}
    dst_ids = {s.id for s in dst_snaps}
    now = time.time_ns()
    candidates = []
    for s in src.snapshots():
        if not wanted(s):
            continue
        o = _origin(s)
        if s.id in have or (o and o[0] == dst_id and o[1] in dst_ids):
            report.already.append(s.id)
            continue
        if s.time_ns > now + FUTURE_SLACK_NS:
            report.refused.append({"source": s.id, "reason": "dated in the future (forged or wrong clock)"})
            continue
        candidates.append(s)
    copies = [s for s in dst_snaps if (o := _origin(s)) and o[0] == src_id and wanted(s)]
    # Retention (repo/retention.py, the same rules as prune, retention locks honoured) over the existing
    # copies plus the candidates, so that nothing is copied only to be removed at once.
    drop: set[str] = set()
    if policy is not None and not policy.empty():
        _keep, remove, _why = apply_policy(copies + candidates, policy, now, locks=active_locks(dst, copies, now))
        drop = {s.id for s in remove}
    todo = sorted((s for s in candidates if s.id not in drop), key=lambda s: (s.time_ns, s.id))
    report.not_copied_by_policy = sorted(s.id for s in candidates if s.id in drop)
    remove_dst = [s for s in copies if s.id in drop]
    if dry_run:
        report.copied = [{"source": s.id, "target": ""} for s in todo]
        report.removed = [s.id for s in remove_dst]
        return report

    idmap = IdMap(None if src.key.master == dst.key.master else map_path)
    copier = _Copier(src, dst, idmap, report, threads or default_threads())
    try:
        for i, s in enumerate(todo):
            say(f"restore point {i + 1}/{len(todo)}: {s.short_id} ({s.kind} {s.vm or s.host})")
            full = src.load_snapshot(s.id)  # authenticated object, not the index's copy
            packs_before = set(dst.index.packs())
            parent = have.get(full.parent) if full.parent else None
            new = copier.snapshot(full, parent)
            copier.writer.flush()
            idmap.commit()
            new_packs = set(dst.index.packs()) - packs_before
            _verify_arrival(dst, new_packs, new, verify, report)
            stored = dst.store_snapshot(new)  # the commit point
            have[s.id] = stored.id
            report.copied.append({"source": s.id, "target": stored.id})
    finally:
        w = copier.writer
        if not w.closed:
            try:
                w.flush()
            except Exception as e:  # noqa: BLE001 - the original error matters more
                log.warning("sync: final flush failed: %s", e)
        for k_src, k_dst in (("chunks_written", "new_chunks"), ("bytes_written", "new_bytes"), ("stored_bytes", "stored_bytes")):
            report.stats[k_src] = int(w.stats[k_dst])
        copier.close()
        idmap.close()
    for s in remove_dst:
        say(f"retention: removing {s.short_id} from the target")
        delete_snapshot(dst, s)  # prune's one deletion path (catalog, notes)
        report.removed.append(s.id)
    return report


def default_map_path(dst: Repository, src: Repository) -> str:
    """The translation table lives beside the target's index (a cache: losing it costs time only)."""
    return os.path.join(os.path.dirname(dst.index.path), "sync", f"{src.config.repo_id}.sqlite")
