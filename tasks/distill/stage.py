"""The distill stage: ToCom self-distillation on the frozen backbone (METHODS.md section 4).

Teacher = the backbone with ToMe at r = m; student = the SAME backbone at r = n plus ToCom Delta(m -> n);
each step draws m != n uniformly from {0..R}; loss KL(softmax(teacher / tau) || softmax(student / tau)) on
the pooled features (there is no classifier). Only ToCom trains; the stage stores only ToCom and reports
the held-out KL with and without it, averaged over pairs m != n.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitpipe.cluster.batches import DataContext, TensorBatches
from vitpipe.cluster.context import StageContext, StageResult
from vitpipe.cluster.manifest import Manifest
from vitpipe.cluster.train import Recipe
from vitpipe.models.settings import ViTSpec
from vitpipe.models.tocom import TokenCompensator, plug, save_tocom, tocom_kl_loss
from vitpipe.models.tome import apply_tome, set_tome_r
from vitpipe.tasks.backbone import BackboneWeights, backbone_identity, backbone_tag, starting_weights
from vitpipe.tasks.classification import cached_split, normalize
from vitpipe.tasks.distill.spec import DistillNode, DistillOutputs
from vitpipe.tasks.prepare.spec import DataOutputs

MAX_PAIRS = 64  # held-out KL: all pairs m != n up to this many, else a fixed seeded sample


def effective_max_r(backbone: VisionTransformer, max_r: int) -> int:
    """R clamped to num_patches // 2: ToMe caps r at half the mergeable tokens of the first block, so
    larger degrees are the same model and would train sub-plugins that map a model onto itself."""
    return max(1, min(max_r, backbone.patch_embed.num_patches // 2))


def build_backbone(spec: ViTSpec, encoder: BackboneWeights | None, seed: int) -> VisionTransformer:
    """The backbone without a head: the starting weights when given, else a seeded random init."""
    torch.manual_seed(seed)
    model = spec.build(num_classes=0)
    if encoder is not None:
        encoder.load_into(model, spec.arch)
    return model


class SelfDistillation(nn.Module):
    """The frozen ToMe-patched backbone with a TokenCompensator plugged into its qkv projections."""

    def __init__(self, backbone: VisionTransformer, tocom: TokenCompensator, scale: float) -> None:
        super().__init__()
        self.backbone = apply_tome(backbone.requires_grad_(False), r=0)
        self.token_compensator = tocom
        self._plug = plug(self.backbone, tocom, 0, 0, scale)

    def train(self, mode: bool = True) -> SelfDistillation:
        """ToCom's dropout follows `mode`; the frozen backbone always runs in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor, r: int, delta: tuple[int, int] | None = None) -> torch.Tensor:
        """Pooled features (B, C) of x: (B, 3, H, W) at ToMe degree r, plus ToCom Delta(m -> n) when given."""
        set_tome_r(self.backbone, r)
        self._plug.enabled = delta is not None
        if delta is not None:
            self._plug.source_r, self._plug.target_r = delta
        return self.backbone(x.to(self.backbone.patch_embed.proj.weight.dtype))

    def forward(self, x: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher at r = m without ToCom, student at r = n with Delta(m -> n)), each (B, C)."""
        with torch.no_grad():
            teacher = self.features(x, m)
        return teacher, self.features(x, n, (m, n))


def build_self_distillation(cfg: DistillNode, max_r: int, encoder: BackboneWeights | None,
                            seed: int) -> SelfDistillation:
    """The model every Ray Train worker builds: same seed, same backbone, same initial ToCom."""
    backbone = build_backbone(cfg.backbone, encoder, seed)
    tocom = TokenCompensator(len(backbone.blocks), backbone.embed_dim, cfg.rho, max_r, cfg.dropout)
    return SelfDistillation(backbone, tocom, cfg.scale)


def sample_pair(max_r: int, seed: int, step: int) -> tuple[int, int]:
    """(m, n), m != n, uniform over ordered pairs of {0..max_r}; a function of (seed, step) only."""
    return tuple(random.Random(hash((seed, step))).sample(range(max_r + 1), 2))


@dataclass(frozen=True)
class WithDegreePairs:
    """A Recipe data source: each micro-batch (x,) of `batches` as (x, (m, n)), one pair per optimizer
    step, so every rank and accumulation chunk of a step distils the same pair."""

    batches: TensorBatches
    max_r: int

    def __call__(self, ctx: DataContext) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
        for i, (x,) in enumerate(self.batches(ctx)):
            yield x, sample_pair(self.max_r, ctx.seed, ctx.start_step + i // ctx.grad_accum)


def distill_loss(tau: float, model: nn.Module, batch: tuple[torch.Tensor, tuple[int, int]]):
    """KL(teacher@m || student@n + Delta(m -> n)) on softmax of the features; x: (B, 3, H, W) uint8."""
    x, (m, n) = batch
    teacher, student = model(normalize(x), m, n)
    return tocom_kl_loss(teacher.float(), student.float(), tau), {}


def degree_pairs(max_r: int, limit: int = MAX_PAIRS) -> list[tuple[int, int]]:
    """All ordered pairs m != n of {0..max_r}, or a fixed sample of `limit` of them."""
    pairs = [(m, n) for m in range(max_r + 1) for n in range(max_r + 1) if m != n]
    return pairs if len(pairs) <= limit else sorted(random.Random(0).sample(pairs, limit))


def corpus(uri: str, size: int, heldout: int, part: str) -> tuple[torch.Tensor]:
    """The corpus "train" split as (images (N, 3, S, S) uint8,): the last `heldout` rows are held out."""
    x, _ = cached_split(uri, "train", size)
    if heldout >= len(x):
        raise ValueError(f"dataset {uri}: heldout={heldout} leaves no training images of {len(x)}")
    return (x[:-heldout],) if part == "train" else (x[-heldout:],)


@dataclass
class FrozenSide:
    """What the held-out KL takes from the frozen backbone alone: the teacher's features per (image batch, m)
    and the KL without ToCom. They cannot change while only ToCom trains, so the first evaluation computes them
    and the later ones reuse them (a third of the student passes and every teacher pass)."""

    teacher: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    kl_without: float | None = None


@torch.no_grad()
def heldout_kl(model: SelfDistillation, x: torch.Tensor, pairs: list[tuple[int, int]], tau: float,
               batch: int = 128, frozen: FrozenSide | None = None) -> dict[str, float]:
    """KL(teacher@m || student@n) without and with ToCom Delta(m -> n), averaged over pairs and images;
    x: (N, 3, S, S) uint8. `frozen`: the backbone's side from an earlier call on the same backbone and images
    (filled here when empty)."""
    frozen = frozen if frozen is not None else FrozenSide()
    fill = frozen.kl_without is None
    device = model.backbone.patch_embed.proj.weight.device
    without = with_ = 0.0
    for i in range(0, len(x), batch):
        xb = normalize(x[i:i + batch]).to(device)
        weight = len(xb) / (len(x) * len(pairs))
        for m in sorted({m for m, _ in pairs}):
            if fill:
                frozen.teacher[i, m] = model.features(xb, m).float()
            teacher = frozen.teacher[i, m]
            for n in (n for mm, n in pairs if mm == m):
                if fill:
                    without += weight * tocom_kl_loss(teacher, model.features(xb, n).float(), tau).item()
                with_ += weight * tocom_kl_loss(teacher, model.features(xb, n, (m, n)).float(), tau).item()
    if fill:
        frozen.kl_without = without
    return {"heldout_kl_without": frozen.kl_without, "heldout_kl_with": with_,
            "heldout_kl_ratio": with_ / max(frozen.kl_without, 1e-12)}


def evaluate_distillation(cfg: DistillNode, encoder: BackboneWeights | None, seed: int, uri: str,
                          pairs: list[tuple[int, int]], frozen: FrozenSide, model: SelfDistillation
                          ) -> dict[str, float]:
    """Rank 0, at each checkpoint: held-out KL, and whether the backbone still equals its initial weights
    (only then is `frozen`, the backbone's side of the KL, reused). The training's random stream (ToCom's
    dropout) goes on as if no evaluation had run: the reference backbone is seeded on a forked one."""
    with torch.random.fork_rng(devices=[]):
        reference = build_backbone(cfg.backbone, encoder, seed).state_dict()
    now = model.backbone.state_dict()
    unchanged = now.keys() == reference.keys() and all(
        torch.equal(now[k].cpu(), reference[k].to(now[k].dtype)) for k in reference)
    x = corpus(uri, cfg.backbone.img_size, cfg.heldout, "heldout")[0]
    kl = heldout_kl(model, x, pairs, cfg.tau, frozen=frozen if unchanged else None)
    return {"backbone_unchanged": float(unchanged), **kl}


def run(ctx: StageContext, cfg: DistillNode, inputs: dict[str, Manifest]) -> StageResult:
    uri, size = DataOutputs.of(inputs["corpus"]).uri(ctx.store), cfg.backbone.img_size
    encoder = starting_weights(ctx.store, inputs, cfg.backbone)
    backbone_kind = backbone_tag(encoder)
    ctx.set_tags({"vitpipe.backbone": backbone_kind})
    max_r = effective_max_r(build_backbone(cfg.backbone, encoder, ctx.seed), cfg.max_r)
    pairs = degree_pairs(max_r)
    recipe = Recipe(
        build_model=functools.partial(build_self_distillation, cfg, max_r, encoder, ctx.seed),
        data=WithDegreePairs(TensorBatches(functools.partial(corpus, uri, size, cfg.heldout, "train")), max_r),
        loss=functools.partial(distill_loss, cfg.tau),
        evaluate=functools.partial(evaluate_distillation, cfg, encoder, ctx.seed, uri, pairs, FrozenSide()),
    )
    fitted = ctx.fit(recipe, cfg.train, cfg.resources)
    if fitted.metrics.get("backbone_unchanged") != 1.0:
        raise RuntimeError(f"distill {ctx.key}: the frozen backbone changed during training")
    compensator = fitted.model.token_compensator
    ctx.writer.put_bytes("tocom.safetensors", save_tocom(compensator))
    metrics = {
        **{k: fitted.metrics[k] for k in ("heldout_kl_without", "heldout_kl_with", "heldout_kl_ratio",
                                          "backbone_unchanged")},
        "tocom_params": float(sum(p.numel() for p in compensator.parameters())),
        "train_seconds": fitted.seconds,
        **fitted.final,
    }
    outputs = DistillOutputs(max_r=max_r, rho=cfg.rho, scale=cfg.scale, pairs=len(pairs), backbone=backbone_kind,
                             backbone_key=backbone_identity(inputs, cfg.backbone))
    return StageResult(metrics=metrics, outputs=outputs)
