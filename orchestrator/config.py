"""Where an orchestrator keeps its state and how it schedules: one frozen `OrchestratorConfig`.

Everything lives under one home folder (`--home`, `PREFIXD_HOME`, default `~/.prefixd`):

    ~/.prefixd/
      jobs.db            the job store (sqlite); `--store-url` / PREFIXD_STORE_URL names another database
      jobs/<job_id>/     each job's out_dir: checkpoints while it trains, then adapter/, prefix/, result.json.
                         Named by the job id only, so whichever worker takes the job next resumes there.
      cache/data/        tokenized datasets (reused while file, settings and tokenizer stay the same)
      logs/              the orchestrator's own log (orchestrator.log)

Base models are cached outside the home by default (`workers.models.default_model_cache()`; override with
PREFIXD_MODEL_CACHE), so several homes share one converted SmolLM2.

    config = OrchestratorConfig.from_env(home="/tmp/h", max_groups=1)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

HOME_ENV = "PREFIXD_HOME"
STORE_URL_ENV = "PREFIXD_STORE_URL"
MODEL_CACHE_ENV = "PREFIXD_MODEL_CACHE"
RAY_ADDRESS_ENV = "PREFIXD_RAY_ADDRESS"
DEFAULT_HOME = "~/.prefixd"


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
    ray_address: str | None = None
    """Ray cluster to join ('127.0.0.1:6379', 'auto', 'ray://...'); None starts a private local Ray bound to
    127.0.0.1, which is shut down when the orchestrator closes."""
    num_cpus: int | None = None
    """CPUs of the local Ray started when ray_address is None; None lets Ray count the machine's."""
    cpus_per_group: float = 1.0
    """Ray CPUs reserved by each rank of a worker group (its torch thread count on CPU)."""
    max_groups: int = 2
    """Most worker groups (resident base models) at once; further base models wait in the queue."""
    group_capacity: int = 8
    """Most tasks one group trains at once; further jobs of its base model wait in the queue."""
    idle_timeout_s: float = 30.0
    """A group with no task and nothing to claim for this long is released (its base model unloaded)."""
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
    """Run the decoder layers of training forwards compiled (`workers/fused.py`: Llama, Mistral, Qwen2):
    1.05x-1.23x the tokens/s of eager layers on a CPU in `benchmarks/multitask.py --compare-eager`, once
    compiled (tens of seconds per group start). Needs the base model whole on each rank (zero_stage 0 or 2;
    `check` refuses it with stage 3); other architectures train eagerly, and the job log says why."""
    poll_s: float = 1.0
    """Seconds between scheduler passes, and between an idle group's looks at the queue."""
    workers_per_group: int = 1
    """Ranks (processes) in each worker group; the base model is partitioned across them with ZeRO-3."""
    gpus_per_worker: float = 0.0
    """GPUs each rank of a group reserves from Ray (0 on CPU machines; NCCL is used when GPUs are there)."""
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
    """Log and register finished jobs in MLflow (retried with backoff while MLflow is unreachable)."""

    @classmethod
    def from_env(
        cls,
        home: str | Path | None = None,
        store_url: str | None = None,
        ray_address: str | None = None,
        **settings: Any,
    ) -> OrchestratorConfig:
        """A config from explicit values, else the environment (PREFIXD_HOME, PREFIXD_STORE_URL,
        PREFIXD_MODEL_CACHE, PREFIXD_RAY_ADDRESS), else the defaults. Raises ValueError naming every bad
        setting."""
        home_path = Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()
        url = store_url or os.environ.get(STORE_URL_ENV) or f"sqlite:///{home_path / 'jobs.db'}"
        address = ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
        known = {f.name for f in fields(cls)} - {"home", "store_url", "ray_address"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown orchestrator settings {unknown}; accepted: {', '.join(sorted(known))}")
        settings = {k: v for k, v in settings.items() if v is not None}
        if "model_cache" in settings:
            settings["model_cache"] = Path(settings["model_cache"]).expanduser().resolve()
        config = cls(home=home_path, store_url=url, ray_address=address, **settings)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError listing every setting out of range."""
        problems = []
        if self.zero_stage not in (0, 2, 3):
            problems.append(f"zero_stage: must be 0, 2 or 3, got {self.zero_stage!r}")
        if self.zero_offload and self.zero_stage != 3:
            problems.append("zero_offload: needs zero_stage 3")
        if not isinstance(self.compile_layers, bool):
            problems.append(f"compile_layers: must be true or false, got {self.compile_layers!r}")
        elif self.compile_layers and self.zero_stage == 3:
            problems.append("compile_layers: needs zero_stage 0 or 2 (ZeRO-3 partitions the weights the compiled "
                            "layers read)")
        for name in ("max_groups", "group_capacity", "max_attempts", "micro_batch_size", "workers_per_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}: must be an int >= 1, got {value!r}")
        if not isinstance(self.gpus_per_worker, (int, float)) or self.gpus_per_worker < 0:
            problems.append(f"gpus_per_worker: must be a number >= 0, got {self.gpus_per_worker!r}")
        for name in ("cpus_per_group", "idle_timeout_s", "heartbeat_s", "stale_after_s", "poll_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                problems.append(f"{name}: must be a number > 0, got {value!r}")
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            problems.append(f"num_cpus: must be an int >= 1 or None, got {self.num_cpus!r}")
        if not problems and self.stale_after_s <= 2 * self.heartbeat_s:
            problems.append(f"stale_after_s: {self.stale_after_s} must exceed 2 x heartbeat_s "
                            f"({self.heartbeat_s}), or live jobs would be taken back as stale")
        if problems:
            raise ValueError("orchestrator settings: " + "; ".join(problems))

    def with_(self, **changes: Any) -> OrchestratorConfig:
        """A copy with some fields changed (checked again)."""
        config = replace(self, **changes)
        config.check()
        return config

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

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

    def job_dir(self, job_id: str) -> Path:
        """The job's out_dir; the same for every attempt, so a new worker resumes the last checkpoint."""
        return self.jobs_dir / job_id
