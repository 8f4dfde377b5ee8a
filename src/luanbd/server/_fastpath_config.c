/* luanbd.server._fastpath, its inputs: the protocol's numbers from luanbd.protocol.constants
 * (once, at import) and a CompiledLoop's fields (once per serve() call).  See _fastpath.c. */
#include "_fastpath.h"

#include <string.h>

struct fp_protocol fp;

/* The attribute `name` of obj as an unsigned integer of at most `max`. */
static int get_uint(PyObject *obj, const char *name, uint64_t max, uint64_t *out) {
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (x > max) {
        PyErr_Format(PyExc_OverflowError, "%s is too large (%llu)", name, x);
        return -1;
    }
    *out = x;
    return 0;
}

static int get_bool(PyObject *obj, const char *name, int *out) {
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL)
        return -1;
    *out = PyObject_IsTrue(v);
    Py_DECREF(v);
    return *out < 0 ? -1 : 0;
}

int fp_plain_read(PyObject *obj, struct plain *p) {
    if (get_uint(obj, "size", UINT64_MAX, &p->size) < 0 ||
        get_uint(obj, "max_length", UINT64_MAX, &p->max_length) < 0 ||
        get_bool(obj, "writable", &p->writable) < 0)
        return -1;
    if (p->max_length > UINT32_MAX)  /* a bound above the length field's range */
        p->max_length = UINT32_MAX;
    return 0;
}

void fp_loop_release(struct loop *l) {
    Py_CLEAR(l->call);
    Py_CLEAR(l->pread);
    Py_CLEAR(l->pwrite);
    Py_CLEAR(l->handle);
    Py_CLEAR(l->slow);
    Py_CLEAR(l->acquire);
    Py_CLEAR(l->release);
    if (l->stop.obj != NULL)
        PyBuffer_Release(&l->stop);
    if (l->stats.obj != NULL)
        PyBuffer_Release(&l->stats);
    if (l->bounds.obj != NULL)
        PyBuffer_Release(&l->bounds);
}

/* loop.stats (an array('Q') or None), loop.stats_bounds and loop.stats_stride. */
static int stats_read(PyObject *obj, struct loop *l) {
    PyObject *stats = PyObject_GetAttrString(obj, "stats"), *bounds = NULL;
    uint64_t stride;
    int rc = -1;
    if (stats == NULL)
        return -1;
    if (stats == Py_None) {
        rc = 0;
        goto done;
    }
    if ((bounds = PyObject_GetAttrString(obj, "stats_bounds")) == NULL ||
        get_uint(obj, "stats_stride", 4096, &stride) < 0 ||
        PyObject_GetBuffer(stats, &l->stats, PyBUF_WRITABLE | PyBUF_FORMAT) < 0 ||
        PyObject_GetBuffer(bounds, &l->bounds, PyBUF_FORMAT) < 0)
        goto done;
    l->stride = (Py_ssize_t)stride;
    l->nbounds = l->bounds.len / 8;
    /* Room for READ's and WRITE's cells, each with a bucket per bound and +Inf. */
    Py_ssize_t top = fp.cmd_read > fp.cmd_write ? fp.cmd_read : fp.cmd_write;
    if (l->stats.itemsize != 8 || l->bounds.itemsize != 8 ||
        strcmp(l->stats.format, "Q") != 0 || strcmp(l->bounds.format, "Q") != 0 ||
        l->stride < FP_STAT_FIRST_BUCKET + l->nbounds + 1 ||
        l->stats.len < (top + 1) * l->stride * 8) {
        PyErr_SetString(PyExc_ValueError, "_fastpath: bad stats layout");
        goto done;
    }
    rc = 0;
done:
    Py_DECREF(stats);
    Py_XDECREF(bounds);
    return rc;
}

