"""pytest plugin: one line per reason a test was skipped, after the run, e.g.

    ================= skipped tests, by reason =================
    361 skipped: needs a CUDA device
      2 skipped: xent_ext was built without CUDA (...)

pytest shows skip reasons only with -rs, then once per test location. Loaded by
tests/conftest.py; `-p tests.skip_summary` loads it into any pytest run.
"""

from __future__ import annotations

from collections import Counter


def skip_reason(report) -> str:
    """The reason of a skipped report: longrepr is (path, line, 'Skipped: reason') for a
    pytest.skip() call, (path, line, 'reason') for a skip/skipif mark."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ").strip() or "no reason given"


def pytest_terminal_summary(terminalreporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts = Counter(skip_reason(r) for r in skipped)
    width = len(str(max(counts.values())))
    terminalreporter.write_sep("=", "skipped tests, by reason")
    for reason, n in counts.most_common():
        terminalreporter.write_line(f"{n:>{width}} skipped: {reason}")
