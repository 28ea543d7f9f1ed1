"""One frozen base model per worker group, partitioned with DeepSpeed ZeRO-3 across the group's ranks.

Each of the W ranks of a group holds about 1/W of the base weights; DeepSpeed's parameter hooks gather
each layer's weights just before it runs (forward and backward) and release them after. The task
prefixes are small and stay whole on every rank, outside DeepSpeed: the trainer sums their gradients
across ranks itself (`MultiTaskTrainer(dist=...)`), so tasks join and leave without touching the
DeepSpeed engine, which is built once per group and never re-partitioned.

Stages: 3 partitions the frozen weights (optionally offloading them to CPU memory); 0 and 2 keep a full
replica per rank: a frozen base has no gradients or optimizer state for those stages to partition,
so they differ from plain data parallelism only in name. GPUs use NCCL, CPUs gloo.

    init_group(rank, world, "127.0.0.1", port)            # one process group per worker group
    model, tok, info = load_group_model(ref, ZeroSettings(stage=3))
    trainer = MultiTaskTrainer(model, tok, dist=torch.distributed)
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

from workers.models import BaseModelRef, load_base_model, resolve_folder

STAGES = (0, 2, 3)


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


def init_group(rank: int, world: int, addr: str, port: int, *, backend: str | None = None,
               timeout: timedelta | None = None) -> None:
    """Join (or create) the worker group's process group; DeepSpeed reuses it.

    Each rank is its own process with its own devices (Ray gives every actor its GPUs as device 0), so
    LOCAL_RANK is 0. `timeout` bounds every collective (a rank that died breaks the others out of it).
    """
    import deepspeed

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=timeout or timedelta(minutes=30))
    deepspeed.init_distributed(dist_backend=backend)


def deepspeed_config(settings: ZeroSettings, dtype: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.stage == 3:
        if settings.persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = settings.persistence_threshold
        if settings.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
    }


def load_group_model(ref: BaseModelRef, settings: ZeroSettings, *, cache_dir=None,
                     trust_remote_code: bool | None = None):
    """Load the frozen base on this rank, partitioned when stage 3; returns (model, tokenizer, ShardInfo).

    Needs the process group (`init_group`). The returned model is used like any transformers model; the
    DeepSpeed engine that installs the gathering hooks is kept on it as `model._prefixd_engine`.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    if settings.stage != 3:
        model, tokenizer = load_base_model(ref, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        n = sum(p.numel() for p in model.parameters())
        return model, tokenizer, ShardInfo(rank, world, n, n)
    config = deepspeed_config(settings, ref.dtype)
    if rank == 0:
        resolve_folder(ref, cache_dir)  # convert a built-in model once, before the others look for it
    dist.barrier()
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
