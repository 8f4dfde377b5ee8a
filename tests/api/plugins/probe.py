# probe.py: the twin of probe.lua for `nbdkit python`: cexpr=/expr= are Python expressions,
# raise= Python statements; sector i holds "ok <type> <value>" or "err <message>".
import errno  # noqa: F401  (for the expressions)

import nbdkit  # noqa: F401  (for the expressions)

API_VERSION = 2
SECTOR = 512
slots = []


def evaluate(expr):
    try:
        value = eval(expr)
    except Exception as err:
        return "err " + str(err)
    return "ok " + type(value).__name__ + " " + str(value)


def config(key, value):
    if key == "cexpr":
        slots.append(("text", evaluate(value)))
    elif key == "expr":
        slots.append(("expr", value))
    elif key == "raise":
        slots.append(("code", compile(value, "raise", "exec")))
    else:
        raise RuntimeError("unknown key " + key)


def open(readonly):
    return {}


def get_size(h):
    return max(len(slots), 1) * SECTOR


def run(i):
    if i >= len(slots):
        return ""
    kind, value = slots[i]
    if kind == "text":
        return value
    if kind == "expr":
        return evaluate(value)
    exec(value)
    return "ran"


def pread(h, buf, offset, flags):
    out = b""
    first = offset // SECTOR
    for i in range(first, (offset + len(buf) - 1) // SECTOR + 1):
        text = run(i).encode()[:SECTOR]
        out += text + b" " * (SECTOR - len(text))
    skip = offset - first * SECTOR
    buf[:] = out[skip:skip + len(buf)]
