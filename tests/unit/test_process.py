"""Whether a lease's or a claim's process is gone: judged only where a pid means something."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from notifier import process
from notifier.claim import CLAIM, Claimant, Verdict, assess
from notifier.couch import CouchClient
from notifier.lease import Holder, Lease
from notifier.shard import Shard
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch

# Runs as pid 1 of a new pid namespace: starts short-lived processes until
# the next pid is the one asked for, then the holder, which prints who it is
# and lives until its stdin closes.
NAMESPACE_DRIVER = """
import subprocess, sys
target = int(sys.argv[1])
holder = "import json, sys; from notifier import process; " \\
    "print(json.dumps(process.identity()), flush=True); sys.stdin.read()"
while True:
    filler = subprocess.Popen(["true"])
    filler.wait()
    if filler.pid >= target - 1:
        break
proc = subprocess.Popen([sys.executable, "-c", holder], stdin=sys.stdin)
proc.wait()
"""


def free_pid() -> int:
    """The smallest pid above 1 that no process of this namespace has."""
    return next(n for n in range(2, 1 << 22) if not os.path.exists(f"/proc/{n}"))


@contextmanager
def holder_in_another_pid_namespace() -> Iterator[dict[str, Any]]:
    """A live process of this host, with this host name, in a pid namespace
    (and /proc) of its own, as in a container with host networking, whose
    pid there is one that no process has here."""
    target = free_pid()
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]
    proc = subprocess.Popen(
        [*command, NAMESPACE_DRIVER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the namespace holder printed nothing (exit {proc.poll()})"
        me = json.loads(line)
        assert me["pid"] == target, me
        yield {"host": socket.gethostname(), **me}
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_live_holder_in_another_pid_namespace_with_the_same_host_name_is_never_gone() -> None:
    with holder_in_another_pid_namespace() as theirs:
        # What a judgement by host name and pid would see: the same host, a
        # pid that no process has here.
        assert theirs["host"] == socket.gethostname()
        assert not os.path.exists(f"/proc/{theirs['pid']}")
        assert theirs["pid_scope"] != process.SCOPE
        assert process.is_gone(theirs, here=process.SCOPE) is False

        claim = {"worker": "1/2", "run": "theirs", "expires_at": time.time() + 600, **theirs}
        me = Claimant.this_process("0/1", 60.0)
        assert assess({CLAIM: claim}, me).verdict is Verdict.HELD

        async def standby() -> tuple[bool, Lease]:
            fake = FakeCouch(databases=["workersequences"])
            lease_doc = {
                "_id": "messages.worker-0-of-1.lease",
                "run_id": "theirs",
                "expires_at": time.time() + 600,
                **theirs,
            }
            fake.put("workersequences", lease_doc)
            async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch:
                lease = Lease(
                    couch,
                    database="workersequences",
                    source_database="messages",
                    shard=Shard(worker_id=0, worker_count=1),
                )
                stopping = asyncio.Event()
                asyncio.get_running_loop().call_later(0.5, stopping.set)
                return await lease.acquire(stopping), lease

        took, lease = asyncio.run(standby())
    assert took is False, "the lease of a live holder was taken"
    assert not lease.held
    assert lease.standing_by == f"{theirs['host']} pid {theirs['pid']}"


def test_in_its_own_scope_a_dead_or_reused_pid_is_gone_and_a_live_one_is_not() -> None:
    me = process.identity()
    assert me["pid_scope"] is not None and me["pid_start"] is not None
    assert process.is_gone(me, here=process.SCOPE) is False
    reused = {**me, "pid_start": me["pid_start"] + 1}
    assert process.is_gone(reused, here=process.SCOPE) is True
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    dead = {**me, "pid": free_pid(), "pid_start": None}
    assert process.is_gone(dead, here=process.SCOPE) is True


def test_a_record_that_does_not_say_where_its_pid_is_valid_is_never_judged() -> None:
    # Written by an older version: only host and pid. It waits for expiry.
    old = {"host": socket.gethostname(), "pid": free_pid()}
    assert process.is_gone(old, here=process.SCOPE) is False
    holder = Holder(run_id="r", host="h", pid=free_pid())
    assert process.is_gone(holder.fields(), here=process.SCOPE) is False


def test_the_boot_id_comes_from_the_unit_when_proc_sys_is_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hidden = process._read

    def without_proc_sys(path: str) -> str | None:
        return None if path.startswith("/proc/sys/") else hidden(path)

    monkeypatch.setattr(process, "_read", without_proc_sys)
    assert process.this_scope({}) is None, "no boot id: no scope, so nothing is judged"
    boot = "ff587d01c1c44c82887f00ffcc22970f"  # as systemd's %b writes it
    scope = process.this_scope({process.BOOT_ID_ENV: boot})
    assert scope is not None and scope.startswith(boot + "/pid:[")
    assert process.this_scope({process.BOOT_ID_ENV: "not-a-boot-id"}) is None
