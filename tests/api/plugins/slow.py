# slow.py: the twin of slow.lua for `nbdkit python`.
import builtins
import time

import nbdkit

API_VERSION = 2

log_path = None
delay = 0.3
model = None
MODELS = {
    "serialize_connections": nbdkit.THREAD_MODEL_SERIALIZE_CONNECTIONS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}


def config(key, value):
    global log_path, delay, model
    if key == "log":
        log_path = value
    elif key == "thread_model":
        model = MODELS[value]
    elif key == "delay":
        delay = float(value)
    else:
        raise RuntimeError("unknown key " + key)


def thread_model():
    return model if model is not None else nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def record(what):
    with builtins.open(log_path, "a") as f:
        f.write(what + "\n")


def open(readonly):
    return {"name": nbdkit.export_name()}


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    record("enter " + h["name"])
    time.sleep(delay)
    record("leave " + h["name"])
    buf[:] = bytes(len(buf))
