"""The numbers of the lesson this project grew from, checked against xent_ext."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xent_ext
from xent_ext import reference


def test_neg_log_07():
    assert -math.log(0.7) == pytest.approx(0.35667494393873245, abs=0, rel=1e-15)
    assert reference.item_cross_entropy(torch.tensor([0.1, 0.7, 0.2]), 1).item() == (
        pytest.approx(0.35667494393873245, rel=1e-6))


def test_H_of_one_hot():
    h = reference.H(torch.tensor([0.1, 0.7, 0.2]), torch.tensor([0, 1, 0]))
    assert h.item() == pytest.approx(0.3567, abs=1e-4)


def test_batch_cross_entropy_over_probabilities():
    probs = torch.tensor([[0.7502, 0.0828, 0.1670], [0.3724, 0.2735, 0.3541],
                          [0.0895, 0.8934, 0.0171]])
    labels = torch.tensor([0, 2, 0])
    expected = -(math.log(0.7502) + math.log(0.3541) + math.log(0.0895)) / 3
    assert reference.batch_cross_entropy(probs, labels).item() == pytest.approx(expected, 1e-6)
    assert expected == pytest.approx(1.2463, abs=1e-4)  # the lesson's printed value


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_classes,n_samples,pct,conf", [(3, 10, 0.8, 1.0), (10, 200, 0.5, 3.0),
                                                          (100, 64, 0.9, 0.5)])
def test_four_ways_agree(seed, n_classes, n_samples, pct, conf):
    g = torch.Generator().manual_seed(seed)
    logits, labels = reference.make_classification_logits(n_classes, n_samples, pct, conf,
                                                          generator=g)
    by_module = nn.CrossEntropyLoss()(logits, labels)
    by_function = F.cross_entropy(logits, labels)
    ours = xent_ext.cross_entropy(logits, labels)
    per_row = torch.stack([reference.item_cross_entropy(p, int(lab))
                           for p, lab in zip(logits.softmax(dim=1), labels, strict=False)]).mean()
    for value in (by_function, ours, per_row):
        torch.testing.assert_close(value, by_module, rtol=1e-5, atol=1e-6)
    assert isinstance(xent_ext.CrossEntropyLoss()(logits, labels), torch.Tensor)
    torch.testing.assert_close(xent_ext.CrossEntropyLoss()(logits, labels), by_module)


def test_generator_makes_batches_reproducible():
    a = reference.make_classification_logits(5, 20, 0.7, generator=torch.Generator().manual_seed(3))
    b = reference.make_classification_logits(5, 20, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # pct_correct=1: every label holds its row's maximum.
    logits, labels = reference.make_classification_logits(
        6, 50, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(logits.argmax(1), labels)
