"""Pruning, measured in one run: test-accuracy drop and CPU latency / throughput ratios of a small ViT trained on
digits, pruned by ResRep (or C-SGD) at keep ratios {1.0, 0.75, 0.5}, each also deployed with ToMe at r and the
ToCom Delta(0 -> r) merged into its weights. Every ratio is against the same unpruned model, timed in alternation
with it (tasks.prune.cpu_speed).

The model: the tiny ViT (32 px, width 64, depth 4, 4 heads) fully trained on sklearn's digits. As in the prune
stage, after the exact conversion the head is refitted as a linear probe on the pruned features when that is
better on val (not again after ToMe); the unpruned reference gets the same refit, so the drops compare like
with like. ToCom is self-distilled on the reference (KL of its logits, teacher at r = m, student at
r = n + Delta(m -> n)) on the digits train split.

Usage: python benchmarks/bench_prune.py [--method resrep] [--train-steps 400] [--prune-steps 100] [--record]
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from recording import record
from torch import nn

from vitpipe.cluster.config import TrainConfig
from vitpipe.cluster.train import warmup_cosine
from vitpipe.models.heads import fold_whitening
from vitpipe.models.prune import PRUNERS, count_flops, count_params, merge_tocom_pruned
from vitpipe.models.settings import PruneSettings
from vitpipe.models.tocom import TokenCompensator
from vitpipe.models.tome import apply_tome
from vitpipe.models.vit import build_vit
from vitpipe.tasks.classification import accuracy, cached_split, classification_loss, flip
from vitpipe.tasks.distill.stage import SelfDistillation, distill_loss, sample_pair
from vitpipe.tasks.prepare.spec import DataNode, DataOutputs
from vitpipe.tasks.prune.stage import cpu_speed, reprobe

KEEP_RATIOS = (1.0, 0.75, 0.5)
SCALES = (0.05, 0.08, 0.1, 0.12, 0.15)


def train(model: nn.Module, params: list[nn.Parameter], loss_fn: Callable, batches: Callable, steps: int,
          lr: float, seed: int) -> None:
    """AdamW with warm-up + cosine (the shared loop's schedule); batches(step, generator) gives each batch."""
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.0)
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        loss, _ = loss_fn(model, batches(step, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    model.eval()


def labelled(x: torch.Tensor, y: torch.Tensor) -> Callable:
    """Random batches of 64 labelled images with random flips."""
    def batch(step: int, gen: torch.Generator):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        return flip((x[idx], y[idx]), gen)
    return batch


def digits_uri(work: Path) -> str:
    """The digits dataset written by the data stage into a throw-away store."""
    from vitpipe.cluster.store import LocalStore
    from vitpipe.pipelines.execute import run_stage

    store = LocalStore(str(work / "store"))
    manifest = run_stage("data", "digits", DataNode(source="digits"), {}, store, train_storage=str(work / "ray"))
    return DataOutputs.of(manifest).uri(store)


def distill_tocom(model: nn.Module, images: torch.Tensor, max_r: int, steps: int) -> TokenCompensator:
    tocom = TokenCompensator(len(model.blocks), model.embed_dim, rho=2, max_r=max_r)
    student = SelfDistillation(copy.deepcopy(model), tocom, scale=0.1)

    def batch(step: int, gen: torch.Generator):
        return images[torch.randint(0, len(images), (64,), generator=gen)], sample_pair(max_r, 1, step)

    train(student, list(tocom.parameters()), functools.partial(distill_loss, 1.0), batch, steps, 2e-3, 1)
    return tocom.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="resrep", choices=sorted(PRUNERS))
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--prune-steps", type=int, default=100)
    parser.add_argument("--tocom-steps", type=int, default=200)
    parser.add_argument("--tome-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one CPU, as a prune node's measurement

    with tempfile.TemporaryDirectory() as tmp:
        uri = digits_uri(Path(tmp))
        x, y = cached_split(uri, "train", 32)
        torch.manual_seed(0)
        base = build_vit("vitpipe_tiny_patch4_32", num_classes=10)
        train(base, list(base.parameters()), classification_loss, labelled(x, y), args.train_steps, 1e-3, 0)
        base, _ = reprobe(base, uri, 32)  # the reference gets the same head refit as the pruned models
        base.head = fold_whitening(base.head)
        tocom = distill_tocom(base, x, args.tome_r, args.tocom_steps)

        models: dict[str, nn.Module] = {"unpruned": base}
        for k in KEEP_RATIOS:
            settings = PruneSettings(keep_ratio=k, steps=args.prune_steps)
            pruned = PRUNERS[args.method].prepare(copy.deepcopy(base), settings)
            train(pruned, list(pruned.parameters()), classification_loss, labelled(x, y), args.prune_steps, 1e-3, 2)
            structure = PRUNERS[args.method].convert(pruned)
            pruned, _ = reprobe(pruned, uri, 32)  # as the prune stage: the head refitted, if better on val
            pruned.head = fold_whitening(pruned.head)
            models[f"keep {k}"] = pruned
            val = {}
            for s in SCALES:
                candidate = merge_tocom_pruned(copy.deepcopy(pruned), tocom, structure, 0, args.tome_r, s)
                val[s] = accuracy(apply_tome(candidate, args.tome_r), uri, "val", 32)
            best = max(SCALES, key=val.__getitem__)
            merged = merge_tocom_pruned(copy.deepcopy(pruned), tocom, structure, 0, args.tome_r, best)
            models[f"keep {k} + ToMe r={args.tome_r} + ToCom (s={best})"] = apply_tome(merged, args.tome_r)
            without = apply_tome(copy.deepcopy(pruned), args.tome_r)
            models[f"keep {k} + ToMe r={args.tome_r} without ToCom"] = without
        acc = {name: accuracy(m, uri, "test", 32) for name, m in models.items()}
        speed = cpu_speed(models, 32, args.repeats)

    ref, ref_speed = acc["unpruned"], speed["unpruned"]
    ref_flops = count_flops(base, 32)
    lines = [f"unpruned: test accuracy {ref:.4f}, {count_params(base) / 1e3:.1f}K params, "
             f"{ref_flops / 1e6:.1f} MFLOPs, {ref_speed['latency_ms_b1']:.2f} ms at batch 1, "
             f"{ref_speed['throughput_b64']:.0f} img/s at batch 64"]
    for name, model in list(models.items())[1:]:
        s = speed[name]
        lines.append(
            f"{args.method} {name}: accuracy {acc[name]:.4f} (drop {ref - acc[name]:+.4f}), "
            f"params x{count_params(model) / count_params(base):.3f}, FLOPs x{count_flops(model, 32) / ref_flops:.3f}, "
            f"latency b1 x{s['latency_ms_b1'] / ref_speed['latency_ms_b1']:.3f}, "
            f"throughput b64 x{s['throughput_b64'] / ref_speed['throughput_b64']:.3f}")
    print("\n".join(lines))
    if args.record:
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU"
        record(f"{machine}, {args.method}, train {args.train_steps} / prune {args.prune_steps} / ToCom "
               f"{args.tocom_steps} steps", lines)


if __name__ == "__main__":
    main()
