"""The one DeepSpeed loop, in this process or in Ray Train workers: exact data parallelism, the same
trajectory on either launcher, and resume after a failure (local or S3 checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.tiny_recipe import digits_tensors, mlp, mlp_accuracy, mlp_loss
from vitpipe.cluster.batches import StreamedBatches, TensorBatches
from vitpipe.cluster.config import Resources, TrainConfig
from vitpipe.cluster.train import Recipe, StepMetrics, TrainJob, fit


class _CrashOnce:
    """A loss that raises once at a given step (a real worker failure), recorded by a marker file."""

    def __init__(self, marker: Path, at_call: int) -> None:
        self.marker, self.at_call, self.calls = marker, at_call, 0

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        self.calls += 1
        if self.calls == self.at_call and not self.marker.exists():
            self.marker.write_text("crashed")
            raise RuntimeError("injected worker failure")
        return mlp_loss(model, batch)


def _job(tmp_path: Path | str, name: str, workers: int, loss=mlp_loss, launcher: str = "auto", **train) -> TrainJob:
    cfg = TrainConfig(**{"steps": 12, "batch_size": 32, "lr": 1e-2, "warmup_steps": 2,
                         "checkpoint_every": 4, "log_every": 4, **train})
    recipe = Recipe(mlp, TensorBatches(digits_tensors), loss, evaluate=mlp_accuracy, select_metric="accuracy")
    storage = f"{tmp_path}/ray"
    return TrainJob(name, recipe, cfg, Resources(num_workers=workers, launcher=launcher), storage, seed=3)


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory: pytest.TempPathFactory):
    return fit(_job(tmp_path_factory.mktemp("reference"), "reference", 1))


def _losses(result) -> torch.Tensor:
    return torch.tensor([h["loss"] for h in result.history])


def test_two_zero2_workers_follow_the_single_worker_trajectory(reference, tmp_path: Path) -> None:
    two = fit(_job(tmp_path, "two", 2, zero_stage=2))  # optimizer state and gradients sharded over 2 ranks
    assert len(reference.history) == 12
    assert torch.allclose(_losses(reference), _losses(two), rtol=1e-4, atol=1e-5)
    assert _losses(reference)[-4:].mean() < _losses(reference)[:4].mean() * 0.95  # it learns
    for name, value in reference.state.items():
        assert torch.allclose(value, two.state[name], atol=1e-4), name


def test_one_worker_follows_the_same_trajectory_in_this_process_and_in_ray_train(reference, tmp_path: Path) -> None:
    assert _job(tmp_path, "here", 1).resources.in_process  # the reference trained in this process
    from deepspeed.comm import comm

    assert comm.cdb.shm_comm_op is None  # DeepSpeed's CPU inference op was neither built nor loaded
    ray_train = fit(_job(tmp_path, "ray-train", 1, launcher="ray_train"))
    assert torch.equal(_losses(reference), _losses(ray_train))
    for name, value in reference.state.items():
        assert torch.equal(value, ray_train.state[name]), name
    assert ray_train.metrics == reference.metrics


def test_a_compiled_model_trains_the_same_weights_under_the_same_names(reference, tmp_path: Path) -> None:
    """torch.compile (its graph capture; the eager backend keeps this test quick on CPU) changes nothing a
    checkpoint or a stage reads: the same losses and trainable state, under the plain model's names."""
    compiled = fit(_job(tmp_path, "compiled", 1, compile="eager"))
    assert torch.allclose(_losses(reference), _losses(compiled), rtol=1e-5, atol=1e-6)
    assert compiled.state.keys() == reference.state.keys()
    for name, value in reference.state.items():
        assert torch.allclose(value, compiled.state[name], atol=1e-6), name


def test_gradient_accumulation_matches_one_big_batch(reference, tmp_path: Path) -> None:
    accum = fit(_job(tmp_path, "accum", 1, grad_accum=2))
    assert torch.allclose(_losses(reference), _losses(accum), rtol=1e-4, atol=1e-5)


