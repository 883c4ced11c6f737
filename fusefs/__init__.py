"""The FUSE view of a repository: every restore point as a read-only tree.

Layers (docs/architecture.md): ``appliance -> fusefs -> repo``. This package reads through ``repo/``
and never imports ``appliance`` or ``click``; the CLI hands it a callable that opens the repository.

- ``vfs.py``   what the repository looks like as a tree (inodes, directories, content readers, the
               chunk cache and readahead), with no pyfuse3 in it, so it is tested without a mount;
- ``ops.py``   the thin ``pyfuse3.Operations`` adapter: inodes and attributes in, ``FUSEError`` out;
- ``mount.py`` the mount lifecycle: options, read-ahead tuning, daemonising, signals, unmount.
"""

from __future__ import annotations

from . import guestview as _guestview  # noqa: E402,F401  registers the <disk>.files/ view
