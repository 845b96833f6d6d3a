# Sockets of the other families (netlink, packet, raw and ICMP inet sockets, SCTP,
# MPTCP, vsock, ...): refused in one line naming the pid, the fd, the family and type,
# before any image is written. It claims every socket the family modules leave, so it
# comes last in FILE_KINDS.

from __future__ import annotations

from criu_py.files import FdRef, FileOps
from criu_py.files.sockets import describe, is_socket, kind_of, refuse

NETLINK_NAMES = {0: "NETLINK_ROUTE", 2: "NETLINK_USERSOCK", 4: "NETLINK_SOCK_DIAG",
                 9: "NETLINK_AUDIT", 15: "NETLINK_KOBJECT_UEVENT", 16: "NETLINK_GENERIC"}


class OtherSocketOps(FileOps):
    fd_type = -1          # never in an image

    def claims(self, ref: FdRef) -> bool:
        return is_socket(ref)

    def check(self, ctx, ref: FdRef) -> None:
        import socket
        k = kind_of(ref)
        what = describe(k)
        if k.family == socket.AF_NETLINK:
            what += f" ({NETLINK_NAMES.get(k.proto, f'protocol {k.proto}')})"
        elif k.family in (socket.AF_INET, socket.AF_INET6):
            what += f" (protocol {k.proto})"
        raise refuse(ref, f"{what} is not supported")


OPS = OtherSocketOps()
