"""The stage registry: kind -> (run function, node config model). Adding a stage is one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel

from tasks import distill, evaluate, finetune, prepare, pretrain, prune


class Stage(NamedTuple):
    run: Callable[..., Any]
    config: type[BaseModel]


STAGES: dict[str, Stage] = {
    "data": Stage(prepare.run, prepare.DataNode),
    "pretrain": Stage(pretrain.run, pretrain.PretrainNode),
    "distill": Stage(distill.run, distill.DistillNode),
    "finetune": Stage(finetune.run, finetune.FinetuneNode),
    "evaluate": Stage(evaluate.run, evaluate.EvaluateNode),
    "prune": Stage(prune.run, prune.PruneNode),
}
