"""The retry, retry-request, rate, multi-conn, pause, readahead and scan filters against
nbdkit's: the same client under both servers (the slow ones side by side), with the calls
that reach the plugin traced and compared.  flaky.lua fails for a while and recovers, so the
retries are seen to work; timings are only checked from below, loosely.  What nbdkit lua
1.32 cannot show (a plugin that caches natively under the parallel thread model) is shown
under luanbd alone with cachelog.lua."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    Observation,
    Session,
    diff_observations,
    nbdkit_available,
    observe,
)
from test_filters import exercise  # noqa: E402

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

KiB = 1024
MiB = 1024 * KiB


def both(filters: tuple[str, ...], args: tuple[str, ...], client: Callable[[Session], None],
         *, script: str = "flaky.lua") -> tuple[Observation, Observation]:
    """The same run under nbdkit and luanbd, at the same time (the retries and rate limits
    wait, so side by side keeps the file quick)."""
    options = tuple(f"--filter={f}" for f in filters)
    out: dict[str, Observation] = {}

    def run(server: object) -> None:
        out[server.name] = observe(server, script, args, options=options,  # type: ignore
                                   client=client)

    threads = [threading.Thread(target=run, args=(s,)) for s in (NBDKIT, LUANBD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out["nbdkit"], out["luanbd"]


def assert_same(filters: tuple[str, ...], args: tuple[str, ...],
                client: Callable[[Session], None], **kw: str) -> Observation:
    expected, got = both(filters, args, client, **kw)
    assert not expected.timed_out, expected.stderr
    assert expected == got, diff_observations(expected, got)
    return got


def stderr(s: Session) -> str:
    return (s.tmp / "stderr.txt").read_text(errors="replace")


def timed(s: Session, label: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` and keep its duration (not compared: it is checked from below)."""
    start = time.monotonic()
    fn()
    s.obs.extra.setdefault("_times", {})[label] = time.monotonic() - start


def seconds(obs: Observation, label: str) -> float:
    t: float = obs.extra["_times"][label]
    return t


def drop_times(*obs: Observation) -> None:
    for o in obs:
        o.extra.pop("_times", None)


def bad_parameter(filters: tuple[str, ...], args: tuple[str, ...],
                  script: str = "ramdisk.lua") -> Observation:
    got = assert_same(filters, args, lambda s: None, script=script)
    assert got.exit_code == 1, got.stderr
    assert got.startup_error and "\n" not in got.startup_error, got.startup_error
    return got


def _reads(s: Session) -> None:
    h = s.connect_and_probe()
    s.write(h, 1, 4 * KiB, 0)
    s.read(h, 4 * KiB, 0)          # the first read of the plugin: good (SKIP=1)
    s.read(h, 512, 8 * KiB)        # fails, and is retried
    s.read(h, 4 * KiB, 0)
    s.disconnect(h)


# --- retry ---------------------------------------------------------------------------------

def test_retry_reopens_and_recovers() -> None:
    """Two failed reads: each time the plugin is closed and opened again, the third try
    reads; what was written is still there (same Lua state)."""
    got = assert_same(("retry",), ("fail=pread:1:2", "retry-delay=1",
                                   "retry-exponential=no"), _reads)
    data = got.ops[1][1]
    assert data.startswith("data n=4096"), got.ops
    assert [o for _, o in got.ops] == ["ok", data, "zeroes n=512", data], got.ops
    assert got.log.count("trace: open readonly=false") == 3, got.log
    assert got.log.count("trace: close") == 3, got.log


