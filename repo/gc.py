"""Garbage collection: delete blobs no restore point references and compact packs that are mostly
garbage, while backups keep running (docs/format.md §9 states the rule; this module implements it).

Why not the exclusive lock: backups hold the shared lock for their whole run and frequent incrementals
mean one is nearly always running, so a GC that needs the exclusive lock would rarely run. The danger
with concurrency is specific: a running backup may have found a blob in the index (deduplication, the
files cache, an image map's parent) that no restore point references at this moment, and its restore
point, committed later, will reference it. GC therefore works in two phases:

1. **Mark** (time T_c). Walk every restore point; every indexed blob that none references and whose
   pack is older than the *cutoff* is *condemned*: in one LMDB commit its row moves from ``chunks`` to
   ``condemned`` and the pending state (T_c, cutoff, the restore points scanned) is recorded; then T_m,
   taken after that commit, is added to the state. From T_m on no writer can find a condemned blob:
   writers look blobs up in ``chunks`` only after registering a session (sessions.py), and the files
   cache and the server's "have" answers are checked against it. Readers still find condemned blobs
   (``Repository.get_blob`` falls back to ``condemned``), so a restore point committed meanwhile by an
   older backup restores at once. The cutoff is the older of ``now - grace`` and the start of the
   oldest live session, so the fresh packs of running backups (and of writers that do not register,
   for ``grace``) are not even considered.
2. **Sweep**, only once no live session started before T_m (this run waits up to ``wait`` seconds,
   otherwise a later run sweeps). Restore points committed since the mark are walked, and condemned
   blobs they reference are *rescued* (re-indexed). Every other blob that is not in the index is
   garbage. Packs older than the cutoff with no indexed blob are deleted; packs whose indexed
   ("live") bytes are below ``min_live_ratio`` of their size are compacted: their live blobs are
   copied, still sealed, into new packs, each new pack is made durable, then the index is pointed at
   it (one commit, compare-and-set), and only then the old packs are deleted. Finally the condemned
   rows and the state are dropped.

A kill at any point leaves every kept restore point readable: a condemned blob is never deleted before
the sweep's rescue; a compacted blob exists in its old pack until the index points at its durable
copy; a new pack the index never learnt about is a dead copy the next GC removes. The next run resumes
(records T_m if the kill came before it, then sweeps). Readers that looked up a blob in a pack that was
deleted meanwhile retry through the index (``Repository.get_blob``). The state lives in the index, as
the condemnation is a statement about the index: if the index is lost and rebuilt from the packs,
every blob is indexed again and the condemnation is simply gone.

Deleting a restore point that the mark did not scan (it was committed after T_c) could hide a rescue,
so ``prune`` aborts a pending condemnation first (``abort_pending``: condemned blobs are re-indexed).
GC and prune exclude each other with a maintenance flock next to the index; ``check --repair`` takes the
exclusive repository lock and thus excludes both. One index per repository is assumed (one appliance
runs GC; other appliances reading the same storage only read).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import format as fmt
from .check import CheckReport, referenced
from .errors import IhbError, IntegrityError, RepositoryLocked
from .pack import BlobLoc, PackWriter
from .repository import Repository
from .sessions import SessionInfo, list_sessions, remove_stale

log = logging.getLogger(__name__)

DEFAULT_GRACE = 6 * 3600.0  # seconds; protects packs of writers that do not register a session
DEFAULT_MIN_LIVE_RATIO = 0.5

Progress = Callable[[str], None]


class GcRefused(IhbError):
    """Garbage collection cannot run safely now; the message says why."""

    exit_code = 62


# --- test-only fault injection (docs STYLE G5: kill -9 between every stage) -----------------------------
def _stop_point(name: str) -> None:
    if os.environ.get("IHB_TESTONLY_GC_STOP") == name:
        os.kill(os.getpid(), signal.SIGSTOP)  # the test kills us with SIGKILL while stopped here


# --- the maintenance lock -------------------------------------------------------------------------------
@contextlib.contextmanager
def maintenance_lock(repo: Repository, wait: float = 5.0) -> Iterator[None]:
    """One prune or GC at a time per appliance (flock next to the index; dies with its holder)."""
    path = os.path.join(os.path.dirname(repo.index.path), "maintenance.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise RepositoryLocked("another prune or gc is running on this repository; retry when it "
                                           "has finished") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# --- the pending condemnation (index sub-databases ``condemned`` and ``gc``) ----------------------------
@dataclass
class Pending:
    t_c: int
    cutoff_ns: int
    scanned: set[str]
    condemned: dict[bytes, BlobLoc]
    t_m: int | None = None

    @classmethod
    def load(cls, repo: Repository) -> Pending | None:
        raw = repo.index.gc_state()
        if raw is None:
            return None
        o = msgpack.unpackb(raw, raw=False)
        return cls(int(o["t_c"]), int(o["cutoff"]), set(o["scanned"]), dict(repo.index.iter_condemned()),
                   int(o["t_m"]) if o.get("t_m") else None)

    def state(self) -> bytes:
        return msgpack.packb({"t_c": self.t_c, "cutoff": self.cutoff_ns, "scanned": sorted(self.scanned),
                              "t_m": self.t_m})


def abort_pending(repo: Repository) -> int:
    """Give up a pending condemnation: re-index its blobs (those whose packs still exist)."""
    p = Pending.load(repo)
    if p is None:
        return 0
    n = repo.index.rescue(list(p.condemned), set(repo.index.packs()))
    repo.index.end_gc()
    log.info("gc: pending condemnation of %d blobs aborted (%d re-indexed)", len(p.condemned), n)
    return n


def before_snapshot_deletion(repo: Repository, sids: set[str]) -> bool:
    """Called by prune before deleting restore points: a restore point the pending mark did not scan may
    reference condemned blobs that a running backup reused from it, so the condemnation is aborted."""
    p = Pending.load(repo)
    if p is None or sids <= p.scanned:
        return False
    abort_pending(repo)
    return True


# --- helpers --------------------------------------------------------------------------------------------
def _pack_times(repo: Repository) -> dict[bytes, int]:
    """Pack id -> creation (modification) time in ns, from the storage."""
    out: dict[bytes, int] = {}
    lwt = getattr(repo.storage, "list_with_times", None)
    if lwt is not None:
        for name, mtime, _size in lwt(fmt.DATA_PREFIX):
            pid = fmt.pack_id_from_name(name)
            if pid is not None:
                out[pid] = int(mtime * 1e9)
        return out
    root = getattr(repo.storage, "root", None)
    for name in repo.storage.list(fmt.DATA_PREFIX):
        pid = fmt.pack_id_from_name(name)
        if pid is None:
            continue
        try:
            out[pid] = os.stat(os.path.join(root, name)).st_mtime_ns if root else time.time_ns()
        except FileNotFoundError:
            continue
    return out


def _references(repo: Repository, sids: list[str], progress: Progress | None) -> set[bytes]:
    """Every blob the given restore points reference; refuses if any of them cannot be walked, since an
    unreadable tree page hides references and GC would delete what it cannot see."""
    refs: set[bytes] = set()
    report = CheckReport()
    for i, sid in enumerate(sids):
        if progress:
            progress(f"walking restore point {i + 1}/{len(sids)}")
        try:
            snap = repo.load_snapshot(sid)
            for cid, _where in referenced(repo, snap, report):
                refs.add(cid)
        except FileNotFoundError:
            continue  # deleted meanwhile (prune is excluded; a manual deletion): nothing to protect
        except IntegrityError as e:
            raise GcRefused(f"restore point {sid[:12]} cannot be read completely ({e}); GC would not see what it "
                            "references. Run `ihb check --read-data` and repair first") from None
    if report.errors:
        raise GcRefused(f"{report.errors[0]}; GC would not see what lies below it. Run `ihb check --read-data` "
                        "and repair first")
    return refs


@dataclass
class GcReport:
    dry_run: bool = False
    phase: str = ""  # "done", "deferred" (sessions still running), "nothing to do"
    condemned_blobs: int = 0
    condemned_bytes: int = 0
    rescued_blobs: int = 0
    deleted_packs: int = 0
    compacted_packs: int = 0
    new_packs: int = 0
    copied_bytes: int = 0
    bytes_before: int = 0  # pack bytes when the run started / ended (concurrent backups add to them)
    bytes_after: int = 0
    deleted_bytes: int = 0  # packs this run deleted
    written_bytes: int = 0  # packs this run wrote (compaction)
    blocking: list[str] = field(default_factory=list)
    stale_sessions_removed: int = 0
    seconds: float = 0.0

    @property
    def freed_bytes(self) -> int:
        """Space this run gave back (for a dry run: the estimate)."""
        if self.dry_run:
            return self.bytes_before - self.bytes_after
        return self.deleted_bytes - self.written_bytes

    def to_obj(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["freed_bytes"] = self.freed_bytes
        return d


@dataclass
class GcPlan:
    """What a GC run would do now; ``execute`` does it (and re-derives everything it acts on)."""

    repo: Repository
    grace: float
    min_live_ratio: float
    pending: Pending | None
    cutoff_ns: int
    snapshot_ids: list[str]
    condemn: dict[bytes, BlobLoc]
    pack_sizes: dict[bytes, int]
    live_bytes: dict[bytes, int]
    sessions: list[SessionInfo]

    def estimate(self) -> GcReport:
        """Space a sweep would free if no running backup needs any condemned blob."""
        r = GcReport(dry_run=True, phase="plan")
        r.condemned_blobs = len(self.condemn)
        r.condemned_bytes = sum(loc.length for loc in self.condemn.values())
        r.bytes_before = sum(self.pack_sizes.values())
        after = r.bytes_before
        times_ok = self._old_packs()
        for pid, size in self.pack_sizes.items():
            if pid not in times_ok:
                continue
            live = self.live_bytes.get(pid, 0)
            if live == 0:
                r.deleted_packs += 1
                after -= size
            elif live < self.min_live_ratio * size:
                r.compacted_packs += 1
                after -= size - live
        r.bytes_after = after
        r.blocking = [s.describe() for s in self.sessions if s.live]
        return r

    def _old_packs(self) -> set[bytes]:
        times = _pack_times(self.repo)
        return {p for p, t in times.items() if t < self.cutoff_ns}

    def execute(self, progress: Progress | None = None, wait: float = 0.0) -> GcReport:
        return run_gc(self.repo, grace=self.grace, min_live_ratio=self.min_live_ratio, wait=wait, progress=progress)


def _cutoff(repo: Repository, grace: float, sessions: list[SessionInfo]) -> int:
    now = time.time_ns()
    c = now - int(grace * 1e9)
    live = [s.start_ns for s in sessions if s.live]
    return min([c, *live])


def _live_bytes(repo: Repository, exclude: dict[bytes, BlobLoc] | None = None) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for bid, loc in repo.index.iter_chunks():
        if exclude and bid in exclude:
            continue
        out[loc.pack] = out.get(loc.pack, 0) + loc.length
    return out


def plan_gc(repo: Repository, grace: float = DEFAULT_GRACE, min_live_ratio: float = DEFAULT_MIN_LIVE_RATIO,
            progress: Progress | None = None) -> GcPlan:
    """Read-only: what the mark would condemn now, and the pack picture after it (for --dry-run)."""
    pending = Pending.load(repo)
    sessions = list_sessions(repo)
    cutoff = pending.cutoff_ns if pending else _cutoff(repo, grace, sessions)
    sids = [s.id for s in repo.snapshots()]
    condemn: dict[bytes, BlobLoc] = {}
    if pending is None:
        refs = _references(repo, sids, progress)
        times = _pack_times(repo)
        for bid, loc in repo.index.iter_chunks():
            if bid not in refs and times.get(loc.pack, cutoff) < cutoff:
                condemn[bid] = loc
    packs = repo.index.packs()
    return GcPlan(repo, grace, min_live_ratio, pending, cutoff, sids, condemn,
                  {p: size for p, (size, _n) in packs.items()}, _live_bytes(repo, condemn), sessions)


# --- the run --------------------------------------------------------------------------------------------
def run_gc(repo: Repository, grace: float = DEFAULT_GRACE, min_live_ratio: float = DEFAULT_MIN_LIVE_RATIO,
           wait: float = 0.0, progress: Progress | None = None) -> GcReport:
    """Mark (unless a condemnation is pending), then sweep if no session from before the mark is live
    (waiting up to ``wait`` seconds for them). Returns what was done."""
    t0 = time.monotonic()
    report = GcReport()
    with maintenance_lock(repo):
        report.bytes_before = sum(size for size, _n in repo.index.packs().values())
        pending = Pending.load(repo)
        if pending is None:
            pending = _mark(repo, grace, progress, report)
        elif pending.t_m is None:
            _set_t_m(repo, pending)  # the last run died between the condemnation and recording T_m
        else:
            report.condemned_blobs = len(pending.condemned)
            report.condemned_bytes = sum(loc.length for loc in pending.condemned.values())
        assert pending.t_m is not None
        blocking = _wait_for_sessions(repo, pending.t_m, wait, progress)
        if blocking:
            report.phase = "deferred"
            report.blocking = [s.describe() for s in blocking]
            report.bytes_after = report.bytes_before
            report.seconds = round(time.monotonic() - t0, 3)
            return report
        _sweep(repo, pending, min_live_ratio, progress, report)
        report.stale_sessions_removed = remove_stale(repo, list_sessions(repo))
        report.bytes_after = sum(size for size, _n in repo.index.packs().values())
        report.phase = "done"
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _mark(repo: Repository, grace: float, progress: Progress | None, report: GcReport) -> Pending:
    t_c = time.time_ns()
    sessions = list_sessions(repo)
    cutoff = _cutoff(repo, grace, sessions)
    sids = [s.id for s in repo.snapshots()]
    refs = _references(repo, sids, progress)
    times = _pack_times(repo)
    rows = [(bid, loc) for bid, loc in repo.index.iter_chunks()
            if bid not in refs and times.get(loc.pack, cutoff) < cutoff]
    pending = Pending(t_c, cutoff, set(sids), {})
    repo.index.condemn(rows, pending.state())  # one commit: rows move, state recorded
    _stop_point("condemned")
    _set_t_m(repo, pending)
    pending.condemned = dict(repo.index.iter_condemned())
    report.condemned_blobs = len(pending.condemned)
    report.condemned_bytes = sum(loc.length for loc in pending.condemned.values())
    if progress:
        progress(f"condemned {len(pending.condemned)} unreferenced blobs")
    return pending


def _set_t_m(repo: Repository, pending: Pending) -> None:
    pending.t_m = time.time_ns()  # after the commit: any session starting later cannot see them
    repo.index.put_gc_state(pending.state())


def _wait_for_sessions(repo: Repository, t_m: int, wait: float, progress: Progress | None) -> list[SessionInfo]:
    deadline = time.monotonic() + wait
    while True:
        blocking = [s for s in list_sessions(repo) if s.live and s.start_ns < t_m]
        if not blocking or time.monotonic() >= deadline:
            return blocking
        if progress:
            progress(f"waiting for {len(blocking)} backup(s) that started before the mark: {blocking[0].describe()}")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _sweep(repo: Repository, pending: Pending, min_live_ratio: float, progress: Progress | None,
           report: GcReport) -> None:
    # 1. Rescue condemned blobs referenced by restore points committed since the mark.
    new = [s.id for s in repo.snapshots() if s.id not in pending.scanned]
    if new and pending.condemned:
        refs = _references(repo, new, progress)
        rescue = [b for b in pending.condemned if b in refs]
        repo.index.rescue(rescue)
        report.rescued_blobs = len(rescue)
    _stop_point("rescued")
    # 2. Decide per pack from the index: what is indexed is live, the rest of an old pack is garbage.
    packs = repo.index.packs()
    times = _pack_times(repo)
    live: dict[bytes, list[tuple[bytes, BlobLoc]]] = {}
    for bid, loc in repo.index.iter_chunks():
        live.setdefault(loc.pack, []).append((bid, loc))
    delete: list[bytes] = []
    compact: list[bytes] = []
    for pid, (size, _n) in sorted(packs.items()):
        if times.get(pid, pending.cutoff_ns) >= pending.cutoff_ns:
            continue
        lb = sum(loc.length for _b, loc in live.get(pid, ()))
        if lb == 0:
            delete.append(pid)
        elif lb < min_live_ratio * size:
            compact.append(pid)
    # 3. Compact: copy live blobs (still sealed: the envelope binds kind and id, not the pack).
    if compact:
        _compact(repo, compact, live, progress, report)
    # 4. Delete packs without live blobs.
    report.deleted_bytes += sum(packs[p][0] for p in delete)
    for i, pid in enumerate(delete):
        if progress and i % 100 == 0:
            progress(f"deleting unreferenced packs {i + 1}/{len(delete)}")
        repo.storage.delete(fmt.pack_name(pid))
        if i == 0:
            _stop_point("deleted-one")
    repo.index.forget_packs(delete)
    report.deleted_packs += len(delete)
    _stop_point("before-finish")
    repo.index.end_gc()


def _compact(repo: Repository, sources: list[bytes], live: dict[bytes, list[tuple[bytes, BlobLoc]]],
             progress: Progress | None, report: GcReport) -> None:
    writer: PackWriter | None = None
    waiting: list[bytes] = []  # source packs whose blobs sit in the unfinished writer
    sizes = {p: size for p, (size, _n) in repo.index.packs().items()}

    def finish() -> None:
        nonlocal writer
        if writer is None:
            return
        entries = writer.finish()  # durable and linked into data/
        _stop_point("compact-pack-written")
        repo.index.move_chunks(writer.pack_id, writer.size, entries, set(waiting))
        report.new_packs += 1
        report.written_bytes += writer.size
        _stop_point("compact-moved")
        for src in waiting:
            report.deleted_bytes += sizes.get(src, 0)
            repo.storage.delete(fmt.pack_name(src))
        repo.index.forget_packs(waiting)
        report.compacted_packs += len(waiting)
        waiting.clear()
        writer = None

    try:
        for i, src in enumerate(sources):
            if progress:
                progress(f"compacting pack {i + 1}/{len(sources)}")
            name = fmt.pack_name(src)
            try:
                data = repo.storage.get(name)
            except FileNotFoundError:
                continue
            if writer is None:
                writer = PackWriter(repo.storage, repo.envelope)
            for bid, loc in sorted(live.get(src, ()), key=lambda x: x[1].offset):
                writer.append(loc.kind, bid, data[loc.offset : loc.offset + loc.length], loc.raw_len)
                report.copied_bytes += loc.length
            waiting.append(src)
            if writer.size >= repo.config.pack_size:
                finish()
        finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


# --- status ---------------------------------------------------------------------------------------------
def status(repo: Repository) -> dict[str, Any]:
    p = Pending.load(repo)
    sess = list_sessions(repo)
    return {
        "pending": None if p is None else {
            "condemned_blobs": len(p.condemned), "condemned_bytes": sum(x.length for x in p.condemned.values()),
            "marked": p.t_m is not None, "since_ns": p.t_c,
            "blocking": [s.describe() for s in sess if s.live and p.t_m is not None and s.start_ns < p.t_m]},
        "sessions": [{"description": s.describe(), "live": s.live, "why": s.why, "start_ns": s.start_ns}
                     for s in sess],
    }

