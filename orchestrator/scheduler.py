"""The orchestrator: turns the queue in the job store into worker groups on Ray, and watches them.

One scheduling pass (`Orchestrator.tick`), every `poll_s`:

    requeue_stale     running jobs whose heartbeats stopped go back to the queue
    watch groups      a dead group's jobs are released (an attempt counted) and resume in a new group;
                      a group idle for idle_timeout_s is asked to stop
    start groups      per base model with queued work, highest priority first: reserve a group's ranks
                      together (a Ray placement group) within max_groups and the base's own limit; until
                      it fits, the base's queued jobs say what they wait for
    register          succeeded jobs' runs completed and registered in MLflow (orchestrator/registry/),
                      with backoff while it is down; runs of jobs that ended without their group, ended

`run_until_empty` repeats it until nothing is queued or running (`prefixd run`), `serve` until stopped
(`prefixd serve`). Groups claim jobs from the store themselves, so new jobs join a training group between
steps. With `ray_address` None a private loopback Ray is started (orchestrator/local_ray.py). Group shapes
and gang scheduling: docs/design.md.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from orchestrator.config import GroupShape, OrchestratorConfig, machine_local_uri, mlflow_database_uri, mlflow_fail_fast
from orchestrator.errors import first_line
from orchestrator.group import start_group
from orchestrator.group_settings import GroupSettings
from orchestrator.local_ray import start_local_ray
from orchestrator.placement import Reservation, describe, release
from orchestrator.registrar import Registrar
from orchestrator.store import FINAL_STATES, InvalidTransition, Job, JobStore

log = logging.getLogger("prefixd.orchestrator")
RESERVATION_GRACE_S = 2.0  # a reservation pending longer than this is reported as waiting (with its shortfall)


@dataclass
class _Group:
    base_key: str
    owner: str
    actor: Any
    run_ref: Any
    started_at: float
    followers: list[Any] = field(default_factory=list)
    placement_group: Any = None
    capacity: int = 1
    ping_ref: Any = None
    status: dict[str, Any] | None = None
    stopping: bool = False

    def free(self) -> int:
        """Jobs it can still claim (by its last status; all of its capacity before the first)."""
        return self.capacity - len(self.status["held"]) if self.status else self.capacity


class Unschedulable(RuntimeError):
    """A worker group that cannot be placed on this Ray at all (batch mode on a private local Ray)."""


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What a batch run did: the final row of every job it saw, and the groups it started."""

    jobs: dict[str, Job] = field(default_factory=dict)
    groups_started: int = 0
    group_failures: int = 0
    model_loads: int = 0

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs.values() if j.state == state)