def test_retry_recovers_when_the_trigger_file_appears() -> None:
    """The plugin fails until a file exists: it is made while the filter waits, and the
    retry after the wait succeeds."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(s.read(h, 4 * KiB, 0)))
        t.start()
        assert s.wait_log("trace: fail pread", timeout=10)
        (s.tmp / "go").write_text("")
        t.join(30)
        s.read(h, 512, 64 * KiB)
        s.disconnect(h)

    got = assert_same(("retry",), ("fail=pread", "trigger=go", "retries=5", "retry-delay=2"),
                      client)
    assert got.ops[0] == ("read 4096@0", "zeroes n=4096"), got.ops
    assert got.log.count("trace: fail pread #1") == 1, got.log
    assert got.log.count("trace: open readonly=false") == 2, got.log


def test_retry_gives_up_after_retries_with_backoff() -> None:
    """retries=2 with exponential back-off from 1 s: 1 + 2 s of waiting, three tries, then
    the plugin's error reaches the client."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        timed(s, "read", lambda: s.read(h, 512, 0))
        s.disconnect(h)

    expected, got = both(("retry",), ("fail=pread", "retries=2", "retry-delay=1"), client)
    for obs in (expected, got):
        assert seconds(obs, "read") >= 2.8, obs.extra
    drop_times(expected, got)
    assert expected == got, diff_observations(expected, got)
    assert got.ops == [("read 512@0", "EIO")], got.ops
    assert got.log.count("trace: open readonly=false") == 3, got.log


def test_retry_reopen_failing_then_working() -> None:
    """A reopen that fails is one more failed retry (ESHUTDOWN); the next one works."""
    got = assert_same(("retry",), ("fail=pread:1:1,open:1:1", "retry-delay=1",
                                   "retry-exponential=no"), _reads)
    assert "trace: fail open #2" in got.log, got.log
    assert got.ops[-1][1] == got.ops[1][1], got.ops


def test_retry_readonly_after_a_failure() -> None:
    """retry-readonly=yes: the plugin is opened read-only again, and writes fail (EROFS,
    which NBD says as EPERM) from then on in that connection only."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.read(h, 4 * KiB, 0)
        s.read(h, 4 * KiB, 4 * KiB)     # fails once: reopened read-only
        s.op("trim", h.trim, 4 * KiB, 0)
        s.op("zero", h.zero, 4 * KiB, 0)
        s.read(h, 4 * KiB, 8 * KiB)
        s.disconnect(h)
        h2 = s.connect_and_probe()
        s.op("trim 2", h2.trim, 4 * KiB, 0)
        s.disconnect(h2)

    got = assert_same(("retry",), ("fail=pread:1:1", "retry-delay=1", "retry-readonly=yes"),
                      client)
    assert [o for _, o in got.ops] == ["zeroes n=4096", "zeroes n=4096", "EPERM", "EPERM",
                                       "zeroes n=4096", "ok"], got.ops
    assert "trace: open readonly=true" in got.log, got.log


BAD_RETRY = [("retry-delay=0",), ("retries=-1",), ("retry-delay=1x",),
             ("retry-exponential=maybe",), ("retry-readonly=2",)]


@pytest.mark.parametrize("args", BAD_RETRY, ids=[a[0] for a in BAD_RETRY])
def test_retry_bad_parameters(args: tuple[str, ...]) -> None:
    bad_parameter(("retry",), args)


# --- retry-request -------------------------------------------------------------------------

def test_retry_request_retries_without_reopening() -> None:
    got = assert_same(("retry-request",), ("fail=pread:1:2", "retry-request-retries=3",
                                           "retry-request-delay=1"), _reads)
    assert got.ops[-1][1] == got.ops[1][1], got.ops
    assert got.log.count("trace: open readonly=false") == 1, got.log
    assert got.log.count("trace: fail pread #3") == 1, got.log


def test_retry_request_gives_up() -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        timed(s, "write", lambda: s.write(h, 1, 512, 0))
        s.read(h, 512, 0)
        s.disconnect(h)

    expected, got = both(("retry-request",), ("fail=pwrite", "retry-request-retries=1",
                                              "retry-request-delay=1"), client)
    for obs in (expected, got):
        assert seconds(obs, "write") >= 0.9, obs.extra
    drop_times(expected, got)
    assert expected == got, diff_observations(expected, got)
    assert got.ops == [("write#1 512@0", "EIO"), ("read 512@0", "zeroes n=512")], got.ops
    assert got.log.count("trace: fail pwrite #2") == 1, got.log


@pytest.mark.parametrize("retry_open", ["true", "false"])
def test_retry_request_open(retry_open: str) -> None:
    """The plugin's open fails once: retried by default, not with retry-request-open=false
    (then the client cannot connect)."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.read(h, 512, 0)
        s.disconnect(h)

    got = assert_same(("retry-request",), ("fail=open:0:1", "retry-request-delay=1",
                                           f"retry-request-open={retry_open}"), client)
    if retry_open == "true":
        assert got.ops == [("read 512@0", "zeroes n=512")], got.ops
    else:
        assert got.connect_error is not None and not got.ops, got


