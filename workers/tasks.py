"""What the trainer is told about a task (`TaskConfig`) and what it reports per step (`TaskProgress`,
`StepReport`), and the learning-rate schedules (`lr_schedule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jobs.fields import TrainingSpec
from workers.data import DataSettings
from workers.prefix import PrefixTuningConfig

if TYPE_CHECKING:
    from workers.trainer import TaskResult

SCHEDULES = TrainingSpec.__dataclass_fields__["schedule"].metadata["rule"].choices  # lr_schedule computes each


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Everything one task's training needs, built once from its job spec (`orchestrator.plan.task_config`).

    No defaults and no rules of its own: `training` is the spec's section as validated (jobs/fields.py holds
    its defaults and ranges), `prefix` is the PEFT-compatible config the prefix is built from (its
    model-dependent fields are filled from the base model when the task joins), `metric` and `direction`
    are the spec's registry.metric and registry.direction (which evaluation is the best).

        TaskConfig(task_id="j-1", name="qa", out_dir="s3://b/j-1", data=DataSettings(...),
                   prefix=PrefixTuningConfig(num_virtual_tokens=10), training=TrainingSpec(steps=60),
                   metric="eval_loss", direction="minimize")
    """

    task_id: str
    """Unique id of this training (the job id)."""
    name: str
    """Task name (for logs and exported configs)."""
    out_dir: str
    """The job's folder in storage (a local path, or s3://...: `workers/storage.py`) for checkpoints and
    results; the newest complete checkpoint found there is resumed."""
    data: DataSettings
    prefix: PrefixTuningConfig
    training: TrainingSpec
    metric: str
    """The validation metric that picks the best prefix and drives early stopping (registry.metric)."""
    direction: str
    """'minimize' or 'maximize' (registry.direction)."""

    def __post_init__(self) -> None:
        t = self.training
        assert (t.steps is None) != (t.epochs is None), f"task {self.name}: exactly one of steps and epochs"


@dataclass
class TaskProgress:
    """What the orchestrator shows for a task after a step."""

    task_id: str
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens: int
    tokens_per_s: float
    examples_per_s: float
    eval: dict[str, float] | None = None


@dataclass(frozen=True)
class StepReport:
    step_time_s: float
    """Seconds of forward, backward and optimizer steps (evaluation and checkpoints left out)."""
    tokens: int
    """Real (unpadded) tokens of every task in the step, all ranks together."""
    examples: int
    progress: dict[str, TaskProgress]
    finished: list[TaskResult]
    peak_memory_bytes: int = 0
    """Peak resident memory of this process (CPU) or peak device memory (CUDA) so far."""
    warnings: dict[str, str] = field(default_factory=dict)
    """Tasks that train on but had a problem worth telling (a checkpoint that could not be written: the
    next one retries, and the last complete one stays)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Tasks that failed in this step on their own (task_id -> why: rows that cannot be read, a loss or
    gradient that is not finite, its own rows running out of memory); they are removed, their prefixes untouched by the failing update, and
    the other tasks' updates are exactly what they would be without them."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0


def lr_schedule(schedule: str, warmup: int, total: int):
    """The learning-rate factor per optimizer step taken so far: linear warmup over `warmup` steps, then
    constant, linear decay to 0, or cosine decay to 0 at `total` steps (a `LambdaLR` function).

        lr_schedule("linear", 2, 10)(0) == 0.5
    """
    assert schedule in SCHEDULES, f"schedule {schedule!r} not in {SCHEDULES}"

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
