"""Where an orchestrator keeps its state and how it schedules: one frozen `OrchestratorConfig`.

Everything lives under one home folder (`--home`, `PREFIXD_HOME`, default `~/.prefixd`):

    ~/.prefixd/
      jobs.db            the job store (sqlite); `--store-url` / PREFIXD_STORE_URL names another database
      jobs/<job_id>/     each job's out_dir: checkpoints while it trains, then adapter/, prefix/, result.json.
                         Named by the job id only, so whichever worker takes the job next resumes there.
                         `--storage URI` / PREFIXD_STORAGE moves job folders elsewhere: a shared filesystem
                         or s3://bucket/prefix (`workers/storage.py`), <storage>/jobs/<job_id>/, which
                         every Ray node then reads and writes instead of its own disk.
      cache/data/        tokenized datasets (reused while file, settings and tokenizer stay the same)
      logs/              the orchestrator's own log (orchestrator.log)

Base models are cached outside the home by default (`workers.models.default_model_cache()`; override with
PREFIXD_MODEL_CACHE), so several homes share one converted SmolLM2.

    config = OrchestratorConfig.from_env(home="/tmp/h", max_groups=1)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

HOME_ENV = "PREFIXD_HOME"
STORE_URL_ENV = "PREFIXD_STORE_URL"
MODEL_CACHE_ENV = "PREFIXD_MODEL_CACHE"
RAY_ADDRESS_ENV = "PREFIXD_RAY_ADDRESS"
STORAGE_ENV = "PREFIXD_STORAGE"
DEFAULT_HOME = "~/.prefixd"
STRATEGIES = ("PACK", "STRICT_PACK")


@dataclass(frozen=True, kw_only=True)
class GroupShape:
    """How the worker groups of one base model are built and reserved (the operator's table, per base).

    A group's ranks are reserved together as one Ray placement group of `workers_per_group` bundles of
    {CPU: cpus_per_group, GPU: gpus_per_worker, **resources_per_worker}; nothing is held until every bundle
    is. Data-parallel stage-0 groups suit models that fit one device, ZeRO-3 groups those that do not.

        GroupShape(workers_per_group=8, zero_stage=3, gpus_per_worker=1, placement_strategy="STRICT_PACK")
    """

    workers_per_group: int = 1
    """Ranks (processes) per group."""
    zero_stage: int = 3
    """3 partitions the base across the ranks; 0 and 2 keep a whole copy on each rank."""
    zero_offload: bool = False
    """Stage 3: keep the partitions in CPU memory."""
    gpus_per_worker: float = 0.0
    """GPUs each rank reserves (0 on CPU machines)."""
    cpus_per_group: float | None = None
    """CPUs each rank reserves, and its torch threads on a CPU host. None: with a local Ray, the machine's
    CPUs split across one group's ranks (a single group gets them all); on a cluster, 1."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each rank reserves (e.g. {"a100": 1} to land on labelled nodes)."""
    placement_strategy: str = "PACK"
    """PACK: ranks on as few nodes as fit; STRICT_PACK: all on one node (a ZeRO-3 group's gathers stay
    inside it)."""
    max_groups: int | None = None
    """Most groups of this base model at once (None: the orchestrator's max_groups_per_base)."""

    FIELDS = (
        "workers_per_group",
        "zero_stage",
        "zero_offload",
        "gpus_per_worker",
        "cpus_per_group",
        "resources_per_worker",
        "placement_strategy",
        "max_groups",
    )

    def problems(self, where: str) -> list[str]:
        """Every setting out of range, each named after `where` ("" or e.g. "group_shapes['builtin:x'].")."""
        out = []
        if self.zero_stage not in (0, 2, 3):
            out.append(f"{where}zero_stage: must be 0, 2 or 3, got {self.zero_stage!r}")
        if self.zero_offload and self.zero_stage != 3:
            out.append(f"{where}zero_offload: needs zero_stage 3")
        if not _is_int(self.workers_per_group) or self.workers_per_group < 1:
            out.append(f"{where}workers_per_group: must be an int >= 1, got {self.workers_per_group!r}")
        if not _is_number(self.gpus_per_worker) or self.gpus_per_worker < 0:
            out.append(f"{where}gpus_per_worker: must be a number >= 0, got {self.gpus_per_worker!r}")
        if self.cpus_per_group is not None and (not _is_number(self.cpus_per_group) or not self.cpus_per_group > 0):
            out.append(f"{where}cpus_per_group: must be a number > 0 (or unset), got {self.cpus_per_group!r}")
        if not isinstance(self.resources_per_worker, dict) or not all(
            isinstance(k, str) and k and _is_number(v) and v > 0 for k, v in self.resources_per_worker.items()
        ):
            out.append(
                f"{where}resources_per_worker: must map resource names to numbers > 0, "
                f"got {self.resources_per_worker!r}"
            )
        elif {"CPU", "GPU"} & set(self.resources_per_worker):
            out.append(f"{where}resources_per_worker: CPU and GPU are set by cpus_per_group and gpus_per_worker")
        if self.placement_strategy not in STRATEGIES:
            out.append(
                f"{where}placement_strategy: must be one of {', '.join(STRATEGIES)}, got {self.placement_strategy!r}"
            )
        if self.max_groups is not None and (not _is_int(self.max_groups) or self.max_groups < 1) and where:
            out.append(f"{where}max_groups: must be an int >= 1 (or unset), got {self.max_groups!r}")
        return out


def read_group_shapes(path: str | Path) -> dict[str, dict[str, Any]]:
    """The operator's table from a YAML or JSON file: {base model: {GroupShape field: value}}, where a base
    model is a job's base key ('builtin:smollm2-135m:bfloat16') or the same without its dtype
    ('builtin:smollm2-135m'). Raises ValueError naming the file and what is wrong."""
    import yaml

    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"group_shapes: cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in data.items()):
        raise ValueError(
            f"group_shapes: {path} must map base models to settings, e.g. "
            "{'builtin:smollm2-135m': {'workers_per_group': 1, 'gpus_per_worker': 1}}"
        )
    return data


def _normalized_storage(uri: str) -> str:
    """The storage URI in its normal form (local paths absolute); as given when malformed (`check` says why)."""
    from workers.storage import JobStorage, StorageError

    try:
        return JobStorage.open(uri).uri
    except StorageError:
        return uri


def _operator_files(settings: dict[str, Any]) -> dict[str, Any]:
    """spec_bounds from $PREFIXD_SPEC_BOUNDS and tenant_quotas from $PREFIXD_QUOTAS (files), unless given."""
    from jobs.bounds import BOUNDS_ENV, SpecBounds

    if "spec_bounds" not in settings and os.environ.get(BOUNDS_ENV):
        settings["spec_bounds"] = dict(SpecBounds.from_file(os.environ[BOUNDS_ENV]).overrides)
    if "tenant_quotas" not in settings and os.environ.get("PREFIXD_QUOTAS"):
        from orchestrator.tenants import read_quotas

        settings["tenant_quotas"] = {
            t: {k: getattr(q, k) for k in ("max_queued", "max_running", "max_priority")}
            for t, q in read_quotas(os.environ["PREFIXD_QUOTAS"]).items()
        }
    return settings


def _tenancy_problems(spec_bounds: Any, tenant_quotas: Any) -> list[str]:
    from jobs.bounds import check_bounds
    from orchestrator.tenants import check_quotas

    problems = [f"spec_bounds: {p}" for p in check_bounds(spec_bounds)]
    try:
        check_quotas(tenant_quotas)
    except ValueError as e:
        problems.append(f"tenant_quotas: {e}")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_model_cache() -> Path:
    """The same folder as `workers.models.default_model_cache()` (a test keeps the two equal), without
    importing torch and transformers into every CLI command."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "prefixd" / "models")


def default_tracking_uri(home: str | Path) -> str:
    """The embedded MLflow store: `sqlite:///<home>/mlflow/mlflow.db` (absolute); its experiments keep
    artifacts in `<home>/mlflow/artifacts/<experiment>`."""
    db = Path(home).expanduser().resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def machine_local_uri(uri: str) -> bool:
    """Whether a tracking URI is a file on the machine whose process holds it (an sqlite database, a file
    store, a path), which processes on other nodes cannot reach.

        machine_local_uri("sqlite:////srv/prefixd/mlflow/mlflow.db")   # True
        machine_local_uri("http://mlflow:5000")                        # False
    """
    if "://" in uri or uri.startswith("file:"):
        return uri.split(":", 1)[0] in ("sqlite", "file")
    return uri.startswith(("/", ".", "~"))


def mlflow_database_uri(uri: str) -> bool:
    """Whether MLflow opens a tracking URI as a database itself (sqlite, PostgreSQL, MySQL, SQL Server),
    rather than through a tracking server that sets its own database up.

        mlflow_database_uri("postgresql+psycopg2://u@db/mlflow")   # True
    """
    return uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")


def mlflow_fail_fast() -> None:
    """Make MLflow's HTTP client give up on an unreachable server after one retry and 30 s (its default
    retries for minutes): the registrar and the live runs retry on their own schedule. Values already set
    in the environment stay."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@dataclass(frozen=True, kw_only=True)
