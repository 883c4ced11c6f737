"""Notifications for real: an SMTP server (aiosmtpd) and a webhook server on loopback receive exactly one
message per alert from real `ihb` runs (a failing backup run by the scheduler, a missed RPO), a recovery
notice when the job is fine again, and nothing more; a receiver that fails is retried, then recorded,
and never fails the job."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance import jobs as J
from appliance import notify as N
from appliance.config import load_config
from tests.service.notify_servers import (  # noqa: F401 - fixtures
    Hooks,
    Mailbox,
    free_port,
    late_agent_job,
    run_smtp,
    run_webhooks,
    smtp_server,
    tls_pair,
    web_job,
    webhook_server,
)
from tests.util import ihb

SECRET = "hook-secret"


def _config(tmp_path: Path, box: Mailbox, hooks: Hooks, jobs: str, cafile: str | None = None) -> Path:
    """Both channels with login and a signing secret; ``cafile``: STARTTLS, and trust that CA (or, with
    "", the system store only) for the SMTP server and the webhook."""
    (tmp_path / "smtp.pw").write_text(box.password.decode() + "\n")
    ca = "" if cafile is None else f'cafile = "{cafile}"'
    conf = tmp_path / "config.toml"
    conf.write_text(_head(tmp_path) + f"""
[notify.smtp]
host = "127.0.0.1"
port = {box.port}
username = "ihb"
password_file = "{tmp_path / 'smtp.pw'}"
from = "ihb@appliance.test"
to = ["ops@example.test", "oncall@example.test"]
starttls = {str(cafile is not None).lower()}
{ca}

[[notify.webhooks]]
url = "{hooks.url}"
secret = "{SECRET}"
{ca}
{jobs}
""")
    return conf


def _head(tmp_path: Path, extra: str = "") -> str:
    """The state directory and [notify] retry settings: 3 attempts, 50 ms then 100 ms apart."""
    return f"""
[service]
state_dir = "{tmp_path / 'state'}"

