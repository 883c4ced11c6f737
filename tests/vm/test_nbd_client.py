"""The NBD client against a real qemu-nbd: pipelined reads of every size (through the receive buffer,
straight into the caller's buffer, across holes) return the image's bytes, and a server that goes
silent is reported after the timeout instead of hanging the backup."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from appliance.hypervisor import nbd
from appliance.hypervisor.nbd import NBDClient, NBDError
from appliance.hypervisor.sources import open_qemu_image

MiB = 1 << 20


def test_scattered_reads_of_every_size_match_the_image(tmp_path: Path) -> None:
    rnd = random.Random(7)
    img = tmp_path / "disk.raw"
    size = 48 * MiB
    with open(img, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 3 * MiB):  # data and holes alternate, so replies mix data and hole chunks
            f.seek(off)
            f.write(rnd.randbytes(MiB + rnd.randrange(4096)))
    raw = img.read_bytes()
    # sizes below, at and above the direct-receive threshold, odd ones, and whole MiBs across holes
    sizes = [1, 511, 4096, 65536, 65537, nbd.DIRECT_RECV - 1, nbd.DIRECT_RECV, nbd.DIRECT_RECV + 3, 3 * MiB + 5]
    extents = sorted((rnd.randrange(size - s), s) for s in sizes * 12)
    src = open_qemu_image(str(img), "raw")
    try:
        got = list(src.client.read_many(extents, depth=16))
        assert len(got) == len(extents)
        for (off, ln), data in zip(extents, got, strict=True):
            assert bytes(data) == raw[off : off + ln], (off, ln)
        assert src.client.pread(size - 10, 10) == raw[-10:]
    finally:
        src.close()


def test_a_silent_server_is_reported_after_the_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    held: list[socket.socket] = []
    t = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(NBDError, match="sent nothing for 0.5 s"):
            NBDClient(unix=path, export="disk", timeout=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        for c in held:
            c.close()
        srv.close()


def test_a_server_that_dies_mid_reply_is_an_error(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(8 * MiB))
    src = open_qemu_image(str(img), "raw")
    try:
        reads = src.client.read_many([(i * MiB, MiB) for i in range(8)], depth=8)
        assert len(next(reads)) == MiB
        assert src._proc is not None
        src._proc.kill()
        src._proc.wait()
        with pytest.raises(NBDError, match="closed the connection"):
            for _ in reads:
                pass
    finally:
        src.close()


def test_allocation_and_dirty_bitmap_come_in_one_pass(tmp_path: Path) -> None:
    """``block_statuses`` asks once for both contexts and gets what asking per context gives: the dirty
    bitmap's changed 64 KiB granules and the allocation map's data, zeros and holes, each covering the
    whole disk without gaps."""
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -P 2 8M 200k",
                    "-c", "write -z 20M 1M", str(img)], check=True, capture_output=True)
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--socket", sock, "--export-name", "disk",
                             "-B", "b0", "-f", "qcow2", str(img)])
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
        client = NBDClient(unix=sock, export="disk", meta=contexts)
        both = client.block_statuses(contexts)
        for c in contexts:
            assert both[c] == list(client.block_status(c)), c
            pos = 0
            for off, ln, _ in both[c]:
                assert off == pos and ln > 0
                pos += ln
            assert pos == 64 * MiB
        dirty = [(off, ln) for off, ln, fl in both["qemu:dirty-bitmap:b0"] if fl & nbd.DIRTY]
        assert dirty == [(MiB, 64 << 10), (8 * MiB, 256 << 10), (20 * MiB, MiB)]
        data = [(off, ln) for off, ln, fl in both["base:allocation"] if not fl & nbd.STATUS_ZERO]
        assert data == [(MiB, 64 << 10), (8 * MiB, 200 << 10)]  # the zeroed MiB reads as zeros, not data
        # a window that starts and ends inside runs is clipped to the window
        window = client.block_statuses(contexts, 8 * MiB + 4096, 12 * MiB)
        assert window["qemu:dirty-bitmap:b0"][0] == (8 * MiB + 4096, (256 << 10) - 4096, nbd.DIRTY)
        assert sum(ln for _, ln, _ in window["base:allocation"]) == 12 * MiB
        client.close()
    finally:
        proc.terminate()
        proc.wait()
