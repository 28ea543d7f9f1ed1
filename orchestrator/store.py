"""The durable job store: every job, its state, progress, registry bookkeeping and log lines.

One SQLAlchemy URL names it: a sqlite file by default (`sqlite:///.prefixd/jobs.db`), or a server such as
`postgresql+psycopg://user@host/db` when orchestrators run on several machines. Several processes may open
the same URL at once; each should make its own `JobStore` (an engine must not cross a fork).

A job moves only along these edges, each one an atomic transaction:

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
operator's quotas (`set_quotas`) cap a tenant's queued jobs and priority at submit (`enforce_quota=True`:
QuotaExceeded) and its running jobs at `claim`. Leases (`acquire_lease`) give one holder at a time a named
role across processes and machines; the orchestrators' registrar is one.

Schema changes: the tenant column was added to prefixd_jobs after stores existed; `create_schema` adds it
to an older store with an explicit, idempotent ALTER TABLE (sqlite and PostgreSQL), old rows keeping NULL
(no tenant: seen only by admins). New tables (quotas, leases) are created by `create_all` as before.

Times are seconds since the Unix epoch (UTC), as floats, from the store's clock.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")
LOG_LEVELS = ("debug", "info", "warning", "error")

_SQLITE_BUSY_TIMEOUT_S = 30
# Any fixed number: serialises concurrent `create_schema` calls on one PostgreSQL database.
_PG_SCHEMA_LOCK = 0x70726566  # "pref"
_PG_QUOTA_LOCK = 0x71756F74  # "quot": with the tenant's hash, serialises one tenant's quota checks
_PG_CLAIM_LOCK = 0x636C6169  # "clai": serialises claims while running-job quotas are in force

metadata = MetaData()

# Table names carry a prefix because the database may be shared (MLflow's tracking store has its own tables).
jobs_table = Table(
    "prefixd_jobs",
    metadata,
    # `seq` gives submission order (first-come) independent of clocks on different machines.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("task", String(256), nullable=False),
    Column("base_key", String(512), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("spec", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("updated_at", Double, nullable=False),
    Column("error", Text),
    Column("step", Integer),
    Column("total_steps", Integer),
    Column("loss", Double),
    Column("tokens_per_s", Double),
    Column("examples_per_s", Double),
    Column("result_dir", Text),
    Column("cancel_requested", Boolean, nullable=False),
    Column("owner", String(256)),
    Column("heartbeat_at", Double),
    Column("registered", Boolean, nullable=False),
    Column("registry_model", String(256)),
    Column("registry_version", String(64)),
    Column("registration_attempts", Integer, nullable=False),
    Column("registration_error", Text),
    Column("next_registration_at", Double),
    # Added after the first release: `create_schema` adds it to older stores (see `_migrate`).
    Column("tenant", String(128)),
    CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="prefixd_jobs_state"),
    Index("prefixd_jobs_claim", "state", "base_key", "priority", "seq"),
    Index("prefixd_jobs_tenant", "tenant", "state"),
)

events_table = Table(
    "prefixd_job_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("prefixd_jobs.id", ondelete="CASCADE"), nullable=False),
    Column("time", Double, nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Index("prefixd_job_events_job", "job_id", "seq"),
)

# What the queued jobs of a base model wait for (the scheduler's word: "waiting for 8 GPUs"), one row per
# base model while it waits. A table of its own, so stores made before it gain it by `create_schema`.
waits_table = Table(
    "prefixd_waits",
    metadata,
    Column("base_key", String(512), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("since", Double, nullable=False),
)

# The operator's per-tenant quotas (`set_quotas`); tenant '*' is the default for tenants without a row.
# NULL: no limit. Read by `submit_many` (max_queued, max_priority) and `claim` (max_running).
quotas_table = Table(
    "prefixd_quotas",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("max_queued", Integer),
    Column("max_running", Integer),
    Column("max_priority", Integer),
)

# Named leases (`acquire_lease`): one holder at a time, until `expires_at` unless renewed. The orchestrators
# sharing a store take the "registrar" lease before registering finished jobs in MLflow.
leases_table = Table(
    "prefixd_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(256), nullable=False),
    Column("expires_at", Double, nullable=False),
)

_J = jobs_table.c
_W = waits_table.c
_Q = quotas_table.c
_L = leases_table.c
_INT_MAX = 2**31 - 1  # INTEGER columns (PostgreSQL's are 32-bit)
_QUOTA_FIELDS = ("max_queued", "max_running", "max_priority")
# Job rows as `get` and `list` read them: a queued job carries what its base model waits for.
_JOB_SELECT = select(jobs_table, _W.reason.label("waiting")).outerjoin(
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
    """Queued jobs: what the scheduler says their base model waits for (resources, a group slot); None
    when nothing is known to hold them up. Read by `get` and `list` only."""
    tenant: str | None = None
    """Who submitted it (the API's tenant; 'local' for `prefixd submit` on the store's machine). None: a
    job from before tenants, seen only by admins."""


_JOB_FIELDS = tuple(f.name for f in fields(Job))


@dataclass(frozen=True, kw_only=True, slots=True)
class NewJob:
    """One job for `submit_many`; the same arguments as `submit`."""

    spec: dict
    task: str
    base_key: str
    priority: int = 0
    max_attempts: int = 3
    tenant: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Quota:
    """One tenant's limits (None: unlimited): jobs queued at once, jobs running at once, highest priority.

    Quota(max_queued=20, max_running=4, max_priority=100)
    """

    max_queued: int | None = None
    max_running: int | None = None
    max_priority: int | None = None


class QuotaExceeded(ValueError):
    """A submission past the tenant's quota; the message names the tenant, the limit and the count."""


