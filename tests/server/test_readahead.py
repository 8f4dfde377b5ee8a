"""server/readahead.py over a real socket pair: the helper's result is the parser's next
request, errors reach the request loop, stop() ends a helper still waiting, and the rule
that stops reading ahead for a client that waits for each reply."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from luanbd.protocol.constants import Cmd
from luanbd.protocol.errors import ProtocolViolation
from luanbd.protocol.transmission import RequestParser
from luanbd.server.readahead import MAX_SKIP, ReadAhead
from luanbd.server.transport import ClientGone


def header(cmd: int, offset: int, length: int, cookie: int, magic: int = 0x25609513) -> bytes:
    return struct.pack(">IHHQQI", magic, 0, cmd, cookie, offset, length)


class Pair:
    def __init__(self) -> None:
        self.server, self.client = socket.socketpair()
        self.parser = RequestParser()

        def receive() -> None:
            with self.parser.get_buffer() as view:
                n = self.server.recv_into(view)
            if n == 0:
                raise ClientGone
            self.parser.commit(n)

        self.ahead = ReadAhead(self.parser, receive,
                               lambda: self.server.shutdown(socket.SHUT_RD), "test-reader")

    def close(self) -> None:
        self.ahead.stop()
        self.server.close()
        self.client.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def test_the_result_is_the_next_request_sent_in_pieces(pair: Pair) -> None:
    payload = bytes(range(256)) * 1024
    data = header(1, 4096, len(payload), 7) + payload
    pair.ahead.start()
    assert pair.ahead.pending

    def send() -> None:
        for i in range(0, len(data), 10000):
            pair.client.sendall(data[i:i + 10000])

    sender = threading.Thread(target=send)
    sender.start()
    request = pair.ahead.result()
    sender.join()
    assert (request.cmd, request.cookie, request.offset, request.data) == \
        (Cmd.WRITE, 7, 4096, payload)
    assert pair.ahead.arrived and not pair.ahead.pending
    # The helper serves one request per start(): the next one too.
    pair.client.sendall(header(0, 0, 512, 8))
    pair.ahead.start()
    assert pair.ahead.result().cookie == 8


def test_errors_are_raised_in_the_request_loop(pair: Pair) -> None:
    pair.ahead.start()
    pair.client.sendall(header(0, 0, 512, 1, magic=0x12345678))
    with pytest.raises(ProtocolViolation, match="magic"):
        pair.ahead.result()


def test_the_client_leaving_is_raised_in_the_request_loop(pair: Pair) -> None:
    pair.ahead.start()
    pair.client.shutdown(socket.SHUT_WR)
    with pytest.raises(ClientGone):
        pair.ahead.result()


def test_stop_ends_a_helper_that_still_waits(pair: Pair) -> None:
    pair.ahead.start()
    pair.ahead.stop()  # nothing was sent: the helper sees EOF and ends
    assert not pair.ahead.pending
    assert not [t for t in threading.enumerate() if t.name == "test-reader"]


def test_backs_off_while_it_gains_nothing() -> None:
    ahead = ReadAhead(RequestParser(), lambda: None, lambda: None, "unused")

    def served_without() -> int:
        n = 0
        while not ahead.wanted():
            n += 1
        return n

    assert ahead.wanted()
    ahead.written()  # one miss: not yet
    assert ahead.wanted()
    skips = []
    for _ in range(9):
        ahead.written()
        ahead.written()
        skips.append(served_without())
    assert skips == [8, 16, 32, 64, 128, 256, 512, MAX_SKIP, MAX_SKIP]
    # One WRITE during which the next request came resets it.
    ahead.arrived = True
    ahead.written()
    ahead.arrived = False
    ahead.written()
    ahead.written()
    assert served_without() == 8
