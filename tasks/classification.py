"""What the classification stages share: cached task splits, input normalisation, flip augmentation, the loss,
accuracy on a split, and the head's input features."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from vitpipe.models.heads import probe_head
from vitpipe.tasks.augment import random_flip
from vitpipe.tasks.data import load_split


@functools.lru_cache(maxsize=8)
def cached_split(uri: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, size, size) uint8, labels (N,) int64) of one split, decoded once per process."""
    return load_split(uri, split, size)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def flip(batch: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator):
    """Random horizontal flip of (images, labels), one coin per image."""
    x, y = batch
    return random_flip(x, gen), y


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    logits = model(normalize(x))
    accuracy = (logits.argmax(-1) == y).float().mean()
    return nn.functional.cross_entropy(logits, y), {"train_accuracy": accuracy}


@torch.no_grad()
def logits(model: nn.Module, uri: str, split: str, size: int, batch: int = 256) -> torch.Tensor:
    """The model's logits (N, classes) on one split, in eval mode."""
    x, _ = cached_split(uri, split, size)
    was_training = model.training
    model.eval()
    out = torch.cat([model(normalize(x[i:i + batch])) for i in range(0, len(x), batch)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, uri: str, split: str, size: int, batch: int = 256) -> float:
    _, y = cached_split(uri, split, size)
    return float((logits(model, uri, split, size, batch).argmax(-1) == y).float().mean())


@torch.no_grad()
def features(vit: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> pooled encoder features (N, C), the head's input, in eval mode."""
    was_training = vit.training
    vit.eval()
    device = next(vit.parameters()).device
    out = [vit.forward_head(vit.forward_features(normalize(images[i:i + batch]).to(device)), pre_logits=True)
           for i in range(0, len(images), batch)]
    vit.train(was_training)
    return torch.cat(out)


def probed_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> nn.Sequential:
    """A new head for `model`, a timm ViT with a Linear head: whitening then a Linear at the linear probe's
    optimum on the model's own features of (images, labels) (models.heads.probe_head). fold_whitening turns it
    back into a Linear."""
    head = copy.deepcopy(model.head)  # its weights are replaced: the model keeps its own head
    return probe_head(head, features(model, images), labels.to(head.weight.device))
