"""The ranks of a worker group: rank 0 sends each trainer operation to the others over the process group.

Every rank runs the same trainer operations in the same order (ZeRO-3 gathers weights collectively, so the
ranks must stay in lockstep): ("load", ref), ("add", TaskConfig), ("remove", task_id), ("step",),
("noop",) while idle (keeps the collective from timing out), ("stop",). With one rank nothing is sent: a
group of one runs the same path. Nothing here imports Ray: the orchestrator's actors (orchestrator/group.py)
call it, and so does the GPU check, on a machine without Ray.

    store, port = host_rendezvous(addr, settings.world)                 # rank 0, when the group starts
    channel = GroupChannel.join(0, settings, (addr, port), store=store)  # rank 0
    follow(settings, rank, (addr, port))                                 # ranks 1.., until rank 0 says stop
    trainer = channel.load(ref)                                          # rank 0: a ReplicatedTrainer
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from workers.devices import Collectives, Placement
from workers.zero import ZeroSettings, host_rendezvous, init_group  # noqa: F401 - host_rendezvous re-exported


@dataclass(frozen=True, kw_only=True)
class RankSettings:
    """What every rank of a group needs, as plain values."""

    world: int = 1
    """Ranks in the group: rank 0 drives, ranks 1.. follow."""
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    model_cache: str | None = None
    data_cache: str | None = None
    scratch: str | None = None
    """Local folder for staging checkpoints and results on their way to and from storage."""
    micro_batch_size: int = 16
    compile_layers: bool = False
    cpus: float | None = None
    """CPUs the rank reserved: its torch threads on a CPU host (None: torch's own choice)."""
    device: str = "auto"
    """'auto' (the GPU the process sees, else the CPU), 'cpu' or 'cuda' (`workers.devices.resolve_device`)."""

    def placement(self) -> Placement:
        return Placement.detect(self.cpus, self.device)


class GroupChannel:
    """One rank's end of the group: its collectives, and rank 0's operations to the others."""

    KEEPALIVE_S = 60.0

    def __init__(self, rank: int, settings: RankSettings, coll: Collectives):
        self.rank, self.s, self.coll = rank, settings, coll
        self.broken = False
        self._last_sent = time.monotonic()
        self.shard = None

    @classmethod
    def join(cls, rank: int, settings: RankSettings, rendezvous: tuple[str, int], *, store=None) -> GroupChannel:
        """Join the group's process group (waits for every rank). Rank 0 passes the store it hosts."""
        coll = init_group(
            rank,
            settings.world,
            *rendezvous,
            placement=settings.placement(),
            store=store,
            timeout=timedelta(seconds=10 * cls.KEEPALIVE_S),
        )
        coll.barrier()
        return cls(rank, settings, coll)

    @property
    def device(self):
        return self.coll.device

    def send(self, op: tuple) -> None:
        if self.s.world == 1 or self.broken:
            return
        self.coll.broadcast_object(op, src=0)
        self._last_sent = time.monotonic()

    def receive(self) -> tuple:
        return self.coll.broadcast_object(None, src=0)

    def keepalive(self) -> None:
        if time.monotonic() - self._last_sent >= self.KEEPALIVE_S:
            self.send(("noop",))

    def load(self, ref) -> ReplicatedTrainer:
        """Every rank: load its share of the base model on its device; returns this rank's trainer."""
        from workers.trainer import MultiTaskTrainer
        from workers.zero import load_group_model

        model, tokenizer, shard = load_group_model(ref, self.s.zero, self.coll, cache_dir=self.s.model_cache)
        trainer = MultiTaskTrainer(
            model,
            tokenizer,
            micro_batch_size=self.s.micro_batch_size,
            compile_layers=self.s.compile_layers,
            data_cache_dir=self.s.data_cache,
            scratch_dir=self.s.scratch,
            collectives=self.coll if self.s.world > 1 else None,
            device=self.coll.device,
        )
        self.shard = shard
        return ReplicatedTrainer(trainer, self)


class ReplicatedTrainer:
    """The trainer as rank 0 uses it: each call is sent to the other ranks, then run here."""

    def __init__(self, trainer, channel: GroupChannel):
        self.trainer, self.channel = trainer, channel

    @property
    def active(self) -> list[str]:
        return self.trainer.active

    def add_task(self, config):
        self.channel.send(("add", config))
        return add_everywhere(self.trainer, config, self.channel)

    def remove_task(self, task_id: str) -> None:
        self.channel.send(("remove", task_id))
        self.trainer.remove_task(task_id)

    def step(self):
        self.channel.send(("step",))
        return self.trainer.step()

    def checkpoint(self, task_id: str) -> int:
        """Rank 0 writes the task's checkpoint (the other ranks hold the same prefix); returns its step."""
        return self.trainer.checkpoint(task_id)


def add_everywhere(trainer, config, channel: GroupChannel):
    """add_task on this rank, kept only if it worked on every rank (data must load alike everywhere) and
    every rank resumed at the same step (each reads the task's checkpoints from storage itself; one that
    could not read the newest would have fallen back to an older one)."""
    error, progress = None, None
    try:
        progress = trainer.add_task(config)
    except Exception as e:  # noqa: BLE001 - reported by rank 0 as the job's error
        error = e
    if channel.s.world > 1 and not channel.coll.all_true(error is None) and error is None:
        trainer.remove_task(config.task_id)
        error = RuntimeError("the task could not start on another rank of the group")
    elif (
        channel.s.world > 1
        and error is None
        and not channel.coll.all_true(
            channel.coll.all_reduce(torch.tensor([progress.step, -progress.step]), op="max").tolist()
            == [progress.step, -progress.step]
        )
    ):
        trainer.remove_task(config.task_id)
        error = RuntimeError(
            "the ranks of the group resumed from different checkpoints (one could not read "
            "the newest); the next attempt reads them again"
        )
    if error is not None:
        raise error
    return progress


def follow(settings: RankSettings, rank: int, rendezvous: tuple[str, int]) -> dict[str, Any]:
    """Ranks 1..: join rank 0's process group and do what it sends until it says stop."""
    channel = GroupChannel.join(rank, settings, rendezvous)
    trainer, steps = None, 0
    while True:
        op = channel.receive()
        if op[0] == "stop":
            break
        if op[0] == "load":
            trainer = channel.load(op[1]).trainer
        elif op[0] == "add":
            try:
                add_everywhere(trainer, op[1], channel)
            except Exception:  # noqa: BLE001 - rank 0 reports it
                pass
        elif op[0] == "remove":
            trainer.remove_task(op[1])
        elif op[0] == "step":
            trainer.step()
            steps += 1
    return dict(rank=rank, steps=steps)


class GroupFollower:
    """Ranks 1.. of a group, each the body of one Ray actor (orchestrator/group.py): `follow` until rank 0
    says stop. `settings.ranks()` is called here, on the follower's own node, so its caches and scratch are
    that node's (orchestrator.group_settings.GroupSettings.local_dirs).

        GroupFollower().run(settings, rank=1, rendezvous=(addr, port))   # returns {'rank': 1, 'steps': n}
    """

    def pid(self) -> int:
        return os.getpid()

    def run(self, settings, rank: int, rendezvous: tuple[str, int]) -> dict[str, Any]:
        quiet_datasets()
        return follow(settings.ranks(), rank, rendezvous)


def quiet_datasets() -> None:
    """Turn off `datasets`' progress bars: tokenizing bars from every rank would flood the driver's terminal."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
