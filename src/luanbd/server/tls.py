"""TLS for NBD_OPT_STARTTLS with the stdlib ``ssl`` module, in nbdkit's certificate layout.

A certificate directory holds ``server-cert.pem`` and ``server-key.pem``, and
``ca-cert.pem`` (needed by ``--tls-verify-peer`` to check client certificates).  Without
``--tls-certificates`` the directories nbdkit uses are searched, so a host set up for nbdkit
works as is.  TLS-PSK (``--tls-psk``) needs a server PSK callback, which ``ssl`` has only
from Python 3.13 on.
"""

from __future__ import annotations

import os
import ssl
import sys

from luanbd.backend.interface import StartupError

SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"


def default_certificate_dirs() -> list[str]:
    """nbdkit's search order: /etc/pki/nbdkit for root, else the user's own directories."""
    if os.geteuid() == 0:
        return ["/etc/pki/nbdkit"]
    home = os.path.expanduser("~")
    return [os.path.join(home, ".pki", "nbdkit"), os.path.join(home, ".config", "pki", "nbdkit")]


def find_certificate_dir(cert_dir: str | None) -> str:
    if cert_dir is not None:
        return cert_dir
    for candidate in default_certificate_dirs():
        if os.path.isfile(os.path.join(candidate, SERVER_CERT)):
            return candidate
    raise StartupError("TLS: no --tls-certificates=DIR, and no server-cert.pem in "
                       + " or ".join(default_certificate_dirs()))


def server_context(cert_dir: str | None, verify_peer: bool) -> ssl.SSLContext:
    """The server's SSLContext; a :class:`StartupError` (one line) if the files are unusable."""
    directory = find_certificate_dir(cert_dir)
    cert = os.path.join(directory, SERVER_CERT)
    key = os.path.join(directory, SERVER_KEY)
    ca = os.path.join(directory, CA_CERT)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets: NBD clients connect once per session and never resume.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as err:
        raise StartupError(f"TLS: {err.filename or cert}: {err.strerror}") from None
    except (ssl.SSLError, OSError) as err:
        raise StartupError(f"TLS: cannot load {cert} / {key}: {_reason(err)}") from None
    if verify_peer or os.path.exists(ca):
        try:
            ctx.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise StartupError(f"TLS: --tls-verify-peer needs {ca}") from None
        except (ssl.SSLError, OSError) as err:
            raise StartupError(f"TLS: cannot load {ca}: {_reason(err)}") from None
    if verify_peer:
        ctx.verify_mode = ssl.CERT_REQUIRED
        crl = os.path.join(directory, CA_CRL)
        if os.path.exists(crl):
            try:
                ctx.load_verify_locations(cafile=crl)
            except (ssl.SSLError, OSError) as err:
                raise StartupError(f"TLS: cannot load {crl}: {_reason(err)}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def psk_unsupported_message() -> str:
    v = sys.version_info
    if hasattr(ssl.SSLContext, "set_psk_server_callback"):
        return "--tls-psk: TLS-PSK is not implemented by luanbd yet; use --tls-certificates"
    return (f"--tls-psk: TLS-PSK is not supported: Python {v.major}.{v.minor}'s ssl module has "
            "no PSK server callback (set_psk_server_callback needs Python 3.13); "
            "use --tls-certificates")


def _reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)
