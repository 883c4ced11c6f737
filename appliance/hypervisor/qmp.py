"""Synchronous clients for QEMU's QMP monitor and for the guest agent, over UNIX sockets.

Both protocols are one JSON object per line. They differ in how a session starts:

* QMP greets with ``{"QMP": ...}`` and wants ``qmp_capabilities`` before any other command. It also
  sends asynchronous events (``SHUTDOWN``, ``BLOCK_JOB_COMPLETED`` ...) interleaved with replies, so
  the client keeps the events it reads while waiting for a reply and hands them out in
  :meth:`QMPClient.wait_event`.
* qemu-ga sits behind a virtio-serial chardev. The host end of that socket accepts bytes even when no
  agent runs in the guest, and an agent that restarts may see half a request. So a session begins
  with ``guest-sync-delimited``: a 0xFF byte resets the agent's parser, and its reply is preceded by
  0xFF, which marks where stale output ends (see QEMU's ``docs/interop/qemu-ga``).

Every blocking call has a deadline; a timeout raises :class:`TimeoutError`. Each request carries an
``id`` so that a late reply to a request that timed out is dropped instead of being taken as the reply
to the next one. The clients are not thread-safe: one owner per socket.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Self

__all__ = [
    "DEFAULT_TIMEOUT",
    "ExecResult",
    "GuestAgent",
    "QMPClient",
    "QMPConnectionError",
    "QMPError",
    "qemu_accel",
]

#: Seconds a call may block when the caller gives no timeout. Generous because TCG guests are slow.
DEFAULT_TIMEOUT = 30.0

_DELIMITER = b"\xff"
_MAX_LINE = 64 * 1024 * 1024  # guest-file-read replies carry base64 data; refuse anything absurd

JsonDict = dict[str, Any]


class QMPError(Exception):
    """QEMU or the guest agent answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, cls: str = "GenericError", command: str | None = None) -> None:
        super().__init__(f"{command}: {desc} ({cls})" if command else f"{desc} ({cls})")
        self.desc = desc
        self.cls = cls
        self.command = command


class QMPConnectionError(ConnectionError):
    """The socket closed, or the peer sent something that is not the protocol."""


def qemu_accel() -> str:
    """Accelerator to pass to ``-accel``: "kvm" only with hardware-assisted KVM, else "tcg".

    ``QEMU_ACCEL`` overrides. A usable ``/dev/kvm`` is not enough: software-nested KVM (``kvm_pvm``,
    found on some cloud sandboxes) aborts or crawls on a stock kernel, far slower than TCG. Only the
    vendor modules mean the CPU does the virtualization.
    """
    forced = os.environ.get("QEMU_ACCEL", "").strip()
    if forced:
        return forced
    hardware = os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd")
    if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out waiting for {what}")
    return left


