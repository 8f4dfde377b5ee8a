"""Protocol error types, each carrying its wire answer, and the one errno -> NBD error map."""

from __future__ import annotations

import errno as _errno

from luanbd.protocol.constants import CmdFlag, NbdError, Rep


class ProtocolViolation(Exception):
    """The peer broke the protocol so that the stream cannot be trusted: hard disconnect."""


class OptionError(Exception):
    """An option is refused: the client gets ``reply`` (an ``NBD_REP_ERR_*``) and may go on."""

    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message)
        self.reply = reply


class RequestError(Exception):
    """A request is refused before the plugin sees it; ``errno`` (via nbd_error_for) answers."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def nbd_error_for(errno: int, flags: int = 0) -> NbdError:
    """Map a plugin or validation errno to the NBD error sent on the wire (nbdkit ``nbd_errno``).

    ENOTSUP is only meaningful to a client that asked for a fast zero, and EOVERFLOW only to one
    that asked for DF; to anybody else they are plain EINVAL.
    """
    if errno == 0:
        return NbdError.OK
    if errno in (_errno.EROFS, _errno.EPERM):
        return NbdError.PERM
    if errno == _errno.EIO:
        return NbdError.IO
    if errno == _errno.ENOMEM:
        return NbdError.NOMEM
    if errno in (_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT):
        return NbdError.NOSPC
    if errno == _errno.ESHUTDOWN:
        return NbdError.SHUTDOWN
    if errno in (_errno.ENOTSUP, _errno.EOPNOTSUPP):
        return NbdError.NOTSUP if flags & CmdFlag.FAST_ZERO else NbdError.INVAL
    if errno == _errno.EOVERFLOW:
        return NbdError.OVERFLOW if flags & CmdFlag.DF else NbdError.INVAL
    return NbdError.INVAL
