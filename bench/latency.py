#!/usr/bin/env python3
"""Tail latency: fio's completion-latency percentiles, luanbd beside nbdkit lua, one run.

    .venv/bin/python bench/latency.py                        # 4 workloads x 2 servers, ~2 min
    .venv/bin/python bench/latency.py --repeat 3 --runtime 10
    .venv/bin/python bench/latency.py --server \
        'luanbd-metrics=.venv/bin/luanbd -f -U {sock} --metrics={sock}.m {plugin} size={size}'

For each server and workload (4k random reads and writes at QD1 and QD16, fio
ioengine=nbd), a fresh server on a private Unix socket serves ../shared/bench/ram.lua,
prefilled with 1 MiB writes as run-bench does; then fio runs for --runtime seconds after a
ramp and reports p50, p99, p99.9 and p99.99 of its completion latency (clat).  luanbd runs
with LUANBD_GC_TRACE, so every Python collection and every full Lua collection during the
measured run is counted with its longest pause: a collector behind the tail shows there.
Medians over --repeat passes go to a Markdown table, JSON and a chart in
bench/results/DATE-latency/.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO.parent / "shared" / "bench" / "ram.lua"
PERCENTILES = ("50.000000", "99.000000", "99.900000", "99.990000")
LABELS = ("p50", "p99", "p99.9", "p99.99")
WORKLOADS = {"4k-randread-qd1": ("randread", 1), "4k-randread-qd16": ("randread", 16),
             "4k-randwrite-qd1": ("randwrite", 1), "4k-randwrite-qd16": ("randwrite", 16)}


def default_servers() -> dict[str, str]:
    luanbd = shlex.quote(str(Path(sys.executable).parent / "luanbd"))
    return {"nbdkit-lua": "nbdkit -f -U {sock} lua {plugin} size={size}",
            "luanbd": f"{luanbd} -f -U {{sock}} {{plugin}} size={{size}}"}


@dataclass
class Pass:
    server: str
    workload: str
    iops: float
    clat_us: dict[str, float]
    gc: dict[str, dict[str, float]] = field(default_factory=dict)


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.args}")
        time.sleep(0.05)
    time.sleep(0.2)


def fio(uri: str, rw: str, bs: str, depth: int, *, size: str, out: Path,
        runtime: float | None, ramp: float) -> dict[str, object]:
    argv = ["fio", "--name=lat", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={size}", "--norandommap", "--randrepeat=0",
            "--percentile_list=" + ":".join(p.rstrip("0").rstrip(".") for p in PERCENTILES),
            "--output-format=json", f"--output={out}"]
    if runtime is not None:
        argv += ["--time_based", f"--runtime={round(runtime * 1000)}ms",
                 f"--ramp_time={round(ramp * 1000)}ms"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job: dict[str, object] = json.loads(out.read_text())["jobs"][0]
    return job


def gc_summary(trace: Path) -> dict[str, dict[str, float]]:
    kinds: dict[str, list[float]] = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            kind, _, secs = line.partition(" ")
            kinds.setdefault(kind, []).append(float(secs))
    return {k: {"count": len(v), "max_ms": max(v) * 1000, "total_ms": sum(v) * 1000}
            for k, v in sorted(kinds.items())}


def one_pass(name: str, template: str, workload: str, args: argparse.Namespace) -> Pass:
    rw, depth = WORKLOADS[workload]
    with tempfile.TemporaryDirectory(prefix="lat") as tmp:
        sock, trace = Path(tmp) / "s.sock", Path(tmp) / "gc.trace"
        argv = shlex.split(template.format(sock=sock, plugin=PLUGIN, size=args.size))
        env = dict(os.environ, LUANBD_GC_TRACE=str(trace))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        try:
            wait_socket(sock, proc)
            uri = f"nbd+unix:///?socket={sock}"
            fio(uri, "write", "1M", 4, size=args.size, out=Path(tmp) / "prefill.json",
                runtime=None, ramp=0)
            trace.unlink(missing_ok=True)
            job = fio(uri, rw, "4k", depth, size=args.size, out=Path(tmp) / "fio.json",
                      runtime=args.runtime, ramp=args.ramp)
        finally:
            proc.terminate()
            proc.wait(30)
        side = job["read" if "read" in rw else "write"]  # type: ignore[index]
        pct = side["clat_ns"]["percentile"]
        return Pass(name, workload, float(side["iops"]),
                    {label: pct[p] / 1000 for label, p in zip(LABELS, PERCENTILES, strict=True)},
                    gc_summary(trace))


def table(passes: list[Pass], servers: list[str]) -> str:
    lines = ["| workload | server | IOPS | " + " | ".join(f"{x} µs" for x in LABELS)
             + " | GC during the run (count, longest pause) |",
             "|---|---|---:|" + "---:|" * len(LABELS) + "---|"]
    for workload in WORKLOADS:
        for server in servers:
            mine = [p for p in passes if p.server == server and p.workload == workload]
            if not mine:
                continue
            iops = statistics.median(p.iops for p in mine)
            cols = [statistics.median(p.clat_us[x] for p in mine) for x in LABELS]
            kinds = sorted({k for p in mine for k in p.gc})
            gcs = ", ".join(
                f"{k}: {statistics.median(p.gc.get(k, {}).get('count', 0) for p in mine):g}"
                f" ({max(p.gc.get(k, {}).get('max_ms', 0) for p in mine):.2f} ms)"
                for k in kinds) or "none"
            lines.append(f"| {workload} | {server} | {iops:,.0f} | "
                         + " | ".join(f"{c:,.1f}" for c in cols) + f" | {gcs} |")
    return "\n".join(lines) + "\n"


def chart(passes: list[Pass], servers: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [w for w in WORKLOADS if any(p.workload == w for p in passes)]
    fig, grid = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), sharey=True,
                             squeeze=False)
    axes = list(grid[0])
    for ax, workload in zip(axes, names, strict=True):
        for server in servers:
            mine = [p for p in passes if p.server == server and p.workload == workload]
            if mine:
                ax.plot(LABELS, [statistics.median(p.clat_us[x] for p in mine) for x in LABELS],
                        marker="o", label=server)
        ax.set_title(workload)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("completion latency, µs (log)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--runtime", type=float, default=10.0, metavar="S")
    p.add_argument("--ramp", type=float, default=1.0, metavar="S")
    p.add_argument("--size", default="256M")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--server", action="append", default=[], metavar="NAME=TEMPLATE",
                   help="another server: {sock} {plugin} {size} are filled in")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    servers = default_servers()
    for spec in args.server:
        name, _, template = spec.partition("=")
        servers[name] = template
    workloads = args.workloads.split(",")
    passes: list[Pass] = []
    for r in range(args.repeat):
        for workload in workloads:
            for name, template in servers.items():
                print(f"pass {r + 1}: {workload} {name}", file=sys.stderr, flush=True)
                passes.append(one_pass(name, template, workload, args))
    out = args.out or REPO / "bench" / "results" / (time.strftime("%Y-%m-%d") + "-latency")
    out.mkdir(parents=True, exist_ok=True)
    text = table(passes, list(servers))
    (out / "latency.md").write_text(
        f"# Completion latency, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n"
        f"fio ioengine=nbd, 4k, {args.runtime:g} s (+{args.ramp:g} s ramp) per pass, "
        f"{args.repeat} pass(es), medians; disk {args.size} prefilled. GC: luanbd's "
        f"LUANBD_GC_TRACE (nbdkit has none).\n\n![percentiles](latency.png)\n\n{text}")
    (out / "latency.json").write_text(json.dumps([asdict(x) for x in passes], indent=1))
    chart(passes, list(servers), out / "latency.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
