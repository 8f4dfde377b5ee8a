/* luanbd.server._fastpath: the request loop of a connection for its most common requests,
 * compiled.
 *
 * At one request in flight (QD1) CPython spends more time interpreting the request path
 * (parse, dispatch, reply) than the kernel spends moving the bytes: ~16 us per request
 * against nbdkit's ~3 us of user time (bench/README.md).  This loop does the same steps as
 * Connection._transmission for a plain READ or WRITE (no flags, in range, below 64 KiB,
 * classic request headers) without the interpreter: it receives into the parser's buffer,
 * parses headers, calls the Lua wrapper through lupa (which takes lupa's own lock and
 * releases the GIL while Lua runs) under the request lock, encodes the replies and sends
 * a batch with one sendmsg.  Anything else (another command, a flag, an error result, a big
 * request, shutdown) goes back to Python: an error result through the `slow` callback, any
 * other request by returning, so the Python loop (the reference) handles it.
 *
 * serve(setup, buf, pos, end, send_lock) -> (pos, end, eof)
 *   setup: (fd, size, structured, call, pread_fn, pwrite_fn or None, handle, api2,
 *           acquire or None, release or None, conn, service, slow)
 *   buf: the parser's bytearray; [pos, end) holds unparsed bytes.  It is never resized.
 *   send_lock: the writer thread's lock while that thread runs, else None.
 * Returns when the request at pos is not for this loop (eof False) or the client closed
 * the connection (eof True).  Socket errors raise OSError; an exception from lupa or a
 * callback propagates as it would from the Python loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define CMD_READ 0
#define CMD_WRITE 1
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_OFFSET_DATA 1
#define HEADER 28
/* Requests below this size are served here: at 64 KiB and up a READ is pinned
 * (luanbd.lua.pinning) and a WRITE payload may be received straight into its bytes. */
#define FAST_MAX (64 * 1024)
/* Replies per batch: each takes two iovecs, or up to MAX_LIST from the slow path, and a
 * sendmsg takes at most IOV_MAX (1024) iovecs.  READ data per batch is bounded too (above
 * it: send before executing more, as MAX_BATCH does in Python). */
#define MAX_LIST 8
#define MAX_REPLIES 128
#define MAX_IOV (MAX_REPLIES * MAX_LIST)
#define MAX_DATA (4 * 1024 * 1024)

