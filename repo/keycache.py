"""Unwrapped repository keys kept for a while in the kernel's user keyring.

Unwrapping the key file costs a deliberate scrypt (N=2^17: ~0.4 s and 128 MiB) on every command. An
appliance runs many short commands against the same repository (scheduled incrementals every few
minutes, `snapshots`, `mount`, restores), so, like ssh-agent, the master key is kept after a successful
unwrap: in the kernel (keyctl "user" keys: never written to disk or swap by us, gone on reboot),
readable only by the same user id, expiring IHB_KEY_CACHE_SECONDS (default 3600) after its last use.
IHB_KEY_CACHE_SECONDS=0 turns it off; `ihb key forget` drops every cached key at once.

An entry is found by a digest of the key file's bytes *and* the passphrase, so a wrong passphrase never
finds it (it falls through to scrypt and fails there), a new key file or passphrase is a new entry, and
the description alone tells nothing to a process that cannot also read the key. Where the kernel or a
sandbox refuses keyctl (seccomp, quota), every call here quietly does nothing: the cache only saves time.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import blake3

PREFIX = "ihb-key:"
DEFAULT_SECONDS = 3600
_KEY_SPEC_USER_KEYRING = -4
_KEYCTL_REVOKE, _KEYCTL_SETPERM, _KEYCTL_SEARCH, _KEYCTL_READ, _KEYCTL_SET_TIMEOUT = 3, 5, 10, 11, 15
_KEYCTL_UNLINK = 9
_PERM_OWNER_ALL = 0x3F3F0000  # possessor and same uid: view/read/write/search/link/setattr; others nothing
_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl


def seconds() -> int:
    v = os.environ.get("IHB_KEY_CACHE_SECONDS", "")
    return int(v) if v.isdigit() else DEFAULT_SECONDS


@functools.cache
def _syscall() -> tuple[ctypes.CDLL, int, int] | None:
    nums = _SYSCALLS.get(platform.machine())
    if nums is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, *nums


def _libc() -> tuple[ctypes.CDLL, int, int] | None:
    return None if seconds() == 0 else _syscall()


def _description(key_file: bytes, passphrase: bytes) -> bytes:
    h = blake3.blake3(derive_key_context="ihb 2026 v1 key cache entry")  # type: ignore[call-arg]
    h.update(len(key_file).to_bytes(8, "little") + key_file + passphrase)
    return (PREFIX + h.hexdigest()[:40]).encode()


def get(key_file: bytes, passphrase: bytes) -> bytes | None:
    """The master key cached for this key file and passphrase, or None; a hit restarts its timeout."""
    lib = _libc()
    if lib is None:
        return None
    libc, _add_key, keyctl = lib
    kid = libc.syscall(keyctl, _KEYCTL_SEARCH, _KEY_SPEC_USER_KEYRING, b"user", _description(key_file, passphrase), 0)
    if kid < 0:
        return None
    buf = ctypes.create_string_buffer(256)
    n = libc.syscall(keyctl, _KEYCTL_READ, ctypes.c_long(kid), buf, ctypes.c_long(len(buf)))
    if n <= 0 or n > len(buf):
        return None
    libc.syscall(keyctl, _KEYCTL_SET_TIMEOUT, ctypes.c_long(kid), ctypes.c_long(seconds()))
    return buf.raw[:n]


def put(key_file: bytes, passphrase: bytes, master: bytes) -> None:
    lib = _libc()
    if lib is None:
        return
    libc, add_key, keyctl = lib
    kid = libc.syscall(add_key, b"user", _description(key_file, passphrase), master, ctypes.c_size_t(len(master)),
                       _KEY_SPEC_USER_KEYRING)
    if kid < 0:
        return
    # Readable by the same uid even when the user keyring is not in this process's session (services, cron).
    if (libc.syscall(keyctl, _KEYCTL_SETPERM, ctypes.c_long(kid), ctypes.c_long(_PERM_OWNER_ALL)) < 0
            or libc.syscall(keyctl, _KEYCTL_SET_TIMEOUT, ctypes.c_long(kid), ctypes.c_long(seconds())) < 0):
        libc.syscall(keyctl, _KEYCTL_REVOKE, ctypes.c_long(kid))  # never keep one without its timeout


def forget_all() -> int:
    """Revoke every cached ihb key of this user (they are no longer readable at once); returns how many."""
    n = 0
    try:
        with open("/proc/keys") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    lib = _syscall()
    if lib is None:
        return 0
    libc, _add_key, keyctl = lib
    for line in lines:
        parts = line.split()
        if len(parts) >= 9 and parts[7] == "user" and parts[8].startswith(PREFIX):
            kid = int(parts[0], 16)
            if libc.syscall(keyctl, _KEYCTL_REVOKE, ctypes.c_long(kid)) == 0:
                libc.syscall(keyctl, _KEYCTL_UNLINK, ctypes.c_long(kid), _KEY_SPEC_USER_KEYRING)
                n += 1
    return n
