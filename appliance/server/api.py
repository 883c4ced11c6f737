"""The v1 API handlers and their routes (docs/protocol.md §5 is the prose; openapi.json the schema).

Handlers validate, check that the caller may touch the resource (a resource of another tenant or
host is reported as absent, never as forbidden, so ids cannot be probed), and send the work to a
worker thread: repository work and LMDB write transactions begin and end inside one ``to_thread``
call. Single-key LMDB reads (token, session, ownership) run inline: an LMDB reader never waits for a
writer (MVCC) and the transaction never spans an await.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from appliance.restore_requests import RestoreRequestStore, policy_for, snapshot_tenant, ticket_hash
from repo.errors import ChunkMissing, IntegrityError, TicketRefused
from repo.repository import Repository
from repo.snapshot import Snapshot

from . import dashboard, openapi, pages, restore_api
from .app import HEX32, HEX64, App, Principal
from .http import HTTPError, Request, Response, json_response
from .ingest import KINDS, MAX_HAVE_IDS, Ingest
from .settings import ServerSettings
from .state import NAME_RE, State

log = logging.getLogger(__name__)

API = "/api/v1"
API_VERSION = 1
T = TypeVar("T")
TICKET_HEADER = "x-ihb-ticket"
TICKET_RECHECK = 5.0  # seconds a validated API ticket is trusted before the store is asked again

ANY_ROLE = ("admin", "tenant", "agent")


class SessionLocks:
    """Per-session locks: requests of one upload session are applied in order, sessions in parallel."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    def __call__(self, sid: str) -> _Held:
        return _Held(self, sid)


class _Held:
    def __init__(self, owner: SessionLocks, sid: str) -> None:
        self.owner, self.sid = owner, sid

    async def __aenter__(self) -> None:
        lock, n = self.owner._locks.get(self.sid, (trio.Lock(), 0))
        self.owner._locks[self.sid] = (lock, n + 1)
        self.lock = lock
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
        lock, n = self.owner._locks[self.sid]
        if n <= 1:
            del self.owner._locks[self.sid]
        else:
            self.owner._locks[self.sid] = (lock, n - 1)