BAD_RETRY_REQUEST = [("retry-request-retries=1001",), ("retry-request-delay=0",),
                     ("retry-request-open=maybe",), ("retry-request-retries=-2",)]


@pytest.mark.parametrize("args", BAD_RETRY_REQUEST, ids=[a[0] for a in BAD_RETRY_REQUEST])
def test_retry_request_bad_parameters(args: tuple[str, ...]) -> None:
    bad_parameter(("retry-request",), args)


# --- rate ----------------------------------------------------------------------------------

def _transfer(kind: str, total: int, chunk: int = 64 * KiB) -> Callable[[Session], None]:
    def client(s: Session) -> None:
        h = s.connect_and_probe()

        def go() -> None:
            for offset in range(0, total, chunk):
                if kind == "read":
                    s.read(h, chunk, offset)
                else:
                    s.write(h, 3, chunk, offset)
        timed(s, kind, go)
        s.disconnect(h)
    return client


@pytest.mark.parametrize("kind,key", [("read", "rate"), ("write", "connection-rate")])
def test_rate_limits_transfer(kind: str, key: str) -> None:
    """2 Mbit/s (256 KiB/s) with a bucket of 0.5 s (128 KiB) that starts full: 512 KiB
    take at least (512 - 128) / 256 = 1.5 s."""
    expected, got = both(("rate",), (f"{key}=2M", "burstiness=0.5"),
                         _transfer(kind, 512 * KiB), script="ramdisk.lua")
    for obs in (expected, got):
        assert 1.3 <= seconds(obs, kind) < 30, obs.extra
    drop_times(expected, got)
    assert expected == got, diff_observations(expected, got)


def test_rate_file_is_read_before_each_request() -> None:
    """No file: no limit.  Then the file says 2M: limited from the next request on (a bucket
    of 0.25 s, empty, so 384 KiB take at least (384 - 64) / 256 = 1.25 s).  A line that is
    not a size is an error in the log at each request, and the rate stays; an empty file
    is no error."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        timed(s, "free", lambda: [s.read(h, 64 * KiB, i * 64 * KiB) for i in range(4)])
        (s.tmp / "rate.txt").write_text("2M\n")
        timed(s, "limited", lambda: [s.read(h, 64 * KiB, i * 64 * KiB) for i in range(6)])
        (s.tmp / "rate.txt").write_text("fast\n")
        s.read(h, 512, 0)
        s.read(h, 512, 0)
        (s.tmp / "rate.txt").write_text("")  # nothing to read: no error
        s.read(h, 512, 0)
        s.disconnect(h)

    expected, got = both(("rate",), ("rate-file=rate.txt", "burstiness=0.25"), client,
                         script="ramdisk.lua")
    for obs in (expected, got):
        assert seconds(obs, "limited") >= 1.05, obs.extra
        assert seconds(obs, "free") < 30, obs.extra
    drop_times(expected, got)
    assert expected == got, diff_observations(expected, got)
    assert got.log.count("could not parse size string (fast)") == 2, got.log


BAD_RATE = [("rate=0",), ("rate=1M", "rate=2M"), ("connection-rate=0",), ("rate=lots",),
            ("burstiness=abc",)]


@pytest.mark.parametrize("args", BAD_RATE, ids=["_".join(a) for a in BAD_RATE])
def test_rate_bad_parameters(args: tuple[str, ...]) -> None:
    bad_parameter(("rate",), args)


# --- multi-conn ----------------------------------------------------------------------------

MODES = ["auto", "emulate", "plugin", "disable", "unsafe"]


@pytest.mark.parametrize("mode", MODES)
def test_multi_conn_advertised(mode: str) -> None:
    """What each mode advertises for a plugin with flush and without multi-conn."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.record("can_fua", h.can_fua())
        s.disconnect(h)

    got = assert_same(("multi-conn",), ("size=65536", f"multi-conn-mode={mode}"), client,
                      script="ramdisk.lua")
    assert got.caps["can_multi_conn"] is (mode in ("auto", "emulate", "unsafe")), got.caps


