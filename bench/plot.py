"""PNG of the results: one panel per mode x dtype; in each, one group of bars per shape (the
shapes are categories, not points on a scale), one bar per implementation.

Bars are median ms on a log axis (lower is better). The dashed line over each group is the
copy floor: the time the logits' bytes take at the bandwidth of out.copy_(logits) measured in
the same run (fwd reads N*V*itemsize: half a copy's time; fwd+bwd also writes the gradient: a
whole copy), the `% copy` column's 100%. Above each xent_ext bar, its speedup over eager
F.cross_entropy. The title says where and when: machine, threads, load, torch, date, commit.
"""

from __future__ import annotations

from pathlib import Path

from .cases import shape_label
from .impls import COMPILE, EAGER
from .runner import Cell

# What each row is, in the legend (bench/README.md has the same table).
LABELS = {
    "xent_ext": "xent_ext",
    "xent_ext (inplace)": "xent_ext, inplace_backward",
    EAGER: "F.cross_entropy (eager)",
    COMPILE: "torch.compile(F.cross_entropy)",
    "naive": "log(softmax) + gather",
    "liger": "Liger-Kernel",
    "quack": "quack",
}
ANNOTATED = "xent_ext"  # the row whose speedup over eager is written above its bars


def title(meta: dict) -> str:
    load = meta.get("loadavg_1min")
    where = [meta.get("device_name", "?")]
    if meta.get("device") == "cpu":
        where.append(f"{meta.get('threads', '?')} threads"
                     + ("" if load is None else f", load {load:.2f} at start"))
    when = [f"torch {meta.get('torch_version', '?')}", str(meta.get("date", "?"))]
    if meta.get("git"):
        when.append(f"git {meta['git']}")
    return "cross-entropy: " + "; ".join(where) + "\n" + ", ".join(when)


def copy_floor_ms(copy: Cell | None, mode: str) -> float | None:
    if copy is None or copy.status != "ok" or not copy.median_ms:
        return None
    return copy.median_ms / 2 if mode == "fwd" else copy.median_ms


def figure(cells: list[Cell], meta: dict):
    """The matplotlib figure, or None when no cell has a time."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")  # 0.5, 2, 10 rather than 5x10^-1
    # Minor ticks: label only 2, 3 and 5 times a power of ten, so labels do not collide.
    sparse = FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else "")

    rows = [c for c in cells if c.mode != "copy" and c.status == "ok" and c.median_ms]
    if not rows:
        return None
    copies = {(c.n, c.v, c.s, c.dtype): c for c in cells if c.mode == "copy"}
    modes = [m for m in ("fwd", "fwdbwd") if any(c.mode == m for c in rows)]
    dtypes = list(dict.fromkeys(c.dtype for c in rows))
    impls = list(dict.fromkeys(c.impl for c in rows))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    n_shapes = max(len({(c.v, c.n, c.s) for c in rows if c.dtype == d}) for d in dtypes)
    width = 0.8 / len(impls)
    fig_width = max(7.0, (0.45 * len(impls) * n_shapes + 1.5) * len(dtypes))
    fig, axes = plt.subplots(len(modes), len(dtypes), squeeze=False,
                             figsize=(fig_width, 3.8 * len(modes) + 1.6))
    handles: dict[str, object] = {}
    annotated = False
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            panel = [c for c in rows if c.mode == mode and c.dtype == dtype]
            shapes = sorted({(c.v, c.n, c.s) for c in panel})  # several shapes share a V
            for k, impl in enumerate(impls):
                by_shape = {(c.v, c.n, c.s): c for c in panel if c.impl == impl}
                for x, shape in enumerate(shapes):
                    cell = by_shape.get(shape)
                    if cell is None:
                        continue
                    pos = x - 0.4 + (k + 0.5) * width
                    bar = ax.bar(pos, cell.median_ms, width, color=colors[impl])
                    handles.setdefault(LABELS.get(impl, impl), bar)
                    if impl == ANNOTATED and cell.vs_eager is not None:
                        ax.text(pos, cell.median_ms * 1.08, f"{cell.vs_eager:.1f}x",
                                ha="center", va="bottom", fontsize=7, rotation=90)
                        annotated = True
            for x, (v, n, s) in enumerate(shapes):
                floor = copy_floor_ms(copies.get((n, v, s, dtype)), mode)
                if floor is not None:
                    line = ax.hlines(floor, x - 0.45, x + 0.45, colors="black",
                                     linestyles="--", linewidth=1.2)
                    handles.setdefault("copy floor (the logits at copy bandwidth)", line)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([shape_label(n, v, sp) for v, n, sp in shapes], rotation=30,
                               ha="right", fontsize=8)
            ax.set_xlim(-0.6, len(shapes) - 0.4)
            ax.set_yscale("log")
            ax.margins(y=0.15)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.set_title(f"{'fwd+bwd' if mode == 'fwdbwd' else 'fwd'} {dtype}", fontsize=10)
            ax.set_ylabel("median ms (log, lower is better)", fontsize=9)
            ax.grid(True, axis="y", which="both", alpha=0.3)
    note = (f"numbers above the {ANNOTATED} bars: speedup over F.cross_entropy" if annotated
            else None)
    ncol = max(1, min(len(handles), int(fig_width // 3.2)))  # entries up to ~3 inches wide
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol,
               fontsize=8, frameon=False, title=note, title_fontsize=8)
    fig.suptitle(title(meta), fontsize=10)
    legend_rows = -(-len(handles) // ncol) + (note is not None)
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.1) / fig.get_figheight(), 1, 1))
    return fig


def plot(cells: list[Cell], path: Path, meta: dict) -> None:
    fig = figure(cells, meta)
    if fig is None:
        return
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
