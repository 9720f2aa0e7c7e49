"""Where a stage's backbone starts: the pipeline's pretrain output, else `backbone.weights`, else random init."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitpipe.cluster.manifest import Manifest, read_weights
from vitpipe.cluster.store import ArtifactStore
from vitpipe.cluster.weights import read_weights_source
from vitpipe.models.settings import ViTSpec
from vitpipe.models.weights import WeightsError, WeightsReport, load_into


@dataclass(frozen=True)
class BackboneWeights:
    """Encoder weights and where they came from (`source` names them in errors)."""

    state: dict[str, torch.Tensor]
    source: str
    kind: str  # "pretrained" (this pipeline's pretrain stage) | "weights" (backbone.weights)

    def load_into(self, model: nn.Module, arch: str) -> WeightsReport:
        """Fit and load into `model` (head excluded, position embedding resampled); WeightsError on a misfit."""
        return load_into(model, self.state, self.source, arch=arch)


def backbone_identity(inputs: dict[str, Manifest], spec: ViTSpec) -> str | None:
    """What the backbone is, without loading it: the pretrain stage's key, the weights' sha256, or None
    (random init). Stages that combine artifacts (a ToCom and a task model) compare these."""
    if "backbone" in inputs:
        return inputs["backbone"].key
    return f"sha256:{spec.weights_sha256}" if spec.weights else None


def starting_weights(store: ArtifactStore, inputs: dict[str, Manifest], spec: ViTSpec) -> BackboneWeights | None:
    """The pretrain stage's encoder when the node has a "backbone" input, else `spec.weights` (checked against
    the sha256 planned into the key), else None."""
    if "backbone" in inputs:
        state = read_weights(store, inputs["backbone"], "encoder.safetensors")
        return BackboneWeights(state, f"pretrain stage {inputs['backbone'].key[:12]}", "pretrained")
    if spec.weights is None:
        return None
    state, sha = read_weights_source(spec.weights)
    if spec.weights_sha256 is not None and sha != spec.weights_sha256:
        raise WeightsError(f"weights {spec.weights}: sha256 {sha[:12]} is not the planned {spec.weights_sha256[:12]}: "
                           "the file changed since the pipeline was planned")
    return BackboneWeights(state, spec.weights, "weights")


def backbone_tag(weights: BackboneWeights | None) -> str:
    """The `backbone` MLflow tag of a stage's run."""
    if weights is None:
        return "random-init"
    return weights.kind if weights.kind == "pretrained" else f"weights:{weights.source}"
