"""The job state machine's edges, each a function run in the caller's write transaction that moves the
job's row and records the matching event (see the package docstring for the edges). `now` is the store's
clock; every function returns what `JobStore`'s method of the same name returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sqlalchemy import Connection, select, update

from orchestrator.store import events, quotas
from orchestrator.store.jobs import FINAL_STATES, InvalidTransition, Job, UnknownJob, to_job
from orchestrator.store.schema import INT_MAX, jobs_table

_J = jobs_table.c


def claim(c: Connection, dialect: str, now: float, owner: str, base_key: str | None, limit: int) -> list[Job]:
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: must be an int >= 1, got {limit!r}")
    q = select(_J.id, _J.tenant).where(_J.state == "queued")
    if base_key is not None:
        q = q.where(_J.base_key == base_key)
    limits = quotas.running_room(c, dialect)
    ordered = q.order_by(_J.priority.desc(), _J.seq).with_for_update(skip_locked=True)
    if limits is None:
        ids = list(c.scalars(ordered.limit(limit)))
    else:  # skip tenants at their limit; take no more of a tenant's jobs than it has room for
        room, default = limits
        ids = []
        for job_id, tenant in c.execute(ordered.where(quotas.room_filter(room, default)).limit(limit * 8 + 32)).all():
            left = room.get(tenant or "", default)
            if left is not None:
                if left <= 0:
                    continue
                room[tenant or ""] = left - 1
            ids.append(job_id)
            if len(ids) == limit:
                break
    if not ids:
        return []
    moved = c.execute(
        update(jobs_table)
        .where(_J.id.in_(ids), _J.state == "queued")
        .values(
            state="running",
            owner=owner,
            attempts=_J.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            updated_at=now,
        )
    ).rowcount
    # The rows are locked (PostgreSQL) or the whole database is (sqlite): nothing can move them.
    assert moved == len(ids), f"claimed {moved} of {len(ids)} locked rows"
    rows = c.execute(select(jobs_table).where(_J.id.in_(ids)).order_by(_J.priority.desc(), _J.seq)).all()
    events.add_many(
        c,
        [events.row(r.id, now, "info", f"claimed by {owner} (attempt {r.attempts} of {r.max_attempts})") for r in rows],
    )
    return [to_job(r) for r in rows]


def update_progress(
    c: Connection,
    now: float,
    job_id: str,
    *,
    step: int,
    total_steps: int,
    loss: float | None,
    tokens_per_s: float | None,
    examples_per_s: float | None,
    eval: dict[str, float] | None,
) -> bool:
    step, total_steps = min(step, INT_MAX), min(total_steps, INT_MAX)  # INTEGER columns
    row = locked(c, job_id, "update progress of", ("running",))
    values = dict(step=step, total_steps=total_steps, loss=loss, tokens_per_s=tokens_per_s)
    message, data = events.metrics(step, total_steps, loss, tokens_per_s, examples_per_s, eval)
    if data.get("eval"):
        values["last_eval"] = json.dumps({"step": step} | data["eval"], allow_nan=False)
    c.execute(update(jobs_table).where(_J.id == job_id).values(examples_per_s=examples_per_s, updated_at=now, **values))
    events.add(c, job_id, now, "info", message, type="metrics", data=data)
    return bool(row.cancel_requested)


def finish(c: Connection, now: float, job_id: str, state: str, error: str | None, result_dir: str | None) -> Job:
    if state not in FINAL_STATES:
        raise ValueError(f"state: {state!r} is not a final state; use one of {', '.join(FINAL_STATES)}")
    locked(c, job_id, f"finish as {state}", ("running",))
    c.execute(
        update(jobs_table)
        .where(_J.id == job_id)
        .values(state=state, error=error, result_dir=result_dir, finished_at=now, updated_at=now)
    )
    message = state + (f": {error}" if error else "") + (f"; result in {result_dir}" if result_dir else "")
    events.add(c, job_id, now, "error" if state == "failed" else "info", message)
    return to_job(current(c, job_id))


def request_cancel(c: Connection, now: float, job_id: str) -> Job:
    row = locked(c, job_id, "cancel", ("queued", "running", "cancelled"))
    if row.state == "queued":
        values, message = dict(state="cancelled", cancel_requested=True, finished_at=now), "cancelled"
    elif row.state == "running" and not row.cancel_requested:
        values, message = dict(cancel_requested=True), "cancel requested; stops at the next step"
    else:
        return to_job(row)
    c.execute(update(jobs_table).where(_J.id == job_id).values(updated_at=now, **values))
    events.add(c, job_id, now, "info", message)
    return to_job(current(c, job_id))


def release(c: Connection, now: float, job_id: str, error: str) -> Job:
    give_back(c, now, locked(c, job_id, "release", ("running",)), error)
    return to_job(current(c, job_id))


def hand_back(c: Connection, now: float, job_id: str, reason: str) -> Job:
    row = locked(c, job_id, "hand back", ("running",))
    if row.cancel_requested:
        give_back(c, now, row, reason)
    else:
        c.execute(
            update(jobs_table)
            .where(_J.id == job_id)
            .values(state="queued", attempts=max(0, row.attempts - 1), owner=None, heartbeat_at=None, updated_at=now)
        )
        events.add(c, job_id, now, "info", f"queued again, no attempt charged: {reason}")
    return to_job(current(c, job_id))


def requeue_stale(c: Connection, now: float, older_than_s: float) -> list[str]:
    q = (
        select(jobs_table)
        .where(_J.state == "running", _J.heartbeat_at < now - older_than_s)
        .order_by(_J.seq)
        .with_for_update(skip_locked=True)
    )
    rows = c.execute(q).all()
    for row in rows:
        since = now - row.heartbeat_at
        give_back(c, now, row, f"orchestrator {row.owner} stopped sending heartbeats ({since:.0f} s since the last)")
    return [r.id for r in rows]


def requeue_owner(c: Connection, now: float, owner: str) -> list[str]:
    q = select(jobs_table).where(_J.state == "running", _J.owner == owner).order_by(_J.seq).with_for_update()
    rows = c.execute(q).all()
    for row in rows:
        give_back(c, now, row, f"requeued: orchestrator {owner} gave up its jobs")
    return [r.id for r in rows]


def give_back(c: Connection, now: float, row, error: str) -> None:
    """End a running attempt that did not finish: cancelled if asked, failed if out of attempts, else
    queued again."""
    if row.cancel_requested:
        state, message = "cancelled", f"cancelled (attempt ended: {error})"
    elif row.attempts >= row.max_attempts:
        state, message = "failed", f"failed after {row.attempts} of {row.max_attempts} attempts: {error}"
    else:
        state, message = "queued", f"queued again after attempt {row.attempts} of {row.max_attempts}: {error}"
    values = dict(state=state, error=error, updated_at=now)
    if state == "queued":
        values.update(owner=None, heartbeat_at=None)
    else:
        values.update(finished_at=now)
    c.execute(update(jobs_table).where(_J.id == row.id).values(**values))
    events.add(c, row.id, now, "info" if state == "cancelled" else "error", message)


def mark_registered(c: Connection, now: float, job_id: str, model: str, version: str | int) -> Job:
    locked(c, job_id, "mark registered", ("succeeded",))
    c.execute(
        update(jobs_table)
        .where(_J.id == job_id)
        .values(
            registered=True,
            registry_model=model,
            registry_version=str(version),
            registration_attempts=_J.registration_attempts + 1,
            registration_error=None,
            next_registration_at=None,
            updated_at=now,
        )
    )
    events.add(c, job_id, now, "info", f"registered as {model} v{version}")
    return to_job(current(c, job_id))


def mark_registration_failed(c: Connection, now: float, job_id: str, error: str, retry_at: float) -> Job:
    locked(c, job_id, "mark registration failed for", ("succeeded",))
    c.execute(
        update(jobs_table)
        .where(_J.id == job_id)
        .values(
            registration_attempts=_J.registration_attempts + 1,
            registration_error=error,
            next_registration_at=retry_at,
            updated_at=now,
        )
    )
    message = f"registration failed (retry in {retry_at - now:.0f} s): {error}"
    events.add(c, job_id, now, "warning", message)
    return to_job(current(c, job_id))


def current(c: Connection, job_id: str, *, lock: bool = False):
    """The job's row (`lock`: locked until the transaction ends); UnknownJob if there is none."""
    q = select(jobs_table).where(_J.id == job_id)
    row = c.execute(q.with_for_update() if lock else q).one_or_none()
    if row is None:
        raise UnknownJob(job_id)
    return row


def locked(c: Connection, job_id: str, action: str, allowed_from: Iterable[str]):
    """The job's row, locked until the transaction ends, if its state is one of `allowed_from`."""
    row = c.execute(select(jobs_table).where(_J.id == job_id).with_for_update()).one_or_none()
    if row is None:
        raise UnknownJob(job_id)
    if row.state not in allowed_from:
        raise InvalidTransition(job_id, row.state, action, tuple(allowed_from))
    return row
