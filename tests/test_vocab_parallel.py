"""xent_ext.distributed: vocab-parallel cross entropy across gloo process groups of 2, 3 and 4
ranks (spawned on 127.0.0.1, bounded in time), against the loss of the gathered logits."""

from __future__ import annotations

import os

import pytest
import torch

from .vocab_parallel_support import run_group

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="needs torch.distributed")


@pytest.mark.parametrize("sizes", [[5, 6], [4, 1, 8], [3, 7, 0, 5]],
                         ids=["2ranks", "3ranks-uneven", "4ranks-one-empty"])
def test_matches_gathered_cross_entropy(sizes):
    failures = run_group(len(sizes), "tests.vocab_parallel_cases:run_cases", sizes)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("mesh_shape", [[2], [2, 2]], ids=["mesh1d", "mesh2d"])
def test_dtensor_sharded_on_classes(mesh_shape):
    world = 1
    for d in mesh_shape:
        world *= d
    failures = run_group(world, "tests.vocab_parallel_cases:run_dtensor", mesh_shape)
    assert not failures, "\n".join(failures[:20])


def test_linear_cross_entropy_chunked():
    failures = run_group(3, "tests.vocab_parallel_cases:run_linear", [4, 7, 2])
    assert not failures, "\n".join(failures[:20])


def test_forward_ad_and_torch_func_raise_clearly():
    failures = run_group(2, "tests.vocab_parallel_cases:run_autograd_modes")
    assert not failures, "\n".join(failures[:20])


def test_example_runs_under_torchrun():
    import subprocess
    import sys
    from pathlib import Path

    from .vocab_parallel_support import free_port

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(root / "examples" / "tensor_parallel.py")],
        cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 4: loss" in out.stdout and "DTensor loss" in out.stdout, out.stdout
