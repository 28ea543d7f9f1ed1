"""The durable job store: every job, its state, progress, registry bookkeeping and events.

One SQLAlchemy URL names it: a sqlite file by default (`sqlite:///.prefixd/jobs.db`), or a server such as
`postgresql+psycopg://user@host/db` when orchestrators run on several machines. Several processes may open
the same URL at once; each should make its own `JobStore` (an engine must not cross a fork).

A job moves only along these edges, each one an atomic transaction (`transitions.py`):

    submit ──> queued ──claim──> running ──finish──> succeeded | failed | cancelled
                 │  ^              │
                 │  └─release / requeue_stale / requeue_owner (attempts left, no cancel asked)
                 └──request_cancel──> cancelled

A running job that is asked to cancel keeps running with `cancel_requested` set until its worker stops at
the next step boundary and calls `finish(job_id, "cancelled")`. A released or requeued job that is out of
attempts becomes failed; one whose cancel was asked becomes cancelled.

Concurrency: on PostgreSQL `claim` and `requeue_stale` lock rows with `SELECT ... FOR UPDATE SKIP LOCKED`,
so competing orchestrators take disjoint jobs without waiting on each other. On sqlite every write runs in
a `BEGIN IMMEDIATE` transaction (the database's single writer lock, taken before reading) in WAL mode with
a busy timeout, so writers from several processes queue up instead of failing or reading stale rows.

Tenants: each job records the tenant that submitted it (`submit(..., tenant=)`, `list(tenant=)`); the
operator's quotas (`set_quotas`, `quotas.py`) cap a tenant's queued jobs and priority at submit
(`enforce_quota=True`: QuotaExceeded) and its running jobs at `claim` (a held job's `waiting` says so).
Leases (`acquire_lease`) give one holder at a time a named role across processes and machines; the
orchestrators' registrar is one.

Events (`events.py`): every transition, every line added with `log`, and every progress update (a metrics
event) is an event of its job, read with `events(job_id, after=, limit=)`.

Tables and migrations of older stores: `schema.py`. Times are seconds since the Unix epoch (UTC), as floats,
from the store's clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from orchestrator.store import events as _events
from orchestrator.store import quotas as _quotas
from orchestrator.store import transitions as _tx
from orchestrator.store.events import EVENT_TYPES, LOG_LEVELS, MAX_EVENTS, JobEvent
from orchestrator.store.jobs import (
    FINAL_STATES,
    JOB_SELECT,
    STATES,
    InvalidTransition,
    Job,
    NewJob,
    Quota,
    QuotaExceeded,
    UnknownJob,
    new_row,
    to_job,
)
from orchestrator.store.schema import (
    create_schema,
    events_table,
    jobs_table,
    leases_table,
    metadata,
    open_engine,
    quotas_table,
    waits_table,
)

__all__ = [
    "EVENT_TYPES",
    "FINAL_STATES",
    "LOG_LEVELS",
    "MAX_EVENTS",
    "STATES",
    "InvalidTransition",
    "Job",
    "JobEvent",
    "JobStore",
    "NewJob",
    "Quota",
    "QuotaExceeded",
    "UnknownJob",
    "events_table",
    "jobs_table",
    "leases_table",
    "metadata",
    "quotas_table",
    "waits_table",
]

_J = jobs_table.c
_W = waits_table.c
_L = leases_table.c


class JobStore:
    """Durable job state behind one SQLAlchemy URL; safe to open from many processes at once."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time):
        """`clock` returns Unix seconds; tests pass their own to make time-based rules deterministic."""
        self.url = url
        self._clock = clock
        self._engine, self._dialect = open_engine(url)
        self.create_schema()

    def __repr__(self) -> str:
        return f"JobStore({make_url(self.url).render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        """Close pooled connections. The store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create_schema(self) -> None:
        """Create the tables if missing, and bring a store made by an older prefixd up to date.
        Idempotent, and safe when several processes do it at once."""
        with self._tx(write=True) as c:
            create_schema(c, self._dialect)

    # ---- submitting and reading -------------------------------------------------------------------

    def submit(
        self,
        spec: dict,
        *,
        task: str,
        base_key: str,
        priority: int = 0,
        max_attempts: int = 3,
        tenant: str | None = None,
        enforce_quota: bool = False,
    ) -> str:
        """Queue one job; returns its id."""
        item = NewJob(
            spec=spec, task=task, base_key=base_key, priority=priority, max_attempts=max_attempts, tenant=tenant
        )
        return self.submit_many([item], enforce_quota=enforce_quota)[0]

    def submit_many(self, items: Iterable[NewJob | Mapping[str, Any]], *, enforce_quota: bool = False) -> list[str]:
        """Queue several jobs in one transaction: all are stored, or (on any error) none.

        Each item is a `NewJob` or a mapping with its fields. Every invalid item is reported at once,
        by its index: `items[2].priority: expected an int, got '5'`. With `enforce_quota`, each item's
        tenant's quota (`set_quotas`) is checked in the same transaction: QuotaExceeded when the jobs would
        exceed its max_queued or ask for more than its max_priority.
        """
        now = self._clock()
        rows, problems = [], []
        for i, item in enumerate(items):
            row, item_problems = new_row(item, now)
            problems += [f"items[{i}].{p}" for p in item_problems]
            rows.append(row)
        if problems:
            raise ValueError("cannot submit: " + "; ".join(problems))
        if not rows:
            return []
        with self._tx(write=True) as c:
            if enforce_quota:
                _quotas.check_submit(c, self._dialect, rows)
            c.execute(jobs_table.insert(), rows)
            message = "submitted: task {task}, base {base_key}, priority {priority}"
            _events.add_many(c, [_events.row(r["id"], now, "info", message.format(**r)) for r in rows])
        return [r["id"] for r in rows]

    def get(self, job_id: str) -> Job:
        """The job's current row; raises UnknownJob."""
        with self._tx(write=False) as c:
            row = c.execute(JOB_SELECT.where(_J.id == job_id)).one_or_none()
            if row is None:
                raise UnknownJob(job_id)
            held = _quotas.held_reasons(c, self._dialect) if row.state == "queued" else {}
        return to_job(row, held.get(row.tenant or ""))

    def list(
        self,
        state: str | None = None,
        task: str | None = None,
        limit: int | None = None,
        *,
        tenant: str | None = None,
        sweep: str | None = None,
    ) -> list[Job]:
        """Jobs in submission order, optionally only one state, task, tenant and/or sweep id; `limit` keeps
        the newest that many."""
        if state is not None and state not in STATES:
            raise ValueError(f"state: {state!r} is not one of {', '.join(STATES)}")
        q = JOB_SELECT
        if tenant is not None:
            q = q.where(_J.tenant == tenant)
        if state is not None:
            q = q.where(_J.state == state)
        if task is not None:
            q = q.where(_J.task == task)
        if sweep is not None:
            q = q.where(_J.sweep_id == sweep)
        q = q.order_by(_J.seq.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as c:
            rows = c.execute(q).all()
            held = _quotas.held_reasons(c, self._dialect) if any(r.state == "queued" for r in rows) else {}
        return [to_job(r, held.get(r.tenant or "") if r.state == "queued" else None) for r in reversed(rows)]

    def queued_base_keys(self) -> list[tuple[str, int]]:
        """(base_key, number of queued jobs) for each base with queued jobs.

        Ordered the way `claim` would reach them: the base holding the highest-priority (then oldest) queued
        job first, so a scheduler that loads one base at a time can take the first entry. Jobs of a tenant at
        its max_running quota are left out: no group could claim them yet.
        """
        q = (
            select(_J.base_key, func.count())
            .where(_J.state == "queued")
            .group_by(_J.base_key)
            .order_by(func.max(_J.priority).desc(), func.min(_J.seq))
        )
        with self._tx(write=False) as c:
            limits = _quotas.running_room(c, self._dialect, lock=False)
            if limits is not None:
                q = q.where(_quotas.room_filter(*limits))
            return [(k, n) for k, n in c.execute(q).all()]

    # ---- running jobs -----------------------------------------------------------------------------

    def claim(self, owner: str, *, base_key: str | None = None, limit: int = 1) -> list[Job]:
        """Move up to `limit` queued jobs (of `base_key`, when given) to running, held by `owner`.

        Highest priority first, then first submitted. Each claim is one attempt (attempts += 1) and sets
        started_at and heartbeat_at. Concurrent claimers, in any process, never get the same job. A tenant
        at its max_running quota (`set_quotas`) has its jobs left queued until one of its jobs ends.
        """
        with self._tx(write=True) as c:
            return _tx.claim(c, self._dialect, self._clock(), owner, base_key, limit)

    def heartbeat(self, owner: str, job_ids: Iterable[str]) -> list[str]:
        """Record that `owner` is alive and still running `job_ids`.

        Returns the ids it still holds; any other id was taken from it (requeued as stale, or it never
        held it), and its worker should stop that job.
        """
        job_ids = list(job_ids)
        if not job_ids:
            return []
        held = (_J.id.in_(job_ids), _J.owner == owner, _J.state == "running")
        with self._tx(write=True) as c:
            c.execute(update(jobs_table).where(*held).values(heartbeat_at=self._clock()))
            still = set(c.scalars(select(_J.id).where(*held)))
        return [j for j in job_ids if j in still]

    def update_progress(
        self,
        job_id: str,
        *,
        step: int,
        total_steps: int,
        loss: float | None = None,
        tokens_per_s: float | None = None,
        examples_per_s: float | None = None,
        eval: Mapping[str, float] | None = None,
    ) -> bool:
        """Record a running job's progress at a step boundary, and a metrics event with these numbers (and
        `eval`, the step's evaluation results, when it evaluated).

        Returns True when a cancel was requested: the worker should stop now and call
        `finish(job_id, "cancelled")`. Raises InvalidTransition if the job is no longer running.
        """
        progress = dict(step=step, total_steps=total_steps, loss=loss, tokens_per_s=tokens_per_s)
        with self._tx(write=True) as c:
            return _tx.update_progress(
                c, self._clock(), job_id, examples_per_s=examples_per_s, eval=dict(eval or {}), **progress
            )

    def finish(self, job_id: str, state: str, *, error: str | None = None, result_dir: str | None = None) -> Job:
        """End a running job's attempt for good: succeeded, failed (with `error`), or cancelled.

        A failed attempt that may be retried goes through `release` instead.
        """
        with self._tx(write=True) as c:
            return _tx.finish(c, self._clock(), job_id, state, error, result_dir)

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one becomes cancelled at once; a running one gets cancel_requested and its
        worker stops it at the next step boundary. Asking again, or for a cancelled job, changes nothing.
        """
        with self._tx(write=True) as c:
            return _tx.request_cancel(c, self._clock(), job_id)

    def release(self, job_id: str, error: str) -> Job:
        """End a running job's failed attempt: back to queued if it has attempts left, else failed with
        `error` (cancelled instead, if a cancel was requested). The error is kept on the job either way.
        """
        with self._tx(write=True) as c:
            return _tx.release(c, self._clock(), job_id, error)

    def hand_back(self, job_id: str, reason: str) -> Job:
        """Queue a running job again without charging its attempt (a graceful stop: its worker checkpointed
        it at a step boundary); cancelled instead if a cancel was requested."""
        with self._tx(write=True) as c:
            return _tx.hand_back(c, self._clock(), job_id, reason)

    def requeue_stale(self, older_than_s: float) -> list[str]:
        """Give back every running job whose heartbeat is more than `older_than_s` old: its orchestrator
        died (e.g. a killed `prefixd run`). Each goes back to queued, or to failed when out of attempts
        (cancelled if a cancel was requested). Returns the ids of all jobs taken back.
        """
        with self._tx(write=True) as c:
            return _tx.requeue_stale(c, self._clock(), older_than_s)

    def requeue_owner(self, owner: str) -> list[str]:
        """Give back every job `owner` is running (an orchestrator shutting down, or restarting under the
        same name), by the same rules as `requeue_stale`. Returns their ids.
        """
        with self._tx(write=True) as c:
            return _tx.requeue_owner(c, self._clock(), owner)

    # ---- registry bookkeeping ---------------------------------------------------------------------

    def mark_registered(self, job_id: str, model: str, version: str | int) -> Job:
        """Record that a succeeded job's prefix is registered as `model` version `version`."""
        with self._tx(write=True) as c:
            return _tx.mark_registered(c, self._clock(), job_id, model, version)

    def mark_registration_failed(self, job_id: str, error: str, retry_at: float) -> Job:
        """Record a failed registration attempt of a succeeded job; it is due again at `retry_at`."""
        with self._tx(write=True) as c:
            return _tx.mark_registration_failed(c, self._clock(), job_id, error, retry_at)

    def pending_registrations(self, now: float | None = None) -> list[Job]:
        """Succeeded, not yet registered jobs whose next registration attempt is due at `now`
        (default: the store's clock), oldest first."""
        now = self._clock() if now is None else now
        q = (
            select(jobs_table)
            .where(_J.state == "succeeded", _J.registered.is_(False))
            .where((_J.next_registration_at.is_(None)) | (_J.next_registration_at <= now))
            .order_by(_J.seq)
        )
        with self._tx(write=False) as c:
            return [to_job(r) for r in c.execute(q).all()]

    # ---- tenants' quotas and leases -------------------------------------------------------------------

    def set_quotas(self, quotas: Mapping[str, Quota]) -> None:
        """Replace every tenant's quota: {tenant: Quota}; tenant '*' is the default of tenants not named.
        An empty mapping removes every limit."""
        with self._tx(write=True) as c:
            _quotas.set_all(c, dict(quotas))

    def quotas(self) -> dict[str, Quota]:
        """{tenant: Quota} as set by `set_quotas`."""
        with self._tx(write=False) as c:
            return _quotas.read_all(c)

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `holder` until now + ttl_s; False while another holder's lease
        runs. Atomic across processes and machines: exactly one caller holds a lease at a time.

            if store.acquire_lease("registrar", orchestrator_id, 300): ...   # call again to renew
        """
        now = self._clock()
        try:
            with self._tx(write=True) as c:
                row = c.execute(select(leases_table).where(_L.name == name).with_for_update()).one_or_none()
                if row is None:
                    c.execute(leases_table.insert(), {"name": name, "holder": holder, "expires_at": now + ttl_s})
                elif row.holder == holder or row.expires_at <= now:
                    c.execute(update(leases_table).where(_L.name == name).values(holder=holder, expires_at=now + ttl_s))
                else:
                    return False
        except IntegrityError:  # another process inserted the lease row first (PostgreSQL)
            return False
        return True

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now, if `holder` has it."""
        with self._tx(write=True) as c:
            c.execute(leases_table.delete().where(_L.name == name, _L.holder == holder))

    # ---- what queued work waits for ------------------------------------------------------------------

    def set_run_id(self, job_id: str, run_id: str) -> None:
        """Record the job's MLflow run (the worker opens it when the job starts training)."""
        with self._tx(write=True) as c:
            if c.execute(jobs_table.update().where(_J.id == job_id).values(run_id=run_id)).rowcount == 0:
                raise UnknownJob(job_id)

    def set_waiting(self, base_key: str, reason: str | None) -> None:
        """Record what the queued jobs of `base_key` wait for (shown by `get`/`list` as Job.waiting);
        None clears it. Kept until cleared, across scheduler passes."""
        with self._tx(write=True) as c:
            current = c.execute(select(_W.reason).where(_W.base_key == base_key)).scalar()
            if reason is None:
                if current is not None:
                    c.execute(waits_table.delete().where(_W.base_key == base_key))
            elif current is None:
                c.execute(waits_table.insert(), {"base_key": base_key, "reason": reason, "since": self._clock()})
            elif current != reason:
                c.execute(waits_table.update().where(_W.base_key == base_key).values(reason=reason))

    def waiting(self) -> dict[str, str]:
        """base_key -> what its queued jobs wait for."""
        with self._tx(write=False) as c:
            return {k: r for k, r in c.execute(select(_W.base_key, _W.reason)).all()}

    # ---- events -----------------------------------------------------------------------------------

    def log(self, job_id: str, message: str, level: str = "info") -> None:
        """Append a line to the job's log: a message event (`prefixd logs JOB`)."""
        row = _events.row(job_id, self._clock(), level, message)
        with self._tx(write=True) as c:
            # Locked, so that on PostgreSQL one job's events commit in the order of their ids.
            _tx.current(c, job_id, lock=True)
            _events.add_many(c, [row])

    def logs(self, job_id: str) -> list[tuple[float, str, str]]:
        """The job's log as (time, level, message), oldest first: transitions recorded by the store and
        lines added with `log` (its message events; metrics events are read with `events`)."""
        found, after = [], None
        while True:
            batch, more = self.events(job_id, after=after, limit=MAX_EVENTS, types=("message",))
            found += [(e.created_at, e.level, e.message) for e in batch]
            if not more:
                return found
            after = batch[-1].id

    def events(
        self, job_id: str, *, after: int | None = None, limit: int = 100, types: tuple[str, ...] = ()
    ) -> tuple[list[JobEvent], bool]:
        """(the job's events with an id above `after`, oldest first, at most `limit` (1 to MAX_EVENTS); whether
        more follow). `types`: only these of EVENT_TYPES. Raises UnknownJob.

            page, more = store.events(job_id, after=last_seen_id, limit=100)
        """
        with self._tx(write=False) as c:
            _tx.current(c, job_id)
            return _events.read(c, job_id, after=after, limit=limit, types=types)

    # ---- internals --------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; `write` makes sqlite take its writer lock up front (BEGIN IMMEDIATE), so a
        read-then-write cannot be overtaken by another process between the read and the write."""
        with self._engine.connect() as c:
            c.execution_options(prefixd_write=write)
            with c.begin():
                yield c
