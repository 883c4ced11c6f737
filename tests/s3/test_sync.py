"""`ihb sync` between a directory repository and a bucket, both ways: only missing chunks travel,
an interrupted run leaves no restore point and the next one continues, retention is the target's own,
and nothing deleted at the source is ever deleted at the target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from repo import format as fmt
from repo.repository import Repository
from repo.storage_s3 import S3Settings, S3Storage
from tests.s3.conftest import api_backup, api_check, api_restore, api_snapshot_ids, new_location, write_tree
from tests.s3.stores import SeaweedFS
from tests.util import assert_same_tree, ihb


def _packs(loc: str, spool: Path) -> int:
    st = S3Storage(S3Settings.from_location(loc, config={}), str(spool))
    try:
        return sum(1 for n in st.list(fmt.DATA_PREFIX) if fmt.pack_id_from_name(n))
    finally:
        st.close()


def test_sync_local_to_s3_resumed_then_s3_to_local(seaweed: SeaweedFS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 11, mib=32, files=8)
    a = str(tmp_path / "a")
    Repository.init(a, b"pw", pack_size=256 << 10)
    s1 = api_backup(a, src)
    (src / "blob1.bin").write_bytes(os.urandom(3 << 20))
    s2 = api_backup(a, src)
    with Repository.open(a, lambda: b"pw") as repo:
        total_chunks = repo.index.chunk_count()
    b = new_location(seaweed.endpoint, "replica")
    Repository.init(b, b"other-pw", pack_size=256 << 10)  # its own key: chunks are re-id'ed
    env = {"IHB_FROM_PASSPHRASE": "pw", "IHB_PASSPHRASE": "other-pw", "IHB_THREADS": "1"}

    # 1. local -> S3, killed mid-way: nothing visible at the target
    p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "sync", "--from", a, "--to", b],
                         env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _packs(b, tmp_path / "spool") < 12:
        assert p.poll() is None, f"sync finished before it could be interrupted: {p.communicate()}"
        assert time.monotonic() < deadline, "sync made no progress"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert api_snapshot_ids(b, b"other-pw") == [], "an interrupted sync must not leave a restore point"

    # 2. the next run continues: chunks already in the bucket do not travel again
    rep = json.loads(ihb("sync", "--from", a, "--to", b, "--json", env=env).stdout)
    assert [c["source"] for c in rep["copied"]] == [s1, s2]
    assert 0 < rep["stats"]["chunks_written"] < total_chunks, rep["stats"]
    assert rep["stats"]["chunks_read"] < total_chunks + 4, rep["stats"]  # + the re-read tree pages
    assert rep["stats"]["packs_verified"] >= 1 and rep["stats"]["blobs_verified"] >= rep["stats"]["chunks_written"]
    api_check(b, pw=b"other-pw")
    assert_same_tree(src, api_restore(b, rep["copied"][1]["target"], tmp_path / "out_b", b"other-pw"))
    again = json.loads(ihb("sync", "--from", a, "--to", b, "--json", env=env).stdout)
    assert again["copied"] == [] and sorted(again["already_present"]) == sorted([s1, s2])

    # 3. S3 -> local with the target's own retention (keep the newest copy only)
    c = str(tmp_path / "c")
    Repository.init(c, b"pw", pack_size=256 << 10)
    env_c = {"IHB_FROM_PASSPHRASE": "other-pw", "IHB_PASSPHRASE": "pw"}
    rep = json.loads(ihb("sync", "--from", b, "--to", c, "--keep-last", "1", "--json", env=env_c).stdout)
    assert len(rep["copied"]) == 1 and len(rep["not_copied_by_policy"]) == 1 and rep["removed"] == []
    api_check(c)
    assert_same_tree(src, api_restore(c, "latest", tmp_path / "out_c"))
    kept = api_snapshot_ids(c)

    # 4. pull-only: whatever happens to the source, the target keeps its copies
    with Repository.open(b, lambda: b"other-pw") as repo:
        for s in repo.snapshots():
            repo.delete_snapshot(s.id)  # "ransomware" empties the source
    rep = json.loads(ihb("sync", "--from", b, "--to", c, "--keep-last", "1", "--json", env=env_c).stdout)
    assert rep["copied"] == [] and rep["removed"] == []
    assert api_snapshot_ids(c) == kept
