"""The best prefix and early stopping on a tiny Llama: the result is the best evaluation's prefix, early stopping
ends a task patience evaluations after its best, a resumed task keeps its best and its count, co-tenants are
unaffected.

The setups are deterministic: with a constant learning rate (0.6 for 'nxt', 0.05 for 'dbl'), 'nxt' has its lowest
eval_loss at step 18 of 24 (evaluated every 2 steps) and 'dbl' at step 6. Their validation sets (6 rows) are
smaller than eval_max_rows, so every evaluation scores every row.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.test_trainer import prefix_tensor, run, task_config, trainer
from workers.formats import load_prefix
from workers.selection import BestPrefix

PEAKING = dict(schedule="constant", warmup_steps=0, steps=24, eval_every=2, checkpoint_every=100)
RATES = {"nxt": dict(learning_rate=0.6), "dbl": dict(learning_rate=0.05), "rev": {}}
STOPPING = dict(early_stopping=dict(patience=3))


def final_tensor(result):
    return load_prefix(Path(result.prefix_dir).parent / "final" / "prefix")[1].prompt_embeddings().detach()


def history(result) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, Path(result.history_file).read_text().splitlines())}


def alone(tmp_path, name, folder, **over):
    tr = trainer()
    tr.add_task(task_config(tmp_path, name, out=tmp_path / folder / name, **PEAKING | RATES[name] | over))
    return run(tr)[f"job-{name}"]


def test_the_result_is_the_best_evaluations_prefix(tmp_path):
    result = alone(tmp_path, "nxt", "full")
    evals = {step: r["eval_loss"] for step, r in history(result).items() if "eval_loss" in r}
    assert sorted(evals) == list(range(2, 25, 2))
    assert min(evals, key=evals.get) == 18 and result.metrics["best_step"] == 18 and result.steps == 24
    assert not result.stopped_early

    stopped_there = alone(tmp_path, "nxt", "at-18", steps=18)
    assert (prefix_tensor(result) - final_tensor(stopped_there)).abs().max().item() < 1e-6
    assert (final_tensor(result) - prefix_tensor(result)).abs().max().item() > 1e-3  # the last prefix is another
    # the registered metric is the best prefix's on every row: here the best evaluation's, and run 2's last
    assert result.metrics["eval_loss"] == pytest.approx(evals[18], abs=1e-6)
    assert result.metrics["best_eval_loss"] == pytest.approx(evals[18], abs=1e-6)
    assert result.metrics["eval_loss"] == pytest.approx(stopped_there.metrics["final_eval_loss"], abs=1e-6)
    assert result.metrics["final_eval_loss"] == pytest.approx(evals[24], abs=1e-6)
    out = Path(result.prefix_dir).parent
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    for name in ("adapter/adapter_model.safetensors", "final/adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name


def test_early_stopping_ends_a_task_patience_evaluations_after_its_best(tmp_path):
    tr = trainer()
    tr.add_task(task_config(tmp_path, "dbl", out=tmp_path / "es" / "dbl", **PEAKING | RATES["dbl"] | STOPPING))
    reports = []
    while tr.active:
        reports.append(tr.step())
    [result] = reports[-1].finished
    assert len(reports) == 12 and result.steps == 12 and result.stopped_early  # best 6 + 3 evaluations x 2 steps
    assert reports[-1].progress["job-dbl"].total_steps == 12 and reports[0].progress["job-dbl"].total_steps == 24
    assert result.metrics["best_step"] == 6 and sorted(history(result)) == list(range(1, 13))

    full = alone(tmp_path, "dbl", "full")  # without early stopping: 24 steps, the same best, the same result
    assert full.steps == 24 and full.metrics["best_step"] == 6
    assert full.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], abs=1e-6)
    assert history(full)[6]["eval_loss"] == pytest.approx(result.metrics["best_eval_loss"], abs=1e-6)
    assert (prefix_tensor(result) - prefix_tensor(full)).abs().max().item() < 1e-6
    stopped_there = alone(tmp_path, "dbl", "at-6", steps=6)
    assert (prefix_tensor(result) - final_tensor(stopped_there)).abs().max().item() < 1e-6


def test_resume_after_the_best_keeps_the_best_and_the_patience_count(tmp_path):
    """A checkpoint at step 10 holds the best (step 6) and 2 evaluations without improvement: the resumed task
    stops at step 12 as the uninterrupted one does, with the same prefix."""
    settings = PEAKING | RATES["dbl"] | STOPPING | dict(checkpoint_every=5)
    expected = alone(tmp_path, "dbl", "uninterrupted", **settings)
    first = trainer()
    first.add_task(task_config(tmp_path, "dbl", out=tmp_path / "r" / "dbl", **settings))
    run(first, steps=11)  # past the checkpoint at step 10; killed before step 12
    second = trainer()
    assert second.add_task(task_config(tmp_path, "dbl", out=tmp_path / "r" / "dbl", **settings)).step == 10
    assert (second.tasks["job-dbl"].best.step, second.tasks["job-dbl"].best.stale) == (6, 2)
    resumed = run(second)["job-dbl"]
    assert resumed.steps == expected.steps == 12 and resumed.stopped_early
    assert resumed.metrics == pytest.approx(expected.metrics, abs=1e-6)
    assert (prefix_tensor(resumed) - prefix_tensor(expected)).abs().max().item() < 1e-6
    assert (final_tensor(resumed) - final_tensor(expected)).abs().max().item() < 1e-6


def test_cotenants_with_early_stopping_train_as_if_alone(tmp_path):
    """'dbl' stops early at step 12 while 'nxt' (best at 18) and 'rev' train on: each ends as it does alone."""
    settings = {"dbl": STOPPING, "nxt": {}, "rev": {}}
    together = trainer()
    for name, over in settings.items():
        together.add_task(task_config(tmp_path, name, out=tmp_path / "together" / name, **PEAKING | RATES[name] | over))
    joint = run(together)
    for name, over in settings.items():
        solo = alone(tmp_path, name, "alone", **over)
        mixed = joint[f"job-{name}"]
        assert (mixed.steps, mixed.metrics["best_step"]) == (solo.steps, solo.metrics["best_step"]), name
        assert (prefix_tensor(mixed) - prefix_tensor(solo)).abs().max().item() < 1e-5, name
        assert (final_tensor(mixed) - final_tensor(solo)).abs().max().item() < 1e-5, name
        assert mixed.metrics == pytest.approx(solo.metrics, abs=1e-5), name
    assert joint["job-dbl"].steps == 12 and joint["job-nxt"].steps == 24


def test_best_prefix_follows_direction_and_min_delta():
    encoder = torch.nn.Linear(2, 1)
    before = encoder.weight.detach().clone()
    best = BestPrefix("bleu", "maximize", min_delta=0.5, patience=2)
    assert not best.observe(1, {"bleu": 10.0}, encoder) and (best.step, best.value) == (1, 10.0)
    with torch.no_grad():
        encoder.weight.add_(1.0)
    assert not best.observe(2, {"bleu": 10.4}, encoder)  # better, but by less than min_delta
    assert best.observe(3, {"bleu": float("nan")}, encoder)  # not finite: no improvement; 2 in a row: stop
    assert best.step == 1 and best.stale == 2 and not torch.equal(best.state["weight"], encoder.weight)
    assert torch.equal(best.encoder(encoder, 3).weight, before)
    assert best.result_metrics(3, {"bleu": 9.0}, {"bleu": 8.0}) == {
        "bleu": 9.0,
        "best_step": 1,
        "best_bleu": 10.0,
        "final_bleu": 8.0,
    }
    lowest = BestPrefix("eval_loss", "minimize")
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.0], start=1):
        assert not lowest.observe(step, {"eval_loss": loss}, encoder)  # no patience: never stops
    assert (lowest.step, lowest.value, lowest.stale) == (4, 1.0, 0)
    assert lowest.encoder(encoder, 4) is encoder
    again = BestPrefix("eval_loss", "minimize")
    again.load(json.loads(json.dumps(lowest.to_json())), lowest.state)
    assert again == lowest
