"""Talking to QEMU: the QMP monitor and the guest agent (qemu-ga) of the VMs the appliance backs up.

Image-level backups need three things from the hypervisor: a consistent point in time (guest agent
``fsfreeze`` around a QMP ``transaction``), changed-block tracking (persistent dirty bitmaps) and the
copy itself (``blockdev-backup`` jobs or an NBD export). ``qmp`` is the thin, synchronous, stdlib-only
wire client for both sockets; the backup logic built on it lives elsewhere in ``appliance``.

Layer rule: nothing here imports ``repo`` or ``fusefs``; it only speaks JSON over UNIX sockets.
"""
