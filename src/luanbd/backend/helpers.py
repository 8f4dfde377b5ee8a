"""nbdkit's helper functions (nbdkit-plugin(3) "PARSING ...") in Python, shared by the CLI
and the ``nbdkit`` table of Lua scripts.  Each raises ValueError with nbdkit's message."""

from __future__ import annotations

import os
import re

_SIZE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(\d+)(.*)\Z", re.DOTALL)
_SCALE = {"": 1, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
          "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
#: nbdkit sizes are int64: anything larger is an error, not a wrap-around.
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str) -> int:
    """``"100M"`` -> 104857600 (powers of 1024; ``s`` = 512-byte sectors), with nbdkit
    1.32's messages (strtoimax, then one suffix letter)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"could not parse size string ({text})")
    sign, digits, suffix = m.groups()
    if sign == "-" and int(digits):
        raise ValueError(f"size cannot be negative ({text})")
    if int(digits) > MAX_SIZE:
        raise ValueError(f"size ({text}) exceeds maximum value")
    if len(suffix) > 1 or (suffix and suffix.lower() not in _SCALE):
        raise ValueError(f"could not parse size: unknown suffix '{suffix}'")
    value = int(digits) * _SCALE[suffix.lower()]
    if value > MAX_SIZE:
        raise ValueError(f"overflow computing size ({text})")
    return value


_DELAY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|\u03bcs|ns)?\Z")
_DELAY_SCALE = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u03bcs": 1e-6, "ns": 1e-9}


def parse_delay(what: str, text: str) -> float:
    """nbdkit_parse_delay: ``1``, ``1.5``, ``1.5s``, ``100ms``, ``10us``, ``1000ns`` ->
    seconds."""
    m = _DELAY.match(text)
    if not m:
        raise ValueError(f"{what}: could not parse delay: {text}")
    return float(m.group(1)) * _DELAY_SCALE[m.group(2)]


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"could not decipher boolean ({text})")


def realpath(path: str) -> str:
    """nbdkit_realpath: the canonical absolute path of an existing file."""
    if not os.path.exists(path):
        raise ValueError(f"realpath: {path}: No such file or directory")
    return os.path.realpath(path)


def absolute_path(path: str) -> str:
    """nbdkit_absolute_path: ``path`` made absolute from the working directory (it need not
    exist)."""
    if not path:
        raise ValueError("cannot convert null or empty path to an absolute path")
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
