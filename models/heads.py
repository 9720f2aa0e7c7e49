"""Classification heads that start where a linear probe ends (LP-FT, Kumar et al., ICLR 2022).

Self-supervised features (MIM above all) are badly conditioned: a few directions carry most of the variance,
so a freshly initialised linear head trained by AdamW for a few hundred steps stays far from what a
logistic-regression probe on standardised features reaches. The fix has two parts, both exact to undo:
- `FeatureWhitening` before the head: fixed buffers (x - mean) @ M fitted once on the task's frozen train
  features (ZCA, eigenvalues floored at eps * mean eigenvalue), the conditioning MAE gets from an affine-free
  BatchNorm, without batch statistics;
- the head's weights start at the probe's optimum: full-batch L-BFGS on mean cross-entropy + ||W||^2 / (2 C N)
  (sklearn LogisticRegression's objective at C) over the whitened features.
After training, `fold_whitening` turns Sequential(FeatureWhitening, Linear) back into one nn.Linear with the same
outputs, so stored deltas and exported models are plain timm ViTs.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureWhitening(nn.Module):
    """x: (B, C) -> (x - mean) @ matrix, both fixed buffers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix

    @classmethod
    @torch.no_grad()
    def fit(cls, features: torch.Tensor, eps: float = 1e-5) -> FeatureWhitening:
        """ZCA whitening of features: (N, C); eigenvalues below eps * their mean are floored there."""
        f = features.double()
        mean = f.mean(0)
        eigvals, eigvecs = torch.linalg.eigh(torch.cov((f - mean).T, correction=0))
        eigvals = eigvals.clamp_min(0) + eps * eigvals.clamp_min(0).mean()
        white = cls(f.shape[1])
        white.mean.copy_(mean.float())
        white.matrix.copy_(((eigvecs * eigvals.rsqrt()) @ eigvecs.T).float())
        return white


@torch.no_grad()
def fit_probe(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, c: float = 1.0) -> nn.Linear:
    """Set `head` to the logistic-regression optimum on (features (N, C), labels (N,)), in place."""
    w = torch.zeros_like(head.weight, requires_grad=True)
    b = torch.zeros_like(head.bias, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(features @ w.T + b, labels) + w.pow(2).sum() / (2 * c * len(features))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head.weight.copy_(w)
    head.bias.copy_(b)
    return head


def probe_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> nn.Sequential:
    """Sequential(FeatureWhitening fitted on `features`, `head` at the probe optimum on the whitened features)."""
    white = FeatureWhitening.fit(features).to(head.weight.device)
    fit_probe(head, white(features.to(head.weight.device)), labels.to(head.weight.device))
    return nn.Sequential(white, head)


@torch.no_grad()
def fold_whitening(head: nn.Module) -> nn.Module:
    """Sequential(FeatureWhitening, Linear) -> one Linear with the same outputs (W' = W M^T, b' = b - W' mean);
    any other head is returned unchanged."""
    if not (isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], FeatureWhitening)):
        return head
    white, linear = head
    folded = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
    folded.weight.copy_(linear.weight @ white.matrix.T)
    folded.bias.copy_(linear.bias - folded.weight @ white.mean)
    return folded.requires_grad_(linear.weight.requires_grad)
