from __future__ import annotations

import pytest
from support import DB

from notifier.testing.fake_couch import FakeCouch


@pytest.fixture
def fake() -> FakeCouch:
    return FakeCouch(databases=[DB], seed=7)
