"""The HTTP layer: malformed, oversized and slow requests get a 4xx with one line of JSON, never a
500 or a hung connection; the OpenAPI document describes every endpoint."""

from __future__ import annotations

import json
import socket
import ssl
import time

from .conftest import Appliance


def _raw(app: Appliance, payload: bytes, wait: float = 10) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", app.port), timeout=wait) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(payload)
        out = b""
        while True:
            try:
                chunk = t.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _error_line(resp: bytes) -> tuple[int, dict]:
    head, _, body = resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert body.count(b"\n") == 1 and body.endswith(b"\n"), body  # one line of JSON
    return status, json.loads(body)


def test_malformed_and_limits(appliance: Appliance) -> None:
    app = appliance
    app.config.write_text(app.config.read_text() + "header_timeout = 1.5\nbody_timeout = 1.5\n")
    tok = app.token("acme", "web1")
    app.start()

    status, err = _error_line(_raw(app, b"GARBAGE\r\n\r\n"))
    assert status == 400 and "malformed" in err["error"]["message"]

    big = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    status, err = _error_line(_raw(app, big))
    assert status == 431, err

    # A declared body beyond the endpoint's limit is refused before it is read.
    t = tok.read_text().strip()
    req = (f"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n"
           "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n").encode()
    status, err = _error_line(_raw(app, req))
    assert status == 413, err

    # Slow clients are cut off at the header deadline with a 408, not left hanging.
    t0 = time.monotonic()
    status, err = _error_line(_raw(app, b"GET /api/v1/hea", wait=10))
    assert status == 408 and time.monotonic() - t0 < 12  # header_timeout 1.5 s, slack for a busy CI

    # A body that stops arriving is cut off too.
    req = (f"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n"
           "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()
    status, err = _error_line(_raw(app, req))
    assert status == 408

    # A client that connects and never starts TLS, or speaks plain HTTP, is dropped, not kept.
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        assert s.recv(100) == b""
    assert time.monotonic() - t0 < 12
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 24

    assert app.api("GET", "/api/v1/nothing")[0] == 404
    assert app.api("GET", "/api/v1/snapshots")[0] == 401
    assert app.api("GET", "/api/v1/snapshots", "ihb_not-a-token")[0] == 401
    assert app.api("PUT", "/api/v1/snapshots", tok)[0] == 405
    assert app.api("POST", "/api/v1/sessions", tok, raw=b"{nope", ctype="application/json")[0] == 400
    assert app.api("POST", "/api/v1/sessions", tok, raw=b"{}", ctype="text/plain")[0] == 415
    assert app.api("POST", "/api/v1/sessions", tok, body=[1, 2])[0] == 400
    assert app.api("GET", "/api/v1/snapshots/xyz", tok)[0] == 404
    assert app.api("GET", "/api/v1/blobs/data/" + "0" * 64, tok)[0] == 404
    assert app.api("GET", "/api/v1/blobs/bogus/" + "0" * 64, tok)[0] == 404
    status, doc = app.api("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for p in ("/api/v1/sessions", "/api/v1/sessions/{session_id}/have", "/api/v1/sessions/{session_id}/blobs",
              "/api/v1/sessions/{session_id}/commit", "/api/v1/snapshots", "/api/v1/blobs/{kind}/{blob_id}"):
        assert p in doc["paths"], p

    # Malformed uploads inside a valid session.
    status, s = app.api("POST", "/api/v1/sessions", tok, body={"paths": []})
    assert status == 201
    sid = s["session"]
    assert app.api("POST", f"/api/v1/sessions/{sid}/blobs", tok, raw=b"\x00" * 10,
                   ctype="application/octet-stream")[0] == 400
    assert app.api("POST", f"/api/v1/sessions/{sid}/have", tok, body={"ids": ["zz"]})[0] == 400
    assert app.api("POST", f"/api/v1/sessions/{sid}/commit", tok, body={"root": "!!"})[0] == 400
    assert app.api("POST", f"/api/v1/sessions/{sid}/commit", tok, body={"root": "aGVsbG8="})[0] == 422
    import base64

    import msgpack

    root = base64.b64encode(msgpack.packb({"n": b"", "t": "d", "d": []}, use_bin_type=True)).decode()
    assert app.api("POST", f"/api/v1/sessions/{sid}/commit", tok, body={"root": root, "paths": ["\ud800"]})[0] == 400
    assert app.api("POST", f"/api/v1/sessions/{sid}/commit", tok,
                   body={"root": root, "streams": [{"n": 2**70}]})[0] == 400
    st, r = app.api("POST", f"/api/v1/sessions/{sid}/commit", tok, body={"root": root, "stats": {"x": 2**70}})
    assert st == 200 and r["snapshot"]["paths"] == []
    # the commit is idempotent, and a committed session takes no more uploads
    assert app.api("POST", f"/api/v1/sessions/{sid}/commit", tok, body={"root": root})[1] == r
    assert app.api("POST", f"/api/v1/sessions/{sid}/blobs", tok, raw=b"\x00" * 10,
                   ctype="application/octet-stream")[0] == 409

    app.stop()
    log = app.log.read_text()
    assert "Traceback" not in log, log
