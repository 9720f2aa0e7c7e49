"""Training cost and stored bytes of every PEFT method, measured in one run, as ratios to `full`:

1. training step time: forward, cross-entropy, backward and AdamW step over the method's trainable parameters;
2. step memory: parameters (frozen backbone included) + gradients + AdamW state + activations saved for backward;
3. bytes stored per task: delta_nbytes(delta_state), with and without the classification head.

Model: vitpipe_tiny_patch4_32 widened to width 192, depth 6, 3 heads (32 px, 65 tokens, 2.7M parameters), so
method differences are not lost in fixed costs; each method at its default config, one fixed batch of 64 random
images and labels (10 classes), train mode, 2 torch threads. Every method gets warm-up steps, then the timed steps
run in rounds, one step of each method per round in an order rotated by one each round, so load from other
processes falls on all of them alike; a time ratio is the median over rounds of that round's method / full ratio.

Memory is counted, not sampled: torch's CPU allocator reports no peak, and process RSS mixes in the allocator's
caching. Activations are what autograd keeps for backward, collected with torch.autograd.graph.saved_tensors_hooks
in one extra step and summed over distinct storages, parameters excluded (a frozen weight saved for the input
gradient is not extra memory); gradient and AdamW-state bytes are read off the tensors after that step. The sum
is what is live when backward starts (gradients counted as if already allocated); allocator slack and transient
temporaries are not included.

Usage: python benchmarks/bench_peft.py [--batch 64] [--warmup 1] [--rounds 6] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from recording import Bench, interleaved_args
from torch import nn

from vitpipe.models.peft import PEFT_METHODS, PeftMethod
from vitpipe.models.vit import build_vit

MIB = 2**20
ARCH = dict(arch="vitpipe_tiny_patch4_32", num_classes=10, embed_dim=192, depth=6, num_heads=3)


@dataclass
class Run:
    """One method's model and optimizer, trained on the shared batch."""

    method: PeftMethod
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One training step; returns its wall time in seconds."""
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - t0


def prepare(name: str) -> Run:
    torch.manual_seed(0)
    method = PEFT_METHODS[name]
    model = method.apply(build_vit(**ARCH)).train()
    return Run(method, model, torch.optim.AdamW(method.trainable_parameters(model).values()))


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory(run: Run, images: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """Bytes of parameters, gradients, AdamW state and saved activations in one training step."""
    params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(run.model(images), labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    states = [t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return {
        "parameters": _nbytes(run.model.parameters()),
        "gradients": _nbytes(p.grad for p in run.model.parameters() if p.grad is not None),
        "adamw": _nbytes(states),
        "activations": sum(saved.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    interleaved_args(parser, batch=64, warmup=1, rounds=6, unit="steps per method (besides the memory step)")
    bench = Bench(parser, threads=2)
    args = bench.args

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, ARCH["num_classes"], (args.batch,), generator=gen)
    runs = {name: prepare(name) for name in PEFT_METHODS}
    for run in runs.values():
        for _ in range(args.warmup):
            run.step(images, labels)
    memory = {name: step_memory(run, images, labels) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(runs[name].step(images, labels))

    full_mem = sum(memory["full"].values())
    deltas = {name: run.method.delta_state(run.model) for name, run in runs.items()}
    full_delta = PeftMethod.delta_nbytes(deltas["full"])
    lines = [
        "| method | trainable params (no head) | step ms | step / full | step memory MiB | memory / full "
        "| activations MiB | delta bytes | delta bytes (no head) | delta / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        trainable = run.method.trainable_parameters(run.model)
        params = sum(p.numel() for key, p in trainable.items() if not key.startswith("head."))
        step_ratio = statistics.median(t / t_full for t, t_full in zip(times[name], times["full"], strict=True))
        mem = sum(memory[name].values())
        delta = run.method.delta_nbytes(deltas[name])
        delta_no_head = run.method.delta_nbytes({k: v for k, v in deltas[name].items() if not k.startswith("head.")})
        lines.append(
            f"| {name} | {params:,} | {1e3 * statistics.median(times[name]):.0f} | {step_ratio:.2f} "
            f"| {mem / MIB:.1f} | {mem / full_mem:.2f} | {memory[name]['activations'] / MIB:.1f} "
            f"| {delta:,} | {delta_no_head:,} | {delta / full_delta:.4f} |"
        )
    bench.report(lines, f"{torch.get_num_threads()} torch threads",
                 f"{args.warmup} warm-up + 1 memory + {args.rounds} timed steps x {len(runs)} methods",
                 note=f"batch {args.batch}, {args.rounds} interleaved rounds", table=True)


if __name__ == "__main__":
    main()
