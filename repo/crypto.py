"""Key material and the blob envelope: keyed chunk ids, compression, authenticated encryption.

A 64-byte master key is generated per repository and stored wrapped by a passphrase through scrypt
(memory-hard). Purpose keys are derived from it with BLAKE3's key-derivation mode, each with its own
context string, so that the id key, the encryption key and the chunker seed never coincide.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import blake3
import zstandard

from . import format as fmt
from .errors import IntegrityError, InvalidArgument, WrongPassphrase


class _NoInvalidTag(Exception):
    pass


@functools.cache
def _openssl() -> tuple[Any, type[Exception]] | None:
    """The optional accelerator (``cryptography``'s AESGCM and its InvalidTag), imported on first use:
    commands that never seal or open anything (a network agent only compresses) skip its ~7 ms load."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return AESGCM, InvalidTag


ENCRYPTIONS = ("aes-256-gcm", "none")
KEYFILE_AAD = b"ihb1-keyfile"

# Production scrypt cost: N=2^17, r=8 (128 MiB, ~0.4 s here). Tests may weaken it explicitly.
SCRYPT_N = 1 << 17
SCRYPT_R = 8
SCRYPT_P = 1


def _kdf_n() -> int:
    return 1 << 10 if os.environ.get("IHB_TESTONLY_WEAK_KDF") == "1" else SCRYPT_N


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


class Aead:
    """AES-256-GCM, the one implementation every sealed object uses (blobs, the key file, tenant keys).

    OpenSSL (the ``cryptography`` package) when importable, ~10x faster than pycryptodome both ways
    (4.7 against 0.49 GB/s sealing 1 MiB here); pycryptodome otherwise. The bytes are identical
    (tested), so which one is installed never changes the format. ``open`` raises ValueError when
    authentication fails. Thread-safe.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        ossl = _openssl()
        self._fast = ossl[0](key) if ossl is not None else None
        self._invalid_tag: type[Exception] = ossl[1] if ossl is not None else _NoInvalidTag

    def seal(self, nonce: bytes, body: bytes | memoryview, aad: bytes) -> bytes:
        """Ciphertext followed by the 16-byte tag."""
        if self._fast is not None:
            return self._fast.encrypt(nonce, body, aad)
        from Crypto.Cipher import AES  # pycryptodome loads lazily: 35 ms of every command's start

        c = AES.new(self._key, AES.MODE_GCM, nonce=nonce)
        c.update(aad)
        ct, tag = c.encrypt_and_digest(body)
        return ct + tag

    def open_into(self, nonce: bytes, ct_tag: bytes | memoryview, aad: bytes, out: memoryview) -> None:
        """``open`` into ``out`` (exactly the plaintext's length), without allocating on the OpenSSL path."""
        if len(ct_tag) < fmt.TAG_LEN or len(out) != len(ct_tag) - fmt.TAG_LEN:
            raise ValueError("sealed data and output buffer do not match")
        if self._fast is not None:
            try:
                self._fast.decrypt_into(nonce, ct_tag, aad, out)
                return
            except self._invalid_tag:
                raise ValueError("authentication failed") from None
        out[:] = self.open(nonce, ct_tag, aad)

    def open(self, nonce: bytes, ct_tag: bytes | memoryview, aad: bytes) -> bytes:
        if len(ct_tag) < fmt.TAG_LEN:
            raise ValueError("sealed data is shorter than its tag")
        if self._fast is not None:
            try:
                return self._fast.decrypt(nonce, ct_tag, aad)
            except self._invalid_tag:
                raise ValueError("authentication failed") from None
        from Crypto.Cipher import AES

        c = AES.new(self._key, AES.MODE_GCM, nonce=nonce)
        c.update(aad)
        mv = memoryview(ct_tag)
        return c.decrypt_and_verify(mv[: -fmt.TAG_LEN], mv[-fmt.TAG_LEN :])


@dataclass(frozen=True)
class KeyMaterial:
    master: bytes
    encryption: str

    @classmethod
    def generate(cls, encryption: str) -> KeyMaterial:
        if encryption not in ENCRYPTIONS:
            raise InvalidArgument(f"unknown encryption {encryption!r}; choose one of {', '.join(ENCRYPTIONS)}")
        return cls(os.urandom(64), encryption)

    def derive(self, context: str, length: int = 32) -> bytes:
        h = blake3.blake3(derive_key_context=f"ihb 2026 v1 {context}")  # type: ignore[call-arg]
        h.update(self.master)
        return h.digest(length)

    # Serialisation of the key file (§4.1).
    def wrap(self, passphrase: bytes | None) -> bytes:
        if self.encryption == "none":
            doc: dict[str, Any] = {"version": 1, "kdf": "none", "encryption": "none", "master": _b64(self.master)}
        else:
            if not passphrase:
                raise InvalidArgument("an encrypted repository needs a non-empty passphrase")
            salt = os.urandom(16)
            n = _kdf_n()
            from Crypto.Protocol.KDF import scrypt

            kek = scrypt(passphrase, salt, 32, N=n, r=SCRYPT_R, p=SCRYPT_P)  # type: ignore[arg-type]
            nonce = os.urandom(fmt.NONCE_LEN)
            sealed = Aead(kek).seal(nonce, self.master, KEYFILE_AAD)  # type: ignore[arg-type]
            ct, tag = sealed[: -fmt.TAG_LEN], sealed[-fmt.TAG_LEN :]
            doc = {
                "version": 1,
                "kdf": "scrypt",
                "n": n,
                "r": SCRYPT_R,
                "p": SCRYPT_P,
                "salt": _b64(salt),
                "encryption": self.encryption,
                "nonce": _b64(nonce),
                "wrapped": _b64(ct),
                "tag": _b64(tag),
            }
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def unwrap(cls, data: bytes, passphrase: bytes | None) -> KeyMaterial:
        try:
            doc = json.loads(data)
            kdf = doc["kdf"]
            if kdf == "none":
                return cls(_unb64(doc["master"]), "none")
            if kdf != "scrypt":
                raise IntegrityError(f"key file uses unknown KDF {kdf!r}")
            salt, nonce, ct, tag = (_unb64(doc[k]) for k in ("salt", "nonce", "wrapped", "tag"))
            n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
            encryption = doc["encryption"]
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"the key file is damaged ({e}); import a saved key with `ihb key import`") from e
        if passphrase is None:
            from .errors import PassphraseRequired

            raise PassphraseRequired()
        from . import keycache

        cached = keycache.get(data, passphrase)
        if cached is not None and len(cached) == len(ct):
            return cls(cached, encryption)
        from Crypto.Protocol.KDF import scrypt

        kek = scrypt(passphrase, salt, 32, N=n, r=r, p=p)  # type: ignore[arg-type]
        try:
            master = Aead(kek).open(nonce, ct + tag, KEYFILE_AAD)  # type: ignore[arg-type]
        except ValueError:
            raise WrongPassphrase() from None
        keycache.put(data, passphrase, master)
        return cls(master, encryption)


_tls = threading.local()


def scratch(slot: str, n: int) -> memoryview:
    """A per-thread reusable buffer of ``n`` bytes (one per ``slot``) for data that does not outlive the
    call: the blob read path would otherwise allocate, page-fault in and free two or three fresh buffers
    per blob (measured: ~160 minor faults and ~400 us per 256 KiB chunk in this VM). Grows, never shrinks
    below 1 MiB; a caller must not keep the view."""
    buf = getattr(_tls, "scratch_" + slot, None)
    if buf is None or len(buf) < n:
        buf = bytearray(max(n, 1 << 20))
        setattr(_tls, "scratch_" + slot, buf)
    return memoryview(buf)[:n]


@functools.cache
def _bytearray_from_c() -> Any:
    import ctypes

    f = ctypes.pythonapi.PyByteArray_FromStringAndSize
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_ssize_t], ctypes.py_object
    return f


