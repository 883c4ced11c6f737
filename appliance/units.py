"""Sizes as people write them: ``512``, ``64K``, ``256M``, ``1.5G``, ``2GiB`` (binary multiples)."""

from __future__ import annotations

import math

from repo.errors import InvalidArgument

_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str, what: str, unit: int = 1) -> int:
    """Bytes; a plain number counts in ``unit`` (e.g. MiB for a cache size). One-line error otherwise."""
    v = value.strip().upper().removesuffix("B").removesuffix("I")
    suffix = v[-1:] if v[-1:] in _MULT else ""
    try:
        n = float(v[: len(v) - len(suffix)])
    except ValueError:
        n = math.nan
    if not 0 <= n < math.inf:  # also false for NaN
        raise InvalidArgument(f"{what} {value!r}: use a number with an optional K, M, G or T suffix")
    return int(n * (_MULT[suffix] if suffix else unit))
