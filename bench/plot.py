"""PNG of the results: speedup over eager per implementation, one panel per mode x dtype.

The x axis is categorical (shapes sorted by V, then N) because several shapes share a V.
Without an eager row (filtered out with --impls), the panels show median ms instead.
"""

from __future__ import annotations

import math
from pathlib import Path

from .cases import shape_label
from .runner import Cell


def plot(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")  # 0.5, 2, 10 rather than 5x10^-1
    # Minor ticks: label only 2, 3 and 5 times a power of ten, so labels do not collide.
    sparse = FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else "")

    rows = [c for c in cells if c.mode != "copy" and c.status == "ok" and c.median_ms]
    if not rows:
        return
    use_speedup = any(c.vs_eager is not None for c in rows)
    modes = [m for m in ("fwd", "fwdbwd") if any(c.mode == m for c in rows)]
    dtypes = list(dict.fromkeys(c.dtype for c in rows))
    impls = list(dict.fromkeys(c.impl for c in rows))
    fig, axes = plt.subplots(len(modes), len(dtypes), squeeze=False,
                             figsize=(4.5 * len(dtypes) + 1, 3.6 * len(modes) + 0.6))
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            panel = [c for c in rows if c.mode == mode and c.dtype == dtype]
            shapes = sorted({(c.v, c.n, c.s) for c in panel})
            for impl in impls:
                by_shape = {(c.v, c.n, c.s): c for c in panel if c.impl == impl}
                ys = [_value(by_shape.get(s), use_speedup) for s in shapes]
                if any(not math.isnan(y) for y in ys):
                    ax.plot(range(len(shapes)), ys, marker="o", label=impl)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([shape_label(n, v, sp) for v, n, sp in shapes], rotation=30,
                               ha="right",
                               fontsize=8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            if use_speedup:
                ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{'fwd+bwd' if mode == 'fwdbwd' else 'fwd'} {dtype}", fontsize=10)
            ax.set_ylabel("speedup vs eager (x)" if use_speedup else "median ms")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value(cell: Cell | None, use_speedup: bool) -> float:
    if cell is None:
        return math.nan
    value = cell.vs_eager if use_speedup else cell.median_ms
    return math.nan if value is None else value