def uninitialized(n: int) -> bytearray:
    """A bytearray of ``n`` bytes that the caller overwrites entirely (decryption output): the C API
    creates it without zero-filling, which ``bytearray(n)`` costs (memset: ~6% of a mount's read CPU)."""
    return _bytearray_from_c()(None, n)  # type: ignore[no-any-return]


def _zc(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level.
    cs = getattr(_tls, "zc", None)
    if cs is None:
        cs = _tls.zc = {}
    c = cs.get(level)
    if c is None:
        c = cs[level] = zstandard.ZstdCompressor(level=level)
    return c


def zstd_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompression context (contexts are not thread-safe; making one per blob costs)."""
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


class Envelope:
    """Turns plaintext blobs into stored bytes and back (§3.3, §4).

    Thread-safe: workers call ``seal``/``open`` concurrently; the C code (BLAKE3, zstd, AES) releases
    the GIL so both cores work.
    """

    def __init__(self, key: KeyMaterial, compression_level: int = 3) -> None:
        self.encryption = key.encryption
        self._id_key = key.derive("chunk id")
        self._aead = Aead(key.derive("aead"))
        self._check_key = key.derive("plaintext check")
        self.chunker_seed = int.from_bytes(key.derive("chunker seed", 8), "little") & 0x7FFF_FFFF_FFFF_FFFF
        self.level = compression_level

    def chunk_id(self, data: bytes | memoryview) -> fmt.ChunkId:
        return fmt.ChunkId(blake3.blake3(data, key=self._id_key).digest())

    def compress(self, data: bytes | memoryview) -> bytes:
        """Compression byte + payload; data that zstd cannot shrink by 3% is stored raw."""
        if self.level > 0 and len(data) > 64:
            z = _zc(self.level).compress(data)
            if len(z) < len(data) - len(data) // 32:
                return bytes((fmt.Compression.ZSTD,)) + z
        return bytes((fmt.Compression.NONE,)) + bytes(data)

    def seal(self, kind: int, obj_id: bytes, body: bytes) -> bytes:
        """Encrypt (or checksum) an already compressed body."""
        aad = fmt.AAD_PREFIX + bytes((kind,)) + obj_id
        if self.encryption == "none":
            return body + blake3.blake3(aad + body, key=self._check_key).digest(fmt.PLAIN_CHECK_LEN)
        nonce = os.urandom(fmt.NONCE_LEN)
        return nonce + self._aead.seal(nonce, body, aad)

    def open(self, kind: int, obj_id: bytes, stored: bytes | memoryview) -> bytes:
        """Authenticate, decrypt and decompress; raises IntegrityError on any mismatch."""
        aad = fmt.AAD_PREFIX + bytes((kind,)) + obj_id
        if self.encryption == "none":
            body = bytes(stored[: -fmt.PLAIN_CHECK_LEN])
            check = bytes(stored[-fmt.PLAIN_CHECK_LEN :])
            if blake3.blake3(aad + body, key=self._check_key).digest(fmt.PLAIN_CHECK_LEN) != check:
                raise IntegrityError(f"blob {obj_id.hex()[:16]} failed its checksum (damaged data)")
        else:
            if len(stored) < fmt.NONCE_LEN + fmt.TAG_LEN + 1:
                raise IntegrityError(f"blob {obj_id.hex()[:16]} is truncated")
            body = scratch("plain", len(stored) - fmt.NONCE_LEN - fmt.TAG_LEN)  # decompress() copies out of it
            self._decrypt_into(aad, obj_id, stored, body)
        return self.decompress(body, obj_id)

    def _decrypt_into(self, aad: bytes, obj_id: bytes, stored: bytes | memoryview, out: memoryview) -> None:
        try:
            self._aead.open_into(bytes(stored[: fmt.NONCE_LEN]), memoryview(stored)[fmt.NONCE_LEN :], aad, out)
        except ValueError:
            raise IntegrityError(f"blob {obj_id.hex()[:16]} failed authentication (damaged or tampered data)") from None

    def open_view(self, kind: int, obj_id: bytes, stored: bytes | memoryview, raw_len: int) -> bytes | memoryview:
        """``open``, but a blob stored without compression comes back as a read-only view of a buffer of
        its own, decrypted in place: no second copy of the plaintext (what a FUSE reply needs)."""
        if self.encryption == "none" or len(stored) != fmt.NONCE_LEN + fmt.TAG_LEN + 1 + raw_len:
            return self.open(kind, obj_id, stored)
        aad = fmt.AAD_PREFIX + bytes((kind,)) + obj_id
        buf = uninitialized(raw_len + 1)
        self._decrypt_into(aad, obj_id, stored, memoryview(buf))  # writes every byte or raises
        if buf[0] != fmt.Compression.NONE:  # a compressed blob of exactly this size: rare, decode it normally
            return self.decompress(buf, obj_id)
        return memoryview(buf).toreadonly()[1:]

    @staticmethod
    def decompress(body: bytes | memoryview, obj_id: bytes = b"") -> bytes:
        """The plaintext as a new bytes object (``body`` may be a scratch buffer)."""
        if not body:
            raise IntegrityError(f"blob {obj_id.hex()[:16]} is empty")
        ctype = body[0]
        if ctype == fmt.Compression.NONE:
            return bytes(body[1:])
        if ctype == fmt.Compression.ZSTD:
            try:
                return zstd_decompressor().decompress(memoryview(body)[1:])
            except zstandard.ZstdError as e:
                raise IntegrityError(f"blob {obj_id.hex()[:16]} does not decompress: {e}") from None
        raise IntegrityError(f"blob {obj_id.hex()[:16]} has unknown compression {ctype}")

    def pack_blob(self, kind: int, obj_id: bytes, plaintext: bytes | memoryview) -> bytes:
        return self.seal(kind, obj_id, self.compress(plaintext))
