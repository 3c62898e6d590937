"""Fixtures for end-to-end tests: configs that point at the test servers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from realservers import CouchTestDB
from scenario import MakeConfig, config_data, to_toml

from notifier import config as config_module
from notifier.config import Config
from notifier.testing.smtp import SmtpSink


@pytest.fixture
def make_config(couch: CouchTestDB, smtp_sink: SmtpSink) -> MakeConfig:
    def make(**overrides: Any) -> Config:
        return config_module.from_mapping(
            config_data(couch, smtp_sink, overrides), source="<test>", environ={}
        )

    return make


@pytest.fixture
def config_file(couch: CouchTestDB, smtp_sink: SmtpSink, tmp_path: Path) -> Callable[..., Path]:
    def write(**overrides: Any) -> Path:
        path = tmp_path / "notifier.toml"
        path.write_text(to_toml(config_data(couch, smtp_sink, overrides)))
        return path

    return write
