"""LP-FT heads: whitening conditions the features, the probe fit matches sklearn's, the fold is exact."""

from __future__ import annotations

import torch
from torch import nn

from vitpipe.models.heads import FeatureWhitening, fit_probe, fold_whitening, probe_head


def _features(n: int = 400, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in badly conditioned features: scales from 1e-3 to 1e2 across dimensions."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, dim, generator=gen) + labels[:, None] * 0.8
    return x * torch.logspace(-3, 2, dim) + 5.0, labels


def test_whitened_features_have_zero_mean_and_identity_covariance() -> None:
    x, _ = _features()
    z = FeatureWhitening.fit(x, eps=0.0)(x).double()
    assert z.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(z.T, correction=0), torch.eye(16, dtype=torch.float64), atol=1e-3)


def test_probe_fit_matches_sklearn_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _features()
    z = FeatureWhitening.fit(x)(x)
    head = fit_probe(nn.Linear(16, 2), z, y)
    ours = (head(z).argmax(-1) == y).float().mean().item()
    theirs = LogisticRegression(max_iter=2000).fit(z.numpy(), y.numpy()).score(z.numpy(), y.numpy())
    assert abs(ours - theirs) < 0.01 and ours > 0.6


def test_fold_gives_one_linear_with_the_same_outputs() -> None:
    x, y = _features()
    head = probe_head(nn.Linear(16, 2), x, y)
    folded = fold_whitening(head)
    assert isinstance(folded, nn.Linear)
    assert torch.allclose(head(x), folded(x), atol=1e-4, rtol=1e-4)
    plain = nn.Linear(16, 2)
    assert fold_whitening(plain) is plain
