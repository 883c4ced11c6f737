"""The restore-request endpoints (docs/protocol.md §5.5): customers and operators ask for restores and
the tenant's authorizers approve or deny them over the API (the workflow and the policy are
``appliance.restore_requests``; this module only maps HTTP onto it).

Scoping follows the restore points: a request is visible to admins, to its tenant's tenant tokens and
to the agent of its host; anything else is reported as absent (404), never as forbidden. An agent may
ask only for restores of its own host's restore points (their target host is the agent's host).
``auto_approve_same_host_files`` applies only to requests made with the agent token of the restore
point's own host: a ``target_host`` sent by a tenant or admin token is recorded, never trusted for
auto-approval (those requests go through the normal approval). Who acts is the token's note (``ihb token create
--note alice``), else ``token-ID``: the same names as in the dashboard and in ``authorizers = [...]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from appliance.restore_requests import KINDS, STATES, RestoreRequest, RestoreRequestStore, snapshot_tenant
from repo.errors import IhbError, InvalidArgument, RestoreRequestRefused

from . import openapi
from .app import HEX64, Principal
from .http import HTTPError, Request, Response, json_response

if TYPE_CHECKING:
    from .api import ApiServer

API = "/api/v1"
RID = r"[0-9a-f]{16}"
MAX_PATHS = 256
ANY_ROLE = ("admin", "tenant", "agent")

_REQUEST_SCHEMA: dict[str, Any] = {"type": "object"}
_CREATE_BODY = openapi.json_body({
    "type": "object", "required": ["snapshot", "kind"], "properties": {
        "snapshot": {"type": "string", "pattern": f"^{HEX64}$"},
        "kind": {"type": "string", "enum": list(KINDS)},
        "paths": {"type": "array", "maxItems": MAX_PATHS, "items": {"type": "string", "maxLength": 4096}},
        "target": {"type": "string", "maxLength": 4096},
        "target_host": {"type": "string", "maxLength": 255},
        "reason": {"type": "string", "maxLength": 2000}}})
_DENY_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"reason": {"type": "string", "maxLength": 2000}}}}}}


def actor(api: ApiServer, p: Principal) -> str:
    rec = next((t for t in api.state.tokens() if t.id == p.token_id), None)
    note = " ".join((rec.note if rec else "").split())
    return note[:64] if note else f"token-{p.token_id}"


def _str(doc: dict[str, Any], key: str, limit: int) -> str:
    v = doc.get(key, "")
    if not isinstance(v, str) or len(v) > limit:
        raise HTTPError(400, f"{key} must be a string of at most {limit} characters")
    return v


def register(api: ApiServer) -> None:  # noqa: C901 - one table, read top to bottom
    app = api.app
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}}
    rid_param = {"request_id": RID}

    def store() -> RestoreRequestStore:
        return RestoreRequestStore.for_config(api.settings.config)

    def visible(p: Principal, r: RestoreRequest) -> bool:
        return p.may_see(r.tenant, r.host) and (p.is_admin or bool(r.tenant))

    async def one(p: Principal, rid: str) -> RestoreRequest:
        def find() -> RestoreRequest | None:
            try:
                return store().get(rid)
            except InvalidArgument:
                return None

        r = await api.run(find)
        if r is None or not visible(p, r):
            raise HTTPError(404, f"no restore request {rid} visible to this token")
        return r

    async def act(fn: Any, *args: Any) -> RestoreRequest:
        try:
            return await api.run(fn, *args)  # type: ignore[no-any-return]
        except RestoreRequestRefused as e:
            raise HTTPError(409, str(e)) from None
        except IhbError as e:
            raise HTTPError(400, str(e)) from None

    @app.route("GET", f"{API}/restore-requests", roles=ANY_ROLE, tags=["restore-requests"], responses=ok,
               query={"state": {"type": "string", "enum": list(STATES)}, "tenant": {"type": "string"}},
               summary="Restore requests the caller may see (admin: all; tenant: its own; agent: its host's).")
    async def list_restore_requests(req: Request, p: Principal | None) -> Response:
        assert p is not None
        state, tenant = req.query.get("state"), req.query.get("tenant")
        if state is not None and state not in STATES:
            raise HTTPError(400, f"state must be one of {', '.join(STATES)}")
        if not p.is_admin:
            tenant = p.tenant
        reqs = await api.run(lambda: store().list(tenant=tenant, state=state))
        return json_response({"requests": [r.to_obj() for r in reqs if visible(p, r)]})

    @app.route("POST", f"{API}/restore-requests", roles=ANY_ROLE, tags=["restore-requests"],
               max_body=api.settings.max_json_body, request_body=_CREATE_BODY,
               responses={"201": {"description": "created (approved at once when the policy says so; then "
                                                 "ticket_secret is in the answer, once)"}},
               summary="Ask for a restore of a restore point the caller may see.")
    async def create_restore_request(req: Request, p: Principal | None) -> Response:
        assert p is not None
        doc = req.json()
        if not isinstance(doc, dict):
            raise HTTPError(400, "the body is a JSON object")
        sid, kind = doc.get("snapshot"), doc.get("kind")
        if not isinstance(sid, str) or len(sid) != 64:
            raise HTTPError(400, "snapshot must be a restore point id (64 hex digits)")
        if kind not in KINDS:
            raise HTTPError(400, f"kind must be one of {', '.join(KINDS)}")
        paths = doc.get("paths", [])
        if not isinstance(paths, list) or len(paths) > MAX_PATHS or not all(
                isinstance(x, str) and len(x) <= 4096 for x in paths):
            raise HTTPError(400, f"paths must be a list of at most {MAX_PATHS} strings")
        target, reason = _str(doc, "target", 4096), _str(doc, "reason", 2000)
        target_host = p.host if p.role == "agent" else _str(doc, "target_host", 255)
        snaps = await api.run(api.repo.snapshots)
        snap = next((s for s in snaps if s.id == sid and api._visible(p, s)), None)
        if snap is None:
            raise HTTPError(404, f"no restore point {sid} visible to this token")
        tenant = snapshot_tenant(api.settings.config, snap)
        if not p.is_admin and tenant != p.tenant:
            raise HTTPError(404, f"no restore point {sid} visible to this token")
        by = actor(api, p)
        own_host = p.role == "agent" and p.host == snap.host and target_host == snap.host  # never a client field
        r = await act(lambda: store().create(tenant=tenant, host=snap.host, snapshot=snap.id, kind=str(kind),
                                             paths=list(paths), target=target, requested_by=by, reason=reason,
                                             target_host=target_host, may_auto_approve=own_host))
        return json_response({"request": r.to_obj()}, 201)

    @app.route("GET", f"{API}/restore-requests/{{request_id}}", roles=ANY_ROLE, params=rid_param,
               tags=["restore-requests"], responses=ok, summary="One restore request with its history.")
    async def get_restore_request(req: Request, p: Principal | None) -> Response:
        assert p is not None
        return json_response({"request": (await one(p, req.path_params["request_id"])).to_obj()})

    @app.route("POST", f"{API}/restore-requests/{{request_id}}/approve", roles=("admin", "tenant"),
               params=rid_param, tags=["restore-requests"], responses=ok,
               summary="Approve (the approval that completes it returns ticket_secret, once); 409 if refused.")
    async def approve_restore_request(req: Request, p: Principal | None) -> Response:
        assert p is not None
        r = await one(p, req.path_params["request_id"])
        return json_response({"request": (await act(store().approve, r.id, actor(api, p))).to_obj()})

    @app.route("POST", f"{API}/restore-requests/{{request_id}}/deny", roles=ANY_ROLE, params=rid_param,
               max_body=64 * 1024, request_body=_DENY_BODY, tags=["restore-requests"], responses=ok,
               summary="Deny (an authorizer) or withdraw (the requester); 409 if refused.")
    async def deny_restore_request(req: Request, p: Principal | None) -> Response:
        assert p is not None
        r = await one(p, req.path_params["request_id"])
        reason = ""
        if req.body:
            doc = req.json()
            if not isinstance(doc, dict):
                raise HTTPError(400, "the body is a JSON object")
            reason = _str(doc, "reason", 2000)
        return json_response({"request": (await act(store().deny, r.id, actor(api, p), reason)).to_obj()})

    @app.route("POST", f"{API}/restore-requests/{{request_id}}/ticket", roles=ANY_ROLE, params=rid_param,
               tags=["restore-requests"], responses=ok,
               summary="The requester retrieves the ticket of an approved request, once; 409 otherwise.")
    async def claim_restore_ticket(req: Request, p: Principal | None) -> Response:
        assert p is not None
        r = await one(p, req.path_params["request_id"])
        try:
            secret = await api.run(store().claim_ticket, r.id, actor(api, p))
        except RestoreRequestRefused as e:
            raise HTTPError(409, str(e)) from None
        return json_response({"request": r.id, "ticket": secret})