def test_multi_conn_emulation_needs_flush() -> None:
    """emulate (and auto, as the plugin has no multi-conn) needs the plugin's flush: the
    connection fails."""
    for mode in ("emulate", "auto", "plugin"):
        got = assert_same(("multi-conn",), (f"multi-conn-mode={mode}",),
                          lambda s: s.connect_and_probe(), script="minimal.lua")
        assert (got.connect_error is None) is (mode == "plugin"), got


def _flushes(s: Session) -> int:
    return stderr(s).count("trace: flush #")


def _three_connections(s: Session) -> None:
    """A writes, B reads, C does nothing; then B flushes, then C; the number of flushes
    that reached the plugin after each is recorded."""
    a, b, c = (s.connect_and_probe() for _ in range(3))
    s.write(a, 1, 4 * KiB, 0)
    s.read(b, 4 * KiB, 0)
    seen = [_flushes(s)]
    s.op("flush B", b.flush)
    seen.append(_flushes(s))
    s.op("flush C", c.flush)
    seen.append(_flushes(s))
    s.write(a, 2, 512, 0, nbd.CMD_FLAG_FUA)
    seen.append(_flushes(s))
    s.op("flush A", a.flush)
    seen.append(_flushes(s))
    s.record("flushes", seen)
    for h in (a, b, c):
        s.disconnect(h)


@pytest.mark.parametrize("mode", ["emulate", "plugin"])
@pytest.mark.parametrize("track", ["conn", "fast", "off"])
def test_multi_conn_flush_reaches_the_dirty_connections(mode: str, track: str) -> None:
    """emulate: a flush on one connection flushes each connection of the group that may hold
    dirty data (conn: the writer, and readers once something was written; fast: all once
    something was written; off: all, always).  plugin: the flush is skipped while nothing
    was written since the last one (except with track=off)."""
    got = assert_same(("multi-conn",), ("size=65536", "trace=1", f"multi-conn-mode={mode}",
                                        f"multi-conn-track-dirty={track}"),
                      _three_connections, script="ramdisk.lua")
    flushes = got.extra["flushes"]
    if mode == "emulate":
        assert flushes[:3] == {"conn": [0, 2, 2], "fast": [0, 3, 3],
                               "off": [0, 3, 6]}[track], flushes
    else:
        assert flushes[:3] == {"conn": [0, 1, 2], "fast": [0, 1, 1],
                               "off": [0, 1, 2]}[track], flushes


def test_multi_conn_exportname_groups() -> None:
    """multi-conn-exportname=true: only connections to the same export flush each other."""
    def client(s: Session) -> None:
        hs = []
        for name in ("a", "a", "b"):
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(s.sock)
            hs.append(h)
        s.write(hs[0], 1, 512, 0)
        s.write(hs[2], 2, 512, 0)
        s.op("flush", hs[1].flush)
        s.record("flushes", _flushes(s))
        for h in hs:
            h.shutdown()

    got = assert_same(("multi-conn",), ("trace=1", "multi-conn-exportname=true",
                                        "multi-conn-mode=emulate"), client,
                      script="ramdisk.lua")
    assert got.extra["flushes"] == 1, got.extra


