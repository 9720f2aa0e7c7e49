"""Every PEFT method learns real data: sklearn's digits (8x8, 10 classes) upscaled to 32x32 RGB.

The tiny backbone is randomly initialised (no hub weights), so its features are weak and the head does
most of the learning in a few dozen steps; the check is that training through each method's forward
and parameters lifts test accuracy well above the untrained head's (chance level).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.vit import build_vit

STEPS, PER_CLASS = 30, 2  # 30 class-balanced batches of 20
HEAD_LR, METHOD_LR = 3e-2, {"full": 1e-4}  # method parameters: 1e-3 unless listed
MARGIN = 0.1


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """500 train / 200 test images: (n, 3, 32, 32) in [-1, 1], labels (n,)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) * 2 - 1
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:500], order[500:700]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def balanced_batches(y: torch.Tensor, steps: int, per_class: int, seed: int = 1) -> list[torch.Tensor]:
    """Index batches with `per_class` samples of every class (no class-count noise in the head's gradient)."""
    gen = torch.Generator().manual_seed(seed)
    pools = [torch.nonzero(y == c).flatten() for c in range(10)]
    return [torch.cat([p[torch.randint(len(p), (per_class,), generator=gen)] for p in pools]) for _ in range(steps)]


@pytest.mark.parametrize("name", list(PEFT_METHODS))
def test_training_through_the_method_beats_the_untrained_head(name: str, digits: dict[str, torch.Tensor]) -> None:
    method = PEFT_METHODS[name]
    torch.manual_seed(0)
    model = method.apply(build_vit("vitpipe_tiny_patch4_32", num_classes=10))
    before = accuracy(model, digits["x_test"], digits["y_test"])

    params = method.trainable_parameters(model)
    head = [p for n, p in params.items() if n.startswith("head.")]
    rest = [p for n, p in params.items() if not n.startswith("head.")]
    groups = [{"params": head, "lr": HEAD_LR}, {"params": rest, "lr": METHOD_LR.get(name, 1e-3)}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=1e-4)
    model.train()
    for batch in balanced_batches(digits["y_train"], STEPS, PER_CLASS):
        loss = F.cross_entropy(model(digits["x_train"][batch]), digits["y_train"][batch])
        opt.zero_grad()
        loss.backward()
        opt.step()

    after = accuracy(model, digits["x_test"], digits["y_test"])
    assert after >= before + MARGIN, f"{name}: test accuracy {before:.3f} -> {after:.3f}"
