"""Writer sessions: how a running backup tells garbage collection which blobs it may still reference.

Why: a backup deduplicates against the index. From its first index lookup until its restore point is
committed it may reference any blob that was indexed at some moment in between, including blobs whose
last restore point was pruned meanwhile. Holding the exclusive repository lock during GC would make GC
wait for every backup (and frequent incrementals mean there is always one). Instead every writer
registers a *session* before it looks anything up, and GC only deletes a blob after every session that
could have seen it has ended (the rule is in gc.py and docs/format.md §9).

A session is one sealed, create-once object per heartbeat (docs/format.md §2)::

    sessions/<start ns, 20 digits>-<nonce, 16 hex>-<expires ns, 20 digits>

The name carries what GC needs (start, expiry); the sealed body (kind NOTE, object id = the name)
carries who holds it: node name, boot id, pid and the pid's start time, kind and label. A heartbeat
thread re-creates the object with a later expiry every ``ttl / 4`` (new name first, then the old one is
deleted), so the session is always visible. A session is *live* unless it was ended, or it belongs to
this machine (same boot id) and its process is gone (pid dead or reused), or it belongs to another
machine and its expiry has passed. A process that is stopped (SIGSTOP) stays live: its pid is alive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from . import format as fmt
from .errors import IntegrityError

if TYPE_CHECKING:
    from .repository import Repository

log = logging.getLogger(__name__)

SESSION_PREFIX = "sessions/"  # docs/format.md §2; belongs with the other names in format.py
DEFAULT_TTL = 3600.0  # seconds without a heartbeat after which a session of another machine is stale


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None if the
    process does not exist. Compared with the recorded value it tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return -1  # exists but unreadable: treat as alive
    try:
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return -1


@dataclass(frozen=True)
class SessionInfo:
    """A session as GC sees it."""

    nonce: str
    start_ns: int
    expires_ns: int
    names: tuple[str, ...]
    holder: dict[str, Any]
    live: bool
    why: str  # "alive", "process gone", "expired", "unreadable"

    def describe(self) -> str:
        h = self.holder
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.start_ns / 1e9))
        return f"{h.get('kind', '?')} {h.get('label', '')} (pid {h.get('pid', '?')} on {h.get('node', '?')}, since {started}Z)"


def _name(start_ns: int, nonce: str, expires_ns: int) -> str:
    return f"{SESSION_PREFIX}{start_ns:020d}-{nonce}-{expires_ns:020d}"


def _parse(name: str) -> tuple[int, str, int] | None:
    base = name.rsplit("/", 1)[-1]
    parts = base.split("-")
    if len(parts) != 3 or len(parts[1]) != 16 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[0]), parts[1], int(parts[2])


class Session:
    """A registered writer. ``begin`` returns only once the session object is durable, so every index
    lookup the caller makes afterwards is covered."""

    def __init__(self, repo: Repository, kind: str, label: str, ttl: float = DEFAULT_TTL) -> None:
        self.repo = repo
        self.kind = kind
        self.label = label
        self.ttl = ttl
        self.nonce = os.urandom(8).hex()
        self.start_ns = time.time_ns()
        self._name: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ended = False

    @classmethod
    def begin(cls, repo: Repository, kind: str, label: str = "", ttl: float = DEFAULT_TTL,
              heartbeat: bool = True) -> Session:
        s = cls(repo, kind, label, ttl)
        s._write()
        if heartbeat:
            s._thread = threading.Thread(target=s._beat, name=f"ihb-session-{s.nonce[:6]}", daemon=True)
            s._thread.start()
        return s

    def _body(self) -> bytes:
        return msgpack.packb({"node": os.uname().nodename, "boot": boot_id(), "pid": os.getpid(),
                              "pid_start": process_start(os.getpid()), "kind": self.kind, "label": self.label,
                              "start": self.start_ns}, use_bin_type=True)

    def _write(self) -> None:
        with self._lock:
            if self.ended:
                return
            name = _name(self.start_ns, self.nonce, time.time_ns() + int(self.ttl * 1e9))
            obj = self.repo.envelope.pack_blob(fmt.BlobKind.NOTE, name.encode(), self._body())
            self.repo.storage.put_bytes(name, obj)
            old, self._name = self._name, name
        if old is not None and old != name:
            self.repo.storage.delete(old)

    def refresh(self) -> None:
        """Push the expiry out by ``ttl`` (the heartbeat thread does this every ``ttl / 4``)."""
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried; the pid check still holds
                log.warning("session heartbeat failed: %s", e)

    def end(self) -> None:
        """Deregister. Call only after the restore point is committed (or the backup abandoned)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self.ended:
                return
            self.ended = True
            name, self._name = self._name, None
        if name is not None:
            try:
                self.repo.storage.delete(name)
            except OSError as e:
                log.warning("could not remove session object %s: %s (it goes stale once this process exits)", name, e)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def list_sessions(repo: Repository, now_ns: int | None = None) -> list[SessionInfo]:
    """Every session object in storage, grouped by nonce, with its liveness."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    groups: dict[str, list[tuple[int, int, str]]] = {}
    for name in repo.storage.list(SESSION_PREFIX):
        p = _parse(name)
        if p is None:
            continue
        start, nonce, exp = p
        groups.setdefault(nonce, []).append((start, exp, name))
    me_boot = boot_id()
    out = []
    for nonce, rows in groups.items():
        rows.sort(key=lambda r: r[1])
        start = min(r[0] for r in rows)
        exp = max(r[1] for r in rows)
        newest = rows[-1][2]
        holder: dict[str, Any] = {}
        try:
            raw = repo.storage.get(newest)
            holder = msgpack.unpackb(repo.envelope.open(fmt.BlobKind.NOTE, newest.encode(), raw), raw=False)
        except FileNotFoundError:
            continue  # ended (or re-created) between list and get
        except (IntegrityError, ValueError, TypeError) as e:
            log.warning("session object %s is unreadable (%s); treated as live until it expires", newest, e)
        live, why = True, "alive"
        if holder and me_boot and holder.get("boot") == me_boot:
            pid = int(holder.get("pid", -1))
            started = process_start(pid) if pid > 0 else None
            if started is None or (started >= 0 and holder.get("pid_start") not in (None, -1, started)):
                live, why = False, "process gone"
        elif exp < now_ns:
            live, why = False, "expired"
        elif not holder:
            why = "unreadable"
        out.append(SessionInfo(nonce, start, exp, tuple(r[2] for r in rows), holder, live, why))
    out.sort(key=lambda s: s.start_ns)
    return out


def live_sessions(repo: Repository, now_ns: int | None = None) -> list[SessionInfo]:
    return [s for s in list_sessions(repo, now_ns) if s.live]


def remove_stale(repo: Repository, sessions: list[SessionInfo]) -> int:
    """Delete the objects of dead sessions (their holders can no longer end them)."""
    n = 0
    for s in sessions:
        if not s.live:
            for name in s.names:
                repo.storage.delete(name)
            n += 1
    return n