class OrchestratorConfig:
    """How one orchestrator runs. Build it with `from_env` (fills home, store URL and model cache from the
    environment); every path here is absolute."""

    home: Path
    """State folder: jobs.db, jobs/<job_id>/, cache/data/, logs/."""
    store_url: str
    """SQLAlchemy URL of the job store; default sqlite:///<home>/jobs.db."""
    model_cache: Path = field(default_factory=default_model_cache)
    """Where built-in base models are converted to safetensors once (PREFIXD_MODEL_CACHE)."""
    storage: str | None = None
    """Where job folders live (jobs/<job_id>/: checkpoints, results): a local path, a shared filesystem path,
    or s3://bucket/prefix[?endpoint_override=host:port&region=...] (`workers/storage.py`; credentials from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). None: the home folder. Every node that trains or registers
    must reach it; with several nodes, a folder only one node sees does not work."""
    ray_address: str | None = None
    """Ray cluster to join ('127.0.0.1:6379', 'auto', 'ray://...'); None starts a private local Ray bound to
    127.0.0.1, which is shut down when the orchestrator closes."""
    num_cpus: int | None = None
    """CPUs of the local Ray started when ray_address is None; None lets Ray count the machine's."""
    cpus_per_group: float | None = None
    """Ray CPUs reserved by each rank of a worker group (its torch thread count on CPU). None: with a local
    Ray, the machine's CPUs split across one group's ranks (a single group gets them all); on a cluster, 1."""
    max_groups: int = 2
    """Most worker groups (resident base models, replicas included) at once; further work waits in the queue."""
    max_groups_per_base: int = 1
    """Most groups serving one base model at once: another starts when its queued jobs exceed what its
    running groups can take (group_capacity each). A base's row in group_shapes may set its own."""
    group_capacity: int = 8
    """Most tasks one group trains at once; further jobs of its base model wait in the queue."""
    idle_timeout_s: float = 30.0
    """A group with no task and nothing to claim for this long is released (its base model unloaded)."""
    drain_timeout_s: float = 120.0
    """On a graceful stop (SIGTERM, Ctrl-C), how long groups get to finish their step, checkpoint and hand
    their jobs back without charging an attempt; a group still busy after that is killed (attempt charged)."""
    heartbeat_s: float = 5.0
    """Seconds between a group's heartbeats for the jobs it holds."""
    stale_after_s: float = 60.0
    """A running job without a heartbeat for this long belongs to a dead orchestrator and is requeued.
    Must exceed heartbeat_s by a margin (a few heartbeats)."""
    max_attempts: int = 3
    """Attempts a submitted job gets (each claim is one) before it fails for good."""
    micro_batch_size: int = 16
    """Rows per forward pass inside a group's step (memory knob; the result does not depend on it)."""
    compile_layers: bool = False
    """Run the decoder layers of training forwards compiled (`workers/fused.py`: Llama, Mistral, Qwen2;
    the speed-up against eager layers, column a/a0: benchmarks/README.md), paying the compilation at each
    group start. Needs the base model whole on each rank (zero_stage 0 or 2;
    `check` refuses it with stage 3); other architectures train eagerly, and the job log says why."""
    poll_s: float = 1.0
    """Seconds between scheduler passes, and between an idle group's looks at the queue."""
    workers_per_group: int = 1
    """Ranks (processes) in each worker group; the base model is partitioned across them with ZeRO-3."""
    gpus_per_worker: float = 0.0
    """GPUs each rank of a group reserves from Ray (0 on CPU machines; NCCL is used when GPUs are there)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each rank reserves (node labels such as {"a100": 1})."""
    placement_strategy: str = "PACK"
    """How a group's ranks are placed: PACK (as few nodes as fit) or STRICT_PACK (one node)."""
    group_shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per base model, GroupShape fields that differ from the settings above (`read_group_shapes` reads the
    operator's file; `prefixd serve --group-shapes FILE`)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage of each group's base model: 3 partitions it across the group's ranks; 0 and 2
    keep a full copy on each rank (a frozen base has nothing else for them to partition)."""
    zero_offload: bool = False
    """Stage 3: keep the base-weight partitions in CPU memory (bases larger than device memory)."""
    zero_persistence_threshold: int | None = None
    """Stage 3: parameters up to this many elements stay whole on every rank (DeepSpeed's default 1e5
    when None; 0 partitions every parameter, which tiny test models need)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI that finished jobs are logged and registered to; None: the embedded default,
    a sqlite store under <home>/mlflow (MLFLOW_TRACKING_URI overrides)."""
    register: bool = True
    """Track jobs in MLflow (a run per job, live while it trains) and register the finished ones (retried
    with backoff while MLflow is unreachable)."""
    tracking_every_s: float = 5.0
    """Seconds between a worker group's batched writes of its jobs' live metrics to MLflow (one log_batch
    per job per interval)."""
    spec_bounds: dict[str, float] = field(default_factory=dict)
    """Upper bounds on job-spec numbers that differ from the defaults, e.g. {"training.steps": 20000}
    (jobs/bounds.py); PREFIXD_SPEC_BOUNDS names a YAML or JSON file of them."""
    tenant_quotas: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-tenant quotas of the HTTP API: {tenant or '*': {max_queued, max_running, max_priority}}
    (orchestrator/tenants.py); PREFIXD_QUOTAS names a YAML or JSON file of them."""

    @classmethod
    def from_env(
        cls,
        home: str | Path | None = None,
        store_url: str | None = None,
        ray_address: str | None = None,
        **settings: Any,
    ) -> OrchestratorConfig:
        """A config from explicit values, else the environment (PREFIXD_HOME, PREFIXD_STORE_URL,
        PREFIXD_MODEL_CACHE, PREFIXD_RAY_ADDRESS, PREFIXD_STORAGE), else the defaults. Raises ValueError
        naming every bad setting."""
        home_path = Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()
        url = store_url or os.environ.get(STORE_URL_ENV) or f"sqlite:///{home_path / 'jobs.db'}"
        address = ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
        known = {f.name for f in fields(cls)} - {"home", "store_url", "ray_address"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown orchestrator settings {unknown}; accepted: {', '.join(sorted(known))}")
        settings = {k: v for k, v in settings.items() if v is not None}
        settings = _operator_files(settings)
        if "model_cache" in settings:
            settings["model_cache"] = Path(settings["model_cache"]).expanduser().resolve()
        if settings.get("storage") or os.environ.get(STORAGE_ENV):
            settings["storage"] = _normalized_storage(settings.get("storage") or os.environ[STORAGE_ENV])
        config = cls(home=home_path, store_url=url, ray_address=address, **settings)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError listing every setting out of range."""
        problems = self.shape_for(None).problems("")
        if not isinstance(self.compile_layers, bool):
            problems.append(f"compile_layers: must be true or false, got {self.compile_layers!r}")
        elif self.compile_layers and self.zero_stage == 3:
            problems.append(
                "compile_layers: needs zero_stage 0 or 2 (ZeRO-3 partitions the weights the compiled layers read)"
            )
        for name in ("max_groups", "max_groups_per_base", "group_capacity", "max_attempts", "micro_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name}: must be an int >= 1, got {value!r}")
        for name in ("idle_timeout_s", "drain_timeout_s", "heartbeat_s", "stale_after_s", "poll_s", "tracking_every_s"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                problems.append(f"{name}: must be a number > 0, got {value!r}")
        if not isinstance(self.group_shapes, dict):
            problems.append(f"group_shapes: must map base models to settings, got {self.group_shapes!r}")
        for base, row in self.group_shapes.items() if isinstance(self.group_shapes, dict) else ():
            unknown = sorted(set(row) - set(GroupShape.FIELDS))
            if unknown:
                problems.append(
                    f"group_shapes[{base!r}]: unknown settings {unknown}; accepted: {', '.join(GroupShape.FIELDS)}"
                )
            else:
                problems += self.shape_for(base).problems(f"group_shapes[{base!r}].")
        if self.storage is not None:
            from workers.storage import JobStorage, StorageError

            try:
                JobStorage.open(self.storage)  # its form only: `check_storage` reaches it
            except StorageError as e:
                problems.append(str(e))
        problems += _tenancy_problems(self.spec_bounds, self.tenant_quotas)
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            problems.append(f"num_cpus: must be an int >= 1 or None, got {self.num_cpus!r}")
        if not problems and self.stale_after_s <= 2 * self.heartbeat_s:
            problems.append(
                f"stale_after_s: {self.stale_after_s} must exceed 2 x heartbeat_s "
                f"({self.heartbeat_s}), or live jobs would be taken back as stale"
            )
        if problems:
            raise ValueError("orchestrator settings: " + "; ".join(problems))

    def shape_for(self, base_key: str | None) -> GroupShape:
        """The group shape for a base model: its row in group_shapes (by the whole base key, else the key
        without its dtype) over the orchestrator's own settings."""
        row: dict[str, Any] = {}
        if base_key is not None:
            row = self.group_shapes.get(base_key) or self.group_shapes.get(base_key.rsplit(":", 1)[0]) or {}
        defaults = {name: getattr(self, name) for name in GroupShape.FIELDS if name != "max_groups"}
        return GroupShape(**(defaults | {"max_groups": self.max_groups_per_base} | row))

    def with_(self, **changes: Any) -> OrchestratorConfig:
        """A copy with some fields changed (checked again)."""
        config = replace(self, **changes)
        config.check()
        return config

    @property
    def jobs_dir(self) -> Path | str:
        """<storage>/jobs: a Path when storage is local (the home folder by default), else its URI."""
        if self.storage is None or "://" not in self.storage:
            return Path(self.storage or self.home) / "jobs"
        head, _, query = self.storage.partition("?")
        return f"{head.rstrip('/')}/jobs" + (f"?{query}" if query else "")

    @property
    def data_cache(self) -> Path:
        return self.home / "cache" / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def tracking_uri(self) -> str:
        """Where finished jobs are logged: mlflow_uri, else MLFLOW_TRACKING_URI, else <home>/mlflow (sqlite)."""
        if self.mlflow_uri:
            return self.mlflow_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return default_tracking_uri(self.home)

    def job_dir(self, job_id: str) -> Path | str:
        """The job's out_dir; the same for every attempt, so a new worker resumes the last checkpoint."""
        if isinstance(self.jobs_dir, Path):
            return self.jobs_dir / job_id
        from workers.results import job_folder

        return job_folder(self.jobs_dir, job_id)

    def check_storage(self) -> None:
        """Reach the storage and write, read and delete a probe file in it; StorageError (a ValueError)
        says what failed (unreachable endpoint, missing bucket, refused credentials)."""
        from workers.storage import JobStorage

        JobStorage.open(self.storage or self.home).check()
