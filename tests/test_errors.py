"""Every wire error code maps back to its exception class, and the hierarchy holds."""

from __future__ import annotations

import pytest

import kport
from kport import errors


@pytest.mark.parametrize("code", list(errors.ErrorCode))
def test_codes_round_trip(code: errors.ErrorCode) -> None:
    exc = errors.error_from_code(code, "m")
    assert isinstance(exc, kport.KportError)
    assert str(exc) == "m"
    if code is not errors.ErrorCode.PROTOCOL:
        assert exc.code is code


def test_unknown_code_is_a_remote_protocol_error() -> None:
    assert isinstance(errors.error_from_code(999, "x"), kport.RemoteProtocolError)


def test_local_and_remote_are_different_protocol_errors() -> None:
    assert issubclass(kport.LocalProtocolError, kport.ProtocolError)
    assert issubclass(kport.RemoteProtocolError, kport.ProtocolError)
    assert not issubclass(kport.LocalProtocolError, kport.RemoteProtocolError)


def test_builtin_bases_let_callers_catch_broadly() -> None:
    assert issubclass(kport.PortNotFound, FileNotFoundError)
    assert issubclass(kport.AccessDenied, PermissionError)
    assert issubclass(kport.Timeout, TimeoutError)
    assert errors.code_of(ValueError()) is errors.ErrorCode.HANDLER_FAILED
