"""Handwritten digits (scikit-learn's 8x8 digits, shipped with it) with xent_ext's loss.

A small MLP trained with xent_ext.CrossEntropyLoss(label_smoothing=..., weight=...), and the
same run with torch.nn.CrossEntropyLoss for comparison: the losses agree step by step.

    python examples/digits_classifier.py --epochs 30
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import xent_ext


def load(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, mean 1: rarer digits count more."""
    counts = torch.bincount(y, minlength=n_classes).float()
    w = counts.sum() / (n_classes * counts)
    return w / w.mean()


def train(criterion: nn.Module, data, epochs: int, batch: int, seed: int):
    x_train, x_test, y_train, y_test = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = criterion(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return losses, accuracy, seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = load(args.seed)
    weight = class_weights(data[2], 10)
    results = {}
    for name, criterion in (
            ("xent_ext", xent_ext.CrossEntropyLoss(weight=weight,
                                                   label_smoothing=args.label_smoothing)),
            ("torch", nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing))):
        losses, accuracy, seconds = train(criterion, data, args.epochs, args.batch, args.seed)
        results[name] = (losses, accuracy)
        print(f"{name:9s} final loss {losses[-1]:.4f}  test accuracy {accuracy:.3f}  "
              f"{seconds:.2f} s")
    diff = max(abs(a - b) for a, b in zip(results["xent_ext"][0], results["torch"][0],
                                          strict=True))
    print(f"largest loss difference over {len(results['torch'][0])} steps: {diff:.2e}")
    return results


if __name__ == "__main__":
    main()
