"""Structured pruning (ResRep, C-SGD), ToCom on pruned heads, cost counters and the deployable export."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vitpipe.models.deploy import DeployError, export, load
from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.prune import (
    PRUNERS,
    Compactor,
    PruneError,
    PruneSettings,
    block_widths,
    count_flops,
    count_params,
    keep_count,
    kmeans,
    merge_tocom_pruned,
    unpruned_structure,
)
from vitpipe.models.tocom import TokenCompensator, merge_into_weights
from vitpipe.models.tome import apply_tome
from vitpipe.models.vit import build_vit

ROOT = Path(__file__).resolve().parents[2]
WIDTH, HIDDEN, HEADS, DEPTH, TOKENS = 64, 256, 4, 4, 65  # the tiny ViT: 64 patches + cls


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_vit("vitpipe_tiny_patch4_32", num_classes=10).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def task_steps(model, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """A few SGD steps on a fixed batch so compactors / clusters move away from their initial values."""
    y = torch.arange(len(x)) % 10
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method", ["resrep", "csgd"])
@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5, 0.25])
def test_training_to_the_end_of_the_schedule_makes_the_conversion_exact(images: torch.Tensor, method: str,
                                                                        ratio: float) -> None:
    model = PRUNERS[method].prepare(tiny(), PruneSettings(keep_ratio=ratio, steps=4))
    with torch.no_grad():
        start = model(images)
    task_steps(model, images, steps=4)
    with torch.no_grad():
        trained = model(images)
    structure = PRUNERS[method].convert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained, rtol=1e-5, atol=1e-5)
    assert (trained - start).abs().max() > 1e-3  # training (and the fade) changed the model: the check has teeth
    expected = {"mlp_hidden": keep_count(HIDDEN, ratio), "num_heads": keep_count(HEADS, ratio)}
    assert block_widths(model) == [expected] * DEPTH
    assert [len(s["mlp"]) for s in structure] == [expected["mlp_hidden"]] * DEPTH
    assert all(type(b.mlp.fc1) is torch.nn.Linear and type(b.mlp.fc2) is torch.nn.Linear
               and type(b.attn.qkv) is torch.nn.Linear and type(b.attn.proj) is torch.nn.Linear for b in model.blocks)


@pytest.mark.parametrize("method", ["resrep", "csgd"])
def test_conversion_refuses_a_model_that_has_not_reached_its_structure(images: torch.Tensor, method: str) -> None:
    model = PRUNERS[method].prepare(tiny(), PruneSettings(keep_ratio=0.5, steps=8))
    task_steps(model, images, steps=5)  # the fade has begun (forward 5 of 8) but not ended
    with pytest.raises(PruneError, match=r"block 0 mlp: .* at forward 5 of 8: train to the end"):
        PRUNERS[method].convert(model)
    with torch.no_grad():
        before = model(images)
        imposed = PRUNERS[method].impose(model)(images)
    assert (before - imposed).abs().max() > 1e-3  # imposing the structure is lossy
    PRUNERS[method].convert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), imposed, rtol=1e-5, atol=1e-5)


def test_resrep_forgotten_rows_get_only_the_penalty_and_shrink() -> None:
    torch.manual_seed(0)
    compactor = Compactor(8, 2, keep=2, lam=0.5, steps=2).train()
    with torch.no_grad():
        compactor.weight.mul_(torch.tensor([1.0, 1.0, 0.5, 0.5, 2.0, 2.0, 0.9, 0.9])[:, None])
    x = torch.randn(16, 8)
    (compactor(x) ** 2).sum().backward()
    forget = compactor.forget.clone()
    assert forget.tolist() == [False, True, False, True]  # the two smallest-norm groups of four
    w, g = compactor.weight.detach(), compactor.weight.grad
    rows = forget.repeat_interleave(2)
    group_norm = w.reshape(4, -1).norm(dim=1).repeat_interleave(2)[:, None]
    penalty = 0.5 * w / group_norm  # the official form: on every row
    torch.testing.assert_close(g[rows], penalty[rows])  # forgotten rows: the task gradient is masked
    reference = w.clone().requires_grad_()
    ((x @ reference) ** 2).sum().backward()
    torch.testing.assert_close(g[~rows], reference.grad[~rows] + penalty[~rows])

    opt = torch.optim.SGD(compactor.parameters(), lr=0.2)
    start = compactor.weight.detach().reshape(4, -1).norm(dim=1)
    for _ in range(20):
        opt.zero_grad()
        (compactor(x) ** 2).mean().backward()
        opt.step()
    end = compactor.weight.detach().reshape(4, -1).norm(dim=1)
    # a fixed-step subgradient reaches ~0, then oscillates within one step (lr * lambda = 0.1) of it
    assert (end[forget] <= 0.1 + 1e-6).all() and (start[forget] > 0.7).all(), (start, end)


def test_resrep_saliency_forgets_the_channels_that_carry_least_output() -> None:
    """Identity rows all have norm 1: "norm" falls back to the index order, "saliency" sees input energy
    times the next layer's column (channel 0 is never used downstream, channel 3 has almost no input)."""
    out_weight = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    x = torch.randn(64, 4) * torch.tensor([1.0, 1.0, 1.0, 0.01])
    chosen = {}
    for criterion in ("saliency", "norm"):
        compactor = Compactor(4, 1, keep=2, lam=1e-4, steps=2, criterion=criterion).train()
        compactor(x, out_weight).sum().backward()
        chosen[criterion] = compactor.forget.tolist()
    assert chosen == {"saliency": [True, False, False, True], "norm": [True, True, False, False]}
    with pytest.raises(PruneError, match="unknown ResRep criterion 'mag'"):
        Compactor(4, 1, keep=2, lam=1e-4, steps=2, criterion="mag")


