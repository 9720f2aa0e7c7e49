"""What every stage config shares: a frozen base, and a `train:` field that keeps the stage's paper defaults.

A stage module defines one config model (its section of the pipeline YAML, defaults = the paper's values)
and one node model (what a single node of that stage computes: the section plus the task, method and
backbone the DAG gives it). The pipeline spec references the section models; nodes are validated when the
pipeline loads, so a bad value fails at `vitpipe plan`, never inside a Ray task.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from vitpipe.cluster.config import TrainConfig


class Frozen(BaseModel):
    """Frozen, unknown keys rejected: the base of every config and node model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def tracked_params(self) -> dict[str, Any]:
        """What the node's MLflow run records as params: the settings that take effect, each once."""
        return self.model_dump(mode="json", by_alias=True)


def paper_train(optional: bool = False, **defaults: Any) -> Any:
    """A `train:` field type whose unset keys take `defaults` (the stage's paper values), not TrainConfig's.

    `train: {steps: 7}` in the YAML then keeps e.g. ToCom's lr 2e-3; without the field, all defaults apply.
    `optional`: the field may also be null (that training phase is off).
    """

    def merge(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    kind = TrainConfig | None if optional else TrainConfig
    return Annotated[kind, BeforeValidator(merge), Field(default=TrainConfig(**defaults))]
