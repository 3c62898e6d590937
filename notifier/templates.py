"""Email templates: the subject, the plain text and an optional HTML part.

Templates are Jinja2 files named in ``[email]`` (``subject_template``,
``text_template``, ``html_template``); unset ones use the defaults shipped in
``notifier/templates/``, and no ``html_template`` means no HTML part. They are
compiled once at start-up, so a mistake in one (a syntax error, a missing
file, an unknown variable name) is a :class:`ConfigError` naming the file and
the line before any email is sent; rendering is then one call per message.

Autoescaping is on for the HTML template and off for the subject and the
text, which are not HTML. Template variables (see :data:`VARIABLES`) that a
document leaves out are ``None`` and render as empty text, as does any
missing key of ``doc``: an optional field must never make a message
undeliverable. A variable name that is not one of :data:`VARIABLES`, however,
is refused at start-up, because a typo would otherwise render as nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes

from notifier.errors import ConfigError, PermanentDeliveryError

DEFAULTS_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_SUBJECT = DEFAULTS_DIR / "subject.txt"
DEFAULT_TEXT = DEFAULTS_DIR / "body.txt"
DEFAULT_HTML = DEFAULTS_DIR / "body.html"

#: The names every template can use, and what they hold.
VARIABLES: Mapping[str, str] = {
    "doc": "the whole message document, as parsed from JSON",
    "id": "the document's _id",
    "to": "the recipient's address, as validated (domain in IDNA form)",
    "from_": "the document's 'from' field (None if absent)",
    "subject": "the document's 'subject' field (None if absent)",
    "body": "the document's 'body' field with CRLF line ends as LF ('' if absent)",
    "created_at": "createdAt as an aware UTC datetime (now if absent), as in the Date header",
    "sender": "[email] sender: the address notifications come from",
    "sender_name": "[email] sender_name",
}


def _blank_none(value: Any) -> Any:
    """Show an absent optional field as nothing rather than the word "None"."""
    return "" if value is None else value


def _environment(*, html: bool, directory: Path) -> jinja2.Environment:
    return jinja2.Environment(
        # The loader lets a template {% include %} a file next to it.
        loader=jinja2.FileSystemLoader(directory),
        # Escaping is for HTML only: in the subject and the text an "&" or a
        # "<" is what the sender wrote, and escaping would show "&amp;".
        autoescape=html,  # noqa: S701
        undefined=jinja2.Undefined,
        finalize=_blank_none,
        # Block tags on their own line leave no blank line behind, so the
        # plain text reads the way the template file looks.
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )


@dataclass(frozen=True, slots=True)
class Rendered:
    """One message's rendered parts, before any encoding."""

    subject: str
    text: str
    html: str | None


@dataclass(frozen=True, slots=True)
class Template:
    """One compiled template and the file it came from (named in errors)."""

    path: Path
    template: jinja2.Template

    def render(self, context: Mapping[str, Any], what: str) -> str:
        try:
            return self.template.render(context)
        except Exception as e:
            # A template is the operator's code, but it runs on untrusted
            # data: a filter that raises on one document makes that document
            # undeliverable, with the reason, and must not stop the worker.
            raise PermanentDeliveryError(
                f"the {what} template {self.path} failed on this document: {type(e).__name__}: {e}"
            ) from None


@dataclass(frozen=True, slots=True)
class Templates:
    """The compiled subject, text and (optional) HTML templates."""

    subject: Template
    text: Template
    html: Template | None

    @staticmethod
    @functools.cache
    def default() -> Templates:
        """The shipped defaults: the text notifier always sent, no HTML part."""
        return load_templates()

    def render(self, context: Mapping[str, Any]) -> Rendered:
        return Rendered(
            subject=self.subject.render(context, "subject"),
            text=self.text.render(context, "text"),
            html=None if self.html is None else self.html.render(context, "html"),
        )


def load_templates(
    subject: str | Path | None = None,
    text: str | Path | None = None,
    html: str | Path | None = None,
    *,
    base_dir: Path | None = None,
) -> Templates:
    """Compile the templates at these paths (``None``: the shipped default).

    A relative path is taken relative to ``base_dir`` (the config file's
    directory), not to wherever the daemon happens to be started.
    """
    return Templates(
        subject=compile_template(subject or DEFAULT_SUBJECT, html=False, base_dir=base_dir),
        text=compile_template(text or DEFAULT_TEXT, html=False, base_dir=base_dir),
        html=None if html is None else compile_template(html, html=True, base_dir=base_dir),
    )


def compile_template(path: str | Path, *, html: bool, base_dir: Path | None = None) -> Template:
    """Read and compile one template; ConfigError names the file, line and problem."""
    where = Path(path)
    if not where.is_absolute() and base_dir is not None:
        where = base_dir / where
    try:
        source = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"template {where}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"template {where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"template {where}: cannot read: {e.strerror}") from None
    env = _environment(html=html, directory=where.parent)
    try:
        tree = env.parse(source, name=where.name, filename=str(where))
        _check_names(env, tree, where)
        compiled = env.from_string(tree)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"template {where}, line {e.lineno}: {e.message}") from None
    return Template(path=where, template=compiled)


def _check_names(env: jinja2.Environment, tree: jinja2.nodes.Template, where: Path) -> None:
    """Refuse a variable no message defines: it is a typo that would render as nothing."""
    unknown = jinja2.meta.find_undeclared_variables(tree) - set(VARIABLES) - set(env.globals)
    if not unknown:
        return
    first = min(
        (node for node in tree.find_all(jinja2.nodes.Name) if node.name in unknown),
        key=lambda node: node.lineno,
    )
    raise ConfigError(
        f"template {where}, line {first.lineno}: unknown variable {first.name!r}; "
        f"known: {', '.join(VARIABLES)} (other document fields: doc.<field>)"
    )
