"""The appliance image: the Packer template, and the locally built image booted under QEMU.

- ``packer fmt -check`` and ``packer validate`` on ``packer/appliance.pkr.hcl``. These fail,
  never skip, when packer is missing (Debian 12: ``apt-get install packer``, 1.6.6).
- The image built by ``packer/build-local.sh`` (debootstrap, cached under
  ``$IHB_BUILD_CACHE``, default ``/var/cache/ihb-build``) boots under QEMU from its own boot
  loader, with a blank data disk and user networking that forwards SSH and the API port to
  random ports on 127.0.0.1. One boot serves all the checks of this module; the boot times
  are printed and written to ``boot-report.json`` beside the image.

The boot test needs root (debootstrap, chroot, loop mount), qemu-system-x86_64, ssh and
the network to the Debian mirror and PyPI for a cold build. It uses KVM only when
kvm_intel or kvm_amd is loaded (IHB_QEMU_ACCEL=kvm|tcg overrides); otherwise TCG.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
PACKER_DIR = PROJECT / "packer"
TEMPLATE = PACKER_DIR / "appliance.pkr.hcl"
BUILD_LOCAL = PACKER_DIR / "build-local.sh"
CACHE = Path(os.environ.get("IHB_BUILD_CACHE", "/var/cache/ihb-build"))
IMAGE_DIR = CACHE / "output"
API_PORT = 8443

BUILD_TIMEOUT = 45 * 60  # cold: debootstrap + updates + pyfuse3 compile; warm: seconds
BOOT_TIMEOUT = 420  # QEMU start to "systemctl is-system-running --wait" returning
API_TIMEOUT = 30  # boot finished to the API answering TLS (it listens before the boot ends)


def packer() -> str:
    path = shutil.which("packer")
    if path is None:
        pytest.fail(
            "packer is not installed: the template cannot be checked. "
            "Install it with 'apt-get install packer' (Debian 12 ships packer 1.6.6)."
        )
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------


def test_packer_fmt_check() -> None:
    r = run([packer(), "fmt", "-check", "-diff", "."], cwd=PACKER_DIR)
    assert r.returncode == 0, f"packer fmt -check found unformatted files:\n{r.stdout}{r.stderr}"


def test_packer_validate(tmp_path: Path) -> None:
    # With the defaults, except the checksum: the default checksum is a file on
    # cloud.debian.org, which validate would fetch.
    offline_checksum = "sha512:" + "0" * 128
    r = run(
        [
            packer(),
            "validate",
            "-var",
            f"base_image_checksum={offline_checksum}",
            "-var",
            f"output_dir={tmp_path / 'out'}",
            ".",
        ],
        cwd=PACKER_DIR,
    )
    assert r.returncode == 0, f"packer validate failed:\n{r.stdout}{r.stderr}"
    # The offline form documented for a local base image.
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"")
    r = run(
        [
            packer(),
            "validate",
            "-var",
            f"base_image={base}",
            "-var",
            "base_image_checksum=none",
            "-var",
            "accelerator=kvm",
            "-var",
            "disk_size=8G",
            "-var",
            "data_disk_size=100G",
            "-var",
            f"output_dir={tmp_path / 'out2'}",
            ".",
        ],
        cwd=PACKER_DIR,
    )
    assert r.returncode == 0, f"packer validate (local base image) failed:\n{r.stdout}{r.stderr}"


def test_packer_validate_rejects_a_broken_template(tmp_path: Path) -> None:
    # validate really checks: a wrongly typed variable value is an error.
    r = run(
        [
            packer(),
            "validate",
            "-var",
            "memory=lots",
            "-var",
            "base_image_checksum=none",
            "-var",
            f"output_dir={tmp_path / 'out'}",
            ".",
        ],
        cwd=PACKER_DIR,
    )
    assert r.returncode != 0, "packer validate accepted memory=lots"


def test_provisioning_scripts_are_shared_and_sound() -> None:
    scripts = sorted(p.name for p in (PACKER_DIR / "scripts").glob("[0-9][0-9]-*.sh"))
    assert scripts[0] == "10-packages.sh" and scripts[-1] == "90-cleanup.sh", scripts
    text = TEMPLATE.read_text()
    # Packer takes the same glob as build-local.sh, so both run the same scripts.
    assert 'fileset(path.root, "scripts/[0-9][0-9]-*.sh")' in text
    assert '"$HERE"/scripts/[0-9][0-9]-*.sh' in BUILD_LOCAL.read_text()
    shell_files = [
        *(PACKER_DIR / "scripts").glob("*.sh"),
        BUILD_LOCAL,
        PACKER_DIR / "make-source-tarball.sh",
        *(PACKER_DIR / "files/rootfs/usr/lib/ihb").iterdir(),
    ]
    for f in shell_files:
        assert os.access(f, os.X_OK), f"{f} is not executable"
        r = run(["bash", "-n", str(f)])
        assert r.returncode == 0, f"{f}: {r.stderr}"
    units = PACKER_DIR / "files/rootfs/etc/systemd/system"
    for name in (
        "ihb-server.service",
        "ihb-mount.service",
        "ihb-firstboot.service",
        "ihb-datadisk.service",
        "ihb-scheduler.service",
        "ihb-scheduler.timer",
    ):
        assert (units / name).is_file(), name
    if shutil.which("systemd-analyze"):
        r = run(["systemd-analyze", "verify", "--man=no", *map(str, sorted(units.iterdir()))])
        # only complaints about our own units count (the host lacks /opt/ihb, ssh.service...)
        bad = [
            ln
            for ln in r.stderr.splitlines()
            if "ihb-" in ln
            and "not executable" not in ln
            and "No such file" not in ln
            and "/opt/ihb" not in ln
            and "/usr/lib/ihb" not in ln
        ]
        assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------
# The local image, booted
# --------------------------------------------------------------------------------------


def _accel() -> str:
    forced = os.environ.get("IHB_QEMU_ACCEL")
    if forced:
        return forced
    hw = Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()
    return "kvm" if hw and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _cli_has(*words: str) -> bool:
    """True once `ihb WORDS...` exists in the project source: then the image must run it."""
    r = run([sys.executable, "-m", "appliance.cli", *words, "--help"], cwd=PROJECT, timeout=120)
    return r.returncode == 0


# The units that run an ihb command (written by other issues), and that command.
UNIT_COMMANDS = {
    "ihb-server.service": ("serve",),
    "ihb-mount.service": ("mount",),
    "ihb-scheduler.service": ("jobs", "run-due"),
}


class Guest:
    """The booted appliance: QEMU process, forwarded ports, serial log, ssh helper."""

    def __init__(self, workdir: Path, image: Path, data_disk: Path | None = None) -> None:
        self.dir = workdir
        self.image = image
        self.data = data_disk or workdir / "data.qcow2"
        self.serial = workdir / "serial.log"
        self.key = workdir / "id_ed25519"
        self.ssh_port = _free_port()
        self.api_port = _free_port()
        self.blocked_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0
        self.times: dict[str, float | str | None] = {}
        self.fingerprint: str | None = None  # of the API's TLS certificate, once it answered

    def start(self) -> None:
        overlay = self.dir / "system.qcow2"
        data = self.data
        # a fresh system disk each time (copy-on-write over the built image)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image), "-F", "qcow2", str(overlay)],
            check=True,
        )
        if not data.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "8G"], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        accel = _accel()
        fwd = (
            f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,hostfwd=tcp:127.0.0.1:{self.api_port}-:{API_PORT},"
            f"hostfwd=tcp:127.0.0.1:{self.blocked_port}-:9999"
        )
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            accel,
            "-cpu",
            "max" if accel == "tcg" else "host",
            "-m",
            "2048",
            "-smp",
            "2",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{self.serial}",
            "-drive",
            f"file={overlay},format=qcow2,if=virtio",
            "-drive",
            f"file={data},format=qcow2,if=virtio",
            # restrict=on: the guest reaches nothing outside; the forwarded ports still work
            "-netdev",
            f"user,id=n0,restrict=on,{fwd}",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-fw_cfg",
            f"name=opt/ihb/root_authorized_keys,file={self.key}.pub",
        ]
        self.times["accelerator"] = accel
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def serial_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diag(self) -> str:
        out = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout:
            out = self.proc.stdout.read().decode(errors="replace")
        return f"qemu output: {out}\n--- serial console (last 60 lines) ---\n" + "\n".join(
            self.serial_text().splitlines()[-60:]
        )

    def wait_ssh_banner(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.alive():
                pytest.fail("QEMU exited during boot\n" + self.diag())
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=5) as s:
                    s.settimeout(5)
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            time.sleep(2)
        pytest.fail("no SSH banner in time\n" + self.diag())

    def ssh(self, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-p",
                str(self.ssh_port),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                "-o",
                "LogLevel=ERROR",
                "root@127.0.0.1",
                command,
            ],
            timeout=timeout,
        )
        if check and r.returncode != 0:
            pytest.fail(f"ssh {command!r} -> rc {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def tls_fingerprint(self, deadline: float) -> str | None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while time.monotonic() < deadline and self.alive():
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.api_port), timeout=10) as raw:
                    with ctx.wrap_socket(raw, server_hostname="ihb-appliance") as tls:
                        der = tls.getpeercert(binary_form=True)
                        if der:
                            return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
            time.sleep(3)
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.alive():
            with contextlib.suppress(Exception):
                self.ssh("systemctl poweroff", timeout=30, check=False)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def image() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the image build needs root (debootstrap, chroot, loop mount for extlinux)")
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install qemu-system-x86 qemu-utils openssh-client")
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "build-local.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        r = subprocess.run(
            [str(BUILD_LOCAL), "--install-deps", "--output", str(IMAGE_DIR)],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
        )
    text = log.read_text(errors="replace")
    if r.returncode != 0:
        pytest.fail(
            f"build-local.sh failed (rc {r.returncode}), log {log}:\n" + "\n".join(text.splitlines()[-40:])
        )
    print(f"\nbuild-local.sh: {time.monotonic() - t0:.0f}s ({text.strip().splitlines()[-1]})")
    return IMAGE_DIR / "ihb-appliance.qcow2"


def boot(g: Guest) -> None:
    """Start the guest and wait until systemd says the boot is over; record the times."""
    g.start()
    g.wait_ssh_banner(g.t0 + BOOT_TIMEOUT)
    g.times["ssh_banner_s"] = g.elapsed()
    remaining = max(30.0, g.t0 + BOOT_TIMEOUT - time.monotonic())
    state = g.ssh("systemctl is-system-running --wait", timeout=remaining, check=False).stdout.strip()
    g.times["boot_finished_s"] = g.elapsed()
    g.times["system_state"] = state
    # guest clock (since the kernel started): when the targets/units became active
    props = g.ssh(
        "for u in multi-user.target ssh.service ihb-firstboot.service ihb-server.service; do "
        "echo $u $(systemctl show -P ActiveEnterTimestampMonotonic $u); done",
        check=False,
    ).stdout
    for line in props.splitlines():
        unit, _, usec = line.partition(" ")
        if usec.strip().isdigit() and int(usec) > 0:
            g.times[f"guest_{unit}_active_s"] = round(int(usec) / 1e6, 1)
    g.times["systemd_analyze"] = g.ssh("systemd-analyze time", check=False).stdout.strip()
    # SERVER-DEPENDENT: the API answers TLS. ihb-server is ordered before multi-user.target and
    # counts as started once it listens, so when the boot is over it listens or it has failed.
    if _cli_has("serve"):
        g.fingerprint = g.tls_fingerprint(time.monotonic() + API_TIMEOUT)
        g.times["api_tls_s"] = g.elapsed() if g.fingerprint else None


REPORTS: dict[str, dict[str, object]] = {}


def _boot_dir(name: str) -> Path:
    # beside the image, not in pytest's tmp: the serial logs outlive the run for diagnosis
    d = CACHE / "boot-test" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


@pytest.fixture(scope="module")
def guest(image: Path):
    g = Guest(_boot_dir("first-boot"), image)
    try:
        boot(g)
        yield g
    finally:
        g.stop()
        REPORTS["first_boot"] = dict(g.times)
        print("\nappliance first boot:", json.dumps(g.times, indent=1))
        with contextlib.suppress(OSError):
            (IMAGE_DIR / "boot-report.json").write_text(json.dumps(REPORTS, indent=1) + "\n")


@pytest.mark.slow
def test_local_image_boots(guest: Guest) -> None:
    # multi-user reached; only the units that need unwritten ihb commands may have failed
    state = guest.times["system_state"]
    failed = set(
        guest.ssh("systemctl list-units --failed --plain --no-legend | awk '{print $1}'").stdout.split()
    )
    assert state in ("running", "degraded"), f"system state {state!r}\n{guest.diag()}"
    assert guest.ssh("systemctl is-active multi-user.target").stdout.strip() == "active"
    # SERVER-DEPENDENT: a unit whose ihb command is not in the source tree yet may fail;
    # once the command exists, the unit must not.
    allowed = {unit for unit, words in UNIT_COMMANDS.items() if not _cli_has(*words)}
    assert failed <= allowed, f"failed units: {sorted(failed)} (allowed while unwritten: {sorted(allowed)})"

    # first boot: credentials in a root-only file, and once on the console
    st = guest.ssh("stat -c '%a %U %G' /root/ihb-credentials.txt").stdout.split()
    assert st == ["600", "root", "root"], st
    cred = guest.ssh("cat /root/ihb-credentials.txt").stdout
    fields = dict(ln.split(": ", 1) for ln in cred.splitlines() if re.match(r"^[a-z0-9_]+: ", ln))
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fields["tls_sha256_fingerprint"]), cred
    assert len(fields["repository_passphrase"]) >= 40
    assert fields["admin_login"] == "ihbadmin"
    # SERVER-DEPENDENT: the steps that run ihb commands (init, key export, token create) are
    # "pending" until those commands exist; once they are in the source tree, none may be.
    if all(_cli_has(*w) for w in (("init",), ("key", "export"), ("token", "create"))):
        assert fields["pending"] == "none", cred
        assert fields["admin_token"] != "pending" and fields["repository_key_export"] == "|", cred
        assert guest.ssh("test -e /var/lib/ihb-firstboot/done && echo ok").stdout.strip() == "ok"
    serial = guest.serial_text()
    assert "===== IHB FIRST-BOOT CREDENTIALS" in serial
    assert fields["tls_sha256_fingerprint"] in serial
    # secrets never reach the journal
    journal = guest.ssh("journalctl -b --no-pager -o cat", timeout=180).stdout
    assert fields["repository_passphrase"] not in journal
    assert "ihb-firstboot: " in journal

    # the blank data disk was formatted and mounted at /srv/ihb; the layout is there
    src, fstype = guest.ssh("findmnt -n -o SOURCE,FSTYPE /srv/ihb", check=False).stdout.split() or ["", ""]
    assert (src, fstype) == ("/dev/vdb", "ext4")
    assert guest.ssh("blkid -s LABEL -o value /dev/vdb").stdout.strip() == "ihb-data"
    layout = guest.ssh(
        "stat -c '%n %U %a' /srv/ihb /srv/ihb/repo /srv/ihb/appliance /srv/ihb/appliance/tls/server.key"
    ).stdout.splitlines()
    assert layout == [
        "/srv/ihb ihb 750",
        "/srv/ihb/repo ihb 750",
        "/srv/ihb/appliance root 750",
        "/srv/ihb/appliance/tls/server.key root 640",
    ], layout
    # SERVER-DEPENDENT (ihb mount): the restore mount is up and root can read it (allow_other)
    if _cli_has("mount"):
        assert guest.ssh("findmnt -n -o FSTYPE /srv/ihb/mnt", check=False).stdout.strip() == "fuse.ihb"
        assert guest.ssh("ls /srv/ihb/mnt").returncode == 0

    # the package is installed in its venv
    assert guest.ssh(
        "/opt/ihb/venv/bin/python -c 'import importlib.metadata as m; print(m.version(\"interhost-backup\"))'"
    ).stdout.strip()
    assert guest.ssh("test -L /usr/local/bin/ihb && echo ok").stdout.strip() == "ok"

    # journald persistent, security updates enabled, timer scheduled, SSH host keys made here
    assert guest.ssh("ls /var/log/journal/*/system.journal").returncode == 0
    apt = guest.ssh("apt-config dump Unattended-Upgrade::Origins-Pattern APT::Periodic").stdout
    assert "label=Debian-Security" in apt and 'APT::Periodic::Unattended-Upgrade "1"' in apt
    assert 'label=Debian";' not in apt, "unattended-upgrades must take security updates only"
    assert (
        guest.ssh(
            "systemctl is-enabled unattended-upgrades.service apt-daily-upgrade.timer ihb-scheduler.timer"
        ).stdout.split()
        == ["enabled"] * 3
    )
    assert guest.ssh("ls /etc/ssh/ssh_host_ed25519_key").returncode == 0


@pytest.mark.slow
def test_local_image_firewall(guest: Guest) -> None:
    rules = guest.ssh("nft list ruleset").stdout
    assert "policy drop" in rules and "tcp dport 22 accept" in rules and "tcp dport 8443 accept" in rules
    # a service on another port answers inside the appliance but not from outside
    guest.ssh("systemd-run --unit=ihb-fwtest python3 -m http.server 9999 --bind 0.0.0.0")
    try:
        inside = guest.ssh(
            "for i in $(seq 30); do curl -s -o /dev/null -w '%{http_code}' "
            "http://127.0.0.1:9999/ && break; sleep 1; done",
            check=False,
        ).stdout
        assert inside.endswith("200"), inside
        got = b""
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", guest.blocked_port), timeout=5) as s:
                s.settimeout(10)
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                got = s.recv(100)
        assert not got.startswith(b"HTTP/"), f"port 9999 reachable from outside: {got!r}"
    finally:
        guest.ssh("systemctl stop ihb-fwtest", check=False)


@pytest.mark.slow
def test_local_image_api_answers_tls(guest: Guest) -> None:
    # SERVER-DEPENDENT: needs `ihb serve` (appliance server, another issue). Until the
    # source tree has it, this test is an expected failure with the reason below.
    if not _cli_has("serve"):
        active = guest.ssh("systemctl is-active ihb-server.service", check=False).stdout.strip()
        pytest.xfail(f"`ihb serve` is not in the source tree yet (ihb-server.service: {active})")
    fingerprint = guest.fingerprint or guest.tls_fingerprint(time.monotonic() + 30)
    if fingerprint is None:
        status = guest.ssh(
            "systemctl status --no-pager ihb-server.service; journalctl -b -u ihb-server "
            "--no-pager | tail -n 40",
            check=False,
        ).stdout
        pytest.fail(f"the API did not answer TLS on port {API_PORT}\n{status}")
    cred = guest.ssh("cat /root/ihb-credentials.txt").stdout
    assert f"tls_sha256_fingerprint: {fingerprint}" in cred, (
        "the server does not use the first-boot certificate"
    )
    assert guest.ssh("systemctl is-active ihb-server.service").stdout.strip() == "active"


@pytest.mark.slow
def test_agent_backup_from_the_host_lands_in_the_appliance(guest: Guest, tmp_path: Path) -> None:
    """An agent on the host backs up over the forwarded, pinned TLS port; the appliance has it."""
    fingerprint = guest.fingerprint or guest.tls_fingerprint(time.monotonic() + 60)
    assert fingerprint, "the API does not answer TLS"
    token = guest.ssh(
        "set -a; . /etc/default/ihb; set +a; setpriv --reuid=ihb --regid=ihb --init-groups "
        "env HOME=/var/lib/ihb /opt/ihb/venv/bin/ihb token create --tenant acme --host hostagent"
    ).stdout.strip().splitlines()[0]
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    src = tmp_path / "data"
    src.mkdir()
    (src / "payload.bin").write_bytes(os.urandom(300_000))
    (src / "note.txt").write_text("from the host\n")
    server = f"https://127.0.0.1:{guest.api_port}"
    agent = [sys.executable, "-m", "appliance.cli", "agent"]
    common = ["--server", server, "--token-file", str(token_file), "--fingerprint", fingerprint]
    env = {**os.environ, "IHB_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([*agent, "backup", *common, str(src)], check=True, env=env, cwd=PROJECT, capture_output=True,
                   timeout=600)
    listed = subprocess.run([*agent, "snapshots", *common, "--json"], check=True, env=env, cwd=PROJECT,
                            capture_output=True, text=True, timeout=120).stdout
    assert "hostagent" in listed
    out = tmp_path / "restored"
    subprocess.run([*agent, "restore", *common, "latest", str(out)], check=True, env=env, cwd=PROJECT,
                   capture_output=True, timeout=600)
    restored = out / str(src).lstrip("/")
    assert (restored / "payload.bin").read_bytes() == (src / "payload.bin").read_bytes()
    # and it is in the appliance's repository, seen from inside the VM
    snaps = guest.ssh("set -a; . /etc/default/ihb; set +a; setpriv --reuid=ihb --regid=ihb --init-groups "
                      "env HOME=/var/lib/ihb IHB_PASSPHRASE_FILE=$IHB_PASSPHRASE_FILE "
                      "/opt/ihb/venv/bin/ihb snapshots --json").stdout
    assert "hostagent" in snaps


@pytest.mark.slow
def test_new_system_disk_adopts_the_data_disk(guest: Guest, image: Path) -> None:
    """Image upgrade: a fresh system disk + the first boot's data disk keeps the repository.

    Runs last: it powers the first guest off and boots the image again on its data disk.
    """
    before = guest.ssh("cat /root/ihb-credentials.txt").stdout
    repo_before = guest.ssh("ls -A /srv/ihb/repo").stdout.split()
    guest.stop()
    g2 = Guest(_boot_dir("new-system-disk"), image, data_disk=guest.data)
    try:
        boot(g2)
        after = g2.ssh("cat /root/ihb-credentials.txt").stdout

        def field(text: str, name: str) -> str:
            m = re.search(rf"^{name}: (.*)$", text, re.M)
            assert m, f"{name} missing in\n{text}"
            return m.group(1)

        for name in ("tls_sha256_fingerprint", "repository_passphrase", "admin_token"):
            assert field(after, name) == field(before, name), name
        assert field(after, "admin_login_password") != field(before, "admin_login_password")
        assert g2.ssh("ls -A /srv/ihb/repo").stdout.split() == repo_before
        log = g2.ssh("journalctl -b -u ihb-firstboot -u ihb-datadisk --no-pager -o cat").stdout
        assert "existing repository at /srv/ihb/repo adopted" in log
        assert "data disk present" in log and "formatting" not in log
    finally:
        g2.stop()
        REPORTS["system_disk_swap_boot"] = dict(g2.times)
        print("\nappliance boot on a new system disk:", json.dumps(g2.times, indent=1))