BAD_MULTI_CONN = [("multi-conn-mode=always",), ("multi-conn-track-dirty=slow",),
                  ("multi-conn-exportname=perhaps",)]


@pytest.mark.parametrize("args", BAD_MULTI_CONN, ids=[a[0] for a in BAD_MULTI_CONN])
def test_multi_conn_bad_parameters(args: tuple[str, ...]) -> None:
    bad_parameter(("multi-conn",), args)


# --- pause ---------------------------------------------------------------------------------

def _control(s: Session) -> socket.socket:
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.settimeout(15)
    ctl.connect(str(s.tmp / "ctl.sock"))
    return ctl


def _command(ctl: socket.socket, c: bytes) -> str:
    ctl.sendall(c)
    return ctl.recv(1).decode()


def test_pause_control_protocol() -> None:
    """p pauses (P), a second p too; blanks get no answer, anything else X; requests wait
    while paused, flush does not (nbdkit's filter leaves it out); r resumes (R) and the
    waiting read completes."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.write(h, 1, 4 * KiB, 0)
        ctl = _control(s)
        ctl.sendall(b" \n\t")
        replies = [_command(ctl, b"p"), _command(ctl, b"p")]
        s.op("flush while paused", h.flush)
        t = threading.Thread(target=lambda: s.read(h, 4 * KiB, 0))
        t.start()
        t.join(0.5)
        s.record("read waits", t.is_alive())
        replies += [_command(ctl, b"x"), _command(ctl, b"r")]
        t.join(15)
        s.record("read done", not t.is_alive())
        replies.append(_command(ctl, b"r"))
        ctl.close()
        ctl = _control(s)  # one control connection after another
        replies.append(_command(ctl, b"?"))
        ctl.close()
        s.record("replies", replies)
        s.disconnect(h)

    got = assert_same(("pause",), ("pause-control=ctl.sock",), client, script="ramdisk.lua")
    assert got.extra["replies"] == ["P", "P", "X", "R", "R", "X"], got.extra
    assert got.extra["read waits"] and got.extra["read done"], got.extra
    assert got.ops[-1][1].startswith("data n=4096"), got.ops


def test_pause_waits_for_requests_in_flight() -> None:
    """P is only sent once the read that was already running (2 s in the delay filter)
    has finished."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        t = threading.Thread(target=lambda: s.read(h, 512, 0))
        t.start()
        time.sleep(0.5)
        ctl = _control(s)
        s.record("read running", t.is_alive())
        timed(s, "pause", lambda: s.record("reply", _command(ctl, b"p")))
        s.record("resume", _command(ctl, b"r"))
        t.join(15)
        s.record("read done", not t.is_alive())
        ctl.close()
        s.disconnect(h)

    expected, got = both(("pause", "delay"), ("pause-control=ctl.sock", "rdelay=2"), client,
                         script="ramdisk.lua")
    for obs in (expected, got):
        assert seconds(obs, "pause") >= 0.5, obs.extra
    drop_times(expected, got)
    assert expected == got, diff_observations(expected, got)
    assert got.extra["read running"] and got.extra["read done"], got.extra
    assert got.extra["reply"] == "P", got.extra


BAD_PAUSE = [(), ("pause-control=" + "d/" * 60 + "ctl.sock",),
             ("pause-control=/no/such/dir/ctl.sock",)]


@pytest.mark.parametrize("args", BAD_PAUSE, ids=["unset", "too-long", "no-dir"])
def test_pause_bad_parameters(args: tuple[str, ...]) -> None:
    bad_parameter(("pause",), args)


# --- readahead -----------------------------------------------------------------------------

def test_readahead_same_data_and_warning() -> None:
    """Under nbdkit lua (serialize_all_requests, no cache) the filter only warns, once per
    connection; the data is the plugin's."""
    got = assert_same(("readahead",), ("trace=1",), exercise, script="ramdisk.lua")
    assert any("readahead: warning" in line for line in got.log), got.log


