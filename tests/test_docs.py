"""The documentation's examples are run, and its reference is checked against the code.

Every fenced block of README.md and docs/*.md is taken by its language:
- python with tests (or fixtures) runs as a test module in a project made for the examples, and
  must pass; python without runs as a script; the `Sandbox(...)` signature is compared with the
  class's;
- toml (profiles) is loaded as a pyproject.toml, and must load;
- console and sh: every `nsbox ...` line must parse as the command does, every `--nsbox-*` option of
  a pytest line must exist (the README's quickstart lines are what .ci/run runs, literally).
"""

from __future__ import annotations

import inspect
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

from .conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


class Block(NamedTuple):
    path: Path
    line: int
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    fence = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```", re.S | re.M)
    for path in DOCS:
        text = path.read_text()
        for match in fence.finditer(text):
            line = text[:match.start()].count("\n") + 1
            found.append(Block(path, line, match.group(2), textwrap.dedent(match.group(3))))
    return found


BLOCKS = blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in ("console", "sh", "")]


def _network() -> bool:
    try:
        socket.create_connection(("dl-cdn.alpinelinux.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture
def project(pytester, alpine_tarball):
    """A project with what the examples name: the README's tarball, a layer with a program, data."""
    shutil.copy(alpine_tarball, pytester.path / "alpine-minirootfs-3.20.3-x86_64.tar.gz")
    extra = pytester.path / "tests" / "rootfs-extra"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc" / "myapp.conf").write_text("answer = 42\n")
    tool = extra / "usr" / "local" / "bin" / "myapp"
    tool.parent.mkdir(parents=True)
    tool.write_text('#!/bin/sh\n[ "$1" = --check ] && grep -q answer "$2"\n')
    tool.chmod(0o755)
    (pytester.path / "tests" / "data").mkdir()
    from .images import alpine_layer, app_layers, oci_layout
    oci_layout(pytester.path / "images" / "app", [alpine_layer(alpine_tarball), *app_layers()],
               entrypoint=("hello",), cmd=())  # docs/images.md's oci:images/app:latest
    return pytester


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_examples_run(block, project):
    code = block.code
    if code.lstrip().startswith("Sandbox("):
        _check_signature(code)
        return
    if "apk add" in code and not _network():
        pytest.skip(f"{block} installs packages from Alpine's mirror, which this machine cannot reach")
    if "def test_" in code or "@pytest.fixture" in code:
        fixtures = re.findall(r"@pytest\.fixture[^\n]*\n(?:@[^\n]*\n)*def (\w+)\(", code)
        if "def test_" not in code:  # fixtures alone: a test that uses them
            code += f"\n\ndef test_the_fixtures({', '.join(fixtures)}):\n    pass\n"
        if not code.lstrip().startswith(("import", "from", "#")):
            code = "import pytest\nfrom pytest_nsbox import Sandbox\n\n" + code
        project.makepyfile(**{f"test_example_{block.line}": code})
        result = project.runpytest_subprocess("-p", "no:cacheprovider" if "config.cache" not in code else "cacheprovider")
        outcomes = result.parseoutcomes()
        assert outcomes.get("passed", 0) >= 1 and not outcomes.get("failed") and not outcomes.get("errors"), \
            f"{block}:\n" + result.stdout.str()[-3000:]
    else:
        script = project.path / f"example_{block.line}.py"
        script.write_text(code)
        ran = subprocess.run([sys.executable, str(script)], cwd=project.path, capture_output=True, text=True,
                             timeout=120, env={**os.environ})
        assert ran.returncode == 0, f"{block}:\n{ran.stderr[-3000:]}"


def _check_signature(code: str) -> None:
    """The documented `Sandbox(...)` keywords and defaults are the class's."""
    import ast

    from pytest_nsbox import Sandbox
    from pytest_nsbox.settings import parse_size
    call = ast.parse(code.strip(), mode="eval").body
    assert isinstance(call, ast.Call) and not call.args
    documented = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    actual = {name: param.default for name, param in inspect.signature(Sandbox).parameters.items()}
    assert list(documented) == list(actual), (list(documented), list(actual))
    for name, value in documented.items():
        if isinstance(value, str) and name in ("output_max", "memory_max", "tmpfs_size"):
            value = parse_size(value)
        assert value == actual[name], (name, value, actual[name])


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "toml"], ids=str)
def test_toml_examples_load(block, tmp_path):
    from pytest_nsbox import profiles
    (tmp_path / "tests" / "data").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text(block.code)
    assert profiles.load(tmp_path / "pyproject.toml"), block


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_command_lines_parse(block):
    from pytest_nsbox.cli import build_parser
    options = _pytest_options()
    for raw in block.code.splitlines():
        line = raw.strip().removeprefix("$ ").split("  #")[0].strip()
        if line.startswith("again: "):
            line = line.removeprefix("again: ")
        words = shlex.split(line) if line and not line.startswith(("#", "nsbox:", "...")) else []
        if ".venv/bin/nsbox" in words[:1]:
            words[0] = "nsbox"
        if words[:1] == ["nsbox"]:
            try:
                build_parser().parse_args(words[1:])
            except SystemExit as exc:
                if exc.code != 0:
                    pytest.fail(f"{block}: `{line}` is not a command nsbox takes")
        elif any(word.endswith("pytest") for word in words[:3]):
            unknown = [w.split("=")[0] for w in words if w.startswith("--nsbox-") and w.split("=")[0] not in options]
            assert not unknown, f"{block}: `{line}` uses options pytest-nsbox does not have: {unknown}"


def _pytest_options() -> set[str]:
    from pytest_nsbox.plugin.options import OPTIONS
    return {option.flag for option in OPTIONS}


# -- the reference page names everything --------------------------------------------------------------
def test_the_configuration_reference_names_every_setting():
    from pytest_nsbox.plugin.options import OPTIONS
    from pytest_nsbox.settings import SandboxSettings
    page = (REPO / "docs" / "configuration.md").read_text()
    names = [name for option in OPTIONS for name in (option.flag, option.dest, option.env)]
    names += [f"| `{key}` |" for key in SandboxSettings.keys()]
    names += ["| `profile` |", "| `isolate` |"]
    code = "\n".join(path.read_text() for path in (REPO / "pytest_nsbox").rglob("*.py"))
    names += sorted(set(re.findall(r"NSBOX_[A-Z_]+", code)) - {"NSBOX_NAME"})
    missing = [name for name in names if name not in page]
    assert not missing, f"docs/configuration.md does not name: {missing}"


def test_every_doc_is_linked_from_the_readme_or_another_doc():
    linked = "\n".join(path.read_text() for path in DOCS)
    for doc in (REPO / "docs").glob("*.md"):
        assert f"{doc.name}" in linked.replace(doc.read_text(), ""), f"nothing links to docs/{doc.name}"


def test_the_configuration_reference_lists_every_option_of_every_nsbox_command():
    import argparse

    from pytest_nsbox.cli import build_parser
    page = (REPO / "docs" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| `nsbox ")}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        (row,) = [line for cell, line in rows.items() if f"`nsbox {name}" in cell]
        options = {o for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
        missing = sorted(o for o in options if f"`{o}`" not in row)
        assert not missing, f"docs/configuration.md's row for nsbox {name} lacks {missing}"
