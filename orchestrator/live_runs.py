"""Live MLflow runs: a worker group's jobs tracked while they train.

    live = LiveRuns(uri, on_run=store.set_run_id, warn=lambda job_id, text: store.log(job_id, text, "warning"))
    live.open(job, spec)                             # the job's run is created, or reused on a later attempt
    live.record(job_id, {"step": 3, "loss": 1.2, "learning_rate": 0.02, ...})
    live.checkpoint(job_id, 3, staged_checkpoint)    # its prefix goes to the run as checkpoints/step-000000003
    live.end(job_id, "FAILED", "loss is not finite")  # or "KILLED" (cancelled); `leave` keeps the run RUNNING
    live.close()                                     # what is pending is written; the thread stops

The run is the job's one run (`orchestrator.registry.tracking.open_job_run`: same experiment, tags, params
and ownership rules as the registrar's), and its id goes to the store (`on_run`). A step's metrics are its
history.jsonl record (loss, learning_rate, tokens, tokens_per_s, ..., evaluations at their step), so the
series are the ones the registrar completes from history.jsonl when the job succeeds (`finish` leaves the
rest to it: it logs every step the run lacks). System metrics of the group's process go with each job's
points at its latest step: system/cpu_percent, system/rss_mib, and system/gpu_memory_allocated_mib and
system/gpu_memory_reserved_mib on CUDA. Each checkpoint the trainer writes (`MultiTaskTrainer.on_checkpoint`)
becomes an artifact of the run, its prefix as a PEFT adapter under `checkpoints/step-<step, 9 digits>/`, and
then tag prefixd.checkpoint_step says the newest one there. The optimizer state stays in the job's storage
only. An upload not yet done when a newer checkpoint comes is dropped (only the newest waits), and one
pending when the job succeeds too: its result's best and final prefixes are what the registrar logs.

Every MLflow call happens on one background thread, once per `every_s` (one log_batch per job then), so
co-tenants do not flood the tracking server and the training loop only appends to buffers: an MLflow error
never reaches it. An error becomes a warning event of the job (at most one per `warn_every_s`), and the next
round tries again; meanwhile records wait (at most `max_records` per job, the oldest dropped first). A reused
run gets only the steps after the last one it has (a resumed attempt trains some steps again). MLflow is
imported on that thread, never by the training loop; with `uri` None every call does nothing.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("prefixd.live_runs")
ENDED = ("FAILED", "KILLED")
CHECKPOINT_TAG = "prefixd.checkpoint_step"  # on a training job's run: the step of its newest checkpoint artifact
CHECKPOINT_ARTIFACTS = "checkpoints"  # the run's artifact folder of checkpoint prefixes: step-<step:09d>/


@dataclass
class _Job:
    job: Any  # orchestrator.store.Job (its id, tenant and run id); None for a run only to be ended
    spec: Any  # jobs.spec.JobSpec
    run_id: str | None = None
    last_step: int = -1
    """Steps up to this one are in the run."""
    step: int = 0
    """The latest step recorded."""
    system_step: int = -1
    """The step at which the system metrics were last written."""
    records: list[Mapping[str, Any]] = field(default_factory=list)
    checkpoint: tuple[int, Path] | None = None
    """The newest checkpoint not yet in the run: (step, a local PEFT adapter folder of its prefix)."""
    end: tuple[str, str | None] | None = None
    leaving: bool = False
    warned_at: float = -math.inf


class LiveRuns:
    """The live runs of one worker group's jobs (see the module docstring). Thread-safe."""

    def __init__(
        self,
        uri: str | None,
        *,
        on_run: Callable[[str, str], None],
        warn: Callable[[str, str], None],
        every_s: float = 5.0,
        warn_every_s: float = 300.0,
        max_records: int = 10_000,
    ):
        self.uri, self.every_s, self.warn_every_s, self.max_records = uri, every_s, warn_every_s, max_records
        self._on_run, self._warn = on_run, warn
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._client = None
        self._process = None  # psutil.Process, for the system metrics

    @property
    def enabled(self) -> bool:
        return self.uri is not None

    # ---- calls from the training loop: they only touch buffers -------------------------------------

    def open(self, job, spec) -> None:
        """Track `job` (a store row: id, tenant, run_id) trained from `spec` (a JobSpec)."""
        self._track(job.id, _Job(job=job, spec=spec))

    def record(self, job_id: str, record: Mapping[str, Any]) -> None:
        """One step's history record (step, time, metrics), for the next write."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None or entry.end is not None:
                return
            entry.step = max(entry.step, int(record["step"]))
            entry.records.append(dict(record))
            del entry.records[: -self.max_records]

    def checkpoint(self, job_id: str, step: int, folder: Path) -> None:
        """The job's checkpoint at `step`, a staged checkpoint folder (`workers.checkpoints.save_checkpoint`;
        read here, during the call): its prefix is copied as a PEFT adapter beside it, for the next write."""
        from workers.formats import load_prefix, save_peft_adapter

        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None or entry.end is not None or entry.leaving:
                return
        staged = Path(tempfile.mkdtemp(prefix=f"live-{job_id}-", dir=Path(folder).parent))
        try:
            config, encoder = load_prefix(Path(folder) / "prefix")
            save_peft_adapter(staged, encoder, config)
        except Exception as e:  # noqa: BLE001 - tracking never fails a job
            shutil.rmtree(staged, ignore_errors=True)
            self._warn_once(job_id, entry, e)
            return
        with self._lock:
            if self._jobs.get(job_id) is entry and entry.end is None and not entry.leaving:
                older, entry.checkpoint = entry.checkpoint, (step, staged)
            else:  # dropped meanwhile (by the thread: its run cannot be written)
                older = (step, staged)
        if older is not None:
            shutil.rmtree(older[1], ignore_errors=True)
        self._wake.set()

    def end(self, job_id: str, status: str, error: str | None = None, *, run_id: str | None = None) -> None:
        """End the job's run `status` (FAILED or KILLED) once what is pending is written. A job not
        tracked here whose earlier attempt opened run `run_id` gets that run ended."""
        assert status in ENDED, status
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is None:
            if run_id is None:
                return
            entry = self._track(job_id, _Job(job=None, spec=None, run_id=run_id))
        if entry is not None:
            entry.end = (status, error)
            self._wake.set()

    def finish(self, job_id: str) -> None:
        """The job succeeded: stop tracking it; the registrar completes its run from its result folder (every
        step the run lacks, the final metrics, the model) and marks it FINISHED."""
        with self._lock:
            entry = self._jobs.pop(job_id, None)
        self._discard(entry)

    def leave(self, job_id: str) -> None:
        """Stop tracking the job once what is pending is written; its run stays RUNNING (the job is queued
        again, or its end is the registrar's to record: `registry.close_ended_runs`)."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is not None:
                entry.leaving = True
        self._wake.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is pending (within `timeout_s`) and stop the thread. Runs stay as they are."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _track(self, job_id: str, entry: _Job) -> _Job | None:
        if self.uri is None or self._closing:
            return None
        with self._lock:
            self._jobs[job_id] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="live-runs", daemon=True)
                self._thread.start()
        return entry

    # ---- the thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        from orchestrator.config import mlflow_fail_fast

        try:
            import mlflow  # noqa: F401 - in the cluster's images, not on every machine that trains
        except ImportError as e:
            log.warning("no live MLflow runs in this worker group: %s", e)
            with self._lock:
                self.uri, self._jobs = None, {}  # every call does nothing from now on
            return
        mlflow_fail_fast()  # a down server costs one short timeout per round, not minutes
        while True:
            closing = self._closing
            try:
                self._round()
            except Exception:  # noqa: BLE001 - e.g. the system metrics unreadable: the next round tries again
                log.exception("live MLflow runs: a round failed")
            if closing:
                with self._lock:
                    entries = list(self._jobs.values())
                for entry in entries:
                    self._discard(entry)
                return
            self._wake.wait(self.every_s)
            self._wake.clear()

    def _round(self) -> None:
        """One write per tracked job; a job whose run is ended (or left) is dropped."""
        from orchestrator.registry.client import is_unreachable

        with self._lock:
            entries = list(self._jobs.items())
        system = self._system() if entries else {}
        for job_id, entry in entries:
            try:
                done = self._write(job_id, entry, system)
            except Exception as e:  # noqa: BLE001 - tracking never fails a job; the next round tries again
                self._warn_once(job_id, entry, e)
                # Leaving, or refused for good (not an outage) while ending: the registrar's pass ends it.
                done = entry.leaving or (entry.end is not None and not is_unreachable(e))
            if done:
                with self._lock:
                    if self._jobs.get(job_id) is entry:
                        del self._jobs[job_id]
                self._discard(entry)

    def _write(self, job_id: str, entry: _Job, system: dict[str, float]) -> bool:
        """Open the run if needed, write the job's pending records and system metrics in one log_batch, its
        pending checkpoint, and end the run if asked; True when the job is done with."""
        from mlflow.entities import Metric

        from orchestrator.registry.client import RegistryError, tenant_of
        from orchestrator.registry.tracking import end_run, logged_steps, open_job_run, record_metrics

        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        client = self._client
        if entry.run_id is None and entry.job is not None:  # opened even if the job ended already: it trained
            try:
                run = open_job_run(client, self.uri, job_id, entry.spec, tenant_of(entry.job))
            except RegistryError as e:  # another tenant's experiment: its registration will say so too
                self._warn_once(job_id, entry, e)
                return True
            if entry.job.run_id != run.info.run_id:
                self._on_run(job_id, run.info.run_id)
            entry.last_step = max(logged_steps(client, run, "loss"), default=-1)
            entry.run_id = run.info.run_id
        if entry.run_id is None:
            return True  # a job that never trained here: no run to end
        with self._lock:
            records, entry.records = entry.records, []
            step, ended = entry.step, entry.end
        try:
            metrics = [
                Metric(key, value, int(r.get("time", time.time()) * 1000), int(r["step"]))
                for r in records
                if int(r["step"]) > entry.last_step
                for key, value in record_metrics(r).items()
            ]
            if system and step > entry.system_step:
                now = int(time.time() * 1000)
                metrics += [Metric(key, value, now, step) for key, value in system.items()]
            # MLflow takes at most 1000 metrics per batch: one batch per round unless a backlog built up.
            for lo in range(0, len(metrics), 1000):
                client.log_batch(entry.run_id, metrics=metrics[lo : lo + 1000])
        except BaseException:
            with self._lock:  # kept for the next round (the oldest records go first)
                entry.records = (records + entry.records)[-self.max_records :]
            raise
        entry.last_step = max([entry.last_step, *(int(r["step"]) for r in records)])
        if system and step > entry.system_step:
            entry.system_step = step
        self._write_checkpoint(client, entry)
        if ended is not None:
            end_run(client, entry.run_id, *ended)
            return True
        return entry.leaving

    def _discard(self, entry: _Job | None) -> None:
        """Remove the local copy of a checkpoint that will not be written."""
        if entry is None:
            return
        with self._lock:
            pending, entry.checkpoint = entry.checkpoint, None
        if pending is not None:
            shutil.rmtree(pending[1], ignore_errors=True)

    def _write_checkpoint(self, client, entry: _Job) -> None:
        """The pending checkpoint's adapter into the run, then the tag that names its step."""
        with self._lock:
            pending, entry.checkpoint = entry.checkpoint, None
        if pending is None:
            return
        step, folder = pending
        try:
            client.log_artifacts(entry.run_id, str(folder), f"{CHECKPOINT_ARTIFACTS}/step-{step:09d}")
            client.set_tag(entry.run_id, CHECKPOINT_TAG, str(step))
        except BaseException:
            with self._lock:  # tried again next round, unless a newer one came meanwhile
                if entry.checkpoint is None:
                    entry.checkpoint, pending = pending, None
            if pending is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)

    def _warn_once(self, job_id: str, entry: _Job, error: BaseException) -> None:
        log.warning("job %s: live MLflow run: %s: %s", job_id, type(error).__name__, error)
        now = time.monotonic()
        if now - entry.warned_at < self.warn_every_s:
            return
        entry.warned_at = now
        text = f"MLflow tracking at {self.uri} failed ({type(error).__name__}: {str(error)[:500]}); training goes on"
        try:
            self._warn(job_id, text)
        except Exception:  # noqa: BLE001 - the store may be down too; the log above has it
            pass

    def _system(self) -> dict[str, float]:
        """This process's CPU % (since the last round; may pass 100 with several threads), resident memory,
        and CUDA memory when torch has initialised CUDA here."""
        import psutil

        if self._process is None:
            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first reading is always 0: it starts the interval
            return {}
        out = {
            "system/cpu_percent": self._process.cpu_percent(None),
            "system/rss_mib": self._process.memory_info().rss / 2**20,
        }
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["system/gpu_memory_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
            out["system/gpu_memory_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
        return out
