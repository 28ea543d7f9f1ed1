"""A task's best prefix so far by its registry metric, and early stopping.

    best = BestPrefix.of(config)                      # config.metric, config.direction, training.early_stopping
    stop = best.observe(20, {"eval_loss": 1.9}, task.encoder)     # True: early stopping says stop now
    best.step, best.value, best.state                 # 20, 1.9, the encoder's state dict at step 20 (CPU copies)

An evaluation improves on the best when its metric is finite and better than the best by more than
min_delta in the metric's direction (the first finite one always does); `stale` counts the evaluations
since the last improvement, and with `patience` set the task stops when it reaches patience: at
best step + patience * eval_every when evaluations come every eval_every steps. `to_json` and `load` carry
all of it through a checkpoint, so a resumed task keeps its best and its count exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BestPrefix:
    metric: str
    direction: str
    """'minimize' or 'maximize'."""
    min_delta: float = 0.0
    patience: int | None = None
    """None: no early stopping (the best is tracked all the same)."""
    step: int | None = None
    """The best evaluation's step; None before any evaluation measured the metric."""
    value: float | None = None
    """The metric at that evaluation."""
    state: dict[str, torch.Tensor] | None = None
    """The prefix encoder's state dict at that step (CPU copies)."""
    stale: int = 0
    """Evaluations since the best one."""

    @classmethod
    def of(cls, config: Any) -> BestPrefix:
        """For a `workers.tasks.TaskConfig`: its metric, direction and training.early_stopping."""
        stopping = config.training.early_stopping
        if stopping is None:
            return cls(config.metric, config.direction)
        return cls(config.metric, config.direction, stopping.min_delta, stopping.patience)

    def observe(self, step: int, scores: dict[str, float], encoder: torch.nn.Module) -> bool:
        """Record the evaluation of `encoder` at `step`; True when early stopping says the task stops here."""
        value = scores.get(self.metric)
        if value is not None and math.isfinite(value) and self._improves(value):
            self.step, self.value, self.stale = step, float(value), 0
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items()}
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def _improves(self, value: float) -> bool:
        if self.value is None:
            return True
        if self.direction == "minimize":
            return value < self.value - self.min_delta
        return value > self.value + self.min_delta

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint's state.json keeps (the state dict goes with the optimizer's tensors)."""
        return {"step": self.step, "value": self.value, "stale": self.stale}

    def load(self, saved: dict[str, Any] | None, state: dict[str, torch.Tensor] | None) -> None:
        """Back to a checkpoint's `to_json()` and state dict; a checkpoint without them changes nothing."""
        if saved is not None:
            self.step, self.value, self.stale, self.state = saved["step"], saved["value"], saved["stale"], state

    def encoder(self, current: torch.nn.Module, step: int) -> torch.nn.Module:
        """The best prefix's encoder: `current` itself when the best is `step`'s (or no evaluation measured
        the metric), else a copy of it holding the best state."""
        if self.step is None or self.step == step:
            return current
        best = copy.deepcopy(current)
        best.load_state_dict(self.state)
        return best

    def result_metrics(self, step: int, best: dict[str, float], final: dict[str, float]) -> dict[str, float]:
        """A finished task's metrics: `best` (the best prefix on every validation row) as they are, best_step,
        best_<metric> (the value that chose it), and final_<name> for each of `final` (the last prefix's).

            result_metrics(60, {"eval_loss": 1.2}, {"eval_loss": 1.5}) == {"eval_loss": 1.2, "best_step": 40,
                "best_eval_loss": 1.19, "final_eval_loss": 1.5}            # best at step 40, 1.19 on the sample
        """
        metrics = best | {"best_step": step if self.step is None else self.step}
        if self.value is not None:
            metrics[f"best_{self.metric}"] = self.value
        return metrics | {f"final_{k}": v for k, v in final.items()}

    def __str__(self) -> str:
        return f"best {self.metric} {self.value} at step {self.step}, {self.stale} evaluations without improvement"
