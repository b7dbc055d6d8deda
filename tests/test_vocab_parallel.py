"""xent_ext.distributed: vocab-parallel cross entropy across gloo process groups of 2, 3 and 4
ranks (spawned on 127.0.0.1, bounded in time), against the loss of the gathered logits."""

from __future__ import annotations

import pytest
import torch

from .vocab_parallel_support import run_group

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="needs torch.distributed")


@pytest.mark.parametrize("sizes", [[5, 6], [4, 1, 8], [3, 7, 2, 5]],
                         ids=["2ranks", "3ranks-uneven", "4ranks-uneven"])
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
