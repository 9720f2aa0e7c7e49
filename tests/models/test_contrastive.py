"""InfoCL on a tiny timm ViT: loss exactness, RC keeping information a probe can read, BYOL's EMA, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

from vitpipe.models.contrastive import (
    InfoCL,
    InfoCLConfig,
    ReconstructionDecoder,
    info_nce_lower_bound,
    nt_xent,
    pooled_features,
)
from vitpipe.models.pretrain_objectives import PRETRAIN_OBJECTIVES, PretrainObjective
from vitpipe.models.settings import LocalMIMConfig, PretrainObjectiveConfig
from vitpipe.models.vit import build_vit

SMALL = dict(rc_widths=(16, 32, 16), proj_dim=32)  # narrow RC decoder and projector for CPU tests


def digits(start: int, stop: int, size: int = 16) -> torch.Tensor:
    """sklearn's 8x8 handwritten digits [start:stop], upscaled to (n, 3, size, size) grey RGB in [-1, 1]."""
    d = torch.tensor(load_digits().images[start:stop], dtype=torch.float32)[:, None] / 16
    return (F.interpolate(d, size=(size, size), mode="bilinear") * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def tint(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A strong random colour cast per image: the information two views do NOT share."""
    gain = torch.rand(images.shape[0], 3, 1, 1, generator=generator) * 1.6 + 0.2
    offset = torch.rand(images.shape[0], 3, 1, 1, generator=generator) - 0.5
    return images * gain + offset


def small_vit(seed: int = 0, depth: int = 2) -> VisionTransformer:
    """16 px, patch 4, width 32, 2 heads."""
    torch.manual_seed(seed)
    return build_vit("vitpipe_tiny_patch4_32", img_size=16, embed_dim=32, num_heads=2, depth=depth)


# ---------------------------------------------------------------------------------- the losses


def test_nt_xent_matches_the_per_anchor_definition() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    losses = []
    for i in range(10):
        sims = torch.exp(z @ z[i] / 0.5)
        positive = (i + 5) % 10
        losses.append(-torch.log(sims[positive] / (sims.sum() - sims[i])))  # 1 positive + 2N - 2 negatives
    assert torch.allclose(nt_xent(z1, z2, tau=0.5), torch.stack(losses).mean(), atol=1e-6)
    assert nt_xent(z1, z1 * 3.0) < nt_xent(z1, z2)  # scale-free: a view equal up to norm is a perfect positive


def _nt_xent_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo process: NT-Xent on this rank's slice of a fixed batch; saves loss and input gradients."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    n = len(z1) // world
    z1, z2 = (z[rank * n:(rank + 1) * n].clone().requires_grad_() for z in (z1, z2))
    loss = nt_xent(z1, z2, tau=0.5)
    loss.backward()
    save_file({"loss": loss.detach().reshape(1), "g1": z1.grad, "g2": z2.grad}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_nt_xent_across_ranks_equals_the_global_batch(tmp_path) -> None:
    """2 gloo ranks, each with half the batch: the rank-mean loss is the one-process loss on the whole batch,
    and each rank's gradient, averaged over ranks as data parallelism does, is the whole-batch gradient."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nt_xent_rank, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(8, 6, generator=g).requires_grad_() for _ in range(2))
    loss = nt_xent(z1, z2, tau=0.5)
    loss.backward()
    assert torch.allclose(torch.cat([r["loss"] for r in ranks]).mean(), loss.detach(), atol=1e-6)
    assert torch.allclose(torch.cat([r["g1"] for r in ranks]) / 2, z1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["g2"] for r in ranks]) / 2, z2.grad, atol=1e-6)


