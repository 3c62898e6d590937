"""Email templates: every field reachable, HTML escaped, mistakes named at start-up."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from notifier import config
from notifier.errors import ConfigError, PermanentDeliveryError
from notifier.message import Composer
from notifier.templates import DEFAULT_HTML, load_templates

HOSTILE = "<script>alert(\"x\")</script> & 'quoted'"


def doc(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "_id": "m1",
        "from": "someone@example.com",
        "to": "whaa@example.com",
        "subject": "Test 123",
        "body": "Test message body",
        "createdAt": 1422870000000,
        "priority": "high",
    }
    base.update(fields)
    return base


def composer(tmp_path: Path, **files: str) -> Composer:
    paths = {}
    for kind, text in files.items():
        path = tmp_path / f"{kind}.tmpl"
        path.write_text(text)
        paths[kind] = path
    return Composer(sender="n@example.com", database="messages", templates=load_templates(**paths))


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(msg: EmailMessage) -> str:
    """A part's decoded text; 7bit parts keep the wire's CRLF, so compare with LF."""
    content: str = msg.get_content()  # type: ignore[attr-defined]
    return content.replace("\r\n", "\n")


def parts(msg: EmailMessage) -> dict[str, str]:
    return {p.get_content_type(): text_of(p) for p in msg.iter_parts()}  # type: ignore[arg-type]


def test_the_default_text_is_what_notifier_always_sent() -> None:
    c = Composer(sender="n@example.com", database="messages")
    text = text_of(parse(c.compose(doc(body="line\r\nnext")).data))
    assert text == "someone@example.com wrote to you:\n\nSubject: Test 123\n\nline\nnext\n"
    bare = parse(c.compose({"_id": "m", "to": "a@example.com"}).data)
    assert text_of(bare) == "You have a new message:\n\n"
    assert bare["Subject"] == "New message"
    assert parse(c.compose(doc(subject=None)).data)["Subject"] == (
        "New message from someone@example.com"
    )


def test_templates_can_use_every_field(tmp_path: Path) -> None:
    every = (
        "{{ id }}|{{ to }}|{{ from_ }}|{{ subject }}|{{ body }}|"
        "{{ created_at.isoformat() }}|{{ sender }}|{{ sender_name }}|{{ doc.priority }}"
    )
    c = composer(tmp_path, subject="{{ subject }} [{{ doc.priority }}]", text=every)
    msg = parse(c.compose(doc()).data)
    assert msg["Subject"] == "Test 123 [high]"
    assert text_of(msg) == (
        "m1|whaa@example.com|someone@example.com|Test 123|Test message body|"
        "2015-02-02T09:40:00+00:00|n@example.com|Notifier|high\n"
    )


def test_missing_optional_fields_render_as_empty(tmp_path: Path) -> None:
    c = composer(tmp_path, text="[{{ from_ }}][{{ subject }}][{{ body }}][{{ doc.nope }}]")
    msg = parse(c.compose({"_id": "m", "to": "a@example.com"}).data)
    assert text_of(msg) == "[][][][]\n"


def test_html_part_escapes_hostile_fields_and_text_keeps_them(tmp_path: Path) -> None:
    c = Composer(
        sender="n@example.com",
        database="messages",
        templates=load_templates(html=DEFAULT_HTML),
    )
    raw = c.compose(doc(subject=HOSTILE, body=HOSTILE, **{"from": HOSTILE})).data
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    got = parts(msg)
    assert got["text/plain"].count(HOSTILE) == 3
    html = got["text/html"]
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &#39;quoted&#39;" in html
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_unicode_and_long_lines_in_both_parts_round_trip(tmp_path: Path) -> None:
    c = composer(tmp_path, html="<p>{{ body }}</p>")
    body = "héllo ☃ " + "x" * 1200
    got = parts(parse(c.compose(doc(body=body)).data))
    assert body in got["text/plain"]
    assert f"<p>{body}</p>" in got["text/html"]


def test_a_subject_template_that_makes_a_line_break_is_dead_lettered(tmp_path: Path) -> None:
    c = composer(tmp_path, subject="{{ body }}")
    with pytest.raises(PermanentDeliveryError, match="subject template produced a line break"):
        c.compose(doc(body="Hi\r\nBcc: evil@example.com"))


def test_a_template_failing_on_one_document_dead_letters_it(tmp_path: Path) -> None:
    c = composer(tmp_path, text="{{ doc.count + 1 }}")
    assert text_of(parse(c.compose(doc(count=1)).data)) == "2\n"
    with pytest.raises(PermanentDeliveryError, match=r"text template .*text\.tmpl failed"):
        c.compose(doc(count="one"))


def test_a_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\n\n{% if subject %}no end\n")
    with pytest.raises(ConfigError, match=rf"{bad}, line \d+: .*endif"):
        load_templates(text=bad)
    bad.write_text("one\n{{ subject | nosuchfilter }}\n")
    with pytest.raises(ConfigError, match=rf"{bad}, line 2: .*nosuchfilter"):
        load_templates(text=bad)


def test_an_unknown_variable_is_a_typo_named_at_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "typo.txt"
    bad.write_text("{{ subject }}\n{{ subjcet }}\n")
    with pytest.raises(ConfigError, match=rf"{bad}, line 2: unknown variable 'subjcet'"):
        load_templates(subject=bad)


def test_a_missing_template_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.html: no such file"):
        load_templates(html=tmp_path / "nope.html")


def test_config_resolves_template_paths_against_its_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "s.txt").write_text("Hello {{ to }}\n")
    cfg = tmp_path / "notifier.toml"
    cfg.write_text("[email]\nsender = 'n@example.com'\nsubject_template = 'tpl/s.txt'\n")
    monkeypatch.chdir("/")
    loaded = config.load(cfg, environ={})
    assert loaded.email.subject_template == str(tmp_path / "tpl" / "s.txt")
    cfg.write_text("[email]\nsender = 'n@example.com'\nhtml_template = 'tpl/gone.html'\n")
    with pytest.raises(ConfigError, match=r"\[email\] html_template: template .*gone\.html"):
        config.load(cfg, environ={})
