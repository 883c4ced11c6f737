"""Schedules (cron with fixed clocks), the capped scheduler driven by a fake clock, RPO alerts, job
records from real backups, and `ihb jobs run-due` / `ihb report` end to end."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import jobs as J
from appliance.config import Config
from repo.backup import BackupOptions, backup_paths
from repo.errors import InvalidArgument, SourceError
from repo.repository import Repository
from tests.util import ihb

UTC = dt.UTC


def t(*a: int) -> dt.datetime:
    return dt.datetime(*a, tzinfo=UTC)


# --- cron -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("expr", "now", "nxt"), [
    ("*/15 * * * *", t(2026, 3, 1, 10, 7), t(2026, 3, 1, 10, 15)),
    ("*/15 * * * *", t(2026, 3, 1, 10, 45), t(2026, 3, 1, 11, 0)),
    ("0 2 * * 1-5", t(2026, 3, 6, 2, 0), t(2026, 3, 9, 2, 0)),  # Friday 02:00 -> Monday
    ("30 4 1,15 * 5", t(2026, 3, 2, 0, 0), t(2026, 3, 6, 4, 30)),  # dom OR dow: Friday the 6th first
    ("0 0 29 2 *", t(2026, 3, 1), t(2028, 2, 29)),  # leap day
    ("@daily", t(2026, 12, 31, 23, 59), t(2027, 1, 1)),
    ("0 12 * jan,jul sun", t(2026, 1, 5), t(2026, 1, 11, 12)),
    ("5 4 * * 7", t(2026, 3, 1, 4, 5), t(2026, 3, 8, 4, 5)),  # 7 = Sunday too; strictly after
])
def test_cron_next(expr: str, now: dt.datetime, nxt: dt.datetime) -> None:
    s = J.CronSchedule.parse(expr)
    assert s.next_after(now) == nxt
    assert s.matches(nxt) and s.prev_at_or_before(nxt) == nxt
    assert s.prev_at_or_before(nxt - dt.timedelta(minutes=1)) < nxt


def test_cron_time_zone_and_errors() -> None:
    s = J.CronSchedule.parse("0 2 * * *", tz="Europe/Berlin")
    assert s.next_after(t(2026, 3, 1)) == t(2026, 3, 1, 1)  # 02:00 CET = 01:00 UTC
    assert s.next_after(t(2026, 6, 30, 12)) == t(2026, 7, 1, 0)  # 02:00 CEST = 00:00 UTC
    for bad in ("* * * *", "61 * * * *", "*/0 * * * *", "5-1 * * * *", "0 0 * foo *"):
        with pytest.raises(InvalidArgument):
            J.CronSchedule.parse(bad)
    with pytest.raises(InvalidArgument):
        J.CronSchedule.parse("0 0 * * *", tz="Mars/Olympus")


# --- the capped scheduler with a fake clock -------------------------------------------------------------
def test_scheduler_caps_with_fake_clock() -> None:
    """12 VMs on 2 physical hosts over 3 datastores, all due at once; each backup takes 10 min.
    Caps: 3 at a time, 1 per physical host, 2 per datastore. A clock ticks every minute."""
    caps = J.Caps(max_concurrent=3, per_physical_host=1, per_datastore=2)
    vms = [J.Candidate(f"vm{i:02d}", 0, f"esx{i % 2}", (f"ds{i % 3}",), deadline_ns=(100 - i) * 60 * 10**9)
           for i in range(12)]
    waiting = list(vms)
    running: dict[str, tuple[J.Candidate, int]] = {}
    done: list[tuple[str, int, int]] = []
    reasons: dict[str, set[str]] = {}
    now = 0
    while waiting or running:
        for name, (_c, started) in list(running.items()):
            if now - started >= 10 * 60 * 10**9:
                del running[name]
                done.append((name, started, now))
        dec = J.schedule(waiting, [J.RunningJob(c.job, c.physical_host, c.datastores) for c, _ in running.values()],
                         caps, now)
        for c in dec.start:
            running[c.job] = (c, now)
            waiting.remove(c)
        for c, why in dec.queued:
            reasons.setdefault(c.job, set()).add(why)
        # the invariant, at every tick
        assert len(running) <= 3
        for h in ("esx0", "esx1"):
            assert sum(1 for c, _ in running.values() if c.physical_host == h) <= 1
        for d in ("ds0", "ds1", "ds2"):
            assert sum(1 for c, _ in running.values() if d in c.datastores) <= 2
        now += 60 * 10**9
    assert len(done) == 12
    # one per physical host at a time: 2 in parallel, 6 rounds of 10 minutes
    assert max(end for _n, _s, end in done) == 60 * 60 * 10**9
    assert any("physical host esx" in r for rs in reasons.values() for r in rs)
    # the most urgent (earliest RPO deadline) start first
    first = sorted(done, key=lambda x: x[1])[:2]
    assert {n for n, _s, _e in first} == {"vm11", "vm10"}


def test_scheduler_datastore_and_global_caps_and_same_job() -> None:
    c = [J.Candidate("a", 1, "h1", ("ds",)), J.Candidate("b", 2, "h2", ("ds",)), J.Candidate("c", 3, "h3", ("x",)),
         J.Candidate("d", 4, "h4", ("y",)), J.Candidate("e", 5, "h5", ("z",))]
    dec = J.schedule(c, [J.RunningJob("c")], J.Caps(max_concurrent=3, per_physical_host=None, per_datastore=1), 0)
    assert [x.job for x in dec.start] == ["a", "d"]
    why = {x.job: r for x, r in dec.queued}
    assert "datastore ds" in why["b"] and "running: a" in why["b"]
    assert "previous run" in why["c"] and "limit of 3" in why["e"]
    assert dec == J.schedule(c, [J.RunningJob("c")], J.Caps(3, None, 1), 0)  # pure: same inputs, same answer


# --- RPO and due runs -----------------------------------------------------------------------------------
def _spec(**kw: Any) -> J.JobSpec:
    base = {"name": "web", "kind": "files", "paths": ["/srv"], "schedule": "0 * * * *", "rpo": "26h", "tenant": "acme"}
    base.update(kw)
    return J.JobSpec.from_obj(base)


def test_rpo_alert_raised_once_and_resolved(tmp_path: Path) -> None:
    store, alerts, seen = J.JobStore(str(tmp_path)), J.AlertStore(str(tmp_path)), J.SeenStore(str(tmp_path))
    spec, agent = _spec(), _spec(name="laptop", kind="agent", host="laptop1", paths=[], schedule=None, rpo="2d")
    day = 86400 * 10**9
    t0 = int(t(2026, 3, 1).timestamp() * 1e9)
    store.put(J.JobRecord("r1", "web", "files", status="ok", start_ns=t0, end_ns=t0 + 60 * 10**9))
    assert J.evaluate_rpo([spec, agent], store, alerts, seen, t0 + day) == []
    raised = J.evaluate_rpo([spec, agent], store, alerts, seen, t0 + 27 * 3600 * 10**9)
    assert [a.job for a in raised] == ["web"] and "missed its RPO of 26h" in raised[0].message
    assert J.evaluate_rpo([spec, agent], store, alerts, seen, t0 + 28 * 3600 * 10**9) == []  # once per breach
    store.put(J.JobRecord("r2", "web", "files", status="warning", start_ns=t0 + 29 * 3600 * 10**9,
                          end_ns=t0 + 29 * 3600 * 10**9))
    # the agent job pushed a restore point in time, so it is fine at 2 days + 1 h
    times = {"laptop1": t0 + day}
    J.evaluate_rpo([spec, agent], store, alerts, seen, t0 + 49 * 3600 * 10**9, times)
    assert [a.job for a in alerts.all() if a.resolved_ns is None] == []
    assert [a.job for a in alerts.all()] == ["web"] and alerts.all()[0].resolved_ns is not None
    raised = J.evaluate_rpo([spec, agent], store, alerts, seen, t0 + 4 * day, times)
    assert sorted(a.job for a in raised) == ["laptop", "web"]


def test_due_runs(tmp_path: Path) -> None:
    store = J.JobStore(str(tmp_path))
    spec = _spec()
    now = t(2026, 3, 1, 10, 30)
    due = J.due_runs([spec, _spec(name="pushed", kind="agent", host="x", paths=[])], store, now)
    assert [(s.name, f) for s, f in due] == [("web", int(t(2026, 3, 1, 10).timestamp() * 1e9))]
    store.put(J.new_queued(spec, due[0][1], 0))
    assert J.due_runs([spec], store, now) == []  # queued: not twice
    rec = store.all()[0]
    rec.status, rec.start_ns = "ok", 1
    store.put(rec)
    assert J.due_runs([spec], store, now) == []  # this firing is done
    assert [s.name for s, _ in J.due_runs([spec], store, t(2026, 3, 1, 13, 1))] == ["web"]  # missed ones: one run


class FakeProc:
    def __init__(self, clock: list[int], store: J.JobStore, rec: J.JobRecord, minutes: int) -> None:
        self.clock, self.store, self.rec, self.end = clock, store, rec, clock[0] + minutes * 60 * 10**9
        rec.status, rec.start_ns = "running", clock[0]
        store.put(rec)

    def poll(self) -> int | None:
        if self.clock[0] < self.end:
            return None
        self.rec.status, self.rec.end_ns = "ok", self.clock[0]
        self.store.put(self.rec)
        return 0


def test_run_due_queues_and_records_with_fake_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config(raw={"service": {"state_dir": str(tmp_path)}, "scheduler": {"max_concurrent": 5, "per_physical_host": 1},
                      "jobs": [{"name": f"vm{i}", "kind": "image", "vm": f"vm{i}", "disk": "vda", "source": "/dev/null",
                                "schedule": "@hourly", "physical_host": "esx1" if i < 3 else "esx2",
                                "datastore": "ds1"} for i in range(4)]})
    clock = [int(t(2026, 3, 1, 10, 0, 30).timestamp() * 1e9)]
    store = J.JobStore(str(tmp_path))
    monkeypatch.setattr(J.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 60 * 10**9))
    res = J.run_due(cfg, lambda spec, rec: FakeProc(clock, store, rec, 5), now=lambda: clock[0])
    assert len(res.finished) == 4 and all(r.status == "ok" for r in res.finished)
    assert res.max_running == 2  # one per physical host
    recs = {r.job: r for r in store.all()}
    waited = [r for r in recs.values() if r.queue_reason]
    assert len(waited) == 2 and all("physical host esx1" in r.queue_reason for r in waited)
    assert all(r.queued_seconds == 0 for r in recs.values() if not r.queue_reason)
    assert sorted(round(r.queued_seconds) for r in waited) == [300, 600]  # 5-minute backups, one at a time


# --- job records from real backups ------------------------------------------------------------------------
def test_recorded_job_from_a_real_backup(tmp_path: Path, repo_path: str) -> None:
    cfg = Config(raw={"service": {"state_dir": str(tmp_path / "state")}})
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 100_000)
    (src / "b").write_bytes(b"x" * 100_000)
    with Repository.open(repo_path, lambda: b"pw") as r:
        with J.recorded_job("files", "web1", tenant="acme", cfg=cfg) as job:
            job.finish_snapshot(backup_paths(r, [str(src)], BackupOptions(host="web1")))
        with pytest.raises(SourceError), J.recorded_job("files", "web1", tenant="acme", cfg=cfg):
            backup_paths(r, [str(tmp_path / "missing")], BackupOptions(host="web1"))
    ok, failed = J.JobStore(J.state_dir(cfg)).all()
    # bytes count data and tree pages alike (the repository's own accounting)
    assert ok.status == "ok" and 200_000 <= ok.bytes_total < 202_000 and 100_000 <= ok.bytes_new < 102_000
    assert ok.dedup_ratio and 1.9 < ok.dedup_ratio < 2.1
    assert ok.compression_ratio and ok.compression_ratio > 50 and ok.consistency == "file-level"
    assert ok.snapshot and ok.duration is not None and ok.job == "files:web1"
    assert failed.status == "failed" and "no such file" in failed.error and failed.exit_code == 31


def test_cli_run_due_and_report(tmp_path: Path, cli_env: dict[str, str]) -> None:
    for n in ("one", "two"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_bytes(n.encode() * 1000)
    (tmp_path / "two" / "secret").write_bytes(b"s")
    (tmp_path / "two" / "secret").chmod(0)
    conf = tmp_path / "config.toml"
    conf.write_text(f"""
