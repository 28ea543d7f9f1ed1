"""A job's events, in the shape of fine-tuning APIs' job events: the store's transitions and the workers'
log lines (type 'message'), and the group's progress updates (type 'metrics', their numbers in `data`).

An event's id is its row's sequence number: it grows with every event the store records, so a reader that
asks for the events `after` the last id it saw gets exactly the new ones.

    {"id": 42, "created_at": 1750000000.0, "level": "info", "type": "metrics",
     "message": "step 10/100: loss 2.31, 5120 tokens/s",
     "data": {"step": 10, "total_steps": 100, "loss": 2.31, "tokens_per_s": 5120.0, "examples_per_s": 40.0}}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, select

from orchestrator.store.schema import events_table

LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_TYPES = ("message", "metrics")
MAX_EVENTS = 1000
"""The most events one read returns."""

_E = events_table.c


@dataclass(frozen=True, kw_only=True, slots=True)
class JobEvent:
    """One event of a job. `data`: for metrics events, step, total_steps, loss, tokens_per_s,
    examples_per_s and (when the step evaluated) eval, a {metric: value} mapping; else None."""

    id: int
    created_at: float
    """Unix seconds."""
    level: str
    """One of LOG_LEVELS (the store and the workers write info, warning and error)."""
    message: str
    type: str
    """One of EVENT_TYPES."""
    data: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add(
    c: Connection,
    job_id: str,
    now: float,
    level: str,
    message: str,
    *,
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    """Record one event in the caller's transaction."""
    add_many(c, [row(job_id, now, level, message, type=type, data=data)])


def add_many(c: Connection, rows: list[dict]) -> None:
    """Record several events (`row`s) in the caller's transaction."""
    if rows:
        c.execute(events_table.insert(), rows)


def row(job_id: str, now: float, level: str, message: str, *, type: str = "message", data: dict | None = None) -> dict:
    """An events-table row; ValueError naming the field when `level` or `type` is not a known one."""
    if level not in LOG_LEVELS:
        raise ValueError(f"level: {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if type not in EVENT_TYPES:
        raise ValueError(f"type: {type!r} is not one of {', '.join(EVENT_TYPES)}")
    text = None if data is None else json.dumps(data, sort_keys=True, allow_nan=False)
    return dict(job_id=job_id, time=now, level=level, message=message, type=type, data=text)


def read(
    c: Connection, job_id: str, *, after: int | None = None, limit: int = MAX_EVENTS, types: tuple[str, ...] = ()
) -> tuple[list[JobEvent], bool]:
    """(the job's events with an id above `after`, oldest first, at most `limit` of them; whether more
    follow). `types` keeps only those types (all when empty)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_EVENTS:
        raise ValueError(f"limit: expected an int from 1 to {MAX_EVENTS}, got {limit!r}")
    if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
        raise ValueError(f"after: expected an event id (an int), got {after!r}")
    q = select(_E.seq, _E.time, _E.level, _E.message, _E.type, _E.data).where(_E.job_id == job_id)
    if after is not None:
        q = q.where(_E.seq > after)
    if types:
        q = q.where(_E.type.in_(types))
    rows = c.execute(q.order_by(_E.seq).limit(limit + 1)).all()
    out = [
        JobEvent(
            id=r.seq,
            created_at=r.time,
            level=r.level,
            message=r.message,
            type=r.type,
            data=None if r.data is None else json.loads(r.data),
        )
        for r in rows[:limit]
    ]
    return out, len(rows) > limit


def metrics(
    step: int,
    total_steps: int,
    loss: float | None,
    tokens_per_s: float | None,
    examples_per_s: float | None,
    eval: dict[str, float] | None,
) -> tuple[str, dict[str, Any]]:
    """(message, data) of the metrics event for one progress update; a non-finite number is recorded as None.

    >>> metrics(10, 100, 2.3125, 5120.0, None, None)[0]
    'step 10/100: loss 2.312, 5120 tokens/s'
    """
    loss, tokens_per_s, examples_per_s = _finite(loss), _finite(tokens_per_s), _finite(examples_per_s)
    data: dict[str, Any] = dict(
        step=step, total_steps=total_steps, loss=loss, tokens_per_s=tokens_per_s, examples_per_s=examples_per_s
    )
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:.0f} tokens/s")
    if eval:
        data["eval"] = {k: _finite(v) for k, v in eval.items()}
        parts += [f"{k} {v:.4g}" for k, v in sorted(eval.items())]
    return f"step {step}/{total_steps}" + (": " + ", ".join(parts) if parts else ""), data


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
