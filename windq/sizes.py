"""File sizes as people write them: `60MB`, `1.5 GiB`, `800KB`."""

from __future__ import annotations

import re

from windq.errors import InputError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*$")


def parse_size(text: str) -> int:
    """Bytes (rounded down) for a number and a unit: B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (of 1024)."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in UNITS:
        raise InputError(f"size {text!r}: give a number and a unit, one of B, KB, MB, GB, KiB, MiB, GiB (for example 60MB)")
    n = int(float(m.group(1)) * UNITS[unit])
    if n <= 0:
        raise InputError(f"size {text!r}: must be more than 0 bytes")
    return n


def format_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10**6 else f"{n / 1e3:.1f} KB"
