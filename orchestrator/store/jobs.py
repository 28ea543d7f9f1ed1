"""What the job store holds about a job: its states, the `Job` row, a submission (`NewJob`) and its checks,
a tenant's `Quota`, and the store's errors.

    NewJob(spec={...}, task="sum", base_key="hf:gpt2", priority=5, tenant="alice")   # -> JobStore.submit_many
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select

from orchestrator.store.schema import INT_MAX, jobs_table, waits_table

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")

_J = jobs_table.c
_W = waits_table.c
# Job rows as `get` and `list` read them: a queued job carries what its base model waits for.
JOB_SELECT = select(jobs_table, _W.reason.label("waiting")).outerjoin(
    waits_table, (_W.base_key == _J.base_key) & (_J.state == "queued")
)


class UnknownJob(KeyError):
    """No job has this id."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError's own __str__ would print only the quoted id
        return f"no job with id {self.job_id!r} (`prefixd list` shows the known ones)"


class InvalidTransition(ValueError):
    """A state change that the job's current state does not allow."""

    def __init__(self, job_id: str, state: str, action: str, allowed_from: Iterable[str]):
        self.job_id, self.state, self.action = job_id, state, action
        allowed = " or ".join(allowed_from)
        super().__init__(f"cannot {action} job {job_id}: it is {state}, and only a {allowed} job can")


class QuotaExceeded(ValueError):
    """A submission past the tenant's quota; the message names the tenant, the limit and the count."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One row of the store, as read at one moment. Times are Unix seconds; None where not yet reached."""

    id: str
    task: str
    base_key: str
    """Groups jobs that can share one resident base model."""
    priority: int
    """Higher runs first; ties run in submission order."""
    state: str
    """One of STATES."""
    spec: dict
    """The validated job spec, as submitted."""
    attempts: int
    """Claims so far (the current one included while running)."""
    max_attempts: int
    created_at: float
    started_at: float | None
    """Start of the latest attempt."""
    finished_at: float | None
    updated_at: float
    error: str | None
    """Why the latest attempt failed (kept when a later attempt is queued)."""
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    examples_per_s: float | None
    result_dir: str | None
    cancel_requested: bool
    owner: str | None
    """The orchestrator that claimed the job (kept after it finishes; cleared when requeued)."""
    heartbeat_at: float | None
    registered: bool
    registry_model: str | None
    registry_version: str | None
    registration_attempts: int
    registration_error: str | None
    next_registration_at: float | None
    """Earliest time to retry a failed registration; None means as soon as possible."""
    waiting: str | None = None
    """Queued jobs: what holds them back: their tenant's max_running quota, or what the scheduler says their
    base model waits for (resources, a group slot); None when nothing is known. Read by `get` and `list`."""
    tenant: str | None = None
    """Who submitted it (the API's tenant; 'local' for `prefixd submit` on the store's machine). None: a
    job from before tenants, seen only by admins."""
    sweep_id: str | None = None
    """The sweep this job is a variant of ('sweep-<hex>', jobs/sweep.py); None for a job on its own."""
    sweep_variant: str | None = None
    """Its variant's values, e.g. 'training.learning_rate=0.01 prefix.num_virtual_tokens=20'."""
    run_id: str | None = None
    """Its MLflow run, opened when it started training; None before (or when MLflow was not reachable)."""
    last_eval: dict | None = None
    """The latest evaluation: {'step': 20, 'eval_loss': 1.93, ...} (non-finite values as None); None before."""
    estimated_finish: float | None = None
    """Running jobs: when the last step ends at the rate of its latest step (`updated_at` + steps left x
    examples_per_step / examples_per_s; evaluations not counted). Derived when read, not stored."""


JOB_FIELDS = tuple(f.name for f in fields(Job))


@dataclass(frozen=True, kw_only=True, slots=True)
class NewJob:
    """One job for `submit_many`; the same arguments as `submit`."""

    spec: dict
    task: str
    base_key: str
    priority: int = 0
    max_attempts: int = 3
    tenant: str | None = None
    sweep_id: str | None = None
    sweep_variant: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Quota:
    """One tenant's limits (None: unlimited): jobs queued at once, jobs running at once, highest priority.

    Quota(max_queued=20, max_running=4, max_priority=100)
    """

    max_queued: int | None = None
    max_running: int | None = None
    max_priority: int | None = None


