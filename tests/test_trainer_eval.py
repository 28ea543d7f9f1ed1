"""Evaluation: periodic ones on a fixed seeded sample of validation rows, all rows at the end, and the rows of
tasks evaluated together in mixed micro-batches scoring what each task scores alone."""

import pytest

from tests.test_trainer import TASKS, run, task_config, trainer
from workers.evaluation import eval_subset, validation_scores
from workers.formats import load_prefix


def test_tasks_evaluated_together_score_as_each_alone(tmp_path):
    tr = trainer()
    for name in TASKS:
        tr.add_task(task_config(tmp_path, name))
    together = tr._evaluate({task_id: None for task_id in tr.active}, batch_size=4)  # rows of 3 tasks per batch
    for task_id in tr.active:
        alone = tr.evaluate(task_id, batch_size=7)
        assert together[task_id]["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-5)
        assert together[task_id]["eval_perplexity"] == pytest.approx(alone["eval_perplexity"], rel=1e-5)
    losses = [together[task_id]["eval_loss"] for task_id in tr.active]
    assert len({round(x, 4) for x in losses}) == 3  # three different prefixes: a mix-up would show


def test_eval_subset_is_fixed_and_bounded():
    assert eval_subset(5, 10, seed=3) == [0, 1, 2, 3, 4]
    rows = eval_subset(1000, 16, seed=3)
    assert rows == eval_subset(1000, 16, seed=3) and rows == sorted(set(rows)) and len(rows) == 16
    assert 0 <= rows[0] and rows[-1] < 1000
    assert rows != eval_subset(1000, 16, seed=4)


def test_periodic_evaluations_score_the_sample_and_the_last_every_row(tmp_path):
    """eval_max_rows=3 of the task's validation rows at steps 2 and 4 (the same 3 rows), every row at the
    end (step 6): the final metrics are the full validation set's, scored from the exported prefix."""
    tr = trainer()
    tr.add_task(task_config(tmp_path, "rev", steps=6, eval_every=2, eval_max_rows=3))
    task = tr.tasks["job-rev"]
    validation = task.data.validation
    assert len(validation) > 3 and task.eval_rows == eval_subset(len(validation), 3, seed=7)
    tr.step()
    report = tr.step()
    sample = validation_scores(
        tr.prefixed, tr.pad_id, [(tr.prefix_of("job-rev"), validation, task.eval_rows)], batch_size=16
    )[0]
    assert report.progress["job-rev"].eval == pytest.approx(sample, abs=1e-6)
    assert report.progress["job-rev"].eval["eval_loss"] != pytest.approx(tr.evaluate("job-rev")["eval_loss"], abs=1e-4)
    result = run(tr)["job-rev"]
    _, encoder = load_prefix(result.prefix_dir, tr.model.config)
    every_row = validation_scores(
        tr.prefixed,
        tr.pad_id,
        [(encoder.prompt_embeddings().detach(), validation, range(len(validation)))],
        batch_size=5,
    )[0]
    assert {k: result.metrics[k] for k in every_row} == pytest.approx(every_row, abs=1e-5)
