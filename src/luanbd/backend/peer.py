"""What the client's socket says about the client: nbdkit_peer_pid, _uid, _gid,
_security_context (nbdkit 1.24/1.36) and _tls_dn, _tls_issuer_dn (1.40), with nbdkit's
results and messages.  Each takes the connection's socket (``ConnectionInfo.peer_socket``)
and raises ValueError with the message a script sees."""

from __future__ import annotations

import errno
import socket
import ssl
import struct
from typing import Any

from luanbd.log import debug

#: struct ucred: pid_t pid; uid_t uid; gid_t gid (uid_t and gid_t are unsigned).
_UCRED = struct.Struct("iII")
_SO_PEERSEC = getattr(socket, "SO_PEERSEC", 31)
#: The longest security label read: CPython's getsockopt limit (Linux labels are far shorter).
MAX_LABEL = 1024


def _open(sock: socket.socket | None) -> socket.socket:
    if sock is None or sock.fileno() == -1:
        raise ValueError("socket not open")
    return sock


def credentials(sock: socket.socket | None) -> tuple[int, int, int]:
    """SO_PEERCRED: (pid, uid, gid).  Linux answers on any socket: on TCP the pid is 0 and
    uid and gid are (uid_t) -1, which nbdkit passes on as 4294967295."""
    try:
        raw = _open(sock).getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as err:
        raise ValueError(f"getsockopt: SO_PEERCRED: {err.strerror}") from None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def pid(sock: socket.socket | None) -> int:
    """nbdkit_peer_pid: a pid below 1 (a TCP client's 0) is "not known", an error; nbdkit
    returns -1 then without a message, so the words are its Python binding's."""
    value = credentials(sock)[0]
    if value < 1:
        raise ValueError("Unable to get client pid")
    return value


def uid(sock: socket.socket | None) -> int:
    return credentials(sock)[1]


def gid(sock: socket.socket | None) -> int:
    return credentials(sock)[2]


def security_context(sock: socket.socket | None) -> str:
    """nbdkit_peer_security_context: the SO_PEERSEC label (SELinux, AppArmor...).  No
    label support (ENOPROTOOPT) is only a debug message in nbdkit, and still no answer."""
    try:
        raw = _open(sock).getsockopt(socket.SOL_SOCKET, _SO_PEERSEC, MAX_LABEL)
    except OSError as err:
        message = f"getsockopt: SO_PEERSEC: {err.strerror}"
        if err.errno == errno.ENOPROTOOPT:
            debug(message)
        raise ValueError(message) from None
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# --- TLS distinguished names -----------------------------------------------------------
#: OpenSSL's long attribute names (what ssl.getpeercert() gives) that GnuTLS's
#: gnutls_x509_crt_get_dn3 (nbdkit's) spells otherwise; the others (title, givenName,
#: serialNumber...) are the same in both.  Checked against GnuTLS 3.7 in
#: tests/api/test_nbdkit_peer.py.  GnuTLS prints the value of an attribute it does not
#: know as #hex of its DER (telephoneNumber, private OIDs), which ssl cannot give us: for
#: those the value is printed as text.
_DN_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O", "organizationalUnitName": "OU",
    "streetAddress": "street", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "EMAIL", "surname": "surName",
    "jurisdictionLocalityName": "jurisdictionOfIncorporationLocalityName",
    "jurisdictionStateOrProvinceName": "jurisdictionOfIncorporationStateOrProvinceName",
    "jurisdictionCountryName": "jurisdictionOfIncorporationCountryName",
}
_SPECIAL = set(',+"\\<>;')


def escape_value(value: str) -> str:
    """RFC 4514 section 2.4 escaping, as GnuTLS's str_escape does it: the special
    characters anywhere, '#' or ' ' first, ' ' last."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in _SPECIAL or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\")
        out.append(ch)
    return "".join(out)


def format_dn(rdns: Any) -> str:
    """``getpeercert()['subject']`` (RDNs in certificate order, each a tuple of
    (name, value) pairs) as an RFC 4514 string: the last RDN first, ``,`` between RDNs,
    ``+`` inside a multi-valued one."""
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_DN_NAMES.get(name, name)}={escape_value(value)}"
                              for name, value in rdn))
    return ",".join(parts)


def _peer_certificate(sock: socket.socket | None) -> dict[str, Any] | None:
    # No TLS, or no verified client certificate (--tls-verify-peer not given): no DN.
    if not isinstance(sock, ssl.SSLSocket):
        debug("nbdkit_peer_tls_dn: no TLS session")
        return None
    cert = sock.getpeercert()
    if not cert:
        debug("nbdkit_peer_tls_dn: no client certificates (is --tls-verify-peer set?)")
        return None
    return cert


def tls_dn(sock: socket.socket | None) -> str:
    """nbdkit_peer_tls_dn: the client certificate's subject DN, "" when there is none."""
    cert = _peer_certificate(sock)
    return format_dn(cert.get("subject", ())) if cert else ""


def tls_issuer_dn(sock: socket.socket | None) -> str:
    """nbdkit_peer_tls_issuer_dn: the DN of the CA that issued the client certificate."""
    cert = _peer_certificate(sock)
    return format_dn(cert.get("issuer", ())) if cert else ""
