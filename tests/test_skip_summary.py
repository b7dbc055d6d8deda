"""The run ends with one line per reason tests were skipped (tests/skip_summary.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_line_per_skip_reason(tmp_path):
    (tmp_path / "test_some.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.skipif(True, reason="no CUDA device")
        @pytest.mark.parametrize("i", range(3))
        def test_marked(i):
            pass

        def test_called():
            pytest.skip("no cuobjdump")

        def test_runs():
            pass
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keeps the project's settings out
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.skip_summary", "-p",
         "no:cacheprovider", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "skipped tests, by reason" in line)
    assert lines[start + 1:start + 3] == ["3 skipped: no CUDA device", "1 skipped: no cuobjdump"]
    assert "1 passed, 4 skipped" in lines[-1]
