"""What runs: (N, V) shapes and dtypes per device, modes, and the time budget per cell."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
MODES = ("fwd", "fwdbwd")

# Classification (few classes, many rows) and language-model vocabularies (32k Llama-2,
# 128k Llama-3, 256k Gemma).  The CPU set is sized so that the default run stays around ten
# minutes on a 2-core machine; the CUDA set has the large-batch LM cases that matter there.
# A third number S makes a K-dim input (N, V, S) with targets (N, S): segmentation-like maps.
CPU_SHAPES = [(65536, 10), (8192, 1000), (4096, 32000), (1024, 128256), (4, 262144),
              (16, 21, 4096)]
CPU_DTYPES = ["float32", "bfloat16"]
# float16 and float64 on one LM shape only: they are rare on CPU, one shape shows the trend.
CPU_EXTRA = [((4096, 32000), "float16"), ((4096, 32000), "float64")]
CUDA_SHAPES = [(8192, 128256), (16384, 32000), (4096, 262144), (8, 262144), (64, 131072),
               (1048576, 10), (65536, 1000), (64, 21, 65536), (64, 1000, 1024)]
CUDA_DTYPES = ["bfloat16", "float16", "float32"]
# --quick: one classification and one LM shape, one dtype; meant for a smoke run.
QUICK_SHAPES = {"cpu": [(8192, 1000), (512, 32000)], "cuda": [(65536, 1000), (8192, 128256)]}
QUICK_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16"]}


@dataclass(frozen=True)
class Budget:
    """Reps per cell: as many as fit in `seconds`, but at least min_reps and at most max_reps,
    so slow implementations (naive on CPU) get few reps and fast kernels get a stable median."""

    seconds: float
    min_reps: int
    max_reps: int


BUDGETS = {
    ("cpu", False): Budget(1.0, 3, 50),
    ("cpu", True): Budget(0.25, 3, 10),
    ("cuda", False): Budget(0.5, 10, 500),
    ("cuda", True): Budget(0.2, 5, 100),
}


@dataclass(frozen=True)
class Group:
    """One input (N, V[, S], dtype): the copy baseline and every mode x implementation run on
    it.  S > 1: K-dim logits (N, V, S), class dimension 1, targets (N, S)."""

    n: int
    v: int
    dtype: torch.dtype
    s: int = 1

    @property
    def nbytes(self) -> int:
        return self.n * self.v * self.s * self.dtype.itemsize

    @property
    def shape_label(self) -> str:
        return shape_label(self.n, self.v, self.s)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def shape_label(n: int, v: int, s: int = 1) -> str:
    return f"{n}x{v}" + (f"x{s}" if s > 1 else "")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """'4096x32000,16x21x4096' -> [(4096, 32000), (16, 21, 4096)] (NxV, or NxVxS for K-dim)."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            dims = tuple(int(p) for p in item.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) not in (2, 3):
            raise ValueError(f"bad shape {item!r}: expected NxV or NxVxS, e.g. 4096x32000")
        if min(dims) < 1:
            raise ValueError(f"bad shape {item!r}: N, V (and S) must be positive")
        shapes.append(dims)
    return shapes


def parse_dtypes(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: choose from {', '.join(DTYPES)}")
    return names


def plan(device: str, quick: bool, shapes: list[tuple[int, int]] | None,
         dtypes: list[str] | None) -> list[Group]:
    """The groups to run.  Explicit --shapes/--dtypes give their full product (the other one
    defaulting to the device's list); with neither, the device's default set."""
    if quick:
        default_shapes, default_dtypes, extra = QUICK_SHAPES[device], QUICK_DTYPES[device], []
    elif device == "cuda":
        default_shapes, default_dtypes, extra = CUDA_SHAPES, CUDA_DTYPES, []
    else:
        default_shapes, default_dtypes, extra = CPU_SHAPES, CPU_DTYPES, CPU_EXTRA
    if shapes is not None or dtypes is not None:
        extra = []
    shape_list = shapes or default_shapes
    pairs = [(s, d) for s in shape_list for d in (dtypes or default_dtypes)]
    # Extras run right after the other dtypes of their shape (stable sort keeps dtype order).
    pairs = sorted(pairs + extra, key=lambda p: shape_list.index(p[0]))
    groups: list[Group] = []
    for dims, d in pairs:
        n, v, *rest = dims
        group = Group(n, v, DTYPES[d], rest[0] if rest else 1)
        if group not in groups:
            groups.append(group)
    return groups
