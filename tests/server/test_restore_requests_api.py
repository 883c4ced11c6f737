"""Restore requests over the API: tenant scoping, agents asking for their own host only, approvals by
the tenant's authorizers (token notes), and a ticket issued over the API that the real `ihb restore`
on the appliance accepts."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Appliance, run_ihb, tree_digest, write_tree


def _token(app: Appliance, role: str, tenant: str | None, note: str) -> Path:
    path = app.base / f"{role}-{note}.token"
    args = ["token", "create", "--config", str(app.config), "--role", role, "--note", note, "-o", str(path)]
    if tenant:
        args += ["--tenant", tenant]
    run_ihb(*args)
    return path


def test_restore_requests_over_the_api(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    with open(app.config, "a") as f:
        f.write(f"""
[service]
state_dir = "{app.base / 'service'}"

[tenants.acme.restore]
require_ticket = true
approvals = 2
authorizers = ["alice", "bob"]
auto_approve_same_host_files = true
""")
    web1 = app.token("acme", "web1")
    web2 = app.token("acme", "web2")
    db1 = app.token("globex", "db1")
    mallory, alice, bob = (_token(app, "tenant", "acme", n) for n in ("mallory", "alice", "bob"))
    gina = _token(app, "tenant", "globex", "gina")
    admin = _token(app, "admin", None, "ops")
    app.start()
    data = write_tree(tmp_path / "src", {"etc/hosts": b"127.0.0.1 web1\n", "var/db": b"x" * 100_000})
    sid = json.loads(app.agent(web1, "backup", str(data), cache=tmp_path / "c1").stdout)["id"]
    gid = json.loads(app.agent(db1, "backup", str(data), cache=tmp_path / "c2").stdout)["id"]
    base = "/api/v1/restore-requests"

    # an agent asks for its own host's files back to itself: approved at once by the policy
    st, r = app.api("POST", base, web1, {"snapshot": sid, "kind": "files", "paths": [f"{data}/etc"],
                                         "target": f"{data}/etc", "reason": "overwritten by mistake"})
    assert st == 201 and r["request"]["state"] == "approved" and r["request"]["ticket_secret"]
    auto_id = r["request"]["id"]
    assert r["request"]["requested_by"].startswith("token-") and r["request"]["target_host"] == "web1"
    # ... but never for another host's or another tenant's restore points
    assert app.api("POST", base, web1, {"snapshot": gid, "kind": "files", "target": "/x"})[0] == 404
    assert app.api("POST", base, web2, {"snapshot": sid, "kind": "files", "target": "/x"})[0] == 404
    assert app.api("POST", base, gina, {"snapshot": sid, "kind": "files", "target": "/x"})[0] == 404
    assert app.api("POST", base, web1, {"snapshot": sid, "kind": "teleport"})[0] == 400
    assert app.api("POST", base, web1, {"snapshot": sid, "kind": "files"})[0] == 400  # no target

    # the customer asks for a restore elsewhere: two authorizers must approve
    target = tmp_path / "restored"
    st, r = app.api("POST", base, mallory, {"snapshot": sid, "kind": "files", "paths": [f"{data}/etc"],
                                            "target": str(target), "target_host": "appliance"})
    assert st == 201 and r["request"]["state"] == "pending" and r["request"]["requested_by"] == "mallory"
    rid = r["request"]["id"]
    st, r = app.api("POST", f"{base}/{rid}/approve", mallory)
    assert st == 409 and "cannot approve" in r["error"]["message"]
    assert app.api("POST", f"{base}/{rid}/approve", gina)[0] == 404  # another tenant: absent
    assert app.api("POST", f"{base}/{rid}/approve", web1)[0] == 403  # agents never approve
    assert app.api("POST", f"{base}/{rid}/approve", admin)[0] == 409  # "ops" is not an authorizer of acme
    st, r = app.api("POST", f"{base}/{rid}/approve", alice)
    assert st == 200 and r["request"]["state"] == "pending" and "ticket_secret" not in r["request"]
    st, r = app.api("POST", f"{base}/{rid}/approve", bob)
    assert st == 200 and r["request"]["state"] == "approved"
    assert "hash" not in r["request"]["ticket"]
    st, r = app.api("POST", f"{base}/{rid}/ticket", alice)
    assert st == 409  # only the requester retrieves it
    st, r = app.api("POST", f"{base}/{rid}/ticket", mallory)
    assert st == 200
    ticket = r["ticket"]
    assert app.api("POST", f"{base}/{rid}/ticket", mallory)[0] == 409  # once

    # scoping of the listings
    st, r = app.api("GET", base, mallory)
    assert st == 200 and {x["id"] for x in r["requests"]} == {auto_id, rid}
    assert app.api("GET", base, gina)[1]["requests"] == []
    assert app.api("GET", f"{base}?tenant=acme", gina)[1]["requests"] == []
    assert {x["id"] for x in app.api("GET", base, web1)[1]["requests"]} == {auto_id, rid}
    assert app.api("GET", base, web2)[1]["requests"] == []
    assert {x["id"] for x in app.api("GET", f"{base}?state=approved", admin)[1]["requests"]} == {auto_id, rid}
    assert app.api("GET", f"{base}/{rid}", gina)[0] == 404
    assert app.api("GET", f"{base}/{rid}", mallory)[1]["request"]["approvals"] == ["alice", "bob"]

    # the real restore on the appliance: refused without the ticket, done with it
    args = ["restore", "--config", str(app.config), sid, str(target), "--include", f"{data}/etc"]
    p = run_ihb(*args, check=False)
    assert p.returncode == 71 and "ihb restore-request create" in p.stderr
    run_ihb(*args, "--ticket", ticket)
    assert tree_digest(target / str(data).lstrip("/")) == {"etc/hosts": tree_digest(data)["etc/hosts"]}
    assert app.api("GET", f"{base}/{rid}", mallory)[1]["request"]["state"] == "executed"

    # deny, and withdraw by the requester
    st, r = app.api("POST", base, mallory, {"snapshot": sid, "kind": "mount"})
    rid2 = r["request"]["id"]
    assert app.api("POST", f"{base}/{rid2}/deny", gina, {"reason": "no"})[0] == 404
    st, r = app.api("POST", f"{base}/{rid2}/deny", alice, {"reason": "not today"})
    assert st == 200 and r["request"]["state"] == "denied" and r["request"]["decision_reason"] == "not today"
    assert app.api("POST", f"{base}/{rid2}/deny", alice)[0] == 409

    doc = app.api("GET", "/api/v1/openapi.json")[1]
    for path in (base, f"{base}/{{request_id}}", f"{base}/{{request_id}}/approve", f"{base}/{{request_id}}/deny",
                 f"{base}/{{request_id}}/ticket"):
        assert path in doc["paths"], path
    audit = json.loads(run_ihb("audit", "--config", str(app.config), "--json").stdout)
    actions = [(e["actor"], e["action"]) for e in audit]
    assert ("mallory", "restore-request") in actions and ("bob", "restore-ticket-issued") in actions
    assert ("alice", "restore-deny") in actions and ("ops", "restore-approval-refused") in actions
    assert json.loads(run_ihb("audit", "--config", str(app.config), "verify", "--json").stdout)["ok"]
    app.stop()
    assert "Traceback" not in app.log.read_text()
