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
from workers.prefix import PrefixTuningConfig
from workers.trainer import TaskConfig


def base_model_ref(spec: JobSpec) -> BaseModelRef:
    bm = spec.base_model
    if bm.builtin is not None:
        return BaseModelRef(kind="builtin", location=bm.builtin, dtype=bm.dtype)
    if bm.path is not None:
        return BaseModelRef(kind="path", location=str(bm.path), dtype=bm.dtype)
    return BaseModelRef(kind="hub", location=bm.hub.id, revision=bm.hub.revision, dtype=bm.dtype)


def task_config(spec: JobSpec, job_id: str, out_dir: str | Path) -> TaskConfig:
    """The worker's config of one job: its data settings, the PEFT prefix config (the spec's `prefix`
    in PEFT's names), the spec's `training` section as is, and the registry metric and its direction
    (which evaluation's prefix is the result)."""
    d, p = spec.data, spec.prefix
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
        max_validation_rows=d.max_validation_rows,
    )
    return TaskConfig(
        task_id=job_id,
        name=spec.name,
        out_dir=str(out_dir),
        data=data,
        prefix=PrefixTuningConfig(
            num_virtual_tokens=p.num_virtual_tokens,
            prefix_projection=p.projection,
            encoder_hidden_size=p.projection_hidden_size if p.projection else None,
            init_weights="zero" if p.init == "zero" else None,
        ),
        training=spec.training,
        metric=spec.registry.metric,
        direction=spec.registry.direction,
    )
