"""A real PostgreSQL backed up through the agent with `--stdin-name db.sql -- pg_dump`, restored into
a fresh cluster, compared by row counts and checksums."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import Appliance, free_port, require

PGBIN = "/usr/lib/postgresql/15/bin"
CHECK_SQL = ("SELECT count(*), md5(string_agg(id::text || ':' || v || ':' || n::text, ',' ORDER BY id)) FROM items;"
             "SELECT count(*), md5(string_agg(k || '=' || doc::text, ',' ORDER BY k)) FROM docs;")


class Cluster:
    def __init__(self, base: str, port: int, as_user: str | None) -> None:
        self.base, self.port, self.user = base, port, as_user
        self.data = os.path.join(base, "data")
        self.sock = base

    def _cmd(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else args

    def run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        kw.setdefault("text", True)
        p = subprocess.run(self._cmd(args), capture_output=True, timeout=120, **kw)  # type: ignore[call-overload]
        if p.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({p.returncode}): {p.stderr!r}")
        return p

    def psql(self, sql: str, db: str = "shop") -> str:
        return self.run([os.path.join(PGBIN, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.sock,
                         "-p", str(self.port), "-U", "postgres", "-d", db, "-c", sql]).stdout

    def dump_cmd(self) -> list[str]:
        return [os.path.join(PGBIN, "pg_dump"), "-h", self.sock, "-p", str(self.port), "-U", "postgres", "shop"]


@contextmanager
def cluster() -> Iterator[Cluster]:
    for tool in ("initdb", "pg_ctl", "psql", "pg_dump"):
        require(os.path.join(PGBIN, tool), "install Debian's postgresql-15 for the PostgreSQL backup test")
    as_user = None
    base = tempfile.mkdtemp(prefix="ihb-pg-")
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, the PostgreSQL test needs the 'postgres' user (Debian's postgresql package)")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = "postgres"
        require(shutil.which("runuser") or "/sbin/runuser", "runuser (util-linux) runs initdb as postgres")
    c = Cluster(base, free_port(), as_user)
    c.run([os.path.join(PGBIN, "initdb"), "-D", c.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
           "--no-sync"])
    c.run([os.path.join(PGBIN, "pg_ctl"), "-D", c.data, "-l", os.path.join(base, "log"), "-w", "-t", "60", "-o",
           f"-p {c.port} -k {c.sock} -c listen_addresses='' -c fsync=off", "start"])
    try:
        c.psql("CREATE DATABASE shop", db="postgres")
        yield c
    finally:
        subprocess.run(c._cmd([os.path.join(PGBIN, "pg_ctl"), "-D", c.data, "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_pg_dump_stream_backup_and_restore(appliance: Appliance, tmp_path: Path) -> None:
    app = appliance
    tok = app.token("acme", "dbhost")
    app.start()
    with cluster() as src:
        src.psql("CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL, n numeric NOT NULL);"
                 "INSERT INTO items SELECT g, md5(g::text), g * 1.5 FROM generate_series(1, 60000) g;"
                 "CREATE TABLE docs (k text PRIMARY KEY, doc jsonb);"
                 "INSERT INTO docs SELECT 'k' || g, jsonb_build_object('g', g, 'sq', g * g) "
                 "FROM generate_series(1, 5000) g;")
        expected = src.psql(CHECK_SQL)
        assert expected.startswith("60000|")
        res = json.loads(app.agent(tok, "backup", "--stdin-name", "db.sql", "--", *src.dump_cmd(),
                                   cache=tmp_path / "cache").stdout)
        assert res["stats"]["files"] == 1 and res["stats"]["bytes"] > 1_000_000
        # A dump that fails fails the backup, and leaves no restore point.
        bad = app.agent(tok, "backup", "--stdin-name", "db.sql", "--", *src.dump_cmd()[:-1], "no_such_db",
                        cache=tmp_path / "cache", check=False)
        assert bad.returncode == 70, bad.stderr
    snaps = json.loads(app.agent(tok, "snapshots").stdout)
    assert len(snaps) == 1 and snaps[0]["paths"] == ["/db.sql"]
    target = tmp_path / "restored"
    app.agent(tok, "restore", "latest", str(target))
    dump = target / "db.sql"
    assert dump.stat().st_size > 1_000_000
    with cluster() as fresh:
        with open(dump, "rb") as f:  # fed on stdin: the postgres user cannot read the test's tmp dir
            fresh.run([os.path.join(PGBIN, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", fresh.sock, "-p",
                       str(fresh.port), "-U", "postgres", "-d", "shop"], stdin=f, text=False)
        assert fresh.psql(CHECK_SQL) == expected
