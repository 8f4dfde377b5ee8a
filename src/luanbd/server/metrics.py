"""--metrics=ADDR: the server's counters in Prometheus' text format, over HTTP on a listener
of its own (never the NBD socket).

prometheus-client does the formats (text, OpenMetrics when asked, gzip) and the HTTP
handler; the numbers are read at scrape time from server/stats.py, so that serving a
request costs a few integer additions and nothing of the library.  The listener runs in
its own threads: a client of it that is slow, sends garbage or opens many connections
holds only those threads, which take no lock a request needs.
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from luanbd import __version__, log
from luanbd.protocol.constants import Cmd
from luanbd.server import stats as st
from luanbd.server.compiled import poll_counts
from luanbd.server.listener import BindError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from luanbd.server.service import Service

#: Connections the metrics listener serves at once; more are closed at once.
MAX_CLIENTS = 64
#: Seconds a metrics client gets for each read of its request before it is dropped.
CLIENT_TIMEOUT = 10.0


def parse_address(value: str) -> tuple[str, int] | str:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (every address), or a Unix
    socket path (anything with a ``/``).  Raises ValueError with the reason."""
    if "/" in value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics={value}: expecting [HOST]:PORT or a Unix socket path")
    return host, int(port)


class _Collector:
    """What a scrape shows, read from the service's ServerStats."""

    def __init__(self, service: Service, lua: str, fastpath: bool) -> None:
        self.service = service
        self.build = {"version": __version__, "lua_runtime": lua,
                      "fastpath": "yes" if fastpath else "no"}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.service.stats
        assert server is not None
        totals, live, connections_total = server.snapshot()
        info = GaugeMetricFamily("luanbd_build_info", "luanbd's version, Lua runtime and "
                                 "whether the compiled request loop is built and on",
                                 labels=list(self.build))
        info.add_metric(list(self.build.values()), 1)
        yield info
        yield GaugeMetricFamily("luanbd_connections_open", "Connections being served",
                                value=len(live))
        yield CounterMetricFamily("luanbd_connections", "Connections accepted",
                                  value=connections_total)
        refused = CounterMetricFamily(
            "luanbd_connections_refused", "Connections refused or cut off before "
            "transmission: over --limit, --timeout in the handshake, TLS failed",
            labels=["reason"])
        handshakes = CounterMetricFamily("luanbd_handshakes", "Handshakes by how they ended",
                                         labels=["outcome"])
        reloads = CounterMetricFamily("luanbd_reloads", "Reloads (SIGHUP) by outcome",
                                      labels=["outcome"])
        with server.lock:
            for reason in st.REFUSED_REASONS:
                refused.add_metric([reason], server.refused[reason])
            for outcome in st.HANDSHAKE_OUTCOMES:
                handshakes.add_metric([outcome], server.handshakes[outcome])
            for outcome in ("ok", "failed"):
                reloads.add_metric([outcome], server.reloads[outcome])
        yield refused
        yield handshakes
        yield reloads
        generation, retired = self.service.generations()
        yield GaugeMetricFamily("luanbd_generation", "The generation new connections get: "
                                "1 at start, one more per reload", value=generation)
        yield GaugeMetricFamily("luanbd_generations_retired", "Older generations still "
                                "serving connections opened before a reload", value=retired)
        yield from self._requests(totals)
        yield CounterMetricFamily("luanbd_writer_batches", "Reply batches sent by a "
                                  "connection's writer thread", value=totals.writer_batches)
        aheads = CounterMetricFamily(
            "luanbd_read_aheads", "Big WRITEs by what the reader thread did meanwhile: the next "
            "request started coming (gained), it did not (missed), not tried (skipped: "
            "backing off for a client that waits for each reply)", labels=["outcome"])
        for outcome, n in zip(st.READ_AHEAD_OUTCOMES, totals.read_aheads, strict=True):
            aheads.add_metric([outcome], n)
        yield aheads
        polls = poll_counts()
        if polls is not None:
            family = CounterMetricFamily(
                "luanbd_request_waits", "The compiled loop's waits for a connection's next "
                "request, by the poll before sleeping (LUANBD_POLL_US): hit (the request "
                "came), miss (it slept after all), skipped (not polled)", labels=["poll"])
            for label, n in zip(("hit", "miss", "skipped"), polls, strict=True):
                family.add_metric([label], n)
            yield family
        yield self._lua_memory(live)

    def _requests(self, totals: st.Totals) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily("luanbd_requests", "Requests served, by the "
                                       "compiled loop or the Python loop",
                                       labels=["command", "export", "loop"])
        nbytes = CounterMetricFamily("luanbd_request_bytes", "Data bytes of READs and WRITEs",
                                     labels=["command", "export"])
        errors = CounterMetricFamily("luanbd_request_errors", "Requests that failed, by errno",
                                     labels=["command", "export", "errno"])
        plugin = CounterMetricFamily(
            "luanbd_plugin_call_seconds", "Time in the backend (filters and plugin, the "
            "request lock included)", labels=["command"])
        latency = HistogramMetricFamily(
            "luanbd_request_duration_seconds", "Time from a request's header to its reply "
            "being ready", labels=["command"])
        bounds = [f"{b:g}" for b in st.BUCKET_BOUNDS] + ["+Inf"]
        for cmd in st.COMMANDS:
            base = int(cmd) * st.STRIDE
            name = str(cmd)
            buckets = [0] * len(bounds)
            seconds = plugin_ns = 0
            for export, cells in sorted(totals.cells.items()):
                count = cells[base + st.REQUESTS]
                if not count:
                    continue
                compiled = cells[base + st.COMPILED]
                requests.add_metric([name, export, "compiled"], compiled)
                requests.add_metric([name, export, "python"], count - compiled)
                if cmd in (Cmd.READ, Cmd.WRITE):
                    nbytes.add_metric([name, export], cells[base + st.BYTES])
                seconds += cells[base + st.LATENCY_NS]
                plugin_ns += cells[base + st.PLUGIN_NS]
                for i in range(len(bounds)):
                    buckets[i] += cells[base + st.FIRST_BUCKET + i]
            if any(buckets):
                running = 0
                cumulative = []
                for bound, n in zip(bounds, buckets, strict=True):
                    running += n
                    cumulative.append((bound, running))
                latency.add_metric([name], cumulative, seconds / 1e9)
                plugin.add_metric([name], plugin_ns / 1e9)
        for (export, cmd_number, code), n in sorted(totals.errors.items()):
            errors.add_metric([str(Cmd(cmd_number)), export,
                               errno.errorcode.get(code, str(code))], n)
        yield from (requests, nbytes, errors, latency, plugin)

    def _lua_memory(self, live: list[st.ConnStats]) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        memory = GaugeMetricFamily("luanbd_lua_memory_bytes", "Bytes a Lua state holds: "
                                   "the server's, and each connection's own",
                                   labels=["state"])
        states: list[tuple[str, object]] = [("server", self.service.chain.plugin)]
        states += [(f"connection-{c.number}", c.plugin) for c in live if c.plugin is not None]
        for label, plugin in states:
            used = getattr(plugin, "memory_in_use", None)
            value = used() if callable(used) else None
            if isinstance(value, int):
                memory.add_metric([label], value)
        return memory


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    #: Bind again at once after a restart, as the NBD listener does.
    allow_reuse_address = True

    def __init__(self, address: Any, handler: type, family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, handler, bind_and_activate=False)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:
            socketserver.TCPServer.server_bind(self)  # HTTPServer's wants (host, port)
            self.server_name, self.server_port = "localhost", 0
        else:
            super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: this one is closed
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished or timed out: nothing to tell anyone.  Anything else is
        # ours to know about, in one line.
        import sys

        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            log.error(f"metrics: {err!r}")


class MetricsListener:
    """The HTTP listener of --metrics, bound at start-up, served by its own threads."""

    def __init__(self, address: str, service: Service, *, lua: str, fastpath: bool) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler

        try:
            where = parse_address(address)
        except ValueError as err:
            raise BindError(str(err)) from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(service, lua, fastpath))
        handler = type("Handler", (MetricsHandler,), {"registry": registry,
                                                      "timeout": CLIENT_TIMEOUT})
        bind_to: str | tuple[str, int]
        if isinstance(where, str):
            family, bind_to = socket.AF_UNIX, os.path.abspath(where)
        else:
            family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
            bind_to = where
        self.httpd = _HTTPServer(bind_to, handler, family)
        self._path = bind_to if isinstance(bind_to, str) else None
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except OSError as err:
            self.httpd.server_close()
            raise BindError(f"--metrics={address}: {err.strerror or err}") from None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1]) if self._path is None else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