class Orchestrator:
    """Schedules the store's queued jobs onto worker groups (see the module docstring).

    Use as a context manager, or call `close()`: it stops the groups (their jobs go back to the queue)
    and shuts down a Ray it started.
    """

    def __init__(self, config: OrchestratorConfig):
        self.config = config
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.store = JobStore(config.store_url)
        self.groups: dict[str, _Group] = {}  # owner -> a running group
        self.reservations: dict[str, Reservation] = {}  # owner-to-be -> ranks being reserved
        self._waits: dict[str, str] = {}  # base_key -> what its queued jobs wait for (also in the store)
        self.groups_started = 0
        self.group_failures = 0
        self._loads: dict[str, int] = {}  # group owner -> model loads it reported
        self._owns_ray = False
        self._waiting_logged: set[str] = set()
        self._said_no_live_runs = False
        self._seen: set[str] = set()
        self._ended_jobs: dict[str, Job] = {}  # final rows of jobs seen this run (they do not change)
        self._log_handler = _file_handler(config.logs_dir / "orchestrator.log")
        self.registrar = Registrar(self.store, self.config.tracking_uri, self.id)
        mlflow_fail_fast()  # register_pending retries with its own backoff

    # ---- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        """Start or join Ray (idempotent)."""
        if ray.is_initialized():
            return
        if self.config.ray_address:
            ray.init(address=self.config.ray_address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            start_local_ray(self.config.num_cpus)
        self._owns_ray = True
        log.info("orchestrator %s on Ray %s", self.id, ray.get_runtime_context().gcs_address)

    def close(self) -> None:
        """Stop every group; jobs they held go back to the queue (resumable from their checkpoints), without
        an attempt charged where the group drains in time (`drain`)."""
        self.drain("the orchestrator stopped")
        self._cancel_reservations(set(self.reservations))
        self._publish_waits({})
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
        self.store.close()
        logging.getLogger("prefixd").removeHandler(self._log_handler)
        self._log_handler.close()

    def group_statuses(self) -> dict[str, dict[str, Any]]:
        """owner -> the last status each live group reported (base_key, pid, state, loads, held jobs, idle_s)."""
        return {key: dict(g.status) for key, g in list(self.groups.items()) if g.status is not None}

    @property
    def model_loads(self) -> int:
        """Base-model loads reported by every group this orchestrator started."""
        return sum(self._loads.values())

    # ---- the two modes ----------------------------------------------------------------------------

    def run_until_empty(
        self, progress_callback: Callable[[list[Job]], None] | None = None, stop_event: threading.Event | None = None
    ) -> RunSummary:
        """Schedule until no job is queued or running, or `stop_event` is set (then the groups drain: their
        jobs are queued again, checkpointed, with no attempt charged); returns every job seen.

        progress_callback(jobs) is called after each pass with the current rows of the jobs seen so far
        (queued, running, and those that ended during this run).
        """
        self.connect()
        while True:
            self.tick()
            self._check_feasible()
            jobs = self._watched_jobs()
            if progress_callback is not None:
                progress_callback(jobs)
            if not self.store.queued_base_keys() and not self.store.list(state="running"):
                break
            if stop_event is not None and stop_event.wait(self.config.poll_s):
                self.drain("the batch run was stopped")
                break
            if stop_event is None:
                time.sleep(self.config.poll_s)
        for group in list(self.groups.values()):
            self._remove(group, "the batch is done", kill=True)
        self._cancel_reservations(set(self.reservations))
        self._register_finished(now=True)
        jobs = self._watched_jobs()
        if progress_callback is not None:
            progress_callback(jobs)
        return RunSummary(
            jobs={j.id: j for j in jobs},
            groups_started=self.groups_started,
            group_failures=self.group_failures,
            model_loads=self.model_loads,
        )

    def serve(self, stop_event: threading.Event | None = None) -> None:
        """Schedule until `stop_event` is set (or KeyboardInterrupt); groups are stopped on the way out."""
        stop_event = stop_event or threading.Event()
        self.connect()
        log.info("orchestrator %s serving", self.id)
        try:
            while not stop_event.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - e.g. the store briefly unreachable: a service keeps going
                    log.exception("scheduling pass failed; retrying")
                stop_event.wait(self.config.poll_s)
        finally:
            self.drain("the orchestrator stopped")
            self._cancel_reservations(set(self.reservations))

    # ---- one pass ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """One scheduling pass (see the module docstring)."""
        for job_id in self.store.requeue_stale(self.config.stale_after_s):
            log.warning("job %s: heartbeats stopped; taken back from its dead orchestrator", job_id)
        self._watch_groups()
        self._start_groups()
        self._register_finished()

    def _register_finished(self, *, now: bool = False) -> None:
        """One registrar pass (orchestrator/registrar.py), unless registration is off."""
        if self.config.register:
            self.registrar.run(now=now)

    def _watch_groups(self) -> None:
        for group in list(self.groups.values()):
            done, _ = ray.wait([group.run_ref], timeout=0)
            if done:
                self._ended(group)
            elif group.ping_ref is None:
                group.ping_ref = group.actor.status.remote()
        pending = [g.ping_ref for g in self.groups.values() if g.ping_ref is not None]
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=min(1.0, self.config.poll_s))
        for group in list(self.groups.values()):
            if group.ping_ref is None or not ray.wait([group.ping_ref], timeout=0)[0]:
                continue
            try:
                group.status = ray.get(group.ping_ref)
            except RayActorError as e:
                self._died(group, e)
                continue
            finally:
                group.ping_ref = None
            self._loads[group.owner] = group.status["loads"]
            if not group.stopping and group.status["idle_s"] >= self.config.idle_timeout_s and self._ask_stop(group):
                log.info(
                    "group %s for %s: idle for %.0f s, released", group.owner, group.base_key, group.status["idle_s"]
                )

    def _start_groups(self) -> None:
        self._start_reserved()
        waits: dict[str, str] = {}
        queued = self.store.queued_base_keys()
        self._cancel_reservations(
            {owner for owner, r in self.reservations.items() if r.base_key not in {base for base, _ in queued}}
        )
        for base_key, count in queued:
            shape = self.config.shape_for(base_key)
            mine = [g for g in self.groups.values() if g.base_key == base_key]
            pending = [r for r in self.reservations.values() if r.base_key == base_key]
            if pending:  # one reservation at a time per base
                if time.time() - pending[0].since >= RESERVATION_GRACE_S:
                    waits[base_key] = pending[0].shortfall()
                    self._free_an_idle_slot(base_key)
                continue
            if any(g.stopping for g in mine):
                continue  # a new group starts once the stopping one has gone (one copy loaded at a time)
            if mine and (count <= sum(g.free() for g in mine) or len(mine) >= shape.max_groups):
                continue  # its groups claim them (or they wait for a slot in one of them)
            if len(self.groups) + len(self.reservations) >= self.config.max_groups:
                waits[base_key] = f"waiting for a worker group: all {self.config.max_groups} group slots are busy"
                if base_key not in self._waiting_logged:
                    log.info(
                        "%d job(s) for %s wait: all %d group slots are busy", count, base_key, self.config.max_groups
                    )
                    self._waiting_logged.add(base_key)
                self._free_an_idle_slot(base_key)
                continue
            self._waiting_logged.discard(base_key)
            self._reserve(base_key, shape)  # started by a later pass, once Ray has placed every rank
        self._publish_waits(waits)

    def _reserve(self, base_key: str, shape: GroupShape) -> None:
        """Ask Ray for every rank of a new group at once (a placement group); never waits."""
        self.groups_started += 1
        owner = f"{self.id}/g{self.groups_started}"
        self.reservations[owner] = Reservation.ask(
            base_key, shape, cpus_per_rank=self._cpus_per_rank(shape), name=f"prefixd-{owner}"
        )

    def _start_reserved(self) -> None:
        """Start the groups whose ranks are all reserved now."""
        for owner, r in list(self.reservations.items()):
            if not r.ready():
                continue
            del self.reservations[owner]
            cfg, shape = self.config, r.shape
            settings = GroupSettings(
                base_key=r.base_key,
                owner=owner,
                store_url=cfg.store_url,
                jobs_dir=str(cfg.jobs_dir),
                data_cache=str(cfg.data_cache),
                model_cache=str(cfg.model_cache),
                capacity=cfg.group_capacity,
                micro_batch_size=cfg.micro_batch_size,
                heartbeat_s=cfg.heartbeat_s,
                poll_s=min(cfg.poll_s, 1.0),
                world=shape.workers_per_group,
                zero_stage=shape.zero_stage,
                zero_offload=shape.zero_offload,
                zero_persistence_threshold=cfg.zero_persistence_threshold,
                compile_layers=cfg.compile_layers,
                cpus_per_rank=r.bundles[0]["CPU"],
                spec_bounds=dict(cfg.spec_bounds),
                tracking_uri=self._live_tracking_uri(r),
                tracking_every_s=cfg.tracking_every_s,
            )
            actor, run_ref, followers = start_group(settings, r.placement_group, bundles=r.bundles)
            self.groups[owner] = _Group(
                r.base_key, owner, actor, run_ref, time.time(), followers, r.placement_group, cfg.group_capacity
            )
            log.info(
                "group %s started for %s (%d rank(s), ZeRO stage %d, %s per rank)",
                owner,
                r.base_key,
                shape.workers_per_group,
                shape.zero_stage,
                describe(r.bundles[0]),
            )

    def _live_tracking_uri(self, r: Reservation) -> str | None:
        """Where a new group's live runs write: the tracking URI, its database set up here first (so no
        group is its first opener: `prepare_tracking_store`); None without registration, or for a group off
        this node when the URI is a file on this machine (its jobs are logged when they end). While MLflow
        is down the group starts anyway: its live runs retry."""
        uri = self.config.tracking_uri
        if not self.config.register:
            return None
        if machine_local_uri(uri) and r.node_ids() - {ray.get_runtime_context().get_node_id()}:
            if not self._said_no_live_runs:
                log.warning("no live MLflow runs for groups on other nodes: %s is a file on this machine", uri)
                self._said_no_live_runs = True
            return None
        if mlflow_database_uri(uri):  # a tracking server sets its own up (and MLflow is not imported here)
            from orchestrator import registry

            try:
                registry.prepare_tracking_store(uri)
            except Exception as e:  # noqa: BLE001 - never holds training back
                log.warning("MLflow at %s is not ready: %s", uri, first_line(e))
        return uri

    def _cpus_per_rank(self, shape: GroupShape) -> float:
        """The shape's CPUs per rank; unset: with a local Ray, its CPUs split across one group's ranks (a
        single group gets the machine), on a cluster 1."""
        if shape.cpus_per_group is not None:
            return float(shape.cpus_per_group)
        if self.config.ray_address:
            return 1.0
        total = ray.cluster_resources().get("CPU", 1.0)
        return float(max(1, int(total // shape.workers_per_group)))

    def _check_feasible(self) -> None:
        """Batch mode on a private local Ray (no node can join it): a group whose ranks need more than the
        whole machine offers would wait forever. Raise Unschedulable naming it; its jobs stay queued."""
        if not self._owns_ray or self.config.ray_address:
            return
        for r in self.reservations.values():
            why = r.impossible()
            if why:
                raise Unschedulable(
                    f"{why}. Change the group settings (--workers-per-group, --gpus-per-worker, --cpus-per-group, "
                    "--group-shapes) or join a cluster (--ray-address); the jobs stay queued"
                )

    def _cancel_reservations(self, owners: set[str]) -> None:
        for owner in owners:
            self.reservations.pop(owner).release()

    def _publish_waits(self, waits: dict[str, str]) -> None:
        """Tell the store what each base model's queued jobs wait for (shown by `prefixd status`)."""
        for base_key in set(self._waits) | set(waits):
            if self._waits.get(base_key) != waits.get(base_key):
                try:
                    self.store.set_waiting(base_key, waits.get(base_key))
                except Exception:  # noqa: BLE001 - a store hiccup: it is only a hint; the next pass retries
                    log.warning("could not record what %s waits for", base_key, exc_info=True)
                    continue
                if base_key in waits:
                    log.info("queued jobs of %s: %s", base_key, waits[base_key])
                self._waits[base_key] = waits.get(base_key)
        self._waits = {k: v for k, v in self._waits.items() if v is not None}

    def drain(self, reason: str) -> None:
        """Stop every group gracefully: each finishes its step, checkpoints its tasks and hands their jobs
        back without charging an attempt, within `drain_timeout_s`; then the actors go. A group that does not
        make it in time is killed and its jobs released with an attempt counted (`reason`)."""
        refs = []
        for group in self.groups.values():
            try:
                group.actor.drain.remote()
                refs.append(group.run_ref)
            except RayError:
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.config.drain_timeout_s)
        for group in list(self.groups.values()):
            self._remove(group, reason, kill=True)

    def _free_an_idle_slot(self, base_key: str) -> None:
        """Another base model waits (for a slot or for resources): stop one group of another base that has
        nothing to do, without waiting for its idle timeout."""
        for group in self.groups.values():
            if (
                group.base_key != base_key
                and not group.stopping
                and group.status
                and group.status["idle_s"] > 0
                and self._ask_stop(group)
            ):
                log.info("group %s for %s: idle, released for a waiting base model", group.owner, group.base_key)
                return

    def _ask_stop(self, group: _Group) -> bool:
        try:
            group.stopping = ray.get(group.actor.stop.remote(only_if_idle=True), timeout=30)
        except (RayError, GetTimeoutError):
            return False
        return group.stopping

    # ---- groups ending ----------------------------------------------------------------------------

    def _ended(self, group: _Group) -> None:
        try:
            summary = ray.get(group.run_ref)
        except RayActorError as e:
            self._died(group, e)
            return
        except RayError as e:  # the loop raised: it has released its jobs itself
            self.group_failures += 1
            log.error("group %s for %s failed: %s", group.owner, group.base_key, first_line(e))
            self._remove(group, f"its worker group failed: {first_line(e)}", kill=True)
            return
        self._loads[group.owner] = summary["loads"]
        self._remove(group, "its worker group stopped", kill=True)

    def _died(self, group: _Group, error: Exception) -> None:
        self.group_failures += 1
        log.error("group %s for %s died: %s", group.owner, group.base_key, first_line(error))
        self._remove(group, f"its worker group died ({first_line(error)})", kill=False)

    def _remove(self, group: _Group, reason: str, *, kill: bool) -> None:
        """Forget a group; kill its actor; release any job it still held (an attempt is counted, and a job
        out of attempts fails with `reason`)."""
        # Followers always go: with rank 0 gone they would wait in a collective until it times out.
        for actor in ([group.actor] if kill else []) + group.followers:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass
        self.groups.pop(group.owner, None)
        if group.placement_group is not None:
            release(group.placement_group)
        for job in self.store.list(state="running"):
            if job.owner != group.owner:
                continue
            try:
                self.store.release(job.id, reason)
            except InvalidTransition:
                continue
            log.warning("job %s: released (%s)", job.id, reason)

    # ---- progress ---------------------------------------------------------------------------------

    def _watched_jobs(self) -> list[Job]:
        """Rows of every job queued or running now or at an earlier pass of this run, in submission order."""
        live = {j.id: j for j in self.store.list(state="queued") + self.store.list(state="running")}
        self._seen.update(live)
        for job_id in self._seen - set(live) - set(self._ended_jobs):
            job = self.store.get(job_id)
            if job.state in FINAL_STATES:
                self._ended_jobs[job_id] = job
            else:  # moved between the two reads above
                live[job_id] = job
        rows = list(live.values()) + list(self._ended_jobs.values())
        return sorted(rows, key=lambda j: (j.created_at, j.id))


def _file_handler(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("prefixd")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
