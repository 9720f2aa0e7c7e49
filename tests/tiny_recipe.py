"""A tiny training problem for the training-loop tests: an MLP on sklearn's digits, its loss and accuracy."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:512], dtype=torch.float32) / 16.0, torch.tensor(y[:512])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y), {}


def mlp_accuracy(model: nn.Module) -> dict[str, float]:
    x, y = digits_tensors()
    return {"accuracy": float((model(x).argmax(1) == y).float().mean())}
