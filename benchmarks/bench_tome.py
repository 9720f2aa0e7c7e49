"""ToMe and ToCom inference speed on CPU, measured in one run:

1. images/s of timm ViT-S/16 at 224 px (random weights) patched with ToMe at r in {0, 4, 8, 13, 16}, as ratios
   to r = 0 (the ToMe paper: ~2x at r = 13 for DeiT-S on GPU; goal here >= 1.7x on CPU);
2. the latency ToCom (source_r 0 -> target_r 13) adds at r = 13, plugged as forward hooks (goal < 5%) and folded
   into the qkv weights (goal: none), as ratios to the same model without ToCom.

Eval mode, torch.inference_mode, one fixed random batch, 2 torch threads. Every configuration gets warm-up
forwards, then the timed forwards run in rounds, one forward of each configuration per round in an order rotated
by one each round, so load from other processes falls on all of them alike. A ratio is the median over rounds of
that round's per-configuration ratio; images/s is batch / median forward time.

Usage: python benchmarks/bench_tome.py [--batch 16] [--warmup 2] [--rounds 8] [--record]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from recording import Bench, interleaved_args
from torch import nn

from vitpipe.models.tocom import TokenCompensator, merge_into_weights, plug
from vitpipe.models.tome import apply_tome, set_tome_r

R_VALUES = (0, 4, 8, 13, 16)
TOCOM_R = 13


def tocom_models(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Copies of `model` with a ToCom 0 -> TOCOM_R plugged as hooks and merged into the weights.

    The B matrices get small random values (a fresh ToCom's are zero) so merging really changes the weights.
    """
    tocom = TokenCompensator.for_backbone(model).eval()
    for block in tocom.blocks:
        nn.init.normal_(block.b_q.weight, std=0.02)
        nn.init.normal_(block.b_v.weight, std=0.02)
    plugged, merged = copy.deepcopy(model), copy.deepcopy(model)
    plug(plugged, tocom, source_r=0, target_r=TOCOM_R)
    merge_into_weights(merged, tocom, source_r=0, target_r=TOCOM_R)
    return plugged, merged


def forward_seconds(model: nn.Module, r: int, images: torch.Tensor) -> float:
    set_tome_r(model, r)
    t0 = time.perf_counter()
    model(images)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    interleaved_args(parser, batch=16, warmup=2, rounds=8, unit="forwards per configuration")
    bench = Bench(parser, threads=2)
    args = bench.args

    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_small_patch16_224", pretrained=False).eval(), r=0)
    plugged, merged = tocom_models(model)
    configs = {f"r={r}": (model, r) for r in R_VALUES}
    configs |= {"plugged": (plugged, TOCOM_R), "merged": (merged, TOCOM_R)}
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    times: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for m, r in configs.values():
            for _ in range(args.warmup):
                forward_seconds(m, r, images)
        names = list(configs)
        for i in range(args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                times[name].append(forward_seconds(*configs[name], images))

    def ratio(name: str, reference: str) -> float:
        """Median over rounds of reference time / name time (> 1: name is faster)."""
        return statistics.median(t_ref / t for t_ref, t in zip(times[reference], times[name], strict=True))

    def img_s(name: str) -> float:
        return args.batch / statistics.median(times[name])

    lines = [
        f"ToMe r={r}: {img_s(f'r={r}'):.1f} img/s -> {ratio(f'r={r}', 'r=0'):.2f}x r=0"
        + (" (goal >= 1.7x)" if r == TOCOM_R else "")
        for r in R_VALUES
    ]
    reference = f"r={TOCOM_R}"
    lines += [
        f"ToCom 0->{TOCOM_R} plugged (hooks) at r={TOCOM_R}: latency {1 / ratio('plugged', reference):.3f}x "
        f"without ToCom (goal < 1.05)",
        f"ToCom 0->{TOCOM_R} merged into weights at r={TOCOM_R}: latency {1 / ratio('merged', reference):.3f}x "
        f"without ToCom (goal 1.00)",
    ]
    bench.report(lines, f"{torch.get_num_threads()} torch threads",
                 f"{args.warmup} warm-up + {args.rounds} timed forwards x {len(configs)} configurations",
                 note=f"batch {args.batch}, {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