def _connect_unix(path: str, deadline: float, alive: Callable[[], bool] | None) -> socket.socket:
    """Connect, retrying while the socket does not exist yet: QEMU creates it some time after exec."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if alive is not None and not alive():
                why = "no such socket" if isinstance(exc, FileNotFoundError) else "connection refused"
                raise QMPConnectionError(f"{path}: {why}; the QEMU process that would serve it is not running") from exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out connecting to {path}") from exc
            time.sleep(0.02)
        except BaseException:
            sock.close()
            raise


class _JsonStream:
    """Newline-delimited JSON over a stream socket, with deadlines on every read and write."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._name = name
        self._buf = bytearray()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def send_raw(self, data: bytes, deadline: float) -> None:
        # socket.sendall with a socket timeout: a peer that stops reading cannot block us forever
        self._sock.settimeout(_left(deadline, f"{self._name} to accept data"))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise TimeoutError(f"timed out writing to {self._name}") from None
        except OSError as exc:
            raise QMPConnectionError(f"{self._name}: {exc}") from exc

    def send(self, msg: Mapping[str, Any], deadline: float) -> None:
        self.send_raw(json.dumps(msg).encode() + b"\n", deadline)

    def _fill(self, deadline: float, what: str) -> None:
        ready, _, _ = select.select([self._sock], [], [], _left(deadline, what))
        if not ready:
            raise TimeoutError(f"timed out waiting for {what}")
        try:
            chunk = self._sock.recv(65536)
        except OSError as exc:
            raise QMPConnectionError(f"{self._name}: {exc}") from exc
        if not chunk:
            raise QMPConnectionError(f"{self._name}: connection closed by peer")
        self._buf += chunk

    def skip_to_delimiter(self, deadline: float) -> None:
        """Drop everything up to and including the next 0xFF (guest-sync-delimited)."""
        while (i := self._buf.find(_DELIMITER)) < 0:
            self._buf.clear()
            self._fill(deadline, f"{self._name} sync delimiter")
        del self._buf[: i + 1]

    def read_line(self, deadline: float, what: str) -> bytes:
        while (i := self._buf.find(b"\n")) < 0:
            if len(self._buf) > _MAX_LINE:
                raise QMPConnectionError(f"{self._name}: line longer than {_MAX_LINE} bytes")
            self._fill(deadline, what)
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        return line

    def read_message(self, deadline: float, what: str) -> JsonDict:
        while True:
            # a stray 0xFF (the agent echoes delimiters) is never part of JSON
            line = self.read_line(deadline, what).strip(b"\xff \t\r")
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError as exc:
                raise QMPConnectionError(f"{self._name}: not JSON: {line[:200]!r}") from exc
            if not isinstance(msg, dict):
                raise QMPConnectionError(f"{self._name}: not a JSON object: {line[:200]!r}")
            return msg


def _raise_error(msg: JsonDict, command: str) -> None:
    err = msg.get("error")
    if isinstance(err, dict):
        raise QMPError(str(err.get("desc", "")), str(err.get("class", "GenericError")), command)