def _expected(count: int, offset: int) -> bytes:
    block = bytes(range(251))
    start = offset % 251
    return ((block * (count // 251 + 2))[start:start + count])


def _cache_lines(s: Session, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = [x for x in stderr(s).splitlines() if x.startswith("trace: cache")]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_readahead_prefetches_after_reads() -> None:
    """luanbd only (a parallel script with a cache callback): each read asks for the next
    window in the background; sequential reads keep the window at 32 KiB, a jump past the
    last prefetch doubles it, and going backwards starts over."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        for count, offset in [(64 * KiB, 0), (64 * KiB, 64 * KiB), (64 * KiB, 128 * KiB),
                              (64 * KiB, MiB - 64 * KiB), (64 * KiB, 0)]:
            assert h.pread(count, offset) == _expected(count, offset)
        s.record("cache", _cache_lines(s, 4))
        s.disconnect(h)

    got = observe(LUANBD, "cachelog.lua", (), options=("--filter=readahead",), client=client)
    assert not got.errors(), got.log
    assert got.extra["cache"] == ["trace: cache count=32768 offset=65536",
                                  "trace: cache count=32768 offset=131072",
                                  "trace: cache count=32768 offset=196608",
                                  "trace: cache count=65536 offset=65536"], got.extra


# --- scan ----------------------------------------------------------------------------------

def test_scan_same_data_and_warning() -> None:
    got = assert_same(("scan",), ("trace=1", "scan-size=64K"), exercise, script="ramdisk.lua")
    assert any("scan: warning: underlying plugin does not support the PARALLEL" in line
               for line in got.log), got.log


def test_scan_not_the_default_export() -> None:
    def client(s: Session) -> None:
        h = nbd.NBD()
        h.set_export_name("other")
        h.connect_unix(s.sock)
        s.read(h, 512, 0)
        h.shutdown()

    got = assert_same(("scan",), (), client, script="ramdisk.lua")
    assert "scan: warning: not the default export, not scanning" in got.log, got.log


@pytest.mark.parametrize("clock", ["true", "false"])
def test_scan_prefetches_the_disk(clock: str) -> None:
    """luanbd only: the whole disk in scan-size blocks, in order; a second connection goes
    on from where the scans got to (scan-clock=true), or from the start."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.record("first", _cache_lines(s, 8))
        h2 = s.connect_and_probe()
        assert h2.pread(4 * KiB, 5 * MiB) == _expected(4 * KiB, 5 * MiB)
        want = 9 if clock == "true" else 16
        s.record("second", _cache_lines(s, want)[8:])
        s.disconnect(h2)
        s.disconnect(h)

    got = observe(LUANBD, "cachelog.lua", (f"size={8 * MiB}", "scan-size=1M", "scan-ahead=false",
                                           f"scan-clock={clock}"),
                  options=("--filter=scan",), client=client)
    assert not got.errors(), got.log
    blocks = [f"trace: cache count=1048576 offset={i * MiB}" for i in range(8)]
    assert got.extra["first"] == blocks, got.extra
    assert got.extra["second"] == (blocks[7:] if clock == "true" else blocks), got.extra


def test_scan_forever() -> None:
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.record("more than once", len(_cache_lines(s, 20)) >= 20)
        s.disconnect(h)

    got = observe(LUANBD, "cachelog.lua", (f"size={4 * MiB}", "scan-size=1M", "scan-forever=true"),
                  options=("--filter=scan",), client=client)
    assert got.extra["more than once"], got.log


BAD_SCAN = [("scan-size=1000",), ("scan-size=64M",), ("scan-size=256",), ("scan-size=big",),
            ("scan-ahead=perhaps",)]


@pytest.mark.parametrize("args", BAD_SCAN, ids=[a[0] for a in BAD_SCAN])
def test_scan_bad_parameters(args: tuple[str, ...]) -> None:
    bad_parameter(("scan",), args)


def test_retry_fua_write_is_retried_whole() -> None:
    """A FUA write to a plugin that only flushes: the write and its flush are one request,
    so a failed flush retries the write too (nbdkit emulates FUA below the filter)."""
    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.write(h, 5, 4 * KiB, 0, nbd.CMD_FLAG_FUA)
        s.read(h, 4 * KiB, 0)
        s.disconnect(h)

    got = assert_same(("retry",), ("fail=flush:0:1", "retry-delay=1"), client)
    assert got.log.count("trace: pwrite count=4096 offset=0 readonly=false") == 2, got.log


@pytest.mark.parametrize("multi", ["true", "false"])
def test_multi_conn_plugin_that_is_consistent(multi: str) -> None:
    """luanbd only (nbdkit lua 1.32 cannot say can_multi_conn): auto follows the plugin.
    A writes, B reads, B flushes, C flushes.  Multi-conn plugin: B's flush is the plugin's
    one flush and cleans every connection, so C's is skipped.  Other plugin: emulated, B's
    flush reaches A (written) and B (read after a write), and then C's finds all clean."""
    def client(s: Session) -> None:
        a, b, c = (s.connect_and_probe() for _ in range(3))
        s.write(a, 1, 4 * KiB, 0)
        s.read(b, 4 * KiB, 0)
        s.op("flush B", b.flush)
        seen = [stderr(s).count("trace: flush")]
        s.op("flush C", c.flush)
        seen.append(stderr(s).count("trace: flush"))
        s.record("flushes", seen)
        for h in (a, b, c):
            s.disconnect(h)

    got = observe(LUANBD, "multiconn.lua", (f"multi={multi}",), options=("--filter=multi-conn",),
                  client=client)
    assert not got.errors(), got.log
    assert got.caps["can_multi_conn"], got.caps
    assert got.extra["flushes"] == ([1, 1] if multi == "true" else [2, 2]), got.extra


@pytest.mark.parametrize("stack", [("readahead",), ("readahead", "cache")],
                         ids=["alone", "with-cache"])
def test_readahead_parallel_plugin_without_cache(stack: tuple[str, ...],
                                                 tmp_path: Path) -> None:
    """luanbd only: a parallel script without cache gets both warnings (the second one
    suggests the cache filter); with --filter=cache after it, none, and the data is the
    file's."""
    disk = tmp_path / "disk.img"
    content = _expected(256 * KiB, 0)
    disk.write_bytes(content)

    def client(s: Session) -> None:
        h = s.connect_and_probe()
        s.record("same data", all(h.pread(16 * KiB, o) == content[o:o + 16 * KiB]
                                  for o in range(0, 256 * KiB, 16 * KiB)))
        s.disconnect(h)

    got = observe(LUANBD, "file_parallel.lua", (f"file={disk}",),
                  options=tuple(f"--filter={f}" for f in stack), client=client)
    assert got.extra["same data"], got.log
    warned = [line for line in got.log if line.startswith("readahead:")]
    if stack == ("readahead",):
        assert warned == ["readahead: warning: underlying plugin does not support "
                          "NBD_CMD_CACHE or PARALLEL thread model, so the filter won't do "
                          "anything", "readahead: try adding --filter=cache after this filter"]
    else:
        assert warned == [], got.log


PASS_THROUGH = [(("retry",), ()), (("retry-request",), ()), (("rate",), ("rate=1G",)),
                (("multi-conn",), ()), (("pause",), ("pause-control=ctl.sock",))]


@pytest.mark.parametrize("filters,args", PASS_THROUGH, ids=[f[0][0] for f in PASS_THROUGH])
def test_nothing_failing_passes_through(filters: tuple[str, ...],
                                        args: tuple[str, ...]) -> None:
    """With nothing failing, limited or paused, every request reaches the plugin as under
    nbdkit (the traced calls compared)."""
    assert_same(filters, ("trace=1", *args), exercise, script="ramdisk.lua")
