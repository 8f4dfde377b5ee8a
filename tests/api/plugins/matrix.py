# matrix.py: the twin of matrix.lua for `nbdkit python`: the same config keys, the same
# disk, the same call log, so a test can compare what libnbd sees from both servers.
import builtins

import nbdkit

API_VERSION = 2

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
MODES = {"none": 0, "emulate": 1, "native": 2}
BOOL_CAPS = {"can_write", "can_flush", "is_rotational", "can_trim", "can_zero",
             "can_fast_zero", "can_extents", "can_multi_conn"}
THREAD_MODELS = {
    "serialize_connections": nbdkit.THREAD_MODEL_SERIALIZE_CONNECTIONS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}

size = 1024 * 1024
pages = {}
log_path = None
pending = []
omit = set()
bools = {}
modes = {}
fails = {}
block = None
description = None
default_name = None
exports = None
model = None


def _text(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


def record(*args):
    line = " ".join(_text(a) for a in args)
    if log_path is None:
        pending.append(line)
        return
    with builtins.open(log_path, "a") as f:  # `open` is the plugin callback here
        f.write(line + "\n")


def maybe_fail(name):
    err = fails.get(name)
    if err is not None:
        if err:
            nbdkit.set_error(err)
        raise RuntimeError("injected failure in " + name)


def config(key, value):
    global size, log_path, pending, block, description, default_name, exports, model
    record("config", key, value)
    if key == "size":
        size = nbdkit.parse_size(value)
    elif key == "log":
        log_path = value
        lines, pending = pending, []
        for line in lines:
            record(line)
    elif key == "omit":
        omit.update(value.split(","))
    elif key in BOOL_CAPS:
        bools[key] = value.lower() in ("1", "true", "yes", "on")
    elif key in ("can_fua", "can_cache"):
        modes[key] = MODES[value]
    elif key == "block_size":
        block = tuple(int(x) for x in value.split(","))
    elif key == "description":
        description = value
    elif key == "default_export":
        default_name = value
    elif key == "exports":
        exports = []
        for item in value.split(","):
            if ":" in item:
                exports.append(tuple(item.split(":", 1)))
            else:
                exports.append(item)
    elif key == "thread_model":
        model = THREAD_MODELS[value]
    elif key == "fail":
        name, err = value.split(":")
        fails[name] = int(err)
    else:
        raise RuntimeError("unknown key " + key)


def _const(name, value):
    def fn(h):
        record(name)
        return value
    return fn


def config_complete():
    record("config_complete")
    g = globals()
    for name, value in list(bools.items()) + list(modes.items()):
        g[name] = _const(name, value)
    if block is not None:
        g["block_size"] = _const("block_size", block)
    if description is not None:
        g["export_description"] = _const("export_description", description)
    if default_name is not None:
        def default_export(readonly, is_tls):
            record("default_export", readonly, is_tls)
            return default_name
        g["default_export"] = default_export
    if exports is not None:
        def list_exports(readonly, is_tls):
            record("list_exports", readonly, is_tls)
            return exports
        g["list_exports"] = list_exports
    if model is not None:
        g["thread_model"] = lambda: model
    for name in omit:
        g.pop(name, None)


def get_ready():
    record("get_ready")
    maybe_fail("get_ready")


def after_fork():
    record("after_fork")


def cleanup():
    record("cleanup")


def preconnect(readonly):
    record("preconnect", readonly)
    maybe_fail("preconnect")


def open(readonly):
    record("open", readonly, nbdkit.export_name())
    maybe_fail("open")
    return {"readonly": readonly}


def close(h):
    record("close")


def get_size(h):
    maybe_fail("get_size")
    return size


def _read(count, offset):
    out = bytearray()
    while count > 0:
        i, o = divmod(offset, PAGE)
        n = min(PAGE - o, count)
        out += pages.get(i, ZERO_PAGE)[o:o + n]
        offset += n
        count -= n
    return bytes(out)


def _write(buf, offset):
    done = 0
    while done < len(buf):
        i, o = divmod(offset, PAGE)
        n = min(PAGE - o, len(buf) - done)
        page = pages.get(i, ZERO_PAGE)
        pages[i] = page[:o] + bytes(buf[done:done + n]) + page[o + n:]
        offset += n
        done += n


def _punch(count, offset):
    while count > 0:
        i, o = divmod(offset, PAGE)
        n = min(PAGE - o, count)
        if n == PAGE:
            pages.pop(i, None)
        elif i in pages:
            pages[i] = pages[i][:o] + bytes(n) + pages[i][o + n:]
        offset += n
        count -= n


def pread(h, buf, offset, flags):
    record("pread", len(buf), offset, flags)
    maybe_fail("pread")
    buf[:] = _read(len(buf), offset)


def pwrite(h, buf, offset, flags):
    record("pwrite", len(buf), offset, flags)
    maybe_fail("pwrite")
    _write(buf, offset)


def flush(h, flags):
    record("flush", flags)
    maybe_fail("flush")


def trim(h, count, offset, flags):
    record("trim", count, offset, flags)
    maybe_fail("trim")
    _punch(count, offset)


def zero(h, count, offset, flags):
    record("zero", count, offset, flags)
    maybe_fail("zero")
    _punch(count, offset)


def cache(h, count, offset, flags):
    record("cache", count, offset, flags)
    maybe_fail("cache")


def extents(h, count, offset, flags):
    record("extents", count, offset, flags)
    maybe_fail("extents")
    out = []
    first = offset // PAGE
    last = min((offset + count) // PAGE + 1, (size - 1) // PAGE)
    for i in range(first, last + 1):
        kind = 0 if i in pages else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
        out.append((i * PAGE, min(PAGE, size - i * PAGE), kind))
    return out
