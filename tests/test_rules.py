"""Rules: first match wins, globs, identities, ancestry, safe reloads, the decision cache."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest

from kport.rules import RulesError, RuleSet, Subject, glob_regex, parse

KINDS = ("open_perm", "open_exec_perm", "access_perm")


def subject(**fields: object) -> Subject:
    base: dict[str, object] = {"kind": "open_perm", "path": "/srv/data/a.txt", "uid": 1000}
    base.update(fields)
    return Subject(**base)  # type: ignore[arg-type]


def write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = time.time_ns() + 1_000_000_000  # a different mtime even within one tick
    os.utime(path, ns=(stamp, stamp))


def test_first_match_wins_and_the_default_is_explicit(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    write(
        rules,
        """
default = "deny"
[[rule]]
name = "logs"
action = "allow"
path = "/var/log/**"
[[rule]]
name = "secrets"
action = "deny"
path = ["/srv/**/secret*"]
[[rule]]
action = "ask"
kinds = ["open_perm"]
path = "/srv/**"
""",
    )
    rs = RuleSet([rules], kinds=KINDS)
    assert rs.decide(subject(path="/var/log/x/y.log")).rule == "logs"
    assert rs.decide(subject(path="/srv/a/secret.key")).action == "deny"
    ask = rs.decide(subject(path="/srv/a/b"))
    assert ask.action == "ask" and "rule 3" in ask.rule and "rules.toml:11" in ask.rule
    assert rs.decide(subject(path="/srv/a/b", kind="open_exec_perm")).action == "deny"
    assert rs.decide(subject(path="/home/x")).rule == "default"


def test_globs_users_groups_exe_and_ancestors(tmp_path: Path) -> None:
    assert glob_regex("/a/*/c").match("/a/b/c") and not glob_regex("/a/*/c").match("/a/b/x/c")
    assert glob_regex("/a/**/c").match("/a/b/x/c")
    assert glob_regex("/a/[!x]?").match("/a/yz") and not glob_regex("/a/[!x]?").match("/a/xz")
    rules, _ = parse(
        """
[[rule]]
action = "deny"
users = ["root"]
groups = ["root"]
exe = "/usr/bin/cat"
[[rule]]
action = "allow"
ancestors = ["/usr/sbin/sshd"]
""",
        "t.toml",
    )
    rs = RuleSet(default="log")
    rs.rules = rules
    assert rs.decide(subject(uid=0, gid=0, exe="/usr/bin/cat")).action == "deny"
    assert rs.decide(subject(uid=0, gid=5, exe="/usr/bin/cat")).action == "log"
    assert rs.decide(subject(uid=7, ancestors=("/usr/bin/bash", "/usr/sbin/sshd"))).action == (
        "allow"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]]\naction = 'maybe'\n", "t.toml:1: rule 1: action must be one of"),
        (
            "[[rule]]\naction = 'deny'\n\n[[rule]]\naction = 'allow'\npth = 'x'\n",
            "t.toml:4: rule 2: unknown key 'pth'",
        ),
        (
            "[[rule]]\naction = 'deny'\nusers = ['no-such-user-kport']\n",
            "no such name 'no-such-user-kport'",
        ),
        ("[[rule]]\naction = 'deny'\nkinds = ['opne_perm']\n", re.escape("['opne_perm']")),
        ("default = 'sometimes'\n", "t.toml:1: default must be one of"),
        ("[[rule]\n", "t.toml: "),
        ("rules = 1\n", "unknown top-level key 'rules'"),
        ("[[rule]]\naction = 'deny'\npath = '/a/[b'\n", "has a '\\[' with no '\\]'"),
    ],
)
def test_errors_name_the_file_line_and_problem(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse(text, "t.toml", KINDS)


def test_a_bad_edit_keeps_the_rules_in_force_and_a_good_one_replaces_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "rules.toml"
    write(rules, '[[rule]]\naction = "deny"\npath = "/srv/**"\n')
    rs = RuleSet([rules], kinds=KINDS)
    key = (1234, 99, "/srv/a", "open_perm")
    assert rs.decide(subject(path="/srv/a"), key).action == "deny"
    assert rs.decide(subject(path="/srv/a"), key).action == "deny" and rs.hits == 1
    assert not rs.reload_if_changed()  # nothing changed
    write(rules, '[[rule]]\naction = "allow"\npath = "/srv/**"\n[[rule]]\naction = "oops"\n')
    with caplog.at_level(logging.ERROR, logger="kport.rules"):
        assert not rs.reload_if_changed()
    assert "rules.toml:4: rule 2: action must be one of" in caplog.text
    assert rs.decide(subject(path="/srv/a"), key).action == "deny"  # the old rules
    write(rules, '[[rule]]\naction = "allow"\npath = "/srv/**"\n')
    assert rs.reload_if_changed()
    assert rs.decide(subject(path="/srv/a"), key).action == "allow"  # cache dropped
    rules.unlink()
    assert rs.reload_if_changed() and rs.rules == []


def test_remember_puts_a_rule_first_and_reloads(tmp_path: Path) -> None:
    main, remembered = tmp_path / "rules.toml", tmp_path / "remembered.toml"
    write(main, 'default = "ask"\n[[rule]]\naction = "deny"\npath = "/srv/**"\n')
    rs = RuleSet([remembered, main], kinds=KINDS)
    assert rs.decide(subject(path="/srv/x")).action == "deny"
    rs.remember(remembered, {"action": "allow", "path": "/srv/x", "exe": "/usr/bin/vi"})
    assert rs.decide(subject(path="/srv/x", exe="/usr/bin/vi")).action == "allow"
    assert rs.decide(subject(path="/srv/x", exe="/usr/bin/cat")).action == "deny"
    rs.remember(remembered, {"action": "deny", "path": "/srv/y", "name": 'a "quoted" one'})
    text = remembered.read_text()
    assert text.index("/srv/y") < text.index("/srv/x")  # the newest first
    assert rs.decide(subject(path="/srv/y")).rule == 'a "quoted" one'
    with pytest.raises(ValueError, match="action must be one of"):
        rs.remember(remembered, {"action": "perhaps"})
