"""Crashes, corruption and bad input: nothing earlier is lost, damage is named, errors are one line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from repo import format as fmt
from repo.repository import Repository
from repo.snapshot import Snapshot
from repo.tree import TYPE_DIR, DirBuilder, pack_node
from tests.util import assert_same_tree, ihb


def _digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _no_traceback(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    return lines[0]


def test_kill_9_during_backup_loses_nothing(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    Repository.init(repo, b"pw", pack_size=512 * 1024)
    env = {"IHB_REPO": repo, "IHB_PASSPHRASE": "pw", "IHB_THREADS": "1"}
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(7)
    nfiles = 40  # many packs per backup, so kills land between, inside and after pack writes
    for i in range(nfiles):
        (src / f"f{i}").write_bytes(rnd.randbytes(4 * 1024 * 1024))
    t0 = time.monotonic()
    ihb("backup", str(src), env=env)
    full_s = time.monotonic() - t0  # each attempt below writes as much new data: kill inside that time
    first = json.loads(ihb("snapshots", "--json", env=env).stdout)
    assert len(first) == 1
    kills = 0
    for i in range(6):
        # new data everywhere, so every attempt writes many packs
        for j in range(nfiles):
            (src / f"f{j}").write_bytes(rnd.randbytes(4 * 1024 * 1024))
        p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "backup", str(src)],
                             env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.15, 0.75) * full_s)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        chk = ihb("check", "--read-data", env=env, check=False)
        assert chk.returncode == 0, chk.stdout.decode() + chk.stderr.decode()
        out = tmp_path / f"out{i}"
        ihb("restore", first[0]["id"], str(out), env=env)
    assert kills >= 3, "the backups finished too fast to be killed; make the data larger"
    ihb("backup", str(src), env=env)  # the next backup works, no stale lock
    out = tmp_path / "final"
    ihb("restore", "latest", str(out), env=env)
    assert_same_tree(src, out / str(src).lstrip("/"))
    assert not [f for f in os.listdir(os.path.join(repo, "tmp")) if f.startswith("pack-")]  # spool cleaned


def test_flipped_byte_is_detected_named_and_healed(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    Repository.init(repo, b"pw", pack_size=64 * 1024)
    env = {"IHB_REPO": repo, "IHB_PASSPHRASE": "pw"}
    src = tmp_path / "src"
    src.mkdir()
    (src / "victim.bin").write_bytes(os.urandom(200_000))
    (src / "other.txt").write_bytes(b"fine\n" * 10_000)
    ihb("backup", str(src), env=env)
    with Repository.open(repo, lambda: b"pw") as r:
        snap = r.snapshots()[-1]
        from repo.tree import TreeReader, root_node

        node = TreeReader(r).resolve(root_node(snap.tree), f"{src}/victim.bin")
        cid = node["c"][0][0]
        loc = r.index.get_chunk(cid)
        assert loc is not None
        pack = os.path.join(repo, fmt.pack_name(loc.pack))
    data = bytearray(open(pack, "rb").read())
    data[loc.offset + loc.length // 2] ^= 0x40
    os.chmod(pack, 0o600)
    with open(pack, "wb") as f:
        f.write(data)
    chk = ihb("check", "--read-data", env=env, check=False)
    assert chk.returncode == 90
    out = chk.stdout.decode()
    assert cid.hex() in out and "victim.bin" in out and "other.txt" not in out
    rest = ihb("restore", "latest", str(tmp_path / "out"), env=env, check=False)
    assert rest.returncode == 90
    assert "victim.bin" in rest.stderr.decode() and "authentication" in rest.stderr.decode()
    restored = tmp_path / "out" / str(src).lstrip("/")
    assert (restored / "other.txt").read_bytes() == (src / "other.txt").read_bytes()
    assert not (restored / "victim.bin").exists()  # never restored silently, no partial file
    # repair drops the damaged chunk; the next backup stores it again and the old restore point heals
    rep = ihb("check", "--repair", "--read-data", env=env, check=False)
    assert "dropped" in rep.stdout.decode()
    ihb("backup", "--no-files-cache", str(src), env=env)
    ihb("restore", snap.id, str(tmp_path / "healed"), env=env)
    assert (tmp_path / "healed" / str(src).lstrip("/") / "victim.bin").read_bytes() == (src / "victim.bin").read_bytes()


def test_clear_errors(tmp_path: Path, repo_path: str) -> None:
    env = {"IHB_REPO": repo_path, "IHB_PASSPHRASE": "pw"}
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    p = ihb("snapshots", env={**env, "IHB_PASSPHRASE": "nope"}, check=False)
    assert p.returncode == 12 and "passphrase" in _no_traceback(p)
    p = ihb("snapshots", env={**env, "IHB_REPO": str(tmp_path / "missing")}, check=False)
    assert p.returncode == 10 and "ihb init" in _no_traceback(p)
    p = ihb("backup", str(tmp_path / "nonexistent"), env=env, check=False)
    assert p.returncode == 31 and "no such file" in _no_traceback(p)
    p = ihb("restore", env=env, check=False)
    assert p.returncode == 2
    p = ihb("restore", "zzzz", str(tmp_path / "o"), env=env, check=False)
    assert p.returncode == 20 and "ihb snapshots" in _no_traceback(p)
    ihb("backup", str(src), env=env)
    ihb("restore", "latest", str(tmp_path / "o"), env=env)
    p = ihb("restore", "latest", str(tmp_path / "o"), env=env, check=False)
    assert p.returncode == 40 and "--overwrite" in _no_traceback(p)
    ihb("restore", "latest", str(tmp_path / "o"), "--overwrite", env=env)
    p = ihb("init", env=env, check=False)
    assert p.returncode == 11
    p = ihb("snapshots", env={"IHB_REPO": repo_path, "IHB_PASSPHRASE": ""}, check=False, input=b"")
    assert p.returncode == 12


def test_unreadable_file_is_skipped_and_recorded(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="ihb-nobody-"))
    os.chmod(base, 0o777)
    repo = base / "repo"
    src = base / "src"
    src.mkdir()
    (src / "ok").write_text("ok")
    (src / "secret").write_text("no")
    os.chmod(src / "secret", 0o000)
    os.chmod(src, 0o755)
    env = {**os.environ, "IHB_REPO": str(repo), "IHB_PASSPHRASE": "pw", "IHB_CACHE_DIR": str(base / "cache"),
           "IHB_CONFIG_DIR": str(base / "etc"), "IHB_DATA_DIR": str(base / "data"), "HOME": str(base)}
    run = ["runuser", "-u", "nobody", "--", sys.executable, "-m", "appliance.cli"]
    subprocess.run([*run, "init"], env=env, check=True, capture_output=True)
    p = subprocess.run([*run, "backup", str(src)], env=env, capture_output=True)
    assert p.returncode == 1, p.stderr
    assert "secret" in p.stderr.decode() and "Permission denied" in p.stderr.decode()
    snaps = json.loads(subprocess.run([*run, "snapshots", "--json"], env=env, check=True, capture_output=True).stdout)
    assert snaps[0]["errors"] == 1
    subprocess.run(["rm", "-rf", str(base)], check=True)


def test_disk_full_keeps_repository_intact(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        repo = str(mnt / "repo")
        Repository.init(repo, b"pw", pack_size=256 * 1024)
        env = {"IHB_REPO": repo, "IHB_PASSPHRASE": "pw"}
        src = tmp_path / "src"
        src.mkdir()
        (src / "small").write_bytes(os.urandom(1_000_000))
        ihb("backup", str(src), env=env)
        (src / "huge").write_bytes(os.urandom(12_000_000))
        p = ihb("backup", str(src), env=env, check=False)
        assert p.returncode == 30, p.stderr
        assert "no space" in _no_traceback(p)
        spool = mnt / "repo" / "tmp"
        assert not (spool.exists() and os.listdir(spool)), f"the failed backup left spool files: {os.listdir(spool)}"
        assert len(json.loads(ihb("snapshots", "--json", env=env).stdout)) == 1
        assert ihb("check", "--read-data", env=env, check=False).returncode == 0
        (src / "huge").unlink()
        ihb("backup", str(src), env=env)
        out = tmp_path / "out"
        ihb("restore", "latest", str(out), env=env)
        assert_same_tree(src, out / str(src).lstrip("/"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("bad", [b"..", b"a/b", b".", b"x\0y"])
def test_restore_refuses_crafted_names(tmp_path: Path, repo: Repository, bad: bytes) -> None:
    w = repo.writer()
    inner = DirBuilder(w)
    leaf = {"n": bad, "t": "f", "m": 0o100644, "u": 0, "g": 0, "s": 4, "mt": 0, "c": [[w.add(0, b"evil"), 4]]}
    good = {"n": b"good", "t": "f", "m": 0o100644, "u": 0, "g": 0, "s": 4, "mt": 0, "c": [[w.add(0, b"fine"), 4]]}
    for n in sorted([leaf, good], key=lambda x: x["n"]):
        inner.add(n["n"], n)
    d = {"n": b"d", "t": TYPE_DIR, "m": 0o40755, "u": 0, "g": 0, "s": 0, "mt": 0, "d": inner.finish()}
    root = DirBuilder(w)
    root.add(b"d", d)
    pages = root.finish()
    w.flush()
    snap = repo.store_snapshot(Snapshot(id="", kind="files", host="evil", time_ns=time.time_ns(),
                                        tree=pack_node({"n": b"", "t": TYPE_DIR, "m": 0o40755, "u": 0, "g": 0, "s": 0,
                                                        "mt": 0, "d": pages})))
    target = tmp_path / "deep" / "target"
    p = ihb("restore", snap.id, str(target), env={"IHB_REPO": repo.storage.location, "IHB_PASSPHRASE": "pw"}, check=False)
    assert p.returncode != 0 and "refusing" in p.stderr.decode()
    assert (target / "d" / "good").read_bytes() == b"fine"
    assert sorted(os.listdir(tmp_path / "deep")) == ["target"]
    assert sorted(os.listdir(target / "d")) == ["good"]


def test_empty_leftover_pack_is_not_damage(repo_path: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """A 0-byte pack the index never knew (an upload that died before its first byte; some object stores
    keep such a PUT) holds nothing: check says so without failing, --repair removes it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    ihb("backup", str(src), env=cli_env)
    name = fmt.pack_name(fmt.PackId(os.urandom(fmt.PACK_ID_LEN)))
    path = Path(repo_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    rep = json.loads(ihb("check", "--read-data", "--json", env=cli_env).stdout)
    assert rep["ok"] and rep["stats"]["empty_leftover_packs"] == 1, rep
    rep = json.loads(ihb("check", "--repair", "--json", env=cli_env).stdout)
    assert rep["ok"] and not path.exists() and any("empty leftover" in r for r in rep["repaired"]), rep
    path.write_bytes(b"x" * 10)  # a short pack with bytes in it is still damage
    assert ihb("check", env=cli_env, check=False).returncode != 0
