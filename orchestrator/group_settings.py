"""What a worker group needs, as plain values: `GroupSettings` (the group opens its own store from the URL).

settings = GroupSettings(base_key="builtin:smollm2-135m:float32", owner="o/g1", store_url=..., ...)
settings.ranks()         # what each rank needs (workers.ranks.RankSettings)
settings.local_dirs()    # (data cache, scratch) on the node it runs on
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

NODE_HOME_ENV = "PREFIXD_NODE_HOME"


@dataclass(frozen=True, kw_only=True)
class GroupSettings:
    """Everything a group needs, as plain values (it opens its own store from the URL)."""

    base_key: str
    owner: str
    """Name the group claims jobs under (unique per group incarnation)."""
    store_url: str
    jobs_dir: str
    """Where job folders live: the storage URI's jobs/ (a local or shared path, or s3://...)."""
    data_cache: str
    """The orchestrator's data cache; a node that sets $PREFIXD_NODE_HOME keeps its own (`local_dirs`)."""
    model_cache: str
    capacity: int
    micro_batch_size: int
    heartbeat_s: float
    poll_s: float
    world: int = 1
    """Ranks in the group: this actor is rank 0; ranks 1.. are `workers.ranks.GroupFollower` actors."""
    zero_stage: int = 3
    zero_offload: bool = False
    zero_persistence_threshold: int | None = None
    compile_layers: bool = False
    store_patience_s: float = 60.0
    """How long a store call that fails for the database's sake is retried before the group gives up."""
    cpus_per_rank: float | None = None
    """CPUs each rank reserved: its torch threads on a CPU host."""
    spec_bounds: dict[str, float] = field(default_factory=dict)
    """The operator's bounds on spec numbers (jobs/bounds.py); a claimed job over them fails alone."""
    tracking_uri: str | None = None
    """MLflow tracking URI of the jobs' live runs (`orchestrator/live_runs.py`); None: no live runs."""
    tracking_every_s: float = 5.0
    """Seconds between the live runs' batched writes."""

    def ranks(self):
        """What every rank needs (`workers.ranks.RankSettings`); each rank's device is decided there."""
        from workers.ranks import RankSettings
        from workers.zero import ZeroSettings

        zero = ZeroSettings(
            stage=self.zero_stage,
            offload_params=self.zero_offload,
            persistence_threshold=self.zero_persistence_threshold,
        )
        data_cache, scratch = self.local_dirs()
        return RankSettings(
            world=self.world,
            zero=zero,
            model_cache=self.model_cache,
            data_cache=data_cache,
            micro_batch_size=self.micro_batch_size,
            compile_layers=self.compile_layers,
            cpus=self.cpus_per_rank,
            scratch=scratch,
        )

    def local_dirs(self) -> tuple[str, str]:
        """(data cache, scratch for staging checkpoints and results) on the node this runs on: under the
        node's own $PREFIXD_NODE_HOME when it sets one, else beside the orchestrator's data cache. Nothing
        in them is job state: that lives in storage."""
        node_home = os.environ.get(NODE_HOME_ENV)
        if node_home:
            cache = Path(node_home).expanduser() / "cache"
            return str(cache / "data"), str(cache / "scratch")
        return self.data_cache, str(Path(self.data_cache).parent / "scratch")
