"""The fuzzers of fuzz/: a bounded run finds nothing and really tries inputs, a deliberately
broken target is reported, and the harnesses' checkers tell a bug from a refusal.

The bounded run takes 40 s (fuzz/run.py --seconds 40: the two atheris harnesses
side by side for 20 s, then the whole-server run for 20 s; in CI, scripts/sanitize.sh
--quick fuzzes again under the sanitizers).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from luanbd.protocol.errors import ProtocolViolation
from luanbd.protocol.handshake import HandshakeConfig, ServerHandshake, _NeedData
from luanbd.protocol.transmission import Request, RequestParser

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import fuzz_handshake
import fuzz_requests
import nbdwire
from fuzzlib import Finding

FUZZ = Path(fuzz_handshake.__file__).resolve().parent

#: Seconds of the bounded run, and the fewest inputs each harness must have tried in it
#: (about a tenth of what this 2-core machine does, so a loaded CI host still passes).
RUN_SECONDS = 40
MIN_INPUTS = {"handshake": 3000, "requests": 3000, "server": 2000}
LINE = re.compile(r"^(\w+): (\d+) inputs, (\d+) findings", re.M)


def run_fuzzers(tmp_path: Path, *args: str) -> tuple[int, dict[str, tuple[int, int]], str]:
    done = subprocess.run([sys.executable, str(FUZZ / "run.py"),
                           f"--artifacts={tmp_path / 'findings'}", *args],
                          check=False, capture_output=True, text=True,
                          timeout=RUN_SECONDS + 100)
    results = {name: (int(n), int(m)) for name, n, m in LINE.findall(done.stdout)}
    return done.returncode, results, done.stdout + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(RUN_SECONDS + 120)
def test_bounded_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    status, results, output = run_fuzzers(tmp_path, f"--seconds={RUN_SECONDS}")
    print(output)
    assert set(results) == {"handshake", "requests", "server", "total"}, output
    for name, minimum in MIN_INPUTS.items():
        inputs, findings = results[name]
        assert findings == 0, output
        assert inputs >= minimum, f"{name} tried only {inputs} inputs:\n{output}"
    assert status == 0, output


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_injected_bugs_are_reported(tmp_path: Path) -> None:
    """With --inject-bug each target is broken (a KeyError in the handshake's LIST handler
    and in the parser on CACHE; a plugin that loses the disk on TRIM): every line shows a
    finding, the reproducers are kept, and the exit status says so."""
    status, results, output = run_fuzzers(tmp_path, "--seconds=6", "--inject-bug")
    assert status == 1, output
    for name in ("handshake", "requests", "server"):
        assert results[name][1] >= 1, output
        listed = (tmp_path / "findings" / name / "findings.txt").read_text()
        assert listed.strip(), output
    kept = (tmp_path / "findings" / "handshake" / "findings.txt").read_text()
    assert kept.startswith("KeyError at fuzz_handshake.py:"), kept
    # A reproducer replays to the same bug.
    name = kept.split("\t")[1].strip()
    data = (tmp_path / "findings" / "handshake" / name).read_bytes()
    with pytest.raises(Finding):
        fuzz_handshake.check_handshake(data, fuzz_handshake.BrokenHandshake)
    fuzz_handshake.check_handshake(data)  # the real machine handles it


# --- the checkers, against stubs -------------------------------------------------------------
def _seed(harness: str, prefix: str) -> bytes:
    (path,) = sorted((FUZZ / "corpus" / harness).glob(f"{prefix}-*"))
    return path.read_bytes()


class KeyErrorHandshake(ServerHandshake):
    def next_event(self) -> object:  # type: ignore[override]
        raise KeyError("stub")


class RefusingHandshake(ServerHandshake):
    def next_event(self) -> object:  # type: ignore[override]
        raise ProtocolViolation("stub refuses everything")


class KeyErrorParser(RequestParser):
    def next_request(self) -> Request | _NeedData:
        raise KeyError("stub")


class RefusingParser(RequestParser):
    def next_request(self) -> Request | _NeedData:
        raise ProtocolViolation("stub refuses everything")


class ShortWriteParser(RequestParser):
    """Hands WRITE requests over with the last payload byte missing."""

    def next_request(self) -> Request | _NeedData:
        req = super().next_request()
        if isinstance(req, Request) and req.data:
            return req._replace(data=req.data[:-1])
        return req


def test_handshake_checker_reports_an_unexpected_exception() -> None:
    seed = _seed("handshake", "libnbd-session")
    with pytest.raises(Finding) as found:
        fuzz_handshake.check_handshake(seed, KeyErrorHandshake)
    assert found.value.signature().startswith("KeyError at test_fuzz_run.py:")
    assert isinstance(found.value.__cause__, KeyError)


def test_handshake_checker_accepts_a_protocol_violation() -> None:
    fuzz_handshake.check_handshake(_seed("handshake", "libnbd-session"), RefusingHandshake)


def test_handshake_checker_reports_broken_framing() -> None:
    """A machine whose replies are not well framed is a finding even if nothing raises."""

    class Garbling(ServerHandshake):
        def data_to_send(self) -> bytes:
            out = super().data_to_send()
            return out + b"\0" if self.negotiated is None and len(out) > 18 else out

    with pytest.raises(Finding, match="unframed"):
        fuzz_handshake.check_handshake(_seed("handshake", "libnbd-session"), Garbling)


def test_request_checker_reports_an_unexpected_exception() -> None:
    seed = _seed("requests", "libnbd-session")
    with pytest.raises(Finding) as found:
        fuzz_requests.check_requests(seed, KeyErrorParser)
    assert found.value.signature().startswith("KeyError at test_fuzz_run.py:")


def test_request_checker_accepts_a_protocol_violation() -> None:
    fuzz_requests.check_requests(_seed("requests", "libnbd-session"), RefusingParser)


def test_request_checker_reports_a_short_write_payload() -> None:
    with pytest.raises(Finding, match="WRITE of"):
        fuzz_requests.check_requests(_seed("requests", "libnbd-session"), ShortWriteParser)


def test_seed_corpus_passes_the_real_parsers() -> None:
    """Every committed seed is handled without a finding (and is not trivially short)."""
    for harness, check in (("handshake", fuzz_handshake.check),
                           ("requests", fuzz_requests.check)):
        seeds = sorted((FUZZ / "corpus" / harness).iterdir())
        assert len(seeds) >= 8
        for path in seeds:
            data = path.read_bytes()
            assert len(data) > 8, path
            check(data)


def test_handshake_seeds_reach_transmission() -> None:
    """The seeds are valid sessions: most of them end the handshake with an export."""
    reached = 0
    seeds = sorted((FUZZ / "corpus" / "handshake").iterdir())
    for path in seeds:
        config, _, answer_seed, stream = fuzz_handshake.decode(path.read_bytes())
        run = fuzz_handshake.run_handshake(ServerHandshake, config, [stream], answer_seed)
        reached += run.negotiated is not None
    assert reached >= len(seeds) // 2


def test_server_input_filter_sees_every_request_header() -> None:
    """fuzz_server skips inputs that could write to the canary: the filter must find a
    header wherever it sits, classic or extended."""
    write = nbdwire.request(nbdwire.CMD_WRITE, offset=5, length=3, data=b"abc")
    ext = nbdwire.request(nbdwire.CMD_TRIM, offset=7, length=2**40, extended=True)
    found = list(nbdwire.request_headers(b"junk" + write + b"x" + ext))
    assert (nbdwire.CMD_WRITE, 0, 5, 3) in found
    assert (nbdwire.CMD_TRIM, 0, 7, 2**40) in found


def test_config_decoding_covers_tls_modes() -> None:
    modes = {fuzz_handshake.decode(bytes([b, 0, 0]))[0].tls for b in range(128)}
    assert len(modes) == 3
    assert isinstance(fuzz_handshake.decode(b"\0\0\0")[0], HandshakeConfig)
