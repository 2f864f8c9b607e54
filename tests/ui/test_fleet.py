"""`kport ui --fleet`: the real `kport ui` process (given up to the user nobody) over a real
nats-server holding the events of two fake hosts, one of them delivered twice, and
Debian's chromium through Playwright: a host column, a host filter, each (host, seq)
once; a broker that is not there at first, and one killed and started again."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets.exceptions
import websockets.sync.client
from playwright.sync_api import Browser, Page, expect, sync_playwright
from websockets.typing import Origin

from bench.common import free_port
from bench.export import Broker
from bench.ui import BROWSER_ARGS, CHROMIUM, wait_until
from kport.fleet import subjects
from kport.ui.fleet import NOT_HERE, RING, FleetBridge
from tests.conftest import SLACK_S
from tests.fleet.test_reader import publish

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
HOSTS = ("alpha", "beta.example")
#: how long the page may take to show what the stream holds: the UI tries the broker
#: every two seconds and a missing stream again after up to five; on a busy machine more
DEADLINE_MS = 3 * SLACK_S * 1000
NATS_SERVER = shutil.which("nats-server")

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test does)"
    ),
    pytest.mark.skipif(
        NATS_SERVER is None, reason="nats-server is not installed (scripts/setup-system.sh --tests)"
    ),
]


def fleet_events(*seqs: int) -> list[tuple[str, dict[str, object], str]]:
    """(host, event, message id) for each seq of each host, as their exporters publish
    them; beta.example's seq 3 is a file event."""
    events = []
    for seq in seqs:
        for host in HOSTS:
            source, kind = (
                ("file", "open") if (host, seq) == ("beta.example", 3) else ("proc", "exec")
            )
            event = {
                "seq": seq,
                "ts": 1_700_000_000_000_000_000 + seq * 1_000_000,
                "source": source,
                "kind": kind,
                "pid": 100 + seq,
                "argv": ["/bin/true", f"{host}-{seq}"],
                "path": f"/etc/{host}-{seq}",
            }
            events.append((host, event, subjects.message_id(subjects.token(host), "j1", seq)))
    return events


def publish_aside(url: str, events: list[tuple[str, dict[str, object], str]]) -> None:
    """:func:`publish` from a thread of its own: Playwright's loop holds this one."""
    with ThreadPoolExecutor(1) as aside:
        aside.submit(publish, url, events).result(timeout=60)


def redelivered(
    events: list[tuple[str, dict[str, object], str]], seq: int
) -> list[tuple[str, dict[str, object], str]]:
    """alpha's event ``seq`` again under another message id, as after a broker was killed:
    the stream holds it twice."""
    host, event, msg_id = next(e for e in events if e[0] == "alpha" and e[1]["seq"] == seq)
    return [(host, event, f"{msg_id}:again")]


@dataclass
class FleetUI:
    """A `kport ui --fleet URL` process."""

    port: int
    token: str
    proc: subprocess.Popen[str]
    #: what it logged, once stopped
    log: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/?token={self.token}"

    def stop(self) -> None:
        """Stop it: it must stop when asked, broker or not, and end quietly."""
        if self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            _, self.log = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.log = self.proc.communicate()
            raise AssertionError(f"kport ui --fleet did not stop when asked: {self.log}") from None
        assert "Traceback" not in self.log, self.log


