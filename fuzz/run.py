#!/usr/bin/env python3
"""Run every fuzzer for a bounded time and report, one line each:

    handshake: 61234 inputs, 0 findings (2041 inputs/s, ...)

The atheris harnesses (fuzz_handshake.py, fuzz_requests.py, and fuzz_fastpath.py when
``--only`` names it) run side by side for half of ``--seconds``, then the whole-server run
(fuzz_server.py) for the other half, so the run keeps two cores busy and takes about
``--seconds`` of wall time.  Exit status 1 if anything
was found (an input that broke a harness' invariant, a harness that crashed or hung, a
server finding), 2 if a harness did not report how many inputs it tried.

Findings are kept in ``--artifacts`` (default fuzz/findings/): ``findings.txt`` lists them,
one file per reproducer; replay one with ``python fuzz/fuzz_handshake.py FILE``.

``--inject-bug`` is the self-test: the harnesses get a deliberately broken parser, and the
server run a broken plugin (fuzz/broken_ramdisk.lua); every line must then show a finding.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATHERIS_HARNESSES = ("handshake", "requests", "fastpath")
ALL = (*ATHERIS_HARNESSES, "server")
#: What runs without --only: fastpath (the compiled loop, fuzz_fastpath.py) is asked for by
#: name, as scripts/sanitize.sh does, so that CI's default run keeps its two cores' split.
DEFAULT = ("handshake", "requests", "server")
#: libFuzzer: a single input that takes this long is a finding (a hang).
INPUT_TIMEOUT = 10
DEFAULT_ARTIFACTS = HERE / "findings"


@dataclass
class Result:
    name: str
    inputs: int | None
    findings: int
    detail: str

    def line(self) -> str:
        inputs = "?" if self.inputs is None else str(self.inputs)
        return f"{self.name}: {inputs} inputs, {self.findings} findings ({self.detail})"


def start_atheris(name: str, seconds: int, artifacts: Path, work: Path, inject: bool,
                  ) -> tuple[subprocess.Popen[bytes], Path]:
    out = artifacts / name
    out.mkdir(parents=True, exist_ok=True)
    corpus = work / name
    corpus.mkdir()
    log = work / f"{name}.log"
    env = dict(os.environ, LUANBD_FUZZ_FINDINGS=str(out))
    if inject:
        env["LUANBD_FUZZ_INJECT"] = "1"
    command = [sys.executable, str(HERE / f"fuzz_{name}.py"), str(corpus),
               str(HERE / "corpus" / name), f"-dict={HERE / 'nbd.dict'}",
               f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}",
               "-rss_limit_mb=2048", f"-artifact_prefix={out}/", "-print_final_stats=1"]
    with log.open("wb") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, log


def finish_atheris(name: str, proc: subprocess.Popen[bytes], log: Path, artifacts: Path,
                   seconds: int) -> Result:
    try:
        status = proc.wait(seconds + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    text = log.read_text(errors="replace")
    done = re.search(r"^Done (\d+) runs in (\d+) second", text, re.M)
    statuses = re.findall(r"^#(\d+)\s", text, re.M)
    inputs = int(done.group(1)) if done else int(statuses[-1]) if statuses else None
    listed = artifacts / name / "findings.txt"
    findings = len(listed.read_text().splitlines()) if listed.exists() else 0
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    detail = []
    if inputs is not None:
        detail.append(f"{inputs / max(seconds, 1):.0f} inputs/s")
    if cov:
        detail.append(f"coverage {cov[-1][0]} edges / {cov[-1][1]} features, "
                      f"corpus {cov[-1][2]}")
    if status != 0:
        findings += 1
        crash = [p.name for p in (artifacts / name).glob("*") if p.name.startswith(
            ("crash-", "timeout-", "oom-", "leak-"))]
        detail.append(f"harness exited with status {status} {crash}")
        (artifacts / name / f"{name}.log").write_text(text)
        print(text[-4000:], file=sys.stderr)
    elif findings:
        (artifacts / name / f"{name}.log").write_text(text)
        for line in listed.read_text().splitlines():
            detail.append(line.replace("\t", " -> "))
    return Result(name, inputs, findings, "; ".join(detail))


def run_server(seconds: int, artifacts: Path, inject: bool, seed: int | None) -> Result:
    command = [sys.executable, str(HERE / "fuzz_server.py"), f"--seconds={seconds}",
               f"--artifacts={artifacts / 'server'}"]
    if seed is not None:
        command.append(f"--seed={seed}")
    if inject:
        command.append(f"--script={HERE / 'broken_ramdisk.lua'}")
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          timeout=seconds + 120)
    sys.stderr.write(done.stderr[-4000:] if done.returncode else "")
    match = re.search(r"^server: (\d+) inputs, (\d+) findings \((.*)\)$", done.stdout, re.M)
    if match is None:
        print(done.stdout, done.stderr, file=sys.stderr)
        return Result("server", None, 1, f"fuzz_server.py exited {done.returncode}")
    return Result("server", int(match.group(1)), int(match.group(2)), match.group(3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60,
                        help="total wall time (default 60): half for the two atheris "
                             "harnesses side by side, half for the server")
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"comma-separated subset of {','.join(ALL)} "
                             f"(default {','.join(DEFAULT)})")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS,
                        help="where findings go (default fuzz/findings/, cleared first; "
                             "another directory must be empty)")
    parser.add_argument("--seed", type=int, help="seed of the server run")
    parser.add_argument("--inject-bug", action="store_true",
                        help="self-test: fuzz deliberately broken targets")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown harness {sorted(unknown)}")
    atheris_names = [n for n in ATHERIS_HARNESSES if n in only]
    phases = bool(atheris_names) + ("server" in only)
    share = max(1, args.seconds // max(phases, 1))
    if args.artifacts == DEFAULT_ARTIFACTS:
        shutil.rmtree(args.artifacts, ignore_errors=True)  # ours (git-ignored): start afresh
    elif args.artifacts.exists() and any(args.artifacts.iterdir()):
        parser.error(f"--artifacts {args.artifacts} is not empty")
    args.artifacts.mkdir(parents=True, exist_ok=True)

    results: list[Result] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="luanbd-fuzz-") as tmp:
        running = [(n, *start_atheris(n, share, args.artifacts, Path(tmp), args.inject_bug))
                   for n in atheris_names]
        for name, proc, log in running:
            results.append(finish_atheris(name, proc, log, args.artifacts, share))
    if "server" in only:
        results.append(run_server(share, args.artifacts, args.inject_bug, args.seed))

    for r in results:
        print(r.line())
    total = sum(r.inputs or 0 for r in results)
    found = sum(r.findings for r in results)
    print(f"total: {total} inputs, {found} findings in {time.monotonic() - start:.0f} s"
          + (f"; see {args.artifacts}/*/findings.txt" if found else ""))
    if found:
        return 1
    if any(r.inputs is None for r in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
