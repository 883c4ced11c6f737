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


def byte_compile() -> None:
    """Compile the project's modules as install.sh does for a real install: with PYTHONDONTWRITEBYTECODE
    set (as on these machines) or stale caches, every ihb process would otherwise compile its sources at
    start-up (~30 ms each), which a measured run must not pay."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "repo", "fusefs", "appliance"], cwd=root,
                   check=True, stdout=subprocess.DEVNULL)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (every process and the kernel's own threads,
    from /proc/stat: user, nice, system, irq, softirq; not idle, iowait or the host's steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
