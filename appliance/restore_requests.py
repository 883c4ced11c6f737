"""Restores requested and authorized by the customer: request, approve (or deny), ticket, execute.

Why: a restore hands a tenant's data to somebody (a path on the appliance, the customer's server, a
booted VM, a mount). For tenants whose policy says so, that only happens after the customer's own
authorizers agreed, and only for what they agreed to. An approved request carries a *ticket*: a
secret bound to one restore point, its paths, its target and its kind, valid until it expires. The
restore commands (`ihb restore`, `restore-file`, `restore-disk`, `instant-recover`, `nbd-export`,
`mount`) refuse to run for such a tenant without it (``authorize``). Restores (files, in-place,
bare-metal) use a ticket once; mounts and instant recoveries may use theirs until it expires (an
instant recovery re-mounts, a mount may be re-established).

Only a hash of the ticket secret is kept. The secret is shown once to whoever completed the approval
(the requester too when the policy approves automatically) and, if that was somebody else, kept until
the requester retrieves it once (``claim_ticket``), then only the hash remains.

Policy (TOML; ``[restore]`` sets defaults for every tenant, ``[tenants.NAME.restore]`` overrides)::

    [tenants.acme.restore]
    require_ticket = true                  # restores of acme's data need a ticket (default false)
    approvals = 2                          # distinct approvals needed (default 1)
    authorizers = ["alice", "bob"]         # who may approve or deny (default: anybody but the requester)
    auto_approve_same_host_files = true    # file restores back to the source host need no approval
    ticket_ttl = "4h"                      # how long an approved ticket is valid (default 4h)
    request_ttl = "24h"                    # how long a request waits for approval (default 24h)

A restore point belongs to the tenant recorded in it (agent backups), else to the tenant whose
``[tenants.NAME] hosts = [...]`` lists its host or VM, else to no tenant ("": only the ``[restore]``
defaults apply). Store: one JSON file in the service state directory, rewritten atomically under an
flock (as ``appliance/approvals.py``); every create, approval, refusal, denial, expiry, ticket use and
execution goes to the audit log (``appliance/audit.py``).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import os
import posixpath
import re
import secrets
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.audit import AuditLog
from appliance.config import Config
from appliance.statefile import exclusive, read_json_list, write_json
from repo.approvals import norm_name
from repo.errors import IhbError, InvalidArgument, RestoreRequestRefused, TicketRefused

KINDS = ("files", "in-place", "instant", "bare-metal", "mount")
STATES = ("pending", "approved", "denied", "expired", "executed")
REUSABLE_KINDS = ("mount", "instant")  # valid until expiry; the others are single-use
TICKET_PREFIX = "ihbrt_"
AUTO_APPROVER = "policy:auto-approve"
KEEP_DONE = 30 * 86400.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SNAP_RE = re.compile(r"^[0-9a-f]{8,64}$")


def parse_seconds(value: object, where: str = "duration") -> float:
    """``3600``, ``"90s"``, ``"30m"``, ``"4h"``, ``"1d12h"`` (m = minutes here) -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        secs = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
        if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            raise InvalidArgument(f"{where}: {value!r} is not a duration (use 90s, 30m, 4h, 1d)")
        secs = sum(float(n) * _UNITS[u] for n, u in parts)
    if secs <= 0:
        raise InvalidArgument(f"{where}: {value!r} must be longer than zero")
    return secs


@dataclass(frozen=True)
class RestorePolicy:
    """A tenant's rules for restores (defaults: no ticket needed; one approval by anybody else)."""

    require_ticket: bool = False
    approvals: int = 1
    authorizers: tuple[str, ...] = ()  # empty: anybody except the requester
    auto_approve_same_host_files: bool = False
    ticket_ttl: float = 4 * 3600.0
    request_ttl: float = 24 * 3600.0

    def may_authorize(self, who: str) -> bool:
        return not self.authorizers or norm_name(who) in {norm_name(a) for a in self.authorizers}


def _table(doc: Any, *keys: str) -> dict[str, Any]:
    for k in keys:
        doc = doc.get(k) if isinstance(doc, dict) else None
    return doc if isinstance(doc, dict) else {}


