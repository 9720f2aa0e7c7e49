"""The stage registry: kind -> (run function, config model). Adding a stage is one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel

from tasks import finetune, prepare


class Stage(NamedTuple):
    run: Callable[..., Any]
    config: type[BaseModel]


STAGES: dict[str, Stage] = {
    "data": Stage(prepare.run, prepare.PrepareConfig),
    "finetune": Stage(finetune.run, finetune.FinetuneConfig),
}
