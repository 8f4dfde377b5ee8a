"""nbdkit-ip-filter(1) (nbdkit 1.32): allow or deny clients by their address.

``allow=`` and ``deny=`` (each may be given more than once; rules are appended) take a
comma-separated list of rules: ``all``/``any``, ``allipv4``/``anyipv4``,
``allipv6``/``anyipv6``, ``allunix``/``anyunix``, ``allvsock``/``anyvsock`` (keywords in any
case), ``A.B.C.D[/NN]``, ``A:B:...[/NN]``, ``pid:PID``, ``uid:UID``, ``gid:GID`` (Unix
socket peers, by SO_PEERCRED), ``vsock-cid:CID``, ``vsock-port:PORT``.  A client matching an
allow rule is let in; else one matching a deny rule is refused; else it is let in.  A
refused client is closed before the greeting (in preconnect), with nbdkit's log line.

nbdkit 1.32 has no ``dn:`` or ``security:`` rules (they came later), so neither has this.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from luanbd.backend import current
from luanbd.backend.chain import Backend, Context
from luanbd.backend.interface import PluginError, StartupError
from luanbd.filters.params import parse_number

_KEYWORDS = {
    "all": "any", "any": "any",
    "allipv4": "anyipv4", "anyipv4": "anyipv4",
    "allipv6": "anyipv6", "anyipv6": "anyipv6",
    "allunix": "anyunix", "anyunix": "anyunix",
    "allvsock": "anyvsock", "anyvsock": "anyvsock",
}
_ID_RULES = ("pid:", "uid:", "gid:", "vsock-cid:", "vsock-port:")
#: nbdkit's limits on the text of an address and of a prefix length.
_MAX_ADDRLEN = 64
_MAX_LEN = 32
_AF_VSOCK = getattr(socket, "AF_VSOCK", -1)


@dataclass(frozen=True)
class Rule:
    kind: str  # a keyword's canonical name, "ipv4", "ipv6", or an _ID_RULES prefix
    address: bytes = b""
    prefixlen: int = 0
    id: int = 0


def parse_int64(what: str, value: str) -> int:
    """nbdkit_parse_int64_t, with nbdkit's messages."""
    text = value.lstrip(" \t\n\v\f\r")
    if not text.startswith("-"):
        return parse_number(what, text.removeprefix("+"), (1 << 63) - 1)
    try:
        return -parse_number(what, text[1:], 1 << 63)
    except StartupError as err:  # the message shows the number as given
        raise StartupError(str(err).replace(f'"{text[1:]}"', f'"{value}"')) from None


def _address(text: str) -> tuple[str, bytes] | None:
    """inet_pton as IPv4, then IPv6."""
    if len(text) > _MAX_ADDRLEN:
        return None
    for family, kind in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        try:
            return kind, socket.inet_pton(family, text)
        except (OSError, ValueError):
            continue
    return None


def parse_rule(param: str, rest: str, n: int) -> Rule:
    """The rule in the first ``n`` characters of ``rest`` (the list from this rule on)."""
    value = rest[:n]
    lower = value.lower()
    if lower in _KEYWORDS:
        return Rule(_KEYWORDS[lower])
    for prefix in _ID_RULES:
        if lower.startswith(prefix):
            # nbdkit parses from the prefix to the end of the whole list (a comma after
            # it is trailing garbage).
            n_id = parse_int64(prefix, rest[len(prefix):])
            limit_low = 1 if prefix == "pid:" else 0
            high = 0xFFFFFFFF if prefix.startswith("vsock") else (1 << 63) - 1
            if n_id < limit_low or n_id > high:
                raise StartupError(f"{prefix} parameter out of range")
            return Rule(prefix, id=n_id)
    slash = rest.find("/")  # as nbdkit: searched for past the end of this rule
    if slash >= 0:
        pllen = n - (slash + 1)
        if pllen < 0 or pllen > _MAX_LEN:
            shown = rest[slash + 1:] if pllen < 0 else rest[slash + 1:slash + 1 + pllen]
            raise StartupError(f"{param}: cannot parse prefix length: {shown}")
        prefixlen = parse_number(param, rest[slash + 1:n])
        parsed = _address(rest[:slash])
        if parsed is None:
            raise StartupError(f'cannot parse address "{rest[:slash]}" from {param}={value}')
        kind, address = parsed
        top = 32 if kind == "ipv4" else 128
        if prefixlen > top:
            raise StartupError(f"prefix is > {top} in {param}={value}")
        return Rule(kind, address, prefixlen)
    parsed = _address(value)
    if parsed is None:
        raise StartupError(f"don't know how to parse rule: {param}={value}")
    kind, address = parsed
    return Rule(kind, address, 32 if kind == "ipv4" else 128)


