"""Two layouts side by side: the newer-layout warning, ``prune-checkpoints``, and their CLI.

Against PouchDB Server and the in-process fake CouchDB, like the status
tests in test_ops.py (whose backends and layout fixtures are reused here).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from realservers import CouchTestDB, couch_settings, unique_db_name
from scenario import NOTIFIER, message
from test_ops import Backend, backend_for, four_layouts, put_checkpoint

from notifier import config as config_module
from notifier import layout
from notifier.checkpoint import checkpoint_id
from notifier.prune import prune_checkpoints
from notifier.shard import Shard
from notifier.testing import free_port
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import wait_for, worker_running

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture(params=["pouchdb", "fake"])
def store(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with backend_for(request.param, request) as b:
        yield b


def layout_log(caplog: pytest.LogCaptureFixture, level: int, start: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "notifier.layout" and r.levelno == level and r.getMessage().startswith(start)
    ]


# -- the newer-layout warning -------------------------------------------------------


async def test_only_the_older_layout_warns_while_a_newer_one_runs(
    store: Backend,
    smtp_sink: SmtpSink,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(layout, "CHECK_INTERVAL", 0.05)
    caplog.set_level(logging.DEBUG, logger="notifier.layout")
    config = store.config(smtp_sink)
    async with store.client() as couch:
        for n in range(3):
            await couch.put_doc(store.database, message(n))

    def checks(worker: str) -> int:
        return len(layout_log(caplog, logging.DEBUG, f"worker {worker}: layout check "))

    async with worker_running(config, worker_count=1, transport=store.transport):
        await wait_for(lambda: checks("0/1") >= 1, timeout=10)
        async with worker_running(config, worker_count=2, transport=store.transport):
            await wait_for(
                lambda: bool(layout_log(caplog, logging.WARNING, "worker 0/1: a newer layout")),
                timeout=10,
            )
            # The newer worker has looked several times since both leases were live.
            seen = checks("0/2")
            await wait_for(lambda: checks("0/2") >= seen + 3, timeout=10)
            assert layout_log(caplog, logging.WARNING, "worker 0/2") == []
        # The newer worker stopped cleanly: its released lease no longer runs.
        await wait_for(
            lambda: bool(layout_log(caplog, logging.INFO, "worker 0/1: the newer layout")),
            timeout=10,
        )
    (warning,) = layout_log(caplog, logging.WARNING, "worker 0/1")
    assert warning.startswith("worker 0/1: a newer layout is running (2 workers, since ")
    assert "this worker's layout is 1 worker. If you are resharding, stop this worker" in warning
    assert layout_log(caplog, logging.INFO, "worker 0/1: the newer layout") == [
        "worker 0/1: the newer layout (2 workers) is no longer running; this worker's layout "
        "(1 worker) is the newest running one"
    ]
    assert len(smtp_sink.messages) == 3


async def test_a_failing_layout_check_does_not_stop_the_worker(
    smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "CHECK_INTERVAL", 0.05)
    caplog.set_level(logging.DEBUG, logger="notifier.layout")
    fake = FakeCouch(databases=["messages"])
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake)
    config = backend.config(smtp_sink)
    fake.fail_requests(status=503, path=f"{config.couch.checkpoint_database}/_all_docs")
    async with worker_running(config, transport=backend.transport) as worker:
        await wait_for(
            lambda: len(layout_log(caplog, logging.DEBUG, "worker 0/1: layout check failed")) >= 3,
            timeout=10,
        )
        for n in range(3):
            fake.put("messages", message(n))
        await wait_for(lambda: len(smtp_sink.messages) == 3, timeout=10)
        assert not worker.stopping
    (warning,) = layout_log(caplog, logging.WARNING, "worker 0/1")
    assert warning.startswith("worker 0/1: could not check for a newer layout")
    assert "503" in warning


# -- prune-checkpoints ----------------------------------------------------------------


async def slot_ids(store: Backend, checkpoint_database: str) -> list[str]:
    async with store.client() as couch:
        listing = await couch.request("GET", f"/{checkpoint_database}/_all_docs")
    return sorted(row["id"] for row in listing["rows"])


async def test_prune_deletes_only_retired_layouts_and_a_dry_run_deletes_nothing(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    ckdb, db = config.couch.checkpoint_database, store.database
    now = time.time()
    await four_layouts(store, config, now)
    before = await slot_ids(store, ckdb)
    retired = [f"{db}.worker-0-of-1.lease", f"{db}.worker-0-of-1"]

    dry = await prune_checkpoints(config, dry_run=True, now=now, transport=store.transport)
    assert await slot_ids(store, ckdb) == before
    assert [p.action for p in dry.layouts] == ["would delete", "kept", "kept", "kept"]
    assert dry.would_delete == retired and dry.deleted == []
    assert "would delete 2 documents of 1 retired layout (1 worker); nothing was deleted" in (
        dry.render()
    )

    done = await prune_checkpoints(config, now=now, transport=store.transport)
    assert [p.action for p in done.layouts] == ["deleted", "kept", "kept", "kept"]
    assert done.deleted == retired
    assert await slot_ids(store, ckdb) == sorted(set(before) - set(retired))
    text = done.render()
    assert (
        f"layout: 1 worker ({db}.worker-N-of-1): deleted, retired: last ran " in text
        and "(10d00h ago)\n" in text
    )
    assert (
        f"layout: 2 workers ({db}.worker-N-of-2): kept, running on host-b0, host-b1: a layout "
        "with a live lease is never pruned\n" in text
    )
    assert f"layout: 3 workers ({db}.worker-N-of-3): kept, the current layout, running" in text
    assert (
        f"layout: 4 workers ({db}.worker-N-of-4): kept, not retired: last ran " in text
        and "(1h00m ago); a layout is retired after 7d00h without a run" in text
    )
    assert "deleted 2 documents of 1 retired layout (1 worker)\n" in text
    assert "starts from the beginning of the feed" in text

    again = await prune_checkpoints(config, now=now, transport=store.transport)
    assert again.deleted == [] and "nothing to prune: no layout is retired" in again.render()

    # However short retire_after is, a layout with a live lease stays.
    eager = await prune_checkpoints(config, now=now, retire_after=0.0, transport=store.transport)
    assert [(p.worker_count, p.action) for p in eager.layouts] == [
        (2, "kept"),
        (3, "kept"),
        (4, "deleted"),
    ]
    left = await slot_ids(store, ckdb)
    assert left and all("-of-2" in i or "-of-3" in i for i in left)
    data = eager.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["deleted"] == [f"{db}.worker-0-of-4.lease", f"{db}.worker-0-of-4"]
    assert data["layouts"][2]["action"] == "deleted" and data["dry_run"] is False


async def test_prune_keeps_a_layout_whose_lease_changes_while_it_runs(smtp_sink: SmtpSink) -> None:
    fake = FakeCouch(databases=["messages"])
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake, reports_pending=True)
    config = backend.config(smtp_sink)
    now = time.time()
    await four_layouts(backend, config, now)
    # A worker of the retired layout takes its lease between the read and the delete.
    fake.fail_requests(status=409, path=r"worker-0-of-1\.lease", method="DELETE")

    report = await prune_checkpoints(config, now=now, transport=backend.transport)

    (one, *_) = report.layouts
    assert one.action == "kept" and one.deleted == ()
    assert one.reason.startswith("messages.worker-0-of-1.lease changed while pruning")
    assert fake.get(config.couch.checkpoint_database, "messages.worker-0-of-1") is not None
    assert "nothing to prune" in report.render()


async def test_prune_without_a_checkpoint_database_has_nothing_to_do(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    report = await prune_checkpoints(config, transport=store.transport)
    assert not report.checkpoint_database_exists and report.layouts == ()
    assert "nothing to prune: the checkpoint database" in report.render()
    assert report.to_json()["deleted"] == []


# -- the installed command --------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NOTIFIER, *args], capture_output=True, text=True, timeout=60)


async def test_status_and_prune_checkpoints_commands_exit_as_documented(
    couch: CouchTestDB, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    backend = Backend("pouchdb", couch.url, couch.name)
    path = tmp_path / "notifier.toml"
    ckdb = unique_db_name("checkpoints")

    def write(retire_after: float) -> str:
        path.write_text(
            "[couch]\n"
            + "".join(f"{key} = {value!r}\n" for key, value in couch_settings(couch.url).items())
            + f"database = {couch.name!r}\n"
            f"checkpoint_database = {ckdb!r}\nrequest_timeout = 2.0\n"
            f"[smtp]\nhost = {smtp_sink.host!r}\nport = {smtp_sink.port}\n"
            "[email]\nsender = 'notify@example.com'\n"
            f"[worker]\nretire_after = {retire_after}\n"
        )
        return str(path)

    cfg = write(604_800.0)
    config = config_module.load(cfg)
    now = time.time()
    await four_layouts(backend, config, now)
    stale = Shard(worker_id=0, worker_count=3)
    try:
        # Layout 4 stopped an hour ago, behind, but layouts 2 and 3 ran since:
        # replaced, so not stale.
        replaced = run("status", "--config", cfg)
        assert replaced.returncode == 0, replaced.stdout
        assert "another layout has run since, so it is not stale" in replaced.stdout
        # A worker of the current layout, down for an hour and behind, is.
        async with backend.client() as client:
            await put_checkpoint(client, config, stale, 0, now - 3600)
            assert run("status", "--config", cfg).returncode == 1
            doc = await client.get_doc(ckdb, checkpoint_id(couch.name, stale))
            assert doc is not None
            await client.delete_doc(ckdb, doc["_id"], doc["_rev"])
        dry = run("prune-checkpoints", "--config", cfg, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["would_delete"] == [
            f"{couch.name}.worker-0-of-1.lease",
            f"{couch.name}.worker-0-of-1",
        ]
        cfg = write(600.0)
        status = run("status", "--config", cfg, "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["retired_layouts"] == [1, 4]
        pruned = run("prune-checkpoints", "--config", cfg)
        assert pruned.returncode == 0, pruned.stderr
        assert "deleted 4 documents of 2 retired layouts (1 worker, 4 workers)" in pruned.stdout
        nothing = run("prune-checkpoints", "--config", cfg)
        assert nothing.returncode == 0 and "nothing to prune" in nothing.stdout
    finally:
        async with backend.client() as client:
            await client.request("DELETE", f"/{ckdb}")

    unreachable = tmp_path / "down.toml"
    unreachable.write_text(
        path.read_text().replace(
            couch_settings(couch.url)["url"], f"http://127.0.0.1:{free_port()}"
        )
    )
    down = run("prune-checkpoints", "--config", str(unreachable))
    assert down.returncode == 69, down.stdout + down.stderr
    assert run("prune-checkpoints", "--config", str(tmp_path / "missing.toml")).returncode == 78

    top = run("--help")
    assert "prune-checkpoints" in top.stdout
    help_text = run("prune-checkpoints", "--help").stdout
    assert "--dry-run" in help_text and "beginning of the" in help_text
