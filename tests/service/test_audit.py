"""The audit log detects an edited, deleted, reordered or cut-off entry; appends survive torn lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.jobs import state_dir
from tests.util import ihb


def _log(tmp_path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(str(tmp_path / "state"))
    for i in range(n):
        log.append(["alice", "bob"][i % 2], ["request-unlock", "approve-unlock", "unlock"][i % 3], f"snap{i}",
                   {"i": i, "note": "ünïcode"})
    return log


def _lines(log: AuditLog) -> list[str]:
    return Path(log.path).read_text().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[str]) -> None:
    Path(log.path).write_text("".join(lines))


def test_intact_chain_verifies(tmp_path: Path) -> None:
    log = _log(tmp_path)
    res = log.verify()
    assert res.ok and res.entries == 6
    assert [e["seq"] for e in log.entries()] == list(range(6))


@pytest.mark.parametrize("tamper", ["edit", "edit-and-rehash-without-key", "delete-middle", "reorder", "truncate",
                                    "insert"])
def test_tampering_is_detected(tmp_path: Path, tamper: str) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    if tamper == "edit":
        lines[2] = lines[2].replace('"actor":"alice"', '"actor":"mallory"')
    elif tamper == "edit-and-rehash-without-key":
        import blake3

        e = json.loads(lines[2])
        e["target"] = "other"
        e["hash"] = blake3.blake3(json.dumps({k: v for k, v in e.items() if k != "hash"}, sort_keys=True,
                                             separators=(",", ":")).encode()).hexdigest()
        lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
    elif tamper == "delete-middle":
        del lines[3]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "truncate":
        lines = lines[:-1]
    elif tamper == "insert":
        lines.insert(2, lines[2])
    _write(log, lines)
    res = log.verify()
    assert not res.ok, tamper
    assert res.problems


def test_append_after_torn_line_keeps_going_and_reports_it(tmp_path: Path) -> None:
    log = _log(tmp_path, 2)
    with open(log.path, "a") as f:
        f.write('{"seq": 2, "actor": "x"')  # a crash mid-write
    log.append("carol", "lock", "s")
    entries = list(log.entries())
    assert entries[-1]["seq"] == 2 and entries[-1]["actor"] == "carol"
    assert [p for p in log.verify().problems if "not valid JSON" in p]


def test_cli_verify_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IHB_DATA_DIR", str(tmp_path / "data"))
    log = AuditLog(state_dir())
    log.append("alice", "lock", "s1")
    log.append("bob", "approve-unlock", "s1")
    assert ihb("audit", "verify").returncode == 0
    listed = json.loads(ihb("audit", "--json").stdout)
    assert [e["actor"] for e in listed] == ["alice", "bob"]
    lines = _lines(log)
    _write(log, [lines[1], lines[0]])
    p = ihb("audit", "verify", check=False)
    assert p.returncode == 63 and b"TAMPERING" in p.stdout
