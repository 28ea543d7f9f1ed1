"""Many task prefixes trained at once over one frozen base model, in mixed-task batches.

    trainer = MultiTaskTrainer(model, tokenizer, micro_batch_size=16)
    trainer.add_task(TaskConfig(task_id="j-1", name="qa", ...))   # resumes from out_dir's newest checkpoint
    report = trainer.step()            # StepReport: progress per task, finished TaskResults, failed tasks

One step (`MultiTaskTrainer.step`; the reasoning is in docs/design.md, "The multi-task trainer"):
  1. every active task contributes its next `examples_per_step` rows (its own resumable order);
  2. the rows are sorted by length and cut into micro-batches of at most `micro_batch_size` rows;
  3. each micro-batch runs one forward, every row with its own prefix, the LM head at target positions
     only; its loss is sum_j (loss of j's target tokens in it) / (j's target tokens in the step), so task
     j's gradient equals what it gets training alone;
  4. right after the last micro-batch holding a task's rows: its clipping, AdamW and schedule step;
  5. every `eval_every` steps, a fixed seeded sample of `eval_max_rows` validation rows per due task
     (`workers/evaluation.py`), the best prefix tracked (`workers/selection.py`), early stopping, and
     checkpoints at their cadence (`workers/checkpoints.py`);
  6. at a task's end: its best and last prefixes scored on every validation row and exported (best as
     the result, last under final/), and its slot freed.
A micro-batch out of memory is rerun task by task; only a task whose own rows still do not fit fails
(`StepReport.failed`). A task's gradient is freed after its update. Tasks join (`add_task`) and leave
(`remove_task`) between steps, each costing only its prefix encoder and optimizer state. With `collectives`
(one rank of a group) every rank takes its share of each micro-batch and losses, token counts and prefix
gradients are summed across ranks, so every rank applies one process's update (up to summation order).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers import allocator, results
from workers.batches import ExampleStream, micro_batch_groups, mixed_forward, rank_share
from workers.checkpoints import restore_checkpoint, save_checkpoint
from workers.data import DataSettings, TaskData, load_task_data
from workers.devices import Collectives, out_of_memory, peak_memory_bytes
from workers.evaluation import due_evaluations, eval_subset, evaluate_tasks, score_prefixes
from workers.formats import save_peft_adapter, save_prefix
from workers.inject import PrefixedModel
from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model
from workers.selection import BestPrefix
from workers.storage import JobStorage, temporary_dir
from workers.tasks import StepReport, TaskConfig, TaskProgress, lr_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskResult:
    """A finished task: where its prefix is and how it scored."""

    task_id: str
    name: str
    steps: int
    adapter_dir: str
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors) of the best prefix; the last
    step's prefix is beside it, in final/adapter and final/prefix."""
    prefix_dir: str
    """prefixd prefix folder (the whole encoder, projection included) of the best prefix."""
    metrics: dict[str, float]
    """The best prefix on every validation row: eval_loss, eval_perplexity, and generation metrics when asked
    for; best_step and best_<metric> (the registry metric in the evaluation that chose it, on the fixed
    sample); final_<name> for each of the last step's prefix on every validation row."""
    history_file: str
    """JSON lines of per-step metrics."""
    stopped_early: bool = False
    """Early stopping ended the task before its budget (`steps` says where)."""


@dataclass
class _Task:
    config: TaskConfig
    prefix_config: PrefixTuningConfig
    encoder: PrefixEncoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TaskData
    stream: ExampleStream
    total_steps: int
    generator: torch.Generator
    eval_rows: list[int]
    """The validation rows of its periodic evaluations (`workers.evaluation.eval_subset`)."""
    best: BestPrefix
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


