"""Who opened a TCP connection from this machine: the user owning the client's socket, as the kernel tells it on
Linux, in the server's network namespace (where a loopback client's socket is too). Elsewhere nobody is named
(`AVAILABLE` is False).

The kernel is asked for that one socket (`sock_diag` over netlink: microseconds); where netlink is refused, its
table of every TCP socket is read instead (`/proc/net/tcp`, `tcp6`: milliseconds, walking the whole table).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Final

_TABLES: Final = ("/proc/net/tcp", "/proc/net/tcp6")
#: Whether the kernel shows its TCP sockets here.
AVAILABLE: Final = os.path.exists(_TABLES[0])

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
# inet_diag_req_v2: family, protocol, extensions, pad, states; inet_diag_sockid: ports and addresses in network
# order, interface, cookie.
_REQUEST = struct.Struct("=BBBxI")
_SOCKET_ID = struct.Struct("!HH16s16s")
_TAIL = struct.Struct("=III")
#: Where the uid is in an inet_diag_msg (after family, state, timer, retrans, the 48-byte id, expires, queues).
_UID = struct.Struct("=I")
_UID_OFFSET = 4 + 48 + 12


def _diag(family: int, client: bytes, client_port: int, server: bytes, server_port: int) -> int | None:
    """The uid owning the socket `client:client_port` -> `server:server_port`, by sock_diag; None if none is."""
    body = (
        _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
        + _SOCKET_ID.pack(client_port, server_port, client.ljust(16, b"\0"), server.ljust(16, b"\0"))
        + _TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    )
    message = _HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(1.0)
        diag.sendto(message, (0, 0))
        answer = diag.recv(65536)
    _, kind, _, _, _ = _HEADER.unpack_from(answer)
    if kind == _NLMSG_ERROR or len(answer) < _HEADER.size + _UID_OFFSET + 4:
        return None  # ENOENT: no such socket (gone already)
    return int(_UID.unpack_from(answer, _HEADER.size + _UID_OFFSET)[0])


def _spelled(address: bytes, port: int) -> str:
    """`address:port` as /proc/net/tcp spells it: each 32-bit word in hex, in the machine's byte order."""
    words = struct.unpack(f"={len(address) // 4}I", address)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def _table(client: bytes, client_port: int, server: bytes, server_port: int) -> int | None:
    local, remote = _spelled(client, client_port), _spelled(server, server_port)
    with open(_TABLES[len(client) == 16], encoding="ascii") as file:
        next(file, None)  # the heading
        for line in file:
            fields = line.split()
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
            if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                return int(fields[7])
    return None


def socket_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the socket at `client` connected to `server` (both `(host, port)` as the server sees them),
    or None if the kernel names none (not Linux, another machine, a connection already gone)."""
    try:
        ours = ipaddress.ip_address(client[0].partition("%")[0])
        theirs = ipaddress.ip_address(server[0].partition("%")[0])
    except ValueError:
        return None
    if ours.version != theirs.version:
        return None
    family = socket.AF_INET if ours.version == 4 else socket.AF_INET6
    ends = (ours.packed, client[1], theirs.packed, server[1])
    try:
        return _diag(family, *ends)
    except (OSError, struct.error, AttributeError):  # no netlink (not Linux, or refused): the slow way
        pass
    try:
        return _table(*ends)
    except (OSError, ValueError):
        return None
