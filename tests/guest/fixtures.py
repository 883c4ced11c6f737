"""pytest fixtures for tests that boot the test guest.

Use them from a conftest.py with ``from tests.guest.fixtures import guest_kernel, start_guest``
(or ``pytest_plugins = ["tests.guest.fixtures"]`` in the top-level conftest).

The guest is built once per machine into ``IHB_TEST_GUEST_CACHE`` (default
``/var/cache/ihb-test-guest``). When it cannot be built or QEMU is missing the tests FAIL, with the
reason: CI must never pass by skipping the VM tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.vm import DEFAULT_CACHE, GuestError, GuestKernel, GuestVM, build_guest

REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debugfs": "e2fsprogs",
    "mke2fs": "e2fsprogs",
}


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """Kernel + initramfs of the test guest, built (or found up to date) by build_guest.sh."""
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        pytest.fail(
            f"VM tests need these Debian packages: apt-get install {' '.join(missing)}", pytrace=False
        )
    cache = Path(os.environ.get("IHB_TEST_GUEST_CACHE") or DEFAULT_CACHE)
    try:
        return build_guest(cache)
    except (GuestError, OSError) as exc:
        pytest.fail(
            f"cannot build the test guest into {cache} (tests/guest/build_guest.sh): {exc}", pytrace=False
        )


@pytest.fixture
def start_guest(tmp_path: Path, guest_kernel: GuestKernel) -> Iterator[Callable[..., GuestVM]]:
    """Factory: ``start_guest(disks, action="serve", ...)`` boots a :class:`GuestVM` with the test
    kernel (pass ``kernel=None`` to boot from the first disk) and stops it at teardown."""
    vms: list[GuestVM] = []

    def start(disks: Any = (), **kwargs: Any) -> GuestVM:
        kwargs.setdefault("kernel", guest_kernel)
        vm = GuestVM(tmp_path / f"vm{len(vms)}", disks, **kwargs)
        vms.append(vm)
        return vm.start()

    yield start
    for vm in vms:
        vm.stop()
