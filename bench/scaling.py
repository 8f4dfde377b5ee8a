#!/usr/bin/env python3
"""Cost as work grows: more clients, bigger disks, many idle connections; luanbd beside
nbdkit lua in one run, as tables and a chart.

    .venv/bin/python bench/scaling.py                  # every row, ~4 min
    .venv/bin/python bench/scaling.py --runtime 10 --rows clients

Rows (each on a fresh server on a private Unix socket, ../shared/bench/ram.lua):

- ``clients``: 1, 4, 16 and 64 fio jobs at once, one connection each, 4k random reads at
  QD1 over a prefilled 256 MiB disk: aggregate MiB/s and p99 completion latency.
- ``disk``: a 256 MiB, 16 GiB and 1 TiB sparse disk, 4k random reads at QD16 all over it
  (no prefill: a page never written reads as zeroes): IOPS and server CPU per request,
  which should not grow with the disk.
- ``idle``: 4 busy fio jobs (as in ``clients``) with 0 and with 1,000 idle connections
  (NBD_OPT_GO done, then silence) held open: what 1,000 idle clients cost the busy ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from connections import idle_connection, raise_fd_limit
from latency import default_servers as servers

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO.parent / "shared" / "bench" / "ram.lua"
CLIENTS = (1, 4, 16, 64)
DISKS = ("256M", "16G", "1T")
IDLE = (0, 1000)


@dataclass
class Row:
    row: str
    server: str
    x: str
    mib_s: float
    iops: float
    p99_us: float
    srv_us_per_op: float


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Served:
    def __init__(self, template: str, size: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="scale")
        self.sock = Path(self.tmp.name) / "s.sock"
        argv = shlex.split(template.format(sock=self.sock, plugin=PLUGIN, size=size))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {argv}")
            time.sleep(0.05)
        time.sleep(0.2)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def fio(self, *, rw: str, bs: str, depth: int, jobs: int, size: str,
            runtime: float | None, ramp: float = 1.0) -> tuple[dict[str, float], float]:
        out = Path(self.tmp.name) / "fio.json"
        argv = ["fio", "--name=scale", "--ioengine=nbd", f"--uri={self.uri}", f"--rw={rw}",
                f"--bs={bs}", f"--iodepth={depth}", f"--numjobs={jobs}", "--group_reporting",
                f"--size={size}", "--norandommap", "--randrepeat=0", "--output-format=json",
                f"--output={out}"]
        if runtime is not None:
            argv += ["--time_based", f"--runtime={round(runtime * 1000)}ms",
                     f"--ramp_time={round(ramp * 1000)}ms"]
        cpu0, t0 = cpu_seconds(self.proc.pid), time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu, wall = cpu_seconds(self.proc.pid) - cpu0, time.monotonic() - t0
        side = json.loads(out.read_text())["jobs"][0]["read" if "read" in rw else "write"]
        ops = side["iops"] * wall
        return ({"mib_s": side["bw_bytes"] / 2**20, "iops": side["iops"],
                 "p99_us": side["clat_ns"]["percentile"]["99.000000"] / 1000},
                cpu / ops * 1e6 if ops else 0.0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.tmp.cleanup()


def measure(name: str, template: str, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    if "clients" in args.rows or "idle" in args.rows:
        s = Served(template, "256M")
        try:
            s.fio(rw="write", bs="1M", depth=4, jobs=1, size="256M", runtime=None)
            if "clients" in args.rows:
                for n in CLIENTS:
                    fig, per_op = s.fio(rw="randread", bs="4k", depth=1, jobs=n, size="256M",
                                        runtime=args.runtime)
                    rows.append(Row("clients", name, str(n), srv_us_per_op=per_op, **fig))
            if "idle" in args.rows:
                for idle in IDLE:
                    held = [idle_connection(str(s.sock)) for _ in range(idle)]
                    try:
                        fig, per_op = s.fio(rw="randread", bs="4k", depth=1, jobs=4,
                                            size="256M", runtime=args.runtime)
                    finally:
                        for c in held:
                            c.close()
                    rows.append(Row("idle", name, str(idle), srv_us_per_op=per_op, **fig))
        finally:
            s.close()
    if "disk" in args.rows:
        for size in DISKS:
            s = Served(template, size)
            try:
                fig, per_op = s.fio(rw="randread", bs="4k", depth=16, jobs=1, size=size,
                                    runtime=args.runtime)
            finally:
                s.close()
            rows.append(Row("disk", name, size, srv_us_per_op=per_op, **fig))
    return rows


def median_rows(rows: list[Row]) -> list[Row]:
    keys = list(dict.fromkeys((r.row, r.x, r.server) for r in rows))
    out = []
    for row, x, server in keys:
        mine = [r for r in rows if (r.row, r.x, r.server) == (row, x, server)]
        out.append(Row(row, server, x, *(statistics.median(getattr(r, f) for r in mine)
                                         for f in ("mib_s", "iops", "p99_us",
                                                   "srv_us_per_op"))))
    return out


def tables(rows: list[Row]) -> str:
    heads = {"clients": "clients at once", "disk": "disk size", "idle": "idle connections"}
    text = []
    for kind, head in heads.items():
        mine = [r for r in rows if r.row == kind]
        if not mine:
            continue
        text += [f"## {head}", "", f"| {head} | server | MiB/s | IOPS | p99 µs | srv-us/op |",
                 "|---|---|---:|---:|---:|---:|"]
        text += [f"| {r.x} | {r.server} | {r.mib_s:,.1f} | {r.iops:,.0f} | {r.p99_us:,.0f} | "
                 f"{r.srv_us_per_op:.1f} |" for r in mine]
        text.append("")
    return "\n".join(text)


def chart(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = [("clients", "mib_s", "MiB/s vs clients"), ("clients", "p99_us", "p99 µs vs clients"),
              ("disk", "srv_us_per_op", "server µs/request vs disk"),
              ("idle", "mib_s", "MiB/s of 4 busy vs idle conns")]
    panels = [p for p in panels if any(r.row == p[0] for r in rows)]
    fig, grid = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (kind, field, title) in zip(grid[0], panels, strict=True):
        for server in dict.fromkeys(r.server for r in rows):
            mine = [r for r in rows if r.row == kind and r.server == server]
            ax.plot([r.x for r in mine], [getattr(r, field) for r in mine], marker="o",
                    label=server)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    grid[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--runtime", type=float, default=5.0, metavar="S")
    p.add_argument("--rows", default="clients,disk,idle")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    raise_fd_limit(max(IDLE) + 256)
    rows: list[Row] = []
    for r in range(args.repeat):
        for name, template in servers().items():
            print(f"pass {r + 1}: {name}", file=sys.stderr, flush=True)
            rows += measure(name, template, args)
    rows = median_rows(rows)
    out = args.out or REPO / "bench" / "results" / (time.strftime("%Y-%m-%d") + "-scaling")
    out.mkdir(parents=True, exist_ok=True)
    text = tables(rows)
    (out / "scaling.md").write_text(
        f"# Cost as work grows, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
        f"{args.runtime:g} s per point, {args.repeat} pass(es), medians. "
        f"bench/scaling.py says what each row does.\n\n![scaling](scaling.png)\n\n{text}")
    (out / "scaling.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    chart(rows, out / "scaling.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
