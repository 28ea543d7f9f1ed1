"""Many task prefixes trained at once over one frozen base model, in mixed-task batches.

One step, top to bottom (`MultiTaskTrainer.step`):
  1. every active task contributes its next `examples_per_step` rows (its own resumable order);
  2. the rows are sorted by length and cut into micro-batches of at most `micro_batch_size` rows;
  3. each micro-batch runs one forward with every row's own prefix; its loss is
        sum over tasks j of (target-token loss of j's rows in this micro-batch) / (j's target tokens in
        the whole step),
     so the accumulated gradient is that of  sum_j mean-loss_j : task j's gradient depends only on its
     own rows and equals what it gets training alone (co-tenant independence); the LM head runs at
     target positions only (`PrefixedModel.forward(logits="targets")`);
  4. per task, right after the last micro-batch that holds one of its rows: gradient clipping, its own
     AdamW step and learning-rate schedule, and its gradient freed (so a step never holds every task's
     gradient at once: with 64 tasks on SmolLM2 that would be 64 x 1.4 MB for nothing);
  5. per task, at its cadence: validation loss / perplexity (and generation metrics on request), a
     checkpoint, and at the end of its budget the exported prefix; its slot is then freed.
Tasks join (`add_task`) and leave (`remove_task`) between steps; nothing shared is rebuilt. The base
model exists once; a task costs its prefix encoder and optimizer state.

Data-parallel groups (`collectives` given, e.g. a ZeRO-3 group): every rank draws the same rows and takes
its share of each micro-batch; losses, token counts and prefix gradients are summed across ranks (through
`workers.devices.Collectives`, on the group's collective device), so every rank applies the same update and
the result equals one process's (up to float summation order). The prefixes, their optimizer state and
every micro-batch live on `device` (the rank's GPU, or the CPU).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobs.fields import TrainingSpec
from workers import allocator
from workers.batches import ExampleStream, collate_causal, collate_seq2seq
from workers.data import DataSettings, TaskData, load_task_data
from workers.devices import Collectives
from workers.formats import load_prefix, load_tree, save_peft_adapter, save_prefix, save_tree
from workers.generate import generate_texts
from workers.inject import PrefixedModel
from workers.metrics import generation_metrics
from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model
from workers.storage import JobStorage, temporary_dir

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "cosine")  # the spec's choices: _lr_lambda computes each
PADDING_WASTE = 0.25  # a micro-batch is cut before padding would exceed this share of its real tokens


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Everything one task's training needs, built once from its job spec (`orchestrator.plan.task_config`).

    No defaults and no rules of its own: `training` is the spec's section as validated (jobs/fields.py holds
    its defaults and ranges), `prefix` is the PEFT-compatible config the prefix is built from (its
    model-dependent fields are filled from the base model when the task joins).

        TaskConfig(task_id="j-1", name="qa", out_dir="s3://b/j-1", data=DataSettings(...),
                   prefix=PrefixTuningConfig(num_virtual_tokens=10), training=TrainingSpec(steps=60))
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

    def __post_init__(self) -> None:
        t = self.training
        assert (t.steps is None) != (t.epochs is None), f"task {self.name}: exactly one of steps and epochs"
        assert t.schedule in SCHEDULES, f"task {self.name}: schedule {t.schedule!r} not in {SCHEDULES}"


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
class TaskResult:
    """A finished task: where its prefix is and how it scored."""

    task_id: str
    name: str
    steps: int
    adapter_dir: str
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    prefix_dir: str
    """prefixd prefix folder (the whole encoder, projection included)."""
    metrics: dict[str, float]
    """Final evaluation: eval_loss, eval_perplexity, and generation metrics when asked for."""
    history_file: str
    """JSON lines of per-step metrics."""


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
    gradient that is not finite); they are removed, their prefixes untouched by the failing update, and
    the other tasks' updates are exactly what they would be without them."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0


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
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)


def _lr_lambda(schedule: str, warmup: int, total: int):
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
        steps pay the compilation (tens of seconds on a CPU core); the results equal the eager path's to
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.schedule, t.warmup_steps, total))
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
        )
        self._restore(task)
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
        tasks = self._readable_rows(failed)
        if not tasks:
            self._drop(failed)
            return StepReport(0.0, 0, 0, {}, [], peak_memory_bytes(), {}, failed)
        rows, owners = [], []
        for j, (_, task_rows) in enumerate(tasks):
            rows.extend(task_rows)
            owners.extend([j] * len(task_rows))
        tasks = [task for task, _ in tasks]
        target_tokens = torch.zeros(len(tasks), dtype=torch.float64)
        for row, j in zip(rows, owners):
            target_tokens[j] += sum(1 for t in _targets(row, self.prefixed.seq2seq) if t != -100)
        loss_sums = torch.zeros(len(tasks), dtype=torch.float64)
        real_tokens = torch.zeros(len(tasks), dtype=torch.float64)

        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        groups = self._micro_batch_groups(order, lengths=[len(rows[i]["input_ids"]) for i in order])
        # A task's gradient is complete after the last micro-batch holding one of its rows: its optimizer
        # steps right there and its gradient is freed, so at most a few tasks' gradients exist at once.
        last_group = {owners[i]: g for g, group in enumerate(groups) for i in group}
        updates: list[list[int]] = [[] for _ in groups]
        for j, g in last_group.items():
            updates[g].append(j)
        learning_rates = [task.optimizer.param_groups[0]["lr"] for task in tasks]
        collate = collate_seq2seq if self.prefixed.seq2seq else collate_causal
        for g, group in enumerate(groups):
            idx, weight = self._share(group)
            batch = {k: v.to(self.device) for k, v in collate([rows[i] for i in idx], self.pad_id).items()}
            row_tasks = torch.tensor([owners[i] for i in idx], device=self.device)
            used = sorted(set(row_tasks.tolist()))
            local = torch.full((len(tasks),), -1, dtype=torch.long, device=self.device)
            local[used] = torch.arange(len(used), device=self.device)
            prefixes = [tasks[j].encoder.prompt_embeddings() for j in used]
            out = self.prefixed.forward(
                prefixes,
                local[row_tasks],
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                logits="targets",
            )
            per_row = out.row_loss_sums()
            objective = 0.0
            for j in used:
                sel = row_tasks == j
                task_sum = per_row[sel].sum()
                objective = objective + task_sum / target_tokens[j].item()
                loss_sums[j] += weight * task_sum.item()
                real_tokens[j] += weight * batch["attention_mask"][sel].sum().item()
            (objective * weight).backward()
            del out, per_row, objective, prefixes
            for j in updates[g]:  # the same tasks on every rank: the cuts depend on the shared order only
                error = self._update(tasks[j])
                if error:
                    failed[tasks[j].config.task_id] = error

        if self.coll:
            self.coll.all_reduce_many([loss_sums, real_tokens])
        for j, task in enumerate(tasks):  # the same on every rank: the sums are all-reduced
            if not math.isfinite(loss_sums[j].item()) and task.config.task_id not in failed:
                failed[task.config.task_id] = f"its training loss is {loss_sums[j].item()} at step {task.step + 1}"
        self._drop(failed)
        index = {task.config.task_id: j for j, task in enumerate(tasks)}
        tasks = [task for task in tasks if task.config.task_id not in failed]
        seconds = time.perf_counter() - start
        total_tokens = int(real_tokens.sum())
        progress, finished, warnings = {}, [], {}
        for task in tasks:
            j = index[task.config.task_id]
            lr = learning_rates[j]
            task.step += 1
            loss = loss_sums[j].item() / max(target_tokens[j].item(), 1.0)
            share = seconds * (real_tokens[j].item() / max(total_tokens, 1))
            record = {
                "step": task.step,
                "loss": loss,
                "learning_rate": lr,
                "tokens": int(real_tokens[j]),
                "tokens_per_s": total_tokens / seconds if seconds else 0.0,
                "task_tokens_per_s": real_tokens[j].item() / share if share else 0.0,
                "epoch": task.stream.epochs_completed,
                "time": time.time(),
            }
            done = task.step >= task.total_steps
            evaluation = None
            if done or task.step % task.config.training.eval_every == 0:
                evaluation = self.evaluate(task.config.task_id)
                record.update(evaluation)
            task.history.append(record)
            if done:
                finished.append(self._finish(task))
            elif task.step % task.config.training.checkpoint_every == 0:
                try:
                    self._checkpoint(task)
                except OSError as e:  # e.g. a full disk: training goes on, the next checkpoint retries
                    warnings[task.config.task_id] = f"checkpoint at step {task.step} not written: {e}"
            progress[task.config.task_id] = self._progress(task, loss, int(real_tokens[j]), seconds, evaluation)
        return StepReport(seconds, total_tokens, len(rows), progress, finished, peak_memory_bytes(), warnings, failed)

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

    def _micro_batch_groups(
        self, order: list[int], size: int | None = None, lengths: list[int] | None = None
    ) -> list[list[int]]:
        """`order` cut into micro-batches of at most `size` rows per rank (all ranks' rows together).

        With `lengths` (rows sorted by length), a micro-batch is also cut where the next row would make
        padding more than PADDING_WASTE of it: a task of short rows beside one of long rows then does
        not pay for the long rows' padding. Every rank computes the same cuts (they depend on the shared
        order only): under ZeRO-3 each forward and backward gathers the base weights collectively, so
        ranks must run in lockstep.
        """
        size = (size or self.micro_batch_size) * self.world
        groups: list[list[int]] = []
        real = 0
        for k, i in enumerate(order):
            if (
                groups
                and len(groups[-1]) < size
                and not (lengths and lengths[k] * (len(groups[-1]) + 1) > (1 + PADDING_WASTE) * (real + lengths[k]))
            ):
                groups[-1].append(i)
                real += lengths[k] if lengths else 0
            else:
                groups.append([i])
                real = lengths[k] if lengths else 0
        return groups

    def _share(self, group: list[int]) -> tuple[list[int], float]:
        """This rank's share of a micro-batch, with weight 1; (a row, weight 0) when the share is empty:
        the zero-weight row keeps the rank in lockstep without changing any gradient or count."""
        share = group[self.rank :: self.world]
        return (share, 1.0) if share else ([group[0]], 0.0)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, task_id: str, batch_size: int = 16) -> dict[str, float]:
        """Validation loss (mean over target tokens) and perplexity; generation metrics when configured."""
        task = self.tasks[task_id]
        prefix = [task.encoder.prompt_embeddings().detach()]
        val = task.data.validation
        collate = collate_seq2seq if self.prefixed.seq2seq else collate_causal
        loss_sum, count = 0.0, 0
        for idx, weight in map(self._share, self._micro_batch_groups(list(range(len(val))), batch_size)):
            batch = {k: v.to(self.device) for k, v in collate(val[idx], self.pad_id).items()}
            rows = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=self.device)
            out = self.prefixed.forward(
                prefix, rows, batch["input_ids"], batch["attention_mask"], batch["labels"], logits="targets"
            )
            loss_sum += weight * out.token_loss.sum().item()
            count += int(weight * out.target_mask.sum())
        totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
        if self.coll:
            self.coll.all_reduce(totals)
        loss = totals[0].item() / max(totals[1].item(), 1.0)
        result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        if task.config.training.eval_generation.enabled:
            result.update(self.generation_eval([task_id])[task_id])
        task.last_eval = result
        return result

    @torch.no_grad()
    def generation_eval(self, task_ids: list[str]) -> dict[str, dict[str, float]]:
        """Greedy generations for a sample of each task's validation rows, all tasks in mixed batches."""
        prompts, refs, owners = [], [], []
        for j, tid in enumerate(task_ids):
            task = self.tasks[tid]
            n = min(task.config.training.eval_generation.samples, len(task.data.validation))
            sample = task.data.validation[:n]
            prompts.extend(sample["prompt_ids"])
            refs.extend(sample["target_text"])
            owners.extend([j] * n)
        max_new = max(self.tasks[t].config.training.eval_generation.max_new_tokens for t in task_ids)
        texts = generate_texts(
            self.prefixed,
            self.tokenizer,
            [self.tasks[t].encoder.prompt_embeddings().detach() for t in task_ids],
            owners,
            prompts,
            max_new_tokens=max_new,
        )
        out = {}
        for j, tid in enumerate(task_ids):
            preds = [t for t, o in zip(texts, owners) if o == j]
            gold = [r for r, o in zip(refs, owners) if o == j]
            out[tid] = generation_metrics(preds, gold)
        return out

    # ------------------------------------------------------------------ checkpoints and results
    def _checkpoint(self, task: _Task) -> None:
        """Rank 0 stages the task's state locally and uploads it whole as a new checkpoint
        (`JobStorage.save_checkpoint`: it counts once complete; the previous one stays until then)."""
        if self.rank != 0:
            return
        with temporary_dir(self.scratch_dir, f"checkpoint-{task.config.task_id}-") as tmp:
            tmp = Path(tmp)
            save_prefix(tmp / "prefix", task.encoder, task.prefix_config)
            save_tree(
                tmp / "optimizer",
                {
                    "optimizer": task.optimizer.state_dict(),
                    "scheduler": task.scheduler.state_dict(),
                    "generator": task.generator.get_state(),
                },
            )
            (tmp / "state.json").write_text(
                json.dumps(
                    {
                        "step": task.step,
                        "stream": task.stream.state_dict(),
                        "history": task.history,
                        "total_steps": task.total_steps,
                        "task_id": task.config.task_id,
                    }
                ),
                encoding="utf-8",
            )
            JobStorage.open(task.config.out_dir).save_checkpoint(tmp, task.step)

    def _restore(self, task: _Task) -> None:
        """Resume from the newest complete checkpoint in the task's folder that reads whole, else the one
        before it; nothing found: the task starts at step 0. No collective here (a rank whose data failed
        to load never gets this far): in a group, `workers.ranks.add_everywhere` checks afterwards that
        every rank resumed at the same step."""
        storage = JobStorage.open(task.config.out_dir)
        names = storage.complete_checkpoints()
        for name in names:
            try:
                state, encoder, tree = self._read_checkpoint(storage, name)
            except (OSError, ValueError, KeyError, TypeError) as error:  # StorageError, CheckpointError too
                log.warning(
                    "task %s: checkpoint %s cannot be used (%s); trying the one before it",
                    task.config.task_id,
                    name,
                    error,
                )
            else:
                task.encoder.load_state_dict(encoder.state_dict())
                task.optimizer.load_state_dict(tree["optimizer"])
                task.scheduler.load_state_dict(tree["scheduler"])
                task.generator.set_state(tree["generator"])
                task.stream.load_state_dict(state["stream"])
                task.step = state["step"]
                task.history = state["history"]
                return
        if names:
            log.warning("task %s: no usable checkpoint in %s; starting at step 0", task.config.task_id, storage)

    def _read_checkpoint(self, storage: JobStorage, name: str):
        """(state, encoder, optimizer tree) of one checkpoint, downloaded and checked against its manifest."""
        with temporary_dir(self.scratch_dir, "restore-") as tmp:
            storage.download_checkpoint(name, tmp)
            state = json.loads((Path(tmp) / "state.json").read_text(encoding="utf-8"))
            _, encoder = load_prefix(Path(tmp) / "prefix", self.model.config)
            return state, encoder, load_tree(Path(tmp) / "optimizer")

    def _finish(self, task: _Task) -> TaskResult:
        """The task's results, staged locally by rank 0 and uploaded to its folder; checkpoints removed.
        The job's result.json, which marks the folder complete, is the orchestrator's to write after this."""
        del self.tasks[task.config.task_id]
        out = JobStorage.open(task.config.out_dir)
        result = TaskResult(
            task_id=task.config.task_id,
            name=task.config.name,
            steps=task.step,
            adapter_dir=out.child("adapter").uri,
            prefix_dir=out.child("prefix").uri,
            metrics=dict(task.last_eval),
            history_file=out.child("history.jsonl").uri,
        )
        if self.rank == 0:
            with temporary_dir(self.scratch_dir, f"result-{task.config.task_id}-") as tmp:
                tmp = Path(tmp)
                save_peft_adapter(tmp / "adapter", task.encoder, task.prefix_config)
                save_prefix(tmp / "prefix", task.encoder, task.prefix_config)
                with open(tmp / "history.jsonl", "w", encoding="utf-8") as f:
                    for record in task.history:
                        f.write(json.dumps(record) + "\n")
                (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
                (tmp / "data_report.txt").write_text(str(task.data.report) + "\n", encoding="utf-8")
                for name in ("adapter", "prefix", "history.jsonl", "metrics.json", "data_report.txt"):
                    out.upload(tmp / name, name)
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


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (CPU) or peak device memory (CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
