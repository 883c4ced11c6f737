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


PAGE_REPORTING = "/sys/module/page_reporting/parameters/page_reporting_order"


def hold_host_memory(touch_gib: int = 4) -> str:
    """Stop this VM from handing freed memory back to its host while the benchmark runs, and restore
    the setting at exit; returns a line for the report.

    With virtio-balloon free page reporting (on in these VMs), memory freed in the guest, by
    ``drop_caches`` above all, is given back to the host within seconds, and the next use of it costs a
    host page fault per page: whichever tool or phase next needs fresh memory (a mount's chunk cache, the
    page cache of a file read through FUSE) ran up to 2.5x slower, with twice the CPU per GB, at random
    (measured: the same read through the same mount 366 vs 916-1113 MB/s). Raising the reporting order
    above the largest page block stops the reporting; touching ``touch_gib`` GiB once brings memory that
    was given back already into the guest again."""
    import atexit

    try:
        with open(PAGE_REPORTING) as f:
            old = f.read().strip()
        with open(PAGE_REPORTING, "w") as f:
            f.write("11\n")  # above MAX_PAGE_ORDER (10): no free block is ever large enough to report
    except OSError:
        return "free page reporting: left as it is (no such setting, or not root): expect noisier figures"

    def restore() -> None:
        with open(PAGE_REPORTING, "w") as f:
            f.write(old + "\n")

    atexit.register(restore)
    touch_gib = min(touch_gib, available_gib() // 4)  # never crowd a small machine
    held = [bytearray(1 << 30) for _ in range(touch_gib)]  # zero-filled: every page touched, all at once
    del held
    return f"free page reporting to the host paused for the run (order {old} -> 11), {touch_gib} GiB touched first"


def available_gib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) >> 20
    return 0
