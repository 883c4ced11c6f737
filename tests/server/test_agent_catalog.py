"""The file catalog covers what agents push: `ihb find` / `ihb versions` on the appliance find a file
backed up by an agent (indexed at commit on the server's catalog thread), and a restore point committed
while the server's catalog was not maintained is caught up at the next start."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .conftest import Appliance, run_ihb, write_tree


def _find(app: Appliance, *args: str, want: int, timeout: float = 60) -> dict[str, Any]:
    """``ihb find`` on the appliance (its config: same repository and index as the server), polled: the
    catalog is written just after the commit returns."""
    deadline = time.monotonic() + timeout
    while True:
        out = json.loads(run_ihb("find", "--config", str(app.config), "--json", *args).stdout)
        if len(out["matches"]) >= want or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_find_covers_agent_backups(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    web = app.token("acme", "web1")
    sec = app.token("secretco", "s1", own_key=True)
    app.start()
    src = write_tree(tmp_path / "web1", {"etc/nginx/nginx.conf": b"worker_processes 4;\n",
                                         "etc/hosts": b"127.0.0.1 localhost\n", "srv/www/index.html": b"<p>hi</p>"})
    app.agent(web, "backup", str(src), cache=tmp_path / "c1")
    out = _find(app, "nginx.conf", want=1)
    [hit] = out["matches"]
    assert hit["host"] == "web1" and hit["path"].endswith("/etc/nginx/nginx.conf") and hit["size"] == 20
    assert out["uncatalogued"] == 0

    # a second version: `ihb versions` lists both, `find --tenant` scopes to the tenant
    (src / "etc/nginx/nginx.conf").write_bytes(b"worker_processes 8;\n# tuned\n")
    app.agent(web, "backup", str(src), cache=tmp_path / "c1")
    path = hit["path"]
    deadline = time.monotonic() + 60
    while True:
        vers = json.loads(run_ihb("versions", "--config", str(app.config), "--json", f"web1:{path}").stdout)
        if len(vers) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(v["size"] for v in vers) == [20, 28]
    # the appliance keeps no job record of agent runs: `ihb report` reads them from the restore points
    runs = json.loads(run_ihb("report", "--config", str(app.config), "--format", "json").stdout)["runs"]
    agent = [r for r in runs if r["job"] == "agent:web1"]
    assert len(agent) == 2 and all(r["status"] == "ok" and r["kind"] == "agent" and r["snapshot"] for r in agent)

    # a tenant with its own key: its names are catalogued too (the tree is readable by the appliance)
    src2 = write_tree(tmp_path / "s1", {"etc/nginx/nginx.conf": b"secret config\n"})
    app.agent(sec, "backup", str(src2), cache=tmp_path / "c2")
    both = _find(app, "nginx.conf", want=3)  # two states of web1's file, one of s1's
    assert sorted(m["host"] for m in both["matches"]) == ["s1", "web1", "web1"]
    only = json.loads(run_ihb("find", "--config", str(app.config), "--json", "--tenant", "secretco",
                              "nginx.conf").stdout)
    assert [m["host"] for m in only["matches"]] == ["s1"]
    app.stop()

    # committed without the server's catalog (a local backup into the same repository, indexed in another
    # cache): the next start catches up
    local = write_tree(tmp_path / "db1", {"var/lib/pg/PG_VERSION": b"16\n"})
    run_ihb("backup", "--repo", str(app.repo), str(local), "--host", "db1")
    app.start()
    assert [m["host"] for m in _find(app, "PG_VERSION", want=1)["matches"]] == ["db1"]
    app.stop()
