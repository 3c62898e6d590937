"""The documentation cannot drift from the code.

docs/configuration.md has one table per config section; every key of the
config dataclasses must be there with its type and its default, and nothing
else. docs/*.md links and `path::test` references must point at things that
exist, and README's exit statuses are the command line's.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from notifier import config
from notifier.cli import EXIT_STATUSES

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "config.example.toml"
DOCS = sorted(p.name for p in (ROOT / "docs").glob("*.md"))

_TYPE_WORDS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _unquote(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


def documented_sections(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """``{section: {key: (type cell, default cell)}}`` from the reference's tables."""
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    current: dict[str, tuple[str, str]] | None = None
    in_table = False
    for line in text.splitlines():
        heading = re.fullmatch(r"## \[([a-z_]+)\]", line.strip())
        if heading:
            assert heading.group(1) not in sections, f"[{heading.group(1)}] documented twice"
            current = sections[heading.group(1)] = {}
            in_table = False
            continue
        if line.startswith("## "):
            current, in_table = None, False
            continue
        if current is None or not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells == ["key", "type", "default", "meaning"]:
            in_table = True
            continue
        if not in_table or set(line) <= set("|-: "):
            continue
        assert len(cells) == 4, f"a key row needs 4 cells: {line!r}"
        key = _unquote(cells[0])
        assert key not in current, f"{key} documented twice"
        current[key] = (cells[1], cells[2])
    return sections


def expected_type(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return ", ".join(f'`"{choice}"`' for choice in typing.get_args(hint))
    return _TYPE_WORDS[hint]


def expected_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    if f.default is None:
        return "not set"
    return f.default


def parse_default(cell: str) -> Any:
    if cell in ("required", "not set"):
        return cell
    return tomllib.loads(f"v = {_unquote(cell)}")["v"]


DOCUMENTED = documented_sections(REFERENCE.read_text(encoding="utf-8"))


def test_every_section_is_documented_and_no_other() -> None:
    assert set(DOCUMENTED) == set(config.SECTIONS)


@pytest.mark.parametrize("section", list(config.SECTIONS))
def test_every_key_is_documented_with_its_type_and_default(section: str) -> None:
    cls = config.SECTIONS[section]
    hints = typing.get_type_hints(cls)
    special = config.TABLE_KEYS | config.DEPRECATED_KEYS
    fields = {
        f.name: f
        for f in dataclasses.fields(cls)
        if f.name != "password" and (section, f.name) not in special
    }
    documented = DOCUMENTED[section]
    assert set(documented) == set(fields), (
        f"[{section}]: undocumented {sorted(set(fields) - set(documented))}, "
        f"documented but unknown {sorted(set(documented) - set(fields))}"
    )
    for key, f in fields.items():
        type_cell, default_cell = documented[key]
        assert type_cell == expected_type(hints[key]), f"[{section}] {key}: type"
        default = parse_default(default_cell)
        want = expected_default(f)
        assert default == want and type(default) is type(want), (
            f"[{section}] {key}: docs say {default!r}, the code says {want!r}"
        )


@pytest.mark.parametrize(("section", "key"), sorted(config.TABLE_KEYS | config.DEPRECATED_KEYS))
def test_table_and_deprecated_keys_have_a_heading_of_their_own(section: str, key: str) -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    headings = re.findall(r"^###+ (.+)$", text, flags=re.MULTILINE)
    assert any(f"[{section}" in h and key in h for h in headings), (
        f"docs/configuration.md has no heading for [{section}] {key}"
    )


def test_the_example_config_sets_what_the_reference_says() -> None:
    """Every documented key is in config.example.toml; the keys it sets have the default."""
    text = EXAMPLE.read_text(encoding="utf-8")
    example = tomllib.loads(text)
    for section, keys in DOCUMENTED.items():
        # The section's part of the example file, commented keys included.
        part = re.split(r"^\[", text.split(f"\n[{section}]\n", 1)[1], flags=re.MULTILINE)[0]
        for key, (_, default_cell) in keys.items():
            assert re.search(rf"^#? ?{key} = ", part, flags=re.MULTILINE), (
                f"[{section}] {key} is missing from config.example.toml"
            )
            default = parse_default(default_cell)
            if key in example.get(section, {}) and default not in ("required", "not set"):
                assert example[section][key] == default, f"[{section}] {key}"


def test_the_environment_variables_of_the_code_are_documented() -> None:
    code = "".join(
        (ROOT / "notifier" / name).read_text(encoding="utf-8") for name in ("config.py", "cli.py")
    )
    names = set(re.findall(r"NOTIFIER_[A-Z_]+", code))
    assert names, "the code names no NOTIFIER_ variable: is this test looking in the right place?"
    text = REFERENCE.read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"not in docs/configuration.md: {missing}"


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {
        _anchor(m.group(1))
        for m in re.finditer(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    }


@pytest.mark.parametrize("name", DOCS)
def test_links_point_at_files_and_headings_that_exist(name: str) -> None:
    path = ROOT / "docs" / name
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # an external URL
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{name}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{name}: no heading for #{anchor} in {linked.name}"


@pytest.mark.parametrize("name", DOCS)
def test_referenced_modules_and_tests_exist(name: str) -> None:
    text = (ROOT / "docs" / name).read_text(encoding="utf-8")
    for path in set(re.findall(r"`((?:notifier|tests|systemd)/[\w./@-]+)", text)):
        assert (ROOT / path).exists(), f"{name}: {path} does not exist"
    for path, test in set(re.findall(r"`(tests/[\w/.]+\.py)::(\w+)`", text)):
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"def {test}\(", source), f"{name}: no {test} in {path}"


def test_the_readme_lists_every_exit_status_and_no_other() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Exit statuses", 1)[1].split("\n#", 1)[0]
    documented = [int(m) for m in re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)]
    assert documented == [status for status, _ in EXIT_STATUSES]
