"""fuzz/fuzz_fastpath.py, the harness that drives the compiled request loop
(_fastpath.serve) over a socketpair: its seeds pass the real loop, and its checker reports a
loop or a plugin that answers wrongly.  The bounded atheris run of it is in
scripts/sanitize.sh (fuzz/run.py --only ...,fastpath), on the ASan+UBSan build.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("luanbd.server._fastpath")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import fuzz_fastpath
from fuzzlib import Finding

CORPUS = Path(fuzz_fastpath.__file__).resolve().parent / "corpus" / "fastpath"


def test_the_committed_seeds_are_the_generated_ones() -> None:
    assert {p.name: p.read_bytes() for p in CORPUS.iterdir()} == fuzz_fastpath.seeds()


@pytest.mark.parametrize("name", sorted(fuzz_fastpath.seeds()))
def test_each_seed_passes_the_compiled_loop(name: str) -> None:
    fuzz_fastpath.check((CORPUS / name).read_bytes())


def test_the_seeds_reach_every_kind_of_result() -> None:
    """Plain reads and writes, the slow path, a stop at a foreign request, EOF mid-payload."""
    d = fuzz_fastpath.disk()
    kinds: set[str] = set()
    for data in fuzz_fastpath.seeds().values():
        b0 = data[0]
        plain = fuzz_fastpath.PlainRequests(fuzz_fastpath.SIZES[b0 >> 2 & 3], bool(b0 & 2),
                                            fuzz_fastpath.MAX_LENGTHS[b0 >> 4 & 3])
        out, slow, pos, eof = fuzz_fastpath.reference(d, plain, bool(b0 & 1), bool(b0 & 128),
                                                      data[4:])
        kinds |= {"replies"} if out else set()
        kinds |= {"slow"} if slow else set()
        kinds |= {"eof" if eof else "handed back"}
        kinds |= {"partial"} if eof and pos < len(data) - 4 else set()
    assert kinds == {"replies", "slow", "eof", "handed back", "partial"}


def test_a_loop_that_sends_a_stray_byte_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fuzz_fastpath._fastpath.serve

    def garbling(loop: Any, *args: Any) -> Any:
        result = real(loop, *args)
        with socket.socket(fileno=loop.fd) as sock:  # the loop's own socket, one byte more
            sock.sendall(b"!")
            sock.detach()
        return result

    monkeypatch.setattr(fuzz_fastpath._fastpath, "serve", garbling)
    with pytest.raises(Finding, match="replies differ"):
        fuzz_fastpath.check((CORPUS / "mixed-simple").read_bytes())


def test_an_injected_plugin_bug_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUANBD_FUZZ_INJECT", "1")
    monkeypatch.setattr(fuzz_fastpath, "_disk", None)
    with pytest.raises(Finding, match="replies differ"):
        fuzz_fastpath.check((CORPUS / "mixed-simple").read_bytes())
    monkeypatch.setattr(fuzz_fastpath, "_disk", None)  # the next test gets a sound disk