def test_resrep_forget_set_ramps_up() -> None:
    compactor = Compactor(10, 1, keep=2, lam=1.0, steps=8).train()  # grows over 4 forwards, fades over 4
    x = torch.randn(3, 10)
    counts, fades = [], []
    for _ in range(6):
        compactor.weight.grad = None
        compactor(x).sum().backward()
        counts.append(int((compactor.weight.grad.abs().sum(dim=1) == 1.0).sum()))  # penalty rows: |e_i| = 1
        fades.append(compactor.schedule.fade)
    assert counts == [2, 4, 6, 8, 8, 8]
    assert fades == [1.0, 1.0, 1.0, 1.0, 0.75, 0.5]
    with torch.no_grad():
        rows = compactor.forget
        torch.testing.assert_close(compactor.eval()(torch.eye(10))[rows], 0.5 * compactor.weight[rows])


def test_resrep_global_selection_keeps_the_total_and_converts_exactly(images: torch.Tensor) -> None:
    """selection: global pools each kind's groups model-wide: the same total kept as per-block ratios, at least
    one per block, widths free to differ, the conversion still exact, and a copy of the model (as a rebuilt or
    resumed one) keeps the choice."""
    settings = PruneSettings(keep_ratio=0.5, steps=8, selection="global")
    model = PRUNERS["resrep"].prepare(tiny(), settings)
    with torch.no_grad():  # make block 0's MLP carry little output: global selection should take more from it
        model.blocks[0].mlp.fc2.linear.weight.mul_(0.01)
    task_steps(model, images, steps=8)
    with torch.no_grad():
        trained = model(images)
    copied = copy.deepcopy(model)
    structure = PRUNERS["resrep"].convert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained, rtol=1e-5, atol=1e-5)
    widths = block_widths(model)
    assert sum(w["mlp_hidden"] for w in widths) == DEPTH * keep_count(HIDDEN, 0.5)
    assert sum(w["num_heads"] for w in widths) == DEPTH * keep_count(HEADS, 0.5)
    assert min(w["mlp_hidden"] for w in widths) >= 1 and min(w["num_heads"] for w in widths) >= 1
    assert widths[0]["mlp_hidden"] < keep_count(HIDDEN, 0.5) < max(w["mlp_hidden"] for w in widths)
    assert PRUNERS["resrep"].convert(copied) == structure  # the pool moved with the copy, the choice held


def test_resrep_global_selection_survives_a_resume_in_the_fade(images: torch.Tensor) -> None:
    """A model rebuilt from a checkpoint taken in the second half (the choice made, the fade under way) goes on
    with the checkpointed choice, exactly as the uninterrupted model."""
    settings = PruneSettings(keep_ratio=0.5, steps=8, selection="global")
    torch.manual_seed(0)
    whole = PRUNERS["resrep"].prepare(tiny(), settings)
    task_steps(whole, images, steps=6)
    resumed = PRUNERS["resrep"].prepare(tiny(), settings)
    resumed.load_state_dict(whole.state_dict())
    for model in (whole, resumed):
        task_steps(model, images, steps=2)
    assert PRUNERS["resrep"].convert(resumed) == PRUNERS["resrep"].convert(whole)