def test_lbe_estimator_matches_its_definition_and_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 4, generator=g) * 5
    h = mu + 0.1 * torch.randn(6, 4, generator=g)
    expected = -torch.stack([torch.logsumexp(-((h[i] - mu) ** 2).sum(1) / 20, 0) for i in range(6)]).mean()
    assert torch.allclose(info_nce_lower_bound(mu, h), expected, atol=1e-5)
    collapsed = torch.ones(6, 4)
    assert torch.allclose(info_nce_lower_bound(collapsed, collapsed), torch.tensor(-math.log(6)))
    assert info_nce_lower_bound(mu, h) > info_nce_lower_bound(collapsed, collapsed)  # spread features hold more


@pytest.mark.parametrize("size, ups", [(16, 2), (32, 3), (64, 4)])
def test_reconstruction_decoder_upsamples_to_the_view(size: int, ups: int) -> None:
    decoder = ReconstructionDecoder(24, size).eval()
    assert decoder(torch.randn(2, 24)).shape == (2, 3, size, size)
    convs = [m for m in decoder.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.stride[0] for m in convs] == [2] * ups + [1]
    assert [m.out_channels for m in convs][: min(ups, 3)] == [256, 128, 64][: min(ups, 3)]


def test_pooled_features_end_with_the_encoder_output() -> None:
    vit = small_vit(depth=4).eval()
    x = digits(0, 4)
    with torch.no_grad():
        features = pooled_features(vit, x, [1, 2, 3])
        assert torch.equal(features[-1], vit.forward_head(vit.forward_features(x), pre_logits=True))
    assert [f.shape for f in features] == [(4, 32)] * 3


# ------------------------------------------------------------------------- RC keeps information


@pytest.fixture(scope="module")
def pretrained() -> dict[float, tuple[VisionTransformer, list[float]]]:
    """SimCLR + RC at lambda 0 and 1: same seed, data and steps; 32 digits, fresh colour casts each step.

    Returns lambda -> (frozen encoder, eval contrastive loss on fixed views [before, after]).
    """
    images, fixed = digits(0, 32), torch.Generator().manual_seed(7)
    fixed_views = tint(images, fixed), tint(images, fixed)

    def evaluate(vit: VisionTransformer, objective: InfoCL) -> float:
        vit.eval(), objective.eval()
        with torch.no_grad():
            contrastive = objective(vit, *fixed_views)[1]["contrastive"]
        vit.train(), objective.train()
        return contrastive

    runs = {}
    for lam in (0.0, 1.0):
        vit = small_vit(seed=0)
        objective = InfoCL(vit, InfoCLConfig(regularizer="rc", lam=lam, **SMALL))
        optimizer = torch.optim.AdamW([*vit.parameters(), *objective.parameters()], lr=3e-3)
        generator, before = torch.Generator().manual_seed(1), evaluate(vit, objective)
        for _ in range(100):
            loss, _ = objective(vit, tint(images, generator), tint(images, generator))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs[lam] = (vit.eval(), [before, evaluate(vit, objective)])
    return runs


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_training_lowers_the_contrastive_loss(pretrained: dict, lam: float) -> None:
    before, after = pretrained[lam][1]
    assert after < 0.8 * before, (before, after)


def probe_mse(vit: VisionTransformer) -> float:
    """Held-out MSE of a ridge-regression decoder from the frozen pooled h to the (colour-cast) image."""
    g = torch.Generator().manual_seed(2)
    train, test = tint(digits(64, 448), g), tint(digits(448, 640), g)
    with torch.no_grad():
        h_train, h_test = (torch.cat([vit(x), torch.ones(len(x), 1)], dim=1) for x in (train, test))
    weights = torch.linalg.solve(h_train.T @ h_train + 1e-3 * torch.eye(h_train.shape[1]), h_train.T @ train.flatten(1))
    return F.mse_loss(h_test @ weights, test.flatten(1)).item()


def test_rc_regularizer_keeps_what_a_reconstruction_probe_needs(pretrained: dict) -> None:
    without, with_rc = probe_mse(pretrained[0.0][0]), probe_mse(pretrained[1.0][0])
    assert with_rc < 0.85 * without, (with_rc, without)


# ------------------------------------------------------------------- BYOL, LBE and determinism


