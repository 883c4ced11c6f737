"""Agent behaviour: the files cache (a second run sends almost nothing), hooks (the post hook always
runs), the bandwidth limit, the agent config file, and 20 agents backing up at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .conftest import IHB, ROOT, Appliance, run_ihb, tree_digest, write_tree

MIB = 1024 * 1024


def test_files_cache_hooks_bwlimit_config(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    tok = app.token("acme", "web1")
    app.start()
    src = write_tree(tmp_path / "src", {f"d{i}/f{j}.txt": (f"line {i} {j}\n" * 5000).encode()
                                        for i in range(5) for j in range(20)})
    cache = tmp_path / "cache"
    first = json.loads(app.agent(tok, "backup", str(src), cache=cache).stdout)["stats"]
    assert first["sent_chunks"] > 0
    (src / "d0" / "f0.txt").write_bytes(b"changed\n")
    second = json.loads(app.agent(tok, "backup", str(src), cache=cache).stdout)["stats"]
    assert second["cached_files"] == 99 and second["read_bytes"] == len(b"changed\n")
    assert second["sent_bytes"] < 20_000, second  # one small chunk and the changed tree pages

    # Hooks: the post hook runs after a failed pre hook and after a failed dump; its status is passed on.
    marks = tmp_path / "marks"
    post = f"echo post-$IHB_BACKUP_STATUS >> {marks}"
    p = app.agent(tok, "backup", str(src), "--pre-hook", "exit 7", "--post-hook", post, cache=cache, check=False)
    assert p.returncode == 69 and "pre-hook" in p.stderr
    p = app.agent(tok, "backup", "--pre-hook", f"echo pre >> {marks}", "--post-hook", post,
                  "--stdin-name", "x.sql", "--", "sh", "-c", "echo partial; exit 3", cache=cache, check=False)
    assert p.returncode == 70
    p = app.agent(tok, "backup", str(src), "--post-hook", post, cache=cache)
    assert marks.read_text().split() == ["post-failed", "pre", "post-failed", "post-ok"]
    snaps = json.loads(app.agent(tok, "snapshots").stdout)
    assert len(snaps) == 3  # the failed runs left nothing behind

    # Bandwidth limit: 3 MiB of incompressible data at 1 MiB/s takes about 3 s.
    noise = write_tree(tmp_path / "noise", {"n.bin": os.urandom(3 * MIB)})
    t0 = time.monotonic()
    app.agent(tok, "backup", str(noise), "--bwlimit", "1M", cache=cache)
    took = time.monotonic() - t0
    assert 2.3 < took < 15, took

    # The agent config file supplies server, token, pin and paths.
    conf = tmp_path / "agent.toml"
    conf.write_text(f'server = "{app.url}"\ntoken_file = "{tok}"\nfingerprint = "{app.fingerprint}"\n'
                    f'cache_dir = "{cache}"\npaths = ["{src}"]\n')
    p = run_ihb("agent", "backup", "--agent-config", str(conf), "--json")
    assert json.loads(p.stdout)["stats"]["cached_files"] == 100
    run_ihb("agent", "restore", "--agent-config", str(conf), "latest", str(tmp_path / "r"))
    # Trusting the certificate through --ca-file instead of pinning works too (and overrides the pin).
    p = run_ihb("agent", "snapshots", "--agent-config", str(conf), "--ca-file", str(app.state / "tls" / "cert.pem"),
                "--json")
    assert len(json.loads(p.stdout)) == 5  # 3 above, the noise backup and the config backup
    assert tree_digest(tmp_path / "r" / str(src).lstrip("/")) == tree_digest(src)


def test_twenty_concurrent_agents(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    admin = app.token(role="admin")
    tokens = [app.token("fleet" if i % 2 else "corp", f"host{i:02d}") for i in range(20)]
    app.start()
    common = os.urandom(MIB)
    procs = []
    srcs = []
    for i, tok in enumerate(tokens):
        src = write_tree(tmp_path / f"src{i:02d}", {"common.bin": common, "own.bin": os.urandom(MIB // 2),
                                                    "etc/conf": f"host {i}\n".encode()})
        srcs.append(src)
        args = [*IHB, "agent", "backup", *app.agent_args(tok), "--json", "--cache-dir", str(tmp_path / f"c{i}"),
                str(src)]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT)))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    snaps = app.api("GET", "/api/v1/snapshots", admin)[1]["snapshots"]
    assert sorted(s["host"] for s in snaps) == [f"host{i:02d}" for i in range(20)]
    # data deduplicates across the two tenants, even while they send it at the same moment: the
    # common 1 MiB is stored once
    data = sum(f.stat().st_size for f in (app.repo / "data").rglob("*") if f.is_file())
    assert data < 10 * MIB + MIB + MIB // 2, data
    app.agent(tokens[7], "restore", "latest", str(tmp_path / "r7"))
    assert tree_digest(tmp_path / "r7" / str(srcs[7]).lstrip("/")) == tree_digest(srcs[7])
    assert "Traceback" not in app.log.read_text()


def test_files_cache_naming_forgotten_chunks_falls_back(appliance: Appliance, tmp_path: Path) -> None:
    """If the appliance no longer has chunks the agent's files cache names (garbage-collected, or its
    state was rebuilt), the commit is refused with the missing ids and the agent reads the files again."""
    import shutil

    app = appliance
    tok = app.token("acme", "web1")
    app.start()
    src = write_tree(tmp_path / "src", {f"f{i}.bin": os.urandom(300_000) for i in range(6)})
    cache = tmp_path / "cache"
    app.agent(tok, "backup", str(src), cache=cache)
    app.stop()
    shutil.rmtree(app.state)  # the tenant's id map is gone; the repository and the tenant key remain
    tok = app.token("acme", "web1")
    app.start()
    p = app.agent(tok, "backup", str(src), cache=cache)
    st = json.loads(p.stdout)["stats"]
    assert "reading every file again" in p.stderr
    assert st["cached_files"] == 0 and st["read_bytes"] == 6 * 300_000
    app.agent(tok, "restore", "latest", str(tmp_path / "r"))
    assert tree_digest(tmp_path / "r" / str(src).lstrip("/")) == tree_digest(src)