def policy_for(cfg: Config, tenant: str) -> RestorePolicy:
    where = cfg.path or "config"
    merged = {**_table(cfg.raw, "restore"), **(_table(cfg.raw, "tenants", tenant, "restore") if tenant else {})}
    kw: dict[str, Any] = {}
    for key in ("require_ticket", "auto_approve_same_host_files"):
        if key in merged:
            if not isinstance(merged[key], bool):
                raise InvalidArgument(f"{where}: restore policy {key} must be true or false")
            kw[key] = merged[key]
    if "approvals" in merged:
        n = merged["approvals"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
            raise InvalidArgument(f"{where}: restore policy approvals must be a number from 1 to 10")
        kw["approvals"] = n
    if "authorizers" in merged:
        a = merged["authorizers"]
        if not isinstance(a, list) or not all(isinstance(x, str) and x.strip() for x in a):
            raise InvalidArgument(f"{where}: restore policy authorizers must be a list of names")
        kw["authorizers"] = tuple(a)
    for key in ("ticket_ttl", "request_ttl"):
        if key in merged:
            kw[key] = parse_seconds(merged[key], f"{where}: restore policy {key}")
    pol = RestorePolicy(**kw)
    if pol.authorizers and len({norm_name(a) for a in pol.authorizers}) < pol.approvals:
        raise InvalidArgument(f"{where}: tenant {tenant or '(none)'} needs {pol.approvals} approvals but lists "
                              f"fewer authorizers")
    return pol


def any_ticket_required(cfg: Config) -> bool:
    """True when some tenant (or the default policy) requires tickets: a whole-repository mount then
    shows data that needs one."""
    if _table(cfg.raw, "restore").get("require_ticket") is True:
        return True
    return any(_table(t, "restore").get("require_ticket") is True for t in _table(cfg.raw, "tenants").values())


def snapshot_tenant(cfg: Config, snap: Any) -> str:
    """The tenant a restore point belongs to: recorded in it, else by ``[tenants.NAME] hosts``."""
    t = snap.meta.get("tenant") if isinstance(snap.meta, dict) else None
    if isinstance(t, str) and t:
        return t
    names = {snap.host, getattr(snap, "vm", None)} - {None, ""}
    for tenant, tab in _table(cfg.raw, "tenants").items():
        hosts = tab.get("hosts", []) if isinstance(tab, dict) else []
        if isinstance(hosts, list) and names & {str(h) for h in hosts}:
            return str(tenant)
    return ""


def norm_path(p: str) -> str:
    """``etc/hosts`` -> ``/etc/hosts``; ``vda:/etc/`` -> ``vda:/etc``; a disk name ``vda`` -> ``/vda``."""
    p = p.strip()
    if ":" in p and not p.startswith("/"):
        disk, rest = p.split(":", 1)
        return f"{disk}:{norm_path(rest)}"
    return "/" + posixpath.normpath("/" + p).strip("/")


def _covers(granted: str, wanted: str) -> bool:
    if granted == wanted or granted == "/":
        return True
    if ":" in wanted and ":" not in granted:
        return granted == "/" + wanted.split(":", 1)[0]  # a whole disk covers the files inside it
    return wanted.startswith(granted.rstrip("/") + "/")


def norm_target(t: str) -> str:
    t = t.strip()
    if not t:
        return ""
    if ":" in t and not t.startswith("/"):
        host, rest = t.split(":", 1)
        return f"{host}:{norm_target(rest)}"
    return os.path.normpath(os.path.abspath(t)) if not t.startswith("/") else os.path.normpath(t)


def ticket_hash(secret: str) -> str:
    return hashlib.sha256(secret.strip().encode()).hexdigest()


@dataclass
class RestoreRequest:
    id: str
    tenant: str
    host: str
    snapshot: str
    kind: str
    paths: list[str]
    target: str
    requested_by: str
    reason: str
    created_ns: int
    expires_ns: int
    required_approvals: int = 1
    approvals: list[str] = field(default_factory=list)
    state: str = "pending"
    ticket: dict[str, Any] | None = None  # hash, expires_ns, snapshot, kind, paths, target, single_use
    target_host: str = ""
    decided_by: str = ""
    decision_reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # {"by", "event", "time_ns"}
    executions: list[dict[str, Any]] = field(default_factory=list)
    unclaimed_secret: str = ""  # kept for the requester's one retrieval; never in to_obj()
    ticket_secret: str = ""  # transient: set only on the object returned when the ticket is issued

    def to_obj(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("unclaimed_secret")
        d["ticket_retrievable"] = bool(self.unclaimed_secret)
        if not self.ticket_secret:
            d.pop("ticket_secret")
        if self.ticket is not None:
            d["ticket"] = {k: v for k, v in self.ticket.items() if k != "hash"}
        return d

    def _stored(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ticket_secret")
        return d

    def scope(self) -> str:
        return f"{self.tenant or '-'}/{self.host}@{self.snapshot[:12]}"


class RestoreRequestStore:
    def __init__(self, directory: str, audit: AuditLog | None = None, cfg: Config | None = None) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, "restore_requests.json")
        self.audit = audit or AuditLog(directory)
        self.cfg = cfg or Config()

    @classmethod
    def for_config(cls, cfg: Config) -> RestoreRequestStore:
        from appliance.jobs import state_dir

        d = state_dir(cfg)
        return cls(d, AuditLog(d), cfg)

    def policy(self, tenant: str) -> RestorePolicy:
        return policy_for(self.cfg, tenant)

    # --- the file ---------------------------------------------------------------------------------------
    def _load(self) -> dict[str, RestoreRequest]:
        return {o["id"]: RestoreRequest(**o) for o in read_json_list(self.path)}

    @contextlib.contextmanager
    def _edit(self) -> Iterator[dict[str, RestoreRequest]]:
        """Load, let the caller change, expire what is due (audited), write back atomically."""
        with exclusive(self.path + ".lock"):
            reqs = self._load()
            try:
                yield reqs
            except IhbError:
                self._save(reqs)  # a refusal may have expired the request: keep that (it is audited)
                raise
            self._save(reqs)

    def _save(self, reqs: dict[str, RestoreRequest]) -> None:
        now = time.time_ns()
        for r in reqs.values():
            self._expire(r, now)
        write_json(self.path, [r._stored() for r in reqs.values()
                               if r.state in ("pending", "approved") or now - r.created_ns < KEEP_DONE * 1e9])

    def _expire(self, r: RestoreRequest, now: int) -> None:
        due = (r.state == "pending" and now > r.expires_ns) or (
            r.state in ("approved", "executed") and r.ticket is not None and now > r.ticket["expires_ns"]
            and (r.state == "approved" or r.kind in REUSABLE_KINDS))
        if not due:
            return
        was = r.state
        r.state, r.unclaimed_secret = "expired", ""
        r.history.append({"by": "-", "event": "expired", "time_ns": now})
        self.audit.append("-", "restore-expire", r.scope(), {"request": r.id, "was": was})

    def _find(self, reqs: dict[str, RestoreRequest], rid: str) -> RestoreRequest:
        rid = rid.strip().lower()
        matches = [r for k, r in reqs.items() if k.startswith(rid)] if len(rid) >= 4 else []
        if len(matches) != 1:
            raise InvalidArgument(f"no single restore request matches {rid[:40]!r}; list them with "
                                  "`ihb restore-request list`")
        return matches[0]

    # --- queries ----------------------------------------------------------------------------------------
    def list(self, tenant: str | None = None, state: str | None = None) -> builtins.list[RestoreRequest]:
        if state is not None and state not in STATES:
            raise InvalidArgument(f"state must be one of {', '.join(STATES)}")
        with self._edit() as reqs:
            pass
        out = [r for r in reqs.values()
               if (tenant is None or r.tenant == tenant) and (state is None or r.state == state)]
        return sorted(out, key=lambda r: r.created_ns)

    def get(self, rid: str) -> RestoreRequest:
        with self._edit() as reqs:
            pass
        return self._find(reqs, rid)

    # --- the workflow -----------------------------------------------------------------------------------
    def create(self, *, tenant: str, host: str, snapshot: str, kind: str, paths: builtins.list[str], target: str,
               requested_by: str, reason: str = "", target_host: str = "",
               may_auto_approve: bool = True) -> RestoreRequest:
        """``may_auto_approve``: whether ``target_host`` is vouched for by who asks (the API passes True
        only for the agent token of the restore point's own host; a client-supplied host is never enough)."""
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not _SNAP_RE.match(snapshot or ""):
            raise InvalidArgument("snapshot must be a restore point id (8 to 64 hex digits); find it with "
                                  "`ihb snapshots`")
        if not requested_by.strip():
            raise InvalidArgument("a restore request needs the name of who asks")
        if kind not in REUSABLE_KINDS and not target.strip():
            raise InvalidArgument(f"a {kind} restore request needs a target (where the data goes)")
        pol = self.policy(tenant)
        now = time.time_ns()
        req = RestoreRequest(
            id=uuid.uuid4().hex[:16], tenant=tenant, host=host, snapshot=snapshot, kind=kind,
            paths=sorted({norm_path(p) for p in paths if p.strip()}), target=norm_target(target),
            requested_by=requested_by, reason=reason, created_ns=now, expires_ns=now + int(pol.request_ttl * 1e9),
            required_approvals=pol.approvals, target_host=target_host,
            history=[{"by": requested_by, "event": "requested", "time_ns": now}])
        auto = (may_auto_approve and pol.auto_approve_same_host_files and kind == "files" and bool(target_host)
                and target_host == host)
        with self._edit() as reqs:
            reqs[req.id] = req
            self.audit.append(requested_by, "restore-request", req.scope(), {
                "request": req.id, "kind": kind, "paths": req.paths, "target": req.target, "reason": reason,
                "approvals_needed": pol.approvals})
            if auto:
                req.approvals.append(AUTO_APPROVER)
                req.history.append({"by": AUTO_APPROVER, "event": "approved", "time_ns": now})
                self.audit.append(AUTO_APPROVER, "restore-approve", req.scope(), {
                    "request": req.id, "why": "auto_approve_same_host_files"})
                self._issue(req, pol, requested_by, now)
        return req

    def _refuse(self, req: RestoreRequest, by: str, why: str, message: str) -> RestoreRequestRefused:
        self.audit.append(by, "restore-approval-refused", req.scope(), {"request": req.id, "why": why})
        return RestoreRequestRefused(message)

    def approve(self, rid: str, by: str) -> RestoreRequest:
        now = time.time_ns()
        with self._edit() as reqs:
            req = self._find(reqs, rid)
            self._expire(req, now)
            pol = self.policy(req.tenant)
            if req.state != "pending":
                raise self._refuse(req, by, req.state, f"restore request {req.id} is {req.state}; it cannot be "
                                   "approved any more (create a new one)")
            if norm_name(by) == norm_name(req.requested_by):
                raise self._refuse(req, by, "own request", f"{by} asked for restore request {req.id} and cannot "
                                   "approve it; one of the tenant's authorizers must")
            if norm_name(by) in {norm_name(a) for a in req.approvals}:
                raise self._refuse(req, by, "same person twice", f"{by} already approved restore request "
                                   f"{req.id}; a different authorizer must approve it")
            if not pol.may_authorize(by):
                raise self._refuse(req, by, "not an authorizer", f"{by} is not an authorizer of tenant "
                                   f"{req.tenant or '(none)'} (authorizers: {', '.join(pol.authorizers)})")
            req.approvals.append(by)
            req.history.append({"by": by, "event": "approved", "time_ns": now})
            self.audit.append(by, "restore-approve", req.scope(), {
                "request": req.id, "approvals": req.approvals, "needed": req.required_approvals})
            if len(req.approvals) >= req.required_approvals:
                self._issue(req, pol, by, now)
        return req

    def _issue(self, req: RestoreRequest, pol: RestorePolicy, by: str, now: int) -> None:
        secret = TICKET_PREFIX + secrets.token_urlsafe(32)
        req.state = "approved"
        req.ticket = {"hash": ticket_hash(secret), "expires_ns": now + int(pol.ticket_ttl * 1e9),
                      "snapshot": req.snapshot, "kind": req.kind, "paths": req.paths, "target": req.target,
                      "single_use": req.kind not in REUSABLE_KINDS}
        req.ticket_secret = secret
        if norm_name(by) != norm_name(req.requested_by):
            req.unclaimed_secret = secret
        self.audit.append(by, "restore-ticket-issued", req.scope(), {
            "request": req.id, "expires_ns": req.ticket["expires_ns"], "kind": req.kind, "paths": req.paths,
            "target": req.target, "shown_to": by})

    def deny(self, rid: str, by: str, reason: str = "") -> RestoreRequest:
        now = time.time_ns()
        with self._edit() as reqs:
            req = self._find(reqs, rid)
            self._expire(req, now)
            pol = self.policy(req.tenant)
            if req.state not in ("pending", "approved") and not _api_live(req, now):
                raise self._refuse(req, by, req.state, f"restore request {req.id} is {req.state}; nothing to deny")
            own = norm_name(by) == norm_name(req.requested_by)
            if not own and not pol.may_authorize(by):
                raise self._refuse(req, by, "not an authorizer", f"{by} is not an authorizer of tenant "
                                   f"{req.tenant or '(none)'} and did not ask for request {req.id}")
            req.state, req.decided_by, req.decision_reason, req.unclaimed_secret = "denied", by, reason, ""
            req.history.append({"by": by, "event": "denied", "time_ns": now, "reason": reason})
            self.audit.append(by, "restore-deny", req.scope(), {"request": req.id, "reason": reason,
                                                               "withdrawn": own})
        return req

    def claim_ticket(self, rid: str, by: str) -> str:
        """The requester's one retrieval of a ticket that somebody else's approval issued."""
        with self._edit() as reqs:
            req = self._find(reqs, rid)
            if norm_name(by) != norm_name(req.requested_by):
                raise self._refuse(req, by, "not the requester", f"only {req.requested_by}, who asked for "
                                   f"request {req.id}, can retrieve its ticket")
            if req.state != "approved" or not req.unclaimed_secret:
                raise self._refuse(req, by, "no ticket to retrieve", f"restore request {req.id} has no ticket to "
                                   f"retrieve (it is {req.state}; a ticket is shown once)")
            secret, req.unclaimed_secret = req.unclaimed_secret, ""
            self.audit.append(by, "restore-ticket-retrieved", req.scope(), {"request": req.id})
        return secret

    def check_ticket(self, secret: str, *, snapshot: str, kind: str | Collection[str], paths: builtins.list[str],
                     target: str, by: str = "-") -> RestoreRequest:
        """Raise TicketRefused unless ``secret`` authorizes this restore now; on success the use is
        recorded (a single-use ticket is spent) and audited as ``restore-execute``."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        digest = ticket_hash(secret or "")
        now = time.time_ns()
        with self._edit() as reqs:
            req = next((r for r in reqs.values() if r.ticket is not None
                        and hmac.compare_digest(r.ticket["hash"], digest)), None)
            if req is None:
                self.audit.append(by, "restore-ticket-refused", snapshot[:12], {"why": "unknown ticket",
                                                                               "kind": kinds[0]})
                raise TicketRefused("the restore ticket is not known to this appliance; ask for one with "
                                    "`ihb restore-request create`")
            self._expire(req, now)
            t = req.ticket
            assert t is not None
            wanted = sorted({norm_path(p) for p in paths if p.strip()})
            why = ""
            if req.state == "expired":
                why = "expired"
            elif req.state == "denied":
                why = "denied"
            elif req.state == "executed" and t["single_use"]:
                why = "already used"
            elif not snapshot.startswith(t["snapshot"]):
                why = f"for restore point {t['snapshot'][:12]}, not {snapshot[:12]}"
            elif t["kind"] not in kinds:
                why = f"for a {t['kind']} restore, not {'/'.join(kinds)}"
            elif t["paths"] and (not wanted or not all(any(_covers(g, w) for g in t["paths"]) for w in wanted)):
                why = f"for {', '.join(t['paths'])}, not {', '.join(wanted) or 'the whole restore point'}"
            elif t["target"] and norm_target(target) != t["target"] and not (t["kind"] == "instant"
                                                                             and kinds[0] == "mount"):
                # (an instant recovery mounts the restore point itself; its target is where it migrates to)
                why = f"for target {t['target']}, not {norm_target(target)}"
            if why:
                self.audit.append(by, "restore-ticket-refused", req.scope(), {
                    "request": req.id, "why": why, "kind": kinds[0], "paths": wanted, "target": target})
                raise TicketRefused(f"the restore ticket of request {req.id} is {why}; ask for a new one with "
                                    "`ihb restore-request create`")
            req.state, req.unclaimed_secret = "executed", ""
            req.executions.append({"by": by, "time_ns": now, "kind": kinds[0], "paths": wanted, "target": target})
            req.history.append({"by": by, "event": "executed", "time_ns": now})
            self.audit.append(by, "restore-execute", req.scope(), {
                "request": req.id, "kind": kinds[0], "paths": wanted, "target": target})
        return req

    def check_read_ticket(self, secret: str, *, tenant: str, host: str | None, snapshot: str | None,
                          by: str) -> RestoreRequest:
        """Over the API (docs/protocol.md §5.5): may ``secret`` read data of ``tenant`` (of ``host``; None:
        any of the tenant's hosts) and, when given, of restore point ``snapshot``? Only a ``files`` ticket
        does. It is not spent per request (a restore over the API is many requests): it stays usable over
        the API until it expires, but no longer on the appliance. The first use is recorded and audited
        (``restore-execute``, via api); refusals are audited (``restore-ticket-refused``)."""
        digest = ticket_hash(secret or "")
        now = time.time_ns()
        scope = f"{tenant or '-'}/{host or '*'}@{(snapshot or '*')[:12]}"
        with self._edit() as reqs:
            req = next((r for r in reqs.values() if r.ticket is not None
                        and hmac.compare_digest(r.ticket["hash"], digest)), None)
            if req is None:
                self.audit.append(by, "restore-ticket-refused", scope, {"why": "unknown ticket", "via": "api"})
                raise TicketRefused("the restore ticket in X-Ihb-Ticket is not known to this appliance; ask for "
                                    "one with `ihb restore-request create` or POST /api/v1/restore-requests")
            self._expire(req, now)
            t = req.ticket
            assert t is not None
            why = ""
            if req.state in ("expired", "denied"):
                why = req.state
            elif now > t["expires_ns"]:
                why = "expired"
            elif req.state == "executed" and any(e.get("via") != "api" for e in req.executions):
                why = "already used on the appliance"
            elif t["kind"] != "files":
                why = f"for a {t['kind']} restore, not a files restore over the API"
            elif req.tenant != tenant or (host is not None and req.host != host):
                why = f"for {req.tenant or '-'}/{req.host}, not {tenant or '-'}/{host or '*'}"
            elif snapshot is not None and not snapshot.startswith(t["snapshot"]):
                why = f"for restore point {t['snapshot'][:12]}, not {snapshot[:12]}"
            if why:
                self.audit.append(by, "restore-ticket-refused", req.scope(), {
                    "request": req.id, "why": why, "via": "api", "snapshot": snapshot or ""})
                raise TicketRefused(f"the restore ticket of request {req.id} is {why}; ask for a new one with "
                                    "`ihb restore-request create`")
            if req.state == "approved":
                req.state, req.unclaimed_secret = "executed", ""
                req.executions.append({"by": by, "time_ns": now, "kind": "files", "paths": t["paths"],
                                       "target": t["target"], "via": "api"})
                req.history.append({"by": by, "event": "executed", "time_ns": now})
                self.audit.append(by, "restore-execute", req.scope(), {
                    "request": req.id, "kind": "files", "paths": t["paths"], "target": t["target"], "via": "api"})
        return req

    def record_result(self, req: RestoreRequest, by: str, result: str, details: dict[str, Any] | None = None) -> None:
        """Audit how the restore that used the ticket ended (``ok``, ``failed: ...``)."""
        self.audit.append(by, "restore-done", req.scope(), {"request": req.id, "result": result, **(details or {})})


def _api_live(req: RestoreRequest, now: int) -> bool:
    """A files ticket in use over the API (executed there only) that has not expired: still revocable."""
    return (req.state == "executed" and req.ticket is not None and now <= req.ticket["expires_ns"]
            and bool(req.executions) and all(e.get("via") == "api" for e in req.executions))


@dataclass
class Authorization:
    """What ``authorize`` returns: the request whose ticket was used (None when none was needed). As a
    context manager it audits the outcome of the restore it guards (``ok`` or ``failed: why``)."""

    store: RestoreRequestStore | None
    request: RestoreRequest | None
    by: str
    finished: bool = False

    def done(self, result: str, details: dict[str, Any] | None = None) -> None:
        if self.store is not None and self.request is not None and not self.finished:
            self.store.record_result(self.request, self.by, result, details)
        self.finished = True

    def __enter__(self) -> Authorization:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.done("ok" if exc is None else f"failed: {exc or typ}")


def authorize(cfg: Config, snap: Any, *, kind: str | Collection[str], paths: builtins.list[str], target: str,
              ticket: str | None, by: str) -> Authorization:
    """The gate of every restore path: no policy and no ticket -> nothing changes; a tenant that requires
    tickets -> TicketRefused without a valid one. A ticket given is always checked and spent."""
    tenant = snapshot_tenant(cfg, snap)
    if not ticket and not policy_for(cfg, tenant).require_ticket:
        return Authorization(None, None, by)  # touches nothing: no state directory, no audit entry
    store = RestoreRequestStore.for_config(cfg)
    if not ticket:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        store.audit.append(by, "restore-ticket-refused", f"{tenant or '-'}/{snap.host}@{snap.id[:12]}",
                           {"why": "no ticket", "kind": kinds[0], "paths": paths, "target": target})
        raise TicketRefused(f"restores of tenant {tenant or '(none)'}'s data need an approved ticket: ask with "
                            f"`ihb restore-request create {snap.id[:12]} --kind {kinds[0]} ...`, then pass "
                            "--ticket SECRET")
    return Authorization(store, store.check_ticket(ticket, snapshot=snap.id, kind=kind, paths=paths, target=target,
                                                   by=by), by)
