"""The audit log: an append-only, hash-chained record of who asked for, approved, refused or did what.

Why a chain: the log is evidence ("who unlocked this restore point, who approved the restore of that
tenant's mailbox"), so editing, deleting or reordering entries after the fact must be detectable by
anyone running ``ihb audit verify``.

Format: JSON lines in ``<state dir>/audit.log``. Entry ``n`` is
``{"seq": n, "time": ISO-8601, "time_ns", "actor", "action", "target", "details", "prev", "hash"}`` with
``prev`` the hash of entry ``n-1`` (64 zeros for the first) and
``hash = keyed-BLAKE3(key, canonical JSON of the entry without "hash")``. The key (``audit.key``, 0600,
created with the log) means an attacker who can write the file but not read the key cannot forge a
consistent chain; root on the appliance can, which is why ``audit.head`` (last seq and hash, replaced
atomically after every append) should also be copied off the appliance by monitoring.
``verify`` reports an edited entry (its hash no longer matches), a deleted or reordered one (``seq``
gap or ``prev`` mismatch) and a truncated tail (``audit.head`` is ahead of the last entry).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import blake3

from appliance.config import Config
from appliance.statefile import locked_append, write_json
from repo.errors import IhbError

ZERO = "0" * 64


class AuditTampered(IhbError):
    """The audit log does not verify: entries were edited, deleted, reordered or cut off."""

    exit_code = 63


def _canonical(entry: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "hash"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str).encode()


@dataclass
class VerifyResult:
    entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, "audit.log")
        self.head_path = os.path.join(directory, "audit.head")
        self.key_path = os.path.join(directory, "audit.key")

    @classmethod
    def for_config(cls, cfg: Config | None = None) -> AuditLog:
        from appliance.jobs import state_dir

        return cls(state_dir(cfg))

    def _key(self, create: bool) -> bytes:
        try:
            with open(self.key_path, "rb") as f:
                return bytes.fromhex(f.read().decode().strip())
        except FileNotFoundError:
            if not create:
                raise
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return self._key(False)

    def _hash(self, key: bytes, entry: Mapping[str, Any]) -> str:
        return blake3.blake3(_canonical(entry), key=key).hexdigest()

    def _last(self) -> tuple[int, str]:
        """(seq, hash) of the last complete entry (the tail of the file, not the head file)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                back = min(size, 1 << 16)
                while True:
                    f.seek(size - back)
                    lines = f.read(back).splitlines()
                    complete = [ln for ln in lines if ln.strip()]
                    if len(complete) >= 2 or back == size:
                        break
                    back = min(size, back * 4)
        except FileNotFoundError:
            return -1, ZERO
        for ln in reversed(complete):
            try:
                e = json.loads(ln)
                return int(e["seq"]), str(e["hash"])
            except (ValueError, KeyError):
                continue
        return -1, ZERO

    def append(self, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None,
               now_ns: int | None = None) -> dict[str, Any]:
        key = self._key(create=True)
        with locked_append(self.path) as fd:
            seq, prev = self._last()
            t = time.time_ns() if now_ns is None else now_ns
            entry: dict[str, Any] = {
                "seq": seq + 1, "time": _dt.datetime.fromtimestamp(t / 1e9, tz=_dt.UTC).isoformat().replace("+00:00", "Z"),
                "time_ns": t, "actor": actor, "action": action, "target": target,
                "details": json.loads(json.dumps(dict(details or {}), default=str)), "prev": prev}
            entry["hash"] = self._hash(key, entry)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # a line torn by a crash stays visible to verify, on its own
            os.write(fd, json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            os.fsync(fd)
            write_json(self.head_path, {"seq": entry["seq"], "hash": entry["hash"]})
        return entry

    def entries(self) -> Iterator[dict[str, Any]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                if raw.strip():
                    try:
                        yield json.loads(raw)
                    except ValueError:
                        yield {"_unreadable": raw.decode(errors="replace")}

    def verify(self) -> VerifyResult:
        res = VerifyResult()
        try:
            key = self._key(create=False)
        except FileNotFoundError:
            if os.path.exists(self.path):
                res.problems.append(f"the key {self.key_path} is missing: the log cannot be verified")
            return res
        prev_hash, expect = ZERO, 0
        for e in self.entries():
            res.entries += 1
            if "_unreadable" in e:
                res.problems.append(f"entry after seq {expect - 1} is not valid JSON (edited or torn)")
                continue
            seq = e.get("seq")
            if seq != expect:
                kind = "missing (deleted)" if isinstance(seq, int) and seq > expect else "out of order or duplicated"
                res.problems.append(f"expected entry {expect}, found {seq}: entries {kind}")
            if e.get("prev") != prev_hash:
                res.problems.append(f"entry {seq}: does not follow entry {expect - 1} (chain broken: deleted, "
                                    "inserted or reordered entries)")
            if self._hash(key, e) != e.get("hash"):
                res.problems.append(f"entry {seq}: content does not match its hash (edited)")
            prev_hash = str(e.get("hash"))
            expect = (seq + 1) if isinstance(seq, int) else expect + 1
        try:
            with open(self.head_path) as f:
                head = json.load(f)
            if int(head["seq"]) != expect - 1 or head["hash"] != prev_hash:
                res.problems.append(f"the log ends at entry {expect - 1} but {os.path.basename(self.head_path)} "
                                    f"records entry {head['seq']}: entries were cut off or the head was altered")
        except FileNotFoundError:
            if res.entries:
                res.problems.append(f"{self.head_path} is missing")
        except (ValueError, KeyError, TypeError):
            res.problems.append(f"{self.head_path} is damaged")
        return res


def actor_name(explicit: str | None = None) -> str:
    """Who is acting: --as, else the login behind sudo, else the OS user (the CLI trusts the local
    administrator; the server passes the authenticated user)."""
    if explicit:
        return explicit
    import getpass

    return os.environ.get("SUDO_USER") or getpass.getuser()
