"""The GPU figures of the pretrain and ToMe/ToCom benchmarks, measured in one run on one CUDA device:

1. pretrain: ViT-B/16 at 224 px with the pretrain stage's default objective (LocalMIM on blocks 2, 4, 10, 12 +
   SimCLR with the InfoCL RC regularizer), bf16 autocast, fused AdamW, one bare training loop on random
   in-memory views (no data loading): images/s, and model FLOPs utilisation = counted FLOPs of one step
   (forward + backward, torch.utils.flop_counter) x steps/s / the chip's dense bf16 peak. Also LocalMIM alone.
2. ToMe: inference images/s of ViT-S/16 at 224 px (random weights), fp16, at r in {0, 4, 8, 13, 16}, as ratios to
   r = 0 (the ToMe paper: ~2x at r = 13 for DeiT-S on a V100); ToCom 0 -> 13 plugged as hooks and merged into
   the weights, as latency ratios to the same model at r = 13 without ToCom; with --compile, also r = 0 and
   r = 13 through torch.compile (eager ToMe is many small kernels, which a GPU feels more than a CPU).

Timing: CUDA-synchronised wall clock over a fixed number of steps after warm-up. Needs torch, timm and pydantic
only (no Ray, DeepSpeed or MLflow), so it runs on a bare GPU image.

Usage: python benchmarks/bench_gpu.py [--batch 128] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitpipe.models.pretrain_objectives import PretrainObjective
from vitpipe.models.settings import PretrainObjectiveConfig
from vitpipe.models.tocom import TokenCompensator, merge_into_weights, plug
from vitpipe.models.tome import apply_tome, set_tome_r
from vitpipe.models.vit import build_vit

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Seconds per call of fn, device-synchronised, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def pretrain(arch: str, objective: PretrainObjectiveConfig, batch: int, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    vit = build_vit(arch, num_classes=0).to(device)
    obj = PretrainObjective(vit, objective).to(device)
    params = [p for m in (vit, obj) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), fused=True)
    views = torch.randn(2, batch, 3, 224, 224, device=device)

    def loss() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            return obj(vit, views[0], views[1])[0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    counter = FlopCounterMode(display=False)
    with counter:
        loss().backward()
    flops = counter.get_total_flops()
    seconds = timed(step, steps, warmup=3, device=device)
    peak = peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    return {
        "images_per_s": batch / seconds,
        "step_s": seconds,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def tome(batch: int, steps: int, device: str, compile_: bool) -> dict:
    dtype = torch.half if device == "cuda" else torch.float
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_small_patch16_224", pretrained=False), r=0).to(device, dtype).eval()
    tocom = TokenCompensator.for_backbone(model).to(device, dtype).eval()
    for block in tocom.blocks:
        torch.nn.init.normal_(block.b_q.weight, std=0.02)
        torch.nn.init.normal_(block.b_v.weight, std=0.02)
    plugged, merged = copy.deepcopy(model), copy.deepcopy(model)
    plug(plugged, tocom, source_r=0, target_r=13)
    merge_into_weights(merged, tocom, source_r=0, target_r=13)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    result = {}
    with torch.inference_mode():
        for name, m, r in [
            *((f"r={r}", model, r) for r in (0, 4, 8, 13, 16)),
            ("tocom_plugged_r=13", plugged, 13),
            ("tocom_merged_r=13", merged, 13),
        ]:
            set_tome_r(m, r)
            result[name] = batch / timed(lambda m=m: m(images), steps, warmup=3, device=device)
        if compile_:  # the same models through torch.compile (default mode), one copy per degree
            for r in (0, 13):
                compiled = copy.deepcopy(model)
                set_tome_r(compiled, r)
                try:
                    compiled = torch.compile(compiled)
                    result[f"compiled_r={r}"] = batch / timed(lambda m=compiled: m(images), steps, 3, device)
                except Exception as error:  # report, keep the eager figures
                    result[f"compiled_r={r}"] = f"failed: {type(error).__name__}: {error}"[:300]
    base = result["r=0"]
    return {
        "images_per_s": result,
        "speedup_vs_r0": {k: v / base for k, v in result.items() if k.startswith("r=")},
        "compiled_speedup_r13_vs_r0": (
            result["compiled_r=13"] / result["compiled_r=0"]
            if isinstance(result.get("compiled_r=13"), float) and isinstance(result.get("compiled_r=0"), float)
            else None
        ),
        "tocom_plugged_latency_ratio": result["r=13"] / result["tocom_plugged_r=13"],
        "tocom_merged_latency_ratio": result["r=13"] / result["tocom_merged_r=13"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128, help="pretrain batch")
    parser.add_argument("--tome-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--device", default="cuda", help="cpu only to check the script, not for figures")
    parser.add_argument("--parts", default="pretrain,tome", help="comma-separated: pretrain, tome")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd ToMe at r = 0 and 13")
    parser.add_argument("--arch", default="vit_base_patch16_224", help="pretrain backbone (timm name)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    figures = {
        "device": name,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pretrain_batch": args.batch,
        "tome_batch": args.tome_batch,
    }
    print(figures, flush=True)
    parts = set(args.parts.split(","))
    if "pretrain" in parts:
        figures["pretrain_full"] = pretrain(args.arch, PretrainObjectiveConfig(), args.batch, args.steps, dev)
        print("pretrain (LocalMIM + SimCLR + RC):", figures["pretrain_full"], flush=True)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        figures["pretrain_localmim"] = pretrain(
            args.arch, PretrainObjectiveConfig(weights={"localmim": 1.0}), args.batch, args.steps, dev
        )
        print("pretrain (LocalMIM only):", figures["pretrain_localmim"], flush=True)
    if "tome" in parts:
        figures["tome"] = tome(args.tome_batch, args.steps * 2, dev, args.compile)
        print("tome:", json.dumps(figures["tome"], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
