"""The finetune stage on real components: local Ray Train + DeepSpeed, Parquet data from the data stage, a local
artifact store, a "pretrained" encoder (a seeded init) through the pipeline's backbone input."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.conftest import run_stage, seeded_encoder, shards_uri
from vitpipe.cluster.batches import TensorBatches
from vitpipe.cluster.config import Resources
from vitpipe.cluster.manifest import read_weights
from vitpipe.cluster.store import LocalStore
from vitpipe.cluster.train import Recipe, TrainJob, fit
from vitpipe.models.peft import PEFT_METHODS
from vitpipe.models.settings import ViTSpec
from vitpipe.tasks.backbone import starting_weights
from vitpipe.tasks.classification import accuracy, cached_split, classification_loss, flip
from vitpipe.tasks.finetune.spec import FinetuneNode
from vitpipe.tasks.finetune.stage import build_model, head_recipe, load_task_model, on_cached_features
from vitpipe.tasks.prepare.spec import DataNode

ONE_WORKER = {"num_workers": 1, "cpus_per_worker": 1}


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("finetune")
    store = LocalStore(str(tmp / "store"))
    digits = run_stage(store, tmp, "data", "digits", DataNode(source="digits"), {})
    return {"tmp": tmp, "store": store, "backbone": seeded_encoder(store, ViTSpec()), "digits": digits}


def node(method: dict, **train) -> FinetuneNode:
    train = {"steps": 30, "batch_size": 32, "warmup_steps": 3, "checkpoint_every": 10, "log_every": 10,
             "max_failures": 0, **train}
    return FinetuneNode(task="digits", methods=[method], backbone=ViTSpec(), train=train, resources=ONE_WORKER)


def test_fine_tuning_beats_chance_and_stores_only_the_delta(world: dict) -> None:
    cfg = node({"name": "lora", "lr": 5e-3, "r": 4})
    inputs = {"data": world["digits"], "backbone": world["backbone"]}
    manifest = run_stage(world["store"], world["tmp"], "finetune", "digits-lora", cfg, inputs, seed=3)
    assert manifest.metrics["test_accuracy"] > 0.5, manifest.metrics  # ten classes: chance is 0.1
    delta = read_weights(world["store"], manifest, "delta.safetensors")
    trainable = PEFT_METHODS["lora"].trainable_parameters(build_model(cfg, 10, None, 3))
    assert set(delta) == set(trainable)
    model = load_task_model(world["store"], cfg, {"model": manifest, **inputs}, seed=3)
    assert accuracy(model, shards_uri(world, "digits"), "test", 32) == manifest.metrics["test_accuracy"]


def test_the_checkpoint_best_on_val_is_kept_when_validation_peaks_mid_run(world: dict) -> None:
    """A randomly initialised head trained at an absurd constant learning rate jumps around: the stage must keep
    the checkpoint with the best validation accuracy, not the last one."""
    cfg = node({"name": "linear", "lr": 5.0}, steps=24, warmup_steps=0, min_lr=5.0, checkpoint_every=4,
               grad_clip=0.0).model_copy(update={"head_init": "random"})
    inputs = {"data": world["digits"], "backbone": world["backbone"]}
    manifest = run_stage(world["store"], world["tmp"], "finetune", "digits-jumpy", cfg, inputs)
    metrics = manifest.metrics
    assert 0 < metrics["best_step"] < 24, metrics  # validation peaked after the start, before the end
    stored = load_task_model(world["store"], cfg, {"model": manifest, **inputs}, seed=0)
    assert accuracy(stored, shards_uri(world, "digits"), "val", 32) == pytest.approx(metrics["best_score"])


def test_the_seed_reaches_head_and_method_initialisation() -> None:
    cfg = node({"name": "lora", "r": 4})
    heads = [build_model(cfg, 10, None, seed).head.weight for seed in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_a_run_that_only_hurts_validation_returns_its_starting_point(world: dict) -> None:
    """The head starts at the probe's optimum (LP-FT); training it at an absurd rate only makes things worse,
    so the initial state, evaluated before the first step, is what the stage keeps."""
    cfg = node({"name": "linear", "lr": 5.0}, steps=8, warmup_steps=0, min_lr=5.0, checkpoint_every=4,
               grad_clip=0.0)
    inputs = {"data": world["digits"], "backbone": world["backbone"]}
    manifest = run_stage(world["store"], world["tmp"], "finetune", "digits-probe-start", cfg, inputs)
    assert manifest.metrics["best_step"] == 0 and manifest.metrics["test_accuracy"] > 0.5, manifest.metrics


def test_a_scale_grid_keeps_the_scale_best_on_val_and_the_model_loads_with_it(world: dict) -> None:
    """FacT's s chosen per task as its paper does: one training per value, the best on val is the task model, and
    every reader of the delta (load_task_model, hence evaluate and prune) rebuilds it with that s."""
    cfg = node({"name": "fact_tt", "lr": 5e-3, "rank": 4, "scale_grid": [0.01, 10.0]}, steps=12, checkpoint_every=6)
    inputs = {"data": world["digits"], "backbone": world["backbone"]}
    manifest = run_stage(world["store"], world["tmp"], "finetune", "digits-fact-grid", cfg, inputs)
    metrics, settings = manifest.metrics, manifest.outputs["settings"]
    tried = {s: metrics[f"val_accuracy.scale_{s:g}"] for s in (0.01, 10.0)}
    assert metrics["scale"] == settings["scale"] == max(tried, key=tried.get), (tried, settings)
    assert metrics["val_accuracy"] == max(tried.values())
    assert settings == {"rank": 4, "scale": metrics["scale"], "dropout": 0.1}
    model = load_task_model(world["store"], cfg, {"model": manifest, **inputs}, seed=0)
    paths = [m for m in model.modules() if type(m).__name__ == "FacTPath"]
    assert paths and {p.scale for p in paths} == {metrics["scale"]}
    assert accuracy(model, shards_uri(world, "digits"), "test", 32) == metrics["test_accuracy"]


@pytest.mark.parametrize(("method", "message"), [
    ({"name": "linear", "scale_grid": "paper"}, "linear: scale_grid: the method has no scale s"),
    ({"name": "adaptformer", "scale_grid": "paper"}, "adaptformer: scale_grid: its paper publishes no grid"),
    ({"name": "convpass", "scale": 1.0, "scale_grid": [1.0, 10.0]}, "convpass: give scale or scale_grid, not both"),
])
def test_a_scale_grid_the_method_cannot_use_is_refused_at_load(method: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        node(method)


def test_the_paper_grid_is_the_methods_own() -> None:
    assert node({"name": "bi_adapter", "scale_grid": "paper"}).method.scales == (0.01, 0.1, 1.0, 10.0)
    assert node({"name": "fact_tt", "scale_grid": "paper"}).method.scales == (0.01, 0.1, 1.0, 10.0, 100.0)


@pytest.mark.parametrize("augment", [False, True])
def test_a_head_only_method_trains_on_cached_features_as_it_would_on_images(world: dict, tmp_path,
                                                                            augment: bool) -> None:
    """linear over more than one pass of the split trains on the frozen backbone's features, computed once: the
    same batches, flips and head as training on the images (up to float rounding), through the stage too."""
    cfg = node({"name": "linear", "lr": 1e-2}, steps=80).model_copy(update={"augment": augment, "head_init": "random"})
    uri = shards_uri(world, "digits")
    train_images = len(cached_split(uri, "train", 32)[0])
    assert on_cached_features(cfg, train_images) and not on_cached_features(cfg, 80 * 32)
    backbone = starting_weights(world["store"], {"backbone": world["backbone"]}, cfg.backbone)
    on_images = Recipe(functools.partial(build_model, cfg, 10, backbone, 0), TensorBatches(
        functools.partial(cached_split, uri, "train", 32), flip if augment else None), classification_loss,
        evaluate=lambda model: {"val_accuracy": accuracy(model, uri, "val", 32)}, select_metric="val_accuracy")
    jobs = {name: TrainJob(name, recipe, cfg.effective_train, Resources(), str(tmp_path / "ray"))
            for name, recipe in (("images", on_images),
                                 ("features", head_recipe(build_model(cfg, 10, backbone, 0), uri, 32, augment)))}
    images, features = fit(jobs["images"]), fit(jobs["features"])
    assert torch.allclose(torch.tensor([h["loss"] for h in images.history]),
                          torch.tensor([h["loss"] for h in features.history]), rtol=1e-4)
    for name in ("weight", "bias"):
        assert torch.allclose(images.state[f"head.{name}"], features.state[name], atol=1e-5)
    assert images.metrics["best_step"] == features.metrics["best_step"]

    manifest = run_stage(world["store"], world["tmp"], "finetune", f"digits-cached-{augment}", cfg,
                         {"data": world["digits"], "backbone": world["backbone"]})
    stored = load_task_model(world["store"], cfg, {"model": manifest, "data": world["digits"],
                                                   "backbone": world["backbone"]}, seed=0)
    assert accuracy(stored, uri, "test", 32) == manifest.metrics["test_accuracy"]
    assert torch.allclose(stored.head.weight, images.state["head.weight"], atol=1e-5)