[scheduler]
max_concurrent = 1

[[jobs]]
name = "one"
tenant = "acme"
host = "host-one"
paths = ["{tmp_path / 'one'}"]
schedule = "* * * * *"
rpo = "1d"

[[jobs]]
name = "two"
tenant = "beta"
host = "host-two"
paths = ["{tmp_path / 'two'}", "{tmp_path / 'nonexistent'}"]
schedule = "* * * * *"

[[jobs]]
name = "laptop"
kind = "agent"
host = "laptop"
rpo = "1h"
""")
    env = {**cli_env, "IHB_CONFIG": str(conf)}
    if time.time() % 60 > 40:  # both passes below must fall in one minute of the "* * * * *" schedule
        time.sleep(61 - time.time() % 60)
    out = json.loads(ihb("jobs", "run-due", "--json", env=env, check=False).stdout)
    assert sorted(out["due"]) == ["one", "two"] and out["max_running"] == 1
    assert [q["reason"] for q in out["queued"]] == ["appliance at its limit of 1 concurrent backups"]
    status = {r["job"]: r for r in out["finished"]}
    assert status["one"]["status"] == "ok" and status["two"]["status"] == "failed"
    assert "nonexistent" in status["two"]["error"]
    assert [a["job"] for a in out["alerts"]] == []  # judged from now on; no breach yet
    again = json.loads(ihb("jobs", "run-due", "--json", env=env).stdout)
    assert again["due"] == []  # this minute's firing is done
    rows = list(csv.DictReader(io.StringIO(ihb("report", "--format", "csv", env=env).stdout.decode())))
    assert {r["job"]: r["status"] for r in rows} == {"one": "ok", "two": "failed"}
    acme = json.loads(ihb("report", "--tenant", "acme", "--format", "json", env=env).stdout)["runs"]
    assert [r["job"] for r in acme] == ["one"] and acme[0]["bytes_read"] == 3000 and acme[0]["queued_seconds"] < 5
    page = ihb("report", "--format", "html", "--since", "1d", env=env).stdout.decode()
    assert page.startswith("<!doctype html>") and "<td>two</td>" in page and 'class="bad"' in page
    listed = json.loads(ihb("jobs", "list", "--json", env=env).stdout)
    assert {j["job"]: j["rpo_ok"] for j in listed} == {"one": True, "two": None, "laptop": True}


def test_orphaned_records_are_closed_and_the_job_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config(raw={"service": {"state_dir": str(tmp_path)},
                      "jobs": [{"name": "web", "paths": ["/srv"], "schedule": "@hourly"}]})
    store = J.JobStore(str(tmp_path))
    spec = J.load_specs(cfg)[0]
    t0 = int(t(2026, 3, 1, 10, 5).timestamp() * 1e9)
    fire = int(t(2026, 3, 1, 10).timestamp() * 1e9)
    store.put(J.new_queued(spec, fire, t0))  # a pass killed before it started this run
    dead = J.new_queued(spec, fire - 3600 * 10**9, t0)
    dead.status, dead.pid = "running", 2**22 + 12345  # a backup killed with -9 (no such pid)
    store.put(dead)
    clock = [t0 + 10**9]
    monkeypatch.setattr(J.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 60 * 10**9))
    res = J.run_due(cfg, lambda spec, rec: FakeProc(clock, store, rec, 1), now=lambda: clock[0])
    errors = sorted(r.error for r in store.all() if r.status == "failed")
    assert errors == ["the backup process ended without recording a result (killed?)",
                      "the scheduler stopped before starting this run"]
    assert [r.status for r in res.finished] == ["ok"]  # the 10:00 firing ran after all


def test_jobs_record_their_tenant_in_the_restore_point(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A job the appliance runs for a tenant leaves a restore point that names the tenant, as agent
    backups do: the tenant's dashboard, catalog, retention rules and restore policy then apply to it."""
    spec = J.JobSpec.from_obj({"name": "web", "kind": "files", "tenant": "acme", "host": "web1", "paths": ["/srv"]})
    assert spec.command()[:5] == ["backup", "/srv", "--host", "web1", "--tenant"] and "acme" in spec.command()
    vm = J.JobSpec.from_obj({"name": "db", "kind": "vm", "tenant": "acme", "qmp": "/run/db.qmp", "vm": "db"})
    assert vm.command()[-2:] == ["--tenant", "acme"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "nginx.conf").write_text("worker_processes 2;\n")
    env = {**cli_env, "IHB_CONFIG_DIR": str(tmp_path / "etc"), "IHB_DATA_DIR": str(tmp_path / "data")}
    ihb("backup", str(src), "--host", "web1", "--tenant", "acme", env=env)
    snaps = json.loads(ihb("snapshots", "--json", env=env).stdout)
    assert [s.get("tenant") for s in snaps] == ["acme"], snaps
    found = json.loads(ihb("find", "nginx.conf", "--tenant", "acme", "--json", env=env).stdout)["matches"]
    assert [m["host"] for m in found] == ["web1"]
    assert json.loads(ihb("find", "nginx.conf", "--tenant", "globex", "--json", env=env).stdout)["matches"] == []
    bad = ihb("backup", str(src), "--tenant", "../x", env=env, check=False)
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1 and b"--tenant" in bad.stderr


