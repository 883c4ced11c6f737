"""Retention locks: a restore point that must survive until a date, whatever prune, GC or an admin says.

Why notes: a restore point object is immutable (its id is the hash of its plaintext), so a lock placed
after the backup is a sealed, create-once annotation ``notes/<id>/<time>-lock`` (notes.py); a lock
requested at backup time is ``locked_until`` in the record itself. Locks only ever extend: anyone with
the key may add one. Removing them takes an ``unlock`` note, which is accepted only with an approval of
two distinct people (approvals.py) and embeds that approval, so the repository itself records who
allowed it.

Effective lock of a restore point = the latest ``until`` among the lock notes written after its newest
unlock note, and the record's ``locked_until`` if it was never unlocked. Prune keeps locked restore
points whatever the policy says (retention.py); GC never deletes what a kept restore point references.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from .approvals import Approval
from .errors import IhbError, InvalidArgument
from .notes import add_note, notes
from .repository import Repository
from .retention import meta_lock
from .snapshot import Snapshot


class RetentionLocked(IhbError):
    """The restore point is under a retention lock; it cannot be deleted before the lock expires."""

    exit_code = 60


@dataclass(frozen=True)
class LockState:
    until_ns: int  # 0 = not locked (or all locks removed)
    by: str
    reason: str

    def active(self, now_ns: int | None = None) -> bool:
        return self.until_ns > (time.time_ns() if now_ns is None else now_ns)


def lock_state(repo: Repository, snap: Snapshot) -> LockState:
    entries = notes(repo, snap.id)
    unlocks = [n["time"] for n in entries if n["kind"] == "unlock"]
    cut = max(unlocks, default=-1)
    best = LockState(0 if unlocks else meta_lock(snap), "backup" if not unlocks and meta_lock(snap) else "", "")
    for n in entries:
        if n["kind"] == "lock" and n["time"] > cut and int(n["data"]["until"]) > best.until_ns:
            best = LockState(int(n["data"]["until"]), str(n["data"].get("by", "")), str(n["data"].get("reason", "")))
    return best


def active_locks(repo: Repository, snaps: Iterable[Snapshot], now_ns: int | None = None) -> dict[str, int]:
    """Snapshot id -> lock expiry (ns) for every restore point locked beyond ``now``."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    out = {}
    for s in snaps:
        st = lock_state(repo, s)
        if st.until_ns > now_ns:
            out[s.id] = st.until_ns
    return out


def lock(repo: Repository, snap: Snapshot, until_ns: int, by: str, reason: str = "") -> LockState:
    """Lock ``snap`` until ``until_ns``. A lock never shortens an existing one (the later date holds)."""
    if until_ns <= time.time_ns():
        raise InvalidArgument("the lock date is in the past; give a future date with --until")
    if not by.strip():
        raise InvalidArgument("a lock needs the name of who placed it")
    add_note(repo, snap.id, "lock", {"until": until_ns, "by": by, "reason": reason})
    return lock_state(repo, snap)


def unlock(repo: Repository, snap: Snapshot, approval: Approval, now_ns: int | None = None) -> LockState:
    """Remove every lock of ``snap``; ``approval`` must authorise ``unlock`` of this snapshot id."""
    approval.check("unlock", snap.id, now_ns)
    before = lock_state(repo, snap)
    add_note(repo, snap.id, "unlock", {"approval": approval.to_obj(), "previous_until": before.until_ns})
    return lock_state(repo, snap)
