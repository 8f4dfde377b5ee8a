/* luanbd.server._fastpath: the request loop of a connection for its most common requests,
 * compiled.
 *
 * At one request in flight (QD1) CPython spends more time interpreting the request path
 * (parse, dispatch, reply) than the kernel spends moving the bytes (bench/README.md has
 * the figures).  This loop does the same steps as
 * the Python loop (server/connection.py _transmission, server/requests.py) for a plain
 * READ or WRITE without the interpreter: it receives into the parser's buffer, parses
 * classic headers, calls the Lua wrapper through lupa (which takes lupa's own lock and
 * releases the GIL while Lua runs) under the request lock, encodes the replies and sends
 * a batch with one sendmsg.  Anything else (another command, a flag, an error result, a big
 * request, the stop flag) goes back to Python: an error result through the `slow`
 * callback, any other request by returning, so the Python loop (the reference) handles it.
 *
 * serve(loop, buf, pos, end, send_lock) -> (pos, end, eof)
 *   loop: a luanbd.server.compiled.CompiledLoop; its fields are read by name once per
 *     call (never per request):
 *       fd          the connection's socket
 *       plain       a protocol.transmission.PlainRequests: size, writable, max_length.
 *                   The requests served here are exactly those plain.admits() takes
 *                   (plain_admits below is the same predicate); the rest go back.
 *       structured  structured replies were negotiated (a READ is an OFFSET_DATA chunk)
 *       call, pread, pwrite, handle, api2
 *                   the plugin's CompiledCalls: call(pread, handle, count, offset[, 0]),
 *                   call(pwrite, handle, bytes, offset[, 0]) (flags argument when api2);
 *                   pwrite is None only when plain.writable is false
 *       lock        the request lock (its acquire/release, looked up here), or None
 *       stop        a requests.StopFlag: its `cell`, a bytearray(1), is nonzero once no new
 *                   request may be served (shutdown, nbdkit_disconnect); checked before each
 *                   request, which is then left to Python (ESHUTDOWN)
 *       slow        slow(cmd, cookie, offset, count, result) -> short list of buffers: the
 *                   reply to a result that is not plain success
 *       max_batch   READ bytes per batch above which the batch is sent before more is
 *                   executed (as MAX_BATCH does in Python: backpressure)
 *       poll_ns     before sleeping in recv for the next request, poll this many ns
 *                   (_fastpath_poll.c; 0: never)
 *       stats, stats_bounds, stats_stride
 *                   --metrics: the connection's ConnStats.cells (array('Q')) updated per
 *                   request as stats.record does, or None; the buckets' bounds in ns
 *   buf: the parser's bytearray; [pos, end) holds unparsed bytes.  It is never resized.
 *   send_lock: the writer thread's lock while that thread runs, else None.
 * Returns when the request at pos is not for this loop (eof False) or the client closed
 * the connection (eof True).  Socket errors raise OSError; an exception from lupa or a
 * callback propagates as it would from the Python loop.
 *
 * admits(plain, cmd, flags, offset, length) -> bool: plain_admits, for tests to compare
 * with PlainRequests.admits (_fastpath_config.c).
 *
 * poll_counts() -> (hits, misses, skipped): the waits for a request of every connection so
 * far, by what the poll before recv did (_fastpath_poll.c).
 *
 * The protocol's numbers (magics, commands, reply flags and types, header sizes) are read
 * from luanbd.protocol.constants when the module is imported (_fastpath_config.c, which
 * also reads the loop's fields).  The header layouts are compile-time (field offsets, the
 * reply header buffer, _fastpath.h): the import checks them against the struct formats of
 * luanbd.protocol.constants and fails if they differ.
 */
#include "_fastpath.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* Replies per batch: each takes two iovecs, or up to MAX_LIST from the slow path, and a
 * sendmsg takes at most IOV_MAX (1024) iovecs. */
#define MAX_LIST 8
#define MAX_REPLIES 128
#define MAX_IOV (MAX_REPLIES * MAX_LIST)

struct reply {
    unsigned char header[FP_REPLY_HEADER_MAX];
    int header_len;
    PyObject *data;   /* owned: READ data (bytes), or a list of buffers from `slow` */
    int is_list;
};

struct batch {
    struct reply replies[MAX_REPLIES];
    int n;
    Py_ssize_t data;
    struct iovec iov[MAX_IOV];
    Py_buffer views[MAX_IOV];
};

static inline uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t get64(const unsigned char *p) {
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}
static inline void put16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = (unsigned char)v; }
static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static inline void put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }

