/* What the two files of luanbd.server._fastpath share: the protocol's numbers, the
 * configuration of a loop and the plain-request predicate (see _fastpath.c). */
#ifndef LUANBD_FASTPATH_H
#define LUANBD_FASTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>

/* The wire layouts encoded and parsed here, as struct formats: the import checks them
 * against luanbd.protocol.constants' structs and fails if they differ. */
#define FP_REQUEST_FORMAT ">IHHQQI"          /* magic, flags, type, cookie, offset, length */
#define FP_SIMPLE_REPLY_FORMAT ">IIQ"        /* magic, error, cookie */
#define FP_STRUCTURED_REPLY_FORMAT ">IHHQI"  /* magic, flags, type, cookie, length */
#define FP_OFFSET_DATA_FORMAT ">Q"           /* an OFFSET_DATA chunk's offset, then data */
/* Field offsets in those layouts. */
enum { RQ_FLAGS = 4, RQ_TYPE = 6, RQ_COOKIE = 8, RQ_OFFSET = 16, RQ_LENGTH = 24 };
enum { SR_ERROR = 4, SR_COOKIE = 8 };
enum { ST_FLAGS = 4, ST_TYPE = 6, ST_COOKIE = 8, ST_LENGTH = 16 };
/* Room for the longest reply header built here: a structured header and its offset. */
#define FP_REPLY_HEADER_MAX 28

#define FP_HIDDEN __attribute__((visibility("hidden")))

/* From luanbd.protocol.constants, set by fp_load_protocol at import. */
struct fp_protocol {
    uint32_t request_magic, simple_reply_magic, structured_reply_magic;
    uint16_t cmd_read, cmd_write, reply_flag_done, reply_type_offset_data;
    Py_ssize_t request_size, simple_size, structured_size, offset_data_size;
};
extern FP_HIDDEN struct fp_protocol fp;

/* A protocol.transmission.PlainRequests. */
struct plain {
    uint64_t size;
    uint64_t max_length;  /* at most UINT32_MAX: the length field's range */
    int writable;
};

/* A server.compiled.CompiledLoop; the objects are owned. */
struct loop {
    int fd;
    struct plain plain;
    int structured, api2;
    PyObject *call, *pread, *pwrite, *handle, *slow;
    PyObject *acquire, *release;  /* the lock's methods, NULL without a lock */
    Py_buffer stop;               /* the stop flag's cell; stop.obj NULL until taken */
    Py_ssize_t max_batch;
    uint64_t poll_ns;             /* before sleeping in recv, poll this long (_fastpath_poll.c) */
    /* --metrics: the connection's ConnStats.cells (stats.obj NULL without metrics), the
     * latency bucket bounds in ns, and the cells per command. */
    Py_buffer stats, bounds;
    Py_ssize_t stride, nbounds;
};

/* A command's cells in ConnStats.cells (luanbd/server/stats.py: REQUESTS ... FIRST_BUCKET). */
enum { FP_STAT_REQUESTS, FP_STAT_BYTES, FP_STAT_LATENCY_NS, FP_STAT_PLUGIN_NS, FP_STAT_COMPILED,
       FP_STAT_FIRST_BUCKET };

/* PlainRequests.admits: no flags, 1 to max_length bytes, in range (offset + length <= size
 * without overflow), a READ or, when writable, a WRITE. */
static inline int plain_admits(const struct plain *p, uint16_t type, uint16_t flags,
                               uint64_t offset, uint64_t length) {
    return flags == 0 && length > 0 && length <= p->max_length && offset <= p->size &&
           length <= p->size - offset &&
           (type == fp.cmd_read || (type == fp.cmd_write && p->writable));
}

/* The stop flag is set: the next request is Python's. */
static inline int loop_stopped(const struct loop *l) {
    return ((volatile const unsigned char *)l->stop.buf)[0] != 0;
}

/* 0, or -1 with an exception set (ImportError when protocol's layouts differ). */
FP_HIDDEN int fp_load_protocol(void);
FP_HIDDEN int fp_plain_read(PyObject *obj, struct plain *p);
/* 0, or -1 with an exception set; call fp_loop_release after either. */
FP_HIDDEN int fp_loop_read(PyObject *obj, struct loop *l);
/* time.perf_counter_ns's clock: request timing (--metrics) and the poll's deadline. */
static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* _fastpath_poll.c: how many threads may poll (at import); then, before a blocking recv,
 * poll for up to poll_ns: 1 with recv's result in *n (and errno), 0 to sleep in recv. */
FP_HIDDEN void fp_poll_init(void);
/* A thread starts (+1) or stops (-1) serving in the compiled loop: it is busy outside its
 * waits for the next request, and nobody polls while another thread is busy. */
FP_HIDDEN void fp_busy(int delta);
/* The module's admits() (_fastpath_config.c) and poll_counts() (_fastpath_poll.c). */
FP_HIDDEN PyObject *fp_admits(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
FP_HIDDEN PyObject *fp_poll_counts(PyObject *self, PyObject *unused);
FP_HIDDEN int fp_poll_recv(int fd, void *dst, size_t room, uint64_t poll_ns, ssize_t *n);
FP_HIDDEN void fp_loop_release(struct loop *l);

#endif
