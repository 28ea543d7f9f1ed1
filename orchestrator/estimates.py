"""A job spec's estimate before it runs, and a running job's expected finish.

    throughput = measured_throughput(store.list("running"), spec.base_model.base_key)  # or Throughput.default()
    report = estimate_spec(spec, throughput=throughput, micro_batch_size=16)
    report["total_tokens"], report["seconds"], report["peak_memory_bytes"]

Tokens come from the job's data (`workers.estimate`, exact); time is tokens over a throughput: the one
measured for the spec's base model by its groups when there is one, else `DEFAULT_FLOPS` of compute at ~4
FLOPs per base parameter per token, and the report says which. A group's time is shared by its co-tenants,
so a job that trains beside others takes longer by their share; once it runs, `Job.estimated_finish` follows
its own measured step rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_FLOPS = 1e11
"""Compute assumed when nothing is measured: 100 GFLOP/s, about one modern CPU core running fp32 matmuls."""


@dataclass(frozen=True)
class Throughput:
    """Tokens per second the job's group processes, and where the figure comes from."""

    tokens_per_s: float | None
    source: str

    @classmethod
    def measured(cls, tokens_per_s: float, source: str) -> Throughput:
        return cls(tokens_per_s, f"measured: {source}")

    @classmethod
    def default(cls) -> Throughput:
        return cls(None, f"not measured for this base model yet: assumes {DEFAULT_FLOPS / 1e9:g} GFLOP/s")


def measured_throughput(running: Any, base_key: str) -> Throughput:
    """The throughput of the base model's groups now, from its running jobs: a job's tokens_per_s is its
    tokens over the whole step's time, so a group's jobs sum to the group's rate (median over groups)."""
    groups: dict[str, float] = {}
    for job in running:
        if job.base_key == base_key and job.state == "running" and job.tokens_per_s:
            groups[job.owner or "?"] = groups.get(job.owner or "?", 0.0) + job.tokens_per_s
    if not groups:
        return Throughput.default()
    rates = sorted(groups.values())
    n = len(rates)
    return Throughput.measured(rates[n // 2], f"{n} running group(s) of this base model, at their last step")


def estimate_spec(
    spec: Any,
    *,
    throughput: Throughput,
    micro_batch_size: int = 16,
    model_cache: str | None = None,
    data_cache: str | None = None,
) -> dict[str, Any]:
    """The estimate of a validated JobSpec as a JSON-ready dict (ModelLoadError / DataError as training's)."""
    from orchestrator.plan import base_model_ref, task_config
    from workers.estimate import estimate_task
    from workers.models import load_config_and_tokenizer

    ref = base_model_ref(spec)
    config, tokenizer = load_config_and_tokenizer(ref, cache_dir=model_cache)
    est = estimate_task(
        config,
        tokenizer,
        task_config(spec, "estimate", "unused"),
        dtype=spec.base_model.dtype,
        micro_batch_size=micro_batch_size,
        cache_dir=data_cache,
    )
    rate = throughput.tokens_per_s or DEFAULT_FLOPS / (4.0 * est.base_parameters)
    return {
        "name": spec.name,
        "base_key": spec.base_model.base_key,
        "train_rows": est.train_rows,
        "validation_rows": est.validation_rows,
        "steps": est.steps,
        "examples_per_step": est.examples_per_step,
        "tokens_per_step": round(est.tokens_per_step, 1),
        "total_tokens": est.total_tokens,
        "target_tokens": est.target_tokens,
        "base_parameters": est.base_parameters,
        "prefix_parameters": est.prefix_parameters,
        "tokens_per_s": round(rate, 1),
        "throughput_source": throughput.source,
        "seconds": round(est.seconds(rate), 1),
        "peak_memory_bytes": est.peak_memory_bytes,
        "memory_bytes": est.memory_bytes,
    }


def format_estimate(report: dict[str, Any]) -> str:
    """Human-readable lines of an estimate, for `prefixd estimate`."""
    gib = report["peak_memory_bytes"] / 2**30
    parts = {k: f"{v / 2**30:.2f}" for k, v in report["memory_bytes"].items()}
    return "\n".join(
        [
            f"{report['name']} on {report['base_key']}",
            f"  data      {report['train_rows']} train rows, {report['validation_rows']} validation rows",
            f"  tokens    {report['total_tokens']:,} over {report['steps']} steps "
            f"({report['tokens_per_step']:.0f} per step of {report['examples_per_step']} examples; "
            f"{report['target_tokens']:,} of them targets)",
            f"  time      {_duration(report['seconds'])} at {report['tokens_per_s']:.0f} tokens/s "
            f"({report['throughput_source']}; co-tenants share a group's time)",
            f"  memory    {gib:.2f} GiB peak for its group (GiB: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in parts.items())
            + ")",
            f"  prefix    {report['prefix_parameters']:,} trained parameters over a "
            f"{report['base_parameters'] / 1e6:.1f}M-parameter base",
        ]
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
