"""A task's estimate against what the trainer then does: the same tokens, row for row, and the same prefix size."""

import math

import pytest

from tests.test_trainer import task_config, trainer
from workers.estimate import DTYPE_BYTES, estimate_task


@pytest.mark.parametrize("name, steps", [("rev", 7), ("dbl", 40)])  # dbl: past one epoch of its rows
def test_tokens_and_prefix_size_are_what_the_trainer_counts(tmp_path, name, steps):
    tr = trainer()
    cfg = task_config(tmp_path, name, steps=steps, eval_every=1000, checkpoint_every=1000)
    est = estimate_task(tr.model.config, tr.tokenizer, cfg, cache_dir=str(tmp_path / "cache"))
    tr.add_task(cfg)
    encoder = tr.tasks[cfg.task_id].encoder
    assert est.prefix_parameters == sum(p.numel() for p in encoder.parameters())
    assert est.base_parameters == sum(p.numel() for p in tr.model.parameters())
    assert est.memory_bytes["base_weights"] == est.base_parameters * DTYPE_BYTES["float32"]
    assert est.train_rows == len(tr.tasks[cfg.task_id].data.train)
    tokens = 0
    while tr.active:
        tokens += tr.step().tokens
    assert (est.steps, est.total_tokens) == (steps, tokens)
    assert est.seconds(est.total_tokens / 10) == pytest.approx(10.0)
    assert est.peak_memory_bytes > est.memory_bytes["base_weights"]


def test_epochs_become_steps(tmp_path):
    tr = trainer()
    cfg = task_config(tmp_path, "nxt", steps=None, epochs=1.5)
    est = estimate_task(tr.model.config, tr.tokenizer, cfg, cache_dir=str(tmp_path / "cache"))
    assert est.steps == math.ceil(1.5 * est.train_rows / 4)
    with pytest.raises(ValueError, match="tokens_per_s must be > 0"):
        est.seconds(0)
