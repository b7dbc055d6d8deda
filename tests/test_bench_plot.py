"""The bench plot: categorical shapes as groups of bars (no line joins them), the copy floor
over each group, eager named as F.cross_entropy, where and when in the title."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from bench import plot, report  # noqa: E402
from bench.runner import Cell  # noqa: E402

SHAPES = [(65536, 10, 1), (4096, 32000, 1), (16, 21, 4096)]
IMPLS = {"xent_ext": 1.5, "eager": 6.0, "compile": 3.0}  # median ms in fwd (x2 in fwd+bwd)
META = {"device": "cpu", "device_name": "Test CPU 9000", "threads": 2, "loadavg_1min": 0.25,
        "torch_version": "2.14.1", "date": "2026-12-01T10:00:00+00:00", "git": "abc1234"}


def _cells() -> list[Cell]:
    cells = []
    for n, v, s in SHAPES:
        for dtype in ("float32", "bfloat16"):
            cells.append(Cell(n, v, dtype, "copy", "copy", median_ms=1.0, s=s))
            for mode in ("fwd", "fwdbwd"):
                for impl, ms in IMPLS.items():
                    cells.append(Cell(n, v, dtype, mode, impl, s=s,
                                      median_ms=ms * (2 if mode == "fwdbwd" else 1)))
    report.derive(cells)
    return cells


def test_grouped_bars_and_copy_floor():
    fig = plot.figure(_cells(), META)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert sorted(ax.get_title() for ax in panels) == sorted(
        f"{m} {d}" for m in ("fwd", "fwd+bwd") for d in ("float32", "bfloat16"))
    for ax in panels:
        assert not ax.lines, "shapes are categories: no line may join them"
        assert len(ax.patches) == len(SHAPES) * len(IMPLS)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["65536x10", "16x21x4096",
                                                               "4096x32000"]
        floors = [seg[0][1] for coll in ax.collections for seg in coll.get_segments()]
        # fwd reads the logits once: half the copy's time; fwd+bwd: the whole copy.
        expected = 0.5 if ax.get_title().startswith("fwd ") else 1.0
        assert floors == [expected] * len(SHAPES)
        assert [t.get_text() for t in ax.texts] == ["4.0x"] * len(SHAPES)  # 6 / 1.5
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "F.cross_entropy (eager)" in legend and "torch.compile(F.cross_entropy)" in legend
    assert any(t.startswith("copy floor") for t in legend)
    title = fig._suptitle.get_text()
    for part in ("Test CPU 9000", "2 threads", "load 0.25", "2026-12-01", "torch 2.14.1",
                 "abc1234"):
        assert part in title


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "out" / "bench.png"
    plot.plot(_cells(), path, META)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_eager_no_speedups_and_still_a_plot():
    cells = [c for c in _cells() if c.impl != "eager"]
    for c in cells:
        c.vs_eager = None
    fig = plot.figure(cells, META)
    assert all(not ax.texts for ax in fig.axes)
    assert fig.legends[0].get_title().get_text() == ""
