"""What an install tells its user: the torch it was built against is checked at import time,
`python -m xent_ext` says what is in use, has_cuda() / cuda_available() mean what they say."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import xent_ext
from xent_ext import _torch_check

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter that imports this checkout's xent_ext."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("built, running, differs", [
    (("2.14.1+cu130", "13.0"), ("2.14.1+cu130", "13.0"), False),
    (("2.14.1+cu130", None), ("2.14.1+cpu", None), False),  # a CPU-only build runs on either
    (("2.14.1", "13.0"), ("2.14.1+cu130", "13.0"), False),
    (("2.13.0+cu130", "13.0"), ("2.14.1+cu130", "13.0"), True),
    (("2.14.1+cu130", None), ("2.13.0", None), True),
    (("2.14.1+cu126", "12.6"), ("2.14.1+cu130", "13.0"), True),  # kernels link CUDA 12.6
    (("2.14.1+cu130", "13.0"), ("2.14.1+cpu", None), True),
])
def test_mismatch_rules(built, running, differs):
    assert _torch_check.mismatch(*built, *running) is differs


def test_import_under_another_torch_names_both_and_the_fix():
    """A build record of another torch (faked before the import) makes the import fail with
    both versions and the rebuild command, before the compiled extension is loaded."""
    proc = _python("""
        import sys, types
        fake = types.ModuleType("xent_ext._build_info")
        fake.TORCH_VERSION, fake.TORCH_CUDA, fake.CUDA_ARCHS = "2.3.0", None, ""
        sys.modules["xent_ext._build_info"] = fake
        try:
            import xent_ext
        except ImportError as e:
            print(e)
            print("_C loaded:", "xent_ext._C" in sys.modules)
        else:
            print("imported")
    """)
    out = proc.stdout
    assert "built against torch 2.3.0" in out, out + proc.stderr
    assert f"torch {torch.__version__}" in out and "is running" in out
    assert "pip install --no-build-isolation --no-deps -e" in out and "make build" in out
    assert "_C loaded: False" in out


def test_import_with_the_torch_it_was_built_against():
    proc = _python("import xent_ext; print(xent_ext.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == xent_ext.__version__


def test_python_m_xent_ext_says_what_is_in_use():
    proc = subprocess.run([sys.executable, "-m", "xent_ext"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    facts = {k: v.strip() for k, v in facts.items()}
    assert facts["xent_ext"] == xent_ext.__version__
    assert facts["torch running"].startswith(torch.__version__)
    assert facts["CPU instruction set"].startswith(xent_ext.cpu_isa())
    assert facts["CPU threads"].startswith(str(torch.get_num_threads()))
    assert facts["CUDA kernels compiled in"].startswith("yes" if xent_ext.has_cuda() else "no")
    assert facts["CUDA device usable"].startswith("yes" if xent_ext.cuda_available() else "no")
    for key in ("torch built against", "python"):
        assert facts[key]


def test_has_cuda_means_compiled_in():
    assert xent_ext.has_cuda() == bool(xent_ext._C.has_cuda())
    assert xent_ext.cuda_available() == (xent_ext.has_cuda() and torch.cuda.is_available())
    assert "compiled" in xent_ext.has_cuda.__doc__
