"""SIGHUP reloads the script and its filters: new connections get the new code, open ones
finish on the old, whose Lua states are then closed and unloaded; a reload that fails logs
one line and changes nothing.  Clients are libnbd (Python ``nbd``) processes' connections;
the script keeps a journal of its callbacks, one line per event and Lua state.
(tests/soak reloads every second while fio verifies.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from luanbd_procs import LUANBD, StartServer, client_env, error_lines, wait_path
from metrics_client import scrape, value

REPO = Path(__file__).resolve().parents[2]
nbd = pytest.importorskip("nbd", reason="the libnbd Python bindings (python3-libnbd) are missing")

#: Each Lua state names itself (``id``) in every journal line: "<event> <tag> <id>".
TEMPLATE = """API_VERSION = 2
thread_model = "{model}"
local tag = "{tag}"
local id = tostring({{}}):gsub("table: ", "") .. "-" .. math.random(1e9)
local journal
local function note(what)
  local f = assert(io.open(journal, "a"))
  f:write(what, " ", tag, " ", id, "\\n")
  f:close()
end
function config(key, value) journal = value end
function config_complete() {complete} note("config_complete") end
function after_fork() note("after_fork") end
function open(readonly) note("open") return {{}} end
function close(h) note("close") end
function cleanup() note("cleanup") end
function unload() note("unload") end
function get_size(h) return 1048576 end
function pread(h, count, offset, flags) return string.rep(tag, count) end
"""

MODELS = ["serialize_all_requests", "parallel"]


def write_script(path: Path, tag: str, model: str = "serialize_all_requests",
                 complete: str = "") -> None:
    # Written whole, then renamed: the server never reads half a script.
    tmp = path.with_suffix(".new")
    tmp.write_text(TEMPLATE.format(model=model, tag=tag, complete=complete))
    tmp.rename(path)


def events(journal: Path) -> list[tuple[str, str, str]]:
    if not journal.exists():
        return []
    return [tuple(line.split()) for line in journal.read_text().splitlines()]  # type: ignore[misc]


def live_states(journal: Path, tag: str) -> set[str]:
    """The Lua states of ``tag`` configured and not yet unloaded."""
    made = {i for e, t, i in events(journal) if t == tag and e == "config_complete"}
    return made - {i for e, t, i in events(journal) if t == tag and e == "unload"}


def wait_for(condition, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def connect(uri: str):  # type: ignore[no-untyped-def]
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def reload(server, generation: int) -> None:  # type: ignore[no-untyped-def]
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log(f"reloaded: generation {generation} serves new connections")


@pytest.mark.parametrize("model", MODELS)
def test_open_connections_keep_the_old_code(start_server: StartServer, workdir: Path,
                                            model: str) -> None:
    script, journal = workdir / "plugin.lua", workdir / "journal"
    write_script(script, "A", model)
    server = start_server(str(script), f"journal={journal}", options=["-v"])
    old = connect(server.uri)
    assert old.pread(4, 0) == b"AAAA"

    write_script(script, "B", model)
    # Editing the file alone changes nothing, even for a new connection's own Lua state.
    probe = connect(server.uri)
    assert probe.pread(4, 0) == b"AAAA"
    probe.shutdown()
    reload(server, 2)
    new = connect(server.uri)
    assert new.pread(4, 0) == b"BBBB"
    assert old.pread(4, 0) == b"AAAA"  # still the first generation's code
    assert live_states(journal, "A")  # ...which is still loaded
    old.shutdown()
    wait_for(lambda: not live_states(journal, "A"), "the old generation unloaded")
    # In order: its connections closed, then the generation's (first) state's cleanup,
    # then its unload, last.
    a = [(e, i) for e, t, i in events(journal) if t == "A"]
    first = a[0][1]
    assert a.index(("cleanup", first)) > max(k for k, (e, _) in enumerate(a) if e == "close")
    assert a[-1] == ("unload", first)
    assert new.pread(4, 4096) == b"BBBB"
    new.shutdown()

    assert server.stop() == 0
    # Every state of every generation unloaded exactly once; each generation cleaned once.
    evs = events(journal)
    for tag in "AB":
        made = [i for e, t, i in evs if t == tag and e == "config_complete"]
        unloaded = [i for e, t, i in evs if t == tag and e == "unload"]
        assert sorted(made) == sorted(unloaded)
        assert len(set(unloaded)) == len(unloaded)
        assert [e for e, t, _ in evs if t == tag].count("after_fork") == len(made)
    assert error_lines(server.log()) == []


@pytest.mark.parametrize("breakage,message", [
    ("syntax", "could not parse Lua script"),
    ("config_complete", "config_complete: "),
])
def test_a_failed_reload_keeps_serving_the_old_code(start_server: StartServer, workdir: Path,
                                                    breakage: str, message: str) -> None:
    script, journal = workdir / "plugin.lua", workdir / "journal"
    msock = workdir / "metrics.sock"
    write_script(script, "A")
    server = start_server(str(script), f"journal={journal}",
                          options=["-v", f"--metrics={msock}"])
    old = connect(server.uri)
    if breakage == "syntax":
        script.write_text("function pread(h,\n")
    else:
        write_script(script, "X", complete='error("refusing the new configuration")')
    server.proc.send_signal(signal.SIGHUP)
    log = server.wait_log("reload failed")
    (line,) = error_lines(log)
    assert line.startswith("luanbd: error: reload failed, still serving generation 1: ")
    assert message in line
    if breakage == "config_complete":
        assert "plugin.lua:12: refusing the new configuration" in line
        # The state that failed is unloaded at once.
        wait_for(lambda: not live_states(journal, "X")
                 and ("unload", "X") in [(e, t) for e, t, _ in events(journal)],
                 "the failed state unloaded")
    assert server.alive()
    assert old.pread(4, 0) == b"AAAA"
    fresh = connect(server.uri)
    assert fresh.pread(4, 0) == b"AAAA"
    fresh.shutdown()
    s = scrape(msock)
    assert value(s, "luanbd_reloads_total", outcome="failed") == 1
    assert value(s, "luanbd_generation") == 1

    write_script(script, "C")  # fixed: the next SIGHUP takes
    reload(server, 2)
    fresh = connect(server.uri)
    assert fresh.pread(4, 0) == b"CCCC"
    s = scrape(msock)
    assert value(s, "luanbd_reloads_total", outcome="ok") == 1
    assert value(s, "luanbd_generation") == 2
    assert value(s, "luanbd_generations_retired") == 1  # `old` is still open
    old.shutdown()
    wait_for(lambda: value(scrape(msock), "luanbd_generations_retired") == 0,
             "the old generation retired")
    fresh.shutdown()
    assert len(error_lines(server.log())) == 1


def test_reloaded_filters_are_new_too(start_server: StartServer, workdir: Path) -> None:
    """A Lua filter is read again on reload (its edited text takes effect)."""
    script, journal = workdir / "plugin.lua", workdir / "journal"
    write_script(script, "A")
    filt = workdir / "upper.lua"
    filt.write_text("function pread(next, h, count, offset, flags)\n"
                    "  return next:pread(count, offset, flags):lower()\nend\n")
    server = start_server(str(script), f"journal={journal}",
                          options=["-v", f"--filter={filt}"])
    assert connect(server.uri).pread(2, 0) == b"aa"
    filt.write_text("function pread(next, h, count, offset, flags)\n"
                    "  return '<' .. next:pread(count - 2, offset, flags) .. '>'\nend\n")
    reload(server, 2)
    assert connect(server.uri).pread(4, 0) == b"<AA>"


def test_sigterm_after_many_reloads(start_server: StartServer, workdir: Path) -> None:
    """Each generation unloaded once, whether its last client left before or at SIGTERM."""
    script, journal = workdir / "plugin.lua", workdir / "journal"
    write_script(script, "G0")
    server = start_server(str(script), f"journal={journal}", options=["-v"])
    held = []
    for n in range(1, 6):
        held.append(connect(server.uri))  # one client stays on each generation
        write_script(script, f"G{n}")
        reload(server, n + 1)
    assert server.stop() == 0
    evs = events(journal)
    for n in range(6):
        tag = f"G{n}"
        assert [e for e, t, _ in evs if t == tag].count("unload") == 1, tag
        assert [e for e, t, _ in evs if t == tag].count("cleanup") == 1, tag
    del held


def test_single_connection_ignores_sighup(workdir: Path) -> None:
    """-s serves one connection: SIGHUP has nothing to reload and must not kill it."""
    script, journal = workdir / "plugin.lua", workdir / "journal"
    write_script(script, "A")
    pidfile = workdir / "pid"
    h = nbd.NBD()
    h.connect_command(["/bin/sh", "-c", f'echo $$ > {pidfile}; exec "$@"', "sh",
                       LUANBD, "-s", "--exit-with-parent", str(script), f"journal={journal}"])
    pid = int(pidfile.read_text())
    write_script(script, "B")
    subprocess.run(["kill", "-HUP", str(pid)], check=True)
    time.sleep(0.3)
    assert h.pread(4, 0) == b"AAAA"
    h.shutdown()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is missing")
@pytest.mark.timeout(60)
def test_socket_activated_reload_as_the_example_unit_does(workdir: Path) -> None:
    """Under socket activation (the example unit's way), its ExecReload reloads."""
    unit = (REPO / "examples" / "systemd" / "luanbd.service").read_text()
    (reload_cmd,) = [line.split("=", 1)[1] for line in unit.splitlines()
                     if line.startswith("ExecReload=")]
    script, journal, sock = workdir / "plugin.lua", workdir / "journal", workdir / "act.sock"
    write_script(script, "A")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), LUANBD, "-v",
                             str(script), f"journal={journal}"],
                            env=client_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"nbd+unix:///?socket={sock}"
    try:
        wait_path(sock)
        old = connect(uri)
        assert old.pread(2, 0) == b"AA"
        write_script(script, "B")
        subprocess.run(reload_cmd.replace("$MAINPID", str(proc.pid)), shell=True, check=True)
        wait_for(lambda: connect(uri).pread(2, 0) == b"BB", "the new code served")
        assert old.pread(2, 0) == b"AA"
        old.shutdown()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"error" not in err
