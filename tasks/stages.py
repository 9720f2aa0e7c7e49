"""The stage registry, in topological order: a stage's nodes may read those of the stages before it.

Adding a stage: its package tasks/<stage>/ (spec.py declares it, stage.py runs it), one line here, its tests.
"""

from __future__ import annotations

from vitpipe.tasks.distill.spec import SPEC as DISTILL
from vitpipe.tasks.evaluate.spec import SPEC as EVALUATE
from vitpipe.tasks.finetune.spec import SPEC as FINETUNE
from vitpipe.tasks.prepare.spec import SPEC as DATA
from vitpipe.tasks.pretrain.spec import SPEC as PRETRAIN
from vitpipe.tasks.prune.spec import SPEC as PRUNE
from vitpipe.tasks.spec import StageSpec

STAGES: dict[str, StageSpec] = {spec.kind: spec for spec in (DATA, PRETRAIN, DISTILL, FINETUNE, EVALUATE, PRUNE)}
