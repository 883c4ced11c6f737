"""Restores over the API honour the tenant's restore policy: without an approved files ticket
(X-Ihb-Ticket, `ihb agent restore --ticket`) the data reads are refused with 403 and exit 71; with one
they go through, the ticket staying usable over the API (not on the appliance) until it expires or is
revoked. And auto-approval of same-host file restores trusts only the agent token of that host, never
a client-supplied target_host."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import msgpack

from .conftest import Appliance, run_ihb, tree_digest, write_tree
from .test_restore_requests_api import _token


def _get(app: Appliance, path: str, token: Path, ticket: str | None = None) -> tuple[int, Any]:
    return app.api("GET", path, token, headers={"X-Ihb-Ticket": ticket} if ticket is not None else None)


def test_api_restores_need_a_ticket(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    policy = {"require_ticket": True, "authorizers": ["alice"], "auto_approve_same_host_files": True}
    with open(app.config, "a") as f:
        f.write(f'\n[service]\nstate_dir = "{app.base / "service"}"\n\n[tenants.acme.restore]\n')
        f.writelines(f"{k} = {json.dumps(v)}\n" for k, v in policy.items())
    web1, web2, db1 = app.token("acme", "web1"), app.token("acme", "web2"), app.token("globex", "db1")
    mallory, alice = (_token(app, "tenant", "acme", n) for n in ("mallory", "alice"))
    admin = _token(app, "admin", None, "ops")
    app.start()
    data = write_tree(tmp_path / "src", {"etc/hosts": b"127.0.0.1 web1\n", "var/db": b"x" * 100_000})
    sid = json.loads(app.agent(web1, "backup", str(data), cache=tmp_path / "c1").stdout)["id"]
    sid2 = json.loads(app.agent(web2, "backup", str(data), cache=tmp_path / "c2").stdout)["id"]
    gid = json.loads(app.agent(db1, "backup", str(data), cache=tmp_path / "c3").stdout)["id"]
    base = "/api/v1/restore-requests"

    # listing stays allowed; reading data does not; a tenant without the policy is unaffected
    assert [s["id"] for s in _get(app, "/api/v1/snapshots", web1)[1]["snapshots"]] == [sid]
    st, r = _get(app, f"/api/v1/snapshots/{sid}", web1)
    assert st == 403 and r["error"]["code"] == "ticket_required" and "X-Ihb-Ticket" in r["error"]["message"]
    assert _get(app, f"/api/v1/snapshots/{gid}", db1)[0] == 200
    target = tmp_path / "restored"
    p = app.agent(web1, "restore", sid, str(target), check=False)
    assert p.returncode == 71, p.stderr
    assert "requires authorized restores" in p.stderr and "ihb restore-request create" in p.stderr

    # defect 2: a tenant token naming the source host as target_host is not auto-approved ...
    st, r = app.api("POST", base, mallory, {"snapshot": sid, "kind": "files", "paths": [f"{data}/etc"],
                                            "target": "/anywhere", "target_host": "web1"})
    assert st == 201 and r["request"]["state"] == "pending" and "ticket_secret" not in r["request"]
    mallory_rid = r["request"]["id"]
    st, r = app.api("POST", base, admin, {"snapshot": sid, "kind": "files", "target": "/x", "target_host": "web1"})
    assert st == 201 and r["request"]["state"] == "pending"  # nor an admin token
    # ... the agent token of that very host is
    st, r = app.api("POST", base, web1, {"snapshot": sid, "kind": "files", "target": str(target)})
    assert st == 201 and r["request"]["state"] == "approved"
    ticket, auto_rid = r["request"]["ticket_secret"], r["request"]["id"]

    # with the ticket: restored, twice (over the API a files ticket lasts until it expires)
    p = app.agent(web1, "restore", sid, str(target), "--ticket", ticket)
    assert tree_digest(target / str(data).lstrip("/")) == tree_digest(data)
    env = {**os.environ, "IHB_RESTORE_TICKET": ticket}
    run_ihb("agent", "restore", *app.agent_args(web1), sid, str(tmp_path / "again"), env=env)
    assert tree_digest(tmp_path / "again" / str(data).lstrip("/")) == tree_digest(data)
    req = app.api("GET", f"{base}/{auto_rid}", web1)[1]["request"]
    assert req["state"] == "executed" and [e["via"] for e in req["executions"]] == ["api"]  # first use recorded
    # ... but not for another host, nor on the appliance after it was used over the API
    p = app.agent(web2, "restore", sid2, str(tmp_path / "t2"), "--ticket", ticket, check=False)
    assert p.returncode == 71 and "not acme/web2" in p.stderr
    p = run_ihb("restore", "--config", str(app.config), sid, str(tmp_path / "t3"), "--ticket", ticket, check=False)
    assert p.returncode == 71 and "already used" in p.stderr
    assert _get(app, f"/api/v1/snapshots/{sid}", web1, "ihbrt_bogus")[1]["error"]["code"] == "ticket_refused"

    # a tenant token with an approved ticket: its restore point and that host's blobs only
    assert app.api("POST", f"{base}/{mallory_rid}/approve", alice)[0] == 200
    mticket = app.api("POST", f"{base}/{mallory_rid}/ticket", mallory)[1]["ticket"]
    assert _get(app, f"/api/v1/snapshots/{sid2}", mallory, mticket)[0] == 403  # another restore point
    st, r = _get(app, f"/api/v1/snapshots/{sid}", mallory, mticket)
    assert st == 200
    page = msgpack.unpackb(base64.b64decode(r["snapshot"]["root"]), raw=False)["d"][0][1].hex()
    assert _get(app, f"/api/v1/blobs/tree/{page}", mallory)[0] == 403
    st, body = _get(app, f"/api/v1/blobs/tree/{page}", mallory, mticket)
    assert st == 200 and isinstance(body, bytes) and body
    # revoking the ticket in use stops it (a new scope is checked against the store at once)
    assert app.api("POST", f"{base}/{mallory_rid}/deny", alice, {"reason": "revoked"})[1]["request"]["state"] == "denied"
    assert _get(app, f"/api/v1/blobs/tree/{page}", web1, mticket)[0] == 403

    audit = json.loads(run_ihb("audit", "--config", str(app.config), "--json").stdout)
    events = [(e["action"], (e.get("details") or {}).get("via")) for e in audit]
    assert ("restore-execute", "api") in events and ("restore-ticket-refused", "api") in events
    app.stop()
    assert "Traceback" not in app.log.read_text()
