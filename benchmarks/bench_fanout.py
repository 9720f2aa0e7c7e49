"""Fan-out, measured in one run: K downstream finetune nodes through the runner against the same K
trainings one after another in one process, for K in {1, 2, 4, 8}.

For each K it prints the runner's wall time, the sequential wall time, their ratio (speed-up), and the
per-node scheduling overhead: a node's time as the runner sees it (launch -> manifest back) minus the
time spent inside the stage (model set-up, training, evaluation and writes).
The K nodes are K PEFT methods on one task; data and Ray are warmed up before anything is timed.

Usage: python benchmarks/bench_fanout.py [--steps 30] [--ks 1,2,4,8] [--gpu-fraction 0.125] [--record]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
import yaml
from recording import record

from vitpipe.cluster.store import open_store
from vitpipe.cluster.train import param_groups
from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import load_config
from vitpipe.tasks.classification import accuracy, cached_split, classification_loss, flip
from vitpipe.tasks.finetune.spec import FinetuneNode
from vitpipe.tasks.finetune.stage import build_model
from vitpipe.tasks.prepare.spec import DataOutputs

METHODS = ("linear", "bitfit", "lora", "adaptformer", "fact_tt", "fact_tk", "vpt", "full")
BATCH = 32


def pipeline_config(work: Path, task: str, k: int, steps: int, gpu_fraction: float) -> Path:
    """K finetune nodes on `task` (named per K so no node is cached; the data node is shared)."""
    data = {
        "name": f"bench-fanout-{task}", "work_dir": str(work), "experiment": "bench-fanout",
        "tasks": {task: {"source": "digits"}},
        "stages": {"finetune": {
            "methods": list(METHODS[:k]),
            "train": {"steps": steps, "batch_size": BATCH, "warmup_steps": 2, "checkpoint_every": steps,
                      "log_every": max(1, steps // 3)},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": gpu_fraction}}},
    }
    path = work / f"{task}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def through_runner(path: Path) -> tuple[float, list[float], list[float], list[FinetuneNode], dict]:
    """Wall time of the run; per finetune node: runner-side seconds and in-stage seconds."""
    cfg = load_config(path)
    started = time.perf_counter()
    summary = run(cfg, io.StringIO())
    wall = time.perf_counter() - started
    assert summary.ok, [o.error for o in summary.outcomes if o.error]
    nodes = [o for o in summary.outcomes if o.node.kind == "finetune"]
    assert all(o.status == "ran" for o in nodes)
    outputs = DataOutputs.of(next(o for o in summary.outcomes if o.node.kind == "data").manifest)
    data = {"classes": outputs.classes, "uri": outputs.uri(open_store(cfg.store_uri))}
    return (wall, [o.seconds for o in nodes], [o.manifest.timings["seconds"] for o in nodes],
            [o.node.cfg for o in nodes], data)


def sequential(configs: list[FinetuneNode], data: dict, device: torch.device) -> float:
    """The same trainings (model, method, steps, batch, augmentation, AdamW) one after another, plus
    each model's test accuracy, in this process with a plain PyTorch loop."""
    started = time.perf_counter()
    for cfg in configs:
        model = build_model(cfg, len(data["classes"]), None, 0).to(device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.method.lr or cfg.train.lr)
        x, y = cached_split(data["uri"], "train", cfg.backbone.img_size)
        gen = torch.Generator().manual_seed(0)
        for _ in range(cfg.train.steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            images, labels = flip((x[idx], y[idx]), gen)
            loss, _ = classification_loss(model, (images.to(device), labels.to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        accuracy(model.cpu(), data["uri"], "test", cfg.backbone.img_size)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ks", default="1,2,4,8", help="comma-separated numbers of finetune nodes")
    parser.add_argument("--gpu-fraction", type=float, default=0.0, help="GPU share of each node (e.g. 0.125)")
    parser.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    device = torch.device("cuda" if args.gpu_fraction > 0 else "cpu")

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Warm-up (not timed): starts Ray and one worker process per CPU (each imports torch and DeepSpeed
        # once, as in any run that trains more nodes than it has CPUs), prepares the shared data node.
        through_runner(pipeline_config(work, "warmup", 1, 2, args.gpu_fraction))
        cpus = int(ray.cluster_resources().get("CPU", 0))
        through_runner(pipeline_config(work, "warmup2", max(1, cpus), 2, args.gpu_fraction))
        for k in ks:
            wall, seen, inside, configs, data = through_runner(
                pipeline_config(work, f"digits_k{k}", k, args.steps, args.gpu_fraction))
            seq = sequential(configs, data, device)
            overhead = [s - i for s, i in zip(seen, inside, strict=True)]
            lines.append(
                f"K={k}: runner {wall:.1f} s, sequential {seq:.1f} s -> speed-up {seq / wall:.2f}; per node: "
                f"in-stage {statistics.mean(inside):.1f} s, scheduling overhead {statistics.mean(overhead):.2f} s "
                f"(max {max(overhead):.2f} s)")
            print(lines[-1], flush=True)

    if args.record:
        where = f"GPU {args.gpu_fraction} per node" if args.gpu_fraction else "CPU"
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, Ray {cpus} CPUs, {where}, "
                   f"sequential with {torch.get_num_threads()} torch thread(s)")
        record(f"{machine}, {args.steps} steps", lines)


if __name__ == "__main__":
    main()
