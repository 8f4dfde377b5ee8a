#!/usr/bin/env python3
"""bench/run (this module is its body): luanbd side by side with nbdkit (issue 4).

    bench/run --repeat 3                        # what bench/results/ holds, ~12 min
    bench/run --runtime 2 --workloads 4k-randread-qd16,1m-seqread-qd4   # a quick look
    bench/run --all-anchors --repeat 3          # + nbdkit-python, qemu-nbd, nbd-server
    bench/run --commit HEAD                     # measure a commit, not the working tree
    bench/run --report bench/results/DATE/results.json   # redo table.md/ratios.png only

It runs the shared harness ``run-bench`` (``../shared/bench/run-bench`` beside the repo, else
``$LUANBD_SHARED_BENCH``) with the anchors nbdkit-lua (the baseline) and nbdkit-memory plus
two luanbd rows, ``luanbd`` (Lua 5.4, the default) and ``luanbd-luajit`` (``--lua=luajit``),
then writes into ``bench/results/YYYY-MM-DD/``: results.json (run-bench --json),
run-bench.txt (its table), run-bench.log (its progress), table.md, ratios.png, machine.md.
Options it does not know are passed to run-bench unchanged (--ramp, --pin, --keep, ...).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import report

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
VENV = REPO / ".venv"
VENV_PY = VENV / "bin" / "python"
DEFAULT_ANCHORS = "nbdkit-lua,nbdkit-memory"


def fail(msg: str, code: int = 2) -> None:
    print(f"bench/run: {msg}", file=sys.stderr)
    sys.exit(code)


def in_venv() -> bool:
    return VENV_PY.exists() and Path(sys.prefix).resolve() == VENV.resolve()


def find_run_bench(given: str | None) -> Path:
    """../shared/bench/run-bench beside the repo, else $LUANBD_SHARED_BENCH (the folder or
    the script itself)."""
    tried = []
    candidates = [Path(given)] if given else [REPO.parent / "shared" / "bench"]
    env = os.environ.get("LUANBD_SHARED_BENCH")
    if env and not given:
        candidates.append(Path(env))
    for c in candidates:
        path = c if c.is_file() else c / "run-bench"
        tried.append(str(path))
        if path.is_file():
            return path.resolve()
    fail("run-bench not found (tried " + ", ".join(tried) + "); put shared/ beside the "
         "repo or set LUANBD_SHARED_BENCH to the folder that has run-bench")
    raise AssertionError  # unreachable


def ensure_matplotlib() -> None:
    """Import matplotlib, installing it into the venv with pip if it is missing."""
    if importlib.util.find_spec("matplotlib") is not None:
        return
    if in_venv():
        print("bench/run: matplotlib is missing; installing it into .venv with pip",
              file=sys.stderr)
        subprocess.run([str(VENV_PY), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "matplotlib"], check=False)
        importlib.invalidate_caches()
        if importlib.util.find_spec("matplotlib") is not None:
            return
    fail(f"matplotlib is needed for ratios.png and could not be imported or installed: "
         f"run `{VENV_PY} -m pip install matplotlib` (or pass --no-chart)")


def luanbd_command(commit: str | None, tmp: str) -> tuple[list[str], str]:
    """The argv prefix that runs luanbd, and a description of the code it runs."""
    if commit:
        sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
        if not sha:
            fail(f"--commit {commit}: not a commit of {REPO}")
        snap = Path(tmp) / f"luanbd-{sha[:12]}"
        snap.mkdir()
        # setup.py builds the compiled request loop (src/luanbd/server/_fastpath.c) and,
        # from 47c8bed on, the compiled table.concat (src/luanbd/lua/_lualib.c).
        extension = bool(git("ls-tree", "--name-only", sha, "setup.py"))
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src",
                                  *(["setup.py"] if extension else [])],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
        python = str(VENV_PY) if VENV_PY.exists() else sys.executable
        what = f"commit {sha} (`git archive` snapshot of src/, run with the venv's Python"
        if extension:
            built = subprocess.run([python, "setup.py", "-q", "build_ext", "--build-lib",
                                    "build/lib"], cwd=snap, capture_output=True, text=True,
                                   check=False)
            lib = snap / "build" / "lib"
            built_so = list(lib.rglob("*.so"))
            if built.returncode != 0 or not any("_fastpath" in f.name for f in built_so):
                fail(f"--commit {commit}: could not build the compiled request loop:\n"
                     f"{built.stderr[-2000:]}")
            for so in built_so:
                shutil.copy(so, snap / "src" / so.parent.relative_to(lib))
            what += "; C extensions built in place: " + ", ".join(sorted(f.name.split(".")[0]
                                                                        for f in built_so))
        return (["env", f"PYTHONPATH={snap / 'src'}", python, "-m", "luanbd"], what + ")")
    exe = VENV / "bin" / "luanbd"
    found = str(exe) if exe.exists() else shutil.which("luanbd")
    if not found:
        fail(f"luanbd not found ({exe} or on PATH): run scripts/setup.sh first")
    head = git("rev-parse", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "src")
    state = f"working tree at {head}" + (
        ", with uncommitted changes in src/:\n" + "\n".join(
            f"  - `{line.strip()}`" for line in dirty.splitlines()) if dirty
        else " (src/ clean)")
    return [str(found)], state


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def result_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    day = datetime.date.today().isoformat()
    out = BENCH / "results" / day
    n = 2
    while out.exists() and any(out.iterdir()):
        out = BENCH / "results" / f"{day}-{n}"
        n += 1
    return out


# --------------------------------------------------------------------------- machine.md

def first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except (OSError, ValueError):
        pass
    return "?"


def uptime() -> str:
    return first_line(["uptime"])


def top_processes(n: int = 6) -> str:
    """The busiest processes by ps's %CPU (averaged over their lifetime), not ours."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"],
                         capture_output=True, text=True, check=False).stdout.splitlines()
    ours = _descendants(_proc_table(), os.getpid())
    rows = [out[0]] if out else []
    for line in out[1:]:
        pid = line.split(None, 1)[0]
        if pid.isdigit() and int(pid) not in ours:
            rows.append(line[:150])
        if len(rows) > n:
            break
    return "\n".join(rows)


