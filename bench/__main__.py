"""python -m bench: command line of the benchmark (see bench/README.md)."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from . import cases, impls, linear, meta, plot, report, runner


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time xent_ext.cross_entropy against F.cross_entropy and its peers.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="two shapes, one dtype, short time budget (a smoke run)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                   help="folder for the JSON and PNG (default: bench/results)")
    p.add_argument("--dtypes", help="comma list, e.g. float32,bfloat16 (default: per device)")
    p.add_argument("--shapes", help="comma list of NxV, e.g. 4096x32000,1024x128256")
    p.add_argument("--modes", default="fwd,fwdbwd",
                   help="comma list of fwd, fwdbwd; or linear alone (a language-model head's "
                        "loss from hidden states: --shapes NxHxV)")
    p.add_argument("--reps", type=int,
                   help="--modes linear: timed reps per cell (default: 2 on CPU, 10 on CUDA, "
                        "1 with --quick)")
    p.add_argument("--impls", help=f"comma list among {', '.join(impls.IMPLS)} (default: all)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's own, torch.get_num_threads())")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.modes.strip() == "linear":
        return _main_linear(parser, args, device)
    try:
        shapes = cases.parse_shapes(args.shapes) if args.shapes else None
        dtypes = cases.parse_dtypes(args.dtypes) if args.dtypes else None
        names = impls.parse_impls(args.impls)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in cases.MODES]
        if bad or not modes:
            raise ValueError(f"bad --modes {args.modes!r}: choose from {', '.join(cases.MODES)}")
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    groups = cases.plan(device, args.quick, shapes, dtypes)
    budget = cases.BUDGETS[(device, args.quick)]
    info = meta.collect(device)
    print(f"device {device}: {info['device_name']}; torch {info['torch_version']}; "
          f"torch.get_num_threads() = {info['threads']}", flush=True)
    print(f"{len(groups)} shape/dtype groups x modes {modes} x implementations {names}; "
          f"about {budget.seconds} s of reps per cell", flush=True)
    load = info["loadavg_1min"]
    if device == "cpu" and info["threads"] > 1 and load is not None and load > 0.5:
        # Seen on small shared machines: when another process holds a core, every parallel
        # region waits for a descheduled thread, and short calls read as a scheduler tick.
        print(f"warning: load average {load:.2f} before starting; with {info['threads']} "
              "threads, timings include waits for descheduled threads (try --threads 1)",
              flush=True)

    result = runner.run(groups, modes, names, device, budget, progress=not args.no_progress)
    report.derive(result.cells)
    report.print_tables(result, info)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{device}-{stamp}.json"
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    run_args["budget"] = vars(budget)
    report.write_json(json_path, result, info, run_args)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png_path = json_path.with_suffix(".png")
        try:
            plot.plot(result.cells, png_path, info)
            print(f"wrote {png_path}")
        except Exception as e:  # a plotting problem must not lose the measured numbers
            print(f"plot failed ({type(e).__name__}: {e}); numbers are in the JSON",
                  file=sys.stderr)
    return 0


def _main_linear(parser: argparse.ArgumentParser, args, device: str) -> int:
    """--modes linear: hidden states -> loss through the head (bench/linear.py)."""
    from .linear_impls import LINEAR_IMPLS

    try:
        shapes = (linear.parse_shapes(args.shapes) if args.shapes
                  else linear.default_shapes(device, args.quick))
        dtypes = (cases.parse_dtypes(args.dtypes) if args.dtypes
                  else linear.default_dtypes(device, args.quick))
        names = list(LINEAR_IMPLS)
        if args.impls:
            wanted = [w.strip() for w in args.impls.split(",") if w.strip()]
            unknown = [w for w in wanted if w not in LINEAR_IMPLS]
            if unknown:
                raise ValueError(f"unknown implementation(s) {unknown} for --modes linear: "
                                 f"choose from {names}")
            names = [n for n in names if n in wanted]
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 10 if device == "cuda" else 2)
    info = meta.collect(device)
    print(f"device {device}: {info['device_name']}; torch {info['torch_version']}; "
          f"torch.get_num_threads() = {info['threads']}; load {info['loadavg_1min']}",
          flush=True)
    cells = linear.run(device, shapes, dtypes, names, reps)
    linear.print_table(cells)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-linear-{device}-{stamp}.json"
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    linear.write_json(json_path, cells, info, run_args)
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