class MultiTaskTrainer:
    """Holds one frozen base model and a set of task slots; trains every active task each step."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        micro_batch_size: int = 16,
        checkpointing: bool = False,
        compile_layers: bool = False,
        data_cache_dir: str | None = None,
        collectives: Collectives | None = None,
        device: torch.device | str | None = None,
        retain_freed_memory: bool = True,
        scratch_dir: str | None = None,
    ):
        """compile_layers: run the decoder layers of training forwards as one `torch.compile`d graph
        (`workers/fused.py`; Llama, Mistral, Qwen2 without ZeRO-3 partitioning or checkpointing). The first
        steps pay the compilation (docs/design.md, "Compiled layers"); the results equal the eager path's to
        float rounding. Where it cannot apply, the eager path is kept and `compile_note` says why.
        retain_freed_memory: keep the memory each micro-batch frees in the process for the next one
        (`workers/allocator.py`: glibc's malloc thresholds, process-wide) instead of faulting it back in
        from the kernel every micro-batch; resident memory then stays at its peak between steps.
        collectives: the group's `Collectives` when this is one rank of a data-parallel group, else None.
        device: where prefixes, optimizer state and batches live (default: the model's first parameter's
        device; `workers.devices.Placement` decides it for a group's rank).
        scratch_dir: a local folder where checkpoints and results are staged before they are uploaded to a
        task's out_dir, and downloaded checkpoints are read (default: the system's temporary folder)."""
        if retain_freed_memory:
            allocator.retain_freed_memory()
        self.prefixed = PrefixedModel(model, device=device)
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.data_cache_dir = data_cache_dir
        self.scratch_dir = scratch_dir
        self.coll = collectives
        self.rank = collectives.rank if collectives else 0
        self.world = collectives.world if collectives else 1
        self.tasks: dict[str, _Task] = {}
        self.on_checkpoint: Callable[[str, int, Path], None] | None = None
        """Called on rank 0 as (task id, step, staged folder: prefix/, optimizer, state.json) after each
        checkpoint is uploaded; the folder is removed once it returns (a live run copies what it logs)."""
        self.memory_error: str | None = None  # why the last micro-batch did not run (`workers.devices.out_of_memory`)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if checkpointing:
            model.train()  # activation checkpointing acts in training mode; the base has no dropout left on
            _disable_dropout(model)
            self.prefixed.enable_checkpointing()
        else:
            model.eval()
        self.compile_note: str | None = None
        """Why compiled layers were asked for and not used; None when they are in use or not asked for."""
        if compile_layers:
            self.compile_note = self.prefixed.compile_layers()
            if self.compile_note:
                log.warning("compile_layers: keeping the eager layers: %s", self.compile_note)

    @property
    def device(self) -> torch.device:
        return self.prefixed.device

    @property
    def active(self) -> list[str]:
        return list(self.tasks)

    # ------------------------------------------------------------------ joining and leaving
    def add_task(self, config: TaskConfig) -> TaskProgress:
        """Admit a task at the next step; resumes from a checkpoint in config.out_dir if one exists."""
        if config.task_id in self.tasks:
            raise ValueError(f"task {config.task_id} is already training")
        data = load_task_data(
            _with_seq2seq(config.data, self.prefixed.seq2seq), self.tokenizer, cache_dir=self.data_cache_dir
        )
        prefix_config = configure_for_model(config.prefix, self.model.config, max_new_tokens=config.data.max_length)
        t = config.training
        torch.manual_seed(t.seed)  # the prefix's init depends on the task's seed only
        encoder = PrefixEncoder(prefix_config).to(self.device)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        if t.steps is not None:
            total = t.steps
        else:
            total = max(1, math.ceil(t.epochs * len(data.train) / t.examples_per_step))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t.schedule, t.warmup_steps, total))
        generator = torch.Generator().manual_seed(t.seed)
        task = _Task(
            config,
            prefix_config,
            encoder,
            optimizer,
            scheduler,
            data,
            ExampleStream(len(data.train), seed=t.seed),
            total,
            generator,
            eval_rows=eval_subset(len(data.validation), t.eval_max_rows, t.seed),
            best=BestPrefix.of(config),
        )
        restore_checkpoint(task, self.model.config, self.scratch_dir)
        self.tasks[config.task_id] = task
        return self._progress(task, loss=float("nan"), tokens=0, seconds=0.0)

    def checkpoint(self, task_id: str) -> int:
        """Write the task's checkpoint now (rank 0 writes; a graceful stop uses this); returns its step."""
        task = self.tasks[task_id]
        self._checkpoint(task)
        return task.step

    def remove_task(self, task_id: str) -> None:
        """Drop a task at a step boundary (cancel); its last checkpoint stays in storage."""
        self.tasks.pop(task_id)

    # ------------------------------------------------------------------ one step
    def step(self) -> StepReport:
        """Train every active task by one step; returns progress and the tasks that finished."""
        if not self.tasks:
            return StepReport(0.0, 0, 0, {}, [])
        start = time.perf_counter()
        failed: dict[str, str] = {}
        drawn = self._readable_rows(failed)
        if not drawn:
            self._drop(failed)
            return StepReport(0.0, 0, 0, {}, [], peak_memory_bytes(), {}, failed)
        tasks = [task for task, _ in drawn]
        rows = [row for _, task_rows in drawn for row in task_rows]
        owners = [j for j, (_, task_rows) in enumerate(drawn) for _ in task_rows]  # row -> index in tasks
        target_tokens = torch.zeros(len(tasks), dtype=torch.float64)  # each task's loss is a mean over these
        for row, j in zip(rows, owners):
            target_tokens[j] += sum(1 for t in _targets(row, self.prefixed.seq2seq) if t != -100)
        sums = torch.zeros(2, len(tasks), dtype=torch.float64)  # per task: summed target-token loss, real tokens
        learning_rates = [task.optimizer.param_groups[0]["lr"] for task in tasks]

        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        pending = self._train(tasks, rows, owners, order, target_tokens, sums, failed)
        for j in pending:  # a micro-batch ran out of memory: each task not yet updated runs its rows alone
            self._train_alone(j, tasks, rows, owners, order, target_tokens, sums, failed)

        if self.coll:
            self.coll.all_reduce(sums)
        loss_sums, real_tokens = sums
        for j, task in enumerate(tasks):  # the same on every rank: the sums are all-reduced
            if not math.isfinite(loss_sums[j].item()) and task.config.task_id not in failed:
                failed[task.config.task_id] = f"its training loss is {loss_sums[j].item()} at step {task.step + 1}"
        self._drop(failed)
        seconds = time.perf_counter() - start
        total_tokens = int(real_tokens.sum())
        stepped = [(j, task) for j, task in enumerate(tasks) if task.config.task_id not in failed]
        records = {}
        for j, task in stepped:
            task.step += 1
            share = seconds * (real_tokens[j].item() / max(total_tokens, 1))
            records[j] = {
                "step": task.step,
                "loss": loss_sums[j].item() / max(target_tokens[j].item(), 1.0),
                "learning_rate": learning_rates[j],
                "tokens": int(real_tokens[j]),
                "tokens_per_s": total_tokens / seconds if seconds else 0.0,
                "task_tokens_per_s": real_tokens[j].item() / share if share else 0.0,
                "epoch": task.stream.epochs_completed,
                "time": time.time(),
            }
        evaluations = self._evaluate(due_evaluations([task for _, task in stepped]))
        ending = self._ending([task for _, task in stepped], evaluations)
        outcomes = self._outcomes(ending)
        progress, finished, warnings = {}, [], {}
        for j, task in stepped:
            task_id = task.config.task_id
            evaluation = evaluations.get(task_id)
            task.history.append(records[j] | (evaluation or {}))
            if task_id in outcomes:
                finished.append(self._finish(task, *outcomes[task_id]))
            elif task.step % task.config.training.checkpoint_every == 0:
                try:
                    self._checkpoint(task)
                except OSError as e:  # e.g. a full disk: training goes on, the next checkpoint retries
                    warnings[task_id] = f"checkpoint at step {task.step} not written: {e}"
            loss, tokens = records[j]["loss"], records[j]["tokens"]
            progress[task_id] = self._progress(task, loss, tokens, seconds, evaluation)
        return StepReport(seconds, total_tokens, len(rows), progress, finished, peak_memory_bytes(), warnings, failed)

    def _train(self, tasks, rows, owners, order, target_tokens, sums, failed) -> list[int]:
        """Forward and backward of the rows in `order`, in mixed-task micro-batches; each task's update
        right after its last micro-batch. Returns the tasks left without an update because a micro-batch
        ran out of memory (here or on another rank: the ranks agree after each micro-batch), else []."""
        groups = micro_batch_groups(
            order, self.micro_batch_size * self.world, [len(rows[i]["input_ids"]) for i in order]
        )
        # A task's gradient is complete after the last micro-batch holding one of its rows: its optimizer
        # steps right there and its gradient is freed, so at most a few tasks' gradients exist at once.
        last_group = {owners[i]: g for g, group in enumerate(groups) for i in group}
        updates: list[list[int]] = [[] for _ in groups]
        for j, g in last_group.items():
            updates[g].append(j)
        for g, group in enumerate(groups):
            self.memory_error = out_of_memory(
                self.coll, self._forward_backward, tasks, rows, owners, group, target_tokens, sums
            )
            if self.memory_error:
                return sorted(j for j, last in last_group.items() if last >= g)
            for j in updates[g]:  # the same tasks on every rank: the cuts depend on the shared order only
                error = self._update(tasks[j])
                if error:
                    failed[tasks[j].config.task_id] = error
        return []

    def _forward_backward(self, tasks, rows, owners, group, target_tokens, sums) -> None:
        """One micro-batch (this rank's share of `group`): the forward with each row's own prefix, and the
        backward of  sum over its tasks j of (j's loss sum here) / (j's target tokens in the step)."""
        idx, weight = rank_share(group, self.rank, self.world)
        out, row_tasks, mask = mixed_forward(
            self.prefixed,
            lambda j: tasks[j].encoder.prompt_embeddings(),
            [rows[i] for i in idx],
            [owners[i] for i in idx],
            self.pad_id,
        )
        per_row = out.row_loss_sums()
        objective = 0.0
        for j in sorted({owners[i] for i in idx}):
            sel = row_tasks == j
            task_sum = per_row[sel].sum()
            objective = objective + task_sum / target_tokens[j].item()
            sums[0, j] += weight * task_sum.item()
            sums[1, j] += weight * mask[sel].sum().item()
        (objective * weight).backward()

    def _train_alone(self, j, tasks, rows, owners, order, target_tokens, sums, failed) -> None:
        """After a mixed micro-batch ran out of memory: task j's rows again, alone, from a clean gradient.
        If its own rows still run out of memory it fails alone, without an update; a task's gradient
        depends on its own rows only, so the others' results are those of a step without it."""
        task = tasks[j]
        task.optimizer.zero_grad(set_to_none=True)
        sums[:, j] = 0.0
        mine = [i for i in order if owners[i] == j]
        if self._train(tasks, rows, owners, mine, target_tokens, sums, failed):
            task.optimizer.zero_grad(set_to_none=True)
            longest = max(len(rows[i]["input_ids"]) for i in mine)
            failed[task.config.task_id] = (
                f"out of memory on its own rows at step {task.step + 1} ({len(mine)} rows of up to {longest} tokens, "
                f"micro-batches of {self.micro_batch_size} rows): {self.memory_error}"
            )

    def _readable_rows(self, failed: dict[str, str]) -> list[tuple[_Task, list]]:
        """Each task's next rows (every rank draws the same: same streams). A task whose rows cannot be read
        fails alone, on every rank alike (the ranks agree by an all-reduce), and the others go on."""
        drawn, bad = [], torch.zeros(len(self.tasks), dtype=torch.int32)
        for j, task in enumerate(self.tasks.values()):
            try:
                indices = task.stream.next_indices(task.config.training.examples_per_step)
                drawn.append((task, [task.data.train[i] for i in indices]))
            except Exception as e:  # noqa: BLE001 - this task's data alone
                bad[j] = 1
                drawn.append((task, []))
                failed[task.config.task_id] = f"cannot read its training rows: {type(e).__name__}: {e}"
        if self.coll:
            self.coll.all_reduce(bad, op="max")
        for j, (task, _) in enumerate(drawn):
            if bad[j] and task.config.task_id not in failed:
                failed[task.config.task_id] = "cannot read its training rows on another rank of the group"
        return [(task, rows) for j, (task, rows) in enumerate(drawn) if not bad[j]]

    def _drop(self, failed: dict[str, str]) -> None:
        for task_id, error in failed.items():
            if self.tasks.pop(task_id, None) is not None:
                log.warning("task %s failed and left the group: %s", task_id, error)

    def _update(self, task: _Task) -> str | None:
        """Sum the task's prefix gradient over ranks, clip it, take its optimizer and schedule step,
        and free the gradient. Returns why the task fails instead (a gradient that is not finite: no step
        is taken), else None. The same on every rank: the norm is of the all-reduced gradient."""
        params = list(task.encoder.parameters())
        if self.coll:
            for p in params:
                if p.grad is None:  # none of this task's rows fell to this rank in this step
                    p.grad = torch.zeros_like(p)
            self.coll.all_reduce_many([p.grad for p in params])
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not torch.isfinite(norm):
            task.optimizer.zero_grad(set_to_none=True)
            return f"its prefix gradient is not finite ({norm.item()}) at step {task.step + 1}"
        if task.config.training.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, task.config.training.max_grad_norm, norm)
        task.optimizer.step()
        task.scheduler.step()
        task.optimizer.zero_grad(set_to_none=True)
        return None

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, task_id: str, batch_size: int = 16) -> dict[str, float]:
        """The task's validation loss and perplexity over every validation row, and its generation metrics
        when configured."""
        return self._evaluate({task_id: None}, batch_size)[task_id]

    def _evaluate(self, due: dict[str, list[int] | None], batch_size: int = 16) -> dict[str, dict[str, float]]:
        tasks = [self.tasks[task_id] for task_id in due]
        return evaluate_tasks(self.prefixed, self.tokenizer, self.pad_id, tasks, due, batch_size, self.coll)

    def _ending(self, tasks: list[_Task], evaluations: dict[str, dict[str, float]]) -> list[_Task]:
        """Each evaluation goes to its task's best; returns the tasks that end at this step: their budget is
        spent, or early stopping says stop (their budget then ends here, so progress shows where)."""
        for task in tasks:
            scores = evaluations.get(task.config.task_id)
            stop = scores is not None and task.best.observe(task.step, scores, task.encoder)
            if stop and task.step < task.total_steps:
                task.stopped_early, task.total_steps = True, task.step
                log.info("task %s: stopped early at step %d: %s", task.config.task_id, task.step, task.best)
        return [task for task in tasks if task.step >= task.total_steps]

    def _outcomes(self, tasks: list[_Task]) -> dict[str, tuple[PrefixEncoder, dict[str, float]]]:
        """Each ending task's best encoder and result metrics (`BestPrefix.result_metrics`): the best and the
        last prefix of every ending task are scored on every validation row together (once when the same)."""
        bests = [task.best.encoder(task.encoder, task.step) for task in tasks]
        entries = []
        for task, best in zip(tasks, bests):
            encoders = [task.encoder] if best is task.encoder else [task.encoder, best]  # the last, then the best
            entries += [(encoder.prompt_embeddings().detach(), task, None) for encoder in encoders]
        scores = iter(score_prefixes(self.prefixed, self.tokenizer, self.pad_id, entries, 16, self.coll))
        outcomes = {}
        for task, best in zip(tasks, bests):
            final = next(scores)
            chosen = final if best is task.encoder else next(scores)
            outcomes[task.config.task_id] = (best, task.best.result_metrics(task.step, chosen, final))
        return outcomes

    def _checkpoint(self, task: _Task) -> None:
        """Rank 0 writes the task's checkpoint (`workers/checkpoints.py`)."""
        if self.rank == 0:
            save_checkpoint(task, self.scratch_dir, self.on_checkpoint)

    def _finish(self, task: _Task, best: PrefixEncoder, metrics: dict[str, float]) -> TaskResult:
        """The task's results, staged locally by rank 0 and uploaded to its folder; checkpoints removed.
        The job's result.json, which marks the folder complete, is the orchestrator's to write after this.
        `best` is the result's prefix (`_outcomes`), the task's own encoder the last step's, written to final/."""
        del self.tasks[task.config.task_id]
        out = JobStorage.open(task.config.out_dir)
        result = TaskResult(
            task_id=task.config.task_id,
            name=task.config.name,
            steps=task.step,
            adapter_dir=out.child(results.ADAPTER).uri,
            prefix_dir=out.child(results.PREFIX).uri,
            metrics=metrics,
            history_file=out.child(results.HISTORY).uri,
            stopped_early=task.stopped_early,
        )
        if self.rank == 0:
            with temporary_dir(self.scratch_dir, f"result-{task.config.task_id}-") as tmp:
                tmp = Path(tmp)
                save_peft_adapter(tmp / results.ADAPTER, best, task.prefix_config)
                save_prefix(tmp / results.PREFIX, best, task.prefix_config)
                save_peft_adapter(tmp / results.FINAL / results.ADAPTER, task.encoder, task.prefix_config)
                save_prefix(tmp / results.FINAL / results.PREFIX, task.encoder, task.prefix_config)
                results.write_outputs(
                    out, tmp, history=task.history, metrics=result.metrics, report=str(task.data.report)
                )
            out.delete_checkpoints()
        return result

    def _progress(self, task: _Task, loss: float, tokens: int, seconds: float, evaluation=None) -> TaskProgress:
        rate = tokens / seconds if seconds else 0.0
        examples = task.config.training.examples_per_step / seconds if seconds else 0.0
        return TaskProgress(
            task.config.task_id,
            task.step,
            task.total_steps,
            loss,
            task.optimizer.param_groups[0]["lr"],
            tokens,
            rate,
            examples,
            evaluation,
        )

    def prefix_of(self, task_id: str) -> torch.Tensor:
        """The task's current encoded prefix, [P, 2L*H*D] fp32 (detached)."""
        return self.tasks[task_id].encoder.prompt_embeddings().detach()


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _with_seq2seq(settings: DataSettings, seq2seq: bool) -> DataSettings:
    from dataclasses import replace

    return settings if settings.is_seq2seq == seq2seq else replace(settings, is_seq2seq=seq2seq)


def _targets(row, seq2seq: bool):
    labels = row["labels"]
    return labels if seq2seq else labels[1:]
