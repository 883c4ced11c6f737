"""Restores requested and authorized by the customer: a two-approval policy, refusals (own request,
twice, not an authorizer), denial, expiry, ticket scope, and the real `ihb restore` / `ihb mount`
refusing without a ticket and running with one; everything in the audit log, which verifies.

Every step runs the real CLI in a subprocess against a real repository and state directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config
from appliance.restore_requests import RestoreRequestStore, norm_path
from repo.errors import RestoreRequestRefused, TicketRefused
from tests.util import assert_same_tree, ihb

TICKET_REFUSED = 71
REQUEST_REFUSED = 72


class Env:
    """A repository, a config with restore policies, and the `ihb` environment for both."""

    def __init__(self, tmp: Path, repo_path: str, extra: str = "") -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        self.config.write_text(f"""
[repository]
path = "{repo_path}"

[service]
state_dir = "{self.state}"

[tenants.acme]
hosts = ["web1"]

[tenants.acme.restore]
require_ticket = true
approvals = 2
authorizers = ["alice", "bob", "carol"]
ticket_ttl = "1h"

[tenants.globex]
hosts = ["db1"]
{extra}
""")
        self.env = {"IHB_REPO": repo_path, "IHB_PASSPHRASE": "pw", "IHB_CONFIG": str(self.config)}
        self.src = tmp / "src"
        files = {"etc/hosts": b"127.0.0.1 localhost\n", "etc/app/app.conf": b"threads = 4\n",
                 "data/blob.bin": os.urandom(300_000), "home/u/notes.txt": b"private\n"}
        for rel, data in files.items():
            p = self.src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        os.chmod(self.src / "etc/hosts", 0o640)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return ihb(*args, env=self.env, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def backup(self, host: str) -> str:
        return str(self.json("backup", str(self.src), "--host", host)["id"])

    def request(self, snap: str, *args: str, who: str = "mallory") -> dict[str, Any]:
        return dict(self.json("restore-request", "create", snap, "--as", who, *args))

    def refused(self, code: int, *args: str) -> str:
        p = self.run(*args, check=False)
        assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
        err = p.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and err.startswith("ihb: error: "), err
        return err

    def audit(self) -> list[dict[str, Any]]:
        return list(self.json("audit"))

    def store(self) -> RestoreRequestStore:
        return RestoreRequestStore.for_config(load_config(str(self.config)))


def _tenant(name: str, host: str, policy: str) -> str:
    """Config lines for one more tenant that requires tickets, with these policy lines."""
    return f'\n[tenants.{name}]\nhosts = ["{host}"]\n\n[tenants.{name}.restore]\nrequire_ticket = true\n{policy}\n'


@pytest.fixture
def env(tmp_path: Path, repo_path: str) -> Env:
    return Env(tmp_path, repo_path)


def test_two_approvals_then_a_scoped_single_use_ticket_restores(env: Env) -> None:
    snap = env.backup("web1")
    other_snap = env.backup("web1")
    etc = f"{env.src}/etc"
    out = env.tmp / "out"

    # without a ticket the restore does not run (and writes nothing)
    err = env.refused(TICKET_REFUSED, "restore", snap, str(out), "--include", etc)
    assert "ihb restore-request create" in err and "acme" in err
    assert not out.exists()
    # nor does `ihb cat` of one file (a restore to standard output)
    assert "ihb restore-request create" in env.refused(TICKET_REFUSED, "cat", snap, f"{etc}/hosts")

    req = env.request(snap[:12], "--kind", "files", "--path", etc, "--target", str(out), "--reason", "lost /etc")
    rid = req["id"]
    assert req["state"] == "pending" and req["tenant"] == "acme" and req["host"] == "web1"
    assert req["snapshot"] == snap and req["paths"] == [etc] and req["required_approvals"] == 2

    # the requester cannot approve, a non-authorizer cannot, nobody approves twice
    assert "cannot approve" in env.refused(REQUEST_REFUSED, "restore-request", "approve", rid, "--as", "mallory")
    assert "not an authorizer" in env.refused(REQUEST_REFUSED, "restore-request", "approve", rid, "--as", "dave")
    first = env.json("restore-request", "approve", rid, "--as", "alice")
    assert first["state"] == "pending" and first["approvals"] == ["alice"] and "ticket_secret" not in first
    assert "already approved" in env.refused(REQUEST_REFUSED, "restore-request", "approve", rid, "--as", "Alice ")
    env.refused(TICKET_REFUSED, "restore", snap, str(out), "--include", etc)  # one approval is not enough

    done = env.json("restore-request", "approve", rid, "--as", "bob")
    assert done["state"] == "approved" and done["approvals"] == ["alice", "bob"]
    ticket = done["ticket_secret"]
    assert ticket and done["ticket"]["single_use"] and "hash" not in done["ticket"]
    # the store keeps a hash, plus the secret only until the requester has retrieved it once
    stored = json.loads((env.state / "restore_requests.json").read_text())[0]
    assert stored["ticket"]["hash"] != ticket and stored["unclaimed_secret"] == ticket
    # the requester retrieves it once; after that only the hash is left
    assert env.json("restore-request", "ticket", rid, "--as", "mallory")["ticket"] == ticket
    env.refused(REQUEST_REFUSED, "restore-request", "ticket", rid, "--as", "mallory")
    assert ticket not in (env.state / "restore_requests.json").read_text()
    assert not env.json("restore-request", "show", rid)["ticket_retrievable"]

    # out of scope: another restore point, another path, the whole restore point, another target, a mount
    for args, why in (
        (["restore", other_snap, str(out), "--include", etc], "for restore point"),
        (["restore", snap, str(out), "--include", f"{env.src}/home"], "not"),
        (["restore", snap, str(out)], "not the whole restore point"),
        (["restore", snap, str(env.tmp / "elsewhere"), "--include", etc], "for target"),
        (["mount", str(env.tmp / "mnt"), "--snapshot", snap], "for a files restore"),
        (["restore", snap, str(out), "--include", etc, "--ticket", ticket + "x"], "not known"),
    ):
        a = args if "--ticket" in args else [*args, "--ticket", ticket]
        assert why in env.refused(TICKET_REFUSED, *a), args
    assert not out.exists() and not (env.tmp / "elsewhere").exists()

    # in scope: it runs, and the restored files match the source
    res = env.json("restore", snap, str(out), "--include", etc, "--ticket", ticket)
    assert res["files"] == 2 and not res["failed"]
    assert_same_tree(env.src / "etc", out / str(env.src).lstrip("/") / "etc")
    assert not (out / str(env.src).lstrip("/") / "home").exists()
    # single use
    assert "already used" in env.refused(TICKET_REFUSED, "restore", snap, str(out / "again"), "--include", etc,
                                         "--ticket", ticket)
    assert env.json("restore-request", "show", rid)["state"] == "executed"
    assert [r["id"] for r in env.json("restore-request", "list", "--state", "executed")] == [rid]

    actions = [(e["actor"], e["action"]) for e in env.audit()]
    for expected in [("mallory", "restore-request"), ("mallory", "restore-approval-refused"),
                     ("dave", "restore-approval-refused"), ("alice", "restore-approve"), ("bob", "restore-approve"),
                     ("bob", "restore-ticket-issued"), ("mallory", "restore-ticket-retrieved")]:
        assert expected in actions, expected
    names = [a for _, a in actions]
    assert names.count("restore-ticket-refused") >= 9  # 2 without a ticket, 6 out of scope, 1 used up
    assert names.count("restore-execute") == 1 and names.count("restore-done") == 1
    done_entry = next(e for e in env.audit() if e["action"] == "restore-done")
    assert done_entry["details"]["result"] == "ok" and done_entry["details"]["request"] == rid
    verify = env.run("audit", "verify", "--json")
    assert json.loads(verify.stdout)["ok"] is True


def test_deny_and_withdraw(env: Env) -> None:
    snap = env.backup("web1")
    rid = env.request(snap, "--target", str(env.tmp / "out"))["id"]
    assert "not an authorizer" in env.refused(REQUEST_REFUSED, "restore-request", "deny", rid, "--as", "dave")
    denied = env.json("restore-request", "deny", rid, "--as", "carol", "--reason", "not during the audit")
    assert denied["state"] == "denied" and denied["decided_by"] == "carol"
    assert denied["decision_reason"] == "not during the audit"
    assert "is denied" in env.refused(REQUEST_REFUSED, "restore-request", "approve", rid, "--as", "alice")

    # the requester may withdraw their own request, even after it was approved: the ticket dies with it
    rid2 = env.request(snap, "--target", str(env.tmp / "out"))["id"]
    env.json("restore-request", "approve", rid2, "--as", "alice")
    ticket = env.json("restore-request", "approve", rid2, "--as", "bob")["ticket_secret"]
    assert env.json("restore-request", "deny", rid2, "--as", "mallory")["state"] == "denied"
    assert "denied" in env.refused(TICKET_REFUSED, "restore", snap, str(env.tmp / "out"), "--ticket", ticket)

    assert {r["id"] for r in env.json("restore-request", "list", "--state", "denied")} == {rid, rid2}
    assert env.json("restore-request", "list", "--tenant", "globex") == []
    denies = [e for e in env.audit() if e["action"] == "restore-deny"]
    assert [(e["actor"], e["details"]["withdrawn"]) for e in denies] == [("carol", False), ("mallory", True)]
    assert json.loads(env.run("audit", "verify", "--json").stdout)["ok"] is True


def test_requests_and_tickets_expire(tmp_path: Path, repo_path: str) -> None:
    env = Env(tmp_path, repo_path, extra=_tenant("brief", "web2", 'request_ttl = "1s"\nticket_ttl = "2s"'))
    snap = env.backup("web2")
    target = str(env.tmp / "out")
    stale = env.request(snap, "--target", target)["id"]
    time.sleep(1.3)
    assert "expired" in env.refused(REQUEST_REFUSED, "restore-request", "approve", stale, "--as", "alice")
    assert env.json("restore-request", "show", stale)["state"] == "expired"

    rid = env.request(snap, "--target", target)["id"]
    ticket = env.json("restore-request", "approve", rid, "--as", "alice")["ticket_secret"]  # default: 1 approval
    time.sleep(2.3)
    assert "expired" in env.refused(TICKET_REFUSED, "restore", snap, target, "--ticket", ticket)
    assert not Path(target).exists()
    assert {r["id"] for r in env.json("restore-request", "list", "--state", "expired")} == {stale, rid}
    expiries = [e for e in env.audit() if e["action"] == "restore-expire"]
    assert sorted(e["details"]["request"] for e in expiries) == sorted([stale, rid])  # each audited once
    assert json.loads(env.run("audit", "verify", "--json").stdout)["ok"] is True


def test_mount_needs_a_ticket_and_a_mount_ticket_mounts(env: Env) -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.fail("FUSE is not usable here (/dev/fuse and fusermount3 are needed)")
    snap = env.backup("web1")
    mnt = env.tmp / "mnt"
    mnt.mkdir()
    assert "--snapshot ID --ticket" in env.refused(TICKET_REFUSED, "mount", str(mnt))
    assert "ihb restore-request create" in env.refused(TICKET_REFUSED, "mount", str(mnt), "--snapshot", snap)
    assert not os.path.ismount(mnt)

    rid = env.request(snap, "--kind", "mount", "--target", str(mnt))["id"]
    env.json("restore-request", "approve", rid, "--as", "carol")
    ticket = env.json("restore-request", "approve", rid, "--as", "bob")["ticket_secret"]
    env.run("mount", str(mnt), "--snapshot", snap, "--ticket", ticket)
    try:
        assert os.path.ismount(mnt)
        found = list(mnt.rglob("hosts"))
        assert found and found[0].read_bytes() == (env.src / "etc/hosts").read_bytes()
    finally:
        env.run("umount", str(mnt))
    # a mount ticket stays valid until it expires (a mount may have to be re-established)
    env.run("mount", str(mnt), "--snapshot", snap[:12], "--ticket", ticket)
    env.run("umount", str(mnt))
    executes = [e for e in env.audit() if e["action"] == "restore-execute"]
    assert [e["details"]["kind"] for e in executes] == ["mount", "mount"]


def test_no_policy_changes_nothing_and_touches_no_state(env: Env) -> None:
    snap = env.backup("db1")  # globex: no restore policy
    out = env.tmp / "out"
    env.run("restore", snap, str(out))
    assert_same_tree(env.src, out / str(env.src).lstrip("/"))
    assert not (env.state / "restore_requests.json").exists()
    assert [e for e in env.audit() if e["action"].startswith("restore")] == []
    # a request can still be made for a tenant without policy: one approval by anybody but the requester
    req = env.request(snap, "--target", str(env.tmp / "out2"))
    assert req["tenant"] == "globex" and req["required_approvals"] == 1
    assert env.json("restore-request", "approve", req["id"], "--as", "ops")["state"] == "approved"


def test_auto_approval_of_file_restores_back_to_the_same_host(tmp_path: Path, repo_path: str) -> None:
    env = Env(tmp_path, repo_path, extra=_tenant("self", "web3", 'approvals = 2\nauthorizers = ["alice", "bob"]\n'
                                                  "auto_approve_same_host_files = true"))
    snap = env.backup("web3")
    auto = env.request(snap, "--target", "/srv/restore", "--target-host", "web3", "--path", "/etc")
    assert auto["state"] == "approved" and auto["ticket_secret"] and auto["approvals"] == ["policy:auto-approve"]
    other = env.request(snap, "--target", "/srv/restore", "--target-host", "web9", "--path", "/etc")
    assert other["state"] == "pending" and "ticket_secret" not in other
    whole = env.request(snap, "--kind", "in-place", "--target", "/", "--target-host", "web3")
    assert whole["state"] == "pending"  # only file restores are automatic


def test_store_api_scope_rules(env: Env) -> None:
    """The interface the dashboard and the server use, on a real state directory."""
    store = env.store()
    snap = "ab" * 32
    img = store.create(tenant="acme", host="vm1", snapshot=snap, kind="bare-metal", paths=["vda"],
                       target="/dev/sdz", requested_by="mallory")
    store.approve(img.id, "alice")
    secret = store.approve(img.id, "bob").ticket_secret
    with pytest.raises(TicketRefused, match="for /vda, not /vdb"):
        store.check_ticket(secret, snapshot=snap, kind="bare-metal", paths=["vdb"], target="/dev/sdz")
    with pytest.raises(TicketRefused, match="for a bare-metal restore"):
        store.check_ticket(secret, snapshot=snap, kind="files", paths=["vda"], target="/dev/sdz")
    used = store.check_ticket(secret, snapshot=snap, kind=("bare-metal", "in-place"), paths=["vda"], target="/dev/sdz")
    assert used.state == "executed" and used.executions[0]["paths"] == ["/vda"]

    files = store.create(tenant="acme", host="vm1", snapshot=snap[:16], kind="files", paths=["vda:/etc/"],
                         target="/tmp/x", requested_by="mallory")
    store.approve(files.id, "carol")
    secret = store.approve(files.id, "alice").ticket_secret
    with pytest.raises(TicketRefused, match="not vda:/var"):
        store.check_ticket(secret, snapshot=snap, kind="files", paths=["vda:/var/log"], target="/tmp/x")
    assert store.check_ticket(secret, snapshot=snap, kind="files", paths=["vda:/etc/nginx/nginx.conf"],
                              target="/tmp/x/").state == "executed"
    assert norm_path("etc//hosts/") == "/etc/hosts" and norm_path("vda:etc") == "vda:/etc"

    with pytest.raises(RestoreRequestRefused, match="not pending|executed"):
        store.deny(files.id, "alice")
    assert [r.id for r in store.list(tenant="acme", state="executed")] == [img.id, files.id]
    assert store.get(img.id[:6]).to_obj()["ticket"]["paths"] == ["/vda"]


def test_vm_disk_restores_need_a_bare_metal_ticket(env: Env) -> None:
    image = env.tmp / "vda.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.seek(8 << 20)
        f.write(b"end of disk\n")
    with open(env.config, "a") as f:
        f.write(_tenant("vmco", "shop-db", 'authorizers = ["alice"]'))
    snap = env.json("backup-image", str(image), "--vm", "shop-db", "--disk", "vda")["id"]
    out = env.tmp / "restored.raw"
    assert "vmco" in env.refused(TICKET_REFUSED, "restore-disk", "shop-db@latest", "vda", str(out))
    assert "vmco" in env.refused(TICKET_REFUSED, "nbd-export", "shop-db@latest", "--socket", str(env.tmp / "s"))
    assert not out.exists()

    rid = env.request(snap, "--kind", "bare-metal", "--path", "vda", "--target", str(out))["id"]
    ticket = env.json("restore-request", "approve", rid, "--as", "alice")["ticket_secret"]
    assert "for a bare-metal restore" in env.refused(TICKET_REFUSED, "nbd-export", "shop-db@latest", "--socket",
                                                     str(env.tmp / "s"), "--ticket", ticket)
    env.run("restore-disk", "shop-db@latest", "vda", str(out), "--ticket", ticket)
    assert out.read_bytes() == image.read_bytes()
    assert "already used" in env.refused(TICKET_REFUSED, "restore-disk", "shop-db@latest", "vda", str(out),
                                         "--force", "--ticket", ticket)
    done = [e for e in env.audit() if e["action"] == "restore-done"]
    assert [e["details"]["request"] for e in done] == [rid]
