"""nbd_error_for: the errno -> NBD error table (nbdkit.md §4 "errno -> NBD error", proto.md
"Error values"), and the exception types."""

from __future__ import annotations

import errno

import pytest

from luanbd.protocol.constants import CmdFlag, NbdError, Rep
from luanbd.protocol.errors import OptionError, ProtocolViolation, RequestError, nbd_error_for

from . import vectors as v

E = v.SPEC_ERRORS
FAST_ZERO = v.FLAG_FAST_ZERO
DF = v.FLAG_DF

#: (errno, request flags, NBD error on the wire)
TABLE = [
    (0, 0, 0),
    (errno.EROFS, 0, E["NBD_EPERM"]),
    (errno.EPERM, 0, E["NBD_EPERM"]),
    (errno.EIO, 0, E["NBD_EIO"]),
    (errno.ENOMEM, 0, E["NBD_ENOMEM"]),
    # proto.md: "It also SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC"
    (errno.ENOSPC, 0, E["NBD_ENOSPC"]),
    (errno.EFBIG, 0, E["NBD_ENOSPC"]),
    (errno.EDQUOT, 0, E["NBD_ENOSPC"]),
    (errno.ESHUTDOWN, 0, E["NBD_ESHUTDOWN"]),
    (errno.EINVAL, 0, E["NBD_EINVAL"]),
    # proto.md: "The server SHOULD NOT return NBD_ENOTSUP except as documented in response to
    # NBD_CMD_WRITE_ZEROES when NBD_CMD_FLAG_FAST_ZERO is supported."
    (errno.ENOTSUP, FAST_ZERO, E["NBD_ENOTSUP"]),
    (errno.EOPNOTSUPP, FAST_ZERO, E["NBD_ENOTSUP"]),
    (errno.ENOTSUP, 0, E["NBD_EINVAL"]),
    (errno.EOPNOTSUPP, 0, E["NBD_EINVAL"]),
    (errno.ENOTSUP, DF | v.FLAG_FUA | v.FLAG_NO_HOLE, E["NBD_EINVAL"]),
    # proto.md: "The server SHOULD NOT return NBD_EOVERFLOW except as documented in response to
    # NBD_CMD_READ when NBD_CMD_FLAG_DF is supported."
    (errno.EOVERFLOW, DF, E["NBD_EOVERFLOW"]),
    (errno.EOVERFLOW, 0, E["NBD_EINVAL"]),
    (errno.EOVERFLOW, FAST_ZERO, E["NBD_EINVAL"]),
    (errno.ENOTSUP, FAST_ZERO | DF, E["NBD_ENOTSUP"]),
    (errno.EOVERFLOW, FAST_ZERO | DF, E["NBD_EOVERFLOW"]),
    # "everything else -> EINVAL"
    (errno.ENOENT, 0, E["NBD_EINVAL"]),
    (errno.EACCES, 0, E["NBD_EINVAL"]),
    (errno.EAGAIN, 0, E["NBD_EINVAL"]),
    (errno.EBADF, 0, E["NBD_EINVAL"]),
    (9999, 0, E["NBD_EINVAL"]),
]


@pytest.mark.parametrize(("code", "flags", "wire"), TABLE,
                         ids=[f"{errno.errorcode.get(c, c)}-flags{f:#x}" for c, f, _ in TABLE])
def test_nbd_error_for(code: int, flags: int, wire: int) -> None:
    result = nbd_error_for(code, flags)
    assert result == wire
    assert isinstance(result, NbdError)


def test_only_spec_error_values_are_produced() -> None:
    """proto.md: 'the allowed values for the error field have been restricted to set of
    possibilities'."""
    allowed = {0, *E.values()}
    for code in range(200):
        for flags in (0, FAST_ZERO, DF, FAST_ZERO | DF, 0xFFFF):
            assert nbd_error_for(code, flags) in allowed


def test_flags_default_to_none() -> None:
    assert nbd_error_for(errno.ENOTSUP) == E["NBD_EINVAL"]
    assert nbd_error_for(errno.EOVERFLOW) == E["NBD_EINVAL"]
    assert nbd_error_for(errno.ENOTSUP, CmdFlag.FAST_ZERO) == E["NBD_ENOTSUP"]


def test_exception_types() -> None:
    err = RequestError(errno.ENOSPC, "offset and count are out of range")
    assert err.errno == errno.ENOSPC
    assert str(err) == "offset and count are out of range"
    opt = OptionError(Rep.ERR_INVALID, "bad")
    assert opt.reply == v.ERR_INVALID
    assert str(opt) == "bad"
    for cls in (ProtocolViolation, OptionError, RequestError):
        assert issubclass(cls, Exception)
    # distinct: catching one must not swallow another
    assert not issubclass(RequestError, ProtocolViolation)
    assert not issubclass(ProtocolViolation, RequestError)