def test_kmeans_is_seeded_and_fills_every_cluster() -> None:
    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    a, b = kmeans(points, 7, seed=3), kmeans(points, 7, seed=3)
    assert torch.equal(a, b) and sorted(a.unique().tolist()) == list(range(7))
    firsts = [int((a == c).nonzero()[0, 0]) for c in range(7)]
    assert firsts == sorted(firsts)  # clusters ordered by first member
    twins = torch.cat([points[:5], points[:5]])
    assert torch.equal(kmeans(twins, 5, seed=0)[:5], kmeans(twins, 5, seed=0)[5:])
    with pytest.raises(PruneError):
        kmeans(points, 41, seed=0)


def test_csgd_centripetal_training_makes_clusters_identical(images: torch.Tensor) -> None:
    model = PRUNERS["csgd"].prepare(tiny(), PruneSettings(keep_ratio=0.25, centripetal=5.0))

    def spread() -> float:
        fc1 = model.blocks[0].mlp.fc1
        count = int(fc1.row_groups.max()) + 1
        means = torch.zeros(count, WIDTH).index_add_(0, fc1.row_groups, fc1.weight.detach())
        means /= torch.bincount(fc1.row_groups, minlength=count)[:, None]
        return float((fc1.weight.detach() - means[fc1.row_groups]).norm())

    before = spread()
    task_steps(model, images, steps=60, lr=0.05)  # deviations shrink by (1 - lr * eps) = 0.75 per step
    assert spread() < 1e-5 * before
    with torch.no_grad():
        trained = model(images)
    PRUNERS["csgd"].convert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained, rtol=1e-4, atol=1e-4)


def test_keep_ratio_zero_or_above_one_is_a_clear_error() -> None:
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValidationError, match="keep_ratio"):
            PruneSettings(keep_ratio=bad)
        with pytest.raises(PruneError, match="0 < k <= 1"):
            keep_count(10, bad)
    with pytest.raises(ValidationError, match="head_keep_ratio"):
        PruneSettings(head_keep_ratio=0)
    with pytest.raises(PruneError, match="prepare first"):
        PRUNERS["resrep"].convert(tiny())


@pytest.mark.parametrize("method", ["resrep", "csgd"])
def test_params_and_flops_drop_as_computed_from_the_shapes(method: str) -> None:
    model = tiny()
    params, flops = count_params(model), count_flops(model, 32)
    PRUNERS[method].prepare(model, PruneSettings(keep_ratio=0.5, head_keep_ratio=0.75))
    PRUNERS[method].convert(PRUNERS[method].impose(model))
    units, heads, d = HIDDEN - 128, 1, WIDTH // HEADS  # removed per block
    # fc1 rows (+ bias) and fc2 columns; a head's q, k, v rows (+ biases) and proj columns
    removed_params = DEPTH * (units * (2 * WIDTH + 1) + heads * d * (4 * WIDTH + 3))
    # 2 FLOPs per multiply-add: fc1 + fc2, qkv + proj, and q k^T + attention @ v per token pair
    removed_flops = DEPTH * 2 * TOKENS * (2 * units * WIDTH + 4 * heads * d * WIDTH + 2 * heads * d * TOKENS)
    assert params - count_params(model) == removed_params
    assert flops - count_flops(model, 32) == removed_flops
    assert count_flops(apply_tome(model, 8), 32) < flops - removed_flops  # ToMe's fewer tokens are counted


