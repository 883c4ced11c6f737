"""Tenants share one repository (identical data is stored once) but see and restore only their own
hosts; a tenant with its own key is stored apart; agents cannot poison deduplication."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import blake3
import msgpack

from repo.errors import InvalidArgument
from repo.repository import Repository
from repo.restore import RestoreOptions, restore_snapshot

from .conftest import Appliance, run_ihb, tree_digest, write_tree

H64 = "0" * 64


def _frame(kind: int, tid: bytes, plain: bytes) -> bytes:
    body = b"\x00" + plain
    return struct.pack("<B32sII", kind, tid, len(plain), len(body)) + body


def test_tenant_isolation_and_dedup(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    web1 = app.token("acme", "web1")
    web2 = app.token("acme", "web2")
    db1 = app.token("globex", "db1")
    s1 = app.token("secretco", "s1", own_key=True)
    acme = app.token("acme", role="tenant")
    admin = app.token(role="admin")
    app.start()

    shared = os.urandom(3 * 1024 * 1024)
    data = write_tree(tmp_path / "src", {"shared.bin": shared, "etc/conf": b"x = 1\n"})
    ids = {}
    for name, tok in (("web1", web1), ("web2", web2), ("db1", db1), ("s1", s1)):
        out = app.agent(tok, "backup", str(data), cache=tmp_path / f"cache-{name}").stdout
        import json

        ids[name] = json.loads(out)["id"]

    # Cross-tenant dedup in the shared repository: acme and globex stored the 3 MiB once; the own-key
    # tenant stored its own sealed copy.
    env = dict(os.environ, IHB_CACHE_DIR=str(tmp_path / "check-cache"))
    info = json.loads(run_ihb("info", "--repo", str(app.repo), "--json", env=env).stdout)
    assert 6 * 1024 * 1024 <= info["pack_bytes"] < 7 * 1024 * 1024, info

    # --- an agent token sees only its own host ---------------------------------------------------------
    st, r = app.api("GET", "/api/v1/snapshots", web1)
    assert st == 200 and {s["id"] for s in r["snapshots"]} == {ids["web1"]}
    for other in ("web2", "db1", "s1"):
        assert app.api("GET", f"/api/v1/snapshots/{ids[other]}", web1)[0] == 404
    # a tenant token sees its hosts, not other tenants'
    st, r = app.api("GET", "/api/v1/snapshots", acme)
    assert {s["id"] for s in r["snapshots"]} == {ids["web1"], ids["web2"]}
    assert app.api("GET", f"/api/v1/snapshots/{ids['db1']}", acme)[0] == 404
    # the admin sees everything and reads globex's tree to learn blob ids for the probes below
    st, r = app.api("GET", f"/api/v1/snapshots/{ids['db1']}", admin)
    assert st == 200
    root = msgpack.unpackb(base64.b64decode(r["snapshot"]["root"]), raw=False)
    page_id = root["d"][0][1].hex()
    assert app.api("GET", f"/api/v1/blobs/tree/{page_id}", admin)[0] == 400  # the admin names the tenant
    st, page = app.api("GET", f"/api/v1/blobs/tree/{page_id}?tenant=globex", admin)
    assert st == 200
    node = root
    for comp in [*Path(data).parts[1:], "shared.bin"]:
        entries = []
        for _first, pid in node["d"]:
            st, page = app.api("GET", f"/api/v1/blobs/tree/{pid.hex()}?tenant=globex", admin)
            assert st == 200
            entries += msgpack.unpackb(page, raw=False)
        node = next(n for n in entries if n["n"] == comp.encode())
    data_id = node["c"][0][0].hex()
    # globex's page is globex's; the identical content chunk is acme's too (they both sent it), but
    # the own-key tenant and a host that never referenced it cannot read it
    assert app.api("GET", f"/api/v1/blobs/tree/{page_id}", web1)[0] == 404
    assert app.api("GET", f"/api/v1/blobs/tree/{page_id}", acme)[0] == 404
    assert app.api("GET", f"/api/v1/blobs/tree/{page_id}", s1)[0] == 404
    assert app.api("GET", f"/api/v1/blobs/data/{data_id}", s1)[0] == 404
    assert app.api("GET", f"/api/v1/blobs/data/{data_id}", web1)[0] == 200

    # --- sessions of another tenant are absent on every endpoint ---------------------------------------
    st, sess = app.api("POST", "/api/v1/sessions", db1, body={"paths": []})
    sid = sess["session"]
    for method, path, kw in (
        ("GET", f"/api/v1/sessions/{sid}", {}),
        ("DELETE", f"/api/v1/sessions/{sid}", {}),
        ("POST", f"/api/v1/sessions/{sid}/have", {"body": {"ids": [H64]}}),
        ("POST", f"/api/v1/sessions/{sid}/blobs", {"raw": _frame(0, bytes(32), b"x"), "ctype": "application/octet-stream"}),
        ("POST", f"/api/v1/sessions/{sid}/commit", {"body": {"root": base64.b64encode(b"x").decode()}}),
    ):
        for tok in (web1, acme, s1):
            st, r = app.api(method, path, tok, **kw)
            assert st in (403, 404), (method, path, st, r)
    # tenant and admin tokens cannot back up; agent-only endpoints refuse them
    assert app.api("POST", "/api/v1/sessions", acme, body={})[0] == 403
    assert app.api("GET", "/api/v1/agent/params", admin)[0] == 403

    # `ihb agent restore` of someone else's restore point fails; of its own works
    p = app.agent(web1, "restore", ids["db1"][:12], str(tmp_path / "r-x"), check=False)
    assert p.returncode == 20 and not (tmp_path / "r-x" / "src").exists(), p.stderr
    app.agent(web1, "restore", ids["web1"][:12], str(tmp_path / "r-web1"))
    assert tree_digest(tmp_path / "r-web1" / str(data).lstrip("/")) == tree_digest(data)
    app.agent(s1, "restore", "latest", str(tmp_path / "r-s1"))
    assert tree_digest(tmp_path / "r-s1" / str(data).lstrip("/")) == tree_digest(data)

    # --- poisoning: content that does not hash to its id is refused; so are unknown references ---------
    st, sess = app.api("POST", "/api/v1/sessions", web1, body={"paths": []})
    sid = sess["session"]
    st, params = app.api("GET", "/api/v1/agent/params", web1)
    key = bytes.fromhex(params["id_key"])
    evil = b"not what the id says"
    st, r = app.api("POST", f"/api/v1/sessions/{sid}/blobs", web1,
                    raw=_frame(0, blake3.blake3(b"other", key=key).digest(), evil), ctype="application/octet-stream")
    assert st == 422, r
    page = msgpack.packb([{"n": b"f", "t": "f", "c": [[os.urandom(32), 5]]}], use_bin_type=True)
    st, r = app.api("POST", f"/api/v1/sessions/{sid}/blobs", web1,
                    raw=_frame(1, blake3.blake3(page, key=key).digest(), page), ctype="application/octet-stream")
    assert st == 409 and r["error"]["missing"], r
    # another tenant's key gives other ids: globex's id key differs from acme's
    assert app.api("GET", "/api/v1/agent/params", db1)[1]["id_key"] != params["id_key"]

    # revoked tokens stop at once, on the running server
    tid = [ln.split()[0] for ln in run_ihb("token", "list", "--config", str(app.config)).stdout.splitlines()
           if " web2 " in ln][0]
    run_ihb("token", "revoke", tid, "--config", str(app.config))
    assert app.api("GET", "/api/v1/snapshots", web2)[0] == 401

    app.stop()
    # The repository stays a normal repository: check passes, acme's restore point restores locally,
    # the own-key tenant's content cannot be restored without the appliance.
    env = dict(os.environ, IHB_CACHE_DIR=str(tmp_path / "check-cache"))
    run_ihb("check", "--read-data", "--repo", str(app.repo), env=env)
    os.environ["IHB_CACHE_DIR"] = str(tmp_path / "check-cache")
    with Repository.open(str(app.repo), lambda: b"appliance test passphrase") as repo:
        snap = repo.get_snapshot(ids["web2"][:12])
        restore_snapshot(repo, snap, str(tmp_path / "local-web2"), RestoreOptions())
        assert tree_digest(tmp_path / "local-web2" / str(data).lstrip("/")) == tree_digest(data)
        sealed = repo.get_snapshot(ids["s1"][:12])
        try:
            restore_snapshot(repo, sealed, str(tmp_path / "local-s1"), RestoreOptions())
            raise AssertionError("an own-key restore point restored without the appliance")
        except InvalidArgument:
            pass
    assert "Traceback" not in app.log.read_text()
