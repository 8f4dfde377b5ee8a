"""nbdkit's helper functions (nbdkit-plugin(3) "PARSING ...") in Python, shared by the CLI
and the ``nbdkit`` table of Lua scripts.  Each raises ValueError with nbdkit's message."""

from __future__ import annotations

import math
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


_C_SPACE = " \t\n\v\f\r"
_RATIO = re.compile(r"[:/]+")  # scanf's %[:/]: one or more of them
_DELAY_DIVISOR = {"": 1, "s": 1, "ms": 1000, "us": 1000000, "\u03bcs": 1000000,
                  "ns": 1000000000}
_DIGITS = re.compile(r"[0-9]*")
_HEXDIGITS = re.compile(r"[0-9a-fA-F]*")


def _run(pattern: re.Pattern[str], text: str, pos: int) -> str:
    """The characters of ``pattern`` (which matches empty too) from ``text[pos]`` on."""
    m = pattern.match(text, pos)
    return m.group() if m else ""


def _scan_double(text: str, pos: int = 0) -> tuple[float, int] | None:
    """What glibc's ``sscanf(str, "%lg%n")`` reads at ``text[pos:]`` (C locale): the number
    and where it ends, or None for no conversion.  glibc's own ways are kept, since nbdkit
    has them on Linux: an exponent mark is taken without digits ("1e" is 1, "1es" 1
    second), "0x." is 0, "nan" takes no "(...)", and "infi" that is not "infinity" fails
    (tests/api/test_nbdkit_parsers.py compares with glibc)."""
    i, n = pos, len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    sign = -1.0 if text[i:i + 1] == "-" else 1.0
    if text[i:i + 1] in ("+", "-"):
        i += 1
    word = text[i:i + 8].lower()
    if word.startswith("inf"):
        if word == "infinity":
            return sign * math.inf, i + 8
        return None if word[3:4] == "i" else (sign * math.inf, i + 3)
    if word.startswith("nan"):
        return math.copysign(math.nan, sign), i + 3
    hexa = word[:2] == "0x"
    digits = _HEXDIGITS if hexa else _DIGITS
    j = i + 2 if hexa else i
    whole = _run(digits, text, j)
    j += len(whole)
    frac = ""
    point = text[j:j + 1] == "."
    if point:
        frac = _run(digits, text, j + 1)
        j += 1 + len(frac)
    if not whole and not frac and not (hexa and point):
        return None
    exponent = ""
    if text[j:j + 1] in (("p", "P") if hexa else ("e", "E")):
        j += 1
        esign = text[j:j + 1] if text[j:j + 1] in ("+", "-") else ""
        j += len(esign)
        edigits = _run(_DIGITS, text, j)
        j += len(edigits)
        exponent = esign + edigits if edigits else ""
    mantissa = f"{whole or '0'}.{frac or '0'}"
    if hexa:
        value = float.fromhex(f"0x{mantissa}" + (f"p{exponent}" if exponent else ""))
    else:
        value = float(mantissa + (f"e{exponent}" if exponent else ""))
    return sign * value, j


def _negative_or_not_finite(d: float) -> bool:
    return not math.isfinite(d) or math.copysign(1.0, d) < 0  # signbit: -0 too


def parse_probability(what: str, text: str) -> float:
    """nbdkit_parse_probability (1.36): ``0.1``, ``1e-1``, ``10%``, ``1:10``, ``1/10``;
    finite and >= 0, maybe above 1.  nbdkit's sscanf steps and its one message."""
    bad = ValueError(f"{what}: could not parse '{text}' as a probability")
    first = _scan_double(text)
    if first is None:
        raise bad
    d, end = first
    ratio = _RATIO.match(text, end)
    second = _scan_double(text, ratio.end()) if ratio else None
    if second is not None and second[1] == len(text):  # N:M or N/M
        d2 = second[0]
        if d == 0.0 and d2 == 0.0:
            pass  # 0/0 is 0, as nbdkit has it
        elif d2 == 0.0:
            raise bad
        else:
            d /= d2
    elif text[end:] == "%":
        d /= 100.0
    elif text[end:] != "":
        raise bad
    if _negative_or_not_finite(d):
        raise bad
    return d


#: nbdkit_parse_delay stores whole seconds in an ``unsigned``: a longer delay is refused
#: (nbdkit's own result there is undefined behaviour).
MAX_DELAY_SECONDS = (1 << 32) - 1


def parse_delay(what: str, text: str) -> tuple[int, int]:
    """nbdkit_parse_delay (1.40): ``1``, ``1.5``, ``1.5s``, ``100ms``, ``10us``/``10\u03bcs``,
    ``1000ns`` -> (seconds, nanoseconds), computed in doubles as nbdkit does."""
    bad = ValueError(f'{what}: could not parse delay or sleep: "{text}"')
    number = _scan_double(text)
    if number is None or text[number[1]:] not in _DELAY_DIVISOR:
        raise bad
    d = number[0]
    divisor = _DELAY_DIVISOR[text[number[1]:]]
    if divisor != 1:
        d /= divisor
    if _negative_or_not_finite(d) or d >= MAX_DELAY_SECONDS + 1:
        raise bad
    sec = int(d)
    return sec, int((d - sec) * 1000000000.0)


def delay_seconds(what: str, text: str) -> float:
    """A delay in nbdkit_parse_delay's forms, in seconds."""
    sec, nsec = parse_delay(what, text)
    return sec + nsec / 1e9


#: nbdkit_parse_int & co: the C type each parses into, and its range.
INT_TYPES: dict[str, tuple[int, int]] = {
    "int": (-(1 << 31), (1 << 31) - 1), "unsigned": (0, (1 << 32) - 1),
    **{f"int{b}_t": (-(1 << (b - 1)), (1 << (b - 1)) - 1) for b in (8, 16, 32, 64)},
    **{f"uint{b}_t": (0, (1 << b) - 1) for b in (8, 16, 32, 64)},
}
#: strtol(3) with base 0: decimal, 0x hexadecimal or 0 octal, after spaces and a sign.
_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def parse_int(what: str, text: str, ctype: str = "int") -> int:
    """nbdkit_parse_int, _unsigned, _int8_t ... _uint64_t (``ctype`` names the C type):
    strtol/strtoul with base 0 and nbdkit's messages, in its order of checks."""
    lo, hi = INT_TYPES[ctype]
    if lo == 0:
        # nbdkit refuses '-' first (strtoul would negate), and goes on past the spaces.
        text = text.lstrip(_C_SPACE)
        if text.startswith("-"):
            raise ValueError(f"{what}: negative numbers are not allowed")
    m = _STRTOL.match(text)
    if m is None:  # strtol converted nothing
        raise ValueError(f"{what}: empty string where we expected a number")
    sign, digits = m.groups()
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
    n = -int(digits, base) if sign == "-" else int(digits, base)
    # ERANGE is checked before the rest of the string, as nbdkit does.
    if not lo <= n <= hi:
        raise ValueError(f'{what}: could not parse number: "{text}": '
                         "Numerical result out of range")
    if m.end() != len(text):
        raise ValueError(f'{what}: could not parse number: "{text}": trailing garbage')
    return n


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