class JobStore:
    """Durable job state behind one SQLAlchemy URL; safe to open from many processes at once."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time):
        """`clock` returns Unix seconds; tests pass their own to make time-based rules deterministic."""
        self.url = url
        self._clock = clock
        parsed = make_url(url)
        self._dialect = parsed.get_backend_name()
        if self._dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})
            _configure_sqlite(self._engine)
        else:
            self._engine = create_engine(url, pool_pre_ping=True)
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
        """Create the tables if missing, and bring a store made by an older prefixd up to date (`_migrate`).
        Idempotent, and safe when several processes do it at once."""
        with self._tx(write=True) as c:
            if self._dialect == "postgresql":
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            metadata.create_all(c)
            _migrate(c)

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
        return self.submit_many(
            [
                NewJob(
                    spec=spec, task=task, base_key=base_key, priority=priority, max_attempts=max_attempts, tenant=tenant
                )
            ],
            enforce_quota=enforce_quota,
        )[0]

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
            row, item_problems = self._new_row(item, now)
            problems += [f"items[{i}].{p}" for p in item_problems]
            rows.append(row)
        if problems:
            raise ValueError("cannot submit: " + "; ".join(problems))
        if not rows:
            return []
        with self._tx(write=True) as c:
            if enforce_quota:
                self._check_quotas(c, rows)
            c.execute(jobs_table.insert(), rows)
            c.execute(
                events_table.insert(),
                [
                    _event_row(
                        r["id"],
                        now,
                        "info",
                        f"submitted: task {r['task']}, base {r['base_key']}, priority {r['priority']}",
                    )
                    for r in rows
                ],
            )
        return [r["id"] for r in rows]

    def get(self, job_id: str) -> Job:
        """The job's current row; raises UnknownJob."""
        with self._tx(write=False) as c:
            row = c.execute(_JOB_SELECT.where(_J.id == job_id)).one_or_none()
        if row is None:
            raise UnknownJob(job_id)
        return _to_job(row)

    def list(
        self, state: str | None = None, task: str | None = None, limit: int | None = None, *, tenant: str | None = None
    ) -> list[Job]:
        """Jobs in submission order, optionally only one state, task and/or tenant; `limit` keeps the newest
        that many."""
        if state is not None and state not in STATES:
            raise ValueError(f"state: {state!r} is not one of {', '.join(STATES)}")
        q = _JOB_SELECT
        if tenant is not None:
            q = q.where(_J.tenant == tenant)
        if state is not None:
            q = q.where(_J.state == state)
        if task is not None:
            q = q.where(_J.task == task)
        q = q.order_by(_J.seq.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as c:
            rows = c.execute(q).all()
        return [_to_job(r) for r in reversed(rows)]

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
            limits = self._running_room(c, lock=False)
            if limits is not None:
                q = q.where(_room_filter(*limits))
            return [(k, n) for k, n in c.execute(q).all()]

    # ---- running jobs -----------------------------------------------------------------------------

    def claim(self, owner: str, *, base_key: str | None = None, limit: int = 1) -> list[Job]:
        """Move up to `limit` queued jobs (of `base_key`, when given) to running, held by `owner`.

        Highest priority first, then first submitted. Each claim is one attempt (attempts += 1) and sets
        started_at and heartbeat_at. Concurrent claimers, in any process, never get the same job. A tenant
        at its max_running quota (`set_quotas`) has its jobs left queued until one of its jobs ends.
        """
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: must be an int >= 1, got {limit!r}")
        now = self._clock()
        q = select(_J.id, _J.tenant).where(_J.state == "queued")
        if base_key is not None:
            q = q.where(_J.base_key == base_key)
        with self._tx(write=True) as c:
            limits = self._running_room(c)
            ordered = q.order_by(_J.priority.desc(), _J.seq).with_for_update(skip_locked=True)
            if limits is None:
                ids = list(c.scalars(ordered.limit(limit)))
            else:  # skip tenants at their limit; take no more of a tenant's jobs than it has room for
                room, default = limits
                ids = []
                for job_id, tenant in c.execute(ordered.where(_room_filter(room, default)).limit(limit * 8 + 32)).all():
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
            c.execute(
                events_table.insert(),
                [
                    _event_row(r.id, now, "info", f"claimed by {owner} (attempt {r.attempts} of {r.max_attempts})")
                    for r in rows
                ],
            )
        return [_to_job(r) for r in rows]

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
    ) -> bool:
        """Record a running job's progress at a step boundary.

        Returns True when a cancel was requested: the worker should stop now and call
        `finish(job_id, "cancelled")`. Raises InvalidTransition if the job is no longer running.
        """
        step, total_steps = min(step, _INT_MAX), min(total_steps, _INT_MAX)  # INTEGER columns
        with self._tx(write=True) as c:
            row = self._locked(c, job_id, "update progress of", ("running",))
            c.execute(
                update(jobs_table)
                .where(_J.id == job_id)
                .values(
                    step=step,
                    total_steps=total_steps,
                    loss=loss,
                    tokens_per_s=tokens_per_s,
                    examples_per_s=examples_per_s,
                    updated_at=self._clock(),
                )
            )
        return bool(row.cancel_requested)

    def finish(self, job_id: str, state: str, *, error: str | None = None, result_dir: str | None = None) -> Job:
        """End a running job's attempt for good: succeeded, failed (with `error`), or cancelled.

        A failed attempt that may be retried goes through `release` instead.
        """
        if state not in FINAL_STATES:
            raise ValueError(f"state: {state!r} is not a final state; use one of {', '.join(FINAL_STATES)}")
        now = self._clock()
        with self._tx(write=True) as c:
            self._locked(c, job_id, f"finish as {state}", ("running",))
            c.execute(
                update(jobs_table)
                .where(_J.id == job_id)
                .values(state=state, error=error, result_dir=result_dir, finished_at=now, updated_at=now)
            )
            message = state + (f": {error}" if error else "") + (f"; result in {result_dir}" if result_dir else "")
            c.execute(events_table.insert(), _event_row(job_id, now, "error" if state == "failed" else "info", message))
            return _to_job(self._row(c, job_id))

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one becomes cancelled at once; a running one gets cancel_requested and its
        worker stops it at the next step boundary. Asking again, or for a cancelled job, changes nothing.
        """
        now = self._clock()
        with self._tx(write=True) as c:
            row = self._locked(c, job_id, "cancel", ("queued", "running", "cancelled"))
            if row.state == "queued":
                values, message = dict(state="cancelled", cancel_requested=True, finished_at=now), "cancelled"
            elif row.state == "running" and not row.cancel_requested:
                values, message = dict(cancel_requested=True), "cancel requested; stops at the next step"
            else:
                return _to_job(row)
            c.execute(update(jobs_table).where(_J.id == job_id).values(updated_at=now, **values))
            c.execute(events_table.insert(), _event_row(job_id, now, "info", message))
            return _to_job(self._row(c, job_id))

    def release(self, job_id: str, error: str) -> Job:
        """End a running job's failed attempt: back to queued if it has attempts left, else failed with
        `error` (cancelled instead, if a cancel was requested). The error is kept on the job either way.
        """
        with self._tx(write=True) as c:
            row = self._locked(c, job_id, "release", ("running",))
            self._give_back(c, row, error)
            return _to_job(self._row(c, job_id))

    def hand_back(self, job_id: str, reason: str) -> Job:
        """Queue a running job again without charging its attempt (a graceful stop: its worker checkpointed
        it at a step boundary); cancelled instead if a cancel was requested."""
        now = self._clock()
        with self._tx(write=True) as c:
            row = self._locked(c, job_id, "hand back", ("running",))
            if row.cancel_requested:
                self._give_back(c, row, reason)
            else:
                c.execute(
                    update(jobs_table)
                    .where(_J.id == job_id)
                    .values(
                        state="queued", attempts=max(0, row.attempts - 1), owner=None, heartbeat_at=None, updated_at=now
                    )
                )
                c.execute(
                    events_table.insert(),
                    _event_row(job_id, now, "info", f"queued again, no attempt charged: {reason}"),
                )
            return _to_job(self._row(c, job_id))

    def requeue_stale(self, older_than_s: float) -> list[str]:
        """Give back every running job whose heartbeat is more than `older_than_s` old: its orchestrator
        died (e.g. a killed `prefixd run`). Each goes back to queued, or to failed when out of attempts
        (cancelled if a cancel was requested). Returns the ids of all jobs taken back.
        """
        now = self._clock()
        q = (
            select(jobs_table)
            .where(_J.state == "running", _J.heartbeat_at < now - older_than_s)
            .order_by(_J.seq)
            .with_for_update(skip_locked=True)
        )
        with self._tx(write=True) as c:
            rows = c.execute(q).all()
            for row in rows:
                self._give_back(
                    c,
                    row,
                    f"orchestrator {row.owner} stopped sending heartbeats "
                    f"({now - row.heartbeat_at:.0f} s since the last)",
                )
        return [r.id for r in rows]

    def requeue_owner(self, owner: str) -> list[str]:
        """Give back every job `owner` is running (an orchestrator shutting down, or restarting under the
        same name), by the same rules as `requeue_stale`. Returns their ids.
        """
        q = select(jobs_table).where(_J.state == "running", _J.owner == owner).order_by(_J.seq).with_for_update()
        with self._tx(write=True) as c:
            rows = c.execute(q).all()
            for row in rows:
                self._give_back(c, row, f"requeued: orchestrator {owner} gave up its jobs")
        return [r.id for r in rows]

    # ---- registry bookkeeping ---------------------------------------------------------------------

    def mark_registered(self, job_id: str, model: str, version: str | int) -> Job:
        """Record that a succeeded job's prefix is registered as `model` version `version`."""
        now = self._clock()
        with self._tx(write=True) as c:
            self._locked(c, job_id, "mark registered", ("succeeded",))
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
            c.execute(events_table.insert(), _event_row(job_id, now, "info", f"registered as {model} v{version}"))
            return _to_job(self._row(c, job_id))

    def mark_registration_failed(self, job_id: str, error: str, retry_at: float) -> Job:
        """Record a failed registration attempt of a succeeded job; it is due again at `retry_at`."""
        now = self._clock()
        with self._tx(write=True) as c:
            self._locked(c, job_id, "mark registration failed for", ("succeeded",))
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
            c.execute(
                events_table.insert(),
                _event_row(job_id, now, "warning", f"registration failed (retry in {retry_at - now:.0f} s): {error}"),
            )
            return _to_job(self._row(c, job_id))

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
            return [_to_job(r) for r in c.execute(q).all()]

    # ---- tenants' quotas and leases -------------------------------------------------------------------

    def set_quotas(self, quotas: Mapping[str, Quota]) -> None:
        """Replace every tenant's quota: {tenant: Quota}; tenant '*' is the default of tenants not named.
        An empty mapping removes every limit."""
        rows = [{"tenant": t, **{k: getattr(q, k) for k in _QUOTA_FIELDS}} for t, q in quotas.items()]
        with self._tx(write=True) as c:
            c.execute(quotas_table.delete())
            if rows:
                c.execute(quotas_table.insert(), rows)

    def quotas(self) -> dict[str, Quota]:
        """{tenant: Quota} as set by `set_quotas`."""
        with self._tx(write=False) as c:
            rows = c.execute(select(quotas_table)).all()
        return {r.tenant: Quota(**{k: getattr(r, k) for k in _QUOTA_FIELDS}) for r in rows}

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

    # ---- logs -------------------------------------------------------------------------------------

    def log(self, job_id: str, message: str, level: str = "info") -> None:
        """Append a line to the job's log (`prefixd logs JOB`)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"level: {level!r} is not one of {', '.join(LOG_LEVELS)}")
        with self._tx(write=True) as c:
            if c.scalar(select(_J.id).where(_J.id == job_id)) is None:
                raise UnknownJob(job_id)
            c.execute(events_table.insert(), _event_row(job_id, self._clock(), level, message))

    def logs(self, job_id: str) -> list[tuple[float, str, str]]:
        """The job's log as (time, level, message), oldest first: transitions recorded by the store and
        lines added with `log`."""
        with self._tx(write=False) as c:
            if c.scalar(select(_J.id).where(_J.id == job_id)) is None:
                raise UnknownJob(job_id)
            q = select(events_table.c.time, events_table.c.level, events_table.c.message)
            rows = c.execute(q.where(events_table.c.job_id == job_id).order_by(events_table.c.seq)).all()
        return [tuple(r) for r in rows]

    # ---- internals --------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; `write` makes sqlite take its writer lock up front (BEGIN IMMEDIATE), so a
        read-then-write cannot be overtaken by another process between the read and the write."""
        with self._engine.connect() as c:
            c.execution_options(prefixd_write=write)
            with c.begin():
                yield c

    def _row(self, c: Connection, job_id: str):
        row = c.execute(select(jobs_table).where(_J.id == job_id)).one_or_none()
        if row is None:
            raise UnknownJob(job_id)
        return row

    def _locked(self, c: Connection, job_id: str, action: str, allowed_from: tuple[str, ...]):
        """The job's row, locked until the transaction ends, if its state is one of `allowed_from`."""
        row = c.execute(select(jobs_table).where(_J.id == job_id).with_for_update()).one_or_none()
        if row is None:
            raise UnknownJob(job_id)
        if row.state not in allowed_from:
            raise InvalidTransition(job_id, row.state, action, allowed_from)
        return row

    def _running_room(self, c: Connection, *, lock: bool = True) -> tuple[dict[str, int | None], int | None] | None:
        """While some tenant has a max_running quota: ({tenant: jobs it may still start, None: no limit}, the
        default tenants' limit); '' stands for jobs without a tenant. None when no such quota is set."""
        caps = dict(c.execute(select(_Q.tenant, _Q.max_running)).all())
        if all(v is None for v in caps.values()):
            return None
        if lock and self._dialect == "postgresql":  # concurrent claimers must not both take a tenant's last slot
            c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CLAIM_LOCK})
        running = {
            t or "": n
            for t, n in c.execute(
                select(_J.tenant, func.count()).where(_J.state == "running").group_by(_J.tenant)
            ).all()
        }
        default = caps.pop("*", None)
        room = {}
        for tenant in set(caps) | set(running):
            cap = caps.get(tenant, default)
            room[tenant] = None if cap is None else cap - running.get(tenant, 0)
        return room, default

    def _quota_of(self, c: Connection, tenant: str | None) -> Quota:
        rows = {r.tenant: r for r in c.execute(select(quotas_table).where(_Q.tenant.in_([tenant or "", "*"])))}
        row = rows.get(tenant or "") or rows.get("*")
        return Quota(**{k: getattr(row, k) for k in _QUOTA_FIELDS}) if row is not None else Quota()

    def _check_quotas(self, c: Connection, rows: list[dict]) -> None:
        """QuotaExceeded naming the tenant, the limit and the count, if `rows` would exceed a quota."""
        for tenant in sorted({r["tenant"] for r in rows}, key=str):
            quota = self._quota_of(c, tenant)
            mine = [r for r in rows if r["tenant"] == tenant]
            top = max(r["priority"] for r in mine)
            if quota.max_priority is not None and top > quota.max_priority:
                raise QuotaExceeded(
                    f"priority {top} is over tenant {tenant!r}'s highest priority, "
                    f"{quota.max_priority} (its max_priority quota)"
                )
            if quota.max_queued is None:
                continue
            if self._dialect == "postgresql":  # two submits of one tenant must not both pass the count
                c.execute(
                    text("SELECT pg_advisory_xact_lock(:k, hashtext(:t))"), {"k": _PG_QUOTA_LOCK, "t": tenant or ""}
                )
            queued = c.scalar(
                select(func.count()).select_from(jobs_table).where(_J.tenant == tenant, _J.state == "queued")
            )
            if queued + len(mine) > quota.max_queued:
                raise QuotaExceeded(
                    f"tenant {tenant!r} has {queued} job(s) queued and its quota is "
                    f"{quota.max_queued} (max_queued); {len(mine)} more would exceed it: wait "
                    "for some to start, or cancel some"
                )

    def _give_back(self, c: Connection, row, error: str) -> None:
        """End a running attempt that did not finish: cancelled if asked, failed if out of attempts, else
        queued again."""
        now = self._clock()
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
        c.execute(events_table.insert(), _event_row(row.id, now, "info" if state == "cancelled" else "error", message))

    def _new_row(self, item: NewJob | Mapping[str, Any], now: float) -> tuple[dict, list[str]]:
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
        if not isinstance(item.priority, int) or isinstance(item.priority, bool) or abs(item.priority) > _INT_MAX:
            problems.append(f"priority: expected an int of at most {_INT_MAX} in size, got {item.priority!r}")
        if (
            not isinstance(item.max_attempts, int)
            or isinstance(item.max_attempts, bool)
            or item.max_attempts < 1
            or item.max_attempts > _INT_MAX
        ):
            problems.append(f"max_attempts: expected an int >= 1 and <= {_INT_MAX}, got {item.max_attempts!r}")
        if item.tenant is not None and (not isinstance(item.tenant, str) or not 0 < len(item.tenant) <= 128):
            problems.append(f"tenant: expected a string of 1 to 128 characters or None, got {item.tenant!r}")
        spec_json = None
        if not isinstance(item.spec, dict):
            problems.append(f"spec: expected a dict, got {type(item.spec).__name__}")
        else:
            try:
                spec_json = json.dumps(item.spec, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as e:
                problems.append(f"spec: not storable as JSON ({e})")
        row = dict(
            id=_new_id(now),
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
        )
        return row, problems


def _room_filter(room: dict[str, int | None], default: int | None):
    """The claim query's WHERE for `_running_room`'s answer: leave out the tenants with no room left."""

    def has_room(n: int | None) -> bool:
        return n is None or n > 0

    if default is not None and default <= 0:  # only tenants with a room of their own may start jobs
        cond = _J.tenant.in_([t for t, n in room.items() if t and has_room(n)])
    else:
        cond = _J.tenant.not_in([t for t, n in room.items() if t and not has_room(n)])
    return (cond | _J.tenant.is_(None)) if has_room(room.get("", default)) else cond


def _migrate(c: Connection) -> None:
    """Columns added to prefixd_jobs after stores were created: an explicit, idempotent ALTER TABLE on
    sqlite and PostgreSQL alike (create_all only creates missing tables). Old rows get NULL."""
    have = {col["name"] for col in inspect(c).get_columns("prefixd_jobs")}
    if "tenant" not in have:
        c.execute(text("ALTER TABLE prefixd_jobs ADD COLUMN tenant VARCHAR(128)"))
    c.execute(text("CREATE INDEX IF NOT EXISTS prefixd_jobs_tenant ON prefixd_jobs (tenant, state)"))


def _new_id(now: float) -> str:
    """`j-YYMMDD-HHMMSS-<8 hex>`: sorts by submission second (UTC); 32 random bits keep ids from
    different processes apart (a clash within one second needs ~65k submissions)."""
    return "j-" + time.strftime("%y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)


def _event_row(job_id: str, now: float, level: str, message: str) -> dict:
    return dict(job_id=job_id, time=now, level=level, message=message)


def _to_job(row) -> Job:
    m = row._mapping
    values = {name: m[name] for name in _JOB_FIELDS if name != "waiting"}
    values["waiting"] = m.get("waiting")
    values["spec"] = json.loads(m["spec"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["registered"] = bool(values["registered"])
    return Job(**values)


def _configure_sqlite(engine) -> None:
    """WAL (readers don't block the writer), a busy timeout (writers wait for each other instead of
    failing), and transactions this module begins itself, so writes can use BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # pysqlite would otherwise open its own deferred transactions behind SQLAlchemy's back.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes; WAL keeps it consistent
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("prefixd_write") else "BEGIN")
