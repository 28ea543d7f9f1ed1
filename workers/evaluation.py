"""Validation of several tasks at once: loss and perplexity in mixed-task micro-batches, generation metrics.

    due = due_evaluations(tasks)             # after a step: which tasks, which rows (their fixed samples)
    scores = evaluate_tasks(prefixed, tok, pad_id, [slots[t] for t in due], due, batch_size=16, coll=None)
    [best, last] = score_prefixes(prefixed, tok, pad_id, [(p1, slot, None), (p2, slot, None)], 16, None)

    rows = eval_subset(len(data.validation), max_rows=256, seed=0)    # a periodic evaluation's rows
    [scores] = validation_scores(prefixed, pad_id, [(prefix, data.validation, rows)], batch_size=16)
    scores == {"eval_loss": 1.93, "eval_perplexity": 6.9}

Rows of every task evaluated at a step share micro-batches, each row with its own task's prefix (the
training forward, `workers.batches.mixed_forward`): a task's scores equal those of its rows scored alone,
up to float summation order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from workers.batches import micro_batch_groups, mixed_forward, rank_share
from workers.devices import Collectives
from workers.generate import generate_texts
from workers.metrics import generation_metrics


def eval_subset(n: int, max_rows: int, seed: int) -> list[int]:
    """The rows a periodic evaluation scores: all of range(n) when n <= max_rows, else a sample of max_rows
    of them, sorted. Depends on (n, max_rows, seed) only: the same rows at every evaluation, on every rank.

        eval_subset(5, 10, seed=0) == [0, 1, 2, 3, 4]
    """
    if n <= max_rows:
        return list(range(n))
    return sorted(np.random.default_rng([seed, n]).choice(n, size=max_rows, replace=False).tolist())


@torch.no_grad()
def validation_scores(
    prefixed: Any,
    pad_id: int,
    tasks: list[tuple[torch.Tensor, Any, list[int]]],
    *,
    batch_size: int,
    coll: Collectives | None = None,
) -> list[dict[str, float]]:
    """Per task, {eval_loss: mean target-token loss, eval_perplexity: exp of it} over the chosen rows.

    tasks: (encoded prefix [P, 2L*H*D], tokenized validation dataset, row indices) per task. The rows of all
    tasks are sorted by length and cut into micro-batches of `batch_size` rows per rank; in a group each rank
    scores its share and the sums are all-reduced (every rank gets the same scores).
    """
    rows, owners = [], []
    for j, (_, validation, indices) in enumerate(tasks):
        columns = validation[list(indices)]
        rows += [{"input_ids": a, "labels": b} for a, b in zip(columns["input_ids"], columns["labels"])]
        owners += [j] * len(indices)
    rank, world = (coll.rank, coll.world) if coll else (0, 1)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    groups = micro_batch_groups(order, batch_size * world, [len(rows[i]["input_ids"]) for i in order])
    sums = torch.zeros(2, len(tasks), dtype=torch.float64)  # per task: summed target-token loss, target tokens
    for share, weight in (rank_share(group, rank, world) for group in groups):
        out, row_tasks, _ = mixed_forward(
            prefixed, lambda j: tasks[j][0], [rows[i] for i in share], [owners[i] for i in share], pad_id
        )
        sums[0].index_add_(0, row_tasks.cpu(), weight * out.row_loss_sums().double().cpu())
        sums[1].index_add_(0, row_tasks.cpu(), weight * out.row_token_counts().double().cpu())
    if coll:
        coll.all_reduce(sums)
    losses = (sums[0] / sums[1].clamp(min=1.0)).tolist()
    return [{"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))} for loss in losses]


@torch.no_grad()
def generation_scores(
    prefixed: Any, tokenizer: Any, tasks: list[tuple[torch.Tensor, Any, int, int]]
) -> list[dict[str, float]]:
    """Per task, generation metrics (`workers.metrics.generation_metrics`) of greedy generations for its
    first `samples` validation rows; tasks with the same `max_new_tokens` generate in mixed batches.

    tasks: (encoded prefix [P, 2L*H*D], tokenized validation dataset, samples, max_new_tokens) per task.
    """
    out: list[dict[str, float]] = [{} for _ in tasks]
    for max_new in sorted({t[3] for t in tasks}):
        chosen = [j for j, t in enumerate(tasks) if t[3] == max_new]
        prompts, refs, owners = [], [], []
        for k, j in enumerate(chosen):
            _, validation, samples, _ = tasks[j]
            sample = validation[: min(samples, len(validation))]
            prompts.extend(sample["prompt_ids"])
            refs.extend(sample["target_text"])
            owners.extend([k] * len(sample["prompt_ids"]))
        prefixes = [tasks[j][0] for j in chosen]
        texts = generate_texts(prefixed, tokenizer, prefixes, owners, prompts, max_new_tokens=max_new)
        for k, j in enumerate(chosen):
            preds = [t for t, o in zip(texts, owners) if o == k]
            gold = [r for r, o in zip(refs, owners) if o == k]
            out[j] = generation_metrics(preds, gold)
    return out


def due_evaluations(tasks: list[Any]) -> dict[str, list[int]]:
    """The tasks (the trainer's slots, `workers.trainer._Task`) to evaluate after a step, with their rows: the
    fixed sample `eval_rows` every eval_every steps and at the end of a task's budget. These evaluations
    pick its best prefix (always the same rows, so they compare); every row is scored once, at its end, for
    the best and the last prefix (`score_prefixes`)."""
    return {
        task.config.task_id: task.eval_rows
        for task in tasks
        if task.step >= task.total_steps or task.step % task.config.training.eval_every == 0
    }


@torch.no_grad()
def evaluate_tasks(
    prefixed: Any,
    tokenizer: Any,
    pad_id: int,
    tasks: list[Any],
    due: dict[str, list[int] | None],
    batch_size: int,
    coll: Collectives | None,
) -> dict[str, dict[str, float]]:
    """Evaluate `tasks` (the trainer's slots) with their current prefixes on their `due` rows (task id -> row
    indices, None: all). Returns task id -> scores (`score_prefixes`)."""
    prefixes = [task.encoder.prompt_embeddings().detach() for task in tasks]
    entries = [(prefix, task, due[task.config.task_id]) for prefix, task in zip(prefixes, tasks)]
    scores = score_prefixes(prefixed, tokenizer, pad_id, entries, batch_size, coll)
    return {task.config.task_id: result for task, result in zip(tasks, scores)}


@torch.no_grad()
def score_prefixes(
    prefixed: Any,
    tokenizer: Any,
    pad_id: int,
    entries: list[tuple[torch.Tensor, Any, list[int] | None]],
    batch_size: int,
    coll: Collectives | None,
) -> list[dict[str, float]]:
    """Scores of each (encoded prefix [P, 2L*H*D], task slot, row indices or None for all) together:
    validation loss and perplexity on those rows, and generation metrics where the task asks for them. A task
    may come more than once (its best and its last prefix)."""
    if not entries:
        return []
    chosen = [range(len(task.data.validation)) if rows is None else rows for _, task, rows in entries]
    scores = validation_scores(
        prefixed,
        pad_id,
        [(prefix, task.data.validation, rows) for (prefix, task, _), rows in zip(entries, chosen)],
        batch_size=batch_size,
        coll=coll,
    )
    generating = [j for j, (_, task, _) in enumerate(entries) if task.config.training.eval_generation.enabled]
    if generating:
        asked = [
            (entries[j][0], entries[j][1].data.validation, entries[j][1].config.training.eval_generation)
            for j in generating
        ]
        generated = generation_scores(
            prefixed, tokenizer, [(prefix, validation, g.samples, g.max_new_tokens) for prefix, validation, g in asked]
        )
        for j, metrics in zip(generating, generated):
            scores[j].update(metrics)
    return scores
