"""The examples run as scripts, on small settings, and show what they claim: the same losses
with and without xent_ext."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's xent_ext, not another
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _largest_difference(out: str) -> float:
    return float(re.search(r"largest loss difference over \d+ steps: (\S+)", out).group(1))


def test_digits_classifier():
    pytest.importorskip("sklearn")
    out = run_example("digits_classifier.py", "--epochs", "3")
    accuracy = {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(\S+) .*test accuracy (\S+)", out, re.M)}
    assert set(accuracy) == {"xent_ext", "torch"}
    assert accuracy["xent_ext"] > 0.85  # it learns: 10 classes, chance is 0.1
    assert _largest_difference(out) < 1e-4


def test_tiny_causal_lm():
    pytest.importorskip("transformers")
    out = run_example("tiny_causal_lm.py", "--steps", "4", "--seq", "64", "--batch", "2",
                      "--hidden", "32", "--layers", "1")
    rows = re.findall(r"^(transformers|xent_ext) +loss (\S+) -> (\S+) +step +(\S+) ms +memory "
                      r"added +(\S+) MiB", out, re.M)
    assert [r[0] for r in rows] == ["transformers", "xent_ext"], out
    assert float(rows[0][2]) < float(rows[0][1])  # the loss goes down
    assert _largest_difference(out) < 1e-3
