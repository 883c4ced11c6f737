"""Four-eyes approval records for the operations a single stolen credential must not be able to do:
removing a retention lock and deleting a tenant's data.

Why the record lives in ``repo/`` while the workflow lives in ``appliance/approvals.py``: the check must
sit next to the destructive operation (``retention_lock.unlock``, ``prune.plan_tenant_deletion``) so
that no caller - CLI, server, a script - can skip it, and the record that allowed the deletion is
sealed into the repository with its effect (the unlock note embeds it). Collecting approvals (who may
approve, pending requests, expiry, the audit trail) is appliance policy and identity, which ``repo/``
knows nothing about.

An ``Approval`` is valid for one action on one target when at least ``required`` *distinct* approvers
(the requester counts as one) approved it before it expired. Names are compared case-insensitively
after trimming, so ``Alice`` and ``alice `` are one person.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import IhbError

ACTIONS = ("unlock", "delete-tenant")
REQUIRED_APPROVERS = 2


class ApprovalRequired(IhbError):
    """This operation needs the approval of two different people; request it with `ihb approvals`."""

    exit_code = 61


def norm_name(name: str) -> str:
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class Approval:
    request_id: str
    action: str
    target: str
    requested_by: str
    created_ns: int
    expires_ns: int
    approvers: tuple[tuple[str, int], ...] = field(default_factory=tuple)  # (name, time_ns), requester first
    reason: str = ""

    def distinct_approvers(self) -> list[str]:
        out: list[str] = []
        for name, _t in self.approvers:
            if name.strip() and norm_name(name) not in {norm_name(x) for x in out}:
                out.append(name)
        return out

    def check(self, action: str, target: str, now_ns: int | None = None, required: int = REQUIRED_APPROVERS) -> None:
        """Raise ApprovalRequired unless this record authorises ``action`` on ``target`` now."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        if self.action != action or self.target != target:
            raise ApprovalRequired(f"approval {self.request_id} is for {self.action} {self.target}, not {action} {target}")
        if now_ns > self.expires_ns:
            raise ApprovalRequired(f"approval {self.request_id} expired; request it again")
        late = [n for n, t in self.approvers if t > self.expires_ns]
        if late:
            raise ApprovalRequired(f"approval {self.request_id}: {late[0]} approved after it expired")
        people = self.distinct_approvers()
        if len(people) < required:
            raise ApprovalRequired(
                f"{action} {target} needs {required} different approvers; so far only {', '.join(people) or 'nobody'}"
                f" (request {self.request_id}: another person runs `ihb approve {self.request_id}`)")

    def to_obj(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "action": self.action, "target": self.target,
                "requested_by": self.requested_by, "created_ns": self.created_ns, "expires_ns": self.expires_ns,
                "approvers": [list(a) for a in self.approvers], "reason": self.reason}

    @classmethod
    def from_obj(cls, o: Mapping[str, Any]) -> Approval:
        return cls(str(o["request_id"]), str(o["action"]), str(o["target"]), str(o["requested_by"]),
                   int(o["created_ns"]), int(o["expires_ns"]),
                   tuple((str(n), int(t)) for n, t in o.get("approvers", [])), str(o.get("reason", "")))
