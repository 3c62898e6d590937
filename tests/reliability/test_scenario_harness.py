"""The scenario harness can fail: its checks catch what they exist to catch.

The reliability scenarios pass when nothing goes wrong, so these tests show,
on purpose-built bad inputs, that the checkpoint audit, the log counting and
the ``scenario_record`` fixture would notice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import (
    CHECKPOINTS,
    DB,
    ONE_WORKER,
    CheckpointWatch,
    NotifierProcess,
    seed_messages,
)

from notifier.checkpoint import checkpoint_id
from notifier.testing.fake_couch import FakeCouch
from notifier.worker import NOTIFIED

TESTS_DIR = Path(__file__).resolve().parents[1]


def test_the_checkpoint_watch_catches_a_checkpoint_past_unsettled_work_or_moving_back() -> None:
    fake = FakeCouch(databases=[DB, CHECKPOINTS])
    seeded = seed_messages(fake, 3, markers=True)
    watch = CheckpointWatch(fake)
    watch.track(seeded)
    doc_id = checkpoint_id(DB, ONE_WORKER)

    def checkpoint(at: str) -> None:
        current = fake.get(CHECKPOINTS, doc_id) or {}
        fake.put(CHECKPOINTS, {**current, "_id": doc_id, "since": seeded.seqs[at]})
        watch.sample()

    first = fake.get(DB, "msg-00000")
    assert first is not None
    fake.put(DB, {**first, NOTIFIED: True})
    checkpoint("msg-00000")
    assert watch.violations == []
    checkpoint("msg-00001")  # msg-00001 was never sent
    assert watch.violations == [
        f"checkpoint {seeded.seqs['msg-00001']!r} passed unsettled msg-00001"
    ]
    assert watch.backwards == []
    checkpoint("msg-00000")
    assert [(a.since, b.since) for a, b in watch.backwards] == [
        (seeded.seqs["msg-00001"], seeded.seqs["msg-00000"])
    ]


def test_warnings_are_counted_by_kind_whatever_their_details(tmp_path: Path) -> None:
    log = tmp_path / "notifier.log"
    log.write_text(
        "2026-01-01 10:00:00,001 INFO    notifier.feed: changes feed is back after 1.0s\n"
        "2026-01-01 10:00:00,002 WARNING notifier.feed: changes feed interrupted: "
        "ReadTimeout; reconnecting\n"
        "2026-01-01 10:00:01,003 WARNING notifier.worker: worker 0/1: checkpoint not "
        "written, will try again: 503\n"
        "2026-01-01 10:00:02,004 WARNING notifier.worker: worker 0/1: checkpoint not "
        "written, will try again: ConnectError\n"
        "2026-01-01 10:00:03,005 ERROR   notifier.worker: message msg-1 was delivered but "
        "cannot be marked\n"
    )
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    process = NotifierProcess(done, log, ["notifier"])
    assert process.warnings() == {
        "notifier.feed: changes feed interrupted": 1,
        "notifier.worker: checkpoint not written, will try again": 2,
        "notifier.worker: message msg-# was delivered but cannot be marked": 1,
    }


def test_scenario_record_is_saved_only_for_a_passing_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The suite's own conftest, in a separate pytest session, so that a
    # failing inner test is not this session's failure.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    pytester.makeconftest((TESTS_DIR / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_inner="""
        def test_passes(scenario_record):
            scenario_record.scenario = "passes"
            scenario_record.messages = 3
            scenario_record.duplicates_bound = 2

        def test_fails(scenario_record):
            scenario_record.scenario = "fails"
            assert False
        """
    )
    report = tmp_path / "records.jsonl"
    monkeypatch.setenv("NOTIFIER_SCENARIO_REPORT", str(report))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    records = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {
            "scenario": "passes",
            "messages": 3,
            "faults": "",
            "lost": 0,
            "duplicates_bound": 2,
            "duplicates_seen": 0,
            "recovery_seconds": None,
            "notes": "",
        }
    ]
