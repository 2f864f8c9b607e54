"""Named objects across real processes: create, open, the errors that name what is wrong,
security, and lifetime by references."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import kport
from kport import objects
from tests.conftest import run_as_nobody, spawn_client

T = TypeVar("T")
pytestmark = pytest.mark.timeout(120)


def with_namespace(rundir: Path, body: Callable[[objects.Namespace], Awaitable[T]]) -> T:
    """Serve a namespace on port "ns" (open to root and nobody) while ``body`` runs."""

    async def main() -> T:
        security = kport.Security(uids=["root", "nobody"])
        async with objects.Namespace("ns", security=security, runtime_dir=rundir) as ns:
            return await body(ns)

    return asyncio.run(main())


def named(rundir: Path) -> dict[str, Any]:
    return {"namespace": "ns", "runtime_dir": rundir}


async def child(code: str, *args: str) -> str:
    proc = spawn_client(code, *args)
    out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err
    return str(out).strip()


def test_create_in_one_process_open_and_wait_in_another(rundir: Path) -> None:
    async def body(ns: objects.Namespace) -> None:
        ev = await asyncio.to_thread(
            kport.Event.create_named, "app/ready", manual_reset=True, **named(rundir)
        )
        waiter = spawn_client(
            """
            import sys, kport
            ev = kport.Event.open_named("app/ready", namespace="ns", runtime_dir=sys.argv[1])
            print("opened", flush=True)
            print(ev.wait(timeout=10), ev.manual_reset)
            ev.close()
            """,
            str(rundir),
        )
        assert waiter.stdout is not None
        assert (await asyncio.to_thread(waiter.stdout.readline)).strip() == "opened"
        ev.set()
        out, err = await asyncio.to_thread(waiter.communicate, timeout=30)
        assert out.strip() == "True True", err
        assert ns.list()[0]["name"] == "app/ready" and ns.list()[0]["set"]
        await asyncio.to_thread(ev.close)

    with_namespace(rundir, body)


def test_naming_errors_say_what_is_wrong(rundir: Path) -> None:
    async def body(ns: objects.Namespace) -> None:
        ev = await asyncio.to_thread(kport.Event.create_named, "taken", **named(rundir))
        with pytest.raises(kport.NameCollision, match="'taken' exists already"):
            await asyncio.to_thread(kport.Event.create_named, "taken", **named(rundir))
        # The seed-002 reader's typo: a clear error, never a "success".
        with pytest.raises(kport.NameNotFound, match="no object named 'Taken'"):
            await asyncio.to_thread(kport.Event.open_named, "Taken", **named(rundir))
        with pytest.raises(kport.ObjectTypeMismatch, match="auto-reset"):
            await asyncio.to_thread(
                kport.Event.open_or_create, "taken", manual_reset=True, **named(rundir)
            )
        same = await asyncio.to_thread(kport.Event.open_or_create, "taken", **named(rundir))
        ev.set()
        assert same.wait(timeout=5)  # one object, two references
        for event in (ev, same):
            await asyncio.to_thread(event.close)
        with pytest.raises(kport.PortNotFound):
            kport.Event.open_named("x", namespace="no-such-namespace", runtime_dir=rundir)

    with_namespace(rundir, body)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "1 to 255 characters"),
        ("x" * 256, "1 to 255 characters"),
        ("a b", "only letters, digits"),
        ("/lead", "no leading, trailing or double '/'"),
        ("a//b", "no leading, trailing or double '/'"),
        ("a/../b", "'.' or '..'"),
    ],
)
def test_bad_names_name_the_rule(name: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        kport.Event.create_named(name, namespace="never-reached")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_object_security_decides_who_may_open(rundir: Path) -> None:
    def open_as_nobody(name: str) -> str:
        def action() -> str:
            ev = kport.Event.open_named(name, namespace="ns", runtime_dir=rundir)
            ev.close()
            return "opened"

        return run_as_nobody(action)

    async def body(ns: objects.Namespace) -> None:
        mine = await asyncio.to_thread(kport.Event.create_named, "mine", **named(rundir))
        shared = await asyncio.to_thread(
            kport.Event.create_named,
            "shared",
            security=kport.Security(uids=["nobody"]),
            **named(rundir),
        )
        denied = await asyncio.to_thread(open_as_nobody, "mine")
        assert denied.startswith("AccessDenied") and "does not admit uid" in denied
        assert await asyncio.to_thread(open_as_nobody, "shared") == "opened"
        assert (await asyncio.to_thread(open_as_nobody, "nothing")).startswith("NameNotFound")
        for event in (mine, shared):
            await asyncio.to_thread(event.close)

    with_namespace(rundir, body)


def test_an_object_lives_while_referenced_or_until_removed(rundir: Path) -> None:
    async def body(ns: objects.Namespace) -> None:
        a = await asyncio.to_thread(kport.Event.create_named, "brief", **named(rundir))
        # Another process opens it and exits without closing: its connection goes,
        # and its reference with it.
        out = await child(
            """
            import sys, kport
            kport.Event.open_named("brief", namespace="ns", runtime_dir=sys.argv[1])
            print("held")
            """,
            str(rundir),
        )
        assert out == "held"
        for _ in range(200):
            if ns.list()[0]["references"] == 1:
                break
            await asyncio.sleep(0.01)
        assert ns.list()[0]["references"] == 1
        await asyncio.to_thread(a.close)
        assert not ns.entries  # the last reference went: so did the name
        with pytest.raises(kport.NameNotFound):
            await asyncio.to_thread(kport.Event.open_named, "brief", **named(rundir))

        p = await asyncio.to_thread(
            kport.Event.create_named, "kept", permanent=True, **named(rundir)
        )
        await asyncio.to_thread(p.close)
        again = await asyncio.to_thread(kport.Event.open_named, "kept", **named(rundir))
        await asyncio.to_thread(objects.remove_named, "kept", **named(rundir))
        assert not ns.entries
        again.set()  # a reference opened before the removal still works
        assert again.wait(0)
        await asyncio.to_thread(again.close)

    with_namespace(rundir, body)


def test_references_follow_the_object_not_the_name(rundir: Path) -> None:
    async def body(ns: objects.Namespace) -> None:
        old = await asyncio.to_thread(
            kport.Event.create_named, "n", permanent=True, **named(rundir)
        )
        await asyncio.to_thread(objects.remove_named, "n", **named(rundir))
        new = await asyncio.to_thread(kport.Event.create_named, "n", **named(rundir))
        await asyncio.to_thread(old.close)  # the removed one: the new "n" keeps its holder
        assert ns.list()[0]["references"] == 1
        # A forked child closing its copy gives back nothing of its parent's.
        pid = os.fork()
        if pid == 0:
            new.close()
            os._exit(0)
        os.waitpid(pid, 0)
        assert ns.list()[0]["references"] == 1
        await asyncio.to_thread(new.close)
        assert not ns.entries

    with_namespace(rundir, body)


def test_a_restarted_namespace_is_reached_again(rundir: Path) -> None:
    async def serve_once() -> None:
        security = kport.Security(uids=["root"])
        async with objects.Namespace("ns", security=security, runtime_dir=rundir):
            ev = await asyncio.to_thread(kport.Event.create_named, "r", **named(rundir))
            await asyncio.to_thread(ev.close)

    asyncio.run(serve_once())
    asyncio.run(serve_once())  # the process's cached connection died with the first
