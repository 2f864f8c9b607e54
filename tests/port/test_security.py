"""Security: names resolved, modes derived, peers admitted by uid, gid or supplementary group."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from kport.port.security import PeerCredentials, Security, peer_credentials


def test_default_is_the_owner_alone() -> None:
    sec = Security().resolve()
    assert sec.uids == {os.geteuid()}
    assert sec.mode == 0o600
    assert sec.admits(PeerCredentials(1, os.geteuid(), 12345, frozenset()))
    assert not sec.admits(PeerCredentials(1, 65534, 65534, frozenset()))


def test_group_membership_admits() -> None:
    sec = Security(gids=[4242]).resolve()
    assert sec.mode == 0o660 and sec.group == 4242
    assert sec.admits(PeerCredentials(1, 5000, 4242, frozenset()))
    assert sec.admits(PeerCredentials(1, 5000, 100, frozenset({4242})))
    assert not sec.admits(PeerCredentials(1, 5000, 100, frozenset({7})))


def test_names_resolve_and_unknown_names_are_clear() -> None:
    sec = Security(uids=["root", "nobody"]).resolve()
    assert sec.uids == {0, 65534}
    with pytest.raises(ValueError, match="user 'no-such-user-x'"):
        Security(uids=["no-such-user-x"]).resolve()
    with pytest.raises(ValueError, match="group 'no-such-group-x'"):
        Security(gids=["no-such-group-x"]).resolve()
    with pytest.raises(ValueError, match="not a permission mode"):
        Security(mode=0o7777).resolve()


def test_peer_credentials_of_a_real_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_peer_credentials_carry_supplementary_groups(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        pid = os.fork()
        if pid == 0:  # the child: in groups the parent is not, then connects
            try:
                os.setgroups([4242, 4343])
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.connect(path)
                    client.recv(1)
            finally:
                os._exit(0)
        conn, _ = server.accept()
        with conn:
            peer = peer_credentials(conn)
            conn.send(b"x")
        os.waitpid(pid, 0)
    assert peer.pid == pid and {4242, 4343} <= peer.groups
    assert Security(gids=[4343]).resolve().admits(peer)
