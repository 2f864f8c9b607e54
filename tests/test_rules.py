"""Rules: first match wins, globs, identities, ancestry, safe reloads, the decision cache."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

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


def test_a_rule_with_several_globs_matches_any_of_them_whole() -> None:
    rules, _ = parse(
        """
[[rule]]
action = "deny"
path = ["/srv/*.key", "/etc/shadow", "/home/**/id_[!.]*"]
exe = ["/usr/bin/cat", "/usr/bin/le?s"]
ancestors = ["/usr/sbin/cron", "/usr/bin/*sh"]
""",
        "t.toml",
    )
    rs = RuleSet(default="allow")
    rs.rules = rules
    by = {"exe": "/usr/bin/less", "ancestors": ("/usr/bin/zsh",)}
    for path in ("/srv/a.key", "/etc/shadow", "/home/u/.ssh/id_rsa"):
        assert rs.decide(subject(path=path, **by)).action == "deny", path
    # each glob is anchored at both ends, alone as much as beside the others
    for path in ("/srv/a/b.key", "/etc/shadow.bak", "/x/etc/shadow", "/home/u/id_.x"):
        assert rs.decide(subject(path=path, **by)).action == "allow", path
    zsh = ("/usr/bin/zsh",)
    assert rs.decide(subject(path="/etc/shadow", exe="/usr/bin/cat", ancestors=zsh)).action == (
        "deny"
    )
    assert rs.decide(subject(path="/etc/shadow", exe="/usr/bin/lesss", ancestors=zsh)).action == (
        "allow"
    )
    assert rs.decide(subject(path="/etc/shadow", exe="/usr/bin/cat")).action == "allow"
    deep = ("/usr/bin/python3", "/usr/sbin/cron")
    assert rs.decide(subject(path="/etc/shadow", exe="/usr/bin/cat", ancestors=deep)).action == (
        "deny"
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


def test_listing_separates_the_editable_file_from_the_others(tmp_path: Path) -> None:
    main, own = tmp_path / "rules.toml", tmp_path / "own.toml"
    write(main, '[[rule]]\naction = "deny"\npath = "/srv/**"\n')
    write(own, 'default = "ask"\n[[rule]]\naction = "allow"\npath = "/srv/x"\n')
    rs = RuleSet([own, main], kinds=KINDS)
    rs.add_temporary({"action": "deny", "path": "/tmp/t"}, minutes=5)
    listing = rs.listing(own)
    assert listing["default"] == "ask"
    assert listing["editable"]["rules"] == [{"action": "allow", "path": "/srv/x"}]
    assert listing["others"] == [
        {"origin": f"{main}:1", "rule": {"action": "deny", "path": "/srv/**"}}
    ]
    [temporary] = listing["temporary"]
    assert temporary["rule"]["path"] == "/tmp/t" and 4.9 < temporary["minutes_left"] <= 5
    assert "path" in listing["fields"] and "open_perm" in listing["kinds"]


def test_save_replaces_the_editable_rules_keeps_the_default_and_reloads(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    write(own, 'default = "deny"\n# a comment\n[[rule]]\naction = "allow"\npath = "/a"\n')
    rs = RuleSet([own], kinds=KINDS)
    version = rs.listing(own)["editable"]["version"]
    new = [
        {"action": "deny", "path": ["/b", "/c"], "name": "second"},
        {"action": "allow", "path": "/a", "users": [1000]},
    ]
    rs.save(own, new, version)
    assert rs.listing(own)["editable"]["rules"] == new
    assert rs.default == "deny"
    assert rs.decide(subject(path="/c")).rule == "second"
    assert rs.decide(subject(path="/a", uid=1000)).action == "allow"


def test_save_refuses_a_bad_rule_or_a_stale_version_and_writes_nothing(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    write(own, '[[rule]]\naction = "allow"\npath = "/a"\n')
    rs = RuleSet([own], kinds=KINDS)
    before = own.read_text()
    version = rs.listing(own)["editable"]["version"]
    with pytest.raises(RulesError, match=r"rule 2: action must be one of"):
        rs.save(own, [{"action": "allow"}, {"action": "perhaps"}], version)
    with pytest.raises(RulesError, match=r"rule 1: unknown key 'colour'"):
        rs.save(own, [{"action": "allow", "colour": "red"}], version)
    with pytest.raises(RulesError, match="rule 1: a rule must be a mapping"):
        rs.save(own, ["allow"], version)
    assert own.read_text() == before
    write(own, before + '[[rule]]\naction = "deny"\n')  # someone else's edit
    with pytest.raises(RulesError, match="changed since it was read"):
        rs.save(own, [], version)
    assert "deny" in own.read_text()


def net_subject(**kw: Any) -> Subject:
    base: dict[str, Any] = {
        "kind": "connect",
        "exe": "/usr/bin/curl",
        "uid": 1000,
        "cmdline": "curl --insecure https://a.example.org",
        "host": "a.example.org",
        "address": "192.0.2.10",
        "port": 443,
        "protocol": "tcp",
        "interface": "eth0",
        "direction": "out",
    }
    return Subject(**{**base, **kw})


def test_network_rules_match_every_connection_field(tmp_path: Path) -> None:
    path = tmp_path / "net.toml"
    path.write_text(
        'default = "reject"\n'
        '[[rule]]\nname = "web"\naction = "allow"\nports = [80, "440-450"]\nprotocols = ["tcp"]\n'
        'hosts = ["*.example.org"]\n'
        '[[rule]]\nname = "lan"\naction = "allow"\naddresses = ["10.0.0.0/8", "2001:db8::/32"]\n'
        '[[rule]]\nname = "insecure"\naction = "deny"\ncmdline = ["*--insecure*"]\n'
        '[[rule]]\nname = "inbound ssh"\naction = "allow"\ndirection = "in"\nports = [22]\n'
        'interfaces = ["eth0"]\n'
    )
    rs = RuleSet([path], domain="net")
    assert rs.decide(net_subject()).rule == "web"
    assert rs.decide(net_subject(port=8443)).rule == "insecure"
    assert rs.decide(net_subject(host=None, address="10.1.2.3", port=9)).rule == "lan"
    assert rs.decide(net_subject(address="2001:db8::5", host=None, port=9)).rule == "lan"
    assert rs.decide(net_subject(direction="in", port=22, cmdline=None)).rule == "inbound ssh"
    assert (
        rs.decide(net_subject(direction="in", port=22, cmdline=None, interface="wlan0")).action
        == "reject"
    )


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ('action = "allow"\nports = ["80-"]', "ports are numbers or ranges"),
        ('action = "allow"\nports = ["90-80"]', "outside 0-65535 or backwards"),
        ('action = "allow"\naddresses = ["10.0.0.0/33"]', "not an IP address or CIDR"),
        ('action = "allow"\ndirection = "up"', "direction must be in or out"),
        ('action = "allow"\npath = ["/x"]', "unknown key 'path'"),
    ],
)
def test_bad_network_rules_name_what_is_wrong(tmp_path: Path, rule: str, error: str) -> None:
    path = tmp_path / "net.toml"
    path.write_text(f"[[rule]]\n{rule}\n")
    with pytest.raises(RulesError, match=error):
        RuleSet([path], domain="net")


def test_reject_is_for_connections_only(tmp_path: Path) -> None:
    path = tmp_path / "file.toml"
    path.write_text('[[rule]]\naction = "reject"\n')
    with pytest.raises(RulesError, match="action must be one of allow, deny, ask, log"):
        RuleSet([path])


def test_temporary_rules_come_first_and_end_on_time(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = RuleSet(domain="net", default="ask")
    key = ("pid", 1, "exe", "192.0.2.10", 443, "tcp", "out")
    assert rs.decide(net_subject(), key).action == "ask"
    rs.add_temporary({"action": "allow", "ports": [443]}, minutes=5)
    rs.add_temporary({"action": "deny", "ports": [80], "name": "no plain web"})
    assert rs.cached(key) is None  # the cache went with the change
    assert rs.decide(net_subject(), key).rule == "for 5 minutes"
    assert rs.decide(net_subject(port=80)).rule == "no plain web"
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 301)
    assert rs.cached(key) is None  # ended: the cached decision went with it
    assert rs.decide(net_subject(), key).action == "ask"
    assert rs.decide(net_subject(port=80)).rule == "no plain web"  # until restart


@pytest.mark.parametrize("domain", ["file", "net"])
def test_sha256_rules_match_the_executable_by_its_content(tmp_path: Path, domain: str) -> None:
    path = tmp_path / "rules.toml"
    good = "ab" * 32
    write(path, f'[[rule]]\nname = "known"\naction = "deny"\nsha256 = ["{good.upper()}"]\n')
    rules = RuleSet([path], domain=domain)
    assert rules.decide(subject(exe_sha256=good)).rule == "known"
    assert rules.decide(subject(exe_sha256="cd" * 32)).rule == "default"
    assert rules.decide(subject()).rule == "default"  # not known (yet): no match


def test_a_bad_sha256_names_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\naction = "deny"\n\n[[rule]]\naction = "deny"\nsha256 = "abc"\n')
    with pytest.raises(RulesError, match=r"rules.toml:4: rule 2: sha256: 'abc' is not a sha256"):
        RuleSet([path])