int fp_loop_read(PyObject *obj, struct loop *l) {
    PyObject *plain = NULL, *lock = NULL, *stop = NULL, *cell = NULL;
    uint64_t fd, batch, poll_ns;
    int rc = -1;

    memset(l, 0, sizeof *l);
    if (get_uint(obj, "fd", INT32_MAX, &fd) < 0 || get_bool(obj, "structured", &l->structured) < 0
        || get_bool(obj, "api2", &l->api2) < 0
        || get_uint(obj, "max_batch", PY_SSIZE_T_MAX, &batch) < 0
        || get_uint(obj, "poll_ns", UINT32_MAX, &poll_ns) < 0)
        return -1;
    l->fd = (int)fd;
    l->max_batch = (Py_ssize_t)batch;
    l->poll_ns = poll_ns;
    if ((plain = PyObject_GetAttrString(obj, "plain")) == NULL ||
        fp_plain_read(plain, &l->plain) < 0)
        goto done;
    if ((l->call = PyObject_GetAttrString(obj, "call")) == NULL ||
        (l->pread = PyObject_GetAttrString(obj, "pread")) == NULL ||
        (l->pwrite = PyObject_GetAttrString(obj, "pwrite")) == NULL ||
        (l->handle = PyObject_GetAttrString(obj, "handle")) == NULL ||
        (l->slow = PyObject_GetAttrString(obj, "slow")) == NULL ||
        (lock = PyObject_GetAttrString(obj, "lock")) == NULL ||
        (stop = PyObject_GetAttrString(obj, "stop")) == NULL ||
        (cell = PyObject_GetAttrString(stop, "cell")) == NULL)
        goto done;
    if (l->plain.writable && l->pwrite == Py_None) {
        PyErr_SetString(PyExc_ValueError, "_fastpath: plain.writable without pwrite");
        goto done;
    }
    if (lock != Py_None && ((l->acquire = PyObject_GetAttrString(lock, "acquire")) == NULL ||
                            (l->release = PyObject_GetAttrString(lock, "release")) == NULL))
        goto done;
    if (!PyByteArray_Check(cell)) {
        PyErr_SetString(PyExc_TypeError, "_fastpath: stop.cell must be a bytearray");
        goto done;
    }
    /* Holding a buffer export: the bytearray cannot be resized under us. */
    if (PyObject_GetBuffer(cell, &l->stop, PyBUF_SIMPLE) < 0)
        goto done;
    if (l->stop.len < 1) {
        PyErr_SetString(PyExc_ValueError, "_fastpath: stop.cell is empty");
        goto done;
    }
    if (stats_read(obj, l) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(plain);
    Py_XDECREF(lock);
    Py_XDECREF(stop);
    Py_XDECREF(cell);
    return rc;
}

/* constants.<cls>.<name> (constants.<name> when cls is NULL), at most max. */
static int constant(PyObject *constants, const char *cls, const char *name, uint64_t max,
                    uint64_t *out) {
    PyObject *owner = cls == NULL ? constants : PyObject_GetAttrString(constants, cls);
    if (owner == NULL)
        return -1;
    int rc = get_uint(owner, name, max, out);
    if (owner != constants)
        Py_DECREF(owner);
    return rc;
}

/* A wire struct of luanbd.protocol.constants: its format must be `format`, the layout this
 * module encodes; its size into *size. */
static int layout(PyObject *constants, const char *name, const char *format, Py_ssize_t *size) {
    PyObject *st = PyObject_GetAttrString(constants, name);
    if (st == NULL)
        return -1;
    PyObject *fmt = PyObject_GetAttrString(st, "format");
    uint64_t n = 0;
    int rc = -1;
    if (fmt != NULL && get_uint(st, "size", PY_SSIZE_T_MAX, &n) == 0) {
        if (PyUnicode_Check(fmt) && PyUnicode_CompareWithASCIIString(fmt, format) == 0) {
            *size = (Py_ssize_t)n;
            rc = 0;
        } else {
            PyErr_Format(PyExc_ImportError, "luanbd.protocol.constants.%s is %R: "
                         "luanbd.server._fastpath was built for %s", name, fmt, format);
        }
    }
    Py_XDECREF(fmt);
    Py_DECREF(st);
    return rc;
}

int fp_load_protocol(void) {
    PyObject *c = PyImport_ImportModule("luanbd.protocol.constants");
    uint64_t v[7];
    int rc = -1;
    if (c == NULL)
        return -1;
    if (constant(c, NULL, "REQUEST_MAGIC", UINT32_MAX, &v[0]) < 0 ||
        constant(c, NULL, "SIMPLE_REPLY_MAGIC", UINT32_MAX, &v[1]) < 0 ||
        constant(c, NULL, "STRUCTURED_REPLY_MAGIC", UINT32_MAX, &v[2]) < 0 ||
        constant(c, "Cmd", "READ", UINT16_MAX, &v[3]) < 0 ||
        constant(c, "Cmd", "WRITE", UINT16_MAX, &v[4]) < 0 ||
        constant(c, "ReplyFlag", "DONE", UINT16_MAX, &v[5]) < 0 ||
        constant(c, "ReplyType", "OFFSET_DATA", UINT16_MAX, &v[6]) < 0 ||
        layout(c, "REQUEST_HEADER", FP_REQUEST_FORMAT, &fp.request_size) < 0 ||
        layout(c, "SIMPLE_REPLY", FP_SIMPLE_REPLY_FORMAT, &fp.simple_size) < 0 ||
        layout(c, "STRUCTURED_REPLY_HEADER", FP_STRUCTURED_REPLY_FORMAT,
               &fp.structured_size) < 0 ||
        layout(c, "OFFSET_DATA_PREFIX", FP_OFFSET_DATA_FORMAT, &fp.offset_data_size) < 0)
        goto refused;
    if (fp.simple_size > FP_REPLY_HEADER_MAX ||
        fp.structured_size + fp.offset_data_size > FP_REPLY_HEADER_MAX) {
        PyErr_SetString(PyExc_ImportError, "luanbd.server._fastpath: reply headers too long");
        goto done;
    }
    fp.request_magic = (uint32_t)v[0];
    fp.simple_reply_magic = (uint32_t)v[1];
    fp.structured_reply_magic = (uint32_t)v[2];
    fp.cmd_read = (uint16_t)v[3];
    fp.cmd_write = (uint16_t)v[4];
    fp.reply_flag_done = (uint16_t)v[5];
    fp.reply_type_offset_data = (uint16_t)v[6];
    rc = 0;
    goto done;
refused:
    /* Whatever went wrong (a value that does not fit, a name that is missing) refuses the
     * import: the Python loop then serves everything. */
    if (!PyErr_ExceptionMatches(PyExc_ImportError)) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        PyErr_Format(PyExc_ImportError, "luanbd.server._fastpath: luanbd.protocol.constants: "
                     "%S", ev);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
    }
done:
    Py_DECREF(c);
    return rc;
}

/* admits(): plain_admits, for tests to compare with PlainRequests.admits. */
PyObject *fp_admits(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    struct plain p;
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "admits(plain, cmd, flags, offset, length)");
        return NULL;
    }
    if (fp_plain_read(args[0], &p) < 0)
        return NULL;
    unsigned long cmd = PyLong_AsUnsignedLong(args[1]), flags = PyLong_AsUnsignedLong(args[2]);
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long length = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (cmd > UINT16_MAX || flags > UINT16_MAX || length > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "admits: a field wider than its header field");
        return NULL;
    }
    return PyBool_FromLong(plain_admits(&p, (uint16_t)cmd, (uint16_t)flags, offset, length));
}
