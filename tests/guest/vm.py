"""Boot the ihb test guest under QEMU and drive it from tests.

The guest is built by ``build_guest.sh`` (see :func:`build_guest`): a Debian kernel plus a busybox
initramfs whose ``/init`` (``init.sh``) acts on ``ihb.action=marker|check|serve`` and prints every
line meant for the host with an ``IHBGUEST:`` prefix on the serial console.

:class:`GuestVM` starts ``qemu-system-x86_64`` with the serial console in a log file, a QMP socket,
a qemu-ga socket and the given disks. Each disk is a ``-blockdev`` whose node name is the disk name
and a ``virtio-blk-pci`` device whose id is the disk name too, so QMP ``transaction``,
``blockdev-backup`` and dirty bitmaps can address it directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from appliance.hypervisor.qmp import GuestAgent, QMPClient, QMPConnectionError, QMPError, qemu_accel

GUEST_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("/var/cache/ihb-test-guest")
#: Byte offset of partition 1 on the disks made by make_disk.sh / make_bootable_disk.sh.
PART_OFFSET = 1024 * 1024
GUEST_PREFIX = "IHBGUEST:"


class GuestError(RuntimeError):
    """The guest could not be built, or QEMU / the guest did not behave."""


@dataclass(frozen=True, slots=True)
class GuestKernel:
    """What build_guest.sh leaves in its cache directory."""

    cache_dir: Path
    vmlinux: Path  # uncompressed, PVH entry: the fast choice for -kernel under TCG
    vmlinuz: Path  # bzImage, what a bootloader loads
    initrd: Path
    build_seconds: float


@dataclass(frozen=True, slots=True)
class Disk:
    """One virtio disk: ``name`` is both the -blockdev node name and the device id."""

    name: str
    path: Path
    fmt: str = "raw"
    read_only: bool = False


DiskSpec = Disk | tuple[str, str | os.PathLike[str], str]


def _run(argv: Sequence[str | os.PathLike[str]], timeout: float, **env: str) -> str:
    proc = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise GuestError(
            f"{' '.join(map(str, argv))} failed with exit {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout + proc.stderr


def build_guest(cache_dir: str | os.PathLike[str] | None = None, timeout: float = 1200) -> GuestKernel:
    """Run build_guest.sh (a no-op when the cache is current) and describe its outputs."""
    cache = Path(cache_dir or os.environ.get("IHB_TEST_GUEST_CACHE") or DEFAULT_CACHE)
    t0 = time.monotonic()
    # PYTHON: the interpreter running the tests has lzma; a bare python3 on PATH may not
    _run(["bash", GUEST_DIR / "build_guest.sh", cache], timeout, PYTHON=sys.executable)
    kernel = GuestKernel(
        cache_dir=cache,
        vmlinux=cache / "vmlinux",
        vmlinuz=cache / "vmlinuz",
        initrd=cache / "initrd.gz",
        build_seconds=time.monotonic() - t0,
    )
    for f in (kernel.vmlinux, kernel.vmlinuz, kernel.initrd):
        if not f.is_file() or f.stat().st_size == 0:
            raise GuestError(f"build_guest.sh succeeded but {f} is missing")
    return kernel


def make_disk(
    out: str | os.PathLike[str], size_mb: int = 64, src_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Raw GPT disk, ext4 partition at :data:`PART_OFFSET` filled from ``src_dir`` (make_disk.sh)."""
    argv: list[str | os.PathLike[str]] = ["bash", GUEST_DIR / "make_disk.sh", out, str(size_mb)]
    if src_dir is not None:
        argv.append(src_dir)
    _run(argv, 300)
    return Path(out)


