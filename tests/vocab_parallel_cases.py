"""Cases run inside each rank of a spawned gloo group (see vocab_parallel_support.py).

Every rank builds the same global logits from a shared seed, keeps its slice of the classes,
and compares xent_ext.distributed.vocab_parallel_cross_entropy (loss, lse, z-loss term and its
slice of the gradient) with the loss of the whole logits in float64: F.cross_entropy for
torch's options, xent_ext's ATen composite (the same loss in ATen operations, itself checked
against F.cross_entropy) where softcap, logit_scale or z_loss enter.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                "reduce_scatter_tensor", "all_to_all_single", "reduce", "gather", "scatter",
                "barrier", "all_gather_object", "broadcast_object_list")
CALLS: list[str] = []


def count_collectives() -> None:
    """Every torch.distributed collective call is logged into CALLS (by name)."""
    for name in _COLLECTIVES:
        orig = getattr(dist, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            CALLS.append(_name)
            return _orig(*a, **k)

        setattr(dist, name, wrapped)


def reference(x, t, weight, reduction, ignore_index, eps, z_loss, softcap, scale):
    """(loss, lse, z term, grad) of the full logits (..., C) in float64."""
    from xent_ext import _composite

    x = x.detach().double().requires_grad_()
    c = x.shape[-1]
    x3 = x.reshape(-1, c, 1)
    t3 = t.reshape(-1, 1)
    w = weight.double() if weight is not None else None
    red = {"none": 0, "mean": 1, "sum": 2}[reduction]
    if softcap is None and scale == 1.0 and z_loss == 0.0:
        loss = F.cross_entropy(x.reshape(-1, c), t.reshape(-1), weight=w,
                               ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps)
    else:
        loss, _ = _composite.cross_entropy(x3, t3, w, red, ignore_index, eps, scale,
                                           softcap or 0.0, z_loss)
    loss = loss.reshape(-1) if reduction == "none" else loss
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(
        loss.shape) if reduction == "none" else torch.tensor(0.75, dtype=torch.float64))
    y = x.detach().reshape(-1, c) * scale
    if softcap:
        y = torch.where(x.detach().reshape(-1, c) == -torch.inf, -torch.inf,
                        softcap * torch.tanh(y / softcap))
    # xent_ext's lse of a row with a +inf logit is NaN (as its log-probabilities), where
    # torch.logsumexp says inf.
    lse = torch.logsumexp(y, dim=1)
    lse = torch.where((y == torch.inf).any(1), torch.nan, lse)
    return loss.detach(), lse, x.grad


def make_case(seed, n, sizes, dtype, targets="random", ignore_some=True, extreme=None):
    g = torch.Generator().manual_seed(seed)
    c = sum(sizes)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    if extreme == "big":
        x = x + 1e4
    elif extreme == "huge":
        x = x * 1e-3 + 1e30 if dtype == torch.float64 else x + 1e4
    elif extreme == "masked":
        x[:, ::3] = -torch.inf
    elif extreme == "nan":  # NaN, +inf and all -inf rows, on one rank or another
        x[0, -1] = torch.nan
        x[2, 0] = torch.inf
        x[3, :] = -torch.inf
        x[4, : sizes[0]] = -torch.inf
    x = x.to(dtype)
    if targets == "first":  # every target in the first shard: other ranks hold none
        t = torch.randint(0, sizes[0], (n,), generator=g)
    else:
        t = torch.randint(0, c, (n,), generator=g)
    if extreme == "masked":
        t = (t // 3) * 3 + 1
        t = torch.where(t < c, t, torch.ones_like(t))
    if ignore_some and n > 1:
        t[1] = -100
    if targets == "ignored":
        t[:] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return x, t, w


def check_case(rank, world, sizes, dtype, opts, case_kw, weight_mode=None, explicit=False,
               shape3=False, seed=0):
    import xent_ext.distributed as xd

    n = case_kw.pop("n", 7)
    x, t, w = make_case(seed, n, sizes, dtype, **case_kw)
    start = sum(sizes[:rank])
    v = sizes[rank]
    local = x[:, start:start + v].clone()
    weight = None
    if weight_mode == "full":
        weight = w
    elif weight_mode == "local":
        weight = w[start:start + v].clone()
    red = opts.get("reduction", "mean")
    ref_loss, ref_lse, ref_grad = reference(
        x, t, w if weight_mode else None, red, -100, opts.get("label_smoothing", 0.0),
        opts.get("z_loss", 0.0), opts.get("softcap"), opts.get("logit_scale", 1.0))
    xin = local
    tin = t
    if shape3:  # (B, T, V_local) logits with (B, T) targets
        xin = local.reshape(1, n, v)
        tin = t.reshape(1, n)
    xin = xin.detach().requires_grad_()
    inplace = opts.get("inplace_backward", False)
    leaf = xin
    if inplace:
        xin = xin * 1  # a layer's output, not a leaf
    kw = dict(opts)
    kw.pop("reduction", None)
    CALLS.clear()
    out = xd.vocab_parallel_cross_entropy(xin, tin, reduction=red, weight=weight,
                                          vocab_start=start if explicit else None,
                                          return_lse=True, return_z_loss=True, **kw)
    fwd_calls = list(CALLS)
    loss, zterm, lse = out
    gl = (torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
          if red == "none" else torch.tensor(0.75, dtype=torch.float64))
    CALLS.clear()
    loss.backward(gl.to(loss.dtype))
    bwd_calls = list(CALLS)
    grad = leaf.grad.reshape(n, v).double()
    tol = TOL[dtype]
    msgs = []
    tag = f"rank {rank} sizes={sizes} {dtype} {opts} {case_kw} w={weight_mode} exp={explicit}"
    if fwd_calls.count("all_reduce") != 2 or len(fwd_calls) > 3:
        msgs.append(f"{tag}: forward collectives {fwd_calls}")
    if bwd_calls:
        msgs.append(f"{tag}: backward collectives {bwd_calls}")
    if lse.dtype != (torch.float64 if dtype == torch.float64 else torch.float32):
        msgs.append(f"{tag}: lse dtype {lse.dtype}")
    if loss.dtype != dtype:
        msgs.append(f"{tag}: loss dtype {loss.dtype}")

    def close(name, got, want, scale_ref):
        got = got.double().reshape(want.shape)
        bad = ~((got - want).abs() <= tol * (1 + scale_ref)) & ~(got.isnan() & want.isnan())
        bad = bad & ~(got == want)  # equal infinities
        if bad.any():
            err = (got - want).abs()[bad].max().item()
            msgs.append(f"{tag}: {name} off by {err} (got {got.flatten()[:4].tolist()}, "
                        f"want {want.flatten()[:4].tolist()})")

    close("loss", loss.detach(), ref_loss, ref_loss.abs().nan_to_num(0).max().item())
    close("lse", lse.reshape(-1), ref_lse, ref_lse.abs().nan_to_num(0, 0, 0).max().item()
          * (0 if dtype == torch.float64 else 1))
    close("grad", grad, ref_grad[:, start:start + v],
          ref_grad.abs().nan_to_num(0, 0, 0).max().item())
    return msgs


OPTION_SETS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"logit_scale": 0.7},
    {"inplace_backward": True},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0, "logit_scale": 1.3},
    {"reduction": "none", "label_smoothing": 0.3, "z_loss": 1e-3, "inplace_backward": True},
    {"reduction": "sum", "label_smoothing": 0.1, "softcap": 3.0},
]


def run_cases(rank, world, sizes):
    """Every option alone and combined, weights full and local, uneven shards, explicit
    vocab_start, a rank without targets, all rows ignored, extremes, every dtype."""
    count_collectives()
    msgs = []
    seed = 0
    # The whole grid of options x weights on two ranks; a third of it on more (the shards'
    # layouts are what differs there), to keep the spawned groups short.
    full = world == 2
    for i, (opts, weight_mode) in enumerate(itertools.product(OPTION_SETS,
                                                              [None, "full", "local"])):
        if not full and (i + i // 3) % 3:  # each option set once, the weights rotating
            continue
        seed += 1
        msgs += check_case(rank, world, sizes, torch.float64, opts, {}, weight_mode,
                           explicit=seed % 2 == 0, shape3=seed % 3 == 0, seed=seed)
    for case_kw in ({"targets": "first"}, {"targets": "ignored"}, {"extreme": "big"},
                    {"extreme": "huge"}, {"extreme": "masked"}, {"extreme": "nan"},
                    {"n": 1, "ignore_some": False}):
        for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                     {"reduction": "none", "softcap": 3.0}):
            if case_kw.get("extreme") == "huge" and "z_loss" in opts:
                # At 1e30 the float64 reference's lse loses log(sum) (it holds 1e30 + 2.4 as
                # 1e30), so its z-loss gradient is off by the class count; ours is not.
                opts = {"label_smoothing": 0.1}
            seed += 1
            msgs += check_case(rank, world, sizes, torch.float64, opts, dict(case_kw),
                               "full" if seed % 2 else None, seed=seed)
    for dtype in (torch.float32, torch.float16, torch.bfloat16) if full else (torch.bfloat16,):
        for opts in ({}, {"label_smoothing": 0.1, "reduction": "sum"},
                     {"z_loss": 1e-3, "softcap": 4.0, "inplace_backward": True}):
            seed += 1
            msgs += check_case(rank, world, sizes, dtype, opts, {"extreme": None},
                               "full" if seed % 2 else None, seed=seed)
        seed += 1
        msgs += check_case(rank, world, sizes, dtype, {}, {"extreme": "big"}, None, seed=seed)
    msgs += check_errors(rank, world, sizes)
    msgs += check_saved(rank, world, sizes)
    return msgs


def run_dtensor(rank, world, mesh_shape):
    """xent_ext.cross_entropy (and the patched F.cross_entropy) on DTensor logits sharded on
    the class dim, 1-D or 2-D mesh, against the gathered loss; placements as loss_parallel.
    On the 1-D mesh also the compiled loss (check_compile)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import xent_ext

    count_collectives()
    msgs = []
    two_d = len(mesh_shape) == 2
    mesh = init_device_mesh("cpu", tuple(mesh_shape),
                            mesh_dim_names=("dp", "tp") if two_d else ("tp",))
    place = (Shard(0), Shard(1)) if two_d else (Shard(1),)
    t_place = (Shard(0), Replicate()) if two_d else (Replicate(),)
    g = torch.Generator().manual_seed(7)
    for case, (shape, opts) in enumerate([
            ((8, 11), {}), ((8, 11), {"reduction": "sum"}), ((8, 11), {"reduction": "none"}),
            ((8, 13), {"label_smoothing": 0.1, "weight": True}),
            ((8, 9), {"z_loss": 1e-3, "softcap": 4.0}), ((4, 10, 3), {}),
            ((8, 3), {"reduction": "sum", "label_smoothing": 0.2})]):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        c = shape[1]
        t = torch.randint(0, c, (shape[0],) + shape[2:], generator=g)
        t[0] = -100
        kw = dict(opts)
        w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if kw.pop("weight", 0) else None
        red = kw.get("reduction", "mean")
        xd = distribute_tensor(x, mesh, place).detach().requires_grad_()
        td = distribute_tensor(t, mesh, t_place) if two_d else t
        tag = f"rank {rank} mesh {mesh_shape} case {case} {shape} {opts}"
        patched = case % 2 == 1 and not ({"z_loss", "softcap"} & set(kw))
        if patched:  # through F.cross_entropy under xent_ext.patch()
            with xent_ext.patch():
                loss = F.cross_entropy(xd, td, weight=w, **kw)
        else:
            loss = xent_ext.cross_entropy(xd, td, weight=w, **kw)
        xr = x.clone().requires_grad_()
        from xent_ext import _composite

        x3 = xr.reshape(shape[0], c, -1)
        t3 = t.reshape(shape[0], -1)
        ref, _ = _composite.cross_entropy(x3, t3, w, {"none": 0, "mean": 1, "sum": 2}[red],
                                          -100, kw.get("label_smoothing", 0.0),
                                          kw.get("logit_scale", 1.0), kw.get("softcap", 0.0),
                                          kw.get("z_loss", 0.0))
        ref = ref.reshape(t.shape) if red == "none" else ref
        ref.sum().backward()
        got = loss.full_tensor()
        if not torch.allclose(got, ref, atol=1e-10, rtol=1e-10):
            msgs.append(f"{tag}: loss {got} vs {ref}")
        loss.sum().backward() if red == "none" else loss.backward()
        grad = xd.grad.full_tensor()
        if not torch.allclose(grad, xr.grad, atol=1e-10, rtol=1e-10):
            msgs.append(f"{tag}: grad off by {(grad - xr.grad).abs().max()}")
        # torch's loss_parallel where it applies: the same placements and values
        if not (set(kw) - {"reduction"}) and w is None and not (two_d and red == "mean"):
            xd2 = distribute_tensor(x, mesh, place).detach().requires_grad_()
            with loss_parallel():
                theirs = F.cross_entropy(xd2, td, reduction=red)
            if tuple(theirs.placements) != tuple(loss.placements):
                msgs.append(f"{tag}: placements {loss.placements} vs loss_parallel's "
                            f"{theirs.placements}")
            if not torch.allclose(theirs.full_tensor(), got, atol=1e-10, rtol=1e-10):
                msgs.append(f"{tag}: value differs from loss_parallel's")
    if not two_d:
        msgs += check_compile(rank, world)
    return msgs


