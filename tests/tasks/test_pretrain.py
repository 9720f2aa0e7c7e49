"""The pretrain stage on real components: Ray Data streaming the corpus into Ray Train + DeepSpeed workers,
Parquet data from the data stage, a local artifact store."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_stage
from vitpipe.cluster.batches import DataContext
from vitpipe.cluster.manifest import Manifest, read_bytes, read_weights
from vitpipe.cluster.store import LocalStore
from vitpipe.models.settings import ViTSpec
from vitpipe.tasks.classification import accuracy, cached_split, probed_head
from vitpipe.tasks.prepare.spec import DataNode, DataOutputs
from vitpipe.tasks.pretrain.spec import PretrainNode
from vitpipe.tasks.pretrain.stage import linear_probe, streamed_views

OBJECTIVE = {"weights": {"localmim": 1.0, "infocl": 1.0},
             "localmim": {"taps": [1, 3], "scales": [2.0, 1.0], "weights": [1.0, 1.0], "dec_dim": 32, "dec_heads": 2},
             "infocl": {"base": "simclr", "regularizer": "rc", "rc_widths": [32, 32, 16, 16]}}
TRAIN = {"steps": 24, "batch_size": 32, "lr": 1e-3, "betas": (0.9, 0.95), "warmup_steps": 4,
         "checkpoint_every": 24, "log_every": 8, "max_failures": 0}


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("pretrain")
    store = LocalStore(str(tmp / "store"))
    return {
        "tmp": tmp, "store": store,
        "corpus": run_stage(store, tmp, "data", "photos", DataNode(source="photos"), {}),
        "digits": run_stage(store, tmp, "data", "digits", DataNode(source="digits"), {}),
    }


def _pretrain(world: dict, key: str, workers: int, loader: str, probe: bool = True) -> tuple[PretrainNode, Manifest]:
    cfg = PretrainNode(backbone=ViTSpec(), objective=OBJECTIVE, train=TRAIN, loader=loader,
                         resources={"num_workers": workers, "cpus_per_worker": 1})
    inputs = {"corpus": world["corpus"], **({"probe:digits": world["digits"]} if probe else {})}
    return cfg, run_stage(world["store"], world["tmp"], "pretrain", key, cfg, inputs)


def _losses(store: LocalStore, manifest: Manifest) -> torch.Tensor:
    history = json.loads(read_bytes(store, manifest, "history.json"))
    return torch.tensor([h["loss"] for h in history])


def test_streamed_corpus_trains_the_encoder_and_probes_it(world: dict) -> None:
    cfg, manifest = _pretrain(world, "streamed", 1, "ray_data")
    assert set(manifest.files) == {"encoder.safetensors", "decoders.safetensors", "history.json"}
    encoder = read_weights(world["store"], manifest, "encoder.safetensors")
    torch.manual_seed(0)  # the stage's seed: these are the encoder's initial weights
    vit = cfg.backbone.build(num_classes=0)
    initial = {k: v.clone() for k, v in vit.state_dict().items()}
    vit.load_state_dict(encoder)  # strict: exactly a timm ViT encoder, no decoder weights mixed in
    assert any(not torch.equal(v, encoder[k]) for k, v in initial.items()), "the encoder did not change"
    losses = _losses(world["store"], manifest)
    assert len(losses) == TRAIN["steps"] and losses[-6:].mean() < losses[:6].mean()
    assert 0.0 < manifest.metrics["probe_accuracy.digits"] <= 1.0
    assert 0.0 < manifest.metrics["probe_accuracy_random_init.digits"] <= 1.0
    assert {"final_mim_tap1", "final_mim_tap3", "final_infocl"} <= set(manifest.metrics)


def test_two_workers_track_one_worker_on_the_same_global_batches(world: dict) -> None:
    """The in-memory loader gives both runs the same global batches, but masks, views and SimCLR negatives are
    drawn per rank (as in the papers' per-GPU implementations), so the curves agree statistically, not bitwise."""
    _, one = _pretrain(world, "one", 1, "memory", probe=False)
    _, two = _pretrain(world, "two", 2, "memory", probe=False)
    one_losses, two_losses = _losses(world["store"], one), _losses(world["store"], two)
    assert abs(one_losses[0] - two_losses[0]) < 0.1 * one_losses[0]  # same init, same first batch
    for window in (slice(0, 8), slice(8, 16), slice(16, 24)):
        assert float(one_losses[window].mean()) == pytest.approx(float(two_losses[window].mean()), rel=0.08)


@pytest.mark.parametrize("contrastive", [True, False])
def test_streamed_views_are_made_in_ray_data_and_fresh_each_pass(world: dict, contrastive: bool) -> None:
    """The training worker gets finished views: decoding and augmentation ran in Ray Data's tasks."""
    shards = DataOutputs.of(world["corpus"]).uri(world["store"])
    data, datasets = streamed_views(shards, 32, contrastive)
    batch = datasets["train"].take_batch(16)
    assert list(batch) == (["view1", "view2"] if contrastive else ["view1"])
    first, again = batch["view1"], datasets["train"].take_batch(16)["view1"]
    assert first.dtype == "float32" and first.shape == (16, 3, 32, 32)
    assert not (first == again).all(), "a second pass drew the same views"
    assert -1.0 - 1e-6 <= first.min() and first.max() <= 1.0 + 1e-6  # normalised as the stage's inputs

    ctx = DataContext(rank=0, world_size=1, micro_batch=8, grad_accum=1, start_step=0, steps=2, seed=0,
                      dataset_shard=lambda name: datasets[name].iterator())
    view1, view2 = next(iter(data(ctx)))
    assert view1.shape == (8, 3, 32, 32) and (contrastive != (view1 is view2))


def test_the_probe_figure_is_where_a_linear_task_model_starts(world: dict) -> None:
    """The stage's probe accuracy is the test accuracy of the head the finetune stage starts from (whitened
    features, logistic regression at its optimum) on the same frozen encoder, not another probe's."""
    uri = DataOutputs.of(world["digits"]).uri(world["store"])
    torch.manual_seed(3)
    encoder = ViTSpec().build(num_classes=0)
    model = ViTSpec().build(num_classes=10)
    model.load_state_dict(encoder.state_dict(), strict=False)  # the same trunk, with a classification head
    model.head = probed_head(model, *cached_split(uri, "train", 32))
    assert linear_probe(encoder, uri, 32) == pytest.approx(accuracy(model, uri, "test", 32), abs=1e-6)
    assert linear_probe(encoder, uri, 32) > 0.5  # ten classes: far above chance even on random features