static void batch_clear(struct batch *b) {
    for (int i = 0; i < b->n; i++)
        Py_CLEAR(b->replies[i].data);
    b->n = 0;
    b->data = 0;
}

static int call_method(PyObject *obj, const char *name) {
    PyObject *r = PyObject_CallMethod(obj, name, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Send every reply of the batch (under send_lock unless None), then clear it.
 * 0, or -1 with an exception set. */
static int batch_send(struct batch *b, int fd, PyObject *send_lock) {
    struct iovec *iov = b->iov;
    int niov = 0, nviews = 0, rc = 0, err = 0;

    if (b->n == 0)
        return 0;
    for (int i = 0; i < b->n && rc == 0; i++) {
        struct reply *r = &b->replies[i];
        if (!r->is_list) {
            iov[niov].iov_base = r->header;
            iov[niov].iov_len = (size_t)r->header_len;
            niov++;
            if (r->data != NULL) {
                iov[niov].iov_base = PyBytes_AS_STRING(r->data);
                iov[niov].iov_len = (size_t)PyBytes_GET_SIZE(r->data);
                niov++;
            }
            continue;
        }
        /* A list of at most MAX_LIST buffers (bytes, memoryview) from the slow path. */
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(r->data); j++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(r->data, j), &b->views[nviews],
                                   PyBUF_SIMPLE) < 0) {
                rc = -1;
                break;
            }
            iov[niov].iov_base = b->views[nviews].buf;
            iov[niov].iov_len = (size_t)b->views[nviews].len;
            niov++;
            nviews++;
        }
    }
    if (rc == 0 && send_lock != Py_None)
        rc = call_method(send_lock, "acquire");
    if (rc == 0) {
        struct iovec *cur = iov;
        int left = niov;
        Py_BEGIN_ALLOW_THREADS
        while (left > 0) {
            struct msghdr msg;
            memset(&msg, 0, sizeof msg);
            msg.msg_iov = cur;
            msg.msg_iovlen = (size_t)left;
            ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
            if (sent < 0) {
                if (errno == EINTR)
                    continue;
                err = errno;
                break;
            }
            while (left > 0 && (size_t)sent >= cur->iov_len) {
                sent -= (ssize_t)cur->iov_len;
                cur++;
                left--;
            }
            if (left > 0 && sent > 0) {
                cur->iov_base = (char *)cur->iov_base + sent;
                cur->iov_len -= (size_t)sent;
            }
        }
        Py_END_ALLOW_THREADS
        if (send_lock != Py_None)
            rc = call_method(send_lock, "release");
        if (err != 0 && rc == 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            rc = -1;
        }
    }
    for (int i = 0; i < nviews; i++)
        PyBuffer_Release(&b->views[i]);
    batch_clear(b);
    return rc;
}

