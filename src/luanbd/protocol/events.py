"""What :meth:`ServerHandshake.next_event <luanbd.protocol.handshake.ServerHandshake.next_event>`
returns: an event for each option that the caller must answer, or ``NEED_DATA``."""

from __future__ import annotations

from dataclasses import dataclass

from luanbd.protocol.constants import Opt


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` (and ``RequestParser.next_request``) when more client bytes
#: are needed.
NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ExportNameRequested:
    """NBD_OPT_EXPORT_NAME: answer with :meth:`ServerHandshake.export_name_reply` or close."""

    export_name: bytes


@dataclass(frozen=True, slots=True)
class ExportInfoRequested:
    """NBD_OPT_INFO or NBD_OPT_GO: answer with ``export_info_reply`` or ``option_error_reply``."""

    option: Opt
    export_name: bytes
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ExportListRequested:
    """NBD_OPT_LIST: answer with ``export_list_reply`` or ``option_error_reply``."""


@dataclass(frozen=True, slots=True)
class StartTlsRequested:
    """NBD_OPT_STARTTLS was acknowledged (already in the outbox): send it, run the TLS
    handshake, then call :meth:`ServerHandshake.tls_established`."""


@dataclass(frozen=True, slots=True)
class AbortRequested:
    """NBD_OPT_ABORT: the ACK is in the outbox; send it and close."""


HandshakeEvent = (
    ExportNameRequested
    | ExportInfoRequested
    | ExportListRequested
    | StartTlsRequested
    | AbortRequested
)