def run_linear(rank, world, sizes):
    """vocab_parallel_linear_cross_entropy against the loss of the full head in float64:
    gradients of input, the local head rows and bias; two all-reduces forward, one backward.
    chunk: rows per tile (chunk_size), None (the default budget), or ("bytes", k) for
    chunk_bytes=k with slabs of 2 classes and pieces of 4 rows allowed (this process only),
    so that a rank's shard is several slabs and the 9 rows three pieces."""
    import xent_ext.distributed as xd
    from xent_ext import _linear_plan

    _linear_plan.MIN_SLAB_CLASSES, _linear_plan.MIN_SLAB_ROWS = 2, 4
    count_collectives()
    msgs = []
    g = torch.Generator().manual_seed(11)
    c, h = sum(sizes), 6
    start, v = sum(sizes[:rank]), sizes[rank]
    for case, (dtype, opts, chunk) in enumerate([
            (torch.float64, {}, 3), (torch.float64, {"reduction": "sum"}, None),
            (torch.float64, {"reduction": "none", "label_smoothing": 0.1}, 4),
            (torch.float64, {"z_loss": 1e-3, "softcap": 3.0, "weighted": True}, 1),
            (torch.float32, {"label_smoothing": 0.2}, 5),
            (torch.bfloat16, {}, 2),
            (torch.float64, {"label_smoothing": 0.1, "weighted": True}, ("bytes", 64)),
            (torch.float64, {"reduction": "none", "z_loss": 1e-2}, ("bytes", 64)),
            (torch.float64, {"softcap": 2.0, "logit_scale": 0.6}, ("bytes", 9 * 2 * 8)),
            (torch.bfloat16, {"label_smoothing": 0.05}, ("bytes", 16))]):
        kw = dict(opts)
        weighted = kw.pop("weighted", False)
        n = 9
        x = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(c, h, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
        t = torch.randint(0, c, (n,), generator=g)
        t[2] = -100
        cw = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted \
            else None
        red = kw.get("reduction", "mean")
        xr, wr, br = (a.detach().double().clone().requires_grad_() for a in (x, w, b))
        ref = reference_loss(xr @ wr.t() + br, t, cw, red, kw)
        (ref.sum() if red == "none" else ref).backward()
        xl = x.clone().requires_grad_()
        wl = w[start:start + v].clone().requires_grad_()
        bl = b[start:start + v].clone().requires_grad_()
        CALLS.clear()
        size = dict(chunk_bytes=chunk[1]) if isinstance(chunk, tuple) else dict(
            chunk_size=chunk)
        loss = xd.vocab_parallel_linear_cross_entropy(xl, wl, t, bias=bl, weight=cw, **size,
                                                      **kw)
        fwd = list(CALLS)
        CALLS.clear()
        (loss.sum() if red == "none" else loss).backward()
        bwd = list(CALLS)
        tag = f"rank {rank} linear case {case} {dtype} {opts} chunk={chunk}"
        if fwd.count("all_reduce") != 2 or bwd != ["all_reduce"]:
            msgs.append(f"{tag}: collectives forward {fwd}, backward {bwd}")
        tol = TOL[dtype] * 10
        for name, got, want in (("loss", loss, ref), ("d input", xl.grad, xr.grad),
                                ("d weight", wl.grad, wr.grad[start:start + v]),
                                ("d bias", bl.grad, br.grad[start:start + v])):
            want = want.detach()
            err = (got.double() - want).abs().max().item() if want.numel() else 0.0
            if not err <= tol * (1 + want.abs().max().item() if want.numel() else 1):
                msgs.append(f"{tag}: {name} off by {err}")
    return msgs


def reference_loss(logits, t, cw, red, kw):
    from xent_ext import _composite

    n, c = logits.shape
    loss, _ = _composite.cross_entropy(logits.unsqueeze(2), t.unsqueeze(1),
                                       cw.double() if cw is not None else None,
                                       {"none": 0, "mean": 1, "sum": 2}[red], -100,
                                       kw.get("label_smoothing", 0.0),
                                       kw.get("logit_scale", 1.0), kw.get("softcap", 0.0),
                                       kw.get("z_loss", 0.0))
    return loss.reshape(n) if red == "none" else loss


def check_errors(rank, world, sizes):
    """Bad arguments raise as torch would (same types, the argument named), on every rank."""
    import xent_ext.distributed as xd

    v, c = sizes[rank], sum(sizes)
    x = torch.randn(4, v, requires_grad=True)
    t = torch.tensor([0, 1, 2, c - 1])
    msgs = []

    def expect(exc, match, **kw):
        args = kw.pop("args", (x, t))
        try:
            xd.vocab_parallel_cross_entropy(*args, **kw)
        except exc as e:
            if match not in str(e):
                msgs.append(f"rank {rank} {kw}: message {e!r} lacks {match!r}")
            return
        except Exception as e:  # noqa: BLE001
            msgs.append(f"rank {rank} {kw}: {type(e).__name__} {e} instead of {exc.__name__}")
            return
        msgs.append(f"rank {rank} {kw}: no {exc.__name__}")

    expect(IndexError, f"Target {c} is out of bounds", args=(x, torch.tensor([0, 1, c, 2])))
    expect(IndexError, "Target -3 is out of bounds", args=(x, torch.tensor([0, -3, 1, 2])))
    expect(RuntimeError, "weight tensor", weight=torch.ones(c + 1))
    expect(RuntimeError, "weight tensor", weight=torch.ones(c + 1), vocab_start=sum(sizes[:rank]))
    expect(RuntimeError, "expected scalar type Float", weight=torch.ones(c, dtype=torch.float64))
    expect(ValueError, "expected target of shape", args=(x, t[:3]))
    expect(RuntimeError, "target dtype", args=(x, t.float()))
    expect(RuntimeError, "label_smoothing", label_smoothing=-0.1)
    expect(ValueError, "softcap", softcap=-1.0)
    expect(ValueError, "vocab_start", vocab_start=-1)
    return msgs


def check_compile(rank, world):
    """torch.compile(fullgraph=True) of the loss with vocab_start given: the collectives trace
    as functional ones (aot_eager: the traced forward and backward graphs, without codegen);
    same loss and gradient as eager."""
    import xent_ext.distributed as xd

    v = 5
    x = torch.randn(6, v, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    t = torch.tensor([0, 3, 7, 9, -100, 2])

    def f(x, t):
        return xd.vocab_parallel_cross_entropy(x, t, vocab_start=v * rank,
                                               label_smoothing=0.1, z_loss=1e-3)

    xa = x.clone().requires_grad_()
    la = f(xa, t)
    la.backward()
    xb = x.clone().requires_grad_()
    lb = torch.compile(f, backend="aot_eager", fullgraph=True)(xb, t)
    lb.backward()
    if not (torch.allclose(la, lb) and torch.allclose(xa.grad, xb.grad)):
        return [f"rank {rank}: compiled {lb} vs eager {la}"]
    return []


def check_saved(rank, world, sizes):
    """What the backward keeps: the logits themselves (no float32 copy of them, no softmax)
    and per-row numbers, for bfloat16 logits."""
    import xent_ext.distributed as xd

    v = sizes[rank] + 5  # wider than the (N, 4) coefficients, to tell them apart
    x = torch.randn(16, v, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, sum(sizes) + 5 * world, (16,),
                      generator=torch.Generator().manual_seed(5))
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype, tensor.data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = xd.vocab_parallel_cross_entropy(x, t, label_smoothing=0.1)
    loss.backward()
    big = [s for s in saved if len(s[0]) == 2 and s[0][1] == v and s[0][0] == 16]
    msgs = []
    if any(s[1] != torch.bfloat16 or s[2] != x.data_ptr() for s in big):
        msgs.append(f"rank {rank}: the backward saved an N x V tensor other than the logits: "
                    f"{saved}")
    return msgs


def run_autograd_modes(rank, world, _payload):
    """Forward-mode AD and torch.func transforms raise a clear NotImplementedError from both
    functions (no silent wrong tangent, no torch-internal error about a missing jvp)."""
    import torch.autograd.forward_ad as fwAD

    import xent_ext.distributed as xd

    msgs = []
    g = torch.Generator().manual_seed(5)
    n, h, v = 4, 3, 5
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    logits = x @ w.t()
    t = torch.randint(0, v * world, (n,), generator=g)
    calls = {
        "vocab_parallel_cross_entropy": lambda a: xd.vocab_parallel_cross_entropy(a, t),
        "vocab_parallel_linear_cross_entropy":
            lambda a: xd.vocab_parallel_linear_cross_entropy(a, w, t),
    }
    inputs = {"vocab_parallel_cross_entropy": logits,
              "vocab_parallel_linear_cross_entropy": x}
    for name, fn in calls.items():
        a = inputs[name]
        for mode in ("forward AD", "torch.func.grad", "vmap"):
            try:
                if mode == "forward AD":
                    with fwAD.dual_level():
                        fn(fwAD.make_dual(a, torch.ones_like(a)))
                elif mode == "torch.func.grad":
                    torch.func.grad(lambda b, f=fn: f(b).sum())(a)
                else:
                    torch.func.vmap(lambda b, f=fn: f(b.unsqueeze(0)).sum())(a)
                msgs.append(f"rank {rank} {name} {mode}: no error")
            except NotImplementedError as e:
                if name not in str(e) or "forward-mode AD" not in str(e):
                    msgs.append(f"rank {rank} {name} {mode}: unclear message {e}")
            except Exception as e:  # noqa: BLE001 - the point is which error comes out
                msgs.append(f"rank {rank} {name} {mode}: {type(e).__name__}: {e}")
    return msgs