def test_failed_worker_resumes_from_last_checkpoint(reference, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    resumed = fit(_job(tmp_path, "crashy", 1, loss=_CrashOnce(marker, at_call=7)))
    assert marker.exists(), "the injected failure never happened"
    assert [h["step"] for h in resumed.history] == list(range(1, 13))
    assert torch.allclose(_losses(reference), _losses(resumed), rtol=1e-4, atol=1e-5)
    assert resumed.metrics["accuracy"] == pytest.approx(reference.metrics["accuracy"], abs=1e-6)


def test_a_failed_run_resumes_from_its_checkpoint_in_s3_keeping_the_newest_two(reference, s3_bucket: str,
                                                                                s3_client, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    resumed = fit(_job(s3_bucket, "crashy", 1, loss=_CrashOnce(marker, at_call=7)))
    assert marker.exists(), "the injected failure never happened"
    assert torch.allclose(_losses(reference), _losses(resumed), rtol=1e-4, atol=1e-5)
    bucket, root = s3_bucket[len("s3://"):].split("/", 1)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{root}/ray/crashy/")["Contents"]]
    assert sorted({k.split("/")[3] for k in keys} - {""}) == ["checkpoint_000008", "checkpoint_000012"]  # "": a folder


def test_eval_every_evaluates_on_its_multiples_and_at_the_end_and_selects_among_those(tmp_path: Path) -> None:
    """A checkpoint between evaluations is no best-on-val candidate: the best is the best evaluated state."""
    scores = iter([0.1, 0.9, 0.2])  # the evaluations at steps 0, 8 and 12

    def scripted(model: nn.Module) -> dict[str, float]:
        return {"accuracy": next(scores)}

    logged: list[int] = []
    cfg = TrainConfig(steps=12, batch_size=32, lr=1e-2, warmup_steps=2, checkpoint_every=4, eval_every=8, log_every=4)
    recipe = Recipe(mlp, TensorBatches(digits_tensors), mlp_loss, evaluate=scripted, select_metric="accuracy")
    job = TrainJob("every8", recipe, cfg, Resources(), str(tmp_path / "ray"), seed=3,
                   on_log=lambda step, _, metrics: logged.extend([step] if "eval/accuracy" in metrics else []))
    result = fit(job)
    assert logged == [0, 8, 12]
    assert result.metrics["best_step"] == 8 and result.metrics["accuracy"] == 0.9
    assert [h["step"] for h in result.history] == list(range(1, 13))

    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(checkpoint_every=4, eval_every=6)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_stream_a_ray_dataset_for_several_passes(ray_local, tmp_path: Path, workers: int) -> None:
    import ray.data

    x, y = digits_tensors()
    dataset = ray.data.from_items([{"x": xi.numpy(), "y": int(yi)} for xi, yi in zip(x, y, strict=True)])
    cfg = TrainConfig(steps=40, batch_size=32, lr=1e-2, warmup_steps=2, checkpoint_every=40, log_every=10)
    recipe = Recipe(mlp, StreamedBatches("train", ("x", "y"), shuffle_buffer=64), mlp_loss, evaluate=mlp_accuracy)
    job = TrainJob("streamed", recipe, cfg, Resources(num_workers=workers), str(tmp_path / "ray"), seed=3,
                   datasets={"train": dataset})
    result = fit(job)  # 40 steps x 32 samples = 2.5 passes over the 512 rows (split across 2 workers)
    assert [h["step"] for h in result.history] == list(range(1, 41))
    assert _losses(result)[-8:].mean() < _losses(result)[:8].mean() * 0.7
    assert result.metrics["accuracy"] > 0.8


def test_step_metrics_average_micro_batches_on_the_device_and_read_once() -> None:
    tracked = StepMetrics(torch.device("cpu"))
    for step, values in ((1, (1.0, 3.0)), (2, (5.0, 7.0))):
        for v in values:  # two micro-batches: a tensor and a float part
            tracked.add({"loss": torch.tensor(v), "acc": v / 10}, 0.5)
        tracked.end_step(step)
    assert tracked.read() == [{"step": 1, "loss": 2.0, "acc": 0.2}, {"step": 2, "loss": 6.0, "acc": 0.6}]
    assert tracked.read() == []  # read rows are gone
    tracked.add({"loss": torch.tensor(1.0)}, 1.0)
    with pytest.raises(ValueError, match=r"loss parts changed from \('loss', 'acc'\) to \('loss',\) at step 3"):
        tracked.end_step(3)
