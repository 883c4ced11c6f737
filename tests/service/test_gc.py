"""Prune and GC: space comes back, a backup running in another process keeps every chunk it reused,
a kill -9 at any stage of GC leaves every kept restore point readable, and locks and approvals hold."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from repo import gc
from repo.approvals import Approval, ApprovalRequired
from repo.backup import BackupOptions, backup_paths
from repo.check import check_repository
from repo.prune import plan_prune, plan_tenant_deletion
from repo.repository import Repository
from repo.restore import restore_snapshot
from repo.retention import Policy
from repo.retention_lock import RetentionLocked, lock, lock_state, unlock
from repo.sessions import Session, list_sessions
from repo.snapshot import Snapshot
from tests.util import ihb

ROOT = Path(__file__).resolve().parents[2]


def _files(d: Path, names: dict[str, bytes]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n, data in names.items():
        (d / n).write_bytes(data)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pack_bytes(repo_path: str) -> int:
    return sum(p.stat().st_size for p in Path(repo_path, "data").rglob("*") if p.is_file())


# A real backup in another process that pauses after it has deduplicated against an existing chunk
# (after registering its session, before committing), until the test lets it go on.
BLOCKING_BACKUP = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from repo.backup import Backup, BackupOptions
    from repo.repository import Repository
    repo_path, src, ready, go = sys.argv[2:6]
    repo = Repository.open(repo_path, lambda: b"pw")
    held = []
    def progress(stats, path):
        if held or not path.endswith("a_shared.bin"):
            return
        held.append(1)
        while b.writer.stats["chunks"] < 1:   # the shared chunk has been looked up (and deduplicated)
            time.sleep(0.01)
        open(ready, "w").write(str(b.writer.stats["new_chunks"]))
        while not os.path.exists(go):
            time.sleep(0.05)
    b = Backup(repo, BackupOptions(host="h3"), progress)
    snap = b.run([src])
    print(snap.id)
    repo.close()
""")


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"helper exited early: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def test_prune_gc_frees_space_while_a_concurrent_backup_keeps_its_chunks(tmp_path: Path, repo_path: str,
                                                                          cli_env: dict[str, str]) -> None:
    rnd = random.Random(1)
    shared, only_old = rnd.randbytes(200_000), rnd.randbytes(600_000)
    _files(tmp_path / "h1a", {"a_shared.bin": shared, "old.bin": only_old})
    _files(tmp_path / "h1b", {"w.bin": rnd.randbytes(50_000)})
    _files(tmp_path / "h3", {"a_shared.bin": shared, "b_new.bin": rnd.randbytes(300_000)})
    with Repository.open(repo_path, lambda: b"pw") as r:
        backup_paths(r, [str(tmp_path / "h1a")], BackupOptions(host="h1"))
        backup_paths(r, [str(tmp_path / "h1b")], BackupOptions(host="h1"))
    ready, go = tmp_path / "ready", tmp_path / "go"
    helper = subprocess.Popen([sys.executable, "-c", BLOCKING_BACKUP, str(ROOT), repo_path, str(tmp_path / "h3"),
                               str(ready), str(go)], env={**os.environ, **cli_env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        _wait_for(ready, helper)
        assert ready.read_text() == "0"  # the shared chunk was reused, not stored again
        before = _pack_bytes(repo_path)
        ihb("prune", "--host", "h1", "--keep-last", "1", "--group-by", "host", env=cli_env)
        # the shared chunk is now unreferenced by any restore point, yet the running backup uses it
        first = json.loads(ihb("gc", "--grace", "0", "--json", env=cli_env).stdout)
        assert first["phase"] == "deferred" and first["condemned_blobs"] >= 2, first
        assert "pid" in first["blocking"][0]
        assert _pack_bytes(repo_path) == before  # nothing deleted while it runs
        go.write_text("go")
        out, err = helper.communicate(timeout=120)
        assert helper.returncode == 0, err
        sid = out.decode().strip()
        # committed while its shared chunk is condemned: it restores at once, before any sweep
        ihb("restore", sid, str(tmp_path / "early"), env=cli_env)
        assert _digests(tmp_path / "early" / str(tmp_path / "h3").lstrip("/")) == _digests(tmp_path / "h3")
        # Chunk boundaries follow the repository's secret seed, so old.bin may share a pack with the
        # shared chunk; a high live ratio compacts that pack too and makes the freed space deterministic.
        second = json.loads(ihb("gc", "--grace", "0", "--min-live-ratio", "0.95", "--json", env=cli_env).stdout)
    finally:
        go.write_text("go")
        if helper.poll() is None:
            helper.kill()
    assert second["phase"] == "done" and second["rescued_blobs"] >= 1, second
    # old.bin (600 kB, only in the pruned restore point) is gone; what remains is the live data:
    # w.bin 50 kB + the shared 200 kB + h3's new 300 kB, plus tree pages and pack framing
    after = _pack_bytes(repo_path)
    assert after < 700_000 < before + 300_000, (before, after, second)
    assert second["freed_bytes"] >= 550_000 and second["condemned_bytes"] >= 800_000, second
    chk = ihb("check", "--read-data", env=cli_env, check=False)
    assert chk.returncode == 0, chk.stdout.decode()
    ihb("restore", sid, str(tmp_path / "out"), env=cli_env)
    assert _digests(tmp_path / "out" / str(tmp_path / "h3").lstrip("/")) == _digests(tmp_path / "h3")
    assert not [s for s in list_sessions_of(repo_path) if s.live]


def test_gc_wait_sweeps_once_the_older_backup_ends(tmp_path: Path, repo_path: str) -> None:
    _files(tmp_path / "a", {"x.bin": random.Random(4).randbytes(80_000)})
    s = _backup(repo_path, tmp_path / "a", "a")
    with Repository.open(repo_path, lambda: b"pw") as repo:
        older = Session.begin(repo, "test", "older backup", heartbeat=False)
        repo.delete_snapshot(s.id)
        timer = threading.Timer(1.0, older.end)
        timer.start()
        t0 = time.monotonic()
        rep = gc.run_gc(repo, grace=0, wait=30)
        assert rep.phase == "done" and rep.deleted_packs >= 1 and rep.freed_bytes > 80_000
        assert 0.9 < time.monotonic() - t0 < 20
        timer.join()


def list_sessions_of(repo_path: str) -> list[object]:
    with Repository.open(repo_path, lambda: b"pw") as r:
        return list(list_sessions(r))


@pytest.fixture(scope="module")
def compaction_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A repository (and its index) where GC must delete whole packs *and* compact mixed ones."""
    base = tmp_path_factory.mktemp("gctemplate")
    repo_path = str(base / "repo")
    Repository.init(repo_path, b"pw", pack_size=256 * 1024)
    rnd = random.Random(2)
    old = {f"f{i}.bin": rnd.randbytes(60_000) for i in range(12)}
    old.update({f"z{i}.bin": rnd.randbytes(60_000) for i in range(5)})  # all deleted: whole dead packs
    _files(base / "src", old)
    cache = str(base / "cache")
    # One worker: blobs reach the packs in walk order, so which packs end up mixed (to compact) and which
    # all dead (to delete) does not depend on thread timing.
    with Repository.open(repo_path, lambda: b"pw", cache_dir=cache) as r:
        backup_paths(r, [str(base / "src")], BackupOptions(host="h", threads=1))
        for i in range(12):
            if i % 4 != 0:
                (base / "src" / f"f{i}.bin").unlink()  # one file in four stays: packs become 1/5 live
        for i in range(5):
            (base / "src" / f"z{i}.bin").unlink()
        _files(base / "src", {"late.bin": rnd.randbytes(300_000)})
        backup_paths(r, [str(base / "src")], BackupOptions(host="h", threads=1))
        plan_prune(r, Policy(last=1)).execute()
    return base, cache


STOP_POINTS = ["condemned", "rescued", "compact-pack-written", "compact-moved",
               "deleted-one", "before-finish"]


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("point", STOP_POINTS)
def test_kill_9_during_gc_leaves_every_kept_restore_point_readable(
        point: str, tmp_path: Path, compaction_template: tuple[Path, str]) -> None:
    base, cache_t = compaction_template
    shutil.copytree(base / "repo", tmp_path / "repo")
    shutil.copytree(cache_t, tmp_path / "cache")
    repo_path, cache = str(tmp_path / "repo"), str(tmp_path / "cache")
    env = {**os.environ, "IHB_REPO": repo_path, "IHB_PASSPHRASE": "pw", "IHB_CACHE_DIR": cache,
           "IHB_TESTONLY_GC_STOP": point}
    before = _pack_bytes(repo_path)
    p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "gc", "--grace", "0"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not _stopped(p.pid):
        assert p.poll() is None, f"gc finished without reaching {point}: {p.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    src = base / "src"

    def verify() -> None:
        with Repository.open(repo_path, lambda: b"pw", cache_dir=cache) as r:
            rep = check_repository(r, read_data=True)
            assert rep.ok, rep.to_obj()
            snap = r.snapshots()[-1]
            out = tmp_path / f"out-{time.monotonic_ns()}"
            restore_snapshot(r, snap, str(out))
            assert _digests(out / str(src).lstrip("/")) == _digests(src)

    verify()
    with Repository.open(repo_path, lambda: b"pw", cache_dir=cache) as r:
        assert gc.run_gc(r, grace=0).phase == "done"  # the next run resumes and finishes
    verify()
    with Repository.open(repo_path, lambda: b"pw", cache_dir=cache) as r:
        gc.run_gc(r, grace=0)  # and the one after removes what the killed run left (a dead copy)
    after = _pack_bytes(repo_path)
    assert after < before * 0.6, (before, after)  # 3/4 of the old data is gone, compacted or deleted
    if point == "compact-moved":
        chk = ihb("check", "--read-data", env={"IHB_REPO": repo_path, "IHB_PASSPHRASE": "pw", "IHB_CACHE_DIR": cache})
        assert b"no problems found" in chk.stdout


def _backup(repo_path: str, src: Path, host: str) -> Snapshot:
    """One backup through its own Repository object, as a separate `ihb backup` would (its writer
    session ends when it closes)."""
    with Repository.open(repo_path, lambda: b"pw") as r:
        return backup_paths(r, [str(src)], BackupOptions(host=host))


def test_prune_of_a_restore_point_committed_after_the_mark_aborts_the_condemnation(
        tmp_path: Path, repo_path: str) -> None:
    rnd = random.Random(3)
    shared = rnd.randbytes(100_000)
    _files(tmp_path / "a", {"x.bin": shared})
    s_old = _backup(repo_path, tmp_path / "a", "a")
    with Repository.open(repo_path, lambda: b"pw") as repo:
        live = Session.begin(repo, "test", "a backup that started before the mark", heartbeat=False)
        repo.delete_snapshot(s_old.id)  # x.bin's chunk is now unreferenced
        rep = gc.run_gc(repo, grace=0)
        assert rep.phase == "deferred" and rep.condemned_blobs >= 1
    # a restore point committed after the mark references the condemned chunk (its id came from a
    # session older than the mark); pruning it before the sweep would hide the rescue...
    _files(tmp_path / "b", {"x.bin": shared})
    s_new = _backup(repo_path, tmp_path / "b", "b")
    _files(tmp_path / "b", {"y.bin": rnd.randbytes(10)})
    _backup(repo_path, tmp_path / "b", "b")
    with Repository.open(repo_path, lambda: b"pw") as repo:
        res = plan_prune(repo, Policy(last=1), host="b").execute()
        # ...so prune gives the pending condemnation up and re-indexes its blobs first
        assert res.deleted == [s_new.id] and res.gc_pending_aborted
        assert gc.Pending.load(repo) is None
        live.end()
        assert gc.run_gc(repo, grace=0).phase == "done"
        assert check_repository(repo, read_data=True).ok


def test_locks_and_approvals(tmp_path: Path, repo: Repository) -> None:
    _files(tmp_path / "s", {"f": b"1"})
    snaps = [backup_paths(repo, [str(tmp_path / "s")], BackupOptions(host="h", meta={"tenant": "t1"}))
             for _ in range(3)]
    future = time.time_ns() + 86400 * 10**9
    lock(repo, snaps[0], future, "alice", "legal hold")
    plan = plan_prune(repo, Policy(last=1))
    assert {s.id for s in plan.remove} == {snaps[1].id}
    assert plan.reasons[snaps[0].id].matches[0].startswith("locked until")
    # a lock placed after planning still wins at execution
    lock(repo, snaps[1], future, "carol")
    assert plan.execute().skipped_locked == [snaps[1].id]
    assert len(repo.snapshots()) == 3
    # tenant deletion refuses while locked, and needs two people
    with pytest.raises(RetentionLocked):
        plan_tenant_deletion(repo, "t1")
    now = time.time_ns()
    one = Approval("r1", "unlock", snaps[0].id, "alice", now, now + 10**12, (("alice", now), ("Alice ", now)))
    with pytest.raises(ApprovalRequired):
        unlock(repo, snaps[0], one)
    wrong = Approval("r2", "unlock", snaps[1].id, "alice", now, now + 10**12, (("alice", now), ("bob", now)))
    with pytest.raises(ApprovalRequired):
        unlock(repo, snaps[0], wrong)
    expired = Approval("r3", "unlock", snaps[0].id, "alice", now - 10, now - 5, (("alice", now - 9), ("bob", now - 8)))
    with pytest.raises(ApprovalRequired):
        unlock(repo, snaps[0], expired)
    ok = Approval("r4", "unlock", snaps[0].id, "alice", now, now + 10**12, (("alice", now), ("bob", now)))
    assert not unlock(repo, snaps[0], ok).active()
    unlock(repo, snaps[1], Approval("r5", "unlock", snaps[1].id, "x", now, now + 10**12, (("x", now), ("y", now))))
    assert not lock_state(repo, snaps[1]).active()
    lock(repo, snaps[1], future, "dave")  # a new lock after an unlock holds again
    assert lock_state(repo, snaps[1]).until_ns == future
    unlock(repo, snaps[1], Approval("r6", "unlock", snaps[1].id, "x", now, now + 10**12, (("x", now), ("y", now))))
    plan = plan_tenant_deletion(repo, "t1")
    with pytest.raises(ApprovalRequired):
        plan.execute()
    ok = Approval("r7", "delete-tenant", "t1", "alice", now, now + 10**12, (("alice", now), ("bob", now)))
    assert len(plan_tenant_deletion(repo, "t1", ok).execute().deleted) == 3
    assert repo.snapshots() == []


def test_cli_unlock_needs_a_second_person(tmp_path: Path, cli_env: dict[str, str]) -> None:
    _files(tmp_path / "s", {"f": b"1"})
    ihb("backup", str(tmp_path / "s"), env=cli_env)
    ihb("lock", "latest", "--until", "30d", "--as", "alice", env=cli_env)
    req = json.loads(ihb("unlock", "latest", "--as", "alice", "--json", env=cli_env).stdout)
    rid = req["request"]["id"]
    assert req["executed"] is None
    same = ihb("approve", rid, "--as", "ALICE", env=cli_env, check=False)
    assert same.returncode == 61 and b"different person" in same.stderr
    assert json.loads(ihb("locks", "--json", env=cli_env).stdout)
    ihb("approve", rid, "--as", "bob", env=cli_env)
    assert json.loads(ihb("locks", "--json", env=cli_env).stdout) == []
    actions = [e["action"] for e in json.loads(ihb("audit", "--json", env=cli_env).stdout)]
    assert actions == ["lock", "request-unlock", "approval-refused", "approve-unlock", "unlock"]
    assert ihb("audit", "verify", env=cli_env).returncode == 0