class QMPClient:
    """QMP over a UNIX socket (``-qmp unix:PATH,server=on,wait=off``).

    ``execute("query-status")`` returns the ``return`` member; QMP argument names with dashes go
    through a dict: ``execute("blockdev-del", **{"node-name": "n0"})``. The keyword ``timeout`` is
    the client's own and is never sent.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.greeting: JsonDict | None = None
        self._stream: _JsonStream | None = None
        self._events: list[JsonDict] = []
        self._ids = itertools.count(1)

    def connect(self, timeout: float | None = None, alive: Callable[[], bool] | None = None) -> Self:
        """Connect, read the greeting and leave capabilities negotiation mode.

        ``alive`` (e.g. ``lambda: proc.poll() is None``) stops the retries early when QEMU died.
        """
        deadline = _deadline(self.timeout if timeout is None else timeout)
        stream = _JsonStream(_connect_unix(self.path, deadline, alive), f"QMP {self.path}")
        try:
            greeting = stream.read_message(deadline, "QMP greeting")
            if "QMP" not in greeting:
                raise QMPConnectionError(f"QMP {self.path}: unexpected greeting {greeting!r}")
            self._stream = stream
            self.greeting = greeting
            self.execute("qmp_capabilities", timeout=_left(deadline, "qmp_capabilities"))
        except BaseException:
            stream.close()
            self._stream = None
            raise
        return self

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> Self:
        if self._stream is None:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require(self) -> _JsonStream:
        if self._stream is None:
            raise QMPConnectionError(f"QMP {self.path}: not connected")
        return self._stream

    def execute(self, command: str, /, *, timeout: float | None = None, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; raise :class:`QMPError` on an error reply."""
        stream = self._require()
        deadline = _deadline(self.timeout if timeout is None else timeout)
        req_id = next(self._ids)
        msg: JsonDict = {"execute": command, "id": req_id}
        if arguments:
            msg["arguments"] = arguments
        stream.send(msg, deadline)
        while True:
            reply = stream.read_message(deadline, f"reply to {command}")
            if "event" in reply:
                self._events.append(reply)
                continue
            if reply.get("id") != req_id:
                continue  # late reply to an earlier request that timed out
            _raise_error(reply, command)
            if "return" not in reply:
                raise QMPConnectionError(f"QMP {self.path}: reply without return: {reply!r}")
            return reply["return"]

    def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human monitor command (e.g. ``qemu-io``); its text output, often empty."""
        out = self.execute("human-monitor-command", timeout=timeout, **{"command-line": command_line})
        return str(out)

    def wait_event(
        self,
        name: str,
        timeout: float | None = None,
        match: Callable[[JsonDict], bool] | None = None,
    ) -> JsonDict:
        """Return (and consume) the first event called ``name`` that ``match`` accepts.

        Events that arrived earlier, e.g. while waiting for a command reply, count too.
        """
        deadline = _deadline(self.timeout if timeout is None else timeout)
        for i, event in enumerate(self._events):
            if event.get("event") == name and (match is None or match(event)):
                return self._events.pop(i)
        stream = self._require()
        while True:
            msg = stream.read_message(deadline, f"event {name}")
            if "event" not in msg:
                continue  # a late reply to a timed-out command
            if msg["event"] == name and (match is None or match(msg)):
                return msg
            self._events.append(msg)

    def events(self, name: str | None = None, *, clear: bool = True) -> list[JsonDict]:
        """Events received so far and not yet consumed (optionally only ``name``), oldest first."""
        picked = [e for e in self._events if name is None or e.get("event") == name]
        if clear:
            self._events = [e for e in self._events if not (name is None or e.get("event") == name)]
        return picked


@dataclass(frozen=True, slots=True)
class ExecResult:
    """Outcome of a program run in the guest through ``guest-exec``."""

    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes

    def check(self) -> Self:
        if self.exitcode != 0:
            raise QMPError(
                f"guest command failed: exit {self.exitcode} signal {self.signal} "
                f"stderr {self.stderr[-500:]!r}",
                "GuestExecFailed",
                "guest-exec",
            )
        return self


class GuestAgent:
    """qemu-ga over the host end of a virtio-serial chardev socket.

    QEMU side::

        -device virtio-serial-pci
        -chardev socket,path=PATH,server=on,wait=off,id=qga0
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0

    Call :meth:`ping` (or :meth:`sync`) before anything else; it waits for the agent to come up.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._stream: _JsonStream | None = None
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "big"))
        self._synced = False

    def connect(self, timeout: float | None = None, alive: Callable[[], bool] | None = None) -> Self:
        """Open the socket only; the agent may still be booting (see :meth:`sync`)."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        if self._stream is None:
            self._stream = _JsonStream(_connect_unix(self.path, deadline, alive), f"guest agent {self.path}")
            self._synced = False
        return self

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._synced = False

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def sync(self, timeout: float | None = None, attempt: float = 1.0) -> None:
        """Synchronize with the agent, retrying every ``attempt`` seconds until it answers.

        Requests sent before the agent opened its port stay queued and get answered later, each one
        with its own id; the ids let us ignore all of them but the current one.
        """
        deadline = _deadline(self.timeout if timeout is None else timeout)
        self.connect(timeout=_left(deadline, "guest agent socket"))
        stream = self._stream
        assert stream is not None
        while True:
            sync_id = next(self._ids)
            stream.send_raw(_DELIMITER, deadline)
            stream.send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}, deadline)
            try_until = min(deadline, time.monotonic() + attempt)
            try:
                while True:
                    stream.skip_to_delimiter(try_until)
                    try:
                        reply = stream.read_message(try_until, "guest-sync-delimited reply")
                    except QMPConnectionError as exc:
                        if "not JSON" in str(exc):
                            continue  # fragment of a reply to a request we gave up on
                        raise
                    if reply.get("return") == sync_id:
                        self._synced = True
                        return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"guest agent {self.path} did not answer guest-sync") from None

    def execute(self, command: str, /, *, timeout: float | None = None, **arguments: Any) -> Any:
        """Run one agent command; ``return`` value or :class:`QMPError`. Syncs first if needed."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        if not self._synced:
            self.sync(timeout=_left(deadline, f"guest agent sync before {command}"))
        stream = self._stream
        assert stream is not None
        req_id = next(self._ids)
        msg: JsonDict = {"execute": command, "id": req_id}
        if arguments:
            msg["arguments"] = arguments
        stream.send(msg, deadline)
        try:
            while True:
                reply = stream.read_message(deadline, f"guest agent reply to {command}")
                if "id" in reply and reply["id"] != req_id:
                    continue
                _raise_error(reply, command)
                return reply.get("return")
        except (TimeoutError, QMPConnectionError):
            self._synced = False  # the stream may now hold a late reply: resync next time
            raise

    def send_nowait(self, command: str, /, **arguments: Any) -> None:
        """Send a command whose success has no reply (``guest-shutdown``, ``guest-suspend-*``)."""
        if not self._synced:
            self.sync()
        stream = self._stream
        assert stream is not None
        msg: JsonDict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        stream.send(msg, _deadline(self.timeout))
        self._synced = False

    def ping(self, timeout: float | None = None) -> None:
        """Wait until the agent answers (sync + ``guest-ping``)."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        self.sync(timeout=_left(deadline, "guest agent"))
        self.execute("guest-ping", timeout=_left(deadline, "guest-ping"))

    def info(self) -> JsonDict:
        result: JsonDict = self.execute("guest-info")
        return result

    def fsfreeze_freeze(self, mountpoints: Iterable[str] | None = None, timeout: float | None = None) -> int:
        """Freeze guest file systems (all, or ``mountpoints``); returns how many were frozen.

        On ext4 the freeze also checkpoints the journal, so a copy taken now needs no recovery.
        """
        if mountpoints is None:
            return int(self.execute("guest-fsfreeze-freeze", timeout=timeout))
        return int(self.execute("guest-fsfreeze-freeze-list", timeout=timeout, mountpoints=list(mountpoints)))

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """Thaw every frozen file system; returns how many were thawed."""
        return int(self.execute("guest-fsfreeze-thaw", timeout=timeout))

    def fsfreeze_status(self) -> str:
        """``"thawed"`` or ``"frozen"``."""
        return str(self.execute("guest-fsfreeze-status"))

    def fstrim(self, minimum: int | None = None, timeout: float | None = None) -> JsonDict:
        """Discard unused blocks of guest file systems, so the image shrinks before a backup."""
        args: JsonDict = {} if minimum is None else {"minimum": minimum}
        result: JsonDict = self.execute("guest-fstrim", timeout=timeout, **args)
        return result

    def exec_command(
        self,
        argv: list[str],
        input: bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest, wait for it and return its exit status and output."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        args: JsonDict = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        if env is not None:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        pid = self.execute("guest-exec", timeout=_left(deadline, "guest-exec"), **args)["pid"]
        pause = 0.02
        while True:
            st = self.execute("guest-exec-status", timeout=_left(deadline, f"guest pid {pid}"), pid=pid)
            if st.get("exited"):
                return ExecResult(
                    exitcode=st.get("exitcode"),
                    signal=st.get("signal"),
                    stdout=base64.b64decode(st.get("out-data", "")),
                    stderr=base64.b64decode(st.get("err-data", "")),
                )
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.25)

    def file_write(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write ``data`` to a guest file through ``guest-file-*`` (no shell needed in the guest)."""
        handle = self.execute("guest-file-open", path=path, mode=mode)
        try:
            for off in range(0, len(data), 1 << 20):
                chunk: JsonDict = {"buf-b64": base64.b64encode(data[off : off + (1 << 20)]).decode()}
                self.execute("guest-file-write", handle=handle, **chunk)
            self.execute("guest-file-flush", handle=handle)
        finally:
            self.execute("guest-file-close", handle=handle)

    def file_read(self, path: str) -> bytes:
        """Read a whole guest file through ``guest-file-*``."""
        handle = self.execute("guest-file-open", path=path, mode="r")
        out = bytearray()
        try:
            while True:
                r = self.execute("guest-file-read", handle=handle, count=1 << 20)
                out += base64.b64decode(r.get("buf-b64", ""))
                if r.get("eof") or not r.get("count"):
                    return bytes(out)
        finally:
            self.execute("guest-file-close", handle=handle)
