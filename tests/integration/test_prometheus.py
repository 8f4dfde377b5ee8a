"""A real Prometheus server (Debian's prometheus) scrapes luanbd --metrics while fio runs
against it: what its query API returns afterwards equals what fio says it did."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from luanbd_procs import StartServer, run_client

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed "
                       "(scripts/setup.sh installs Debian's package)"),
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed"),
]

SCRIPT = """
local size, pages = 64 * 1048576, {}
function open(ro) return {} end
function get_size(h) return size end
function pread(h, count, offset)
  local out = {}
  for i = 0, count - 1, 4096 do out[#out + 1] = pages[offset + i] or string.rep("\\0", 4096) end
  return table.concat(out)
end
function pwrite(h, buf, offset)
  for i = 0, #buf - 1, 4096 do pages[offset + i] = buf:sub(i + 1, i + 4096) end
end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: luanbd\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                            timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail("prometheus did not become ready")

    def query(self, expr: str) -> list[dict[str, object]]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_for(workdir: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for p in started:
        p.stop()


def test_prometheus_sees_what_fio_did(start_server: StartServer, workdir: Path,
                                      prometheus_for: list[Prometheus]) -> None:
    script = workdir / "ram.lua"
    script.write_text(SCRIPT)
    port = _free_port()
    server = start_server(str(script), options=[f"--metrics=127.0.0.1:{port}"])
    prom = Prometheus(workdir, f"127.0.0.1:{port}")
    prometheus_for.append(prom)
    prom.wait_ready()
    # Scraped at least once before fio starts, so that the run is seen from its start.
    deadline = time.monotonic() + 30
    while prom.scalar('up{job="luanbd"}') != 1.0:
        assert time.monotonic() < deadline, "prometheus never scraped luanbd"
        time.sleep(0.2)
    # About 4 seconds of random 4k reads and writes (rate-limited), so that several
    # scrapes happen during the run.
    result = run_client([
        "fio", "--name=prom", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randrw",
        "--bs=4k", "--size=64M", "--io_size=24M", "--iodepth=4", "--rate_iops=750,750",
        "--output-format=json"], timeout=120)
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    reads, writes = job["read"]["total_ios"], job["write"]["total_ios"]
    assert job["error"] == 0 and reads > 1000 and writes > 1000
    ours = 'sum(luanbd_requests_total{{job="luanbd",command="{}"}})'
    deadline = time.monotonic() + 30
    seen: tuple[float | None, float | None] = (None, None)
    while time.monotonic() < deadline:
        seen = (prom.scalar(ours.format("NBD_CMD_READ")), prom.scalar(ours.format("NBD_CMD_WRITE")))
        if seen == (reads, writes):
            break
        time.sleep(0.5)
    assert seen == (float(reads), float(writes))
    bytes_read = prom.scalar('sum(luanbd_request_bytes_total{command="NBD_CMD_READ"})')
    assert bytes_read == job["read"]["io_bytes"]
    # Scraped during the run: the counter was seen rising, not only at the end.
    rising = prom.scalar('max(changes(luanbd_requests_total{command="NBD_CMD_WRITE"}[5m]))')
    assert rising is not None and rising >= 2
    # The histogram is usable as Prometheus users use it.
    p99 = prom.scalar('histogram_quantile(0.99, sum by (le) '
                      '(luanbd_request_duration_seconds_bucket{command="NBD_CMD_READ"}))')
    assert p99 is not None and 0 < p99 <= 10
    assert not server.errors()
