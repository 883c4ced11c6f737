"""Sizes on the command line and in config files (appliance.units): what people write, and clear errors."""

from __future__ import annotations

import pytest

from appliance.agent.client import parse_rate
from appliance.units import parse_size
from repo.errors import InvalidArgument

MiB = 1 << 20


@pytest.mark.parametrize(("text", "unit", "expected"), [
    ("512", 1, 512), ("256", MiB, 256 * MiB), ("64K", 1, 64 << 10), ("256M", 1, 256 * MiB), ("2g", MiB, 2 << 30),
    ("1.5G", 1, 3 << 29), ("2GiB", 1, 2 << 30), ("10MB", 1, 10 * MiB), (" 1T ", 1, 1 << 40), ("0", MiB, 0),
])
def test_parse_size(text: str, unit: int, expected: int) -> None:
    assert parse_size(text, "size", unit) == expected


@pytest.mark.parametrize("text", ["", "M", "lots", "-1M", "nan", "inf", "1X", "1..5G"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument, match="use a number"):
        parse_size(text, "size")


def test_bandwidth_limit() -> None:
    assert parse_rate("20M") == 20 * MiB and parse_rate("500K/s") == 500 * 1024
    with pytest.raises(InvalidArgument, match="below 1 KiB/s"):
        parse_rate("10")
    with pytest.raises(InvalidArgument, match="bandwidth limit 'fast'"):
        parse_rate("fast")
