"""Parse byte sizes such as ``16GiB`` or ``512 MB`` (``format_bytes`` is the library's)."""

import re

from lmstrain.errors import UserError
from lmstrain.lms.units import format_bytes  # one formatter for the app and the library

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value):
    """Return ``value`` in bytes; accepts ints and strings like ``16GiB``, ``512MB``, ``1.5 GiB``.

    >>> parse_bytes("16GiB")
    17179869184
    >>> parse_bytes("512 MB")
    512000000
    """
    if isinstance(value, bool):
        raise UserError(f"expected a size such as 16GiB or 512MB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise UserError(f"a size cannot be negative, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(
            f"expected a size such as 16GiB, 512MiB, 40GB or a number of bytes, got {value!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
