"""The ip and tls-fallback filters against nbdkit's; the newer openonce, time-limit, evil and
count filters (not in nbdkit 1.32) against their manual pages; and cow and cache with their
overlay on a full file system, against nbdkit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

from differential import (  # noqa: E402
    LUANBD,
    NBDKIT,
    PLUGINS,
    Observation,
    Server,
    Session,
    diff_observations,
    errno_name,
    nbdkit_available,
    observe,
    pattern,
    strip_prefix,
)
from luanbd_procs import free_tcp_port  # noqa: E402
from test_tls import pki  # noqa: E402, F401 (the fixture)

pytestmark = pytest.mark.skipif(nbdkit_available() is not None,
                                reason=str(nbdkit_available()))

KiB = 1024
MiB = 1024 * KiB
RAMDISK = str(PLUGINS / "ramdisk.lua")
REFUSED = "client not permitted to connect because of source address restriction"


def both(args: Sequence[str], options: Sequence[str], client: object = None,
         **kw: object) -> tuple[Observation, Observation]:
    obs = [observe(server, "ramdisk.lua", tuple(args), options=tuple(options),
                   client=client, **kw)  # type: ignore[arg-type]
           for server in (NBDKIT, LUANBD)]
    return obs[0], obs[1]


# --- a server on TCP or with its own $TMPDIR ----------------------------------------------

def _tcp_listening(port: int) -> bool:
    """Someone listens on ``port`` (IPv4 and IPv6): /proc/net/tcp*, no probe connection
    (the ip filter would log it)."""
    found = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                    found.add(name)
    return found == {"tcp", "tcp6"}


class Proc:
    """A server process in the background, its stderr in a file."""

    def __init__(self, server: Server, options: Sequence[str], args: Sequence[str], *,
                 tmp: Path, env: dict[str, str] | None = None, sock: Path | None = None,
                 port: int | None = None, logdir: Path | None = None) -> None:
        self.tmp, self.sock, self.port = tmp, sock, port
        listen = ["-U", str(sock)] if sock is not None else ["-p", str(port)]
        argv = [*server.argv, "-f", *listen, *options, "lua", RAMDISK, *args]
        self.err_path = (logdir or tmp) / f"{server.name}.err"
        #: The whole log once the server has stopped (its directory may be gone).
        self.final: str | None = None
        environ = dict(os.environ, LC_ALL="C", TMPDIR=str(tmp), **(env or {}))
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, cwd=tmp,
                                         env=environ, start_new_session=True)
        deadline = time.monotonic() + 15
        while self.proc.poll() is None and time.monotonic() < deadline:
            if (sock is not None and sock.exists()) or (port is not None and _tcp_listening(port)):
                break
            time.sleep(0.02)
        time.sleep(0.1)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        if self.final is not None:
            return self.final
        return self.err_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return [strip_prefix(line)[0] for line in self.log().splitlines()]

    def wait_log(self, text: str, count: int = 1, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.final = self.log()
        assert "Traceback" not in self.final, self.final
        return self.proc.returncode


@contextlib.contextmanager
def serving(server: Server, options: Sequence[str], args: Sequence[str] = (), *,
            tcp: bool = False, tmp: Path | None = None,
            env: dict[str, str] | None = None) -> Iterator[Proc]:
    with tempfile.TemporaryDirectory(prefix="luanbd-misc-") as d:
        work = Path(d)
        proc = Proc(server, options, args, tmp=tmp or work, env=env, logdir=work,
                    sock=None if tcp else work / "nbd.sock",
                    port=free_tcp_port() if tcp else None)
        try:
            yield proc
        finally:
            proc.stop()


def _connect(p: Proc, host: str | None = None, name: str = "", **tls: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    if tls:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(tls["certs"])
    if host is not None:
        h.connect_tcp(host, str(p.port))
    else:
        assert p.sock is not None
        h.connect_unix(str(p.sock))
    return h


def _try(p: Proc, host: str | None = None) -> str:
    """Connect, read a sector, disconnect: "ok" or the errno of the failure."""
    try:
        h = _connect(p, host)
        h.pread(512, 0)
        h.shutdown()
    except nbd.Error as e:
        return errno_name(e)
    return "ok"


# --- ip: Unix sockets, against nbdkit -----------------------------------------------------

UNIX_RULES = [
    ("deny=all",),
    (f"allow=uid:{os.getuid()}", "deny=all"),
    (f"allow=gid:{os.getgid() + 1}", "deny=all"),
    (f"allow=pid:{os.getpid()}", "deny=all"),   # libnbd runs in this process
    ("allow=pid:1", "deny=anyunix"),
    ("allow=anyunix", "deny=all"),
    ("allow=ANY", "deny=all"),
    ("deny=anyipv4,anyipv6",),
    ("deny=anyvsock", "deny=uid:0x7fffffff"),
    ("allow=anyvsock", "deny=allunix"),
]


def _twice(s: Session) -> None:
    """Two connections one after the other: the server keeps serving after a refusal."""
    for i in range(2):
        try:
            h = s.connect_and_probe()
        except Exception as e:  # ConnectFailed: recorded as connect_error
            s.record(f"connect{i}", type(e).__name__)
            s.obs.connect_error = None
            continue
        s.read(h, 512, 0)
        s.disconnect(h)


@pytest.mark.parametrize("rules", UNIX_RULES, ids=[" ".join(r) for r in UNIX_RULES])
def test_ip_unix_as_nbdkit(rules: tuple[str, ...]) -> None:
    expected, got = both(rules, ["--filter=ip"], _twice)
    assert expected.exit_code is None, expected.stderr
    assert expected == got, diff_observations(expected, got)
    refused = got.log.count(REFUSED)
    assert refused in (0, 2), got.log
    assert len(got.log) == refused, got.log  # one line per refusal, nothing else


BAD_RULES = [
    "allow=bogus", "deny=pid:0", "allow=uid:-1", "allow=uid:abc", "allow=uid:",
    "allow=all,,anyunix", "deny=,all", "allow=1.2.3.4/x", "allow=1.2.3.4/",
    "allow=::1/128x", "allow=1.2.3.4/8/9", "allow=127.0.0.1,10.0.0.0/8",
    "allow=vsock-cid:-1", "allow=vsock-port:4294967296", "allow=gid:99999999999999999999",
    "allow=pid:1x", "allow=uid:0,anyunix", "allow=security:foo", "allow=dn:CN=x",
    "allow=uid:-1x", "allow=uid:-x", "allow=uid:-99999999999999999999", "deny=pid:-0",
]


@pytest.mark.parametrize("rule", BAD_RULES)
def test_ip_bad_rule_as_nbdkit(rule: str) -> None:
    expected, got = both([rule], ["--filter=ip"])
    assert expected.exit_code == 1 and got.exit_code == 1, (expected.stderr, got.stderr)
    assert expected.startup_error == got.startup_error
    assert "\n" not in (got.startup_error or "") and "Traceback" not in got.stderr


def test_ip_address_rules_documented() -> None:
    """The installed nbdkit 1.32.5 cannot parse any address (its build has no inet_pton:
    ``allow=127.0.0.1`` is "don't know how to parse rule"), so address rules follow
    nbdkit-ip-filter(1) and ip.c, not that build."""
    for rule, message in [("allow=1.2.3.4/33", "prefix is > 32 in allow=1.2.3.4/33"),
                          ("deny=::1/129", "prefix is > 128 in deny=::1/129"),
                          ("allow=/8", 'cannot parse address "" from allow=/8'),
                          ("allow=1.2.3.4.5", "don't know how to parse rule: "
                                              "allow=1.2.3.4.5")]:
        got = observe(LUANBD, "ramdisk.lua", (rule,), options=("--filter=ip",))
        assert got.exit_code == 1 and got.startup_error == message, got.stderr


# --- ip: TCP over 127.0.0.1 and ::1 -------------------------------------------------------

TCP_KEYWORDS = [("deny=anyipv4",), ("deny=allipv6",), ("allow=anyipv6", "deny=all"),
                ("allow=uid:0", "allow=anyunix", "deny=all"), ("deny=anyunix",)]


@pytest.mark.parametrize("rules", TCP_KEYWORDS, ids=[" ".join(r) for r in TCP_KEYWORDS])
def test_ip_tcp_keywords_as_nbdkit(rules: tuple[str, ...]) -> None:
    seen = []
    for server in (NBDKIT, LUANBD):
        with serving(server, ["--filter=ip"], [*rules], tcp=True) as p:
            outcome = {host: _try(p, host) for host in ("127.0.0.1", "::1")}
            outcome["again"] = _try(p, "127.0.0.1")
            refusals = sum(1 for v in outcome.values() if v != "ok")
            assert p.wait_log(REFUSED, refusals) or refusals == 0
            seen.append((outcome, [x for x in p.lines() if x]))
    assert seen[0] == seen[1]


TCP_ADDRESSES = [
    (("deny=all",), False, False),
    (("allow=127.0.0.1", "deny=all"), True, False),
    (("allow=::1/128", "deny=all"), False, True),
    (("deny=127.0.0.0/8",), False, True),
    (("deny=10.0.0.0/8", "deny=::2"), True, True),
    (("allow=::/0", "deny=all"), False, True),
    (("allow=0:0::1", "allow=127.1.2.3/8", "deny=all"), True, True),
    (("allow=128.0.0.1/1", "allow=fe80::/10", "deny=all"), False, False),
    (("allow=uid:0", "deny=all"), False, False),
]


@pytest.mark.parametrize(("rules", "v4", "v6"), TCP_ADDRESSES,
                         ids=[" ".join(r[0]) for r in TCP_ADDRESSES])
def test_ip_tcp_addresses(rules: tuple[str, ...], v4: bool, v6: bool) -> None:
    with serving(LUANBD, ["--filter=ip"], [*rules], tcp=True) as p:
        assert (_try(p, "127.0.0.1") == "ok") is v4
        assert (_try(p, "127.0.0.1") == "ok") is v4  # still serving
        assert (_try(p, "::1") == "ok") is v6
        refusals = 2 * (not v4) + (not v6)
        assert p.wait_log(REFUSED, refusals) or refusals == 0
        assert p.log().count(REFUSED) == refusals, p.log()


# --- tls-fallback -------------------------------------------------------------------------

def _fallback_view(p: Proc, certs: Path) -> dict[str, object]:
    seen: dict[str, object] = {}
    for name in ("", "other"):
        h = _connect(p, name=name)
        seen[f"plain {name!r}"] = (h.get_size(), h.is_read_only(), h.can_flush(),
                                   h.can_trim(), h.can_zero(), h.can_cache(),
                                   h.can_multi_conn(), h.pread(512, 0))
        try:
            h.pwrite(b"x" * 512, 0)
        except nbd.Error as e:
            seen[f"plain {name!r} write"] = errno_name(e)
        h.shutdown()
    h = _connect(p, certs=str(certs))
    h.pwrite(pattern(1, 4096), 0)
    seen["tls"] = (h.get_size(), h.is_read_only(), h.get_tls_negotiated(),
                   h.pread(4096, 0) == pattern(1, 4096))
    h.shutdown()
    r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={p.sock}"],
                       capture_output=True, text=True, timeout=20, check=False)
    seen["list"] = re.sub(r"/tmp/\S+?nbd\.sock", "SOCK", r.stdout)
    return seen


@pytest.mark.timeout(90)
@pytest.mark.parametrize("args", [(), ("tlsreadme=Hello, plaintext client!",),
                                  ("tlsreadme=" + "long " * 200,)],
                         ids=["default", "tlsreadme", "long"])
def test_tls_fallback_as_nbdkit(pki: Path, args: tuple[str, ...]) -> None:  # noqa: F811
    options = ["--tls=on", f"--tls-certificates={pki / 'server'}", "--filter=tls-fallback"]
    seen = []
    for server in (NBDKIT, LUANBD):
        with serving(server, options, [f"size={MiB}", *args]) as p:
            seen.append((_fallback_view(p, pki / "client"), [x for x in p.lines() if x]))
    assert seen[0] == seen[1]
    view = seen[1][0]
    message = args[0].removeprefix("tlsreadme=").encode() if args else (
        b"This NBD server requires TLS authentication before it will serve useful data.\n")
    assert view["plain ''"] == (512, True, False, False, False, False, False,
                                message[:512].ljust(512, b"\0"))
    assert view["tls"] == (MiB, False, True, True)


def test_tls_fallback_refuses_serialize_connections() -> None:
    args = ("serialize=connections",)
    options = ("--filter=tls-fallback", "--filter=noparallel")
    expected, got = both(args, options)
    assert got.exit_code == 1 and expected.startup_error == got.startup_error, got.stderr
    assert got.startup_error == "the tls-fallback filter requires parallel connection support"


# --- newer filters, against their manual pages (nbdkit 1.32 has none of them) --------------

def _bits(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


def test_count_logs_bytes_at_unload() -> None:
    with serving(LUANBD, ["-v", "--filter=count"]) as p:
        h = _connect(p)
        h.pwrite(b"x" * 1000, 0)
        h.pwrite(b"y" * 24, 4096)
        h.pread(4096, 0)
        h.pread(1, 100)
        h.zero(512, 0)
        h.trim(4096, 8192)
        with contextlib.suppress(nbd.Error):
            h.pread(512, MiB)  # out of range: not counted
        h.flush()
        h.shutdown()
        h = _connect(p)
        h.pread(10, 0)
        h.shutdown()
        time.sleep(0.2)
        assert "count bytes" not in p.log()  # only when the filter is unloaded
    lines = [x for x in p.lines() if "count bytes" in x]
    assert lines == ["debug: count bytes: read 4107, written 1024, zeroed 512, trimmed 4096"]


def test_count_quiet_without_verbose() -> None:
    with serving(LUANBD, ["--filter=count"]) as p:
        h = _connect(p)
        h.pread(4096, 0)
        h.shutdown()
    assert "count" not in p.log()


def test_time_limit_disconnects_after_limit() -> None:
    with serving(LUANBD, ["--filter=time-limit"], ["time-limit=600ms"]) as p:
        h = _connect(p)
        h.pread(512, 0)                   # within the limit
        time.sleep(0.3)
        h.pwrite(b"a" * 512, 0)
        time.sleep(0.5)                   # past it: rejected, the connection closed
        with pytest.raises(nbd.Error) as err:
            h.pread(512, 0)
        assert errno_name(err.value) in ("ESHUTDOWN", "ENOTCONN", "ECONNRESET", "EPIPE")
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
        h2 = _connect(p)                  # a new connection gets its own time
        assert h2.pread(512, 0) == b"a" * 512
        h2.shutdown()
    assert not [x for x in p.lines() if x], p.log()  # not an error: no log line


def test_time_limit_idle_and_disabled() -> None:
    with serving(LUANBD, ["--filter=time-limit"], ["timelimit=0"]) as p:
        h = _connect(p)
        time.sleep(0.3)
        h.pread(512, 0)
        h.shutdown()
    with serving(LUANBD, ["--filter=time-limit"], ["time_limit=0.2s"]) as p:
        h = _connect(p)                   # idle past the limit: still connected
        time.sleep(0.4)
        assert h.aio_is_ready()
        with pytest.raises(nbd.Error):
            h.pread(512, 0)


@pytest.mark.parametrize(("args", "message"), [
    (("time-limit=soon",), 'time-limit: could not parse delay or sleep: "soon"'),
    (("time-limit=-1",), 'time-limit: could not parse delay or sleep: "-1"'),
    (("evil=bogus",), "evil: unknown mode: bogus"),
    (("evil-probability=2",), "evil-probability: probability out of range, should be [0..1]"),
    (("evil-stuck-probability=150%",),
     "evil-stuck-probability: probability out of range, should be [0..1]"),
    (("evil-probability=x",), "evil-probability: could not parse 'x' as a probability"),
    (("evil-seed=-1",), "evil-seed: negative numbers are not allowed"),
    (("evil-seed=4294967296",),
     'evil-seed: could not parse number: "4294967296": Numerical result out of range'),
])
def test_new_filters_bad_parameters(args: tuple[str, ...], message: str) -> None:
    name = "time-limit" if args[0].startswith("time") else "evil"
    got = observe(LUANBD, "ramdisk.lua", args, options=(f"--filter={name}",))
    assert got.exit_code == 1 and got.startup_error == message, got.stderr


def _evil(p: Proc, data: bytes) -> nbd.NBD:
    h = _connect(p)
    h.pwrite(data, 0)
    return h


DATA = pattern(7, 512 * KiB)


def test_evil_cosmic_rays_probability() -> None:
    """cosmic-rays: bits flipped at the documented rate, a different set each read."""
    args = ["evil=cosmic-rays", "evil-probability=1:1000", "evil-seed=42"]
    with serving(LUANBD, ["--filter=evil"], args) as p:
        h = _evil(p, DATA)
        a, b = h.pread(len(DATA), 0), h.pread(len(DATA), 0)
        h.shutdown()
    nbits = len(DATA) * 8
    flipped = _bits(a, DATA)
    assert abs(flipped - nbits / 1000) < nbits / 1000 * 0.1, flipped
    assert a != b and abs(_bits(b, DATA) - nbits / 1000) < nbits / 1000 * 0.1
    # the same seed, the same corruption: deterministic
    with serving(LUANBD, ["--filter=evil"], args) as p:
        h = _evil(p, DATA)
        assert h.pread(len(DATA), 0) == a
        h.shutdown()


def test_evil_stuck_bits_fixed_to_the_disk() -> None:
    args = ["evil-probability=1e-3", "evil-seed=7"]   # stuck-bits is the default mode
    with serving(LUANBD, ["--filter=evil"], args) as p:
        h = _evil(p, DATA)
        a = h.pread(len(DATA), 0)
        assert h.pread(len(DATA), 0) == a                       # same bits every time
        assert h.pread(1000, 200_000) == a[200_000:201_000]    # relative to the disk
        stuck = _bits(a, DATA)
        # about half the stuck bits already had their stuck value
        expected = len(DATA) * 8 / 1000 / 2
        assert abs(stuck - expected) < expected * 0.15, stuck
        h.shutdown()
    with serving(LUANBD, ["--filter=evil"], [*args[:1], "evil-seed=8"]) as p:
        h = _evil(p, DATA)
        assert h.pread(len(DATA), 0) != a                       # another seed
        h.shutdown()
    half = ["evil-probability=1e-3", "evil-seed=7", "evil-stuck-probability=0.5"]
    with serving(LUANBD, ["--filter=evil"], half) as p:
        h = _evil(p, DATA)
        b = h.pread(len(DATA), 0)
        assert 0 < _bits(b, DATA) < stuck                       # some read correctly
        # the bits stuck now are some of those stuck always
        assert all((x ^ d) & ~(y ^ d) == 0 for x, y, d in zip(b, a, DATA, strict=True))
        h.shutdown()


def test_evil_stuck_wires_fixed_to_the_request() -> None:
    args = ["evil=stuck-wires", "evil-probability=1%", "evil-seed=3"]
    with serving(LUANBD, ["--filter=evil"], args) as p:
        h = _connect(p)
        ones = b"\xff" * 4096
        h.pwrite(ones, 0)
        h.pwrite(ones, 65536)
        a, b = h.pread(4096, 0), h.pread(4096, 65536)
        assert a == b != ones                       # the same positions in each request
        assert h.pread(4096, 2048)[:2048] == a[:2048]
        low = _bits(a, ones)
        assert abs(low - 4096 * 8 / 100 / 2) < 4096 * 8 / 100 / 2 * 0.3, low
        h.shutdown()


def test_evil_probability_limits() -> None:
    with serving(LUANBD, ["--filter=evil"], ["evil=cosmic-rays", "evil-probability=0"]) as p:
        h = _evil(p, DATA[:65536])
        assert h.pread(65536, 0) == DATA[:65536]    # 0: nothing corrupted
        h.shutdown()
    with serving(LUANBD, ["--filter=evil"], ["evil=cosmic", "evil-probability=1/2"]) as p:
        h = _evil(p, DATA[:4096])
        assert h.pread(4096, 0) == bytes(x ^ 0xFF for x in DATA[:4096])  # > 1/8: every bit
        h.shutdown()
    with serving(LUANBD, ["--filter=evil"], ["evil-seed=1"]) as p:   # 1e-8: rare
        h = _evil(p, DATA)
        assert _bits(h.pread(len(DATA), 0), DATA) < 5
        h.shutdown()


#: sha256 (first 16 hex digits) of reads of bytes ((i * 7 + 3) & 255) through the filter, as
#: a C transcription of nbdkit 1.36's evil.c and random.h computes them.
EVIL_KNOWN = [
    (("evil-probability=0.001", "evil-seed=7"), 65536, 0, "feee5a68874e94fa"),
    (("evil-probability=0.001", "evil-seed=7", "evil-stuck-probability=0.5"), 3000, 70000,
     "c77d6e9840ff1b14"),
    (("evil=stuck-wires", "evil-probability=0.01", "evil-seed=3"), 4096, 4096,
     "70c7c29c43abe29d"),
    (("evil=cosmic-rays", "evil-probability=0.001", "evil-seed=42"), 65536, 0,
     "5048f79e428a1d07"),
]


@pytest.mark.parametrize(("args", "count", "offset", "sha"), EVIL_KNOWN,
                         ids=[a[0][0] for a in EVIL_KNOWN])
def test_evil_same_bits_as_nbdkit_algorithm(args: tuple[str, ...], count: int, offset: int,
                                            sha: str) -> None:
    with serving(LUANBD, ["--filter=evil"], list(args)) as p:
        h = _connect(p)
        h.pwrite(bytes((i * 7 + 3) & 255 for i in range(128 * KiB)), 0)
        assert hashlib.sha256(h.pread(count, offset)).hexdigest()[:16] == sha
        h.shutdown()


def test_evil_leaves_sparse_parts_alone() -> None:
    """Holes the layer below reports (here cow's trimmed blocks) are not corrupted."""
    args = ["evil=cosmic-rays", "evil-probability=1/2"]   # > 1/8: every bit flips
    with serving(LUANBD, ["--filter=evil", "--filter=cow"], args) as p:
        h = _connect(p)
        h.pwrite(DATA[:128 * KiB], 0)
        h.trim(64 * KiB, 64 * KiB)
        got = h.pread(192 * KiB, 0)
        assert got[:64 * KiB] == bytes(x ^ 0xFF for x in DATA[:64 * KiB])
        assert got[64 * KiB:128 * KiB] == bytes(64 * KiB)           # a hole: as it is
        assert got[128 * KiB:] == b"\xff" * (64 * KiB)             # zeroes, but data
        h.shutdown()
    with serving(LUANBD, ["--filter=evil", "--filter=noextents", "--filter=cow"], args) as p:
        h = _connect(p)
        h.trim(64 * KiB, 0)
        assert h.pread(64 * KiB, 0) == b"\xff" * (64 * KiB)         # noextents: corrupted
        h.shutdown()


def _opens(p: Proc) -> list[str]:
    return [x for x in p.lines() if x.startswith(("trace: open", "trace: close"))]


def test_openonce_opens_the_plugin_once() -> None:
    with serving(LUANBD, ["-v", "--filter=openonce"], ["trace=1"]) as p:
        h1 = _connect(p)
        h2 = _connect(p)                            # at the same time
        h1.pwrite(b"1" * 512, 0)
        assert h2.pread(512, 0) == b"1" * 512
        h1.shutdown()
        h2.shutdown()
        h3 = _connect(p)                            # after the others closed
        assert h3.pread(512, 0) == b"1" * 512
        h3.shutdown()
        time.sleep(0.2)
        assert _opens(p) == ["trace: open readonly=false (boolean)"]
        assert p.log().count('openonce: reusing existing context for export ""') == 2
    assert _opens(p)[-1] == "trace: close"          # closed when the server stops
    assert len(_opens(p)) == 2


def test_openonce_one_handle_per_export() -> None:
    with serving(LUANBD, ["--filter=openonce", "-r"], ["trace=1"]) as p:
        for name in ("a", "b", "a", "", "b"):
            h = _connect(p, name=name)
            h.pread(512, 0)
            h.shutdown()
        time.sleep(0.2)
        assert len([x for x in _opens(p) if x.startswith("trace: open")]) == 3
        assert not [x for x in _opens(p) if x == "trace: close"]
    assert _opens(p).count("trace: close") == 3


def test_without_openonce_each_connection_opens() -> None:
    with serving(LUANBD, [], ["trace=1"]) as p:
        for _ in range(2):
            h = _connect(p)
            h.shutdown()
        time.sleep(0.2)
    assert _opens(p).count("trace: close") == 2


# --- cow and cache on a full file system ----------------------------------------------------

@pytest.fixture
def full_tmpdir() -> Iterator[Path]:
    """A 2 MiB tmpfs for the overlay ($TMPDIR of the server)."""
    with tempfile.TemporaryDirectory(prefix="luanbd-tmpfs-") as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", d],
                           capture_output=True, text=True, timeout=20, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        try:
            yield Path(d)
        finally:
            subprocess.run(["umount", "-l", d], capture_output=True, timeout=20, check=False)


CHUNK = 256 * KiB


def _fill(p: Proc, readback: bool) -> dict[str, object]:
    """Write more than the file system holds, then check what was acknowledged."""
    seen: dict[str, object] = {}
    h = _connect(p)
    acked = []
    for i in range(12):
        try:
            h.pwrite(pattern(i, CHUNK), i * CHUNK)
            acked.append(i)
            seen[f"write {i}"] = "ok"
        except nbd.Error as e:
            seen[f"write {i}"] = errno_name(e)
    try:
        h.pwrite(pattern(99, 100 * KiB), 3 * MiB + 1000)   # unaligned: read-modify-write
        seen["unaligned"] = "ok"
    except nbd.Error as e:
        seen["unaligned"] = errno_name(e)
    if readback:
        for i in range(12):
            try:
                data = h.pread(CHUNK, i * CHUNK)
            except nbd.Error as e:  # cow-on-read, cache-on-read: no room to keep it
                seen[f"read {i}"] = errno_name(e)
                continue
            seen[f"read {i}"] = ("intact" if data == pattern(i, CHUNK) else
                                 "zeroes" if not data.strip(b"\0") else "other")
        assert all(seen[f"read {i}"] == "intact" for i in acked), seen
    # An overwrite of blocks the overlay holds needs no new space.
    if acked:
        try:
            h.pwrite(pattern(50, 4096), 0)
            seen["overwrite"] = h.pread(4096, 0) == pattern(50, 4096)
        except nbd.Error as e:
            seen["overwrite"] = errno_name(e)
    try:
        h.flush()
        seen["flush"] = "ok"
    except nbd.Error as e:
        seen["flush"] = errno_name(e)
    h2 = _connect(p)                                     # another client is served
    try:
        seen["other client"] = h2.pread(CHUNK, CHUNK) == pattern(1, CHUNK)
    except nbd.Error as e:
        seen["other client"] = errno_name(e)
    h2.shutdown()
    h.shutdown()
    return seen


FULL_CASES = [("cow",), ("cache",), ("cache", "cache=writethrough"),
              ("cache", "cache-on-read=true"), ("cow", "cow-on-read=true")]


@pytest.mark.parametrize("case", FULL_CASES, ids=[" ".join(c) for c in FULL_CASES])
def test_overlay_on_full_file_system_as_nbdkit(full_tmpdir: Path,
                                               case: tuple[str, ...]) -> None:
    seen = []
    for server in (NBDKIT, LUANBD):
        for old in full_tmpdir.iterdir():
            old.unlink()
        with serving(server, [f"--filter={case[0]}"], [f"size={4 * MiB}", *case[1:]],
                     tmp=full_tmpdir) as p:
            outcome = _fill(p, readback=True)
            time.sleep(0.1)
            seen.append((outcome, [x for x in p.lines() if x]))
    assert seen[0] == seen[1]
    outcome, lines = seen[1]
    failed = [k for k, v in outcome.items() if v == "ENOSPC"]
    assert "write 0" not in failed and "write 11" in failed, outcome
    assert lines == ["pwrite: No space left on device"] * len(lines) and lines, lines
    assert outcome["other client"] is True
