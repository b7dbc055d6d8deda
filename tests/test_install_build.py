"""The build side of an install: without torch the build stops and says what to run; a build
records the torch it was compiled against, which the import-time check reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# setup.py run as pip's isolated build would run it: no torch importable.
_NO_TORCH = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = ["setup.py", "build_ext", "--inplace"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_build_without_torch_says_what_to_run():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    message = proc.stderr
    assert "building needs PyTorch" in message, message
    assert "pip install torch" in message
    assert "pip install --no-build-isolation ." in message


def test_the_build_records_its_torch():
    from xent_ext import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    from xent_ext import _capabilities

    assert _capabilities.about()["torch built against"].startswith(torch.__version__)