[notify]
timeout = 2
retries = 3
backoff = 0.05
{extra}
"""


def _check_signed(hooks: Hooks) -> list[dict[str, Any]]:
    for headers, body in hooks.requests:
        assert N.verify_signature(SECRET.encode(), body, headers["x-ihb-signature"])
        assert headers["content-type"] == "application/json"
    return hooks.bodies()


class _Proc:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def poll(self) -> int | None:
        return self.p.poll()

    def output(self) -> bytes:
        return self.p.stdout.read() if self.p.stdout else b""


def test_failing_scheduled_job_notifies_once_then_recovers(tmp_path: Path, cli_env: dict[str, str],
                                                          smtp_server: Mailbox, webhook_server: Hooks) -> None:  # noqa: F811
    src = tmp_path / "www"
    conf = _config(tmp_path, smtp_server, webhook_server, web_job(src))
    cfg = load_config(str(conf))
    env = {**os.environ, **cli_env, "IHB_CONFIG": str(conf)}

    def spawn(spec: J.JobSpec, rec: J.JobRecord) -> _Proc:  # what `ihb jobs run-due` does, with our clock
        return _Proc([sys.executable, "-m", "appliance.cli", *spec.command(), "--json"],
                     {**env, "IHB_JOB_RECORD": rec.id})

    t0 = int(dt.datetime(2026, 3, 1, 10, 0, 30, tzinfo=dt.UTC).timestamp() * 1e9)
    minute = 60 * 10**9
    first = J.run_due(cfg, spawn, now=lambda: t0, poll=0.05)
    assert [r.status for r in first.finished] == ["failed"]
    assert len(smtp_server.messages) == 1 and len(webhook_server.requests) == 1
    mail = smtp_server.messages[0]
    assert mail["Subject"].endswith("FAILED: web [acme]") and mail["X-Ihb-Event"] == "job-failed"
    assert mail["To"] == "ops@example.test, oncall@example.test"
    assert mail["X-Test-Rcpt"] == "ops@example.test, oncall@example.test"
    text = mail.get_content()
    assert "job web failed on web1" in text and str(src) in text and "exit_code: 31" in text
    assert smtp_server.logins == [(b"ihb", b"s3cret")]
    [hook] = _check_signed(webhook_server)
    assert hook["event"] == "job-failed" and hook["job"] == "web" and hook["tenant"] == "acme"
    assert hook["host"] == "web1" and str(src) in hook["message"]
    assert hook["details"]["record"] == first.finished[0].id and hook["details"]["status"] == "failed"

    # the next tick fails again: still one open alert, no second message
    second = J.run_due(cfg, spawn, now=lambda: t0 + minute, poll=0.05)
    assert [r.status for r in second.finished] == ["failed"]
    assert len(smtp_server.messages) == 1 and len(webhook_server.requests) == 1

    # fixed: the run succeeds and a recovery notice goes out, once
    src.mkdir()
    (src / "index.html").write_text("hello")
    third = J.run_due(cfg, spawn, now=lambda: t0 + 2 * minute, poll=0.05)
    assert [r.status for r in third.finished] == ["ok"]
    assert len(smtp_server.messages) == 2 and len(webhook_server.requests) == 2
    assert smtp_server.messages[1]["Subject"].endswith("RECOVERED: web [acme]")
    rec = _check_signed(webhook_server)[1]
    assert rec["event"] == "recovered" and rec["details"]["resolves"] == "job-failed"
    assert rec["alert"] == hook["alert"] and "succeeded again" in rec["message"]
    assert rec["details"]["snapshot"] == third.finished[0].snapshot
    alerts = J.AlertStore(J.state_dir(cfg)).all()
    assert [(a.kind, a.resolved_ns is not None) for a in alerts] == [("job-failed", True)]
    log = N.read_log(J.state_dir(cfg))
    assert [(r["event"], r["channel"], r["status"]) for r in log] == [
        ("job-failed", "email", "sent"), ("job-failed", "webhook", "sent"),
        ("recovered", "email", "sent"), ("recovered", "webhook", "sent")]


def test_missed_rpo_notifies_once_through_the_cli(tmp_path: Path, cli_env: dict[str, str],
                                                   smtp_server: Mailbox, webhook_server: Hooks) -> None:  # noqa: F811
    conf = _config(tmp_path, smtp_server, webhook_server, late_agent_job(tmp_path / "state", 2))
    env = {**cli_env, "IHB_CONFIG": str(conf)}
    out = json.loads(ihb("jobs", "run-due", "--json", env=env).stdout)
    assert [a["job"] for a in out["alerts"]] == ["laptop"]
    assert len(smtp_server.messages) == 1 and len(webhook_server.requests) == 1
    mail = smtp_server.messages[0]
    assert mail["Subject"].endswith("RPO MISSED: laptop [beta]")
    assert "missed its RPO of 1h: no good run in 2.0 h since configured" in mail.get_content()
    [hook] = _check_signed(webhook_server)
    assert hook["event"] == "rpo-missed" and hook["host"] == "laptop7" and hook["alert"] == out["alerts"][0]["id"]

    # every further tick: the alert stays open, nobody is paged again
    for _ in range(2):
        assert json.loads(ihb("jobs", "run-due", "--json", env=env).stdout)["alerts"] == []
    assert len(smtp_server.messages) == 1 and len(webhook_server.requests) == 1

    # the agent's host gets a restore point: the RPO is met again, one recovery notice
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("x")
    ihb("backup", str(tmp_path / "data"), "--host", "laptop7", env=env)
    ihb("jobs", "run-due", "--json", env=env)
    assert len(smtp_server.messages) == 2 and len(webhook_server.requests) == 2
    assert smtp_server.messages[1]["Subject"].endswith("RECOVERED: laptop [beta]")
    assert _check_signed(webhook_server)[1]["details"]["resolves"] == "rpo-missed"


def test_failed_delivery_is_retried_recorded_and_never_fails_the_job(
        tmp_path: Path, repo_path: str, cli_env: dict[str, str], webhook_server: Hooks) -> None:  # noqa: F811
    dead_port = free_port()  # nothing listens there
    conf = tmp_path / "config.toml"
    conf.write_text(_head(tmp_path, f"""
