"""The unlocked-key cache in the kernel's user keyring (repo.keycache): real keyctl, no stand-ins."""

from __future__ import annotations

import json
import time

import pytest

from repo import keycache
from repo.crypto import KeyMaterial
from repo.errors import WrongPassphrase
from tests.util import ihb


def _entries() -> list[list[str]]:
    with open("/proc/keys") as f:
        return [line.split() for line in f if keycache.PREFIX in line]


@pytest.fixture
def wrapped(monkeypatch: pytest.MonkeyPatch) -> tuple[KeyMaterial, bytes]:
    monkeypatch.setenv("IHB_KEY_CACHE_SECONDS", "120")
    k = KeyMaterial.generate("aes-256-gcm")
    return k, k.wrap(b"right")


def test_unwrap_caches_the_key_for_the_right_passphrase_only(wrapped: tuple[KeyMaterial, bytes]) -> None:
    k, blob = wrapped
    assert keycache.get(blob, b"right") is None
    assert KeyMaterial.unwrap(blob, b"right").master == k.master
    assert keycache.get(blob, b"right") == k.master, "keyctl refused the cache: is the kernel keyring available?"
    # A wrong passphrase finds nothing and still fails the slow way; so does a different key file.
    assert keycache.get(blob, b"wrong") is None
    with pytest.raises(WrongPassphrase):
        KeyMaterial.unwrap(blob, b"wrong")
    assert keycache.get(KeyMaterial.generate("aes-256-gcm").wrap(b"right"), b"right") is None
    # Only the same uid may see or read it, and it expires.
    mine = [e for e in _entries() if e[8].startswith(keycache.PREFIX)]
    assert mine and all(e[4] == "3f3f0000" and e[3] != "perm" for e in mine)
    assert k.master.hex() not in open("/proc/keys").read()


def test_a_cached_key_is_what_unwrap_returns(wrapped: tuple[KeyMaterial, bytes]) -> None:
    k, blob = wrapped
    other = b"\x01" * len(k.master)
    keycache.put(blob, b"right", other)  # what the next unwrap gets, without scrypt
    assert KeyMaterial.unwrap(blob, b"right").master == other
    keycache.forget_all()
    assert KeyMaterial.unwrap(blob, b"right").master == k.master


def test_expiry_and_off_switch(wrapped: tuple[KeyMaterial, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    k, blob = wrapped
    monkeypatch.setenv("IHB_KEY_CACHE_SECONDS", "1")
    KeyMaterial.unwrap(blob, b"right")
    assert keycache.get(blob, b"right") == k.master  # a hit restarts the timeout
    time.sleep(1.6)
    assert keycache.get(blob, b"right") is None
    monkeypatch.setenv("IHB_KEY_CACHE_SECONDS", "0")
    KeyMaterial.unwrap(blob, b"right")
    assert keycache.get(blob, b"right") is None
    monkeypatch.setenv("IHB_KEY_CACHE_SECONDS", "120")
    assert keycache.get(blob, b"right") is None, "with the cache off nothing was stored"


def test_key_forget_command(tmp_path, wrapped: tuple[KeyMaterial, bytes]) -> None:
    env = {"IHB_REPO": str(tmp_path / "r"), "IHB_PASSPHRASE": "pw", "IHB_KEY_CACHE_SECONDS": "120"}
    ihb("init", env=env)
    ihb("snapshots", env=env)
    blob = (tmp_path / "r" / "keys" / "repokey").read_bytes()
    assert keycache.get(blob, b"pw") is not None
    out = json.loads(ihb("key", "forget", "--json", env=env).stdout)
    assert out["count"] >= 1
    assert keycache.get(blob, b"pw") is None
    assert all("R" in e[1] or e[3] == "expd" for e in _entries() if e[8].startswith(keycache.PREFIX)), "left readable"
    ihb("snapshots", env=env)  # unlocks the slow way again
    assert keycache.get(blob, b"pw") is not None
