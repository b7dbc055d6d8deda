"""The Makefile's choices, without building anything: which Python and torch it uses (fake
environments holding a fake torch), that an unchanged checkout does not run pip again (a copy
of the Makefile in a scratch tree, with an interpreter that logs its pip calls), that
gpu-check uses the chosen interpreter, and that it installs the torch CI tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")
SITE = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHON", "PYTHONPATH", "MAKEFLAGS", "MFLAGS",
                        "MAKELEVEL")}
    env.update(extra)
    return env


def _make(*args: str, cwd: Path = ROOT, **env: str) -> str:
    proc = subprocess.run([MAKE, "-s", "--no-print-directory", *args], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _fake_torch(site: Path, version: str = "9.9.9") -> None:
    """A package `torch` that find_spec finds, with the metadata of a given version."""
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (site / f"torch-{version}.dist-info").mkdir()
    (site / f"torch-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")


def _venv(path: Path, torch: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=120)
    if torch:
        _fake_torch(path / SITE)
    return path


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    base = tmp_path_factory.mktemp("envs")
    return {"torch": _venv(base / "with-torch", torch=True),
            "plain": _venv(base / "plain", torch=False), "base": base}


def _path(first: Path) -> str:
    return f"{first}{os.pathsep}{os.environ['PATH']}"


def test_active_venv_with_torch_is_used_directly(envs):
    out = _make("which-python", f"VENV={envs['base'] / 'none'}",
                VIRTUAL_ENV=str(envs["torch"]), PATH=_path(envs["torch"] / "bin"))
    assert out.splitlines() == [f"{envs['torch']}/bin/python: the active virtual environment's",
                                "torch 9.9.9"]


def test_python3_in_a_venv_is_used_directly(envs):
    out = _make("which-python", f"VENV={envs['base'] / 'none'}",
                PATH=_path(envs["torch"] / "bin"))
    assert "python3, in a venv of its own" in out and "torch 9.9.9" in out
    assert out.startswith(str(envs["torch"]))


def test_base_python3_with_torch_is_shared_not_installed(envs, tmp_path):
    """--system-site-packages exposes a base interpreter's torch (here one on PYTHONPATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    _fake_torch(tmp_path / "pythonpath")
    out = _make("which-python", f"VENV={tmp_path / 'venv'}", PATH=_path(bin_dir),
                PYTHONPATH=str(tmp_path / "pythonpath"))
    assert f"{tmp_path}/venv/bin/python: to be created, seeing python3's torch" in out


def test_no_torch_anywhere_installs_the_pinned_torch(envs):
    out = _make("which-python", f"VENV={envs['base'] / 'none'}",
                VIRTUAL_ENV=str(envs["plain"]), PATH=_path(envs["plain"] / "bin"))
    assert "to be created, with torch==2.14.1 (no torch found)" in out


def test_project_venv_and_given_python(envs):
    out = _make("which-python", f"VENV={envs['plain']}", PATH=_path(envs["plain"] / "bin"))
    assert out.startswith(f"{envs['plain']}/bin/python: the project's venv")
    out = _make("which-python", f"PYTHON={envs['torch']}/bin/python")
    assert out.splitlines() == [f"{envs['torch']}/bin/python: given as PYTHON", "torch 9.9.9"]


def test_gpu_check_uses_the_chosen_python(envs):
    for args, python in (([f"VENV={envs['plain']}"], f"{envs['plain']}/bin/python"),
                         ([f"PYTHON={envs['torch']}/bin/python"], f"{envs['torch']}/bin/python")):
        out = _make("-n", "gpu-check", *args, PATH=_path(envs["plain"] / "bin"))
        assert f"PYTHON={python} bash bench/gpu_check.sh" in out


def test_torch_pin_is_the_one_ci_tests():
    makefile = (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M).group(1)
    assert re.findall(r'pip install -q "(torch==[^"]+)"', ci) == [spec]


@pytest.fixture
def scratch(tmp_path):
    """A tree with the Makefile and tools/, a fake source, and an interpreter that logs its
    pip calls (and runs everything else with this Python, which has torch)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "tools", tree / "tools")
    shutil.copy(ROOT / "Makefile", tree)
    for name in ("setup.py", "pyproject.toml", "requirements-dev.txt"):
        (tree / name).write_text("")
    (tree / "csrc").mkdir()
    (tree / "csrc" / "a.cpp").write_text("")
    (tree / "xent_ext").mkdir()
    (tree / "xent_ext" / "_C.fake.so").write_text("")
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then\n'
                    f'  echo "$*" >> {log}; exit 0\nfi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    log.write_text("")

    def pip_calls(*args: str) -> list[str]:
        before = len(log.read_text().splitlines())
        _make("build", f"PYTHON={fake}", *args, cwd=tree)
        return log.read_text().splitlines()[before:]

    return tree, pip_calls


def _edit(path: Path, tree: Path) -> None:
    """path changes after the last build (and both stay in the past, so that the stamp the
    next build writes is newer than it)."""
    now = time.time()
    for f in tree.rglob("*"):
        os.utime(f, (now - 30, now - 30))
    for stamp in (tree / "build" / "make").iterdir():
        os.utime(stamp, (now - 20, now - 20))
    os.utime(path, (now - 10, now - 10))


def test_unchanged_tree_runs_no_pip(scratch):
    tree, pip_calls = scratch
    first = pip_calls()
    assert [c.split()[:4] for c in first] == [["-m", "pip", "install", "-q"],
                                              ["-m", "pip", "install", "-v"]]
    assert "--no-build-isolation" in first[1] and first[1].endswith("-e .")
    assert pip_calls() == []  # nothing changed: pip is not even started
    _edit(tree / "csrc" / "a.cpp", tree)
    assert len(pip_calls()) == 1  # a source changed: one build (ninja redoes that file only)
    assert pip_calls() == []
    assert len(pip_calls("XENT_FORCE_CPU=1")) == 1  # another build option: built again
    assert pip_calls("XENT_FORCE_CPU=1") == []
    (tree / "xent_ext" / "_C.fake.so").unlink()
    assert len(pip_calls("XENT_FORCE_CPU=1")) == 1  # the extension is gone: built again
    _edit(tree / "requirements-dev.txt", tree)
    assert len(pip_calls("XENT_FORCE_CPU=1")) == 2  # dependencies, then the build