def python_versions(python: str) -> dict[str, str]:
    code = (
        "import platform, lupa\n"
        "import lupa.lua54 as l54\n"
        "print('python', platform.python_version())\n"
        "print('lupa', lupa.__version__)\n"
        "print('lua54', l54.LuaRuntime().eval('_VERSION'))\n"
        "try:\n"
        "    import lupa.luajit21 as lj\n"
        "    print('luajit', lj.LuaRuntime().eval('jit.version'))\n"
        "except ImportError:\n"
        "    print('luajit', 'not available')\n"
        "try:\n"
        "    import nbd\n"
        "    print('libnbd-python', nbd.__version__)\n"
        "except ImportError:\n"
        "    print('libnbd-python', 'not importable')\n"
        "try:\n"
        "    import matplotlib\n"
        "    print('matplotlib', matplotlib.__version__)\n"
        "except ImportError:\n"
        "    print('matplotlib', 'not installed')\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    got = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        got[key] = value
    return got


#: pid -> (ppid, CPU seconds, command, start time)
Table = dict[int, tuple[int, float, str, int]]


def _proc_table() -> Table:
    """pid -> (ppid, CPU seconds of it and its reaped children, command, start time) for
    every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        # utime + stime + cutime + cstime: children that ran and were reaped between two
        # samples count for their parent.
        out[int(entry)] = (int(rest[1]), sum(int(x) for x in rest[11:15]) / tick,
                           cmd or f"[{comm}]", int(rest[19]))
    return out


def _descendants(table: Table, root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _reaped(last: Table, now: Table) -> dict[int, float]:
    """CPU seconds already counted for processes that ended between two samples, by the
    process whose cutime/cstime now holds them: the parent, or, if the parent ended too,
    the nearest ancestor still alive.  It must not count twice."""
    def alive(pid: int) -> bool:
        return pid in now and pid in last and now[pid][3] == last[pid][3]

    out: dict[int, float] = {}
    for pid, (parent, cpu, _, _) in last.items():
        if alive(pid):
            continue
        up, hops = parent, 0
        while up in last and not alive(up) and hops < 64:
            up, hops = last[up][0], hops + 1
        out[up] = out.get(up, 0.0) + cpu
    return out


class LoadSampler:
    """While the benchmark runs: the load average every ``every`` seconds, and the CPU time
    that processes outside this benchmark's process tree used (other people's work is
    noise in the figures)."""

    def __init__(self, every: float = 20.0) -> None:
        self.samples: list[float] = []
        self.other_cpu: dict[str, float] = {}
        self.wall = 0.0
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        last = _proc_table()
        t0 = time.monotonic()
        while True:
            stopped = self._stop.wait(self._every)
            try:
                with open("/proc/loadavg") as f:
                    self.samples.append(float(f.read().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
            now = _proc_table()
            ours = _descendants(now, me) | _descendants(last, me)
            reaped = _reaped(last, now)
            for pid, (_, cpu, cmd, start) in now.items():
                if pid in ours:
                    continue
                prev = last.get(pid)
                before = prev[1] if prev is not None and prev[3] == start else 0.0
                used = cpu - before - reaped.get(pid, 0.0)
                if used > 0:
                    key = " ".join(cmd.split())[:100]
                    self.other_cpu[key] = self.other_cpu.get(key, 0.0) + used
            last = now
            self.wall = time.monotonic() - t0
            if stopped:
                return

    def summary(self) -> list[str]:
        def pct(cpu: float) -> str:
            return f"{100 * cpu / self.wall if self.wall else 0:.0f}% of one core"

        kernel = sum(v for k, v in self.other_cpu.items() if k.startswith("["))
        user = sum(self.other_cpu.values()) - kernel
        lines = [f"CPU used outside the benchmark's processes during the run ({self.wall:.0f} s "
                 f"wall, {os.cpu_count()} cores): other programs {user:.0f} CPU-seconds "
                 f"({pct(user)} on average); kernel threads {kernel:.0f} CPU-seconds "
                 f"({pct(kernel)}; partly the benchmark's own I/O and memory work)."]
        top = sorted(self.other_cpu.items(), key=lambda kv: -kv[1])[:8]
        if top and top[0][1] >= 1.0:
            lines += ["", "| CPU s | process |", "|---:|---|"]
            lines += [f"| {cpu:.0f} | `{cmd}` |" for cmd, cpu in top if cpu >= 1.0]
        return lines

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine_md(info: dict) -> str:
    v = info["py"]
    load = info["load_samples"]
    loads = (f"1-minute load average sampled every 20 s during the run: min {min(load):.2f}, "
             f"median {sorted(load)[len(load) // 2]:.2f}, max {max(load):.2f} "
             f"({len(load)} samples)") if load else "no load samples (run shorter than 20 s)"
    tools = [
        ("nbdkit", first_line(["nbdkit", "--version"])),
        ("fio", first_line(["fio", "--version"])),
        ("libnbd (nbdcopy)", first_line(["nbdcopy", "--version"])),
        ("libnbd (Python binding)", v.get("libnbd-python", "?")),
        ("qemu-nbd", first_line(["qemu-nbd", "--version"])),
        ("nbd-server", first_line(["nbd-server", "-V"])),
        ("Python (venv)", v.get("python", "?")),
        ("lupa", v.get("lupa", "?")),
        ("Lua (lupa.lua54)", v.get("lua54", "?")),
        ("LuaJIT (lupa.luajit21)", v.get("luajit", "?")),
        ("matplotlib", v.get("matplotlib", "?")),
    ]
    lines = [
        f"# Machine and conditions of the run of {info['started']}",
        "",
        "| what | value |",
        "|---|---|",
        f"| nproc | {info['nproc']} |",
        f"| CPU model | {cpu_model()} |",
        f"| memory | {mem_total()} |",
        f"| kernel | {platform.release()} ({platform.machine()}) |",
        *(f"| {k} | {val} |" for k, val in tools),
        "",
        "## luanbd code measured",
        "",
        info["code"],
        "",
        "## Command",
        "",
        "```",
        info["command"],
        "```",
        "",
        "## Load",
        "",
        "run-bench keeps one server and one client busy, so about 1-2 of the load average "
        "is the benchmark itself; more than that is other work on this 2-core machine "
        "(other engineers' tests may run at the same time), which adds noise.",
        "",
        f"- before: `{info['uptime_before']}`" + (
            "" if info.get("waited") is None else
            f" (after waiting {info['waited']:.0f} s for a load below 0.5: --wait-idle)"),
        f"- after: `{info['uptime_after']}`",
        f"- {loads}",
        "",
        *info["other_cpu"],
        "",
        "Busiest other processes just before the run (ps %CPU is over each one's life):",
        "",
        "```",
        info["top_before"],
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="bench/run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Other options go to run-bench unchanged (see run-bench --help).")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="passes over every server; the tables show medians (default 1; "
                        "use 3 for anything quoted)")
    p.add_argument("--runtime", metavar="S", help="measured seconds per workload "
                                                  "(run-bench default 5)")
    p.add_argument("--workloads", metavar="LIST", help="comma-separated workloads "
                                                       "(default: all of run-bench's)")
    p.add_argument("--size", metavar="SIZE", help="disk size (run-bench default 256M)")
    p.add_argument("--all-anchors", action="store_true",
                   help="also run nbdkit-python, qemu-nbd and nbd-server")
    p.add_argument("--anchors", metavar="LIST",
                   help=f"anchors to run instead (default {DEFAULT_ANCHORS})")
    p.add_argument("--no-luajit", action="store_true", help="leave out the luanbd-luajit row")
    p.add_argument("--server", action="append", default=[], metavar="NAME=TEMPLATE",
                   help="one more server, as run-bench --server (repeatable)")
    p.add_argument("--commit", metavar="REV", action="append", default=[],
                   help="measure src/ of this commit (a git archive snapshot run with the "
                        "venv's Python) instead of the working tree; repeated, one row per "
                        "commit (luanbd-SHA7), all in the same run")
    p.add_argument("--filters", metavar="LIST", action="append", default=[],
                   help="one more pair of rows per stack: luanbd+STACK beside "
                        "nbdkit-lua+STACK, both with --filter=F for each F of the "
                        "'+'-separated STACK (e.g. cow, cache, nofilter+nofilter+nofilter; "
                        "repeatable)")
    p.add_argument("--out", metavar="DIR",
                   help="result folder (default bench/results/YYYY-MM-DD, -2, -3... if taken)")
    p.add_argument("--run-bench", metavar="PATH",
                   help="run-bench to use (default ../shared/bench/run-bench beside the "
                        "repo, else $LUANBD_SHARED_BENCH)")
    p.add_argument("--no-chart", action="store_true", help="skip ratios.png (no matplotlib)")
    p.add_argument("--report", metavar="JSON",
                   help="only rewrite table.md and ratios.png from an existing results.json")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="first wait up to S seconds for the 1-minute load average to fall "
                        "below 0.5 (other work on the machine is noise)")
    p.add_argument("--dry-run", action="store_true", help="print the run-bench command only")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)

    if args.report:
        if not args.no_chart:
            ensure_matplotlib()
        for path in report.write_report(Path(args.report), not args.no_chart):
            print(f"wrote {path}")
        return 0

    run_bench = find_run_bench(args.run_bench)
    if not args.no_chart and not args.dry_run:
        ensure_matplotlib()  # before a 12-minute run, not after it

    tmp = tempfile.mkdtemp(prefix="luanbd-bench.")
    try:
        servers = []
        codes = []
        for commit in args.commit or [None]:
            luanbd, code = luanbd_command(commit, tmp)
            base = " ".join(shlex.quote(a) for a in luanbd)
            name = "luanbd"
            if len(args.commit) > 1:
                name += "-" + (git("rev-parse", "--short=7", f"{commit}^{{commit}}") or "?")
                code = f"{name}: {code}"
            codes.append(code)
            servers.append(f"{name}={base} -f -U {{sock}} {{plugin}} size={{size}}")
            if not args.no_luajit:
                servers.append(f"{name}-luajit={base} --lua=luajit -f -U {{sock}} {{plugin}} "
                               f"size={{size}}")
        code = "\n".join(codes)
        for stack in args.filters:
            opts = " ".join(f"--filter={f}" for f in stack.split("+"))
            servers.append(f"luanbd+{stack}={base} {opts} -f -U {{sock}} {{plugin}} "
                           f"size={{size}}")
            servers.append(f"nbdkit-lua+{stack}=nbdkit {opts} -f -U {{sock}} lua {{plugin}} "
                           f"size={{size}}")
        servers += args.server
        anchors = "all" if args.all_anchors else (args.anchors or DEFAULT_ANCHORS)

        out = result_dir(args.out)
        cmd = [sys.executable, str(run_bench), "--anchors", anchors,
               "--repeat", str(args.repeat)]
        for opt, value in (("--runtime", args.runtime), ("--workloads", args.workloads),
                           ("--size", args.size)):
            if value is not None:
                cmd += [opt, value]
        for s in servers:
            cmd += ["--server", s]
        cmd += [*extra, "--json", str(out / "results.json")]
        shown = shlex.join(["run-bench", *cmd[2:]])
        if args.dry_run:
            print(shlex.join(cmd))
            return 0

        waited = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
        out.mkdir(parents=True, exist_ok=True)
        python = str(VENV_PY) if VENV_PY.exists() else sys.executable
        info = {
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(),
            "code": code,
            "command": f"bench/run {shlex.join(argv)}\n# which ran:\n{shown}",
            "uptime_before": uptime(),
            "waited": waited,
            "top_before": top_processes(),
            "py": python_versions(python),
        }
        print(f"bench/run: results go to {out}", file=sys.stderr)
        with LoadSampler() as sampler:
            rc = run_teed(cmd, out / "run-bench.txt", out / "run-bench.log")
        info["uptime_after"] = uptime()
        info["load_samples"] = sampler.samples
        info["other_cpu"] = sampler.summary()
        (out / "machine.md").write_text(machine_md(info))
        if not (out / "results.json").exists():
            fail(f"run-bench exited {rc} without writing results.json "
                 f"(see {out / 'run-bench.log'})", rc or 2)
        for path in report.write_report(out / "results.json", not args.no_chart):
            print(f"wrote {path}")
        print(f"wrote {out / 'machine.md'}")
        if rc:
            print(f"bench/run: run-bench exited {rc}: some runs failed (see table.md)",
                  file=sys.stderr)
        return rc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_idle(limit: float, threshold: float = 0.5) -> float:
    """Wait until the 1-minute load average is below ``threshold`` (at most ``limit`` s)."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - t0 < limit:
        print(f"bench/run: waiting for an idle machine (load {os.getloadavg()[0]:.2f})",
              file=sys.stderr)
        time.sleep(15)
    return time.monotonic() - t0


