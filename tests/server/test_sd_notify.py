"""`ihb serve` as a systemd Type=notify service: READY=1 arrives on a real AF_UNIX datagram socket
given as $NOTIFY_SOCKET only once the API accepts connections, STOPPING=1 on SIGTERM, and the unit
file says Type=notify."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.server.conftest import IHB, ROOT, Appliance

UNIT = ROOT / "packer/files/rootfs/etc/systemd/system/ihb-server.service"


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_and_stopping(appliance: Appliance, abstract: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="ihb-sd-") as d, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"@ihb-test-notify-{os.getpid()}" if abstract else os.path.join(d, "notify")  # paths < 108 bytes
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(60)
        with open(appliance.log, "wb") as log:
            proc = subprocess.Popen([*IHB, "serve", "--config", str(appliance.config)], stdout=log, stderr=log,
                                    env={**os.environ, "NOTIFY_SOCKET": name}, cwd=str(ROOT))
        try:
            msg = sock.recv(4096).decode()
            # at the moment READY=1 arrives the API already accepts connections and the fingerprint is out
            with socket.create_connection(("127.0.0.1", appliance.port), timeout=2):
                pass
            assert msg.splitlines() == ["READY=1", f"STATUS=listening on https://127.0.0.1:{appliance.port}/"]
            assert "certificate fingerprint " in appliance.log.read_text()
            status, body = appliance.api("GET", "/api/v1/health")
            assert status == 200, body
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            assert proc.wait(timeout=30) == 0
            assert appliance.log.read_text().rstrip().endswith("stopped")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_no_notify_socket_and_a_dead_one_are_harmless(appliance: Appliance, tmp_path: Path) -> None:
    """Outside systemd nothing is sent; a NOTIFY_SOCKET nobody listens on is logged, never fatal."""
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    with open(appliance.log, "wb") as log:
        proc = subprocess.Popen([*IHB, "serve", "--config", str(appliance.config)], stdout=log, stderr=log, env=env,
                                cwd=str(ROOT))
    appliance.proc = proc
    try:
        deadline = time.monotonic() + 60
        while not appliance._listening():
            assert proc.poll() is None, appliance.log.read_text()
            assert time.monotonic() < deadline, appliance.log.read_text()
            time.sleep(0.05)
        appliance.stop()
        assert "cannot notify systemd" in appliance.log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unit_is_type_notify() -> None:
    text = UNIT.read_text()
    assert "\nType=notify\n" in text and "NotifyAccess=main" in text
    assert "wait-listen" not in text and "ExecStart=/opt/ihb/venv/bin/ihb serve" in text
    assert "AF_UNIX" in text.split("RestrictAddressFamilies=", 1)[1].splitlines()[0]  # the notify socket
