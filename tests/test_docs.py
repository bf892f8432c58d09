"""The pages a newcomer reads (README.md, docs/*.md) point at what exists and say what runs.

- every relative link and image points at a file or folder of the repository;
- every repository path docs/architecture.md names in backticks exists;
- README's set-up commands are the Makefile's, and CI (.ci/run) runs the README's whole-suite command;
- every fenced bash line that ends with `# cheap` runs from the repository root and exits 0.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = "# cheap"
CHEAP_TIMEOUT_S = 60
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
REPO_PREFIXES = ("harness/", "tests/", "bench/", "tools/", "launch/", "recipes/")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def without_code(text: str) -> str:
    """The page with its fenced blocks and inline code removed: links are read from prose only."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(without_code(page.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def bash_lines(page: Path) -> list[str]:
    """Every line of the page's ```bash blocks."""
    return [line for lang, body in FENCE.findall(page.read_text()) if lang == "bash" for line in body.splitlines()]


def cheap_commands() -> list[tuple[str, str]]:
    """(first page, command) for every bash line marked `# cheap`, the marker cut off; a command
    shown on several pages runs once."""
    first_page: dict[str, str] = {}
    for page in PAGES:
        for line in bash_lines(page):
            if line.rstrip().endswith(CHEAP):
                first_page.setdefault(line.rstrip()[: -len(CHEAP)].strip(), page_id(page))
    return [(page, command) for command, page in first_page.items()]


def commands_of(lines: list[str]) -> list[str]:
    """Shell lines without their comments and blank lines."""
    commands = [line.split("#", 1)[0].strip() for line in lines]
    return [command for command in commands if command]


def setup_commands() -> list[str]:
    """The commands of README's first bash block under its "Set-up" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1]
    lang, body = FENCE.search(section).groups()
    assert lang == "bash"
    return commands_of(body.splitlines())


# --------------------------------------------------------------------------- links

@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_at_files(page):
    missing = [target for target in relative_links(page)
               if not (page.parent / target.split("#", 1)[0]).exists()]
    assert not missing, f"{page_id(page)} links to paths that do not exist: {missing}"


def test_pages_are_linked_from_the_readme():
    linked = set(relative_links(ROOT / "README.md"))
    unlinked = [page_id(page) for page in PAGES[1:] if page_id(page) not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_link_reader_finds_links_and_images():
    """The link pattern itself, on a literal page: prose links count, code does not."""
    text = "See [a](docs/a.md) and ![b](../bench/b.png), not `[c](c.md)` or [d](https://x.org).\n```\n[e](e.md)\n```\n"
    assert LINK.findall(without_code(text)) == ["docs/a.md", "../bench/b.png", "https://x.org"]


# --------------------------------------------------------------------------- architecture.md

def architecture_paths() -> list[str]:
    """Backticked repository paths in docs/architecture.md (placeholders like test_<module>.py left out)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    spans = re.findall(r"`([^`\n]+)`", text)
    return sorted({span for span in spans
                   if span.startswith(REPO_PREFIXES) and " " not in span and not re.search(r"[<>*]", span)})


def test_architecture_names_existing_paths():
    paths = architecture_paths()
    assert "harness/train.py" in paths and "harness/memory/rules.py" in paths  # the reader sees the tables
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


# --------------------------------------------------------------------------- set-up commands

def test_readme_setup_commands_are_the_makefiles():
    commands = setup_commands()
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    header = [line.lstrip("# ").split("  ")[0] for line in makefile.splitlines() if re.match(r"#\s+make \w+", line)]
    assert header == commands, f"the Makefile's header lists {header}, README's set-up {commands}"
    for command in commands:
        target = command.split()[1]
        assert re.search(rf"^{target}:", makefile, re.M), f"README runs `{command}`: no target {target} in Makefile"


def test_ci_runs_the_readme_full_suite_command():
    """CI runs `make test-all`: the command the README's set-up section gives for the whole suite."""
    ci = commands_of((ROOT / ".ci" / "run").read_text().splitlines())
    make_lines = [line for line in ci if line.startswith("make")]
    assert make_lines == ["make test-all"]
    setup = " ".join((ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0].split())
    assert "`make test-all` runs the whole suite" in setup and "CI (`.ci/run`) runs `make test-all`" in setup
    assert re.search(r"^test-all:", (ROOT / "Makefile").read_text(), re.M)


# --------------------------------------------------------------------------- cheap commands

def test_cheap_commands_are_marked():
    """The README keeps at least its dry run and its planner call checked."""
    commands = [command for page, command in cheap_commands() if page == "README.md"]  # README comes first
    assert "python launch/train.py recipes/llama2_13b_12k.toml --dry-run" in commands
    assert "python tools/plan_memory.py recipes/llama2_13b_12k.toml --gpu v100-32gb" in commands


@pytest.mark.parametrize("page, command", cheap_commands(), ids=lambda value: value)
def test_cheap_command_runs(page, command):
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHEAP_TIMEOUT_S)
    assert result.returncode == 0, f"{page}: `{command}` exited {result.returncode}:\n{result.stderr[-2000:]}"
