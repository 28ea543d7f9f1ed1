"""A worker group's ranks reserved together: Ray placement groups, and what a waiting one waits for.

A group of W ranks is asked of Ray as one placement group of W bundles ({CPU, GPU, custom resources} per
rank; PACK or STRICT_PACK). Ray holds nothing for it until every bundle fits; `Reservation.ready()` says
when it does, never waiting, and `Reservation.shortfall()` says in words what it waits for.

    r = Reservation.ask("builtin:smollm2-135m:bfloat16", shape, cpus_per_rank=8.0, name="prefixd-g1")
    r.ready()         # False until every rank's bundle is reserved
    r.shortfall()     # 'waiting for 8 GPUs (8 rank(s) of {CPU: 8, GPU: 1} each, reserved on one node; ...)'
    r.release()       # give the reservation back (also once the group has ended)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError

from orchestrator.config import GroupShape


def group_bundles(world: int, *, cpus: float, gpus: float, resources: dict[str, float]) -> list[dict[str, float]]:
    """One Ray bundle per rank: what each rank reserves (CPU, GPU and custom resources)."""
    bundle = {"CPU": float(cpus), **{k: float(v) for k, v in resources.items()}}
    if gpus:
        bundle["GPU"] = float(gpus)
    return [dict(bundle) for _ in range(world)]


@dataclass
class Reservation:
    """A group's ranks asked of Ray together (see the module docstring)."""

    base_key: str
    shape: GroupShape
    placement_group: Any
    bundles: list[dict[str, float]]
    since: float = field(default_factory=time.time)
    _ready_ref: Any = None

    @classmethod
    def ask(cls, base_key: str, shape: GroupShape, *, cpus_per_rank: float, name: str) -> Reservation:
        """Ask Ray for every rank of a new group at once; returns at once."""
        from ray.util import placement_group

        bundles = group_bundles(
            shape.workers_per_group,
            cpus=cpus_per_rank,
            gpus=shape.gpus_per_worker,
            resources=shape.resources_per_worker,
        )
        pg = placement_group(bundles, strategy=shape.placement_strategy, name=name)
        return cls(base_key, shape, pg, bundles)

    def ready(self) -> bool:
        """Whether every bundle is reserved. One readiness probe per reservation (each `ready()` of a
        placement group is a task of its own, which a poll at timeout 0 would never see finish)."""
        if self._ready_ref is None:
            self._ready_ref = self.placement_group.ready()
        return bool(ray.wait([self._ready_ref], timeout=0)[0])

    def release(self) -> None:
        release(self.placement_group)

    def node_ids(self) -> set[str]:
        """The Ray nodes its ranks are reserved on (once `ready`)."""
        from ray.util.placement_group import placement_group_table

        return set(placement_group_table(self.placement_group)["bundles_to_node_id"].values())

    def need(self) -> dict[str, float]:
        """Every rank's resources added up."""
        total: dict[str, float] = {}
        for bundle in self.bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
        return total

    def shortfall(self) -> str:
        """What it waits for, in words: 'waiting for 8 GPUs (...; the cluster has 4 GPUs)'."""
        need, have = self.need(), ray.cluster_resources()
        order = sorted(need, key=lambda k: (k != "GPU", k != "CPU", k))
        missing = [k for k in order if have.get(k, 0.0) < need[k]]
        where = "on one node" if self.shape.placement_strategy == "STRICT_PACK" else "together"
        detail = f"{len(self.bundles)} rank(s) of {describe(self.bundles[0])} each, reserved {where}"
        if missing:
            detail += f"; the cluster has {amounts({k: have.get(k, 0.0) for k in missing})}"
        else:
            detail += "; the cluster has them, in use or on separate nodes"
        return f"waiting for {amounts({k: need[k] for k in (missing or order)})} ({detail})"

    def impossible(self) -> str | None:
        """Why this Ray as it is can never hold the group (more than its total of some resource), else None."""
        have = ray.cluster_resources()
        short = {k: v for k, v in self.need().items() if have.get(k, 0.0) < v}
        if not short:
            return None
        return (
            f"the jobs of {self.base_key} need {amounts(short)} for one worker group ({len(self.bundles)} "
            f"rank(s) of {describe(self.bundles[0])}); this machine's Ray has "
            f"{amounts({k: have.get(k, 0.0) for k in short})}"
        )


def release(placement_group) -> None:
    """Give a placement group back to Ray (its resources return shortly after)."""
    from ray.util import remove_placement_group

    try:
        remove_placement_group(placement_group)
    except RayError:
        pass


def amounts(resources: dict[str, float]) -> str:
    """{'GPU': 8, 'CPU': 16} -> '8 GPUs, 16 CPUs'."""

    def one(name: str, amount: float) -> str:
        plural = "s" if name in ("GPU", "CPU") and amount != 1 else ""
        return f"{amount:g} {name}{plural}"

    return ", ".join(one(k, v) for k, v in resources.items())


def describe(bundle: dict[str, float]) -> str:
    """{'CPU': 1.0, 'slot': 1.0} -> '{CPU: 1, slot: 1}'."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"
