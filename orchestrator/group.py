"""A worker group: one Ray actor (rank 0, plus followers) per copy of a base model, training every job of that
model it can hold at once; it loads the base model on its first job and keeps it while jobs come and go.

Its loop (`WorkerGroup.run`, one long actor call) reads top to bottom:

    claim queued jobs of its base_key (up to capacity - active)
      -> add_task each (a job that cannot start is released with its error; the others are untouched)
    step()                                      one optimizer step of every active task
      -> update_progress per task               True = cancel asked: remove_task + finish 'cancelled'
      -> finished tasks: result.json, finish 'succeeded'
    repeat; stop when the scheduler asks and nothing is active.

A heartbeat thread keeps the held jobs' heartbeats fresh through long steps; each job's MLflow run follows
it (`orchestrator/live_runs.py`). Ranks start together in their placement group (`start_group`); followers
run `workers/ranks.py`. A job's folder is the same on every attempt and node (`workers/results.py`), so
every job completes exactly once: docs/design.md.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

import ray

from orchestrator.group_settings import GroupSettings
from orchestrator.live_runs import LiveRuns
from orchestrator.patient_store import PatientStore
from orchestrator.store import InvalidTransition, JobStore, UnknownJob
from workers.results import completed_result, finite, job_folder, write_result

log = logging.getLogger("prefixd.group")


class WorkerGroup:
    """The actor's body (see the module docstring). Use `start_group` to run it as a Ray actor."""

    def __init__(self, settings: GroupSettings):
        self.s = settings
        self.loads = 0
        """Base-model loads in this actor: 1 after the first job, and it stays 1."""
        self.steps = 0
        self.state = "starting"  # starting | loading | training | idle | stopped | failed
        self.trainer = None
        self.store = None
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # job id -> attempt number of our claim
        self._lost: set[tuple[str, int]] = set()  # (job id, attempt) the store no longer gives us
        self._stopping = False
        self._draining = False
        self._idle_since: float | None = None
        self._done = threading.Event()
        self.channel = None  # workers.ranks.GroupChannel, once the ranks have met
        self._rendezvous: tuple[str, int] | None = None
        self._store = None  # the rendezvous store rank 0 hosts, alive as long as the group
        self.last_step: dict[str, float] = {}  # tokens/s, tasks and peak memory of the latest step
        self.placed: dict[str, Any] = {}  # rank 0's device and torch threads, once the ranks have met
        self.live = LiveRuns(None, on_run=_nothing, warn=_nothing)  # the jobs' MLflow runs, made in `run`

    # ---- calls from the scheduler (run concurrently with `run`) -----------------------------------

    def rendezvous(self) -> tuple[str, int]:
        """Where the group's process group meets: this node's address and the port of the store rank 0
        hosts there (bound as it is opened, so no other process can take the port first)."""
        if self._rendezvous is None:
            from workers.ranks import host_rendezvous

            addr = ray.util.get_node_ip_address()
            self._store, port = host_rendezvous(addr, self.s.world)
            self._rendezvous = (addr, port)
        return self._rendezvous

    def status(self) -> dict[str, Any]:
        """A ping: what the group holds and whether it is idle (idle_s > 0: no task, nothing to claim)."""
        with self._lock:
            idle = 0.0
            if self._idle_since is not None and not self._held:
                idle = time.monotonic() - self._idle_since
            return dict(
                base_key=self.s.base_key,
                owner=self.s.owner,
                pid=os.getpid(),
                state=self.state,
                loads=self.loads,
                steps=self.steps,
                held=sorted(self._held),
                idle_s=idle,
                stopping=self._stopping,
                last_step=dict(self.last_step),
                **self.placed,
                node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            )

    def stop(self, only_if_idle: bool = True) -> bool:
        """Ask the loop to end. With only_if_idle, refused (False) while the group holds any job; else it
        stops claiming and ends once its active tasks are done."""
        with self._lock:
            if only_if_idle and self._held:
                return False
            self._stopping = True
            return True

    def drain(self) -> bool:
        """Stop at the next step boundary: checkpoint every active task and hand its job back to the queue
        without charging an attempt (a graceful stop of the service); then the loop ends."""
        with self._lock:
            self._draining = self._stopping = True
        return True

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self, followers: list | tuple = ()) -> dict[str, Any]:
        """Host the rendezvous, start the followers' loops (ranks 1.., in order), then train until stopped;
        returns a summary. Raises (after releasing every held job) on a failure of the group itself, such as
        a step that raises."""
        from workers.ranks import GroupChannel, quiet_datasets

        quiet_datasets()
        rendezvous = self.rendezvous()
        for rank, follower in enumerate(followers, start=1):
            follower.run.remote(self.s, rank, rendezvous)
        self.store = PatientStore(JobStore(self.s.store_url), self.s.store_patience_s)
        self.live = LiveRuns(
            self.s.tracking_uri,
            on_run=self.store.set_run_id,
            warn=lambda job_id, text: self.store.log(job_id, text, "warning"),
            every_s=self.s.tracking_every_s,
        )
        beat = threading.Thread(target=self._heartbeats, name="heartbeats", daemon=True)
        beat.start()
        last_claim = -math.inf
        try:
            # Waits for the followers: their actors exist already (their placement group is reserved).
            self.channel = GroupChannel.join(0, self.s.ranks(), rendezvous, store=self._store)
            import torch

            with self._lock:
                self.placed = dict(device=str(self.channel.device), threads=torch.get_num_threads())
            while True:
                if self._draining:
                    self._hand_back_all()
                    break
                with self._lock:
                    active = len(self.trainer.active) if self.trainer else 0
                    if self._stopping and not self._held:
                        break
                    jobs = []
                    free = self.s.capacity - len(self._held)
                    due = not active or time.monotonic() - last_claim >= self.s.poll_s
                    if free > 0 and due and not self._stopping:
                        jobs = self.store.claim(self.s.owner, base_key=self.s.base_key, limit=free)
                        last_claim = time.monotonic()
                        self._held.update((j.id, j.attempts) for j in jobs)
                for job in jobs:
                    self._admit(job)
                self._drop_lost()
                if not (self.trainer and self.trainer.active):
                    with self._lock:
                        if self._idle_since is None:
                            self._idle_since = time.monotonic()
                        self.state = "idle"
                    time.sleep(self.s.poll_s)
                    self.channel.keepalive()
                    continue
                with self._lock:
                    self._idle_since = None
                    self.state = "training"
                report = self.trainer.step()
                self.steps += 1
                self._record(report)
        except BaseException as e:
            self.state = "failed"
            if self.channel is not None:
                self.channel.broken = True
            self._release_all(f"worker group {self.s.owner} failed: {type(e).__name__}: {e}")
            raise
        else:
            self.channel.send(("stop",))
        finally:
            self._done.set()
            self.live.close()
            beat.join(timeout=self.s.heartbeat_s + 5)
            self.store.close()
        self.state = "stopped"
        return dict(owner=self.s.owner, base_key=self.s.base_key, loads=self.loads, steps=self.steps)

    # ---- admitting a job --------------------------------------------------------------------------

    def _admit(self, job) -> None:
        """Start training a claimed job, or record a result an earlier attempt left, or release it."""
        # Imported here, in the actor: they pull in torch and transformers, which the scheduler never needs.
        from jobs.bounds import SpecBounds
        from jobs.spec import JobSpec
        from orchestrator.plan import base_model_ref, task_config

        job_dir = job_folder(self.s.jobs_dir, job.id)
        try:
            previous = completed_result(job_dir, job.id)
        except OSError as e:  # StorageError: the storage cannot be read now; another attempt will look again
            self._release(job.id, f"cannot read its job folder: {e}")
            return
        if previous is not None:
            self.store.log(
                job.id, f"the result of an earlier attempt is complete in {job_dir}; recorded without training again"
            )
            self._finish(job.id, "succeeded", result_dir=job_dir)
            return
        over = SpecBounds(self.s.spec_bounds).exceeded(job.spec)
        if over:  # queued under looser bounds, or written to the store by other means: its own fault, for good
            error = "its spec is over the bounds in force: " + "; ".join(over)
            self.store.log(job.id, f"worker group {self.s.owner}: {error}", "error")
            self._finish(job.id, "failed", error=error, run_id=job.run_id)  # a run an earlier attempt opened
            return
        try:
            spec = JobSpec.from_dict(job.spec)
            if self.trainer is None:
                self._load_model(base_model_ref(spec))
            progress = self.trainer.add_task(task_config(spec, job.id, job_dir))
        except _ModelLoadFailed as e:
            # Every held job waits on this model: release them all; the scheduler starts a new group.
            self._release_all(str(e))
            raise
        except Exception as e:  # noqa: BLE001 - any error here belongs to this job alone
            self._release(job.id, f"cannot start training: {type(e).__name__}: {e}")
            return
        where = (
            f"resumed from the checkpoint at step {progress.step} of {progress.total_steps}"
            if progress.step > 0
            else f"started at step 0 of {progress.total_steps}"
        )
        layers = ""
        if self.s.compile_layers:  # asked for: say whether the model could take them
            note = self.trainer.trainer.compile_note
            layers = "; compiled layers" if note is None else f"; eager layers, not compiled: {note}"
        self.store.log(job.id, f"{where} in worker group {self.s.owner} (pid {os.getpid()}){layers}")
        self.live.open(job, spec)
        if self._progress(job.id, progress):  # cancelled while it was being set up
            self.trainer.remove_task(job.id)
            self.store.log(job.id, f"stopped at step {progress.step} of {progress.total_steps} (cancelled)")
            self._finish(job.id, "cancelled")

    def _load_model(self, ref) -> None:
        with self._lock:
            self.state = "loading"
        self.channel.send(("load", ref))
        try:
            self.trainer = self.channel.load(ref)
            self.trainer.trainer.on_checkpoint = self.live.checkpoint  # checkpoints into the jobs' live runs
        except Exception as e:  # noqa: BLE001
            raise _ModelLoadFailed(f"cannot load base model {self.s.base_key}: {type(e).__name__}: {e}") from e
        self.loads += 1

    # ---- after a step -----------------------------------------------------------------------------

    def _record(self, report) -> None:
        with self._lock:
            self.last_step = dict(
                tokens_per_s=report.tokens_per_s,
                tasks=len(report.progress),
                peak_memory_mib=report.peak_memory_bytes / 2**20,
            )
        for job_id, warning in report.warnings.items():
            self.store.log(job_id, warning, "warning")
        for job_id, error in report.failed.items():  # its own failure: this job alone ends, for good
            self.store.log(job_id, f"failed in worker group {self.s.owner}, which trains on: {error}", "error")
            self._finish(job_id, "failed", error=error)
        finished = {r.task_id: r for r in report.finished}
        for job_id, progress in report.progress.items():
            cancel = self._progress(job_id, progress)
            if cancel is None:
                continue
            if job_id in finished:
                result = finished[job_id]
                job_dir = job_folder(self.s.jobs_dir, job_id)
                write_result(job_dir, result)
                early = " (early stopping: its metric stopped improving)" if result.stopped_early else ""
                self.store.log(
                    job_id,
                    f"finished at step {progress.step}{early}; the group was at "
                    f"{report.tokens_per_s:.0f} tokens/s over {len(report.progress)} task(s), "
                    f"peak memory {report.peak_memory_bytes / 2**20:.0f} MiB",
                )
                self._finish(job_id, "succeeded", result_dir=job_dir)
            elif cancel:
                self.trainer.remove_task(job_id)
                self.store.log(job_id, f"stopped at step {progress.step} of {progress.total_steps} (cancelled)")
                self._finish(job_id, "cancelled")
            else:
                self._track(job_id, progress)

    def _track(self, job_id: str, progress) -> None:
        """The step's history record (the trainer's own, so the live run's series are history.jsonl's)
        to the job's live run."""
        if not self.live.enabled:
            return
        task = self.trainer.trainer.tasks.get(job_id)
        if task is None or not task.history or task.history[-1].get("step") != progress.step:
            return
        self.live.record(job_id, task.history[-1])

    def _progress(self, job_id: str, progress) -> bool | None:
        """Store a task's progress; True if a cancel was asked, None if the job is no longer ours."""
        if progress.eval:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(progress.eval.items()))
            self.store.log(job_id, f"step {progress.step}: {metrics}")
        try:
            return self.store.update_progress(
                job_id,
                step=progress.step,
                total_steps=progress.total_steps,
                loss=finite(progress.loss),
                tokens_per_s=finite(progress.tokens_per_s),
                examples_per_s=finite(progress.examples_per_s),
                eval=progress.eval,
            )
        except (InvalidTransition, UnknownJob) as e:
            self._forget(job_id, f"no longer this group's job ({e}); stopped training it")
            return None

    def _drop_lost(self) -> None:
        with self._lock:
            lost = [job_id for job_id, attempt in self._lost if self._held.get(job_id) == attempt]
            self._lost.clear()
        for job_id in lost:
            self._forget(
                job_id, "the store gave this job to another worker (heartbeats were late); stopped training it here"
            )

    def _forget(self, job_id: str, message: str) -> None:
        if self.trainer and job_id in self.trainer.active:
            self.trainer.remove_task(job_id)
        self.live.leave(job_id)
        with self._lock:
            self._held.pop(job_id, None)
        try:
            self.store.log(job_id, message, "warning")
        except Exception:  # noqa: BLE001 - the job may be gone; nothing else to tell
            pass

    def _finish(self, job_id: str, state: str, *, run_id: str | None = None, **kw) -> None:
        """Record the job's end (`JobStore.finish`) and end its MLflow run with it: a succeeded job's is the
        registrar's to complete; a failed or cancelled one's ends FAILED (with the error) or KILLED, also
        the run `run_id` an earlier attempt opened when this attempt has none."""
        try:
            self.store.finish(job_id, state, **kw)
        except InvalidTransition as e:
            self.store.log(job_id, f"could not record {state}: {e}", "warning")
        with self._lock:
            self._held.pop(job_id, None)
        if state == "succeeded":
            self.live.finish(job_id)
        else:
            self.live.end(job_id, "FAILED" if state == "failed" else "KILLED", kw.get("error"), run_id=run_id)

    def _release(self, job_id: str, error: str) -> None:
        if self.trainer and job_id in self.trainer.active:
            self.trainer.remove_task(job_id)
        self.live.leave(job_id)  # queued again, or out of attempts: the registrar ends its run
        try:
            self.store.log(job_id, f"worker group {self.s.owner}: {error}", "error")
            self.store.release(job_id, error)
        except (InvalidTransition, UnknownJob):
            pass
        with self._lock:
            self._held.pop(job_id, None)

    def _hand_back_all(self) -> None:
        """Checkpoint each held job's task and queue the job again without charging its attempt."""
        with self._lock:
            held = list(self._held)
        for job_id in held:
            where = "before it started training"
            if self.trainer and job_id in self.trainer.active:
                where = f"checkpointed at step {self.trainer.checkpoint(job_id)}"
                self.trainer.remove_task(job_id)
            self.live.leave(job_id)
            try:
                self.store.hand_back(job_id, f"worker group {self.s.owner} stopped gracefully ({where})")
            except (InvalidTransition, UnknownJob):
                pass
            with self._lock:
                self._held.pop(job_id, None)

    def _release_all(self, error: str) -> None:
        with self._lock:
            held = list(self._held)
        for job_id in held:
            try:
                self._release(job_id, error)
            except Exception:  # noqa: BLE001 - the store may be what failed; stale requeue covers it
                pass

    # ---- heartbeats -------------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        while not self._done.wait(self.s.heartbeat_s):
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                still = set(self.store.heartbeat(self.s.owner, held))
            except Exception:  # noqa: BLE001 - a store hiccup; the next beat retries
                continue
            with self._lock:
                self._lost.update((j, a) for j, a in held.items() if j not in still)


