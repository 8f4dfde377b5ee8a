#!/usr/bin/env python3
"""atheris harness: luanbd's handshake state machine (``ServerHandshake``) fed arbitrary client
bytes in arbitrary pieces, answered the way the server answers, then the bytes that follow
the handshake handed to the request parser as the server hands them.

Input layout (so the seeds of fuzz/corpus/handshake/ stay real client sessions):

====== =====================================================================================
byte 0 server configuration: bits 0-1 greeting flags (FIXED_NEWSTYLE|NO_ZEROES, FIXED, none,
       FIXED|NO_ZEROES); bit 2 no structured replies; bit 3 no extended headers; bit 4 no
       meta contexts; bits 5-6 TLS (off, on, require, off)
byte 1 chunking seed: 0 whole, else pieces of 1..seed+1 bytes (compared with the whole run)
byte 2 seed of the server's answers (refusals, export size and flags)
rest   the client's stream, from its 32-bit flags on
====== =====================================================================================

Findings: any exception but ``ProtocolViolation``/``OptionError``; output that is not a
sequence of well-framed option replies (plus the NBD_OPT_EXPORT_NAME reply); a result that
depends on how the input was cut (unless STARTTLS was accepted: with TLS the cut matters);
NBD_REP_ERR_TLS_REQD without ``--tls=require``; negotiated flags that contradict the options
(DF without structured replies, base:allocation without them, extended headers without
structured replies).

    python fuzz/fuzz_handshake.py fuzz/corpus/handshake -max_total_time=60
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzlib

if __name__ == "__main__":
    fuzzlib.instrument_luanbd()  # before anything below imports luanbd

import nbdwire
from fuzz_requests import Outcome, expect, run_parser
from fuzzlib import Finding, chunks

from luanbd.protocol.constants import HandshakeFlag, Opt, Rep, TransmissionFlag
from luanbd.protocol.errors import OptionError, ProtocolViolation
from luanbd.protocol.handshake import (
    NEED_DATA,
    AbortRequested,
    ExportInfo,
    ExportInfoRequested,
    ExportListRequested,
    ExportNameRequested,
    HandshakeConfig,
    HandshakeEvent,
    ServerHandshake,
    StartTlsRequested,
    TlsMode,
    _NeedData,
)
from luanbd.protocol.transmission import RequestParser, Session

GREETING_FLAGS = (HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
                  HandshakeFlag.FIXED_NEWSTYLE, HandshakeFlag(0),
                  HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
TLS_MODES = (TlsMode.OFF, TlsMode.ON, TlsMode.REQUIRE, TlsMode.OFF)
#: Refusals the server may choose for INFO/GO/LIST.
REFUSALS = (Rep.ERR_UNKNOWN, Rep.ERR_PLATFORM, Rep.ERR_SHUTDOWN, Rep.ERR_POLICY)
SIZES = (0, 1, 1 << 20, (1 << 63) - 1, (1 << 64) - 1)
_TLS_REQD = int(Rep.ERR_TLS_REQD)

MakeHandshake = Callable[[HandshakeConfig], ServerHandshake]


def decode(data: bytes) -> tuple[HandshakeConfig, int, int, bytes]:
    """(configuration, chunking seed, answer seed, client stream) of one input."""
    b0 = data[0]
    config = HandshakeConfig(handshake_flags=GREETING_FLAGS[b0 & 3],
                             structured_replies=not b0 & 4, extended_headers=not b0 & 8,
                             meta_contexts=not b0 & 16, tls=TLS_MODES[b0 >> 5 & 3])
    return config, data[1], data[2], data[3:]


@dataclass
class Run:
    """Everything one run of the machine produced."""

    output: bytes
    violation: str | None
    negotiated: str | None
    closed: bool
    requests: Outcome | None
    tls: bool
    export_name_reply: bool

    def key(self) -> tuple[object, ...]:
        return (self.output, self.violation, self.negotiated, self.closed, self.requests)


def _info(rng: random.Random) -> ExportInfo:
    return ExportInfo(size=rng.choice(SIZES), flags=TransmissionFlag(rng.randrange(1 << 12)),
                      name=rng.choice([None, b"", b"export"]),
                      description=rng.choice([None, b"a disk"]),
                      block_size=rng.choice([None, (1, 4096, 1 << 25)]))


def _answer(hs: ServerHandshake, event: HandshakeEvent, rng: random.Random, run: Run) -> bytes:
    """Answer ``event`` as luanbd's server does (sometimes with a refusal)."""
    if isinstance(event, ExportInfoRequested):
        if rng.random() < 0.25:
            return hs.option_error_reply(rng.choice(REFUSALS), "refused")
        return hs.export_info_reply(_info(rng))
    if isinstance(event, ExportListRequested):
        if rng.random() < 0.25:
            return hs.option_error_reply(rng.choice(REFUSALS), "could not list exports")
        return hs.export_list_reply([(b"", b""), (b"other", b"another disk")][:rng.randint(0, 2)])
    if isinstance(event, ExportNameRequested):
        run.export_name_reply = True
        return hs.export_name_reply(_info(rng))
    if isinstance(event, StartTlsRequested):
        run.tls = True
        if hs.pending_input:
            raise ProtocolViolation("client sent data in plaintext after NBD_OPT_STARTTLS")
        hs.tls_established()
        return b""
    expect(isinstance(event, AbortRequested), f"unknown event {event!r}")
    return b""


