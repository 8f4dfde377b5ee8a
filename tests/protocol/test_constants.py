"""luanbd.protocol.constants against the numbers and names of proto.md "Values"."""

from __future__ import annotations

import enum

import pytest

from luanbd.protocol import constants as c

from . import vectors as v

#: enum -> the spec's table of (name -> value) for that group
GROUPS: list[tuple[type[enum.Enum], dict[str, int]]] = [
    (c.HandshakeFlag, v.SPEC_HANDSHAKE_FLAGS),
    (c.ClientFlag, v.SPEC_CLIENT_FLAGS),
    (c.Opt, v.SPEC_OPTIONS),
    (c.Rep, v.SPEC_REPLIES),
    (c.Info, v.SPEC_INFO),
    (c.TransmissionFlag, v.SPEC_TRANSMISSION_FLAGS),
    (c.Cmd, v.SPEC_COMMANDS),
    (c.CmdFlag, v.SPEC_COMMAND_FLAGS),
    (c.ReplyType, v.SPEC_REPLY_TYPES),
    (c.ReplyFlag, v.SPEC_REPLY_FLAGS),
    (c.BlockStatusFlag, v.SPEC_STATE_FLAGS),
]
_IDS = [g.__name__ for g, _ in GROUPS]


@pytest.mark.parametrize(("group", "spec"), GROUPS, ids=_IDS)
def test_every_member_is_a_spec_item(group: type[enum.Enum], spec: dict[str, int]) -> None:
    """str(member) is the spec's name, and the value is the spec's."""
    for member in group:
        name = str(member)
        assert name in spec, f"{group.__name__}.{member.name} prints {name!r}"
        assert member.value == spec[name], name


@pytest.mark.parametrize(("group", "spec"), GROUPS, ids=_IDS)
def test_every_spec_item_is_a_member(group: type[enum.Enum], spec: dict[str, int]) -> None:
    names = {str(member) for member in group}
    assert set(spec) <= names, set(spec) - names


@pytest.mark.parametrize("name", ["NBD_CMD_READ", "NBD_OPT_GO", "NBD_REP_ERR_TLS_REQD",
                                  "NBD_INFO_BLOCK_SIZE", "NBD_FLAG_SEND_FAST_ZERO",
                                  "NBD_FLAG_C_NO_ZEROES", "NBD_CMD_FLAG_REQ_ONE",
                                  "NBD_REPLY_TYPE_ERROR_OFFSET", "NBD_REPLY_FLAG_DONE",
                                  "NBD_STATE_ZERO", "NBD_FLAG_NO_ZEROES"])
def test_spec_name_examples(name: str) -> None:
    found = [m for group, _ in GROUPS for m in group if str(m) == name]
    assert len(found) == 1, found


def test_str_in_f_strings() -> None:
    assert f"{c.Cmd.READ}" == "NBD_CMD_READ"
    assert f"{c.Rep.ERR_UNSUP}" == "NBD_REP_ERR_UNSUP"


def test_error_values() -> None:
    """proto.md "Error values".  NbdError deliberately prints errno style ("EPERM", as
    nbdkit logs them) rather than the spec's NBD_EPERM; the value is the spec's."""
    for member in c.NbdError:
        if member is c.NbdError.OK:
            assert member.value == 0
            assert str(member) == "0"
            continue
        spec_name = f"NBD_{member}"
        assert spec_name in v.SPEC_ERRORS, spec_name
        assert member.value == v.SPEC_ERRORS[spec_name]
    assert {f"NBD_{m}" for m in c.NbdError if m} == set(v.SPEC_ERRORS)


def test_error_replies_have_bit_31() -> None:
    """'There are a number of error reply types, all of which are denoted by having bit 31
    set.'"""
    for member in c.Rep:
        assert bool(member & (1 << 31)) == member.name.startswith("ERR_")


def test_error_chunk_types_have_bit_15() -> None:
    """'All error chunk types have bit 15 set'."""
    for member in c.ReplyType:
        assert bool(member & (1 << 15)) == member.name.startswith("ERROR")


def test_magics() -> None:
    assert c.NBDMAGIC == v.NBDMAGIC
    assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert c.IHAVEOPT == v.IHAVEOPT
    assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert c.OLDSTYLE_MAGIC == v.CLISERV_MAGIC
    assert c.OPTION_REPLY_MAGIC == v.OPTION_REPLY_MAGIC
    assert c.REQUEST_MAGIC == v.REQUEST_MAGIC
    assert c.SIMPLE_REPLY_MAGIC == v.SIMPLE_REPLY_MAGIC
    assert c.STRUCTURED_REPLY_MAGIC == v.STRUCTURED_REPLY_MAGIC
    assert c.EXTENDED_REQUEST_MAGIC == v.EXTENDED_REQUEST_MAGIC
    assert c.EXTENDED_REPLY_MAGIC == v.EXTENDED_REPLY_MAGIC


def test_wire_struct_sizes() -> None:
    """Sizes from the C:/S: field lists of proto.md."""
    assert c.NEWSTYLE_GREETING.size == 8 + 8 + 2
    assert c.OLDSTYLE_GREETING.size + c.ZERO_PAD == 8 + 8 + 8 + 4 + 124
    assert c.CLIENT_FLAGS.size == 4
    assert c.OPTION_HEADER.size == 8 + 4 + 4
    assert c.OPTION_REPLY_HEADER.size == 8 + 4 + 4 + 4
    assert c.EXPORT_NAME_REPLY.size == 8 + 2
    assert c.REQUEST_HEADER.size == 4 + 2 + 2 + 8 + 8 + 4
    assert c.SIMPLE_REPLY.size == 4 + 4 + 8
    assert c.STRUCTURED_REPLY_HEADER.size == 4 + 2 + 2 + 8 + 4
    for s in (c.NEWSTYLE_GREETING, c.OPTION_HEADER, c.REQUEST_HEADER, c.SIMPLE_REPLY):
        assert s.format.startswith(">"), "network byte order"


def test_limits() -> None:
    assert c.MAX_STRING == 4096  # "MUST be no longer than 4096 bytes"
    assert c.ZERO_PAD == 124  # "124 bytes, zeroes (reserved)"
    assert c.MAX_OPTIONS == v.MAX_OPTIONS
    assert c.MAX_REQUEST_SIZE == v.MAX_REQUEST_SIZE
    # "any *length* less than 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
    # service attack"
    assert c.MAX_REQUEST_SIZE >= 2**25


def test_base_allocation() -> None:
    assert c.BASE_ALLOCATION == b"base:allocation"
    assert c.BASE_ALLOCATION_ID >= 0
