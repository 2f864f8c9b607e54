"""What every netlink family kport speaks shares: the message header and its flags."""

from __future__ import annotations

import struct
from typing import Final

#: struct nlmsghdr: length, type, flags, sequence number, port id
NLMSGHDR: Final = struct.Struct("=IHHII")
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
#: a receive buffer beyond rmem_max (root only)
SO_RCVBUFFORCE: Final = 33
