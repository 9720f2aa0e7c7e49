"""Platform overhead, measured in one run:

1. images/s inside the pipeline's finetune stage (Ray Train + DeepSpeed) / a bare PyTorch loop over the
   same model, batch, data and augmentation (goal >= 0.9);
2. wall time of a fully cached re-run / the first run (goal <= 0.05).

Usage: python benchmarks/bench_overhead.py [--steps 200] [--record]
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient
from recording import record

from vitpipe.cluster.store import open_store
from vitpipe.cluster.train import param_groups
from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import load_config
from vitpipe.tasks.classification import cached_split, classification_loss, flip
from vitpipe.tasks.finetune.spec import FinetuneNode
from vitpipe.tasks.finetune.stage import build_model
from vitpipe.tasks.prepare.spec import DataOutputs


def pipeline_config(work: Path, steps: int) -> Path:
    data = {
        "name": "bench-overhead", "work_dir": str(work), "experiment": "bench-overhead",
        "tasks": {"digits": {"source": "digits"}},
        "stages": {"finetune": {
            "methods": ["full"],
            "train": {"steps": steps, "batch_size": 64, "warmup_steps": 10, "checkpoint_every": steps,
                      "log_every": 10},
            "resources": {"num_workers": 1, "cpus_per_worker": 1}}},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stage_throughput(tracking: str, run_id: str, kind: str = "finetune") -> float:
    """Mean images/s the stage logged, without its first window (start-up, first-step allocations)."""
    client = MlflowClient(tracking)
    exp = client.get_run(run_id).info.experiment_id
    child = next(c for c in client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")
                 if c.data.tags["vitpipe.stage.kind"] == kind)
    points = sorted(client.get_metric_history(child.info.run_id, "images_per_s"), key=lambda m: m.step)
    values = [m.value for m in points[1:]] or [m.value for m in points]
    return sum(values) / len(values)


def bare_throughput(cfg: FinetuneNode, uri: str, num_classes: int, steps: int, batch: int) -> float:
    """The same model, loss, optimizer, batch and augmentation in a plain PyTorch loop."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes, None, 0)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    x, y = cached_split(uri, "train", cfg.backbone.img_size)
    gen = torch.Generator().manual_seed(0)
    warmup, started = 10, 0.0
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        images, labels = flip((x[idx], y[idx]), gen)
        loss, _ = classification_loss(model, (images, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    return (steps - warmup) * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the stage's Ray Train worker holds one CPU

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(pipeline_config(Path(tmp), args.steps))
        t0 = time.perf_counter()
        first = run(cfg, io.StringIO())
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = run(cfg, io.StringIO())
        cached_s = time.perf_counter() - t0
        assert first.ok and {o.status for o in again.outcomes} == {"cached"}

        stage = stage_throughput(cfg.tracking, first.run_id)
        node = next(o for o in first.outcomes if o.node.kind == "finetune")
        data = DataOutputs.of(next(o for o in first.outcomes if o.node.kind == "data").manifest)
        bare = bare_throughput(node.node.cfg, data.uri(open_store(cfg.store_uri)), len(data.classes), args.steps, 64)

    lines = [
        f"finetune stage: {stage:.0f} img/s, bare PyTorch loop: {bare:.0f} img/s -> ratio {stage / bare:.3f} "
        f"(goal >= 0.9)",
        f"first run {first_s:.1f} s, fully cached re-run {cached_s:.1f} s -> ratio {cached_s / first_s:.3f} "
        f"(goal <= 0.05)",
    ]
    print("\n".join(lines))
    if args.record:
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU"
        record(f"{machine}, {args.steps} steps", lines)


if __name__ == "__main__":
    main()
