"""InfoCL (Wang et al., CVPR 2022): contrastive learning with a regularizer that raises I(z; x).

Contrastive losses keep only what two views share ("minimal sufficient" representation) and can
discard task-relevant information. InfoCL adds a lower bound on the information the representation
keeps about its own view: "rc" (reconstruction, I(x; z) >= H(x) + E log q(x|z)) or "lbe" (an InfoNCE
estimator with a Gaussian encoder h = mu + eps). Base losses: SimCLR (NT-Xent) and BYOL.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.settings import InfoCLConfig


class _GatherWithGrad(torch.autograd.Function):
    """all_gather that keeps the graph: each rank gets the gradient every rank's loss sends to its rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _across_ranks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: (n, D) -> (world * n, D) stacked in rank order, and this rank's row offset in it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: z1, z2 (N, D) projections of two views; each of the 2N anchors has 1 positive
    (its other view) and 2N - 2 negatives, cosine similarity / tau, mean cross-entropy.

    Under torch.distributed the negatives are the views of every rank's samples (SimCLR's global-batch
    negatives), with gradients flowing back to their ranks: with data parallelism averaging gradients, loss
    and gradients equal one worker's on the global batch, whatever the worker count.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    (k1, offset), (k2, _) = _across_ranks(z1), _across_ranks(z2)
    n, total = z1.shape[0], k1.shape[0]
    local = torch.arange(offset, offset + n, device=z1.device)
    logits = torch.cat([z1, z2]) @ torch.cat([k1, k2]).T / tau
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n, device=z1.device), torch.cat([local, total + local])] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), torch.cat([total + local, local]))


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(p, z'), averaged over the batch; target: (N, D), no gradient."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=1)).mean()


class SimCLRHead(nn.Module):
    """SimCLR projector g: h (N, d) -> z (N, out_dim) by Linear(d, d) -> ReLU -> Linear(d, out_dim)."""

    def __init__(self, dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.projector(h)


def _mlp_bn(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class BYOLHead(nn.Module):
    """BYOL online head: projector d -> d -> out_dim, predictor out_dim -> out_dim -> out_dim (BN + ReLU inside)."""

    def __init__(self, dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.projector = _mlp_bn(dim, dim, out_dim)
        self.predictor = _mlp_bn(out_dim, out_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(h))


class ReconstructionDecoder(nn.Module):
    """RC decoder q(x|h): pooled h (N, d) -> image (N, 3, S, S).

    Linear(d -> w0 * s0 * s0) + BN + ReLU, then stride-2 ConvT(k3 p1 op1) + BN + ReLU up-blocks
    w0 -> w1 -> w2 -> w3 (paper: 64 -> 256 -> 128 -> 64; larger inputs repeat the last width) from s0
    (4 at 32 px, 7 at 224 px) up to S, then ConvT(-> 3, k3 s1 p1).
    """

    def __init__(self, dim: int, img_size: int, widths: tuple[int, ...] = (64, 256, 128, 64)) -> None:
        super().__init__()
        start, ups = img_size, 0
        while start % 2 == 0 and start // 2 >= 4:
            start, ups = start // 2, ups + 1
        widths = (tuple(widths) + widths[-1:] * ups)[: ups + 1]
        layers: list[nn.Module] = [
            nn.Linear(dim, widths[0] * start * start, bias=False),
            nn.BatchNorm1d(widths[0] * start * start),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (widths[0], start, start)),
        ]
        for cin, cout in pairwise(widths):
            up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False)
            layers += [up, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers.append(nn.ConvTranspose2d(widths[-1], 3, 3, stride=1, padding=1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)


def info_nce_lower_bound(mu: torch.Tensor, h: torch.Tensor, bandwidth: float = 20.0) -> torch.Tensor:
    """LBE's estimate of I(x; h) up to the constant log M: -(1/M) sum_i log sum_j exp(-||h_i - mu_j||^2 / bandwidth).

    mu, h: (M, d), both views' noise-free means and noisy samples stacked (M = 2N).
    """
    mu, h = mu.float(), h.float()
    sq_dist = h.pow(2).sum(1, keepdim=True) + mu.pow(2).sum(1) - 2 * h @ mu.T
    return -(-sq_dist.clamp_min(0) / bandwidth).logsumexp(dim=1).mean()


def pooled_features(vit: VisionTransformer, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Pooled representations (N, d) after each of `blocks` (increasing, 0-based): final norm, then the
    ViT's own pooling (cls or avg, fc_norm). At the last block this is exactly the encoder's output h."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    features = []
    for index, block in enumerate(vit.blocks[: blocks[-1] + 1]):
        x = block(x)
        if index in blocks:
            features.append(vit.forward_head(vit.norm(x), pre_logits=True))
    return features


def lbe_blocks(depths: tuple[float, ...], depth: int) -> list[int]:
    """Fractions of the encoder depth -> distinct increasing 0-based block indices (1.0 -> the last block)."""
    blocks = [max(round(f * depth), 1) - 1 for f in depths]
    if any(a >= b for a, b in pairwise(blocks)):
        raise ValueError(f"lbe_depths {depths} give repeated blocks {blocks} at depth {depth}")
    return blocks


class InfoCL(nn.Module):
    """InfoCL objective for a given encoder: base contrastive loss on the pooled h plus the MI regularizer.

    With BYOL the objective keeps the EMA target (encoder + projector); each training-mode forward first
    moves it towards the online weights the optimizer produced in the previous step.
    """

    num_views = 2

    def __init__(self, vit: VisionTransformer, cfg: InfoCLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or InfoCLConfig()
        depth, dim = len(vit.blocks), vit.num_features
        self.feature_blocks = lbe_blocks(cfg.lbe_depths, depth) if cfg.regularizer == "lbe" else [depth - 1]
        self.head = SimCLRHead(dim, cfg.proj_dim) if cfg.base == "simclr" else BYOLHead(dim, cfg.proj_dim)
        if cfg.base == "byol":
            self.target_encoder = copy.deepcopy(vit).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.head.projector).requires_grad_(False)
        if cfg.regularizer == "rc":
            self.decoder = ReconstructionDecoder(dim, vit.patch_embed.img_size[0], cfg.rc_widths)

    def forward(
        self, vit: VisionTransformer, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """view1, view2: (N, 3, H, W) two augmentations of a batch -> (loss, {"contrastive", "regularizer"}).

        loss = contrastive + regularizer, where regularizer = lambda * RC or -lambda * I_LBE.
        """
        if self.training and self.cfg.base == "byol":
            self._update_target(vit)
        mus = [pooled_features(vit, view, self.feature_blocks) for view in (view1, view2)]
        hs = [[self._sample(mu) for mu in levels] for levels in mus]
        contrastive = self._base_loss(hs[0][-1], hs[1][-1], view1, view2)
        regularizer = self._regularizer(mus, hs, (view1, view2))
        stats = {"contrastive": contrastive.detach(), "regularizer": regularizer.detach()}
        return contrastive + regularizer, stats

    def _sample(self, mu: torch.Tensor) -> torch.Tensor:
        """Gaussian encoder h = mu + eps, eps ~ N(0, sigma^2), in training with LBE only; else h = mu."""
        if self.training and self.cfg.regularizer == "lbe":
            return mu + self.cfg.lbe_sigma * torch.randn_like(mu)
        return mu

    def _base_loss(self, h1: torch.Tensor, h2: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        if self.cfg.base == "simclr":
            return nt_xent(self.head(h1), self.head(h2), self.cfg.temperature)
        with torch.no_grad():
            last = [len(self.target_encoder.blocks) - 1]
            t1, t2 = (self.target_projector(pooled_features(self.target_encoder, v, last)[0]) for v in (view1, view2))
        return byol_loss(self.head(h1), t2) + byol_loss(self.head(h2), t1)

    def _regularizer(
        self, mus: list[list[torch.Tensor]], hs: list[list[torch.Tensor]], views: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.regularizer == "rc":
            errors = [F.mse_loss(self.decoder(h[-1]).float(), x.float()) for h, x in zip(hs, views, strict=True)]
            return cfg.weight * sum(errors)
        if cfg.regularizer == "lbe":
            info = sum(
                w * info_nce_lower_bound(torch.cat([mu1, mu2]), torch.cat([h1, h2]), cfg.lbe_bandwidth)
                for w, mu1, mu2, h1, h2 in zip(cfg.lbe_weights, *mus, *hs, strict=True)
            )
            return -cfg.weight * info
        return hs[0][-1].new_zeros(())

    @torch.no_grad()
    def _update_target(self, vit: VisionTransformer) -> None:
        """EMA: target <- m * target + (1 - m) * online, for the encoder and the projector (buffers copied)."""
        m = self.cfg.byol_momentum
        for target, online in ((self.target_encoder, vit), (self.target_projector, self.head.projector)):
            for pt, po in zip(target.parameters(), online.parameters(), strict=True):
                pt.lerp_(po, 1 - m)
            for bt, bo in zip(target.buffers(), online.buffers(), strict=True):
                bt.copy_(bo)
