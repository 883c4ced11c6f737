"""The routing table, authentication and roles: what every endpoint shares.

A route declares its method, path pattern (``/api/v1/snapshots/{snapshot_id}``, each parameter with a
regular expression), the roles allowed, its body limit and its OpenAPI description, so the table is
also the API's documentation (``openapi.build``). Later features (catalog, retention, dashboard pages)
add routes with ``App.route``; HTML pages use the same table with ``content_type="text/html"``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .http import HTTPError, Request, Response, error_response
from .state import State, TokenRecord

log = logging.getLogger(__name__)

HEX64 = r"[0-9a-f]{64}"
HEX32 = r"[0-9a-f]{32}"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's binding. Admin tokens have tenant and host ``*``."""

    token_id: str
    role: str
    tenant: str
    host: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, tenant: str | None, host: str | None) -> bool:
        """A restore point of (tenant, host) is visible to admins, its tenant, and its own host's agent."""
        if self.is_admin:
            return True
        if tenant != self.tenant:
            return False
        return self.role == "tenant" or host == self.host


Handler = Callable[[Request, Principal | None], Awaitable[Response]]


@dataclass
class Route:
    method: str
    pattern: str
    handler: Handler
    roles: frozenset[str] | None  # None: no authentication (health, OpenAPI)
    max_body: int = 0
    summary: str = ""
    tags: list[str] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)  # path parameter -> regex
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # OpenAPI query parameters
    request_body: dict[str, Any] | None = None  # OpenAPI requestBody
    responses: dict[str, Any] = field(default_factory=dict)
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            return f"(?P<{name}>{self.params.get(name, '[^/]+')})"

        self.regex = re.compile("^" + re.sub(r"\{(\w+)\}", sub, self.pattern) + "$")


class App:
    """Dispatches requests through the routing table, after authentication and the role check."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.routes: list[Route] = []
        self._shape: dict[str, list[Route]] = {}

    def route(self, method: str, pattern: str, *, roles: tuple[str, ...] | None, **kw: Any) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add(Route(method, pattern, fn, frozenset(roles) if roles is not None else None, **kw))
            return fn

        return deco

    def add(self, route: Route) -> None:
        self.routes.append(route)
        shape = re.sub(r"\{\w+\}", "{}", route.pattern)
        self._shape.setdefault(shape, []).append(route)

    # --- matching --------------------------------------------------------------------------------------
    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        shape_hit = False
        for r in self.routes:
            m = r.regex.match(path)
            if m is None:
                continue
            if r.method == method or (method == "HEAD" and r.method == "GET"):
                return r, m.groupdict()
            allowed.append(r.method)
        if not allowed:
            # A known shape with a malformed parameter is still "not found", with a hint.
            for shape in self._shape:
                pat = "^" + re.escape(shape).replace(r"\{\}", "[^/]+") + "$"
                if re.match(pat, path):
                    shape_hit = True
                    break
            hint = " (a path parameter is malformed)" if shape_hit else ""
            raise HTTPError(404, f"no such endpoint or resource: {path}{hint}; see /api/v1/openapi.json")
        raise HTTPError(405, f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}",
                        allow=sorted(set(allowed)))

    # --- authentication --------------------------------------------------------------------------------
    def authenticate(self, req: Request) -> Principal:
        auth = req.header("authorization")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPError(401, "authentication required: send 'Authorization: Bearer <token>'")
        rec: TokenRecord | None = self.state.lookup_token(token.strip())
        if rec is None:
            raise HTTPError(401, "the token is unknown or revoked; create one with `ihb token create`")
        return Principal(rec.id, rec.role, rec.tenant, rec.host)

    def _prepare(self, req: Request) -> tuple[Route, Principal | None]:
        route, params = self.match(req.method, req.path)
        req.path_params = params
        principal = None
        if route.roles is not None:
            principal = self.authenticate(req)
            if principal.role not in route.roles:
                raise HTTPError(403, f"a {principal.role} token may not use this endpoint")
        return route, principal

    # --- the http.Application protocol ------------------------------------------------------------------
    def body_limit(self, request: Request) -> int:
        route, _principal = self._prepare(request)
        return route.max_body

    async def handle(self, request: Request) -> Response:
        try:
            route, principal = self._prepare(request)
            resp = await route.handler(request, principal)
            if request.method == "HEAD":
                resp.body = b""
            return resp
        except HTTPError as e:
            return error_response(e.status, e.message, **e.extra)
        except Exception as e:  # a bug: log it fully, answer without leaking internals
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, f"internal error ({type(e).__name__}); the appliance log has details")