smtp = {{ host = "127.0.0.1", port = {dead_port}, to = ["ops@example.test"] }}
webhooks = [{{ url = "{webhook_server.url}" }}, {{ url = "{webhook_server.url}/gone" }}]
"""))
    env = {**cli_env, "IHB_CONFIG": str(conf)}
    webhook_server.script = [503, 502]  # first hook: 2 failures then OK; the second answers 404: not retried
    p = ihb("backup", str(tmp_path / "missing"), "--host", "h1", env=env, check=False)
    assert p.returncode == 31  # the backup's own failure, nothing from the notifier
    assert b"not delivered by email" in p.stderr
    log = N.read_log(str(tmp_path / "state"))
    by = {(r["channel"], r["target"].rsplit("/", 1)[-1]): r for r in log}
    assert by[("webhook", "hook")]["status"] == "sent" and by[("webhook", "hook")]["attempts"] == 3
    assert by[("webhook", "gone")]["status"] == "failed" and by[("webhook", "gone")]["attempts"] == 1
    assert "HTTP 404" in by[("webhook", "gone")]["error"]
    mail = next(r for r in log if r["channel"] == "email")
    assert mail["status"] == "failed" and mail["attempts"] == 3 and "Connection refused" in mail["error"]
    assert "x-ihb-signature" not in webhook_server.requests[0][0]  # no secret, no signature
    failed = json.loads(ihb("notify", "log", "--failed", "--json", env=env).stdout)
    assert sorted(r["channel"] for r in failed) == ["email", "webhook"]
    [rec] = J.JobStore(str(tmp_path / "state")).all()
    assert rec.status == "failed" and rec.exit_code == 31


def test_notify_test_command(tmp_path: Path, cli_env: dict[str, str], smtp_server: Mailbox,  # noqa: F811
                             webhook_server: Hooks) -> None:  # noqa: F811
    conf = _config(tmp_path, smtp_server, webhook_server, "")
    env = {**cli_env, "IHB_CONFIG": str(conf)}
    out = json.loads(ihb("notify", "test", "--json", env=env).stdout)
    assert [(r["channel"], r["status"]) for r in out] == [("email", "sent"), ("webhook", "sent")]
    assert smtp_server.messages[0]["Subject"].endswith("TEST: notify-test")
    assert _check_signed(webhook_server)[0]["event"] == "test"
    webhook_server.script = [500, 500, 500]
    p = ihb("notify", "test", env=env, check=False)
    assert p.returncode == 1 and b"webhook" in p.stdout and b"failed after 3 attempts" in p.stdout
    none = ihb("notify", "test", env={**cli_env, "IHB_CONFIG": str(tmp_path / "none.toml")}, check=False)
    assert none.returncode != 0


def test_starttls_and_https_with_a_private_ca(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Port-587 style STARTTLS (required by the server before login) and an https webhook, both trusting
    the receiver's certificate through cafile; without it, one attempt and a clear reason."""
    cert, tls = tls_pair(tmp_path / "tls")
    with run_smtp(tls) as box, run_webhooks(tls) as hooks:
        env = {**cli_env, "IHB_CONFIG": str(_config(tmp_path, box, hooks, "", cafile=cert))}
        out = json.loads(ihb("notify", "test", "--json", env=env).stdout)
        assert [(r["channel"], r["status"]) for r in out] == [("email", "sent"), ("webhook", "sent")]
        assert box.logins == [(b"ihb", b"s3cret")] and len(box.messages) == 1
        assert _check_signed(hooks)[0]["event"] == "test"
        _config(tmp_path, box, hooks, "", cafile="")
        p = ihb("notify", "test", "--json", env=env, check=False)
        assert p.returncode == 1
        res = json.loads(p.stdout)
        assert all(r["status"] == "failed" and r["attempts"] == 1 and "not trusted" in r["error"] for r in res)
        assert len(box.messages) == 1 and len(hooks.requests) == 1