struct reply {
    unsigned char header[28];
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

static PyObject *str_stopping, *str_closing;

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

/* True when the Python loop must see the next request (nbdkit.disconnect, shutdown). */
static int must_stop(PyObject *conn, PyObject *service) {
    PyObject *v = PyObject_GetAttr(service, str_stopping);
    int stop;
    if (v == NULL)
        return -1;
    stop = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (stop)
        return stop;
    v = PyObject_GetAttr(conn, str_closing);
    if (v == NULL)
        return -1;
    stop = PyObject_IsTrue(v);
    Py_DECREF(v);
    return stop;
}

static int lock_call(PyObject *fn) {
    if (fn == Py_None)
        return 0;
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *setup, *bufobj, *send_lock;
    Py_ssize_t pos, end;
    (void)self;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "serve(setup, buf, pos, end, send_lock)");
        return NULL;
    }
    setup = args[0];
    bufobj = args[1];
    send_lock = args[4];
    pos = PyLong_AsSsize_t(args[2]);
    end = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyTuple_CheckExact(setup) || PyTuple_GET_SIZE(setup) != 13 ||
        !PyByteArray_CheckExact(bufobj)) {
        PyErr_SetString(PyExc_TypeError, "_fastpath.serve: bad setup or buffer");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(setup, 0));
    uint64_t size = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(setup, 1));
    int structured = PyObject_IsTrue(PyTuple_GET_ITEM(setup, 2));
    PyObject *call = PyTuple_GET_ITEM(setup, 3);
    PyObject *pread_fn = PyTuple_GET_ITEM(setup, 4);
    PyObject *pwrite_fn = PyTuple_GET_ITEM(setup, 5);
    PyObject *handle = PyTuple_GET_ITEM(setup, 6);
    int api2 = PyObject_IsTrue(PyTuple_GET_ITEM(setup, 7));
    PyObject *acquire = PyTuple_GET_ITEM(setup, 8);
    PyObject *release = PyTuple_GET_ITEM(setup, 9);
    PyObject *conn = PyTuple_GET_ITEM(setup, 10);
    PyObject *service = PyTuple_GET_ITEM(setup, 11);
    PyObject *slow = PyTuple_GET_ITEM(setup, 12);
    if (PyErr_Occurred())
        return NULL;

    unsigned char *buf = (unsigned char *)PyByteArray_AS_STRING(bufobj);
    Py_ssize_t cap = PyByteArray_GET_SIZE(bufobj);
    if (pos < 0 || end < pos || end > cap || cap < HEADER + FAST_MAX) {
        PyErr_SetString(PyExc_ValueError, "_fastpath.serve: bad buffer positions");
        return NULL;
    }

    struct batch *b = PyMem_Malloc(sizeof *b);
    if (b == NULL)
        return PyErr_NoMemory();
    b->n = 0;
    b->data = 0;
    int eof = 0;
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL)
        goto error;

    for (;;) {
        int stop = 0;
        /* Execute every complete request that is ours. */
        while (end - pos >= HEADER) {
            const unsigned char *h = buf + pos;
            uint32_t magic = get32(h);
            uint16_t flags = get16(h + 4), type = get16(h + 6);
            uint64_t cookie = get64(h + 8), offset = get64(h + 16);
            uint32_t length = get32(h + 24);
            if (magic != REQUEST_MAGIC || flags != 0 || length == 0 || length >= FAST_MAX ||
                offset > size || length > size - offset ||
                (type != CMD_READ && !(type == CMD_WRITE && pwrite_fn != Py_None))) {
                stop = 1;
                break;
            }
            if (type == CMD_WRITE && end - pos - HEADER < (Py_ssize_t)length)
                break;  /* the payload is still coming */
            int s = must_stop(conn, service);
            if (s < 0)
                goto error;
            if (s) {
                stop = 1;
                break;
            }
            if (b->n == MAX_REPLIES || b->data >= MAX_DATA) {
                if (batch_send(b, fd, send_lock) < 0)
                    goto error;
            }

            PyObject *count = PyLong_FromUnsignedLong(length);
            PyObject *off = PyLong_FromUnsignedLongLong(offset);
            PyObject *payload = NULL, *res = NULL;
            if (count == NULL || off == NULL)
                goto call_done;
            if (type == CMD_WRITE) {
                payload = PyBytes_FromStringAndSize((const char *)h + HEADER, length);
                if (payload == NULL)
                    goto call_done;
            }
            if (lock_call(acquire) < 0)
                goto call_done;
            {
                PyObject *argv[5];
                PyObject *et, *ev, *tb;
                argv[0] = type == CMD_READ ? pread_fn : pwrite_fn;
                argv[1] = handle;
                argv[2] = type == CMD_READ ? count : payload;
                argv[3] = off;
                argv[4] = zero;
                res = PyObject_Vectorcall(call, argv, api2 ? 5 : 4, NULL);
                /* Release the lock whatever happened, keeping the call's exception. */
                PyErr_Fetch(&et, &ev, &tb);
                if (lock_call(release) < 0) {
                    Py_CLEAR(res);
                    if (et != NULL)
                        PyErr_Clear();
                }
                if (et != NULL)
                    PyErr_Restore(et, ev, tb);
            }
        call_done:
            Py_XDECREF(off);
            Py_XDECREF(payload);
            if (res == NULL) {
                Py_XDECREF(count);
                goto error;
            }
            pos += HEADER + (type == CMD_WRITE ? (Py_ssize_t)length : 0);

            struct reply *r = &b->replies[b->n];
            int happy = 0;
            PyObject *value = NULL;
            if (type == CMD_READ) {
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
                if (type == CMD_READ && structured) {
                    put32(r->header, STRUCTURED_REPLY_MAGIC);
                    put16(r->header + 4, REPLY_FLAG_DONE);
                    put16(r->header + 6, REPLY_TYPE_OFFSET_DATA);
                    put64(r->header + 8, cookie);
                    put32(r->header + 16, 8 + length);
                    put64(r->header + 20, offset);
                    r->header_len = 28;
                } else {
                    put32(r->header, SIMPLE_REPLY_MAGIC);
                    put32(r->header + 4, 0);
                    put64(r->header + 8, cookie);
                    r->header_len = 16;
                }
                if (type == CMD_READ) {
                    Py_INCREF(value);
                    r->data = value;
                    b->data += length;
                } else {
                    r->data = NULL;
                }
                Py_DECREF(res);
                Py_DECREF(count);
            } else {
                /* Anything else is the Python loop's business: errors, wrong types. */
                PyObject *c = PyLong_FromUnsignedLongLong(cookie);
                PyObject *o = PyLong_FromUnsignedLongLong(offset);
                PyObject *list = NULL;
                if (c != NULL && o != NULL)
                    list = PyObject_CallFunction(slow, "iOOOO", (int)type, c, o, count, res);
                Py_XDECREF(c);
                Py_XDECREF(o);
                Py_DECREF(res);
                Py_DECREF(count);
                if (list == NULL)
                    goto error;
                if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) > MAX_LIST) {
                    Py_DECREF(list);
                    PyErr_SetString(PyExc_TypeError, "_fastpath: slow() must return a short list");
                    goto error;
                }
                r->is_list = 1;
                r->data = list;
            }
            b->n++;
        }
        if (batch_send(b, fd, send_lock) < 0)
            goto error;
        if (stop)
            break;
        /* Make room for one whole small request, then wait for more bytes. */
        if (pos == end) {
            pos = end = 0;
        } else if (cap - pos < HEADER + FAST_MAX) {
            memmove(buf, buf + pos, (size_t)(end - pos));
            end -= pos;
            pos = 0;
        }
        ssize_t n;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        do {
            n = recv(fd, buf + end, (size_t)(cap - end), 0);
        } while (n < 0 && errno == EINTR);
        if (n < 0)
            err = errno;
        Py_END_ALLOW_THREADS
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
    Py_DECREF(zero);
    PyMem_Free(b);
    return Py_BuildValue("nnO", pos, end, eof ? Py_True : Py_False);

error:
    Py_XDECREF(zero);
    batch_clear(b);
    PyMem_Free(b);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(setup, buf, pos, end, send_lock) -> (pos, end, eof)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "luanbd.server._fastpath",
    "The compiled request loop for plain READ and WRITE requests.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    str_stopping = PyUnicode_InternFromString("stopping");
    str_closing = PyUnicode_InternFromString("closing");
    if (str_stopping == NULL || str_closing == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "FAST_MAX", FAST_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
