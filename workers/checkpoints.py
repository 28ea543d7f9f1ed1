"""A task's resumable state in its job folder: written whole as a checkpoint, read back on resume.

    save_checkpoint(task, scratch_dir, on_saved)             # rank 0: stage locally, upload (JobStorage)
    restore_checkpoint(task, model.config, scratch_dir)      # newest usable checkpoint, else step 0

A checkpoint holds the prefix (`workers.formats.save_prefix`), the optimizer, schedule and RNG state, the
best prefix so far (`workers.selection.BestPrefix`), and `state.json` (step, example-stream position,
history, the best's step, value and evaluations since). `task` is the trainer's task slot
(`workers.trainer._Task`): its config, encoder, optimizer, scheduler, generator, stream, step, history, best.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.formats import load_prefix, load_tree, save_prefix, save_tree
from workers.storage import JobStorage, temporary_dir

log = logging.getLogger(__name__)


def save_checkpoint(
    task: Any, scratch_dir: str | None, on_saved: Callable[[str, int, Path], None] | None = None
) -> None:
    """Stage the task's state in a local folder and upload it whole as a new checkpoint
    (`JobStorage.save_checkpoint`: it counts once complete; the previous one stays until then). Once it is
    uploaded, `on_saved(task id, step, staged folder)` is called; the folder is removed when it returns."""
    with temporary_dir(scratch_dir, f"checkpoint-{task.config.task_id}-") as tmp:
        tmp = Path(tmp)
        save_prefix(tmp / "prefix", task.encoder, task.prefix_config)
        save_tree(
            tmp / "optimizer",
            {
                "optimizer": task.optimizer.state_dict(),
                "scheduler": task.scheduler.state_dict(),
                "generator": task.generator.get_state(),
                "best": task.best.state,
            },
        )
        (tmp / "state.json").write_text(
            json.dumps(
                {
                    "step": task.step,
                    "stream": task.stream.state_dict(),
                    "history": task.history,
                    "best": task.best.to_json(),
                    "total_steps": task.total_steps,
                    "task_id": task.config.task_id,
                }
            ),
            encoding="utf-8",
        )
        JobStorage.open(task.config.out_dir).save_checkpoint(tmp, task.step)
        if on_saved is not None:
            on_saved(task.config.task_id, task.step, tmp)


def restore_checkpoint(task: Any, model_config: Any, scratch_dir: str | None) -> None:
    """Resume from the newest complete checkpoint in the task's folder that reads whole, else the one
    before it; nothing found: the task starts at step 0. No collective here (a rank whose data failed
    to load never gets this far): in a group, `workers.ranks.add_everywhere` checks afterwards that
    every rank resumed at the same step."""
    storage = JobStorage.open(task.config.out_dir)
    names = storage.complete_checkpoints()
    for name in names:
        try:
            state, encoder, tree = _read_checkpoint(storage, name, model_config, scratch_dir)
        except (OSError, ValueError, KeyError, TypeError) as error:  # StorageError, CheckpointError too
            log.warning(
                "task %s: checkpoint %s cannot be used (%s); trying the one before it", task.config.task_id, name, error
            )
        else:
            task.encoder.load_state_dict(encoder.state_dict())
            task.optimizer.load_state_dict(tree["optimizer"])
            task.scheduler.load_state_dict(tree["scheduler"])
            task.generator.set_state(tree["generator"])
            task.stream.load_state_dict(state["stream"])
            task.step = state["step"]
            task.history = state["history"]
            task.best.load(state.get("best"), tree.get("best"))
            return
    if names:
        log.warning("task %s: no usable checkpoint in %s; starting at step 0", task.config.task_id, storage)


def _read_checkpoint(storage: JobStorage, name: str, model_config: Any, scratch_dir: str | None):
    """(state, encoder, optimizer tree) of one checkpoint, downloaded and checked against its manifest."""
    with temporary_dir(scratch_dir, "restore-") as tmp:
        storage.download_checkpoint(name, tmp)
        state = json.loads((Path(tmp) / "state.json").read_text(encoding="utf-8"))
        _, encoder = load_prefix(Path(tmp) / "prefix", model_config)
        return state, encoder, load_tree(Path(tmp) / "optimizer")
