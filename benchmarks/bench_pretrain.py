"""Pretraining cost and the LocalMIM convergence claim, measured in one run:

1. images/s inside the pipeline's pretrain stage (corpus decoded and augmented by Ray Data, streamed into the
   one-worker training loop, which runs in the node's Ray task and drives DeepSpeed) / a bare PyTorch loop over
   the same model, objective (LocalMIM + SimCLR + InfoCL RC), optimizer, batch and augmentations on in-memory
   tensors, made in the loop's process (goal >= 0.95);
2. LocalMIM (a local decoder on every block) against a top-layer-only MIM baseline (one decoder on the last
   block, at the patch scale, as in MAE with HOG targets), both bare loops on the photos corpus: frozen-encoder
   linear-probe accuracy on digits at equal steps, and for the baseline also at LocalMIM's wall time (it is
   cheaper per step, so it gets more steps). The paper's claim: LocalMIM gets there faster.

Tiny ViT (vitpipe_tiny_patch4_32: 32 px, 4 blocks), batch 64, one torch thread for every loop (the stage's
one-CPU training worker gets one thread).

Usage: python benchmarks/bench_pretrain.py [--steps 300] [--ratio-only] [--record]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
import yaml
from bench_overhead import stage_throughput  # benchmarks/ is the script's own folder
from recording import Bench

from vitpipe.cluster.store import open_store
from vitpipe.cluster.train import param_groups, warmup_cosine
from vitpipe.models.settings import PretrainObjectiveConfig, ViTSpec
from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import load_config
from vitpipe.tasks.classification import cached_split
from vitpipe.tasks.data import prepare
from vitpipe.tasks.prepare.spec import DataOutputs
from vitpipe.tasks.pretrain.spec import PretrainNode
from vitpipe.tasks.pretrain.stage import PretrainModel, linear_probe, two_views

BACKBONE = {"arch": "vitpipe_tiny_patch4_32", "img_size": 32}
TRAIN = {"batch_size": 64, "lr": 0.001, "betas": [0.9, 0.95], "weight_decay": 0.05, "warmup_steps": 15,
         "log_every": 10}
FULL = {"weights": {"localmim": 1.0, "infocl": 1.0},
        "localmim": {"taps": [0, 1, 2, 3], "dec_dim": 128, "dec_heads": 4},
        "infocl": {"base": "simclr", "regularizer": "rc", "rc_widths": [32, 64, 32, 16]}}
LOCAL_MIM = {"weights": {"localmim": 1.0}, "localmim": {"taps": [0, 1, 2, 3], "dec_dim": 128, "dec_heads": 4}}
TOP_MIM = {"weights": {"localmim": 1.0},
           "localmim": {"taps": [-1], "scales": [1.0], "weights": [1.0], "dec_dim": 128, "dec_heads": 4}}


def pipeline_config(work: Path, steps: int) -> Path:
    data = {
        "name": "bench-pretrain", "work_dir": str(work), "experiment": "bench-pretrain",
        "backbone": BACKBONE, "corpus": {"source": "photos"}, "tasks": {"digits": {"source": "digits"}},
        "stages": {  # a pipeline needs a downstream task: a 5-step linear probe rides along
            "pretrain": {"objective": FULL, "train": {**TRAIN, "steps": steps, "checkpoint_every": steps},
                         "resources": {"num_workers": 1, "cpus_per_worker": 1}, "probe": False},
            "finetune": {"methods": ["linear"], "train": {"steps": 5, "warmup_steps": 1, "checkpoint_every": 5}}},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def bare_pretrain(objective: dict, corpus: str, steps: int | None, seconds: float | None = None,
                  warmup: int = 10) -> tuple[PretrainModel, int, float]:
    """The stage's model, loss, AdamW + warm-up/cosine and augmentations in a plain loop, run for `steps`
    or until `seconds` have passed. Returns the model, the steps taken and images/s after `warmup` steps."""
    cfg = PretrainNode(backbone=ViTSpec(**BACKBONE), objective=PretrainObjectiveConfig(**objective),
                         train={**TRAIN, "steps": steps or 10**6})
    torch.manual_seed(0)
    model = PretrainModel(cfg.backbone, cfg.objective).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=cfg.train.betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train))
    x, y = cached_split(corpus, "train", cfg.backbone.img_size)
    contrastive = "infocl" in objective["weights"]
    gen = torch.Generator().manual_seed(0)
    batch, step, timed_from = cfg.train.batch_size, 0, 0.0
    started = time.perf_counter()
    while (steps is None or step < steps) and (seconds is None or time.perf_counter() - started < seconds):
        if step == warmup:
            timed_from = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss, _ = model(*two_views(contrastive, (x[idx], y[idx]), gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        step += 1
    return model, step, (step - warmup) * batch / (time.perf_counter() - timed_from)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ratio-only", action="store_true", help="measure 1. only (the stage/bare ratio)")
    bench = Bench(parser, threads=1)
    args = bench.args

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = load_config(pipeline_config(work, args.steps))
        result = run(cfg, io.StringIO())
        assert result.ok, [o.error for o in result.outcomes if o.error]
        stage = stage_throughput(cfg.tracking, result.run_id, "pretrain")
        corpus = DataOutputs.of(next(o for o in result.outcomes if o.node.name == "data/corpus").manifest).uri(
            open_store(cfg.store_uri))
        both, _, bare = bare_pretrain(FULL, corpus, args.steps)
        ratio = (f"pretrain stage (Ray Data decodes and augments -> one-worker loop -> DeepSpeed): {stage:.0f} img/s, "
                 f"bare PyTorch loop: {bare:.0f} img/s -> ratio {stage / bare:.3f} (goal >= 0.95)")
        if args.ratio_only:
            bench.report([ratio], "1 torch thread per loop", "in all")
            return

        digits = prepare("digits", str(work / "digits")).uri
        size = BACKBONE["img_size"]
        t0 = time.perf_counter()
        local, _, _ = bare_pretrain(LOCAL_MIM, corpus, args.steps)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        top, _, _ = bare_pretrain(TOP_MIM, corpus, args.steps)
        top_s = time.perf_counter() - t0
        top_timed, top_steps, _ = bare_pretrain(TOP_MIM, corpus, None, seconds=local_s)
        torch.manual_seed(0)
        random = ViTSpec(**BACKBONE).build(num_classes=0)
        probes = {name: linear_probe(m.vit if hasattr(m, "vit") else m, digits, size)
                  for name, m in [("local", local), ("top", top), ("top_timed", top_timed), ("both", both),
                                   ("random", random)]}

    lines = [
        ratio,
        f"LocalMIM (4 taps), {args.steps} steps in {local_s:.0f} s: digits linear probe {probes['local']:.3f}",
        f"top-layer MIM, {args.steps} steps in {top_s:.0f} s: digits linear probe {probes['top']:.3f} "
        f"(LocalMIM - top at equal steps: {probes['local'] - probes['top']:+.3f})",
        f"top-layer MIM, {top_steps} steps in LocalMIM's {local_s:.0f} s: digits linear probe "
        f"{probes['top_timed']:.3f} (LocalMIM - top at equal time: {probes['local'] - probes['top_timed']:+.3f})",
        f"LocalMIM + InfoCL (SimCLR + RC), {args.steps} steps: digits linear probe {probes['both']:.3f}",
        f"random-init encoder: digits linear probe {probes['random']:.3f}",
    ]
    bench.report(lines, "1 torch thread per loop", "in all")


if __name__ == "__main__":
    main()
