"""Interrupted uploads: the server killed (kill -9) and restarted mid-upload, and the agent killed
mid-upload and run again. Nothing acknowledged is sent twice, nothing half-finished is visible, and
the restore point that finally appears is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .conftest import IHB, ROOT, Appliance, tree_digest, write_tree

MIB = 1024 * 1024


def _packs(app: Appliance) -> int:
    return sum(len(files) for _, _, files in os.walk(app.repo / "data"))


def _wait_for_packs(app: Appliance, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _packs(app) < n:
        assert proc.poll() is None, f"the agent finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "no pack arrived in time"
        time.sleep(0.05)


def _start_agent(app: Appliance, tok: Path, src: Path, cache: Path, bw: str) -> subprocess.Popen[str]:
    args = [*IHB, "agent", "backup", *app.agent_args(tok), "--json", "--cache-dir", str(cache), "--bwlimit", bw,
            "--retry-for", "60", str(src)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))


def test_server_killed_mid_upload_resumes(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    tok = app.token("acme", "web1")
    admin = app.token(role="admin")
    app.start()
    src = write_tree(tmp_path / "src", {f"f{i:02d}.bin": os.urandom(4 * MIB) for i in range(10)})
    agent = _start_agent(app, tok, src, tmp_path / "cache", "10M")
    _wait_for_packs(app, 2, agent)
    app.kill()  # kill -9 in the middle of the upload
    time.sleep(1.0)
    app.start()  # same port, same state: the agent reconnects and resumes its session
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    res = json.loads(out)
    server = res["stats"]["server"]
    assert server["resent"] == 0, server  # nothing acknowledged was sent again
    sent_data = res["stats"]["sent_bytes"]
    # everything was sent about once: at most the one request in flight at the kill is repeated
    assert sent_data < 40 * MIB + 17 * MIB, res["stats"]
    assert "lost the appliance" in err
    st, r = app.api("GET", "/api/v1/snapshots", admin)
    assert len(r["snapshots"]) == 1
    app.agent(tok, "restore", "latest", str(tmp_path / "restored"))
    assert tree_digest(tmp_path / "restored" / str(src).lstrip("/")) == tree_digest(src)


def test_agent_killed_mid_upload_never_visible_then_resumes(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    tok = app.token("acme", "web1")
    admin = app.token(role="admin")
    app.start()
    src = write_tree(tmp_path / "src", {f"f{i:02d}.bin": os.urandom(4 * MIB) for i in range(8)})
    cache = tmp_path / "cache"
    agent = _start_agent(app, tok, src, cache, "8M")
    _wait_for_packs(app, 2, agent)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    # half-finished: no restore point, before or after a server restart
    assert app.api("GET", "/api/v1/snapshots", admin)[1]["snapshots"] == []
    app.stop()
    app.start()
    assert app.api("GET", "/api/v1/snapshots", admin)[1]["snapshots"] == []
    arrived = _packs(app)
    res = json.loads(app.agent(tok, "backup", str(src), cache=cache).stdout)
    assert res["resumed"] is True
    st = res["stats"]
    assert st["server"]["resent"] == 0
    # the second run sent only what had not arrived (the first run acknowledged >= 2 packs' worth)
    assert st["sent_bytes"] <= 32 * MIB - (arrived - 1) * 4 * MIB + MIB, (arrived, st)
    app.agent(tok, "restore", "latest", str(tmp_path / "restored"))
    assert tree_digest(tmp_path / "restored" / str(src).lstrip("/")) == tree_digest(src)
    assert len(app.api("GET", "/api/v1/snapshots", admin)[1]["snapshots"]) == 1