def run_teed(cmd: list[str], stdout_file: Path, stderr_file: Path) -> int:
    """Run ``cmd``, showing its output and keeping a copy of each stream."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1, stdin=subprocess.DEVNULL)

    def pump(src: object, dst: Path, echo: object) -> None:
        with open(dst, "w") as f:
            for line in src:  # type: ignore[attr-defined]
                f.write(line)
                f.flush()
                echo.write(line)  # type: ignore[attr-defined]
                echo.flush()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=pump, args=(proc.stdout, stdout_file, sys.stdout)),
               threading.Thread(target=pump, args=(proc.stderr, stderr_file, sys.stderr))]
    for t in threads:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached run-bench too, and it stops its servers; a SIGTERM sent to us
        # alone did not, so pass it on if run-bench is still going after a moment.
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait()
    for t in threads:
        t.join()
    return rc


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cli(argv: list[str], script: str) -> int:
    """bench/run's entry point: re-run under the venv's Python, then main()."""
    if not in_venv() and VENV_PY.exists() and not os.environ.get("LUANBD_BENCH_NO_REEXEC"):
        # The venv's Python is where luanbd lives and matplotlib goes.
        os.execv(str(VENV_PY), [str(VENV_PY), script, *argv])
    signal.signal(signal.SIGTERM, _on_sigterm)
    return main(argv)
