"""The OpenAPI 3 document, generated from the routing table so the two cannot drift apart."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import App

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["status", "message"], "properties": {
        "status": {"type": "integer"}, "message": {"type": "string"}}}},
}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def build(app: App, version: int) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in app.routes:
        if not r.pattern.startswith("/api/"):
            continue  # HTML pages are not part of the API
        op: dict[str, Any] = {"summary": r.summary or r.handler.__name__, "operationId": r.handler.__name__,
                              "tags": r.tags or ["api"]}
        params = []
        for name in re.findall(r"\{(\w+)\}", r.pattern):
            regex = r.params.get(name, "[^/]+")
            schema: dict[str, Any] = {"type": "string"}
            if "|" in regex and "[" not in regex:
                schema["enum"] = regex.split("|")
            else:
                schema["pattern"] = f"^{regex}$"
            params.append({"name": name, "in": "path", "required": True, "schema": schema})
        for name, schema in r.query.items():
            params.append({"name": name, "in": "query", "required": False, "schema": schema})
        if params:
            op["parameters"] = params
        if r.request_body:
            op["requestBody"] = r.request_body
        responses = dict(r.responses) or {"200": {"description": "OK"}}
        err = {"description": "error", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for code in ("400", "404"):
            responses.setdefault(code, err)
        if r.roles is not None:
            responses.setdefault("401", err)
            responses.setdefault("403", err)
            op["security"] = [{"bearer": []}]
        if r.max_body:
            responses.setdefault("413", err)
        op["responses"] = responses
        paths.setdefault(r.pattern, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "ihb appliance API", "version": f"{version}.0",
                 "description": "Agents back up into and restore from the appliance; see docs/protocol.md."},
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
