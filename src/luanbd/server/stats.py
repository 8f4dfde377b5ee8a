"""What --metrics counts, kept where counting is cheap: plain integers, no library.

Each connection has a :class:`ConnStats` that only its own thread writes: an ``array('Q')``
of per-command cells, which the compiled loop (server/_fastpath.c) updates in place through
the buffer protocol, and a few Python counters.  :class:`ServerStats` holds the events of
the server as a whole and what closed connections counted.  server/metrics.py reads both
when it is scraped; nothing here knows about Prometheus.
"""

from __future__ import annotations

import threading
from array import array
from collections import Counter
from dataclasses import dataclass, field

from luanbd.protocol.constants import Cmd

#: Per-command cells, in this order (_fastpath.c's FP_STAT_* use the same indices).
REQUESTS, BYTES, LATENCY_NS, PLUGIN_NS, COMPILED = range(5)
#: Then one cell per latency bucket: the count of requests that took at most that long
#: (the last one, +Inf, takes the rest).  Prometheus sums them into its cumulative form.
FIRST_BUCKET = 5
#: Upper bounds of the latency buckets in seconds: a 4k read takes microseconds, a request
#: behind a slow disk or the delay filter seconds.
BUCKET_BOUNDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
                 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BOUNDS_NS = array("Q", (round(b * 1e9) for b in BUCKET_BOUNDS))
#: Cells per command.
STRIDE = FIRST_BUCKET + len(BUCKET_BOUNDS) + 1
#: Commands are indexed by their number (NBD_CMD_READ is 0 ... NBD_CMD_BLOCK_STATUS 7).
COMMANDS = tuple(sorted(Cmd, key=int))
N_COMMANDS = max(int(c) for c in Cmd) + 1

#: Handshake outcomes (luanbd_handshakes_total's label).
HANDSHAKE_OUTCOMES = ("ok", "aborted", "timeout", "tls_failed", "protocol_error",
                      "client_gone", "error")
#: Why a connection was refused or cut off before transmission.
REFUSED_REASONS = ("limit", "timeout", "tls_failed")
#: What the read-ahead did during a big WRITE: the next request started coming meanwhile,
#: it did not, or the read-ahead was not tried (backing off).
READ_AHEAD_OUTCOMES = ("gained", "missed", "skipped")


def record(cells: array[int], cmd: int, nbytes: int, latency_ns: int) -> None:
    """One request served by the Python loop (the compiled loop does the same in C)."""
    base = cmd * STRIDE
    cells[base] += 1
    cells[base + BYTES] += nbytes
    cells[base + LATENCY_NS] += latency_ns
    bucket = 0
    for bound in BOUNDS_NS:
        if latency_ns <= bound:
            break
        bucket += 1
    cells[base + FIRST_BUCKET + bucket] += 1


class ConnStats:
    """One connection's counters: written by its thread, read by the scraper."""

    __slots__ = ("cells", "errors", "export_name", "number", "plugin", "read_aheads",
                 "writer_batches")

    def __init__(self, number: int = 0) -> None:
        #: The connection's number (as in its log lines).
        self.number = number
        self.cells: array[int] = array("Q", bytes(8 * STRIDE * N_COMMANDS))
        #: (command number, errno) -> failed requests.
        self.errors: Counter[tuple[int, int]] = Counter()
        #: Set when the export is chosen (NBD_OPT_GO).
        self.export_name = ""
        #: Reply batches handed to the writer thread.
        self.writer_batches = 0
        #: Big WRITEs by what the read-ahead did (READ_AHEAD_OUTCOMES; server/readahead.py).
        self.read_aheads = [0] * len(READ_AHEAD_OUTCOMES)
        #: The connection's own plugin (its Lua state), for its memory; None if shared.
        self.plugin: object | None = None


@dataclass
class Totals:
    """The sum of the counters of connections that closed, per export name."""

    cells: dict[str, array[int]] = field(default_factory=dict)
    errors: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    writer_batches: int = 0
    read_aheads: list[int] = field(default_factory=lambda: [0] * len(READ_AHEAD_OUTCOMES))

    def add(self, conn: ConnStats) -> None:
        """Add a connection's counters (the live ones are read racily: each cell is one
        word that only grows)."""
        cells = self.cells.setdefault(conn.export_name, array("Q", bytes(len(conn.cells) * 8)))
        for i, v in enumerate(conn.cells):
            if v:
                cells[i] += v
        for (cmd, code), n in list(conn.errors.items()):
            self.errors[conn.export_name, cmd, code] += n
        self.writer_batches += conn.writer_batches
        for i, n in enumerate(conn.read_aheads):
            self.read_aheads[i] += n


class ServerStats:
    """Events of the whole server, and the totals of closed connections.  Connection
    threads report here rarely (a connection's start and end), under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections_total = 0
        self.refused: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()
        self.totals = Totals()
        #: SIGHUP reloads by outcome ("ok", "failed").
        self.reloads: Counter[str] = Counter()
        #: Live connections' stats (a dict used as an ordered set).
        self.live: dict[ConnStats, None] = {}

    def opened(self, conn: ConnStats) -> None:
        with self.lock:
            self.connections_total += 1
            self.live[conn] = None

    def handshake(self, outcome: str) -> None:
        with self.lock:
            self.handshakes[outcome] += 1
            if outcome in REFUSED_REASONS:
                self.refused[outcome] += 1

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] += 1

    def reload(self, outcome: str) -> None:
        with self.lock:
            self.reloads[outcome] += 1

    def closed(self, conn: ConnStats) -> None:
        """Fold a closed connection's counters into the totals."""
        with self.lock:
            self.live.pop(conn, None)
            self.totals.add(conn)

    def snapshot(self) -> tuple[Totals, list[ConnStats], int]:
        """Totals including the live connections (read racily: each cell is one word that
        only grows), the live connections, and connections_total."""
        with self.lock:
            live = list(self.live)
            t = self.totals
            out = Totals({k: array("Q", v) for k, v in t.cells.items()}, Counter(t.errors),
                         t.writer_batches, list(t.read_aheads))
            total = self.connections_total
        for conn in live:
            out.add(conn)
        return out, live, total