QUOTA_FIELDS = ("max_queued", "max_running", "max_priority")


def to_job(row, waiting: str | None = None) -> Job:
    """A Job from a jobs-table row (with a `waiting` column when read by JOB_SELECT; `waiting` overrides)."""
    m = row._mapping
    values = {name: m[name] for name in JOB_FIELDS if name not in ("waiting", "estimated_finish")}
    values["waiting"] = waiting or m.get("waiting")
    values["spec"] = json.loads(m["spec"])
    values["last_eval"] = json.loads(m["last_eval"]) if m["last_eval"] else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["registered"] = bool(values["registered"])
    values["estimated_finish"] = _estimated_finish(values)
    return Job(**values)


def _estimated_finish(job: Mapping[str, Any]) -> float | None:
    rate, step, total = job["examples_per_s"], job["step"], job["total_steps"]
    if job["state"] != "running" or not rate or step is None or not total:
        return None
    per_step = job["spec"].get("training", {}).get("examples_per_step")
    return job["updated_at"] + (total - step) * per_step / rate if per_step else None


def new_row(item: NewJob | Mapping[str, Any], now: float) -> tuple[dict, list[str]]:
    """A jobs-table row for one submitted item, and every problem with it."""
    if isinstance(item, Mapping):
        known = {f.name for f in fields(NewJob)}
        unknown = sorted(set(item) - known)
        missing = sorted({"spec", "task", "base_key"} - set(item))
        if unknown or missing:
            return {}, [f"{k}: unknown field (allowed: {', '.join(sorted(known))})" for k in unknown] + [
                f"{k}: missing" for k in missing
            ]
        item = NewJob(**item)
    problems = []
    for name in ("task", "base_key"):
        value = getattr(item, name)
        if not isinstance(value, str) or not value:
            problems.append(f"{name}: expected a non-empty string, got {value!r}")
    if not isinstance(item.priority, int) or isinstance(item.priority, bool) or abs(item.priority) > INT_MAX:
        problems.append(f"priority: expected an int of at most {INT_MAX} in size, got {item.priority!r}")
    if (
        not isinstance(item.max_attempts, int)
        or isinstance(item.max_attempts, bool)
        or item.max_attempts < 1
        or item.max_attempts > INT_MAX
    ):
        problems.append(f"max_attempts: expected an int >= 1 and <= {INT_MAX}, got {item.max_attempts!r}")
    if item.tenant is not None and (not isinstance(item.tenant, str) or not 0 < len(item.tenant) <= 128):
        problems.append(f"tenant: expected a string of 1 to 128 characters or None, got {item.tenant!r}")
    if item.sweep_id is not None and (not isinstance(item.sweep_id, str) or not 0 < len(item.sweep_id) <= 64):
        problems.append(f"sweep_id: expected a string of 1 to 64 characters or None, got {item.sweep_id!r}")
    spec_json = None
    if not isinstance(item.spec, dict):
        problems.append(f"spec: expected a dict, got {type(item.spec).__name__}")
    else:
        try:
            spec_json = json.dumps(item.spec, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            problems.append(f"spec: not storable as JSON ({e})")
    row = dict(
        id=new_id(now),
        task=item.task,
        base_key=item.base_key,
        priority=item.priority,
        state="queued",
        spec=spec_json,
        attempts=0,
        max_attempts=item.max_attempts,
        created_at=now,
        updated_at=now,
        cancel_requested=False,
        registered=False,
        registration_attempts=0,
        tenant=item.tenant,
        sweep_id=item.sweep_id,
        sweep_variant=item.sweep_variant,
    )
    return row, problems


def new_id(now: float) -> str:
    """`j-YYMMDD-HHMMSS-<8 hex>`: sorts by submission second (UTC); 32 random bits keep ids from
    different processes apart (a clash within one second needs ~65k submissions)."""
    return "j-" + time.strftime("%y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)
