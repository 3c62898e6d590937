"""From configuration to one worker's settings: every knob reaches the worker, and
rates are split over the worker set."""

from __future__ import annotations

import pytest

from notifier import config
from notifier.pacing import recipient_domain
from notifier.runner import settings_from_config
from notifier.shard import Shard


def test_every_delivery_key_reaches_the_worker_and_rates_are_shared() -> None:
    loaded = config.from_mapping(
        {
            "email": {"sender": "n@example.com"},
            "couch": {"database": "mail", "heartbeat": 7.0},
            "smtp": {
                "max_rate": 30.0,
                "domains": {
                    "Example.NET": {"max_parallel": 2, "max_rate": 3.0},
                    "bücher.example": {"max_parallel": 1},
                },
            },
            "worker": {"max_parallel": 4, "drain_timeout": 12.0, "claims": False},
            "delivery": {
                "retry_first": 11.0,
                "retry_max": 222.0,
                "max_age": 3333.0,
                "scan_interval": 4.0,
                "throttle_hold": 5.0,
                "outage_recipients": 6,
                "outage_window": 7.5,
                "probe_first": 8.0,
                "probe_max": 9.0,
            },
        },
        environ={},
    )
    s = settings_from_config(loaded, Shard(worker_id=1, worker_count=3))

    assert (s.database, str(s.shard), s.max_parallel, s.drain_timeout) == ("mail", "1/3", 4, 12.0)
    assert (s.heartbeat, s.claims) == (7.0, False)
    assert (s.schedule.first, s.schedule.cap, s.schedule.max_age) == (11.0, 222.0, 3333.0)
    assert (s.scan_interval, s.throttle_hold) == (4.0, 5.0)
    assert (s.outage_recipients, s.outage_window) == (6, 7.5)
    assert (s.probe_first, s.probe_max) == (8.0, 9.0)
    # A third of each rate: three workers share the configured one.
    assert s.max_rate == pytest.approx(10.0)
    # Keyed as recipients' domains are looked up: lower case, IDNA.
    assert recipient_domain("a@BÜCHER.example") in s.domains
    assert sorted(s.domains) == ["example.net", "xn--bcher-kva.example"]
    assert s.domains["example.net"].max_parallel == 2, "concurrency is per worker"
    assert s.domains["example.net"].max_rate == pytest.approx(1.0)


def test_no_rate_configured_means_no_pace() -> None:
    loaded = config.from_mapping({"email": {"sender": "n@example.com"}}, environ={})
    s = settings_from_config(loaded, Shard(worker_id=0, worker_count=2))
    assert s.max_rate is None and dict(s.domains) == {}