static int lock_call(PyObject *fn) {
    if (fn == NULL)
        return 0;
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Call the plugin for the request at h under the request lock: its result, or NULL with
 * an exception. */
static PyObject *execute(const struct loop *l, const unsigned char *h, uint16_t type,
                         PyObject *count, PyObject *off, PyObject *zero) {
    PyObject *payload = NULL, *res = NULL, *et, *ev, *tb;
    if (type == fp.cmd_write) {
        payload = PyBytes_FromStringAndSize((const char *)h + fp.request_size,
                                            (Py_ssize_t)get32(h + RQ_LENGTH));
        if (payload == NULL)
            return NULL;
    }
    if (lock_call(l->acquire) < 0) {
        Py_XDECREF(payload);
        return NULL;
    }
    PyObject *argv[5] = {type == fp.cmd_read ? l->pread : l->pwrite, l->handle,
                         type == fp.cmd_read ? count : payload, off, zero};
    res = PyObject_Vectorcall(l->call, argv, l->api2 ? 5 : 4, NULL);
    /* Release the lock whatever happened, keeping the call's exception. */
    PyErr_Fetch(&et, &ev, &tb);
    if (lock_call(l->release) < 0) {
        Py_CLEAR(res);
        if (et != NULL)
            PyErr_Clear();
    }
    if (et != NULL)
        PyErr_Restore(et, ev, tb);
    Py_XDECREF(payload);
    return res;
}

/* The reply to a request's result: encoded here for plain success, else from `slow`.
 * Steals res.  0, or -1 with an exception. */
static int add_reply(struct batch *b, const struct loop *l, uint16_t type, uint64_t cookie,
                     uint64_t offset, uint32_t length, PyObject *count, PyObject *res) {
    struct reply *r = &b->replies[b->n];
    int happy = 0;
    PyObject *value = NULL;
    if (type == fp.cmd_read) {
        if (PyTuple_CheckExact(res) && PyTuple_GET_SIZE(res) >= 2 &&
            PyTuple_GET_ITEM(res, 0) == Py_True) {
            value = PyTuple_GET_ITEM(res, 1);
            happy = PyBytes_CheckExact(value) && PyBytes_GET_SIZE(value) == length;
        }
    } else {
        happy = res == Py_True || (PyTuple_CheckExact(res) && PyTuple_GET_SIZE(res) >= 1 &&
                                   PyTuple_GET_ITEM(res, 0) == Py_True);
    }
    if (happy) {
        r->is_list = 0;
        if (type == fp.cmd_read && l->structured) {
            put32(r->header, fp.structured_reply_magic);
            put16(r->header + ST_FLAGS, fp.reply_flag_done);
            put16(r->header + ST_TYPE, fp.reply_type_offset_data);
            put64(r->header + ST_COOKIE, cookie);
            put32(r->header + ST_LENGTH, (uint32_t)fp.offset_data_size + length);
            put64(r->header + fp.structured_size, offset);
            r->header_len = (int)(fp.structured_size + fp.offset_data_size);
        } else {
            put32(r->header, fp.simple_reply_magic);
            put32(r->header + SR_ERROR, 0);
            put64(r->header + SR_COOKIE, cookie);
            r->header_len = (int)fp.simple_size;
        }
        if (type == fp.cmd_read) {
            Py_INCREF(value);
            r->data = value;
            b->data += length;
        } else {
            r->data = NULL;
        }
        Py_DECREF(res);
        b->n++;
        return 0;
    }
    /* Anything else is the Python loop's business: errors, wrong types. */
    PyObject *c = PyLong_FromUnsignedLongLong(cookie);
    PyObject *o = PyLong_FromUnsignedLongLong(offset);
    PyObject *list = NULL;
    if (c != NULL && o != NULL)
        list = PyObject_CallFunction(l->slow, "iOOOO", (int)type, c, o, count, res);
    Py_XDECREF(c);
    Py_XDECREF(o);
    Py_DECREF(res);
    if (list == NULL)
        return -1;
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) > MAX_LIST) {
        Py_DECREF(list);
        PyErr_SetString(PyExc_TypeError, "_fastpath: slow() must return a short list");
        return -1;
    }
    r->is_list = 1;
    r->data = list;
    b->n++;
    return 0;
}

/* --metrics: one request served here, as stats.record does for the Python loop. */
static void stat_record(const struct loop *l, uint16_t type, uint32_t length,
                        uint64_t latency, uint64_t plugin) {
    uint64_t *c = (uint64_t *)l->stats.buf + (Py_ssize_t)type * l->stride;
    const uint64_t *bounds = l->bounds.buf;
    Py_ssize_t bucket = 0;
    while (bucket < l->nbounds && latency > bounds[bucket])
        bucket++;
    c[FP_STAT_REQUESTS]++;
    c[FP_STAT_BYTES] += length;
    c[FP_STAT_LATENCY_NS] += latency;
    c[FP_STAT_PLUGIN_NS] += plugin;
    c[FP_STAT_COMPILED]++;
    c[FP_STAT_FIRST_BUCKET + bucket]++;
}

