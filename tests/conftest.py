"""Test-wide hygiene: no test sees the developer's IHB_* environment, config or caches; the KDF is
weakened explicitly (never in production) so that repositories open fast."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def clean_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in list(os.environ):
        if k.startswith("IHB_") and k not in ("IHB_TEST_GUEST_CACHE",):
            monkeypatch.delenv(k)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("IHB_TESTONLY_WEAK_KDF", "1")
    monkeypatch.setenv("IHB_KEY_CACHE_SECONDS", "300")  # unlocked keys cached (the default path), not for long
    monkeypatch.setenv("IHB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("IHB_CONFIG_DIR", str(home / "etc"))
    monkeypatch.setenv("IHB_DATA_DIR", str(home / "data"))
    yield
