"""Property tests: random shapes (C = 1 up to large C, K-dim), dtypes, options and value scales,
loss and gradient compared with F.cross_entropy in float64.  The number of examples is bounded
(XENT_HYPOTHESIS_EXAMPLES, default 60) so the suite stays fast in CI."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import DEVICES, DTYPES, assert_close_to_reference

EXAMPLES = int(os.environ.get("XENT_HYPOTHESIS_EXAMPLES", "60"))


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 12))
    c = draw(st.one_of(st.integers(1, 40), st.integers(41, 5000), st.just(1)))
    extra = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)) if c <= 300 else []
    no_batch = draw(st.booleans()) and not extra
    shape = (c,) if no_batch else (n, c, *extra)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    prob = draw(st.booleans())
    kw = {
        "reduction": draw(st.sampled_from(["none", "mean", "sum"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0])),
    }
    if draw(st.booleans()):
        kw["weight"] = "w"
    if not prob:
        kw["ignore_index"] = draw(st.sampled_from([-100, 0, -1]))
    return dtype, shape, scale, seed, prob, kw


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_random_problems_match_torch(device, problem):
    dtype, shape, scale, seed, prob, kw = problem
    g = torch.Generator().manual_seed(seed)
    class_dim = 0 if len(shape) == 1 else 1
    c = shape[class_dim]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), class_dim)
        t = t.to(dtype).to(device)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        t = torch.randint(0, c, tshape, generator=g)
        ignore = torch.rand(tshape, generator=g) < 0.2
        t = torch.where(ignore, torch.full_like(t, kw["ignore_index"]), t).to(device)
    if kw.get("weight") == "w":
        kw["weight"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.2).to(dtype).to(device)
    assert_close_to_reference(x, t, upstream="random", **kw)
