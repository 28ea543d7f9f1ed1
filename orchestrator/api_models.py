"""The request and response bodies of prefixd's HTTP API (orchestrator/api.py), as pydantic models.

`JobOut` is generated from orchestrator.store.Job, field for field, so the API's job object and the store's
row cannot drift apart; `job_out(job)` converts one.

    JobOut.model_fields.keys() == {f.name for f in dataclasses.fields(Job)}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, create_model

from orchestrator.store import Job


def _job_model() -> type[BaseModel]:
    """The job object of the API, made from orchestrator.store.Job so that the two cannot drift apart."""
    hints = typing.get_type_hints(Job)
    fields = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default) for f in dataclasses.fields(Job)
    }
    fields["registry_version"] = (str | None, None)  # an int in older stores
    doc = "One job-store row (orchestrator.store.Job), every field: what `prefixd status --json` prints."
    return create_model("JobOut", __doc__=doc, **fields)


JobOut = _job_model()


class SubmitOut(BaseModel):
    """What was queued: one job, or a sweep's variants (`job_id` is then the first of `job_ids`)."""

    job_id: str
    task: str
    job_ids: list[str]
    sweep_id: str | None = None
    variants: list[str | None]
    """Each job's variant label (a sweep's), None for a job on its own."""


class SpecOut(BaseModel):
    """A spec the server accepts, not queued."""

    task: str
    base_key: str
    priority: int
    variants: int = 1
    """Jobs it would queue: a sweep's variants, else 1."""


class Problem(BaseModel):
    path: str
    message: str


class SpecProblems(BaseModel):
    detail: str
    problems: list[Problem]


class LogLine(BaseModel):
    time: float
    level: str
    message: str


class EventOut(BaseModel):
    """One job event (orchestrator.store.JobEvent), as fine-tuning APIs list them."""

    id: int
    created_at: float
    level: str
    message: str
    type: str
    """'message' (a transition or a worker's log line) or 'metrics' (a progress update, numbers in `data`)."""
    data: dict | None = None


class EventsOut(BaseModel):
    data: list[EventOut]
    has_more: bool


class Error(BaseModel):
    detail: str


def job_out(job: Any) -> JobOut:
    """A store Job as the API's JobOut (registry_version as text: older stores kept an int)."""
    data = asdict(job)
    version = data.get("registry_version")
    return JobOut(**data | {"registry_version": None if version is None else str(version)})
