"""The examples run, on small settings, and show what they claim: the same losses with and
without xent_ext.  Each is loaded from its file and its main() called with command-line
arguments, as `python examples/NAME.py ARGS` would."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, capsys, *args: str) -> tuple[dict, str]:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(list(args))
    return results, capsys.readouterr().out


def _largest_difference(out: str) -> float:
    return float(re.search(r"largest loss difference over \d+ steps: (\S+)", out).group(1))


def test_digits_classifier(capsys):
    pytest.importorskip("sklearn")
    results, out = run_example("digits_classifier.py", capsys, "--epochs", "3")
    assert set(results) == {"xent_ext", "torch"}
    assert results["xent_ext"][1] > 0.85  # test accuracy: it learns (chance is 0.1)
    assert re.search(r"^xent_ext .*test accuracy", out, re.M)
    assert _largest_difference(out) < 1e-4


def test_tiny_causal_lm(capsys):
    pytest.importorskip("transformers")
    _, out = run_example("tiny_causal_lm.py", capsys, "--steps", "4", "--seq", "64", "--batch",
                         "2", "--hidden", "32", "--layers", "1", "--in-process")
    rows = re.findall(r"^(transformers|xent_ext) +loss (\S+) -> (\S+) +step +(\S+) ms +memory "
                      r"added +(\S+) MiB", out, re.M)
    assert [r[0] for r in rows] == ["transformers", "xent_ext"], out
    assert float(rows[0][2]) < float(rows[0][1])  # the loss goes down
    assert _largest_difference(out) < 1e-3


def test_tiny_causal_lm_one_configuration_as_json(capsys):
    """What the script's child processes print (the default runs each configuration in one)."""
    pytest.importorskip("transformers")
    _, out = run_example("tiny_causal_lm.py", capsys, "--steps", "2", "--seq", "32", "--batch",
                         "1", "--hidden", "32", "--layers", "1", "--only", "xent_ext")
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["losses"]) == 2 and result["step_s"] > 0
