from __future__ import annotations

import json
import os

import pytest

from repo import format as fmt
from repo.crypto import Envelope, KeyMaterial
from repo.errors import IntegrityError, UnsupportedFormat, WrongPassphrase
from repo.repository import Repository


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_envelope_roundtrip_and_tamper(encryption: str) -> None:
    env = Envelope(KeyMaterial.generate(encryption))
    data = b"hello world " * 1000
    cid = env.chunk_id(data)
    stored = env.pack_blob(fmt.BlobKind.DATA, cid, data)
    assert env.open(fmt.BlobKind.DATA, cid, stored) == data
    assert len(stored) < len(data) / 10  # compressible data is compressed
    if encryption != "none":
        assert b"hello world" not in stored
    for pos in (0, len(stored) // 2, len(stored) - 1):
        bad = bytearray(stored)
        bad[pos] ^= 1
        with pytest.raises(IntegrityError):
            env.open(fmt.BlobKind.DATA, cid, bytes(bad))
    with pytest.raises(IntegrityError):  # a blob cannot be replayed under another id or kind
        env.open(fmt.BlobKind.DATA, env.chunk_id(b"other"), stored)
    with pytest.raises(IntegrityError):
        env.open(fmt.BlobKind.TREE, cid, stored)


def test_openssl_and_pycryptodome_gcm_are_interchangeable() -> None:
    """Sealing goes through OpenSSL (cryptography) when present, pycryptodome otherwise: repositories
    written by either must open with the other, so the format never depends on which one is installed."""
    key = KeyMaterial.generate("aes-256-gcm")
    fast, reference = Envelope(key), Envelope(key)
    assert fast._aead._fast is not None, "the cryptography package (a dependency) must be importable"
    reference._aead._fast = None  # the pycryptodome path
    data = os.urandom(300_000)
    cid = fast.chunk_id(data)
    for a, b in ((fast, reference), (reference, fast)):
        stored = a.pack_blob(fmt.BlobKind.DATA, cid, data)
        assert b.open(fmt.BlobKind.DATA, cid, stored) == data
        bad = bytearray(stored)
        bad[-1] ^= 1
        with pytest.raises(IntegrityError):
            b.open(fmt.BlobKind.DATA, cid, bytes(bad))


def test_incompressible_stored_raw() -> None:
    env = Envelope(KeyMaterial.generate("none"))
    data = os.urandom(100_000)
    body = env.compress(data)
    assert body[0] == fmt.Compression.NONE and body[1:] == data


def test_chunk_ids_are_keyed() -> None:
    a, b = Envelope(KeyMaterial.generate("none")), Envelope(KeyMaterial.generate("none"))
    assert a.chunk_id(b"x") != b.chunk_id(b"x")
    assert a.chunk_id(b"x") == a.chunk_id(b"x")
    assert a.chunker_seed != b.chunker_seed


def test_key_wrap_and_wrong_passphrase() -> None:
    k = KeyMaterial.generate("aes-256-gcm")
    blob = k.wrap(b"right")
    assert KeyMaterial.unwrap(blob, b"right").master == k.master
    with pytest.raises(WrongPassphrase):
        KeyMaterial.unwrap(blob, b"wrong")
    assert k.master.hex() not in blob.decode()


def test_newer_format_refused(tmp_path) -> None:
    loc = str(tmp_path / "r")
    Repository.init(loc, b"pw")
    cfg = json.loads(open(os.path.join(loc, "config")).read())
    cfg["format_version"] = fmt.FORMAT_VERSION + 1
    with open(os.path.join(loc, "config"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedFormat, match="upgrade ihb"):
        Repository.open(loc, lambda: b"pw")


def test_blob_reads_return_their_own_bytes(tmp_path) -> None:
    """get_blob decrypts through per-thread scratch buffers: every result must still be a bytes object of
    its own, untouched by the next read (compressed and raw blobs alike), on several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    Repository.init(str(tmp_path / "r"), b"pw")
    with Repository.open(str(tmp_path / "r"), lambda: b"pw") as repo:
        blobs = [os.urandom(300_000), b"text " * 60_000, os.urandom(5_000), b"z" * 2_000_000]
        w = repo.writer()
        ids = [w.add(fmt.BlobKind.DATA, b) for b in blobs]
        w.flush()
        got = [repo.get_blob(fmt.BlobKind.DATA, i) for i in ids]
        assert all(type(g) is bytes for g in got) and got == blobs
        with ThreadPoolExecutor(4) as ex:
            for _ in range(3):
                assert list(ex.map(lambda i: repo.get_blob(fmt.BlobKind.DATA, i), ids * 8)) == blobs * 8


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_blob_views_are_read_only_authenticated_and_their_own(tmp_path, encryption: str) -> None:
    """get_blob_view (the FUSE read path) decrypts a raw-stored blob in place and hands out a view: it
    must equal get_blob, be read-only, survive later reads, and still refuse a tampered blob."""
    Repository.init(str(tmp_path / "r"), b"pw", encryption=encryption)
    with Repository.open(str(tmp_path / "r"), lambda: b"pw") as repo:
        blobs = [os.urandom(262_144), b"text " * 60_000, os.urandom(17)]
        w = repo.writer()
        ids = [w.add(fmt.BlobKind.DATA, b) for b in blobs]
        w.flush()
        views = [repo.get_blob_view(fmt.BlobKind.DATA, i) for i in ids]
        for _ in range(3):
            [repo.get_blob_view(fmt.BlobKind.DATA, i) for i in ids]
        assert [bytes(v) for v in views] == blobs
        if encryption != "none":
            assert isinstance(views[0], memoryview) and views[0].readonly  # raw-stored: no copy made
        loc = repo.index.get_chunk(ids[0])
        pack = tmp_path / "r" / fmt.pack_name(loc.pack)
        raw = bytearray(pack.read_bytes())
        raw[loc.offset + loc.length // 2] ^= 1
        pack.chmod(0o600)
        pack.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError):
            repo.get_blob_view(fmt.BlobKind.DATA, ids[0])
