"""The job store's tables, how an engine is opened on sqlite or PostgreSQL, and the migrations of older stores.

Table names carry a prefix because the database may be shared (MLflow's tracking store has its own tables).
Columns added after stores existed (prefixd_jobs.tenant, .sweep_id, .sweep_variant, .run_id, .last_eval;
prefixd_job_events.type and .data) are added to an
older store by `create_schema` with explicit, idempotent ALTER TABLE statements (sqlite and PostgreSQL), old
rows keeping NULL or the column's default; new tables are created by `create_all`.

    engine, dialect = open_engine("sqlite:///.prefixd/jobs.db")
    with engine.begin() as c:
        create_schema(c, dialect)
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url

_SQLITE_BUSY_TIMEOUT_S = 30
# Any fixed numbers: PostgreSQL advisory locks that serialise one kind of write across processes.
PG_SCHEMA_LOCK = 0x70726566  # "pref": concurrent `create_schema` calls on one database
PG_QUOTA_LOCK = 0x71756F74  # "quot": with the tenant's hash, one tenant's quota checks
PG_CLAIM_LOCK = 0x636C6169  # "clai": claims while running-job quotas are in force
INT_MAX = 2**31 - 1  # INTEGER columns (PostgreSQL's are 32-bit)

metadata = MetaData()

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
    # Added after the first release: `create_schema` adds them to older stores (see `_migrate`).
    Column("tenant", String(128)),
    Column("sweep_id", String(64)),  # the sweep the job is a variant of (jobs/sweep.py), and which one
    Column("sweep_variant", Text),
    Column("run_id", String(64)),  # the job's MLflow run, opened when it starts training
    Column("last_eval", Text),  # JSON: the latest evaluation's metrics and its step
    CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="prefixd_jobs_state"),
    Index("prefixd_jobs_claim", "state", "base_key", "priority", "seq"),
    Index("prefixd_jobs_tenant", "tenant", "state"),
    Index("prefixd_jobs_sweep", "sweep_id"),
)

# A job's events: the store's transitions, the workers' log lines (type 'message') and progress updates
# (type 'metrics', with `data`). `seq` is the event's id: it grows with every event of the store.
events_table = Table(
    "prefixd_job_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("prefixd_jobs.id", ondelete="CASCADE"), nullable=False),
    Column("time", Double, nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    # Added after the first release: `create_schema` adds them to older stores (see `_migrate`).
    Column("type", String(16), nullable=False, server_default="message"),
    Column("data", Text),  # a JSON object, or NULL
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


def open_engine(url: str) -> tuple[Engine, str]:
    """(engine, dialect name) for a store URL; a sqlite file's folder is created, and sqlite is set up for
    several processes (`_configure_sqlite`)."""
    parsed = make_url(url)
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})
        _configure_sqlite(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine, dialect


def create_schema(c: Connection, dialect: str) -> None:
    """Create missing tables and migrate an older store, in the caller's (write) transaction. Idempotent,
    and safe when several processes do it at once."""
    if dialect == "postgresql":
        c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_SCHEMA_LOCK})
    metadata.create_all(c)
    _migrate(c)


def _migrate(c: Connection) -> None:
    """Columns added after stores were created: an explicit, idempotent ALTER TABLE on sqlite and
    PostgreSQL alike (create_all only creates missing tables). Old rows get NULL or the column's default."""
    have = {col["name"] for col in inspect(c).get_columns("prefixd_jobs")}
    added = (
        ("tenant", "VARCHAR(128)"),
        ("sweep_id", "VARCHAR(64)"),
        ("sweep_variant", "TEXT"),
        ("run_id", "VARCHAR(64)"),
        ("last_eval", "TEXT"),
    )
    for name, sql_type in added:
        if name not in have:
            c.execute(text(f"ALTER TABLE prefixd_jobs ADD COLUMN {name} {sql_type}"))
    c.execute(text("CREATE INDEX IF NOT EXISTS prefixd_jobs_tenant ON prefixd_jobs (tenant, state)"))
    c.execute(text("CREATE INDEX IF NOT EXISTS prefixd_jobs_sweep ON prefixd_jobs (sweep_id)"))
    have = {col["name"] for col in inspect(c).get_columns("prefixd_job_events")}
    if "type" not in have:
        c.execute(text("ALTER TABLE prefixd_job_events ADD COLUMN type VARCHAR(16) NOT NULL DEFAULT 'message'"))
    if "data" not in have:
        c.execute(text("ALTER TABLE prefixd_job_events ADD COLUMN data TEXT"))


def _configure_sqlite(engine: Engine) -> None:
    """WAL (readers don't block the writer), a busy timeout (writers wait for each other instead of
    failing), and transactions this package begins itself, so writes can use BEGIN IMMEDIATE."""

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
