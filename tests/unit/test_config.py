"""Configuration: every mistake is named with file, key and expectation; secrets stay hidden."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from notifier import config
from notifier.config import ConfigError, Secret

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notifier.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_matches_the_defaults() -> None:
    loaded = config.load(EXAMPLE, environ={})
    defaults = config.from_mapping({"email": {"sender": "notifications@example.com"}}, environ={})
    assert loaded.couch == defaults.couch
    assert loaded.smtp == defaults.smtp
    assert loaded.email == defaults.email
    assert loaded.worker == defaults.worker


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.MULTILINE))
    for name, section in config.SECTIONS.items():
        for field in section.__dataclass_fields__:
            if (name, field) in config.TABLE_KEYS:
                assert f"[{name}.{field}." in text, f"[{name}.{field}.…] missing from example"
            elif field != "password" and (name, field) not in config.DEPRECATED_KEYS:
                assert field in documented, f"{section.__name__}.{field} missing from example"


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        config.load(tmp_path / "nope.toml")


def test_invalid_toml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[couch\nurl=")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not valid TOML"):
        config.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[worker]\nmax_paralel = 3", r"\[worker\] max_paralel: unknown key"),
        ("[wokrer]\n", r"unknown section \[wokrer\]"),
        ("[worker]\nmax_parallel = 'ten'", r"\[worker\] max_parallel: expected an integer"),
        ("[worker]\nmax_parallel = 0", r"\[worker\] max_parallel: expected a value greater"),
        ("[worker]\ndrain_timeout = true", r"\[worker\] drain_timeout: expected a number"),
        ("[smtp]\nsecurity = 'ssl'", r"\[smtp\] security: expected one of 'none'"),
        ("[smtp]\nport = 25.5", r"\[smtp\] port: expected an integer"),
        ("[smtp]\nport = 65536", r"\[smtp\] port: expected 1 to 65535, got 65536"),
        ("[smtp]\nport = 0", r"\[smtp\] port: expected a value greater than 0"),
        ("[couch]\nurl = 'ftp://x'", r"\[couch\] url: expected an http"),
        ("[couch]\npassword = 'x'", r"\[couch\] password: unknown key \(passwords come from"),
        ("[couch]\nusername = 'u'", r"\[couch\] username is set but there is no password"),
        (
            "[email]\nsender = 'not an address'",
            r"\[email\] sender: expected an ASCII email address",
        ),
        ("couch = 3", r"\[couch\] must be a table"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    if "[email]" not in text:
        text += "\n[email]\nsender = 'n@example.com'\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(path, environ={})
    assert str(info.value).startswith(str(path))


def test_every_mistake_is_named_not_only_the_first(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[wokrer]\n"
        "[smtp]\nport = 70000\nsecurity = 'ssl'\n"
        "[worker]\nmax_parallel = 0\ndrain_timeout = 'long'\n"
        "[couch]\nurl = 'ftp://x'\nusername = 'u'\n"
        "[email]\nsender = 'not an address'\n",
    )
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    message = str(info.value)
    assert message.startswith("8 problems:\n"), message
    for problem in (
        "unknown section [wokrer]",
        "[smtp] port: expected 1 to 65535, got 70000",
        "[smtp] security: expected one of",
        "[worker] max_parallel: expected a value greater than 0",
        "[worker] drain_timeout: expected a number",
        "[couch] url: expected an http",
        "[couch] username is set but there is no password",
        "[email] sender: expected an ASCII email address",
    ):
        assert f"  {path}: {problem}" in message, problem


def test_without_secrets_no_password_is_needed_or_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[email]\nsender = 'n@example.com'\n"
        "[smtp]\nusername = 'u'\npassword_file = '/nonexistent/smtp-password'\n"
        "[couch]\nusername = 'u'\n",
    )
    loaded = config.load(path, environ={}, secrets=False)
    assert loaded.smtp.password is None and loaded.couch.password is None
    with pytest.raises(ConfigError, match="2 problems"):
        config.load(path, environ={})


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"\[email\] sender: required key is missing"):
        config.from_mapping({}, environ={})


def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    data: dict[str, Any] = {
        "couch": {"url": "http://admin:s3cr3t@couch:5984"},
        "email": {"sender": "n@example.com"},
    }
    with pytest.raises(ConfigError) as info:
        config.from_mapping(data, environ={})
    assert "s3cr3t" not in str(info.value)


def test_password_from_environment_never_shows(tmp_path: Path) -> None:
    path = write(tmp_path, "[couch]\nusername = 'u'\n[email]\nsender = 'n@example.com'\n")
    loaded = config.load(path, environ={config.COUCH_PASSWORD_ENV: "s3cr3t"})
    assert loaded.couch.password == Secret("s3cr3t")
    assert "s3cr3t" not in repr(loaded)
    assert "s3cr3t" not in str(loaded)


def test_password_file_wins_and_loses_its_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "smtp-password"
    secret.write_text("from-file\n")
    path = write(
        tmp_path,
        f"[smtp]\nusername = 'u'\npassword_file = '{secret}'\n[email]\nsender = 'n@example.com'\n",
    )
    loaded = config.load(path, environ={config.SMTP_PASSWORD_ENV: "from-env"})
    assert loaded.smtp.password is not None
    assert loaded.smtp.password.reveal() == "from-file"


def test_relative_password_file_is_a_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "couch-password").write_text("cred\n")
    loaded = config.from_mapping(
        {
            "couch": {"username": "u", "password_file": "couch-password"},
            "email": {"sender": "n@example.com"},
        },
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert loaded.couch.password == Secret("cred")


def test_unreadable_password_file_is_named_without_content(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    path = write(
        tmp_path,
        f"[smtp]\nusername = 'u'\npassword_file = '{missing}'\n[email]\nsender = 'n@example.com'\n",
    )
    with pytest.raises(ConfigError, match=r"\[smtp\] password_file: cannot read .*absent"):
        config.load(path, environ={})


def test_integers_are_accepted_where_seconds_are_expected() -> None:
    loaded = config.from_mapping(
        {"worker": {"drain_timeout": 3}, "email": {"sender": "n@example.com"}}, environ={}
    )
    assert loaded.worker.drain_timeout == 3.0
    assert isinstance(loaded.worker.drain_timeout, float)


def test_example_is_valid_toml_with_only_known_sections() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == {"couch", "smtp", "delivery", "email", "worker", "metrics"}


def test_a_sender_name_with_a_line_break_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[email\] sender_name: must be one line"):
        config.from_mapping(
            {"email": {"sender": "n@example.com", "sender_name": "x\r\nBcc: e@example.com"}},
            environ={},
        )


@pytest.mark.parametrize("listen", ["9464", "localhost", "host:99999", ":80"])
def test_a_bad_metrics_address_is_named(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"<x>: \[metrics\] listen: expected HOST:PORT"):
        config.from_mapping(
            {"email": {"sender": "n@example.com"}, "metrics": {"listen": listen}},
            source="<x>",
            environ={},
        )


def test_delivery_and_pacing_keys_are_read_and_checked(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    loaded = config.from_mapping(
        {
            "email": {"sender": "n@example.com"},
            "smtp": {
                "security": "starttls",
                "ca_file": "ca.pem",
                "max_rate": 14,
                "domains": {"Example.NET": {"max_parallel": 2}, "slow.example": {"max_rate": 1}},
            },
            "delivery": {"retry_first": 30, "max_age": 86400},
        },
        environ={},
        base_dir=tmp_path,
    )
    assert loaded.smtp.ca_file == str(ca), "relative to the config file"
    assert loaded.smtp.max_rate == 14.0
    assert loaded.smtp.domains["example.net"].max_parallel == 2
    assert loaded.smtp.domains["slow.example"].max_rate == 1.0
    assert loaded.delivery.retry_first == 30.0 and loaded.delivery.max_age == 86400.0


@pytest.mark.parametrize(
    ("smtp", "delivery", "message"),
    [
        (
            {"ca_file": "/nonexistent/ca.pem", "security": "tls"},
            {},
            r"\[smtp\] ca_file: cannot read",
        ),
        ({"client_key": "/etc/hostname", "security": "tls"}, {}, "client_key is set without"),
        ({"ca_file": "/etc/hostname"}, {}, 'security is "none"'),
        ({"max_rate": 0}, {}, r"\[smtp\] max_rate: expected a value greater than 0"),
        ({"domains": {"a.example": {}}}, {}, "set max_parallel, max_rate or both"),
        ({"domains": {"a.example": {"max_parallel": 0}}}, {}, "max_parallel: expected an integer"),
        ({"domains": {"a.example": {"rate": 1}}}, {}, "rate: unknown key"),
        ({"domains": {"user@a.example": {"max_rate": 1}}}, {}, "expected a domain name"),
        ({}, {"retry_first": 600, "retry_max": 60}, "retry_first .600. must not exceed retry_max"),
        ({}, {"max_age": 0}, r"\[delivery\] max_age: expected a value greater than 0"),
        ({}, {"probe_first": 10, "probe_max": 5}, "probe_first .10. must not exceed probe_max"),
    ],
)
def test_delivery_and_pacing_mistakes_are_named(
    smtp: dict[str, object], delivery: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_mapping(
            {"email": {"sender": "n@example.com"}, "smtp": smtp, "delivery": delivery},
            environ={},
        )


def test_max_attempts_from_an_older_config_still_starts_with_a_warning() -> None:
    loaded = config.from_mapping(
        {"email": {"sender": "n@example.com"}, "smtp": {"max_attempts": 5}}, environ={}
    )
    (warning,) = loaded.warnings
    assert "[smtp] max_attempts is no longer used" in warning
    assert "[delivery] max_age" in warning
