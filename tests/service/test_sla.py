"""The SLA view for real: jobs run by the scheduler, an agent job past its RPO, `ihb check` and a
measured `ihb restore-disk` feeding `ihb sla` and the `sla` section of `ihb report`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.service.notify_servers import late_agent_job, web_job
from tests.util import ihb


def test_sla_view(tmp_path: Path, cli_env: dict[str, str]) -> None:
    src = tmp_path / "www"
    src.mkdir()
    (src / "index.html").write_bytes(os.urandom(300_000))
    img = tmp_path / "vm1-vda.raw"
    img.write_bytes(os.urandom(4 << 20) + bytes(4 << 20))  # 8 MiB, half of it zeros
    conf = tmp_path / "config.toml"
    conf.write_text(f"""
[service]
state_dir = "{tmp_path / 'state'}"
""" + web_job(src, "1d") + f"""

[[jobs]]
name = "vm1"
kind = "image"
tenant = "acme"
vm = "vm1"
disk = "vda"
source = "{img}"
schedule = "* * * * *"
rpo = "4h"
""" + late_agent_job(tmp_path / "state", 3))
    env = {**cli_env, "IHB_CONFIG": str(conf)}
    ran = json.loads(ihb("jobs", "run-due", "--json", env=env).stdout)
    assert sorted((r["job"], r["status"]) for r in ran["finished"]) == [("vm1", "ok"), ("web", "ok")]

    p = ihb("sla", "--json", env=env, check=False)
    assert p.returncode == 1  # a job is late
    rows = {r["job"]: r for r in json.loads(p.stdout)["rows"]}
    assert {j: r["rpo_status"] for j, r in rows.items()} == {"web": "ok", "vm1": "ok", "laptop": "late"}
    assert rows["web"]["age_seconds"] < 120 and rows["web"]["rpo_seconds"] == 86400
    assert rows["laptop"]["last_good_ns"] is None and rows["laptop"]["rpo_seconds"] == 3600
    assert all(r["last_verified_ns"] is None and r["restore_bytes_per_second"] is None for r in rows.values())
    table = ihb("sla", env=env, check=False).stdout.decode()
    assert "LATE" in table and "never" in table and "not measured" in table

    # a repository check and a measured disk restore
    ihb("check", env=env)
    t0 = time.time_ns()
    ihb("restore-disk", "vm1@latest", "vda", str(tmp_path / "out.raw"), env=env)
    assert (tmp_path / "out.raw").read_bytes() == img.read_bytes()
    acme = json.loads(ihb("sla", "--tenant", "acme", "--json", env=env).stdout)["rows"]
    rows = {r["job"]: r for r in acme}
    assert sorted(rows) == ["vm1", "web"]  # the tenant filter; both within their RPO: exit 0
    for r in rows.values():
        assert r["verified_by"] == "check" and r["last_point_verified"] and r["last_verified_ns"] < t0
    vm = rows["vm1"]
    assert vm["restore_kind"] == "restore-disk" and vm["restore_bytes"] == 8 << 20
    assert 0 < vm["restore_seconds"] < 60
    assert abs(vm["restore_bytes_per_second"] - (8 << 20) / vm["restore_seconds"]) < 0.01 * vm["restore_bytes_per_second"]
    assert vm["restore_measured_ns"] > t0
    assert rows["web"]["restore_bytes_per_second"] is None  # web1 was never restored
    ihb("restore", "web1@latest", str(tmp_path / "back"), env=env)
    web = {r["job"]: r for r in json.loads(ihb("sla", "--json", env=env, check=False).stdout)["rows"]}["web"]
    assert web["restore_kind"] == "restore" and web["restore_bytes"] == 300_000 and web["restore_bytes_per_second"] > 0

    # a damaged repository: the failed check shows; the last good verification stays the earlier one
    ok_at = vm["last_verified_ns"]
    packs = sorted((Path(cli_env["IHB_REPO"]) / "data").rglob("*"), key=lambda q: q.stat().st_size)
    victim = [q for q in packs if q.is_file()][-1]
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert ihb("check", "--read-data", env=env, check=False).returncode == 90
    rows = {r["job"]: r for r in json.loads(ihb("sla", "--json", env=env, check=False).stdout)["rows"]}
    assert rows["vm1"]["last_verification_failed"] and rows["vm1"]["last_verified_ns"] == ok_at
    assert "damaged chunks" in rows["vm1"]["last_verification_detail"]

    # the report carries the same section
    rep = json.loads(ihb("report", "--format", "json", env=env).stdout)
    assert {r["job"] for r in rep["runs"]} >= {"web", "vm1", "restore-disk:vm1"}
    assert [r["job"] for r in rep["sla"]["rows"]] == ["web", "vm1", "laptop"]
    page = ihb("report", "--format", "html", env=env).stdout.decode()
    assert 'id="sla"' in page and "<td>LATE</td>" in page and "restore-disk" in page and "FAILED" in page