def test_tocom_on_pruned_heads_equals_tocom_merged_before_pruning(images: torch.Tensor) -> None:
    torch.manual_seed(5)
    tocom = TokenCompensator(DEPTH, WIDTH, rho=2, max_r=4)
    for block in tocom.blocks:
        torch.nn.init.normal_(block.b_q.weight, std=0.2)
        torch.nn.init.normal_(block.b_v.weight, std=0.2)
    settings = PruneSettings(keep_ratio=0.75, head_keep_ratio=0.5)
    first, second = (PRUNERS["resrep"].prepare(tiny(), settings) for _ in range(2))
    task_steps(first, images)
    second.load_state_dict(first.state_dict())
    merge_into_weights(first, tocom, 0, 4, scale=0.1)
    PRUNERS["resrep"].convert(first)
    structure = PRUNERS["resrep"].convert(second)
    merge_tocom_pruned(second, tocom, structure, 0, 4, scale=0.1)
    with torch.no_grad():
        torch.testing.assert_close(second(images), first(images), rtol=1e-5, atol=1e-5)
        plain, merged = tiny(), merge_into_weights(tiny(), tocom, 0, 4, 0.1)
        unpruned = merge_tocom_pruned(tiny(), tocom, unpruned_structure(plain), 0, 4, 0.1)
        torch.testing.assert_close(unpruned(images), merged(images))
        assert (merged(images) - plain(images)).abs().max() > 1e-3


def test_export_reloads_the_same_model_with_its_metadata(tmp_path: Path, images: torch.Tensor) -> None:
    model = PRUNERS["csgd"].prepare(tiny(), PruneSettings(keep_ratio=0.75, head_keep_ratio=0.5))
    PRUNERS["csgd"].convert(PRUNERS["csgd"].impose(model))
    apply_tome(model, 6)
    meta = {"keep_ratio": 0.75, "preprocess": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}
    written = export(model, tmp_path / "out", meta)
    reloaded = load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0)
    config = json.loads((tmp_path / "out" / "model.json").read_text())
    assert config == json.loads(json.dumps(written))
    assert config["tome"]["r"] == 6 and config["preprocess"]["img_size"] == 32 and config["keep_ratio"] == 0.75
    assert [(b["mlp_hidden"], b["num_heads"]) for b in config["architecture"]["blocks"]] == [(192, 2)] * DEPTH
    assert reloaded._tome_info.r == 6 and not reloaded.training
    (tmp_path / "out" / "model.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(DeployError, match="format"):
        load(tmp_path / "out")


def test_export_keeps_an_unmergeable_peft_branch(tmp_path: Path, images: torch.Tensor) -> None:
    method = PEFT_METHODS["bi_adapter"]
    model = method.apply(tiny(), {"dim": 8, "bits": 1}).eval()
    for name, p in model.named_parameters():
        if "adapter" in name:
            torch.nn.init.normal_(p, std=0.3)
    PRUNERS["resrep"].impose(PRUNERS["resrep"].prepare(model, PruneSettings(keep_ratio=0.5)))
    PRUNERS["resrep"].convert(model)
    export(model, tmp_path, {}, peft=(method, {"dim": 8, "bits": 1}))
    reloaded = load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), rtol=1e-6, atol=1e-6)
        without = load(tmp_path)
        for block in without.blocks:
            block.adapter.scale = 0.0
        assert (without(images) - model(images)).abs().max() > 1e-4  # the adapter is really part of it


def test_load_needs_none_of_the_training_code(tmp_path: Path) -> None:
    model = tiny()
    PRUNERS["resrep"].convert(PRUNERS["resrep"].impose(PRUNERS["resrep"].prepare(model, PruneSettings())))
    export(model, tmp_path, {})
    code = (f"import sys; from vitpipe.models.deploy import load; m = load({str(tmp_path)!r}); "
            "import torch; m(torch.zeros(1, 3, 32, 32)); "
            "print(sorted(n for n in ('vitpipe.cluster', 'vitpipe.tasks', 'vitpipe.pipelines', 'ray', 'deepspeed',"
            " 'mlflow', 'vitpipe.models.prune', 'vitpipe.models.peft') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_export_rebuilds_an_avg_pooled_layout_without_cls(tmp_path: Path, images: torch.Tensor) -> None:
    """global_pool="avg" puts the final norm in fc_norm: the rebuilt model must have it too."""
    torch.manual_seed(0)
    model = build_vit("vitpipe_tiny_patch4_32", num_classes=10, global_pool="avg", class_token=False).eval()
    PRUNERS["resrep"].convert(PRUNERS["resrep"].impose(PRUNERS["resrep"].prepare(model, PruneSettings())))
    export(model, tmp_path, {})
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path)(images), model(images), rtol=0, atol=0)