def test_byol_target_is_an_ema_of_the_online_network_and_the_loss_drops() -> None:
    vit = small_vit()
    objective = InfoCL(vit, InfoCLConfig(base="byol", regularizer="none", **SMALL))
    assert objective.cfg.weight == 0.1 and not any(p.requires_grad for p in objective.target_encoder.parameters())
    optimizer = torch.optim.AdamW([*vit.parameters(), *objective.head.parameters()], lr=3e-3)
    images, generator, losses = digits(0, 16), torch.Generator().manual_seed(1), []
    for _ in range(30):
        target_before = [p.clone() for p in objective.target_encoder.parameters()]
        loss, stats = objective(vit, tint(images, generator), tint(images, generator))
        target_after = objective.target_encoder.parameters()
        for old, new, online in zip(target_before, target_after, vit.parameters(), strict=True):
            assert torch.allclose(new, 0.996 * old + 0.004 * online, atol=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(stats["contrastive"])
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


@pytest.mark.parametrize("regularizer", ["none", "rc", "lbe"])
@pytest.mark.parametrize("base", ["simclr", "byol"])
def test_evaluation_is_deterministic(base: str, regularizer: str) -> None:
    vit = small_vit(depth=4)
    objective = InfoCL(vit, InfoCLConfig(base=base, regularizer=regularizer, **SMALL))
    g = torch.Generator().manual_seed(0)
    views = tint(digits(0, 8), g), tint(digits(0, 8), g)
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    vit.eval(), objective.eval()
    with torch.no_grad():
        first, second = objective(vit, *views), objective(vit, *views)
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert torch.allclose(first[0], sum(first[1].values()), atol=1e-5)
    assert all(torch.equal(v, objective.state_dict()[k]) for k, v in state.items())  # no EMA step in eval
    if regularizer == "lbe":
        vit.train(), objective.train()
        with torch.no_grad():
            assert not torch.equal(objective(vit, *views)[0], objective(vit, *views)[0])  # h = mu + eps in training


# ------------------------------------------------------------------------- combined objective


def test_pretrain_objective_is_the_weighted_sum_of_its_branches() -> None:
    vit = small_vit(depth=4).eval()
    mim = LocalMIMConfig(taps=(0, 1, 2, 3), dec_dim=32, dec_heads=2)
    cfg = PretrainObjectiveConfig(weights={"localmim": 0.5, "infocl": 2.0}, localmim=mim, infocl=InfoCLConfig(**SMALL))
    combined = PretrainObjective(vit, cfg).eval()
    g = torch.Generator().manual_seed(0)
    view1, view2 = tint(digits(0, 8), g), tint(digits(0, 8), g)
    with torch.no_grad():
        torch.manual_seed(3)
        total, stats = combined(vit, view1, view2)
        torch.manual_seed(3)
        mim_loss, mim_stats = combined.objectives["localmim"](vit, view1)
        cl_loss, cl_stats = combined.objectives["infocl"](vit, view1, view2)
    assert torch.allclose(total, 0.5 * mim_loss + 2.0 * cl_loss)
    assert stats == {**mim_stats, **cl_stats, "localmim": mim_loss.item(), "infocl": cl_loss.item()}
    assert set(PRETRAIN_OBJECTIVES) == {"localmim", "infocl"}


def test_a_zero_weight_leaves_its_objective_out() -> None:
    vit = small_vit(depth=4)  # default LocalMIM taps are not distinct at depth 4: building it would raise
    combined = PretrainObjective(vit, PretrainObjectiveConfig(weights={"localmim": 0.0, "infocl": 1.0}))
    assert list(combined.objectives) == ["infocl"]
    _, stats = combined(vit, digits(0, 4), digits(4, 8))
    assert set(stats) == {"contrastive", "regularizer", "infocl"}
    for weights in ({"localmim": 0.0, "infocl": 0.0}, {"mae": 1.0}):
        with pytest.raises(ValidationError):
            PretrainObjectiveConfig(weights=weights)