def make_bootable_disk(
    out: str | os.PathLike[str],
    kernel: GuestKernel,
    size_mb: int = 128,
    src_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Raw MBR disk booting through extlinux: first boot ``marker``, later boots ``check`` (root only)."""
    argv: list[str | os.PathLike[str]] = ["bash", GUEST_DIR / "make_bootable_disk.sh", out, str(size_mb)]
    if src_dir is not None:
        argv.append(src_dir)
    _run(argv, 600, IHB_TEST_GUEST_CACHE=str(kernel.cache_dir), PYTHON=sys.executable)
    return Path(out)


def debugfs_cat(image: str | os.PathLike[str], path: str, offset: int = PART_OFFSET) -> str | None:
    """Content of ``path`` in the ext4 at ``offset`` of a raw image, read by debugfs; None if absent.

    debugfs does not replay the journal: the image must come from a clean shutdown or a frozen guest.
    """
    proc = subprocess.run(
        ["debugfs", "-R", f"cat {path}", f"{os.fspath(image)}?offset={offset}"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0 or "File not found" in proc.stderr:
        return None
    return proc.stdout


def _as_disk(spec: DiskSpec) -> Disk:
    if isinstance(spec, Disk):
        return spec
    name, path, fmt = spec
    return Disk(name, Path(path), fmt)


class GuestVM:
    """A QEMU process running the test guest; use as a context manager.

    With ``kernel`` the guest boots ``-kernel/-initrd`` with ``ihb.action=action`` on the command
    line; with ``kernel=None`` it boots from the first disk (BIOS, e.g. a make_bootable_disk.sh
    image). ``paused=True`` passes ``-S``: QMP works, the CPU waits for ``cont``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        disks: Iterable[DiskSpec] = (),
        *,
        kernel: GuestKernel | None = None,
        action: str = "serve",
        append: str = "",
        agent: bool = True,
        paused: bool = False,
        memory_mb: int = 256,
        accel: str | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.disks = [_as_disk(d) for d in disks]
        self.kernel = kernel
        self.action = action
        self.append = append
        self.with_agent = agent
        self.paused = paused
        self.memory_mb = memory_mb
        self.accel = accel or qemu_accel()
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.serial_log = self.run_dir / "serial.log"
        self.qemu_log = self.run_dir / "qemu.log"
        # UNIX socket paths are limited to 107 bytes; pytest's tmp_path can be longer
        self._sock_dir = Path(tempfile.mkdtemp(prefix="ihbvm-", dir="/tmp"))
        self.qmp_path = self._sock_dir / "qmp.sock"
        self.qga_path = self._sock_dir / "qga.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._qmp: QMPClient | None = None
        self._agent: GuestAgent | None = None

    # -- command line ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise GuestError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
        argv = [
            qemu,
            "-accel", self.accel,
            "-m", str(self.memory_mb),
            "-smp", "1",
            "-nographic",
            "-monitor", "none",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-no-reboot",  # a guest panic or reboot ends QEMU instead of looping
            "-nic", "none",
        ]  # fmt: skip
        if self.accel == "kvm":
            argv += ["-cpu", "host"]
        if self.kernel is not None:
            cmdline = f"console=ttyS0 quiet loglevel=3 panic=-1 ihb.action={self.action} {self.append}"
            argv += [
                "-kernel",
                str(self.kernel.vmlinux),
                "-initrd",
                str(self.kernel.initrd),
                "-append",
                cmdline.strip(),
            ]
        for i, d in enumerate(self.disks):
            # discard=unmap on both nodes: guest fstrim then punches holes in the image file
            node = {
                "node-name": d.name,
                "driver": d.fmt,
                "read-only": d.read_only,
                "discard": "unmap",
                "file": {
                    "driver": "file",
                    "filename": str(d.path),
                    "node-name": f"{d.name}-file",
                    "read-only": d.read_only,
                    "discard": "unmap",
                },
            }
            dev = f"virtio-blk-pci,drive={d.name},id={d.name}"
            if self.kernel is None and i == 0:
                dev += ",bootindex=0"
            argv += ["-blockdev", json.dumps(node), "-device", dev]
        if self.with_agent:
            argv += [
                "-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,path={self.qga_path},server=on,wait=off,id=qga0",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]  # fmt: skip
        if self.paused:
            argv.append("-S")
        return argv + self.extra_args

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log.unlink(missing_ok=True)
        argv = self.command()
        (self.run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        self.started_at = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._qmp = QMPClient(self.qmp_path, timeout=self.timeout).connect(alive=self.alive)
        except (TimeoutError, QMPConnectionError) as exc:
            self.stop()
            raise GuestError(f"QEMU did not bring up QMP: {exc}\n{self._tail(self.qemu_log)}") from exc
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def elapsed(self) -> float:
        """Seconds since QEMU was started."""
        return time.monotonic() - self.started_at

    @property
    def qmp(self) -> QMPClient:
        if self._qmp is None:
            raise GuestError("QEMU is not running")
        return self._qmp

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client; its socket is opened on first use. Call ``ping()`` first."""
        if not self.with_agent:
            raise GuestError("GuestVM was started with agent=False")
        if self._agent is None:
            self._agent = GuestAgent(self.qga_path, timeout=self.timeout).connect(alive=self.alive)
        return self._agent

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for QEMU to exit by itself (the guest powered off); its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"QEMU still running after {timeout}s\n{self._tail(self.serial_log)}"
            ) from None

    def powerdown(self, timeout: float = 30.0) -> int:
        """ACPI power button (``system_powerdown``): the guest unmounts and powers off. Exit status."""
        if self.alive():
            try:
                self.qmp.execute("system_powerdown")
            except (QMPConnectionError, OSError):
                pass  # QEMU was already on its way out
        return self.wait_exit(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """QMP ``quit`` (persistent bitmaps get written), then SIGKILL if QEMU hangs on."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None and self._qmp is not None:
                try:
                    self._qmp.execute("quit", timeout=timeout)
                except (QMPConnectionError, QMPError, TimeoutError, OSError):
                    pass  # the socket closes as QEMU exits; the reply may not make it
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        for client in (self._agent, self._qmp):
            if client is not None:
                client.close()
        self._agent = None
        self._qmp = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        return rc

    # -- serial console -------------------------------------------------------------------------

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def guest_lines(self) -> list[str]:
        """The ``IHBGUEST:`` lines so far, prefix removed. Firmware escape codes may precede the prefix."""
        return [
            line.split(GUEST_PREFIX, 1)[1].strip()
            for line in self.serial_text().splitlines()
            if GUEST_PREFIX in line
        ]

    def wait_serial(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until the serial log's complete lines match ``pattern`` (a regular expression); the match.

        Fails fast when QEMU exits without printing it.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive()  # read after checking, so the last output counts
            text = self.serial_text()
            if not exited:  # complete lines only: a line still arriving matched with its capture cut short
                text = text[: text.rfind("\n") + 1]
            m = rx.search(text)
            if m:
                return m
            if exited:
                raise GuestError(
                    f"QEMU exited (rc={self.proc.returncode if self.proc else None}) before "
                    f"{rx.pattern!r} appeared\n{self._tail(self.serial_log)}\n{self._tail(self.qemu_log)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{rx.pattern!r} not on the serial console after {timeout}s\n"
                    f"{self._tail(self.serial_log)}"
                )
            time.sleep(0.05)

    @staticmethod
    def _tail(path: Path, n: int = 30) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"({path.name}: none)"
        return f"--- last lines of {path.name} ---\n" + "\n".join(lines[-n:])
