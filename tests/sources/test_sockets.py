"""Socket owners: sock_diag finds real sockets on loopback, /proc names their process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from kport.sources.packet import Flow
from kport.sources.sockets import Owners, SocketDiag, socket_fds


def flow_of(sock: socket.socket, protocol: str, peer: tuple[str, int]) -> Flow:
    local = sock.getsockname()
    return Flow(
        socket.AF_INET,
        protocol,
        local[0],
        peer[0],
        local[1],
        peer[1],
        socket.inet_aton(local[0]),
        socket.inet_aton(peer[0]),
    )


def test_tcp_and_udp_sockets_are_found_by_their_addresses() -> None:
    diag = SocketDiag()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", 0))  # unconnected: found as a receiver would find it
            tcp_flow = flow_of(client, "tcp", server.getsockname())
            assert diag.lookup(tcp_flow) == (os.fstat(client.fileno()).st_ino, os.getuid())
            udp_flow = flow_of(udp, "udp", ("127.0.0.1", 9))
            assert diag.lookup(udp_flow) == (os.fstat(udp.fileno()).st_ino, os.getuid())
            # the same flow seen arriving: the server side's socket
            accepted, _ = server.accept()
            inbound = Flow(
                socket.AF_INET,
                "tcp",
                *(tcp_flow.src, tcp_flow.dst),
                tcp_flow.sport,
                tcp_flow.dport,
                tcp_flow.src_raw,
                tcp_flow.dst_raw,
            )
            assert diag.lookup(inbound, inbound=True) == (
                os.fstat(accepted.fileno()).st_ino,
                os.getuid(),
            )
            accepted.close()
            gone = flow_of(client, "tcp", ("127.0.0.1", 1))  # no such connection
            assert diag.lookup(gone) is None
            assert diag.lookup(flow_of(client, "icmp", ("127.0.0.1", 0))) is None
        finally:
            client.close()
            udp.close()
            diag.close()


def test_a_socket_is_traced_to_the_process_that_holds_it() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket, sys; s = socket.socket(); "
            "print(os.fstat(s.fileno()).st_ino, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        inode = int(child.stdout.readline())
        owners = Owners()
        assert owners.pid_of(inode, os.getuid()) == child.pid
        scans = owners.scans
        assert owners.pid_of(inode, os.getuid()) == child.pid  # remembered: no scan
        assert owners.scans == scans
        assert inode in (socket_fds(child.pid) or {}).values()
        assert owners.pid_of(1, os.getuid()) is None  # no process holds inode 1
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
        assert child.stdout is not None
        child.stdout.close()
    assert socket_fds(child.pid) is None  # gone
