"""Nothing a user does shows a Python traceback (issue 11).

Informational options into a closed pipe end quietly with status 0, as nbdkit's do; into a
full device, with one ``luanbd: error:`` line.  Closed standard descriptors, a log on a full
device and Ctrl-C during start-up each end as nbdkit ends, or with one error line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from luanbd_procs import LUANBD, assert_no_traceback, client_env, script, wait_path

DISK = script("disk.lua")

INFORMATIONAL = [
    ["--help"], ["-h"], ["--dump-config"], ["-V"], ["--version"],
    [DISK, "--dump-plugin"], [DISK, "--help"],
]
IDS = [" ".join(Path(a).name for a in args) for args in INFORMATIONAL]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([LUANBD, *args], timeout=60, check=False, env=client_env(),
                          **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", INFORMATIONAL, ids=IDS)
def test_informational_option_into_a_closed_pipe_is_quiet(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: `| head -c0`
    try:
        result = _run(args, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result
    assert result.stderr == b"", result.stderr.decode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", INFORMATIONAL, ids=IDS)
def test_informational_option_into_dev_full_is_one_error_line(args: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        result = _run(args, stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 1, result
    assert result.stderr.decode().splitlines() == [
        "luanbd: error: standard output: No space left on device"]


@pytest.mark.timeout(60)
def test_nbdkit_is_quiet_into_a_closed_pipe_too() -> None:
    # The behaviour copied: nbdkit says nothing (it exits 0 when the reader was still there
    # for its one write, as `nbdkit --help | head -1`; SIGPIPE kills it silently otherwise).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(["nbdkit", "--help"], stdout=write_end, stderr=subprocess.PIPE,
                                timeout=60, check=False)
    finally:
        os.close(write_end)
    assert result.returncode in (0, -signal.SIGPIPE)
    assert result.stderr == b""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fd", [0, 1])
def test_closed_stdin_or_stdout_is_refused_as_nbdkit_does(fd: int) -> None:
    mine = subprocess.run([LUANBD, "--dump-config"], stderr=subprocess.PIPE, timeout=60,
                          check=False, env=client_env(), pass_fds=(),
                          preexec_fn=lambda: os.close(fd))
    assert mine.returncode == 1
    assert mine.stderr.decode().splitlines() == [
        "luanbd: error: expecting stdin/stdout to be opened: Bad file descriptor"]
    theirs = subprocess.run(["nbdkit", "--dump-config"], stderr=subprocess.PIPE, timeout=60,
                            check=False, preexec_fn=lambda: os.close(fd))
    assert theirs.returncode == 1
    assert b"expecting stdin/stdout to be opened" in theirs.stderr


@pytest.mark.timeout(60)
def test_closed_stderr_still_gives_the_status() -> None:
    result = subprocess.run([LUANBD, "--bogus"], stdout=subprocess.PIPE, timeout=60,
                            check=False, env=client_env(), preexec_fn=lambda: os.close(2))
    assert result.returncode == 1
    assert result.stdout.decode().startswith("luanbd [")


FAILING = """\
function open(readonly) return 1 end
function get_size(h) return 1048576 end
function pread(h, count, offset)
  if offset == 0 then error("no reading at zero") end
  return string.rep("z", count)
end
"""


@pytest.mark.timeout(60)
def test_log_on_a_full_device_does_not_stop_the_server(tmp_path: Path) -> None:
    plugin = tmp_path / "failing.lua"
    plugin.write_text(FAILING)
    sock = tmp_path / "s.sock"
    with open("/dev/full", "wb") as full:
        server = subprocess.Popen([LUANBD, "-f", "-v", "-U", str(sock), str(plugin)],
                                  stdout=subprocess.DEVNULL, stderr=full, env=client_env())
    try:
        wait_path(sock)
        for _ in range(3):
            h = nbd.NBD()
            h.connect_unix(str(sock))
            with pytest.raises(nbd.Error):
                h.pread(512, 0)  # fails, and its log line cannot be written
            assert h.pread(4, 4096) == b"zzzz"
            h.shutdown()
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0


SLOW_START = """\
API_VERSION = 2
local marker = assert(os.getenv("MARKER"))
local function spin(seconds)
  local t = os.clock()
  while os.clock() - t < seconds do end
end
io.open(marker .. ".load", "w"):close()
spin(0.3)
function config(k, v) io.open(marker .. ".config", "w"):close(); spin(0.3) end
function config_complete() io.open(marker .. ".complete", "w"):close(); spin(0.3) end
function get_ready() io.open(marker .. ".ready", "w"):close(); spin(0.3) end
function open(readonly) return 1 end
function get_size(h) return 512 end
function pread(h, count, offset) return string.rep("\\0", count) end
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment", ["load", "config", "complete", "ready", "imports"])
def test_ctrl_c_during_start_up_ends_silently_by_the_signal(tmp_path: Path,
                                                            moment: str) -> None:
    plugin = tmp_path / "slow.lua"
    plugin.write_text(SLOW_START)
    marker = tmp_path / "m"
    env = {**client_env(), "MARKER": str(marker)}
    for attempt in range(3 if moment == "imports" else 1):
        proc = subprocess.Popen([LUANBD, "-f", "-U", str(tmp_path / "s.sock"), str(plugin),
                                 "k=v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env)
        if moment == "imports":
            # Past Python's own start-up, while luanbd imports its modules and lupa.
            time.sleep(0.06 + 0.03 * attempt)
        else:
            wait_path(Path(f"{marker}.{moment}"))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert_no_traceback(err.decode())
        assert b"KeyboardInterrupt" not in err, err.decode()
        assert proc.returncode == -signal.SIGINT, (proc.returncode, err.decode())
        assert err == b"", err.decode()
        for name in ("load", "config", "complete", "ready"):
            Path(f"{marker}.{name}").unlink(missing_ok=True)

