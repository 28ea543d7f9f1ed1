"""From a validated job spec to the plain arguments the workers take (STYLE: modules get plain
arguments, never the whole spec).

    ref = base_model_ref(spec)                          # which resident base model
    cfg = task_config(spec, job_id, out_dir)            # how the trainer trains this task
"""

from __future__ import annotations

from pathlib import Path

from jobs.spec import JobSpec
from workers.data import DataSettings
from workers.models import BaseModelRef
from workers.trainer import TaskConfig


def base_model_ref(spec: JobSpec) -> BaseModelRef:
    bm = spec.base_model
    if bm.builtin is not None:
        return BaseModelRef(kind="builtin", location=bm.builtin, dtype=bm.dtype)
    if bm.path is not None:
        return BaseModelRef(kind="path", location=str(bm.path), dtype=bm.dtype)
    return BaseModelRef(kind="hub", location=bm.hub.id, revision=bm.hub.revision, dtype=bm.dtype)


def task_config(spec: JobSpec, job_id: str, out_dir: str | Path) -> TaskConfig:
    d, p, t = spec.data, spec.prefix, spec.training
    data = DataSettings(
        train=str(d.train),
        validation=str(d.validation) if d.validation else None,
        format=d.format,
        input_column=d.input_column,
        template=d.template,
        target_column=d.target_column,
        max_length=d.max_length,
        truncation=d.truncation,
        validation_fraction=d.validation_fraction,
        seed=d.seed,
    )
    return TaskConfig(
        task_id=job_id,
        name=spec.name,
        data=data,
        out_dir=str(out_dir),
        num_virtual_tokens=p.num_virtual_tokens,
        projection=p.projection,
        projection_hidden_size=p.projection_hidden_size,
        init=p.init,
        learning_rate=t.learning_rate,
        schedule=t.schedule,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        examples_per_step=t.examples_per_step,
        steps=t.steps,
        epochs=t.epochs,
        seed=t.seed,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        eval_generation=t.eval_generation.enabled,
        eval_samples=t.eval_generation.samples,
        eval_max_new_tokens=t.eval_generation.max_new_tokens,
    )
