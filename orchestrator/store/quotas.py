"""Tenants' quotas as the store enforces them, each function in the caller's transaction: max_queued and
max_priority at submit (`check_submit`), max_running at claim (`running_room`, `room_filter`), and the
reason a queued job is held back by max_running (`held_reasons`).

In the room mappings '' stands for jobs without a tenant; tenant '*' in the quotas table is the default of
tenants without a row of their own.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select, text

from orchestrator.store.jobs import QUOTA_FIELDS, Quota, QuotaExceeded
from orchestrator.store.schema import PG_CLAIM_LOCK, PG_QUOTA_LOCK, jobs_table, quotas_table

_J = jobs_table.c
_Q = quotas_table.c


def running_counts(c: Connection, dialect: str, *, lock: bool) -> tuple[dict[str, int | None], dict[str, int]] | None:
    """While some tenant has a max_running quota: ({tenant or '*': its max_running}, {tenant: jobs it runs});
    None when no such quota is set. `lock` serialises concurrent claimers on PostgreSQL."""
    caps = dict(c.execute(select(_Q.tenant, _Q.max_running)).all())
    if all(v is None for v in caps.values()):
        return None
    if lock and dialect == "postgresql":  # concurrent claimers must not both take a tenant's last slot
        c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_CLAIM_LOCK})
    q = select(_J.tenant, func.count()).where(_J.state == "running").group_by(_J.tenant)
    return caps, {t or "": n for t, n in c.execute(q).all()}


def running_room(c: Connection, dialect: str, *, lock: bool = True) -> tuple[dict[str, int | None], int | None] | None:
    """While some tenant has a max_running quota: ({tenant: jobs it may still start, None: no limit}, the
    default tenants' limit). None when no such quota is set."""
    counts = running_counts(c, dialect, lock=lock)
    if counts is None:
        return None
    caps, running = counts
    default = caps.pop("*", None)
    room = {}
    for tenant in set(caps) | set(running):
        cap = caps.get(tenant, default)
        room[tenant] = None if cap is None else cap - running.get(tenant, 0)
    return room, default


def room_filter(room: dict[str, int | None], default: int | None):
    """The claim query's WHERE for `running_room`'s answer: leave out the tenants with no room left."""

    def has_room(n: int | None) -> bool:
        return n is None or n > 0

    if default is not None and default <= 0:  # only tenants with a room of their own may start jobs
        cond = _J.tenant.in_([t for t, n in room.items() if t and has_room(n)])
    else:
        cond = _J.tenant.not_in([t for t, n in room.items() if t and not has_room(n)])
    return (cond | _J.tenant.is_(None)) if has_room(room.get("", default)) else cond


def held_reasons(c: Connection, dialect: str) -> dict[str, str]:
    """{tenant ('' for none): why its queued jobs wait} for each tenant at its max_running quota, e.g.
    "waiting for a running slot: tenant 'alice' runs 2 of 2 allowed jobs (max_running)"."""
    counts = running_counts(c, dialect, lock=False)
    if counts is None:
        return {}
    caps, running = counts
    default = caps.pop("*", None)
    queued = {t or "" for t in c.scalars(select(_J.tenant).where(_J.state == "queued").distinct())}
    reasons = {}
    for tenant in queued:
        cap = caps.get(tenant, default)
        if cap is not None and running.get(tenant, 0) >= cap:
            who = f"tenant {tenant!r} runs" if tenant else "jobs without a tenant run"
            n = running.get(tenant, 0)
            reasons[tenant] = f"waiting for a running slot: {who} {n} of {cap} allowed jobs (max_running)"
    return reasons


def quota_of(c: Connection, tenant: str | None) -> Quota:
    """The tenant's quota: its own row, else the default ('*'), else no limits."""
    rows = {r.tenant: r for r in c.execute(select(quotas_table).where(_Q.tenant.in_([tenant or "", "*"])))}
    row = rows.get(tenant or "") or rows.get("*")
    return Quota(**{k: getattr(row, k) for k in QUOTA_FIELDS}) if row is not None else Quota()


def check_submit(c: Connection, dialect: str, rows: list[dict]) -> None:
    """QuotaExceeded naming the tenant, the limit and the count, if queueing `rows` (jobs-table rows) would
    exceed a tenant's max_queued or max_priority."""
    for tenant in sorted({r["tenant"] for r in rows}, key=str):
        quota = quota_of(c, tenant)
        mine = [r for r in rows if r["tenant"] == tenant]
        top = max(r["priority"] for r in mine)
        if quota.max_priority is not None and top > quota.max_priority:
            raise QuotaExceeded(
                f"priority {top} is over tenant {tenant!r}'s highest priority, "
                f"{quota.max_priority} (its max_priority quota)"
            )
        if quota.max_queued is None:
            continue
        if dialect == "postgresql":  # two submits of one tenant must not both pass the count
            c.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:t))"), {"k": PG_QUOTA_LOCK, "t": tenant or ""})
        queued = c.scalar(select(func.count()).select_from(jobs_table).where(_J.tenant == tenant, _J.state == "queued"))
        if queued + len(mine) > quota.max_queued:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {queued} job(s) queued and its quota is "
                f"{quota.max_queued} (max_queued); {len(mine)} more would exceed it: wait "
                "for some to start, or cancel some"
            )


def set_all(c: Connection, quotas: dict[str, Quota]) -> None:
    """Replace every tenant's quota row."""
    rows = [{"tenant": t, **{k: getattr(q, k) for k in QUOTA_FIELDS}} for t, q in quotas.items()]
    c.execute(quotas_table.delete())
    if rows:
        c.execute(quotas_table.insert(), rows)


def read_all(c: Connection) -> dict[str, Quota]:
    return {r.tenant: Quota(**{k: getattr(r, k) for k in QUOTA_FIELDS}) for r in c.execute(select(quotas_table))}