def test_csv_report_cells_never_start_a_formula() -> None:
    from appliance.cli.report_cmd import _csv_cell

    assert [_csv_cell(v) for v in ("=HYPERLINK(\"x\")", "+1", "-2", "@SUM(A1)", "web1", 3, -4, None)] == \
        ["'=HYPERLINK(\"x\")", "'+1", "'-2", "'@SUM(A1)", "web1", 3, -4, None]


def test_vm_jobs_are_placed_by_asking_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two VMs with no placement in the config: the scheduler asks each QEMU (over QMP) which image files
    back its disks, so both land on this host and on the datastore holding their images, and the
    per-host cap of 1 queues one behind the other with that reason in its record."""
    import shutil
    import socket as so
    import subprocess

    from appliance.hypervisor.placement import mount_point, vm_placement
    from appliance.hypervisor.qmp import QMPClient

    assert shutil.which("qemu-system-x86_64") and shutil.which("qemu-img"), \
        "qemu-system-x86_64 and qemu-img are needed (apt install qemu-system-x86 qemu-utils)"
    procs = []
    try:
        for i in range(2):
            img = tmp_path / f"vm{i}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
            sock = tmp_path / f"vm{i}.qmp"
            node = {"node-name": "disk0", "driver": "qcow2", "file": {"driver": "file", "filename": str(img)}}
            procs.append(subprocess.Popen(
                ["qemu-system-x86_64", "-nodefaults", "-nographic", "-monitor", "none", "-S", "-name", f"vm{i}",
                 "-qmp", f"unix:{sock},server=on,wait=off", "-blockdev", json.dumps(node),
                 "-device", "virtio-blk-pci,drive=disk0,id=vda"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            QMPClient(sock, timeout=30).connect(alive=lambda p=procs[-1]: p.poll() is None).close()
        assert vm_placement(str(tmp_path / "vm0.qmp")) == (so.gethostname(), (mount_point(str(tmp_path)),))
        cfg = Config(raw={"service": {"state_dir": str(tmp_path / "state")},
                          "scheduler": {"max_concurrent": 5, "per_physical_host": 1},
                          "jobs": [{"name": f"vm{i}", "kind": "vm", "qmp": str(tmp_path / f"vm{i}.qmp"),
                                    "schedule": "@hourly"} for i in range(2)]})
        (tmp_path / "state").mkdir()
        clock = [int(t(2026, 3, 1, 10, 0, 30).timestamp() * 1e9)]
        store = J.JobStore(str(tmp_path / "state"))
        monkeypatch.setattr(J.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 60 * 10**9))
        res = J.run_due(cfg, lambda spec, rec: FakeProc(clock, store, rec, 5), now=lambda: clock[0])
        assert len(res.finished) == 2 and res.max_running == 1
        waited = [r for r in store.all() if r.queue_reason]
        assert len(waited) == 1 and f"physical host {so.gethostname()}" in waited[0].queue_reason, waited
        # a VM that does not answer is placed by the config alone
        assert J.spec_placement(J.JobSpec.from_obj({"name": "x", "kind": "vm", "qmp": str(tmp_path / "gone.qmp"),
                                                    "physical_host": "esx9"})) == ("esx9", ())
    finally:
        for p in procs:
            p.kill()
            p.wait()
