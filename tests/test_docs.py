"""The docs cannot rot silently: every `s4l` command and every curl route they show must parse.

Each shell line in a ```bash/```sh/```console block of README.md and docs/*.md that runs `s4l`
(directly, via `torchrun ... -m s4l.cli`, or `python -m s4l.cli`) is parsed with the real
argument parser, so a renamed flag or subcommand fails here; each `curl` line must name a route
and method of the committed OpenAPI schema. `make demo` runs the quick-start commands for real.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from s4l.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)


def _shell_lines(text: str) -> list[str]:
    lines = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _s4l_argv(line: str) -> list[str] | None:
    line = re.sub(r"\s+#.*$", "", line)
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if words[0] in ("s4l", ".venv/bin/s4l"):
        return words[1:]
    if "s4l.cli" in words:
        return words[words.index("s4l.cli") + 1:]
    return None


def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        if not doc.exists():
            continue
        for line in _shell_lines(doc.read_text()):
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                argv = _s4l_argv(part)
                if argv is not None:
                    found.append((f"{doc.name}: {part}", argv))
    return found


COMMAND_LINES = _all_commands()


def test_docs_show_commands():
    assert (ROOT / "README.md").exists()
    names = {argv[0] for _, argv in COMMAND_LINES if argv}
    # The README's workflow walks through the main commands.
    assert {"train", "extract", "probe", "export", "serve"} <= names, names


@pytest.mark.parametrize("where,argv", COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_documented_command_parses(where, argv):
    if not argv or argv[0].startswith("-"):
        parser = build_parser()
    else:
        assert argv[0] in COMMANDS, f"{where}: unknown subcommand {argv[0]!r}"
        parser = build_parser(only=argv[0])
    if "--help" in argv or "-h" in argv or "--version" in argv:
        return
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on a bad flag
        pytest.fail(f"{where}: does not parse (exit {e.code})")


def _openapi_routes() -> set[tuple[str, str]]:
    spec = ROOT / "service" / "openapi.json"
    if not spec.exists():
        pytest.skip("no committed OpenAPI schema")
    paths = json.loads(spec.read_text())["paths"]
    return {(m.upper(), p) for p, ops in paths.items() for m in ops}


def test_documented_curl_routes_exist():
    routes = _openapi_routes()
    seen = 0
    for doc in DOCS:
        if not doc.exists():
            continue
        for line in _shell_lines(doc.read_text()):
            if not line.startswith("curl"):
                continue
            url = re.search(r"https?://[^/\s]+(/[^\s'\"?]*)", line)
            assert url, f"{doc.name}: curl without a URL: {line}"
            method = "GET"
            m = re.search(r"-X\s+(\w+)", line)
            if m:
                method = m.group(1).upper()
            elif re.search(r"\s(-F|--form|-d|--data|--data-binary)\s", line):
                method = "POST"
            # A route template (/v2/models/{name}/infer) matches any value of its parameters.
            assert any(m == method and re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)),
                                                    url.group(1)) for m, p in routes), \
                f"{doc.name}: {method} {url.group(1)} is not a route"
            seen += 1
    assert seen >= 5, "the README's HTTP API section shows curl for every route"


def test_cli_reference_is_current():
    from s4l.cli import reference_markdown

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == reference_markdown(), (
        "docs/cli.md is stale: regenerate with `python -m s4l.cli --reference > docs/cli.md`"
    )