static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *bufobj, *send_lock;
    Py_ssize_t pos, end;
    struct loop l;
    (void)self;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "serve(loop, buf, pos, end, send_lock)");
        return NULL;
    }
    bufobj = args[1];
    send_lock = args[4];
    pos = PyLong_AsSsize_t(args[2]);
    end = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyByteArray_CheckExact(bufobj)) {
        PyErr_SetString(PyExc_TypeError, "_fastpath.serve: the buffer must be a bytearray");
        return NULL;
    }
    if (fp_loop_read(args[0], &l) < 0) {
        fp_loop_release(&l);
        return NULL;
    }
    unsigned char *buf = (unsigned char *)PyByteArray_AS_STRING(bufobj);
    Py_ssize_t cap = PyByteArray_GET_SIZE(bufobj);
    /* Room for one whole request of the largest size served here. */
    Py_ssize_t room = fp.request_size + (Py_ssize_t)l.plain.max_length;
    if (pos < 0 || end < pos || end > cap || cap < room) {
        PyErr_SetString(PyExc_ValueError, "_fastpath.serve: bad buffer positions");
        fp_loop_release(&l);
        return NULL;
    }

    struct batch *b = PyMem_Malloc(sizeof *b);
    if (b == NULL) {
        fp_loop_release(&l);
        return PyErr_NoMemory();
    }
    b->n = 0;
    b->data = 0;
    int eof = 0;
    /* Poll before a wait only if one request was served here since the last one: a client
     * that waits for each reply (QD1).  With more in flight a sleep costs each of them less;
     * big or special requests (the Python loop's) leave the CPU to their replies. */
    int served = 0;
    fp_busy(1);  /* from here to each return: serving (see _fastpath_poll.c) */
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL)
        goto error;

    for (;;) {
        int stop = 0;
        /* Execute every complete request that is ours. */
        while (end - pos >= fp.request_size) {
            const unsigned char *h = buf + pos;
            uint16_t flags = get16(h + RQ_FLAGS), type = get16(h + RQ_TYPE);
            uint64_t cookie = get64(h + RQ_COOKIE), offset = get64(h + RQ_OFFSET);
            uint32_t length = get32(h + RQ_LENGTH);
            if (get32(h) != fp.request_magic ||
                !plain_admits(&l.plain, type, flags, offset, length)) {
                stop = 1;
                break;
            }
            if (type == fp.cmd_write && end - pos - fp.request_size < (Py_ssize_t)length)
                break;  /* the payload is still coming */
            if (loop_stopped(&l)) {
                stop = 1;
                break;
            }
            if (b->n == MAX_REPLIES || b->data >= l.max_batch) {
                if (batch_send(b, l.fd, send_lock) < 0)
                    goto error;
            }
            PyObject *count = PyLong_FromUnsignedLong(length);
            PyObject *off = PyLong_FromUnsignedLongLong(offset);
            PyObject *res = NULL;
            int metered = l.stats.obj != NULL;
            uint64_t start = metered ? now_ns() : 0, called = 0;
            if (count != NULL && off != NULL)
                res = execute(&l, h, type, count, off, zero);
            if (metered)
                called = now_ns();
            Py_XDECREF(off);
            if (res == NULL) {
                Py_XDECREF(count);
                goto error;
            }
            pos += fp.request_size + (type == fp.cmd_write ? (Py_ssize_t)length : 0);
            int rc = add_reply(b, &l, type, cookie, offset, length, count, res);
            Py_DECREF(count);
            if (rc < 0)
                goto error;
            served++;
            if (metered)
                stat_record(&l, type, length, now_ns() - start, called - start);
        }
        if (batch_send(b, l.fd, send_lock) < 0)
            goto error;
        if (stop)
            break;
        /* Make room for one whole request, then wait for more bytes. */
        if (pos == end) {
            pos = end = 0;
        } else if (cap - pos < room) {
            memmove(buf, buf + pos, (size_t)(end - pos));
            end -= pos;
            pos = 0;
        }
        ssize_t n;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        fp_busy(-1);
        if (!fp_poll_recv(l.fd, buf + end, (size_t)(cap - end), served == 1 ? l.poll_ns : 0,
                          &n)) {
            do {
                n = recv(l.fd, buf + end, (size_t)(cap - end), 0);
            } while (n < 0 && errno == EINTR);
        }
        if (n < 0)
            err = errno;
        fp_busy(1);
        Py_END_ALLOW_THREADS
        served = 0;
        if (n < 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
        if (n == 0) {
            eof = 1;
            break;
        }
        end += n;
    }
    fp_busy(-1);
    Py_DECREF(zero);
    PyMem_Free(b);
    fp_loop_release(&l);
    return Py_BuildValue("nnO", pos, end, eof ? Py_True : Py_False);

error:
    fp_busy(-1);
    Py_XDECREF(zero);
    batch_clear(b);
    PyMem_Free(b);
    fp_loop_release(&l);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(loop, buf, pos, end, send_lock) -> (pos, end, eof)"},
    {"admits", (PyCFunction)(void (*)(void))fp_admits, METH_FASTCALL,
     "admits(plain, cmd, flags, offset, length) -> bool: the loop's plain-request test"},
    {"poll_counts", fp_poll_counts, METH_NOARGS,
     "poll_counts() -> (hits, misses, skipped): waits for a request, by outcome of the poll"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "luanbd.server._fastpath",
    "The compiled request loop for plain READ and WRITE requests.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (fp_load_protocol() < 0)
        return NULL;
    fp_poll_init();
    return PyModule_Create(&module);
}
