"""One frozen base model per worker group, partitioned with DeepSpeed ZeRO-3 across the group's ranks.

Each of the W ranks of a group holds about 1/W of the base weights; DeepSpeed's parameter hooks gather
each layer's weights just before it runs (forward and backward) and release them after. The task
prefixes are small and stay whole on every rank, outside DeepSpeed: the trainer sums their gradients
across ranks itself (`MultiTaskTrainer(collectives=...)`), so tasks join and leave without touching the
DeepSpeed engine, which is built once per group and never re-partitioned.

Stages: 3 partitions the frozen weights (optionally offloading them to CPU memory); 0 and 2 keep a full
replica per rank: a frozen base has no gradients or optimizer state for those stages to partition,
so they differ from plain data parallelism only in name. Devices and backends come from
`workers.devices.Placement` (NCCL for GPU tensors, gloo for CPU ones).

    store, port = host_rendezvous("127.0.0.1", world)                      # rank 0
    coll = init_group(rank, world, "127.0.0.1", port, store=store)          # every rank (store: rank 0's)
    model, tok, info = load_group_model(ref, ZeroSettings(stage=3), coll)
    trainer = MultiTaskTrainer(model, tok, collectives=coll, device=coll.device)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Model classes are imported at module level: importing one for the first time inside zero.Init fails
# ("Signature mismatch ... tensor_pynew").
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: F401

from workers.devices import Collectives, Placement
from workers.models import BaseModelRef, load_base_model, resolve_folder

STAGES = (0, 2, 3)
DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True, kw_only=True)
class ZeroSettings:
    """How a worker group holds its base model."""

    stage: int = 3
    """ZeRO stage: 3 partitions the base weights across ranks; 0 and 2 keep a full copy on each."""
    offload_params: bool = False
    """Stage 3 only: keep the partitions in CPU memory (for bases larger than device memory)."""
    persistence_threshold: int | None = None
    """Parameters with at most this many elements stay whole on every rank (DeepSpeed's default 1e5
    when None); 0 partitions everything, which tiny test models need."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"zero stage {self.stage!r}; accepted: {', '.join(map(str, STAGES))}")
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs zero stage 3")


@dataclass(frozen=True)
class ShardInfo:
    """Base-model elements held by this rank vs. the whole model (the test and benchmark print these)."""

    rank: int
    world: int
    local_elements: int
    total_elements: int


def host_rendezvous(addr: str, world: int, timeout: timedelta | None = None):
    """Rank 0: open the group's rendezvous store on `addr`, on a port the OS picks as it binds (no port is
    chosen, released and bound again, so no other process can take it in between).

    Returns (store, port); keep the store alive until the group ends and give the port to the others."""
    store = dist.TCPStore(addr, 0, world, is_master=True, wait_for_workers=False, timeout=timeout or DEFAULT_TIMEOUT)
    return store, store.port


def init_group(
    rank: int,
    world: int,
    addr: str,
    port: int,
    *,
    placement: Placement | None = None,
    store=None,
    timeout: timedelta | None = None,
) -> Collectives:
    """Join (or create) the worker group's process group; returns its `Collectives`.

    Each rank is its own process with its own device (`placement`, default `Placement.detect()`: the GPU
    Ray gave this process, else the CPU). Rank 0 passes the store from `host_rendezvous`; the others
    connect to addr:port. `timeout` bounds every collective (a rank that died breaks the others out of it).
    DeepSpeed, used for ZeRO-3 only, reuses this process group (`load_group_model`).
    """
    placement = placement or Placement.detect()
    placement.apply()
    timeout = timeout or DEFAULT_TIMEOUT
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    if not dist.is_initialized():
        if store is None:  # rank 0 hosts at the given port unless it brings the store of host_rendezvous
            store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
        dist.init_process_group(placement.backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Collectives(placement.device)


def deepspeed_config(settings: ZeroSettings, dtype: str, device: torch.device) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.stage == 3:
        if settings.persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = settings.persistence_threshold
        if settings.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
    }


def load_group_model(
    ref: BaseModelRef,
    settings: ZeroSettings,
    coll: Collectives,
    *,
    cache_dir=None,
    trust_remote_code: bool | None = None,
):
    """Load the frozen base on this rank, on `coll.device`; partitioned when stage 3. Returns (model,
    tokenizer, ShardInfo).

    Needs the process group (`init_group`). Stage 0/2: the whole model moves to the rank's device (the GPU,
    or stays on the CPU). Stage 3: DeepSpeed loads it straight into partitions on that device (or CPU memory
    with offload_params); the engine that installs the gathering hooks is kept on the model as
    `model._prefixd_engine`. The returned model is used like any transformers model.
    """
    rank, world = coll.rank, coll.world
    if settings.stage != 3:
        model, tokenizer = load_base_model(ref, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        model.to(coll.device)
        n = sum(p.numel() for p in model.parameters())
        return model, tokenizer, ShardInfo(rank, world, n, n)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend=coll.deepspeed_backend)
    config = deepspeed_config(settings, ref.dtype, coll.device)
    if rank == 0:
        resolve_folder(ref, cache_dir)  # convert a built-in model once, before the others look for it
    coll.barrier()
    hf_config = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads straight into partitions
    model, tokenizer = load_base_model(ref, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    # Kept alive with the model; object.__setattr__ so the engine (which wraps the model) is not
    # registered as one of its submodules.
    object.__setattr__(model, "_prefixd_engine", engine)
    object.__setattr__(model, "_prefixd_hf_ds_config", hf_config)
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    return model, tokenizer, ShardInfo(rank, world, local, total)
