"""The examples in notifier's docstrings are tests too (as in sortedcontainers)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import notifier

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(notifier.__path__, prefix="notifier.")
    if info.name != "notifier.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_core_modules_have_examples() -> None:
    for name in (
        "notifier.tracker",
        "notifier.shard",
        "notifier.backoff",
        "notifier.lease",
        "notifier.claim",
        "notifier.schedule",
        "notifier.replies",
        "notifier.pacing",
        "notifier.breaker",
        "notifier.lifecycle",
    ):
        assert doctest.testmod(importlib.import_module(name)).attempted > 0, name
