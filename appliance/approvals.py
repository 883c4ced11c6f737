"""Pending four-eyes requests: somebody asks for an unlock or a tenant deletion, a different person
approves, and only then the action runs (the check itself is ``repo.approvals.Approval.check``).

Why a separate store in the state directory: requests are appliance workflow (who asked, who may
approve, expiry) and must be visible before anything touches the repository; the repository only
receives the final, complete approval, sealed into the note that records the action. Every request,
approval, refusal and execution is written to the audit log.

The store is one JSON file rewritten atomically (write, fsync, rename) under an flock, small because
requests expire (default 24 h) and executed ones are pruned after 30 days.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.audit import AuditLog
from appliance.config import Config
from appliance.statefile import exclusive, read_json_list, write_json
from repo.approvals import ACTIONS, Approval, ApprovalRequired, norm_name
from repo.errors import InvalidArgument

DEFAULT_TTL = 24 * 3600.0
KEEP_DONE = 30 * 86400.0


@dataclass
class Request:
    id: str
    action: str
    target: str
    requested_by: str
    created_ns: int
    expires_ns: int
    reason: str = ""
    approvers: list[list[Any]] = field(default_factory=list)  # [name, time_ns]
    state: str = "pending"  # pending | approved | executed | expired
    result: str = ""

    def approval(self) -> Approval:
        return Approval(self.id, self.action, self.target, self.requested_by, self.created_ns, self.expires_ns,
                        tuple((str(n), int(t)) for n, t in self.approvers), self.reason)

    def complete(self, now_ns: int | None = None) -> bool:
        try:
            self.approval().check(self.action, self.target, now_ns)
            return True
        except ApprovalRequired:
            return False


class ApprovalStore:
    def __init__(self, directory: str, audit: AuditLog | None = None) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, "approvals.json")
        self.audit = audit or AuditLog(directory)

    @classmethod
    def for_config(cls, cfg: Config | None = None) -> ApprovalStore:
        from appliance.jobs import state_dir

        d = state_dir(cfg)
        return cls(d, AuditLog(d))

    @contextlib.contextmanager
    def _edit(self) -> Iterator[dict[str, Request]]:
        with exclusive(self.path + ".lock"):
            reqs = self._load()
            yield reqs
            now = time.time_ns()
            write_json(self.path, [asdict(r) for r in reqs.values()
                                   if r.state == "pending" or now - r.created_ns < KEEP_DONE * 1e9])

    def _load(self) -> dict[str, Request]:
        return {o["id"]: Request(**o) for o in read_json_list(self.path)}

    def list(self, include_done: bool = False) -> list[Request]:
        now = time.time_ns()
        out = []
        for r in self._load().values():
            if r.state == "pending" and now > r.expires_ns:
                r.state = "expired"
            if include_done or r.state in ("pending", "approved"):
                out.append(r)
        return sorted(out, key=lambda r: r.created_ns)

    def get(self, rid: str) -> Request:
        reqs = self._load()
        matches = [r for k, r in reqs.items() if k.startswith(rid)] if len(rid) >= 4 else []
        if len(matches) != 1:
            raise InvalidArgument(f"no single approval request matches {rid!r}; list them with `ihb approvals`")
        return matches[0]

    def request(self, action: str, target: str, by: str, reason: str = "", ttl: float = DEFAULT_TTL) -> Request:
        """Open a request; the requester is its first approver. An open request for the same action and
        target is reused (the requester is added to it)."""
        if action not in ACTIONS:
            raise InvalidArgument(f"unknown action {action!r}")
        now = time.time_ns()
        with self._edit() as reqs:
            for r in reqs.values():
                if r.action == action and r.target == target and r.state == "pending" and now <= r.expires_ns:
                    if norm_name(by) not in {norm_name(n) for n, _ in r.approvers}:
                        r.approvers.append([by, now])
                        if r.complete(now):
                            r.state = "approved"
                    req = r
                    break
            else:
                req = Request(uuid.uuid4().hex[:12], action, target, by, now, now + int(ttl * 1e9), reason, [[by, now]])
                reqs[req.id] = req
        self.audit.append(by, f"request-{action}", target, {"request": req.id, "reason": reason,
                                                             "approvers": [n for n, _ in req.approvers]})
        return req

    def approve(self, rid: str, by: str) -> Request:
        now = time.time_ns()
        target = self.get(rid)
        with self._edit() as reqs:
            req = reqs[target.id]
            if req.state == "approved":
                return req  # complete but not executed yet (the executor failed): run it now
            if req.state != "pending" or now > req.expires_ns:
                state = "expired" if req.state == "pending" else req.state
                self.audit.append(by, "approval-refused", req.target, {"request": req.id, "why": state})
                raise ApprovalRequired(f"request {req.id} is {state}; open a new one")
            if norm_name(by) in {norm_name(n) for n, _ in req.approvers}:
                self.audit.append(by, "approval-refused", req.target, {"request": req.id, "why": "same person"})
                raise ApprovalRequired(f"{by} already approved request {req.id}; a different person must approve it")
            req.approvers.append([by, now])
            if req.complete(now):
                req.state = "approved"
        self.audit.append(by, f"approve-{req.action}", req.target, {"request": req.id,
                                                                    "approvers": [n for n, _ in req.approvers]})
        return req

    def executed(self, rid: str, by: str, result: str, details: dict[str, Any] | None = None) -> None:
        with self._edit() as reqs:
            req = reqs[rid]
            req.state, req.result = "executed", result
        self.audit.append(by, req.action, req.target, {"request": rid, "result": result, **(details or {})})
