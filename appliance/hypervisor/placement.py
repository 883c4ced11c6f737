"""Where a VM runs, asked of the hypervisor connection, for the scheduler's caps per physical host and
per datastore (appliance/jobs.py).

The appliance reaches a VM through its QMP socket. A socket the appliance opens locally belongs to a
QEMU on this machine, so the physical host is this machine's name; QEMU's own block layer says which
image files back the VM's writable disks, and the datastore of each is the file system (mount point)
that holds it. A job's ``physical_host``/``datastores`` settings, where given, take precedence (e.g.
for sockets forwarded from other hypervisors).
"""

from __future__ import annotations

import os
import socket

from .qmp import QMPClient
from .vmbackup import QemuVM


def mount_point(path: str) -> str:
    """The mount point of the file system holding ``path``."""
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def vm_placement(qmp_path: str, timeout: float = 2.0) -> tuple[str, tuple[str, ...]]:
    """(physical host, datastores) of the VM behind ``qmp_path``; raises QMPError/OSError if it does
    not answer."""
    if not os.path.exists(qmp_path):  # the client would wait for the socket to appear; a scheduler must not
        raise FileNotFoundError(f"no QMP socket at {qmp_path}")
    with QMPClient(qmp_path, timeout=timeout) as q:
        disks = QemuVM(q).disks()
    stores = {mount_point(d.filename) for d in disks if d.filename.startswith("/")}
    return socket.gethostname(), tuple(sorted(stores))