class ApiServer:
    """Everything one running appliance serves; ``app`` is what the HTTP layer talks to."""

    def __init__(self, repo: Repository, state: State, settings: ServerSettings) -> None:
        self.repo = repo
        self.state = state
        self.settings = settings
        self.ingest = Ingest(repo, state)
        self.app = App(state)
        self.cpu = trio.CapacityLimiter(settings.workers)
        self.quick = trio.CapacityLimiter(4)  # index look-ups must not queue behind uploads being sealed
        self.locks = SessionLocks()
        self._tickets: dict[tuple[str, str, str | None, str | None], tuple[float, str]] = {}
        self._refusals: dict[tuple[str, str], float] = {}
        self._register()
        pages.register(self.app)
        dashboard.register(self)  # the web dashboard and /metrics (dashboard.py)
        restore_api.register(self)  # /api/v1/restore-requests (restore_api.py)
        self._openapi = openapi.build(self.app, API_VERSION)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.cpu)

    # --- helpers ---------------------------------------------------------------------------------------
    def _session(self, p: Principal | None, sid: str) -> dict[str, Any]:
        assert p is not None
        rec = self.state.session(sid)
        if rec is None or rec["tenant"] != p.tenant or rec["host"] != p.host:
            raise HTTPError(404, f"no upload session {sid} for this host")
        return rec

    def _visible(self, p: Principal, snap: Snapshot) -> bool:
        return p.may_see(snap.meta.get("tenant"), snap.host)

    def _read_tenant(self, p: Principal, req: Request) -> str:
        if p.is_admin:
            t = req.query.get("tenant")
            if not t:
                raise HTTPError(400, "an admin token names the tenant whose blob it reads: ?tenant=NAME")
            if not NAME_RE.match(t):
                raise HTTPError(404, f"no tenant {t[:64]!r}")
            return t
        return p.tenant

    async def _read_gate(self, req: Request, p: Principal, tenant: str, snapshot: str | None) -> str | None:
        """Data reads (tree pages, file content, a restore point's root) of a tenant whose restore policy
        requires tickets need an approved ``files`` ticket in X-Ihb-Ticket (docs/protocol.md §5.5), as the
        restore commands on the appliance do. Returns the host the ticket is for (the read is then limited
        to that host's blobs), None when no ticket was sent and none is needed."""
        secret = req.header(TICKET_HEADER).strip()
        cfg = self.settings.config
        if not secret and not policy_for(cfg, tenant).require_ticket:
            return None
        from .restore_api import actor

        store = RestoreRequestStore.for_config(cfg)
        host = p.host if p.role == "agent" else None
        if not secret:
            now = time.monotonic()
            if now - self._refusals.get((p.token_id, tenant), -1e9) > 60:  # one audit entry a minute per token
                self._refusals[(p.token_id, tenant)] = now
                by = actor(self, p)
                await self.run(lambda: store.audit.append(by, "restore-ticket-refused",
                                                          f"{tenant or '-'}/{host or '*'}@{(snapshot or '*')[:12]}",
                                                          {"why": "no ticket", "via": "api"}))
            raise HTTPError(403, f"tenant {tenant or '(none)'} requires authorized restores: request one "
                                 "(`ihb restore-request create` or POST /api/v1/restore-requests) and restore on "
                                 "the appliance with --ticket, or send the approved files ticket in the "
                                 "X-Ihb-Ticket header", code="ticket_required")
        key = (ticket_hash(secret), tenant, host, snapshot)
        hit = self._tickets.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        by = actor(self, p)
        try:
            r = await self.run(lambda: store.check_read_ticket(secret, tenant=tenant, host=host, snapshot=snapshot,
                                                               by=by))
        except TicketRefused as e:
            self._tickets.pop(key, None)
            raise HTTPError(403, str(e), code="ticket_refused") from None
        if len(self._tickets) > 4096:
            self._tickets.clear()
        self._tickets[key] = (time.monotonic() + TICKET_RECHECK, r.host)
        return r.host

    # --- routes ----------------------------------------------------------------------------------------
    def _register(self) -> None:  # noqa: C901 - one table, read top to bottom
        app, s = self.app, self.settings
        sid_param = {"session_id": HEX32}
        ok_json = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}

        @app.route("GET", f"{API}/health", roles=None, summary="Liveness check; no token needed.", tags=["meta"],
                   responses=ok_json)
        async def health(req: Request, p: Principal | None) -> Response:
            return json_response({"status": "ok", "api_version": API_VERSION})

        @app.route("GET", f"{API}/openapi.json", roles=None, summary="This API's OpenAPI 3 document.", tags=["meta"],
                   responses=ok_json)
        async def openapi_doc(req: Request, p: Principal | None) -> Response:
            return json_response(self._openapi)

        @app.route("GET", f"{API}/whoami", roles=ANY_ROLE, summary="The caller's token binding.", tags=["meta"],
                   responses=ok_json)
        async def whoami(req: Request, p: Principal | None) -> Response:
            assert p is not None
            return json_response({"token_id": p.token_id, "role": p.role, "tenant": p.tenant, "host": p.host,
                                  "api_version": API_VERSION})

        @app.route("GET", f"{API}/agent/params", roles=("agent",), tags=["backup"], responses=ok_json,
                   summary="Chunking and id parameters for this agent's tenant (the tenant id key).")
        async def params(req: Request, p: Principal | None) -> Response:
            assert p is not None
            return json_response(await self.run(self.ingest.agent_params, p.tenant))

        @app.route("POST", f"{API}/sessions", roles=("agent",), max_body=s.max_json_body, tags=["backup"],
                   summary="Open an upload session for the token's host, or resume an open one.",
                   request_body=openapi.json_body({
                       "type": "object", "properties": {
                           "resume": {"type": "string", "pattern": f"^{HEX32}$"},
                           "paths": {"type": "array", "items": {"type": "string"}},
                       }}),
                   responses={"201": {"description": "created"}, "200": {"description": "resumed"}})
        async def open_session(req: Request, p: Principal | None) -> Response:
            assert p is not None
            doc = req.json()
            if not isinstance(doc, dict):
                raise HTTPError(400, "the body is a JSON object")
            resume = doc.get("resume")
            if resume is not None:
                if not isinstance(resume, str) or not re.fullmatch(HEX32, resume):
                    raise HTTPError(400, "resume must be a session id (32 hex digits)")
                rec = self.state.session(resume)
                if rec is not None and rec["tenant"] == p.tenant and rec["host"] == p.host and rec["state"] == "open":
                    return json_response({"session": resume, "resumed": True, **_public_session(rec)})
            paths = doc.get("paths", [])
            if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths) or len(paths) > 4096:
                raise HTTPError(400, "paths must be a list of strings")
            sid, rec = await self.run(self.state.create_session, p.tenant, p.host, {"paths": paths})
            return json_response({"session": sid, "resumed": False, **_public_session(rec)}, 201)

        @app.route("GET", f"{API}/sessions/{{session_id}}", roles=("agent",), params=sid_param, tags=["backup"],
                   summary="An upload session's state and counters.", responses=ok_json)
        async def get_session(req: Request, p: Principal | None) -> Response:
            rec = self._session(p, req.path_params["session_id"])
            return json_response({"session": req.path_params["session_id"], **_public_session(rec)})

        @app.route("DELETE", f"{API}/sessions/{{session_id}}", roles=("agent",), params=sid_param, tags=["backup"],
                   summary="Abandon an open upload session (its blobs stay until garbage collection).",
                   responses=ok_json)
        async def abort_session(req: Request, p: Principal | None) -> Response:
            sid = req.path_params["session_id"]
            async with self.locks(sid):
                rec = self._session(p, sid)
                if rec["state"] == "open":
                    rec = await self.run(lambda: self.state.update_session(sid, state="aborted"))
            return json_response({"session": sid, **_public_session(rec)})

        @app.route("POST", f"{API}/sessions/{{session_id}}/have", roles=("agent",), params=sid_param,
                   max_body=s.max_json_body, tags=["backup"],
                   summary="Which of these tenant ids does the server already have for this tenant?",
                   request_body=openapi.json_body({
                       "type": "object", "required": ["ids"], "properties": {
                           "ids": {"type": "array", "maxItems": MAX_HAVE_IDS,
                                   "items": {"type": "string", "pattern": f"^{HEX64}$"}}}}),
                   responses=ok_json)
        async def have(req: Request, p: Principal | None) -> Response:
            rec = self._session(p, req.path_params["session_id"])
            doc = req.json()
            ids = doc.get("ids") if isinstance(doc, dict) else None
            if not isinstance(ids, list) or len(ids) > MAX_HAVE_IDS:
                raise HTTPError(400, f"ids must be a list of at most {MAX_HAVE_IDS} hex ids")
            try:
                tids = [bytes.fromhex(i) for i in ids if isinstance(i, str) and len(i) == 64]
            except ValueError:
                raise HTTPError(400, "ids must be 64-digit hex strings") from None
            if len(tids) != len(ids):
                raise HTTPError(400, "ids must be 64-digit hex strings")
            result = await trio.to_thread.run_sync(self.ingest.have, rec["tenant"], tids, limiter=self.quick)
            return json_response({"have": result})

        @app.route("POST", f"{API}/sessions/{{session_id}}/blobs", roles=("agent",), params=sid_param,
                   max_body=s.max_blob_body, tags=["backup"],
                   summary="Upload blobs (framed binary, docs/protocol.md §5.3); acknowledged once durable.",
                   request_body={"required": True, "content": {"application/octet-stream": {
                       "schema": {"type": "string", "format": "binary"}}}},
                   responses=ok_json)
        async def blobs(req: Request, p: Principal | None) -> Response:
            sid = req.path_params["session_id"]
            async with self.locks(sid):
                rec = self._session(p, sid)
                if rec["state"] != "open":
                    raise HTTPError(409, f"upload session {sid} is {rec['state']}")
                t0 = time.monotonic()
                stats = await self.run(self.ingest.receive, sid, rec, req.body)
                log.debug("session %s: %d blobs, %d bytes in %.3f s", sid[:8], stats["received"],
                          len(req.body), time.monotonic() - t0)
            return json_response(stats)

        @app.route("POST", f"{API}/sessions/{{session_id}}/commit", roles=("agent",), params=sid_param,
                   max_body=s.max_commit_body, tags=["backup"],
                   summary="Make the uploaded tree a restore point (atomic, idempotent).",
                   request_body=openapi.json_body({
                       "type": "object", "required": ["root"], "properties": {
                           "root": {"type": "string", "format": "byte"},
                           "paths": {"type": "array", "items": {"type": "string"}},
                           "tags": {"type": "array", "items": {"type": "string"}},
                           "time_ns": {"type": "integer"},
                           "stats": {"type": "object", "additionalProperties": {"type": "number"}},
                           "errors": {"type": "array", "items": {
                               "type": "object", "required": ["path", "error"],
                               "properties": {"path": {"type": "string"}, "error": {"type": "string"}}}},
                           "streams": {"type": "array", "items": {
                               "type": "object", "properties": {
                                   "name": {"type": "string"},
                                   "command": {"type": "array", "items": {"type": "string"}}}}}}}),
                   responses=ok_json)
        async def commit(req: Request, p: Principal | None) -> Response:
            sid = req.path_params["session_id"]
            doc = req.json()
            async with self.locks(sid):
                rec = self._session(p, sid)
                snap = await self.run(self.ingest.commit, sid, rec, doc)
            return json_response({"snapshot": snap.summary()})

        @app.route("GET", f"{API}/snapshots", roles=ANY_ROLE, tags=["restore"],
                   summary="Restore points the caller may see (agent: its host; tenant: its hosts; admin: all).",
                   query={"host": {"type": "string"}, "tenant": {"type": "string"}}, responses=ok_json)
        async def snapshots(req: Request, p: Principal | None) -> Response:
            assert p is not None
            host, tenant = req.query.get("host"), req.query.get("tenant")
            snaps = await self.run(self.repo.snapshots)
            out = [sn.summary() for sn in snaps if self._visible(p, sn)
                   and (host is None or sn.host == host) and (tenant is None or sn.meta.get("tenant") == tenant)]
            return json_response({"snapshots": out})

        @app.route("GET", f"{API}/snapshots/{{snapshot_id}}", roles=ANY_ROLE, params={"snapshot_id": HEX64},
                   tags=["restore"], summary="One restore point with its root directory entry (base64 msgpack).",
                   responses=ok_json)
        async def snapshot(req: Request, p: Principal | None) -> Response:
            assert p is not None
            sid = req.path_params["snapshot_id"]
            snaps = await self.run(self.repo.snapshots)
            for sn in snaps:
                if sn.id == sid and self._visible(p, sn):
                    await self._read_gate(req, p, snapshot_tenant(self.settings.config, sn), sn.id)
                    full = await self.run(self.repo.load_snapshot, sid)
                    d = full.summary()
                    d["root"] = base64.b64encode(full.tree or b"").decode()
                    d["errors_list"] = full.errors
                    return json_response({"snapshot": d})
            raise HTTPError(404, f"no restore point {sid} visible to this token")

        @app.route("GET", f"{API}/blobs/{{kind}}/{{blob_id}}", roles=ANY_ROLE,
                   params={"kind": "data|tree", "blob_id": HEX64}, tags=["restore"],
                   query={"tenant": {"type": "string"}},
                   summary="The plaintext of a blob the caller may read (from its own restore points).",
                   responses={"200": {"description": "OK", "content": {"application/octet-stream": {
                       "schema": {"type": "string", "format": "binary"}}}}})
        async def blob(req: Request, p: Principal | None) -> Response:
            assert p is not None
            kind = KINDS[req.path_params["kind"]]
            rid = bytes.fromhex(req.path_params["blob_id"])
            tenant = self._read_tenant(p, req)
            ticket_host = await self._read_gate(req, p, tenant, None)  # a blob names no restore point
            if ticket_host is not None:
                owns = self.state.host_owns(tenant, ticket_host, rid)
            elif p.role == "agent":
                owns = self.state.host_owns(tenant, p.host, rid)
            else:
                owns = self.state.tenant_owns(tenant, rid)
            if not owns:
                raise HTTPError(404, "no such blob for this token")
            try:
                data = await self.run(self.ingest.read_blob, tenant, kind, rid)
            except ChunkMissing as e:
                raise HTTPError(404, str(e)) from None
            except IntegrityError as e:
                raise HTTPError(502, f"the repository copy is damaged: {e}") from None
            return Response(200, data, "application/octet-stream")


def _public_session(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in ("tenant", "host", "state", "created", "snapshot", "stats")}
