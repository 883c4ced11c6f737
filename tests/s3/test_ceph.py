"""The same repository on Ceph RGW (Debian's radosgw on a one-OSD cluster): a second, production S3
implementation. One cluster for the module; radosgw is killed mid-backup and restarted within the
retry budget, so the backup rides it out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from repo import format as fmt
from repo.storage import ObjectExists
from repo.storage_s3 import S3Settings, S3Storage
from tests.s3.conftest import api_check, api_restore, api_snapshot_ids, new_location, write_tree
from tests.s3.stores import CephRGW
from tests.util import assert_same_tree, ihb


def test_ceph_rgw_backup_restore_survives_rgw_restart(ceph: CephRGW, tmp_path: Path) -> None:
    loc = new_location(ceph.endpoint)
    env = {"IHB_REPO": loc, "IHB_S3_RETRY_SECONDS": "90", "IHB_THREADS": "1"}
    src = tmp_path / "src"
    write_tree(src, 5, mib=4)
    ihb("init", "--pack-size", str(256 << 10), env=env)
    ihb("backup", str(src), env=env)
    st = S3Storage(S3Settings.from_location(loc, config={}), str(tmp_path / "spool"))
    st.put_bytes("probe", b"1")
    try:
        st.put_bytes("probe", b"2")
        raise AssertionError("RGW accepted a second PUT with If-None-Match: *")
    except ObjectExists:
        pass
    st.delete("probe")
    write_tree(src / "more", 6, mib=24, files=6)
    before = sum(1 for n in st.list(fmt.DATA_PREFIX) if fmt.pack_id_from_name(n))
    p = subprocess.Popen([sys.executable, "-m", "appliance.cli", "backup", str(src)], env={**os.environ, **env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while sum(1 for n in st.list(fmt.DATA_PREFIX) if fmt.pack_id_from_name(n)) < before + 8:
        assert p.poll() is None, "the backup finished before radosgw could be killed; make the data larger"
        assert time.monotonic() < deadline, "the backup made no progress"
        time.sleep(0.05)
    ceph.kill_rgw()
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(1.0)  # the backup is now retrying against a dead endpoint
        ceph.start_rgw()
        restarted.set()

    t = threading.Thread(target=restart)
    t.start()
    try:
        out, err = p.communicate(timeout=180)
    finally:
        t.join()
    assert restarted.is_set()
    assert p.returncode == 0, f"the backup should ride out a radosgw restart: {err.decode()}"
    ids = api_snapshot_ids(loc)
    assert len(ids) == 2
    api_check(loc)
    assert_same_tree(src, api_restore(loc, ids[-1], tmp_path / "out"))
    shutil.rmtree(os.environ["IHB_CACHE_DIR"])  # index rebuilt from the bucket alone
    rep = json.loads(ihb("check", "--repair", "--json", env=env).stdout)
    assert rep["ok"] and rep["repaired"]
    assert api_snapshot_ids(loc) == ids
    st.close()
