"""The stage registry: kind -> (run function, config model). Adding a stage is one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel

from tasks import distill, evaluate, finetune, prepare, pretrain, prune


class Stage(NamedTuple):
    run: Callable[..., Any]
    config: type[BaseModel]


STAGES: dict[str, Stage] = {
    "data": Stage(prepare.run, prepare.PrepareConfig),
    "pretrain": Stage(pretrain.run, pretrain.PretrainConfig),
    "distill": Stage(distill.run, distill.DistillConfig),
    "finetune": Stage(finetune.run, finetune.FinetuneConfig),
    "evaluate": Stage(evaluate.run, evaluate.EvaluateConfig),
    "prune": Stage(prune.run, prune.PruneConfig),
}
