"""What the atheris harnesses share: the Finding exception, input chunking, and the driver.

A harness is a function ``check(data: bytes) -> None`` that raises :class:`Finding` when the
target misbehaves on ``data``.  :func:`main` runs it under atheris (libFuzzer).  Two modes:

* plain libFuzzer (no ``LUANBD_FUZZ_FINDINGS``): the first finding stops the run, libFuzzer
  writes ``crash-<sha1>``; give that file as the only argument to replay it;
* ``LUANBD_FUZZ_FINDINGS=DIR`` (what ``fuzz/run.py`` sets): a finding is written to
  ``DIR/finding-<sha1>`` and one line ``<signature> <file>`` per distinct signature is added
  to ``DIR/findings.txt``; fuzzing goes on, so one bounded run reports all it saw.

``LUANBD_FUZZ_INJECT=1`` swaps a deliberately broken parser in (each harness says how), to
show that the pipeline notices a bug.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Environment variables read by the harnesses.
FINDINGS_ENV = "LUANBD_FUZZ_FINDINGS"
INJECT_ENV = "LUANBD_FUZZ_INJECT"


class Finding(Exception):
    """The target misbehaved on one input (an unexpected exception or a broken invariant)."""

    def signature(self) -> str:
        """What makes two findings the same bug: exception type and innermost frame, or the
        message of a broken invariant."""
        cause = self.__cause__
        if cause is None:
            return f"invariant: {self}"
        frames = traceback.extract_tb(cause.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return f"{type(cause).__name__} at {where}"


def injecting() -> bool:
    return os.environ.get(INJECT_ENV, "") not in ("", "0")


def chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """``data`` cut into pieces: whole for seed 0, else pseudo-random sizes of 1..seed+1."""
    if seed == 0:
        yield data
        return
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        n = rng.randint(1, seed + 1)
        yield data[at:at + n]
        at += n


class Recorder:
    """Keeps findings of a ``LUANBD_FUZZ_FINDINGS`` run: one file per distinct signature."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()
        self.total = 0

    def record(self, finding: Finding, data: bytes) -> None:
        self.total += 1
        sig = finding.signature()
        if sig in self.seen:
            return
        self.seen.add(sig)
        name = f"finding-{hashlib.sha1(data).hexdigest()}"
        (self.directory / name).write_bytes(data)
        with (self.directory / "findings.txt").open("a") as f:
            f.write(f"{sig.replace(chr(10), ' ')}\t{name}\n")
        print(f"\n=== FINDING: {sig}\ninput ({len(data)} bytes): {data.hex()}", file=sys.stderr)
        traceback.print_exception(finding, file=sys.stderr)


def _atheris() -> Any:
    """atheris is imported only to fuzz (it has no type stubs; tests import the harnesses)."""
    import atheris  # type: ignore[import-untyped]

    return atheris


def instrument_luanbd() -> None:
    """Import luanbd's protocol package under atheris' import hook, so that libFuzzer sees
    its coverage.  Call it before anything imports luanbd (a harness's ``__main__``)."""
    atheris = _atheris()
    with atheris.instrument_imports(include=["luanbd"]):
        import luanbd.protocol.handshake
        import luanbd.protocol.transmission  # noqa: F401


def main(check: Callable[[bytes], None]) -> None:
    """Run ``check`` under atheris with libFuzzer's command line (corpus dirs, -flags)."""
    atheris = _atheris()

    directory = os.environ.get(FINDINGS_ENV)
    recorder = Recorder(Path(directory)) if directory else None

    def one_input(data: bytes) -> None:
        try:
            check(data)
        except Finding as finding:
            if recorder is None:
                raise
            recorder.record(finding, data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
