/* The compiled loop's wait for the next request: poll the socket for a short while before
 * sleeping in recv().
 *
 * One request at a time (QD1), the server thread sleeps between a reply and the next
 * request, and both the sleep and the wake-up cost kernel time (the scheduler, an IPI to a
 * halted CPU under a hypervisor) and latency; when the client's next request comes within
 * a few tens of microseconds, polling for it (recv MSG_DONTWAIT, yielding the CPU between
 * tries) costs about what the sleep and wake-up would, and saves their latency
 * (bench/README.md has the measurements).  It is bounded four ways:
 *   - loop->poll_ns per wait (LUANBD_POLL_US; 0: never poll);
 *   - per connection thread, polls that found nothing back off: after POLL_MISSES misses in
 *     a row, the next waits sleep at once, twice as many each time, up to MAX_BACKOFF (the
 *     read-ahead of big WRITEs, server/readahead.py, backs off by the same rule);
 *   - at most one polling thread fewer than the CPUs this process may run on, so polling
 *     never takes the last CPU from threads with work (none on one CPU);
 *   - no poll while another connection thread is busy serving: with several clients at
 *     once the CPU goes to the threads with work (polling then cost the other clients
 *     latency: bench/README.md).
 * Between tries sched_yield() gives the CPU to any other runnable thread on it (a client
 * on the same CPU, another connection), which then runs first. */

#include "_fastpath.h"

#include <errno.h>
#include <sched.h>
#include <sys/socket.h>

enum { POLL_MISSES = 2, MIN_BACKOFF = 8, MAX_BACKOFF = 4096 };

static int max_pollers;
static int pollers;
/* Connection threads in the compiled loop and not waiting for a request. */
static int busy;
/* Waits by outcome, for --metrics: the poll found data, found none, or was not tried. */
static uint64_t hits, polled_misses, skipped;
static _Thread_local unsigned misses, skip, backoff = MIN_BACKOFF;

void fp_busy(int delta) {
    __atomic_add_fetch(&busy, delta, __ATOMIC_RELAXED);
}

void fp_poll_init(void) {
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    max_pollers = cpus - 1;
}

int fp_poll_recv(int fd, void *dst, size_t room, uint64_t poll_ns, ssize_t *n) {
    if (poll_ns == 0 || max_pollers < 1)
        return 0;
    if (skip > 0 || __atomic_load_n(&busy, __ATOMIC_RELAXED) > 0) {
        if (skip > 0)
            skip--;
        __atomic_add_fetch(&skipped, 1, __ATOMIC_RELAXED);
        return 0;
    }
    if (__atomic_add_fetch(&pollers, 1, __ATOMIC_RELAXED) > max_pollers) {
        __atomic_sub_fetch(&pollers, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&skipped, 1, __ATOMIC_RELAXED);
        return 0;
    }
    int got = 0, err = 0;
    uint64_t until = now_ns() + poll_ns;
    for (;;) {
        ssize_t r = recv(fd, dst, room, MSG_DONTWAIT);
        if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            *n = r;
            err = errno;
            got = 1;
            break;
        }
        if (now_ns() >= until)
            break;
        sched_yield();
    }
    __atomic_sub_fetch(&pollers, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(got ? &hits : &polled_misses, 1, __ATOMIC_RELAXED);
    if (got) {
        misses = 0;
        backoff = MIN_BACKOFF;
    } else if (++misses >= POLL_MISSES) {
        misses = 0;
        skip = backoff;
        backoff = backoff * 2 > MAX_BACKOFF ? MAX_BACKOFF : backoff * 2;
    }
    errno = err;
    return got;
}

PyObject *fp_poll_counts(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("KKK", (unsigned long long)__atomic_load_n(&hits, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&polled_misses, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&skipped, __ATOMIC_RELAXED));
}
