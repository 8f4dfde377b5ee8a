"""libnbd client of the edge tests (run by /usr/bin/python3, which has the nbd module).

argv: SOCKET JSON, JSON a list of cases {"export": NAME, "ops": [[OP, OFFSET, COUNT, FLAGS]]}
(and "context": the one metadata context to select, base:allocation by default)
with OP one of bs (block status), pread, pwrite (COUNT bytes of 0xA5), trim, zero, cache.
Prints one JSON list: per case {"connect": errno-or-null, "size": N, "block_size": [..],
"ops": [...]}, each op {"ok": RESULT} (descriptors [[length, flags], ...] for bs, the data's
hex for pread, else null) or {"err": ERRNO}.  Strict mode is off so that libnbd sends what
it would otherwise refuse.
"""

import errno
import json
import sys

import nbd


def code(err):
    """The errno number of a libnbd error (the nbd module gives its name)."""
    return getattr(errno, err.errno, -1) if isinstance(err.errno, str) else (err.errno or -1)


def run_op(h, op, offset, count, flags):
    if op == "bs":
        got = []

        def cb(meta, off, entries, err):
            got.append([list(p) for p in zip(entries[0::2], entries[1::2], strict=False)])
            return 0
        h.block_status(count, offset, cb, flags)
        return got[0] if len(got) == 1 else got
    if op == "pread":
        return h.pread(count, offset, flags).hex()
    if op == "pwrite":
        h.pwrite(b"\xa5" * count, offset, flags)
    elif op == "trim":
        h.trim(count, offset, flags)
    elif op == "zero":
        h.zero(count, offset, flags)
    elif op == "cache":
        h.cache(count, offset, flags)
    else:
        raise ValueError(op)
    return None


def run_case(sock, case):
    h = nbd.NBD()
    h.add_meta_context(case.get("context", "base:allocation"))
    h.set_strict_mode(0)
    h.set_export_name(case["export"])
    out = {"connect": None, "ops": []}
    try:
        h.connect_unix(sock)
    except nbd.Error as err:
        out["connect"] = code(err)
        return out
    out["size"] = h.get_size()
    out["block_size"] = [h.get_block_size(i) for i in range(3)]
    for op, offset, count, flags in case["ops"]:
        try:
            out["ops"].append({"ok": run_op(h, op, offset, count, flags)})
        except nbd.Error as err:
            out["ops"].append({"err": code(err)})
        if not h.aio_is_ready():
            out["ops"].append({"dead": True})
            return out
    h.shutdown()
    return out


def main():
    sock, cases = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps([run_case(sock, case) for case in cases]))


main()
