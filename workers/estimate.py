"""What a task will cost before it runs: tokens (exact, from its data), compute, and peak memory.

    est = estimate_task(model_config, tokenizer, task_config(spec, "j-1", "out"))   # orchestrator.plan
    est.total_tokens            # the tokens its 60 steps will process, row for row
    est.seconds(150.0)          # at 150 tokens/s of the group's measured throughput

Tokens are counted on the task's tokenized rows in the order its `ExampleStream` will draw them (the same
seed and rows as the trainer), so `total_tokens` equals the sum of the trainer's per-step `tokens`
(real prompt + target tokens, padding excluded). Memory is a model, not a measurement: the base weights at
their dtype, the prefix's fp32 parameters with gradient and AdamW state, and one micro-batch's activations
at the longest row (`ACTIVATION_FLOATS_PER_TOKEN` floats per token per layer, plus its logits at target
positions); `benchmarks/estimate.py` reports how far it lands from measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.arch import prefix_shape
from workers.batches import ExampleStream
from workers.data import load_task_data
from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model
from workers.tasks import TaskConfig

ACTIVATION_FLOATS_PER_TOKEN = 16
"""Floats a decoder layer keeps per token and hidden unit for the backward (norm inputs, q/k/v, attention
output, the MLP's gate/up/product at their wider width, residuals), in units of the hidden size."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """One task's cost. Token counts are exact; memory is modelled (see the module docstring)."""

    train_rows: int
    validation_rows: int
    steps: int
    examples_per_step: int
    total_tokens: int
    """Prompt + target tokens over all steps, as the trainer counts them."""
    target_tokens: int
    """Of which target tokens (the positions the loss is taken at)."""
    longest_row: int
    base_parameters: int
    prefix_parameters: int
    """Trained parameters, projection MLP included."""
    memory_bytes: dict[str, int]
    """{'base_weights', 'prefix_state', 'activations'}: the parts of `peak_memory_bytes`."""

    @property
    def tokens_per_step(self) -> float:
        return self.total_tokens / self.steps

    @property
    def peak_memory_bytes(self) -> int:
        return sum(self.memory_bytes.values())

    @property
    def flops(self) -> float:
        """Forward + backward FLOPs (~4 x base parameters per token: no weight gradients are formed)."""
        return 4.0 * self.base_parameters * self.total_tokens

    def seconds(self, tokens_per_s: float) -> float:
        """Training time at a throughput, in seconds (evaluation excluded)."""
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        return self.total_tokens / tokens_per_s


def estimate_task(
    model_config: Any,
    tokenizer: Any,
    config: TaskConfig,
    *,
    dtype: str = "float32",
    micro_batch_size: int = 4,
    cache_dir: str | None = None,
) -> Estimate:
    """Estimate one task (as `orchestrator.plan.task_config` builds it); reads and tokenizes its data as the
    trainer would (DataError as the trainer's)."""
    data, t = config.data, config.training
    examples_per_step = t.examples_per_step
    task = load_task_data(data, tokenizer, cache_dir=cache_dir)
    n = len(task.train)
    total_steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * n / examples_per_step))
    lengths = np.array([len(ids) for ids in task.train["input_ids"]], dtype=np.int64)
    targets = np.array([sum(1 for t in labels if t != -100) for labels in task.train["labels"]], dtype=np.int64)
    drawn = _draw_counts(n, t.seed, total_steps * examples_per_step)
    shape = prefix_shape(model_config)
    base = _parameter_count(model_config)
    prefix = _prefix_parameters(model_config, config.prefix)
    num_virtual_tokens = config.prefix.num_virtual_tokens
    hidden = int(getattr(model_config, "hidden_size", shape.token_dim))
    longest = int(lengths.max()) + num_virtual_tokens
    rows = min(micro_batch_size, examples_per_step)
    activations = 4 * rows * longest * hidden * shape.num_layers * ACTIVATION_FLOATS_PER_TOKEN
    vocab = int(getattr(model_config, "vocab_size", 0))
    logits = 4 * 2 * rows * int(targets.max()) * vocab  # target-position logits and their gradient, fp32
    return Estimate(
        train_rows=n,
        validation_rows=len(task.validation),
        steps=total_steps,
        examples_per_step=examples_per_step,
        total_tokens=int(drawn @ lengths),
        target_tokens=int(drawn @ targets),
        longest_row=int(lengths.max()),
        base_parameters=base,
        prefix_parameters=prefix,
        memory_bytes={
            "base_weights": base * DTYPE_BYTES[dtype],
            "prefix_state": 4 * 4 * prefix,  # fp32 parameters, gradients, AdamW's two moments
            "activations": activations + logits,
        },
    )


def _draw_counts(n: int, seed: int, draws: int) -> np.ndarray:
    """How often each of n rows is drawn in the first `draws` indices of ExampleStream(n, seed)."""
    stream, counts = ExampleStream(n, seed=seed), np.zeros(n, dtype=np.int64)
    full, rest = divmod(draws, n)
    counts += full  # every whole epoch draws every row once
    stream.epoch = full
    np.add.at(counts, stream.next_indices(rest) if rest else [], 1)
    return counts


def _prefix_parameters(model_config: Any, config: PrefixTuningConfig) -> int:
    """Trained parameters of the task's PrefixEncoder, built on the meta device."""
    with torch.device("meta"):
        encoder = PrefixEncoder(configure_for_model(config, model_config))
    return sum(p.numel() for p in encoder.parameters())


def _parameter_count(model_config: Any) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory, no weights)."""
    import transformers

    with torch.device("meta"):
        if getattr(model_config, "is_encoder_decoder", False):
            model = transformers.AutoModelForSeq2SeqLM.from_config(model_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())
