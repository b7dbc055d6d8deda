"""The loop over every cell: group (N, V, dtype) x mode x implementation.

Per group: make the inputs (rotated copies, fixed seeds), time the copy baseline, compute the
reference loss and gradient with eager F.cross_entropy, then for each mode and implementation
make one checked call (a wrong result is reported as 'invalid' and never timed), time it, and
measure its peak memory.  A failure in one cell is recorded and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .cases import Budget, Group
from .impls import IMPLS, LossFn, Unavailable
from .memory import peak_bytes
from .timing import measure, rotation_count, sync

# Loose tolerances against eager (relative to the loss, and to the largest gradient entry):
# they catch a broken kernel, not rounding differences between correct ones (eager rounds
# half-precision log-probabilities before reducing them, xent_ext does not).
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 3e-2}


@dataclass
class Cell:
    n: int
    v: int
    dtype: str
    mode: str  # 'fwd', 'fwdbwd', or 'copy' for the baseline row
    impl: str
    status: str = "ok"  # ok | error | invalid | skipped
    message: str = ""
    copies: int = 1
    median_ms: float | None = None
    min_ms: float | None = None
    reps: int = 0
    times_ms: list[float] = field(default_factory=list)
    first_call_s: float | None = None  # includes compilation for torch.compile
    peak_bytes: int | None = None
    loss_err: float | None = None
    grad_err: float | None = None
    # Filled by report.derive:
    gbps: float | None = None
    pct_copy: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    s: int = 1  # K-dim inputs: positions per sample (logits (n, v, s))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    cells: list[Cell]
    skipped: dict[str, str]  # implementation -> why it did not run on this device


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def _make_inputs(g: Group, device: str, copies: int) -> tuple[list[Tensor], list[Tensor]]:
    """Standard-normal logits and uniform targets; copy i always has seed i, so regenerating
    gives the same data (the reference stays valid after an implementation that mutates)."""
    xs, ts = [], []
    for i in range(copies):
        gen = torch.Generator(device=device).manual_seed(1000 + i)
        spatial = (g.s,) if g.s > 1 else ()
        xs.append(torch.randn(g.n, g.v, *spatial, dtype=g.dtype, device=device, generator=gen))
        ts.append(torch.randint(0, g.v, (g.n, *spatial), device=device, generator=gen))
    return xs, ts


def _max_rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|, in row chunks so a large gradient needs no full-size temporaries."""
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    rows = max(1, (1 << 24) // max(1, b2.shape[1]))
    diff = scale = 0.0
    for s in range(0, b2.shape[0], rows):
        ca, cb = a2[s:s + rows].to(acc), b2[s:s + rows].to(acc)
        diff = max(diff, (ca - cb).abs().max().item())
        scale = max(scale, cb.abs().max().item())
    return diff / scale if scale > 0 else diff


def _copy_cell(g: Group, xs: list[Tensor], device: str, budget: Budget) -> Cell:
    """out.copy_(x): the bandwidth a pass over the logits can hope for (read + write)."""
    cell = Cell(g.n, g.v, g.dtype_name, "copy", "copy", copies=len(xs), s=g.s)
    try:
        outs = [torch.empty_like(x) for x in xs]
        for out, x in zip(outs, xs, strict=True):  # touched once: the reps time the copy, not
            out.copy_(x)  # the page faults of fresh memory
        sync(device)
        t = measure(lambda i: outs[i].copy_(xs[i]), len(xs), device, budget)
        cell.median_ms, cell.min_ms, cell.reps, cell.times_ms = (t.median_ms, t.min_ms, t.reps,
                                                                 t.times_ms)
    except Exception as e:
        cell.status, cell.message = "error", _error_text(e)
    return cell


def _timed_cell(name: str, fn: LossFn, g: Group, mode: str, xs: list[Tensor],
                ts: list[Tensor], ref: tuple[float, Tensor], device: str,
                budget: Budget) -> Cell:
    cell = Cell(g.n, g.v, g.dtype_name, mode, name, copies=len(xs), s=g.s)
    need_grad = mode == "fwdbwd"
    for x in xs:
        x.grad = None
        x.requires_grad_(need_grad)

    def step(i: int) -> None:
        if need_grad:
            # A fresh gradient each rep, as in training (no accumulation), and only one alive
            # at a time: the previous rep's is released first, so its memory can be reused as
            # a training step reuses the last step's (else every rep pays for fresh pages).
            xs[(i - 1) % len(xs)].grad = None
            xs[i].grad = None
            fn(xs[i], ts[i]).backward()
        else:
            fn(xs[i], ts[i])

    try:
        # First call: compilation / lazy set-up, and the result is checked before any timing.
        t0 = time.perf_counter()
        loss = fn(xs[0], ts[0])
        if need_grad:
            loss.backward()
        sync(device)
        cell.first_call_s = time.perf_counter() - t0
        ref_loss, ref_grad = ref
        cell.loss_err = abs(float(loss.detach().float()) - ref_loss) / max(abs(ref_loss), 1e-12)
        if need_grad:
            got = xs[0].grad
            cell.grad_err = float("inf") if got is None else _max_rel_diff(got, ref_grad)
        tol = TOLERANCE[g.dtype]
        # `not <=` so that NaN counts as a failure.
        if not cell.loss_err <= tol or (need_grad and not cell.grad_err <= tol):
            cell.status = "invalid"
            cell.message = (f"differs from eager: loss rel err {cell.loss_err:.2e}"
                            + (f", grad rel err {cell.grad_err:.2e}" if need_grad else "")
                            + f" (tolerance {tol:.0e})")
            return cell
        del loss
        t = measure(step, len(xs), device, budget)
        cell.median_ms, cell.min_ms, cell.reps, cell.times_ms = (t.median_ms, t.min_ms, t.reps,
                                                                 t.times_ms)
        xs[0].grad = None  # so the measured peak starts without a previous gradient
        cell.peak_bytes = peak_bytes(lambda: step(0), device)
    except Unavailable as e:  # this implementation cannot take this input (a K-dim one)
        cell.status, cell.message = "skipped", str(e)
    except Exception as e:
        cell.status, cell.message = "error", _error_text(e)
    finally:
        for x in xs:
            x.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return cell


def _reference(x: Tensor, t: Tensor) -> tuple[float, Tensor]:
    """Eager F.cross_entropy's loss and gradient on the first input copy."""
    x.requires_grad_(True)
    loss = F.cross_entropy(x, t)
    loss.backward()
    grad, x.grad = x.grad, None
    x.requires_grad_(False)
    return float(loss.detach().float()), grad


def run(groups: list[Group], modes: list[str], names: list[str], device: str,
        budget: Budget, progress: bool = True) -> RunResult:
    skipped: dict[str, str] = {}
    for name in names:  # availability probe, so the progress bar counts only what runs
        try:
            IMPLS[name].make(device)
        except Unavailable as e:
            skipped[name] = str(e)
        except Exception as e:
            skipped[name] = f"set-up failed: {_error_text(e)}"
    active = [n for n in names if n not in skipped]
    cells: list[Cell] = []
    total = len(groups) * (1 + len(modes) * len(active))
    with tqdm(total=total, unit="cell", dynamic_ncols=True, disable=not progress) as bar:
        for g in groups:
            bar.set_postfix_str(f"{g.shape_label} {g.dtype_name} copy")
            cells.extend(_run_group(g, modes, active, device, budget, bar))
    return RunResult(cells, skipped)


def _log(cell: Cell, bar: tqdm) -> None:
    """Without a progress bar (logs, batch jobs), one line per finished cell, so a run cut
    short still leaves its numbers behind."""
    if not bar.disable:
        return
    shape = f"{cell.n}x{cell.v}" + (f"x{cell.s}" if cell.s > 1 else "")
    what = f"{cell.median_ms:.4f} ms median" if cell.median_ms is not None else cell.message
    print(f"{shape} {cell.dtype} {cell.mode} {cell.impl}: {cell.status}, {what}", flush=True)


def _run_group(g: Group, modes: list[str], names: list[str], device: str, budget: Budget,
               bar: tqdm) -> list[Cell]:
    out: list[Cell] = []
    # Each copy holds the logits and the copy baseline's output.
    copies = rotation_count(g.nbytes, 2 * g.nbytes, device)
    try:
        xs, ts = _make_inputs(g, device, copies)
        ref = _reference(xs[0], ts[0])
    except Exception as e:  # typically out of memory: every cell of the group reports it
        msg = _error_text(e)
        for impl, mode in [("copy", "copy")] + [(n, m) for m in modes for n in names]:
            out.append(Cell(g.n, g.v, g.dtype_name, mode, impl, status="error", message=msg,
                            s=g.s))
        bar.update(1 + len(modes) * len(names))
        return out
    out.append(_copy_cell(g, xs, device, budget))
    _log(out[-1], bar)
    bar.update(1)

    fns: dict[str, LossFn | str] = {}
    for name in names:
        try:
            fns[name] = IMPLS[name].make(device)
        except Exception as e:
            fns[name] = _error_text(e)
    for mode in modes:
        for name in names:
            bar.set_postfix_str(f"{g.shape_label} {g.dtype_name} {mode} {name}")
            fn = fns[name]
            if isinstance(fn, str):
                cell = Cell(g.n, g.v, g.dtype_name, mode, name, status="error", message=fn,
                            s=g.s)
            else:
                cell = _timed_cell(name, fn, g, mode, xs, ts, ref, device, budget)
                if IMPLS[name].mutates_input:
                    xs, ts = _make_inputs(g, device, copies)
            out.append(cell)
            _log(cell, bar)
            bar.update(1)
    del xs, ts, ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
