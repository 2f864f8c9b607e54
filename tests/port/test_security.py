"""Security: names resolved, modes derived, peers admitted by uid, gid or supplementary group."""

from __future__ import annotations

import os
import socket

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
