"""The README as a test: each ```python block runs as written, in a fresh namespace (a block
whose first line is `# needs: pkg[, pkg]` is skipped where those packages are missing); the make
targets and bench command lines the READMEs show exist and parse; the version, torch pin and
license it states are the package's, CI's and the LICENSE file's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import xent_ext

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCED = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)


def fenced_blocks(path: Path, languages: set[str]) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) of each fenced block in these languages."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCED.finditer(text)
            if m.group(1) in languages]


def shell_commands(path: Path) -> list[str]:
    """The make and bench commands shown in fenced shell blocks, indented blocks and `inline
    code`, comments cut."""
    text = path.read_text()
    lines = [line for _, code in fenced_blocks(path, {"bash", "sh", "shell"})
             for line in code.splitlines()]
    outside = FENCED.sub("", text)
    lines += [line[4:] for line in outside.splitlines() if line.startswith("    ")]
    lines += re.findall(r"`((?:make|python -m bench)\b[^`]*)`", outside)
    commands = [line.split("  #")[0].strip() for line in lines]
    return [c for c in commands if re.match(r"(make|python -m bench)\b", c)]


PYTHON_BLOCKS = fenced_blocks(README, {"python"})
NEEDS = re.compile(r"# needs: ([\w., -]+)\n")


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS,
                         ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_verbatim(line, code):
    needs = NEEDS.match(code)
    for package in needs.group(1).split(",") if needs else ():
        pytest.importorskip(package.strip())
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    finally:
        while xent_ext.is_patched():  # a block that fails inside `with patch()`
            xent_ext.unpatch()


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("path", [README, ROOT / "bench" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_commands_name_real_targets_and_options(path):
    from bench.__main__ import _parser

    targets = _make_targets()
    checked = 0
    for command in shell_commands(path):
        words = shlex.split(command)
        if words[0] == "make":
            named = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            assert named, command
            assert set(named) <= targets, f"{command!r}: no such make target"
            checked += 1
        elif words[:3] == ["python", "-m", "bench"] and "--help" not in words:
            _parser().parse_args(words[3:])  # exits (fails the test) on an unknown option
            checked += 1
    assert checked


def test_stated_version_pin_and_license():
    text = README.read_text()
    version = xent_ext.__version__
    assert f"Version {version} " in text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\S+) \((.*)\)$", changelog, re.M)
    assert newest.group(1) == re.sub(r"\.dev\d+$", "", version)
    assert ("unreleased" in newest.group(2)) == (".dev" in version)
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"`{spec}`" in text and f"torch {spec.split('==')[1]} " in text
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "MIT license" in text
    assert 'license="MIT"' in (ROOT / "setup.py").read_text()