def parse_rules(param: str, value: str) -> list[Rule]:
    rules = []
    pos = 0
    while pos < len(value):
        comma = value.find(",", pos)
        n = (comma if comma >= 0 else len(value)) - pos
        if n == 0:
            raise StartupError(f"{param}: empty entry in rule list")
        rules.append(parse_rule(param, value[pos:], n))
        pos += n + (1 if comma >= 0 else 0)
    return rules


def _prefix_equal(a: bytes, b: bytes, prefixlen: int) -> bool:
    bits = len(a) * 8
    x = int.from_bytes(a, "big") >> (bits - prefixlen) if prefixlen else 0
    y = int.from_bytes(b, "big") >> (bits - prefixlen) if prefixlen else 0
    return x == y


@dataclass(frozen=True)
class Peer:
    family: int
    address: bytes = b""  # IPv4/IPv6 address, network order
    cred: tuple[int, int, int] | None = None  # pid, uid, gid of a Unix socket peer
    vsock: tuple[int, int] | None = None  # cid, port


def peer() -> Peer | None:
    """The connection's peer (nbdkit_peer_name and friends); None if it has none."""
    info = current.connection()
    sock = info.peer_socket if info is not None else None
    if sock is None:
        return None
    try:
        family = sock.family
        if family == socket.AF_UNIX:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                  struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", raw)
            return Peer(family, cred=(pid, uid, gid))
        addr = sock.getpeername()
        if family in (socket.AF_INET, socket.AF_INET6):
            host = addr[0].split("%", 1)[0]
            return Peer(family, socket.inet_pton(family, host))
        if family == _AF_VSOCK:
            return Peer(family, vsock=(int(addr[0]), int(addr[1])))
        return Peer(family)
    except (OSError, ValueError):
        return None


def matches(rule: Rule, who: Peer) -> bool:
    kind, family = rule.kind, who.family
    if kind == "any":
        return True
    if kind in ("anyipv4", "anyipv6", "anyunix", "anyvsock"):
        return family == {"anyipv4": socket.AF_INET, "anyipv6": socket.AF_INET6,
                          "anyunix": socket.AF_UNIX, "anyvsock": _AF_VSOCK}[kind]
    if kind in ("ipv4", "ipv6"):
        want = socket.AF_INET if kind == "ipv4" else socket.AF_INET6
        return family == want and _prefix_equal(who.address, rule.address, rule.prefixlen)
    if kind in ("pid:", "uid:", "gid:"):
        if family != socket.AF_UNIX or who.cred is None:
            return False
        return who.cred[("pid:", "uid:", "gid:").index(kind)] == rule.id
    if family != _AF_VSOCK or who.vsock is None:
        return False
    return who.vsock[0 if kind == "vsock-cid:" else 1] == rule.id


class Filter(Backend):
    name = "ip"
    config_help = ("allow=addr[,addr...]     Set allow list.\n"
                   "deny=addr[,addr...]      Set deny list.")

    def __init__(self) -> None:
        self.allow: list[Rule] = []
        self.deny: list[Rule] = []

    def config(self, next: Callable[[str, str], None], key: str, value: str) -> None:
        if key == "allow":
            self.allow += parse_rules(key, value)
        elif key == "deny":
            self.deny += parse_rules(key, value)
        else:
            next(key, value)

    def allowed(self) -> bool:
        who = peer()
        if who is None:
            return False  # nbdkit fails closed
        if any(matches(rule, who) for rule in self.allow):
            return True
        return not any(matches(rule, who) for rule in self.deny)

    def preconnect(self, next: Context, readonly: bool) -> None:
        if not self.allowed():
            raise PluginError("preconnect", "client not permitted to connect because of "
                                            "source address restriction", errno.EPERM,
                              bare=True)
        next.preconnect(readonly)
