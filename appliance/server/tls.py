"""The server certificate: generated on first start when none is configured, pinned by agents.

A self-signed certificate is the normal case for an appliance on a private network; agents pin its
SHA-256 fingerprint (printed at start) instead of trusting a CA. A configured certificate (from a real
CA) works the same way, and agents may then use ``--ca-file`` instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl

from repo.errors import InvalidArgument


def fingerprint_der(der: bytes) -> str:
    """``sha256:`` and 64 lower-case hex digits, the one form printed and accepted everywhere."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def normalize_fingerprint(value: str) -> str:
    """Accept ``sha256:ab..``, ``SHA256 AB:CD:..`` or bare hex; return the canonical form."""
    v = value.strip().lower()
    for prefix in ("sha256:", "sha256="):
        if v.startswith(prefix):
            v = v[len(prefix):]
    v = v.replace(":", "").replace(" ", "")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise InvalidArgument(f"fingerprint {value!r} is not a SHA-256 (64 hex digits)")
    return "sha256:" + v


def cert_fingerprint(cert_path: str) -> str:
    with open(cert_path, "rb") as f:
        pem = f.read().decode("ascii", "replace")
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem))


def _generate(cert_path: str, key_path: str, names: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    cn = names[0] if names else "ihb-appliance"
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ihb appliance")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    tmp_key = key_path + ".tmp"
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    # Key first, certificate last: the certificate's presence marks a complete pair.
    os.replace(tmp_key, key_path)
    os.replace(cert_path + ".tmp", cert_path)


def ensure_certificate(state_dir: str, cert: str | None, key: str | None, extra_names: list[str]) -> tuple[str, str, bool]:
    """Return (cert path, key path, generated now)."""
    if cert and key:
        for p in (cert, key):
            if not os.path.isfile(p):
                raise InvalidArgument(f"TLS file {p} does not exist; fix [server] tls_cert/tls_key")
        return cert, key, False
    d = os.path.join(state_dir, "tls")
    cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    if os.path.isfile(cert_path) and os.path.isfile(key_path):
        return cert_path, key_path, False
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra_names]
    _generate(cert_path, key_path, list(dict.fromkeys(names)))
    return cert_path, key_path, True


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"cannot load the TLS certificate {cert_path}: {e}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
