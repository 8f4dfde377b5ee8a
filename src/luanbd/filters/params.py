"""Filter parameters parsed as nbdkit's helpers parse them (nbdkit_parse_size,
nbdkit_parse_bool, nbdkit_parse_unsigned, nbdkit_parse_uint64_t), with nbdkit's messages as
start-up errors."""

from __future__ import annotations

import re

from luanbd.backend.helpers import parse_bool, parse_size
from luanbd.backend.interface import StartupError

UINT_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
#: strtoul(3)/strtoull(3) with base 0 after nbdkit's checks: hex, octal or decimal.
_NUMBER = re.compile(r"[+]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def size_parameter(key: str, value: str) -> int:
    """nbdkit_parse_size."""
    try:
        return parse_size(value)
    except ValueError as err:
        raise StartupError(str(err)) from None


def bool_parameter(value: str) -> bool:
    """nbdkit_parse_bool."""
    try:
        return parse_bool(value)
    except ValueError as err:
        raise StartupError(str(err)) from None


def parse_number(what: str, value: str, maximum: int = UINT_MAX) -> int:
    """nbdkit_parse_unsigned (``maximum`` UINT_MAX) or nbdkit_parse_uint64_t (UINT64_MAX)."""
    text = value.lstrip(" \t\n\v\f\r")
    if text.startswith("-"):
        raise StartupError(f"{what}: negative numbers are not allowed")
    m = _NUMBER.match(text)
    if m is None:
        raise StartupError(f"{what}: empty string where we expected a number")
    digits = m.group(1)
    n = int(digits, 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10)
    # nbdkit's order: strtoul's ERANGE, then what follows the number.
    if n > maximum:
        raise StartupError(f'{what}: could not parse number: "{value}": '
                           "Numerical result out of range")
    if m.end() != len(text):
        raise StartupError(f'{what}: could not parse number: "{value}": trailing garbage')
    return n
