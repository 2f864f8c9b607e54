"""The web UI end to end: the real daemon, the real `kport ui` process (given up to the
user nobody), HTTP and WebSocket from outside, and Debian's chromium through Playwright."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets.exceptions
import websockets.sync.client
from playwright.sync_api import Browser, Page, expect, sync_playwright

import kport
from bench.common import free_port
from bench.ui import BROWSER_ARGS, CHROMIUM, wait_until
from tests.conftest import SLACK_S, mount_tmpfs

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test does)"
)


@dataclass
class Stack:
    rundir: Path
    mount: Path
    port: int
    token: str
    daemon: subprocess.Popen[str]
    ui: subprocess.Popen[str] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/?token={self.token}"

    def start_ui(self) -> None:
        env = {**os.environ, "KPORT_UI_TOKEN": self.token}
        self.ui = subprocess.Popen(
            [
                *(sys.executable, "-m", "kport.cli", "ui", "--runtime-dir", str(self.rundir)),
                *("--listen", f"127.0.0.1:{self.port}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.ui.stdout is not None
        line = self.ui.stdout.readline()
        assert line.strip() == f"kport ui: {self.url}", (line, self.ui.stderr.read())
        wait_until(lambda: status_of(self)["ports"]["proc"]["state"] == "connected", what="proc")

    def stop_ui(self) -> None:
        if self.ui is not None and self.ui.poll() is None:
            self.ui.terminate()
            _, err = self.ui.communicate(timeout=20)
            assert "Traceback" not in err, err


def get(stack: Stack, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(stack.base + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def status_of(stack: Stack) -> dict[str, Any]:
    code, body, _ = get(stack, "/api/status", Authorization=f"Bearer {stack.token}")
    assert code == 200, body
    return dict(json.loads(body))


@pytest.fixture
def stack(rundir: Path, tmp_path: Path) -> Iterator[Stack]:
    with mount_tmpfs(tmp_path / "watched") as mount:
        (mount / "data.txt").write_text("data\n")
        daemon = subprocess.Popen(
            [
                *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
                *("--state-dir", str(rundir / "state"), "--watch", str(mount)),
                *("--decision-deadline", "20", "--default-verdict", "allow"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        stack = Stack(rundir, mount, free_port(), secrets.token_urlsafe(16), daemon)
        try:
            wait_until(lambda: (rundir / "file-decide.sock").exists() or daemon.poll() is not None)
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            stack.start_ui()
            yield stack
        finally:
            try:
                stack.stop_ui()
            finally:
                daemon.terminate()
                try:
                    daemon.communicate(timeout=20)
                except subprocess.TimeoutExpired:  # never left behind: it loads the rest
                    daemon.kill()
                    daemon.communicate()
                    raise


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def opened(browser: Browser, stack: Stack, width: int = 1280) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": width, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(stack.url)
    expect(page.locator("#conn")).to_contain_text("live", timeout=10_000)
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"))


# --- who may talk to it ----------------------------------------------------------------


def test_no_token_a_wrong_one_or_a_foreign_host_is_403(stack: Stack) -> None:
    code, body, _ = get(stack, "/")
    assert code == 403 and b"a token is needed" in body
    assert get(stack, "/api/status")[0] == 403
    assert get(stack, "/?token=wrong")[0] == 403
    code, body, _ = get(stack, f"/api/status?token={stack.token}", Host="rebound.example:80")
    assert code == 403 and b"unknown Host" in body


def test_a_foreign_origin_is_refused_for_requests_and_websockets(stack: Stack) -> None:
    bearer = f"Bearer {stack.token}"
    code, body, _ = get(stack, "/api/status", Authorization=bearer, Origin="http://evil.example")
    assert code == 403 and b"evil.example" in body
    ws_url = f"ws://127.0.0.1:{stack.port}/api/live?token={stack.token}"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(ws_url, origin="http://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    own = websockets.sync.client.connect(ws_url, origin=stack.base)  # type: ignore[arg-type]
    with own:
        hello = json.loads(own.recv(timeout=10))
        assert hello["type"] == "hello" and hello["status"]["ports"]["proc"]["state"] == "connected"


def test_headers_the_token_cookie_and_the_openapi_document(stack: Stack) -> None:
    code, _, headers = get(stack, "/api/status", Authorization=f"Bearer {stack.token}")
    assert code == 200
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(stack.url, timeout=10)
    redirect.value.close()
    assert redirect.value.code == 303 and redirect.value.headers["location"] == "/"
    cookie = redirect.value.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and stack.token in cookie
    code, body, _ = get(stack, "/api/openapi.json", Authorization=f"Bearer {stack.token}")
    paths = json.loads(body)["paths"]
    assert {"/api/events", "/api/rules/{domain}", "/api/prompts/{prompt_id}"} <= set(paths)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def test_the_ui_runs_as_nobody(stack: Stack) -> None:
    assert stack.ui is not None
    status = Path(f"/proc/{stack.ui.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["65534"] * 4


def test_the_process_tree_comes_from_the_daemon(stack: Stack) -> None:
    """The UI (the user nobody) reads nothing of the machine itself: the tree is the
    daemon's, so even root's processes come with their executable."""
    code, body, _ = get(stack, "/api/processes", Authorization=f"Bearer {stack.token}")
    assert code == 200, body
    tree = {entry["pid"]: entry for entry in json.loads(body)}
    daemon = tree[stack.daemon.pid]
    assert set(daemon) == {"pid", "ppid", "start_time", "comm", "argv", "exe", "uid", "user"}
    assert daemon["ppid"] == os.getpid() and daemon["uid"] == 0 and daemon["user"] == "root"
    assert daemon["exe"] == os.path.realpath(sys.executable)  # nobody may not read that link
    assert daemon["argv"][:4] == [sys.executable, "-m", "kport.cli", "serve"]
    assert status_of(stack)["ports"]["journal"]["state"] == "connected"


# --- in the browser --------------------------------------------------------------------


def test_a_new_process_appears_in_the_log(stack: Stack, browser: Browser) -> None:
    """(How soon is measured by `kport bench ui`.)"""
    with opened(browser, stack) as page:
        marker = f"ui-marker-{secrets.token_hex(4)}"
        subprocess.run(["/bin/sh", "-c", "sleep 0.1; true", marker], check=True)
        row = page.locator(".row", has_text=marker).first
        expect(row).to_be_visible(timeout=SLACK_S * 1000)
        page.fill("#f-text", marker)  # rows are reused as the log moves: pin it first
        expect(page.locator("#log-count")).to_contain_text(" of ")
        page.fill("#f-kind", "exec")
        expect(page.locator("#log-count")).to_contain_text("1 of ")
        page.locator(".row:not(.head):not([hidden])", has_text=marker).first.click()
        expect(page.locator("#detail")).to_be_visible()
        expect(page.locator("#detail-json")).to_contain_text(marker)
        expect(page.locator("#detail-ancestry li").first).to_contain_text("/bin/sh")
        page.fill("#f-kind", "")
        page.fill("#f-text", "")
        shot(page, "log")
        page.keyboard.press("Escape")
        expect(page.locator("#detail")).to_be_hidden()


def test_a_process_that_lives_a_millisecond_appears_with_its_argv(
    stack: Stack, browser: Browser
) -> None:
    """(How soon is measured by `kport bench ui`.)"""
    with opened(browser, stack) as page:
        marker = f"ui-instant-{secrets.token_hex(4)}"
        subprocess.run(["/bin/true", marker], check=True)  # gone at once
        row = page.locator(".row", has_text=f"/bin/true {marker}").first
        expect(row).to_be_visible(timeout=SLACK_S * 1000)
        assert "(gone)" not in row.inner_text()


def cat_in_background(path: Path) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        done = subprocess.run(
            ["cat", str(path)], check=False, capture_output=True, text=True, timeout=60
        )
        result["code"], result["err"] = done.returncode, done.stderr

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_answering_a_file_prompt_allows_or_denies_the_opener(
    stack: Stack, browser: Browser
) -> None:
    with opened(browser, stack) as page:
        page.keyboard.press("3")  # the prompts view, from the keyboard
        expect(page.locator("#view-prompts")).to_be_visible()
        for verdict, expected in (("Deny", 1), ("Allow", 0)):
            thread, result = cat_in_background(stack.mount / "data.txt")
            card = page.locator("#prompts .prompt").first
            expect(card).to_contain_text(str(stack.mount / "data.txt"), timeout=10_000)
            expect(card.locator(".countdown")).to_contain_text("s left")
            expect(page.locator("#prompt-count")).to_have_text("1")
            if verdict == "Deny":
                shot(page, "prompts")
            card.get_by_role("button", name=verdict).click()
            thread.join(timeout=10)
            assert result["code"] == expected, result
            if verdict == "Deny":
                assert "Operation not permitted" in result["err"]  # EPERM from fanotify
            expect(page.locator("#settled .prompt").first).to_contain_text(
                f"answered: {verdict.lower()}"
            )
        # From the keyboard: focus the card and press d.
        thread, result = cat_in_background(stack.mount / "data.txt")
        card = page.locator("#prompts .prompt").first
        card.get_by_role("button", name="Allow").focus()
        page.keyboard.press("d")
        thread.join(timeout=10)
        assert result["code"] == 1


def test_a_verdicts_detail_says_which_rule_gave_it_and_what_it_matched(
    stack: Stack, browser: Browser
) -> None:
    path = str(stack.mount / "data.txt")
    with kport.connect("file-decide", runtime_dir=stack.rundir) as conn:  # as an editor would
        listing = conn.send({"op": "rules"})
        rule = {"action": "deny", "name": "no data here", "path": path}
        conn.send({"op": "save", "rules": [rule], "version": listing["editable"]["version"]})
    with opened(browser, stack) as page:
        assert subprocess.run(["cat", path], check=False, capture_output=True).returncode == 1
        # rows are reused as the log moves: pin the one verdict first (the cat's exec names
        # the path too)
        page.fill("#f-text", path)
        page.fill("#f-kind", "open_perm")
        expect(page.locator("#log-count")).to_contain_text("1 of ", timeout=SLACK_S * 1000)
        page.locator(".row:not(.head):not([hidden])", has_text="DENY").first.click()
        why = page.locator("#detail-why")
        expect(why).to_be_visible()
        expect(why).to_contain_text("decided: DENY by rule 'no data here' (")
        expect(why).to_contain_text(f'path = "{path}"')


def test_rules_are_added_reordered_and_deleted_and_apply_at_once(
    stack: Stack, browser: Browser
) -> None:
    path = str(stack.mount / "data.txt")
    with opened(browser, stack) as page:
        page.click("#tab-rules")
        expect(page.locator("#rules-own")).to_contain_text("none yet")
        for name, action in (("allow data", "allow"), ("deny data", "deny")):
            page.click("#rules-add")
            page.fill("#rule-name", name)
            page.select_option("#rule-action", action)
            page.fill("#rule-path", path)
            page.click("#rule-form button[type=submit]")
            expect(page.locator("#rules-own tr").first).to_contain_text(name)
        assert (
            subprocess.run(["cat", path], check=False, capture_output=True, timeout=10).returncode
            == 1
        )
        page.get_by_role("button", name="move down rule 1").click()
        expect(page.locator("#rules-own tr").first).to_contain_text("allow data")
        assert (
            subprocess.run(["cat", path], check=False, capture_output=True, timeout=10).returncode
            == 0
        )
        page.click("#rules-add")
        page.fill("#rule-name", "broken")
        page.fill("#rule-users", "no-such-user-anywhere")
        page.click("#rule-form button[type=submit]")
        expect(page.locator("#rules-error")).to_contain_text("rule 1: ")
        page.click("#rule-cancel")
        shot(page, "rules")
        page.get_by_role("button", name="delete rule 1").click()
        expect(page.locator("#rules-own tr")).to_have_count(1)
        remembered = (stack.rundir / "state" / "file-remembered.toml").read_text()
        assert "deny data" in remembered and "allow data" not in remembered


def test_the_tree_and_stats_views_and_a_narrow_window(stack: Stack, browser: Browser) -> None:
    with opened(browser, stack) as page:
        page.keyboard.press("2")
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            node = page.locator(".tree [data-key]", has_text=f"{sleeper.pid}")
            expect(node.first).to_be_visible(timeout=5000)
            shot(page, "tree")
            sleeper.kill()
            sleeper.wait()
            expect(page.locator(".tree li.exited", has_text=str(sleeper.pid))).to_have_count(
                1, timeout=5000
            )
        finally:
            if sleeper.poll() is None:
                sleeper.kill()
                sleeper.wait()
        page.keyboard.press("5")
        expect(page.locator("#ports")).to_contain_text("connected")
        wait_until(lambda: page.evaluate("window.kport.state.rates.length") >= 2, 5, "rates")
        shot(page, "stats")
    with opened(browser, stack, width=420) as page:
        expect(page.locator("#tab-prompts")).to_be_visible()
        shot(page, "narrow")


def test_the_log_has_no_gap_across_a_restart_of_the_ui(stack: Stack, browser: Browser) -> None:
    with opened(browser, stack) as page:
        stack.stop_ui()
        expect(page.locator("#conn")).to_contain_text("unreachable", timeout=10_000)
        markers = [f"while-away-{secrets.token_hex(3)}-{i}" for i in range(5)]
        for marker in markers:
            subprocess.run(["/bin/sh", "-c", "sleep 0.1; true", marker], check=True)
        stack.start_ui()
        shown = "window.kport.state.rows.map(e => JSON.stringify(e.argv))"

        def all_shown() -> bool:
            argvs = page.evaluate(shown)
            return all(any(argv and marker in argv for argv in argvs) for marker in markers)

        wait_until(all_shown, 15, "the events of the time away")
        seqs = page.evaluate("window.kport.state.rows.map(e => e.seq).filter(s => s != null)")
        assert len(seqs) == len(set(seqs)), "an event is shown twice"