@contextlib.contextmanager
def fleet_ui(nats_url: str, *args: str) -> Iterator[FleetUI]:
    token = secrets.token_urlsafe(16)
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "ui", "--fleet", nats_url, *args),
            *("--listen", f"127.0.0.1:{port}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KPORT_UI_TOKEN": token},
    )
    ui = FleetUI(port, token, proc)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"kport ui: {ui.url}", (line, proc.poll())
        yield ui
    finally:
        ui.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A nats-server that is not started yet."""
    found = Broker(tmp_path)
    try:
        yield found
    finally:
        found.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def opened(browser: Browser, ui: FleetUI) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(ui.url)
    expect(page.locator("body")).to_have_class("fleet", timeout=SLACK_S * 1000)
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors


def get(ui: FleetUI, path: str, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(ui.base + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def shown_keys(page: Page) -> list[list[Any]]:
    return list(page.evaluate("window.kport.state.rows.map(e => [e.host, e.seq])"))


def shown_hosts(page: Page) -> set[str]:
    return set(page.locator(".row:not(.head):not([hidden]) .c-host").all_inner_texts())


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"))


# --- in the browser --------------------------------------------------------------------


def test_the_log_shows_each_host_filters_to_one_and_a_redelivery_once(
    broker: Broker, browser: Browser
) -> None:
    broker.start()
    events = fleet_events(1, 2, 3)
    publish_aside(broker.url, events + redelivered(events, 1))
    with fleet_ui(broker.url) as ui, opened(browser, ui) as page:
        expect(page.locator("#conn")).to_contain_text("live: the fleet at", timeout=DEADLINE_MS)
        expect(page.locator("#log-count")).to_have_text("6 events", timeout=DEADLINE_MS)
        assert sorted(shown_keys(page)) == sorted([h, s] for h in HOSTS for s in (1, 2, 3))
        assert shown_hosts(page) == set(HOSTS)
        # what is this host's own is off, and the page says why
        for tab in ("#tab-tree", "#tab-prompts", "#tab-rules"):
            expect(page.locator(tab)).to_be_disabled()
        expect(page.locator("#fleet-note")).to_contain_text("each host's own")
        page.keyboard.press("3")
        expect(page.locator("#view-log")).to_be_visible()

        # live: the next seq of each host, alpha's delivered twice
        more = fleet_events(4)
        publish_aside(broker.url, more + redelivered(more, 4))
        expect(page.locator("#log-count")).to_have_text("8 events", timeout=DEADLINE_MS)
        keys = shown_keys(page)
        assert len(keys) == len({tuple(k) for k in keys}) == 8
        options = page.locator("#hosts-list option")
        expect(options).to_have_count(2)
        assert sorted(options.evaluate_all("os => os.map(o => o.value)")) == sorted(HOSTS)

        page.fill("#f-host", "alpha")
        expect(page.locator("#log-count")).to_have_text("4 of 8 events")
        assert shown_hosts(page) == {"alpha"}
        shot(page, "fleet")
        page.fill("#f-host", "beta*")  # a glob, as in the other filters
        wait_until(lambda: shown_hosts(page) == {"beta.example"}, SLACK_S, "beta alone")
        expect(page.locator("#log-count")).to_have_text("4 of 8 events")
        page.select_option("#f-source", "file")  # the other filters narrow it further
        expect(page.locator("#log-count")).to_have_text("1 of 8 events")
        page.fill("#f-host", "")
        page.select_option("#f-source", "")
        expect(page.locator("#log-count")).to_have_text("8 events")

        page.keyboard.press("5")
        expect(page.locator("#hosts tr")).to_have_count(2)
        expect(page.locator("#ports")).to_contain_text("connected")


def test_the_guard_holds_and_a_host_s_own_endpoints_say_why_not(broker: Broker) -> None:
    broker.start()
    with fleet_ui(broker.url, "--stream", "KPORT") as ui:
        bearer = f"Bearer {ui.token}"
        code, body = get(ui, "/api/status")
        assert code == 403 and b"a token is needed" in body
        code, body = get(ui, "/api/status", Authorization=bearer, Origin="http://evil.example")
        assert code == 403 and b"evil.example" in body
        code, body = get(ui, "/api/status", Authorization=bearer)
        assert code == 200
        status = json.loads(body)
        assert status["fleet"] == {"url": broker.url, "stream": "KPORT"}
        assert status["ring"]["limit"] == RING
        for path in ("/api/processes", "/api/rules/file", "/api/events"):
            code, body = get(ui, path, Authorization=bearer)
            assert code == 400 and NOT_HERE in json.loads(body)["detail"], (path, body)
        ws_url = f"ws://127.0.0.1:{ui.port}/api/live?token={ui.token}"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(ws_url, origin=Origin("http://evil.example"))
        assert refused.value.response.status_code == 403
        with websockets.sync.client.connect(ws_url, origin=Origin(ui.base)) as own:
            hello = json.loads(own.recv(timeout=10))
            assert hello["type"] == "hello" and hello["status"]["fleet"]["stream"] == "KPORT"
            assert hello["ring_first"] is None  # nothing is fetched from a journal


def test_a_broker_not_there_yet_is_one_line_and_the_log_fills_when_it_comes(
    broker: Broker, browser: Browser
) -> None:
    with fleet_ui(broker.url) as ui:
        with opened(browser, ui) as page:
            conn = page.locator("#conn")
            expect(conn).to_contain_text(
                f"fleet: cannot reach the fleet at {broker.url}", timeout=DEADLINE_MS
            )
            expect(conn).to_have_class("conn bad")
            broker.start()
            # there, but nothing exported yet: said, and tried again
            expect(conn).to_contain_text("no stream KPORT", timeout=DEADLINE_MS)
            events = fleet_events(1, 2, 3)
            publish_aside(broker.url, events)
            expect(page.locator("#log-count")).to_have_text("6 events", timeout=DEADLINE_MS)
            expect(conn).to_contain_text("live: the fleet at")

            # killed and started again: said, and what comes after shows, once
            broker.kill()
            expect(conn).to_have_class("conn bad", timeout=DEADLINE_MS)
            broker.start()
            more = fleet_events(4)
            publish_aside(broker.url, more + redelivered(more, 4))
            expect(page.locator("#log-count")).to_have_text("8 events", timeout=DEADLINE_MS)
            expect(conn).to_contain_text("live: the fleet at", timeout=DEADLINE_MS)
            keys = shown_keys(page)
            assert len(keys) == len({tuple(k) for k in keys}) == 8
    # while the broker was away at the start, the UI tried again and again: one line
    before = ui.log[: ui.log.index("following the fleet at")]
    assert before.count("cannot reach the fleet at") == 1, before
    assert before.count("no stream KPORT") == 1, before


def test_a_ui_whose_broker_never_comes_says_so_and_stops_when_asked(broker: Broker) -> None:
    with fleet_ui(broker.url) as ui:

        def fleet_state() -> dict[str, Any]:
            code, body = get(ui, "/api/status", Authorization=f"Bearer {ui.token}")
            assert code == 200, body
            return dict(json.loads(body)["ports"]["fleet"])

        wait_until(lambda: fleet_state()["state"] == "absent", 3 * SLACK_S, "absent")
        assert fleet_state()["error"].startswith(f"cannot reach the fleet at {broker.url}: ")
        ui.stop()  # within its deadline, and quietly
    assert ui.log.count("cannot reach the fleet at") == 1, ui.log


# --- the bounds ------------------------------------------------------------------------


def test_the_ring_and_a_slow_page_drop_the_oldest_and_count_them() -> None:
    """A page that falls behind is told how many it missed (the fleet's seqs are each
    host's, so a range of them names nothing); the ring lets the oldest go, counted."""
    bridge = FleetBridge("nats://127.0.0.1:1")
    page = bridge.new_page()
    page.limit = 3
    bridge.pages.add(page)
    for seq in range(1, RING + 6):
        bridge._arrived({"host": HOSTS[seq % 2], "seq": seq, "source": "proc", "kind": "exec"})
    assert len(bridge.ring) == RING and bridge.ring[0]["seq"] == 6
    assert bridge.status()["ring"] == {"events": RING, "limit": RING, "dropped": 5}
    (message,) = page.take()
    assert [e["seq"] for e in message["events"]] == [RING + 3, RING + 4, RING + 5]
    assert message["gaps"] == [] and message["dropped"] == RING + 2
    assert page.take() == []


def test_credentials_in_the_url_and_fleet_options_alone_are_refused() -> None:
    def ui(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kport.cli", "ui", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = ui("--fleet", "nats://user:secret@127.0.0.1:4222")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "kport ui: --fleet URL must not hold credentials (user:password@)"
    )
    alone = ui("--since", "10m")
    assert alone.returncode == 2
    assert alone.stderr.strip() == "kport ui: --stream, --since and --config are for --fleet URL"
