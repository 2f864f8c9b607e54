"""The fleet's names: subject tokens made safe, message ids read back, and payloads that
keep a net event's own host (the peer's name) beside the host that saw it."""

from __future__ import annotations

import orjson

from kport.fleet import subjects


def test_tokens_are_one_subject_token_each() -> None:
    assert subjects.token("build-07.example.com") == "build-07_example_com"
    assert subjects.token("a b*>") == "a_b__"
    assert subjects.token("") == "_"
    assert subjects.subject("h.1", "proc", "exec") == "kport.h_1.proc.exec"
    assert subjects.host_filter(None) == "kport.*.*.>"
    assert subjects.host_filter("h1", "net") == "kport.h1.net.>"


def test_message_ids_read_back_and_others_are_not_ours() -> None:
    assert subjects.parse_message_id(subjects.message_id("h1", "ab12", 42)) == ("h1", "ab12", 42)
    assert subjects.parse_message_id("something else") is None
    assert subjects.parse_message_id("h1:ab12:x") is None


def test_a_net_events_own_host_is_kept_as_peer_host() -> None:
    event = {"seq": 7, "source": "net", "kind": "connect", "host": "example.org", "dport": 443}
    sent = orjson.loads(subjects.payload(event, "h1", "ab12"))
    assert sent["host"] == "h1" and sent["journal"] == "ab12"
    assert sent["peer_host"] == "example.org" and sent["dport"] == 443
    assert subjects.as_on_host(sent) == event
    plain = orjson.loads(subjects.payload({"seq": 1, "source": "proc"}, "h1", "ab12"))
    assert "peer_host" not in plain
    assert subjects.as_on_host(plain) == {"seq": 1, "source": "proc"}
