"""Prune: delete the restore points a retention policy no longer keeps, as a plan shown before it runs.

``plan_prune`` is read-only (``ihb prune --dry-run`` prints it); ``PrunePlan.execute`` deletes. Space
comes back only when GC runs afterwards (gc.py), which is the point: prune deletes small restore-point
objects and never touches a pack.

Safety rules enforced here rather than by callers:

* locked restore points (retention_lock.py) are never deleted: the plan keeps them, and ``execute``
  re-reads every lock right before each deletion, so a lock placed after planning still wins;
* deleting a tenant's data (every restore point of the tenant) requires a two-person ``Approval``
  (approvals.py) and refuses while any of them is locked;
* before deleting a restore point that a pending GC mark did not scan, the pending condemnation is
  aborted (gc.before_snapshot_deletion), and prune runs under the maintenance lock, never beside GC.

Order per restore point: catalog rows forgotten, snapshot object deleted, index row deleted, notes
deleted (its lock and unlock history goes with it, as the restore point no longer exists).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import gc
from .approvals import Approval
from .catalog import Catalog
from .notes import delete_notes
from .repository import Repository
from .retention import DEFAULT_GROUP_BY, KeepReason, Policy, apply_policy, explain
from .retention_lock import RetentionLocked, active_locks, lock_state
from .snapshot import Snapshot

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def select(snaps: Sequence[Snapshot], host: str | None = None, tenant: str | None = None,
           vm: str | None = None) -> list[Snapshot]:
    return [s for s in snaps
            if (host is None or host in (s.host, s.vm))
            and (tenant is None or str(s.meta.get("tenant", "")) == tenant)
            and (vm is None or s.vm == vm)]


@dataclass
class PruneReport:
    deleted: list[str] = field(default_factory=list)
    skipped_locked: list[str] = field(default_factory=list)
    gc_pending_aborted: bool = False

    def to_obj(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PrunePlan:
    repo: Repository
    policy: Policy | None
    keep: list[Snapshot]
    remove: list[Snapshot]
    reasons: dict[str, KeepReason]
    locks: dict[str, int]
    now_ns: int
    approval: Approval | None = None
    action: str = "prune"

    def rows(self) -> list[dict[str, Any]]:
        return explain(self.keep, self.remove, self.reasons)

    def to_obj(self) -> dict[str, Any]:
        return {"action": self.action, "policy": self.policy.to_obj() if self.policy else None,
                "policy_text": self.policy.describe() if self.policy else None,
                "keep": len(self.keep), "remove": len(self.remove), "restore_points": self.rows()}

    def execute(self, progress: Progress | None = None) -> PruneReport:
        """Delete ``remove``; a restore point locked since the plan was made is skipped, not deleted."""
        repo = self.repo
        report = PruneReport()
        if self.approval is not None:
            self.approval.check(self.action, self.approval.target)
        with gc.maintenance_lock(repo):
            report.gc_pending_aborted = gc.before_snapshot_deletion(repo, {s.id for s in self.remove})
            cat = Catalog(repo.index)
            now = time.time_ns()
            for i, s in enumerate(self.remove):
                if lock_state(repo, s).active(now):
                    report.skipped_locked.append(s.id)
                    log.warning("restore point %s was locked after the prune was planned; kept", s.short_id)
                    continue
                if progress:
                    progress(f"deleting restore point {i + 1}/{len(self.remove)} ({s.short_id})")
                delete_snapshot(repo, s, cat)
                report.deleted.append(s.id)
        return report


def delete_snapshot(repo: Repository, snap: Snapshot, cat: Catalog | None = None) -> None:
    """The one place a restore point is removed (callers: PrunePlan.execute)."""
    (cat or Catalog(repo.index)).forget_snapshot(snap.id)
    repo.delete_snapshot(snap.id)
    delete_notes(repo, snap.id)


def plan_prune(repo: Repository, policy: Policy, now: _dt.datetime | int | None = None, *, host: str | None = None,
               tenant: str | None = None, vm: str | None = None,
               group_by: Sequence[str] = DEFAULT_GROUP_BY) -> PrunePlan:
    """Apply ``policy`` to the selected restore points (all by default), grouped per ``group_by``."""
    now_ns = time.time_ns() if now is None else (now if isinstance(now, int) else int(now.timestamp() * 1e9))
    snaps = select(repo.snapshots(), host, tenant, vm)
    locks = active_locks(repo, snaps, now_ns)
    keep, remove, reasons = apply_policy(snaps, policy, now_ns, group_by=group_by, locks=locks)
    return PrunePlan(repo, policy, keep, remove, reasons, locks, now_ns)


def plan_tenant_deletion(repo: Repository, tenant: str, approval: Approval | None = None) -> PrunePlan:
    """Every restore point of ``tenant``. Refused while any is locked; ``execute`` needs ``approval``
    for ``delete-tenant`` of this tenant, checked at planning and again at execution."""
    if approval is not None:
        approval.check("delete-tenant", tenant)
    snaps = select(repo.snapshots(), tenant=tenant)
    now = time.time_ns()
    locks = active_locks(repo, snaps, now)
    if locks:
        first = min(locks.values())
        raise RetentionLocked(
            f"{len(locks)} restore points of tenant {tenant} are locked (the first lock ends "
            f"{_dt.datetime.fromtimestamp(first / 1e9, tz=_dt.UTC):%Y-%m-%d}); remove the locks with "
            "`ihb unlock` (two approvers) first")
    plan = PrunePlan(repo, None, [], sorted(snaps, key=lambda s: s.time_ns, reverse=True), {}, {}, now,
                     approval=approval, action="delete-tenant")
    if approval is None:
        plan.approval = Approval("", "delete-tenant", tenant, "", 0, 0)  # execute() then refuses
    return plan


@dataclass(frozen=True)
class Rule:
    """A policy for the restore points it selects (empty selector = all); the first matching rule wins."""

    policy: Policy
    tenant: str | None = None
    host: str | None = None
    vm: str | None = None

    def matches(self, s: Snapshot) -> bool:
        return bool(select([s], self.host, self.tenant, self.vm))


def plan_prune_rules(repo: Repository, rules: Sequence[Rule], default: Policy, now: _dt.datetime | int | None = None,
                     *, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> PrunePlan:
    """Per-tenant/host/VM policies: each restore point is judged by the first rule that selects it,
    the others by ``default``."""
    now_ns = time.time_ns() if now is None else (now if isinstance(now, int) else int(now.timestamp() * 1e9))
    snaps = repo.snapshots()
    locks = active_locks(repo, snaps, now_ns)
    parts: dict[int, list[Snapshot]] = {}
    for s in snaps:
        idx = next((i for i, r in enumerate(rules) if r.matches(s)), len(rules))
        parts.setdefault(idx, []).append(s)
    keep: list[Snapshot] = []
    remove: list[Snapshot] = []
    reasons: dict[str, KeepReason] = {}
    for idx, part in parts.items():
        pol = rules[idx].policy if idx < len(rules) else default
        k, r, why = apply_policy(part, pol, now_ns, group_by=group_by, locks=locks)
        keep += k
        remove += r
        reasons.update(why)
    keep.sort(key=lambda s: (s.time_ns, s.id), reverse=True)
    remove.sort(key=lambda s: (s.time_ns, s.id), reverse=True)
    return PrunePlan(repo, default if not rules else None, keep, remove, reasons, locks, now_ns)
