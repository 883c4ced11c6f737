"""A repository in a SeaweedFS bucket: the same commands as on a directory, the index rebuilt from the
bucket alone, create-only objects, ranged reads, the bucket lock, and a store killed mid-backup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo import format as fmt
from repo.errors import RepositoryLocked
from repo.repository import Repository
from repo.storage import ObjectExists
from repo.storage_s3 import S3Settings, S3Storage, redact_location
from tests.s3.conftest import api_backup, api_check, api_restore, api_snapshot_ids, new_location, write_tree
from tests.s3.stores import SeaweedFS
from tests.util import assert_same_tree, ihb


def _objects(storage: S3Storage, prefix: str) -> list[str]:
    return list(storage.list(prefix))


def _storage(location: str, tmp_path: Path, **over: object) -> S3Storage:
    st = S3Settings.from_location(location, config={})
    if over:
        from dataclasses import replace

        st = replace(st, **over)  # type: ignore[arg-type]
    return S3Storage(st, str(tmp_path / "spool"))


def test_location_parsing_and_redaction() -> None:
    s = S3Settings.from_location("s3://AK:S%2FK@h.example:9000/bkt/a/b/?tls=0&region=eu", env={}, config={})
    assert (s.host, s.bucket, s.prefix, s.access_key, s.secret_key, s.tls, s.region) == (
        "h.example:9000", "bkt", "a/b/", "AK", "S/K", False, "eu")
    assert s.endpoint == "http://h.example:9000"
    assert "AK" not in s.location and "S/K" not in s.location
    assert redact_location("s3://AK:SK@h:1/b") == "s3://h:1/b"
    env = {"IHB_S3_ACCESS_KEY": "E1", "IHB_S3_SECRET_KEY": "E2"}
    s2 = S3Settings.from_location("s3://h/bkt", env=env, config={"access_key": "C1", "part_size": 16 << 20})
    assert (s2.access_key, s2.secret_key, s2.tls, s2.prefix, s2.part_size) == ("E1", "E2", True, "", 16 << 20)
    for bad in ("s3://h", "s3://h/bkt/../x", "s3://h/bkt?bogus=1"):
        with pytest.raises(Exception, match="s3://"):
            S3Settings.from_location(bad, env={}, config={})


def test_storage_create_only_multipart_and_ranged_reads(seaweed: SeaweedFS, tmp_path: Path) -> None:
    loc = new_location(seaweed.endpoint)
    st = _storage(loc, tmp_path, part_size=5 << 20, block_size=1 << 20, readahead=2)
    st.prepare_init()
    st.put_bytes("snapshots/aa", b"one")
    with pytest.raises(ObjectExists):
        st.put_bytes("snapshots/aa", b"two")  # If-None-Match: * enforced by the server
    assert st.get("snapshots/aa") == b"one"
    data = os.urandom(13 << 20)  # 3 parts of 5 MiB (the last one folded)
    spool = Path(st.spool_dir()) / "pack-1-x.tmp"
    spool.write_bytes(data)
    st.put_file("data/ab/abcd", str(spool))
    assert not spool.exists(), "put_file consumes the spool file, as LocalStorage does"
    spool.write_bytes(b"other")
    with pytest.raises(ObjectExists):
        st.put_file("data/ab/abcd", str(spool))
    st2 = _storage(loc, tmp_path, block_size=1 << 20, readahead=2)  # cold: no sizes, no blocks cached
    assert st2.size("data/ab/abcd") == len(data)
    # a sequential stream (switches to aligned blocks with readahead) and random reads
    pos = 0
    while pos < len(data):
        n = min(300_000, len(data) - pos)
        assert st2.get("data/ab/abcd", pos, n) == data[pos : pos + n]
        pos += n
    for off, n in ((0, 10), (len(data) - 7, 7), (5 << 20, 1 << 20), (123_457, 3_000_001)):
        assert st2.get("data/ab/abcd", off, n) == data[off : off + n]
    assert sorted(st2.list("")) == ["data/ab/abcd", "snapshots/aa"]
    with pytest.raises(FileNotFoundError):
        st2.get("data/zz/none", 0, 10)
    st2.delete("data/ab/abcd")
    assert not st2.exists("data/ab/abcd")
    st.close()
    st2.close()


def test_bucket_lock(seaweed: SeaweedFS, tmp_path: Path) -> None:
    loc = new_location(seaweed.endpoint)
    st = _storage(loc, tmp_path, lock_lease=3.0)
    st.prepare_init()
    a = st.lock(exclusive=False, wait=1)
    b = st.lock(exclusive=False, wait=1)  # shared + shared
    with pytest.raises(RepositoryLocked, match="shared lock of pid"):
        st.lock(exclusive=True, wait=0.5)
    a.release()
    b.release()
    x = st.lock(exclusive=True, wait=1)
    with pytest.raises(RepositoryLocked):
        st.lock(exclusive=False, wait=0.3)
    time.sleep(2)  # heartbeats (every lease/4) keep it alive past the lease
    with pytest.raises(RepositoryLocked):
        st.lock(exclusive=False, wait=1.5)
    x.release()
    assert _objects(st, "locks/") == []
    # a dead process's lock on this host is removed at once; a foreign one only after the lease
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    doc = {"v": 1, "exclusive": True, "host": os.uname().nodename, "pid": int(p.stdout),
           "boot": open("/proc/sys/kernel/random/boot_id").read().strip()}
    st.put_bytes("locks/x-deadbeef", json.dumps(doc).encode())
    st.lock(exclusive=False, wait=0.5).release()
    st.put_bytes("locks/x-foreign", json.dumps({**doc, "host": "elsewhere"}).encode())
    t0 = time.monotonic()
    st.lock(exclusive=True, wait=10).release()
    assert time.monotonic() - t0 >= 1.5, "a foreign lock must be honoured until its lease runs out"
    assert _objects(st, "locks/") == []
    st.close()


def test_init_backup_restore_check_repair(s3_location: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 1, mib=6)
    env = {"IHB_REPO": s3_location}
    ihb("init", "--pack-size", str(1 << 20), env=env)
    assert ihb("init", env=env, check=False).returncode == 11  # create-only config
    ihb("backup", str(src), env=env)
    (src / "blob0.bin").write_bytes(os.urandom(100_000))
    api_backup(s3_location, src)
    ids = api_snapshot_ids(s3_location)
    assert len(ids) == 2
    ihb("restore", "latest", str(tmp_path / "out"), env=env)
    assert_same_tree(src, tmp_path / "out" / str(src).lstrip("/"))
    ihb("check", "--read-data", env=env)
    # the local index is a cache: delete it, rebuild it from the bucket alone
    with Repository.open(s3_location, lambda: b"pw") as repo:
        packs = len(repo.index.packs())
    assert packs >= 6
    shutil.rmtree(os.environ["IHB_CACHE_DIR"])
    rep = json.loads(ihb("check", "--repair", "--json", env=env).stdout)
    assert rep["ok"] and rep["stats"]["packs"] == packs and rep["repaired"]
    assert api_snapshot_ids(s3_location) == ids
    assert_same_tree(src, api_restore(s3_location, ids[-1], tmp_path / "out1"))
    st = _storage(s3_location, tmp_path)
    assert _objects(st, "locks/") == [], "every command removes its lock object"
    st.close()


def test_key_export_import_restores_a_damaged_key_object(seaweed: SeaweedFS, tmp_path: Path) -> None:
    s3_location = new_location(seaweed.endpoint)
    env = {"IHB_REPO": s3_location}
    ihb("init", env=env)
    exported = tmp_path / "key"
    exported.write_bytes(ihb("key", "export", env=env).stdout)
    other = new_location(seaweed.endpoint)
    ihb("init", env={"IHB_REPO": other})
    foreign = tmp_path / "foreign"
    foreign.write_bytes(ihb("key", "export", env={"IHB_REPO": other}).stdout)
    st = _storage(s3_location, tmp_path)
    st.replace_bytes(fmt.KEY_NAME, b"{ damaged")
    st.close()
    broken = ihb("snapshots", env=env, check=False)
    assert broken.returncode != 0 and b"Traceback" not in broken.stderr
    refused = ihb("key", "import", str(foreign), env=env, check=False)
    assert refused.returncode != 0 and b"Traceback" not in refused.stderr, refused.stderr
    ihb("key", "import", str(exported), env=env)
    assert ihb("snapshots", "--json", env=env).returncode == 0


def _pack_count(st: S3Storage) -> int:
    return sum(1 for n in st.list(fmt.DATA_PREFIX) if fmt.pack_id_from_name(n))


def test_store_killed_mid_backup(seaweed: SeaweedFS, tmp_path: Path) -> None:
    """SIGKILL the store while a backup uploads packs; after a restart nothing visible is broken,
    every earlier restore point reads back, and the next backup works."""
    loc = new_location(seaweed.endpoint)
    env = {"IHB_REPO": loc, "IHB_S3_RETRY_SECONDS": "3", "IHB_THREADS": "1"}
    src = tmp_path / "src"
    write_tree(src, 2, mib=2)
    Repository.init(loc, b"pw", pack_size=256 << 10)
    first = api_backup(loc, src)
    write_tree(tmp_path / "src" / "more", 3, mib=24, files=6)
    st = _storage(loc, tmp_path)
    before = _pack_count(st)
    p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "backup", str(src)], env={**os.environ, **env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _pack_count(st) < before + 8:
        assert p.poll() is None, "the backup finished before the store could be killed; make the data larger"
        assert time.monotonic() < deadline, "the backup made no progress"
        time.sleep(0.05)
    seaweed.kill()
    try:
        _out, err = p.communicate(timeout=60)
    finally:
        seaweed.start()
    assert p.returncode != 0, "the backup cannot have finished with the store dead for longer than its retry budget"
    assert b"Traceback" not in err and b"object store" in err, err.decode()
    assert api_snapshot_ids(loc) == [first], "no restore point may appear from the interrupted backup"
    api_check(loc)
    api_restore(loc, first, tmp_path / "out1")
    ihb("backup", str(src), env={**env, "IHB_S3_RETRY_SECONDS": "20"})  # the next backup works
    api_check(loc, read_data=False)
    assert_same_tree(src, api_restore(loc, "latest", tmp_path / "out2"))
    st.close()


def test_no_secret_in_messages(seaweed: SeaweedFS, tmp_path: Path) -> None:
    loc = new_location(seaweed.endpoint).replace("s3://", "s3://BADKEY:BADSECRET@")
    p = ihb("snapshots", env={"IHB_REPO": loc}, check=False)
    assert p.returncode in (10, 74), p.stderr.decode()
    assert b"BADSECRET" not in p.stderr and b"Traceback" not in p.stderr, p.stderr.decode()


class _CutOff(Exception):
    pass


def test_a_put_cut_off_after_its_headers_leaves_no_object(s3_location: str, tmp_path: Path) -> None:
    """A process killed between a PUT's headers and its body (kill -9 during a sync or backup) must not
    leave an object behind: SeaweedFS stored a 0-byte one unless the request carries Content-MD5."""
    import socket
    import urllib.parse

    Repository.init(s3_location, b"pw")
    storage = _storage(s3_location, tmp_path)
    sent: dict[str, object] = {}

    def cut_off(request: object, **_: object) -> None:
        sent["request"] = request
        raise _CutOff()

    storage.client.meta.events.register_first("before-send.s3.PutObject", cut_off)
    body = os.urandom(300_000)
    with pytest.raises(_CutOff):
        storage.put_bytes("data/cu/cutoff", body)
    req = sent["request"]
    url = urllib.parse.urlsplit(req.url)  # type: ignore[attr-defined]
    head = f"PUT {url.path}{'?' + url.query if url.query else ''} HTTP/1.1\r\n"
    head += "".join(f"{k}: {v.decode() if isinstance(v, bytes) else v}\r\n"
                    for k, v in req.headers.items())  # type: ignore[attr-defined]
    if "host" not in {k.lower() for k in req.headers}:  # type: ignore[attr-defined]
        head += f"Host: {url.netloc}\r\n"
    assert "aws-chunked" not in str(req.headers).lower()  # type: ignore[attr-defined]  # the body goes as is
    probe = _storage(s3_location, tmp_path)
    for sent_bytes in (0, 1, len(body) // 2, len(body) - 1):  # the process "dies" after this much body
        with socket.create_connection((url.hostname, url.port)) as s:
            s.sendall((head + "\r\n").encode())
            time.sleep(0.2)
            s.sendall(body[:sent_bytes])
            time.sleep(0.2)
        time.sleep(0.3)
        assert not probe.exists("data/cu/cutoff"), f"an upload cut off after {sent_bytes} body bytes left an object"