def run_handshake(make: MakeHandshake, config: HandshakeConfig, pieces: Iterable[bytes],
                  answer_seed: int) -> Run:
    rng = random.Random(answer_seed)
    run = Run(b"", None, None, False, None, False, False)
    out: list[bytes] = []
    pending = iter(pieces)
    try:
        try:
            hs = make(config)
            greeting = hs.data_to_send()
            expect(greeting == struct.pack(">QQH", nbdwire.NBDMAGIC, nbdwire.IHAVEOPT,
                                           int(config.handshake_flags)),
                   f"bad greeting {greeting.hex()}")
            while not hs.finished:
                event = hs.next_event()
                if event is NEED_DATA:
                    out.append(hs.data_to_send())
                    piece = next(pending, None)
                    if piece is None:
                        break
                    hs.receive_data(piece)
                    continue
                assert not isinstance(event, _NeedData)
                out.append(hs.data_to_send())
                out.append(_answer(hs, event, rng, run))
            out.append(hs.data_to_send())
        except (ProtocolViolation, OptionError) as err:
            run.violation = f"{type(err).__name__}: {err}"
            out.append(hs.data_to_send())
        run.output = b"".join(out)
        run.closed = hs.closed
        neg = hs.negotiated
        if neg is not None:
            run.negotiated = repr(neg)
            session = Session.from_negotiated(neg)
            parser = RequestParser(neg.trailing_data, extended=neg.extended_headers)
            run.requests = run_parser(parser, list(pending), session, use_buffer=True)
    except Finding:
        raise
    except Exception as err:
        raise Finding(f"{type(err).__name__}: {err}") from err
    check_run(run, config, hs)
    return run


def check_run(run: Run, config: HandshakeConfig, hs: ServerHandshake) -> None:
    replies, rest = nbdwire.split_option_replies(run.output)
    if run.export_name_reply and not run.violation:
        expect(len(rest) in (10, 134), f"EXPORT_NAME reply of {len(rest)} bytes")
    else:
        expect(rest == b"", f"output ends with {len(rest)} unframed bytes: {rest[:40].hex()}")
    if config.tls is not TlsMode.REQUIRE:
        expect(all(r != _TLS_REQD for _, r, _ in replies), "ERR_TLS_REQD without --tls=require")
    for _, reply, payload in replies:
        if reply & (1 << 31):
            try:
                payload.decode()
            except UnicodeDecodeError:
                raise Finding(f"error message is not UTF-8: {payload!r}") from None
    if not config.structured_replies:
        expect(all(r not in (Rep.ACK,) or o not in (Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS)
                   for o, r, _ in replies), "structured replies acknowledged with --no-sr")
    neg = hs.negotiated
    if neg is not None:
        expect(bool(neg.flags & TransmissionFlag.HAS_FLAGS), "negotiated without HAS_FLAGS")
        expect(bool(neg.flags & TransmissionFlag.SEND_DF) == neg.structured_replies,
               "SEND_DF does not match structured replies")
        if neg.base_allocation_id is not None:
            expect(neg.structured_replies, "base:allocation without structured replies")
        if neg.extended_headers:
            expect(neg.structured_replies, "extended headers without structured replies")


def check_handshake(data: bytes, make: MakeHandshake = ServerHandshake) -> None:
    """One input: run it whole, and cut in pieces if byte 1 says so; both must agree."""
    if len(data) < 3:
        return
    config, seed, answer_seed, stream = decode(data)
    whole = run_handshake(make, config, [stream], answer_seed)
    if seed:
        cut = run_handshake(make, config, chunks(stream, seed), answer_seed)
        if not (whole.tls or cut.tls):
            expect(cut.key() == whole.key(),
                   f"the result depends on how the input is cut:\nwhole: {whole}\ncut:   {cut}")


def _broken_list(self: ServerHandshake, payload: bytes) -> HandshakeEvent | None:
    raise KeyError("injected bug")


class BrokenHandshake(ServerHandshake):
    """For ``LUANBD_FUZZ_INJECT``: NBD_OPT_LIST raises KeyError.  Shallow on purpose (seeds
    hold NBD_OPT_LIST), so the self-test is quick and certain: it checks that a bug is
    reported, not how deep the fuzzer digs."""

    _dispatch = {**ServerHandshake._dispatch, Opt.LIST: _broken_list}


def check(data: bytes) -> None:
    check_handshake(data, BrokenHandshake if fuzzlib.injecting() else ServerHandshake)


if __name__ == "__main__":
    fuzzlib.main(check)