class _ModelLoadFailed(RuntimeError):
    pass


def _nothing(*_args) -> None:
    pass


# ---- the group's actors on Ray --------------------------------------------------------------------------


@ray.remote
class _RemoteFollower:
    """Ray's shell around `workers.ranks.GroupFollower` (ranks 1..): torch is imported in the actor's process
    only, never in the scheduler's."""

    def __init__(self):
        from workers.ranks import GroupFollower

        self._body = GroupFollower()

    def pid(self) -> int:
        return self._body.pid()

    def run(self, settings: GroupSettings, rank: int, rendezvous: tuple[str, int]) -> dict[str, Any]:
        return self._body.run(settings, rank, rendezvous)


_RemoteWorkerGroup = ray.remote(WorkerGroup)


def start_group(
    settings: GroupSettings, placement_group, *, bundles: list[dict[str, float]], runtime_env: dict | None = None
):
    """Create the group's actors in its (ready) placement group, one per bundle, and start rank 0's loop,
    which starts the followers' once it hosts the rendezvous. Never waits on Ray: returns (rank-0 actor,
    its loop's ObjectRef, [follower actors]) at once.

    The loop's ref resolves with a summary when the group stops, and raises RayActorError when the
    actor's process dies (or RayTaskError when the loop itself failed, e.g. because a follower died and
    the group's collectives broke). Followers are killed with the group by the scheduler.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def options(index: int, concurrency: int) -> dict[str, Any]:
        bundle = bundles[index]
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        # No Ray restarts: a dead group's jobs must be released (an attempt counted) before a new group takes them.
        out: dict[str, Any] = dict(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            max_restarts=0,
            max_concurrency=concurrency,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=index
            ),
        )
        if custom:
            out["resources"] = custom
        if runtime_env:
            out["runtime_env"] = runtime_env
        return out

    # max_concurrency: status() and stop() answer while run() occupies one thread.
    actor = _RemoteWorkerGroup.options(**options(0, 4)).remote(settings)
    followers = [_RemoteFollower.options(**options(rank, 2)).remote() for rank in range(1, settings.world)]
    return actor, actor.run.remote(followers), followers
