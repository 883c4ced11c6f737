"""What every benchmark script shares (they run as `python bench/NAME.py`, so this directory is on sys.path)."""

from __future__ import annotations

import os


def drop_caches() -> bool:
    """Write back and drop the page cache (root only), so the next command reads from disk; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
