"""The registrar: finished jobs into MLflow, once each, whichever of the orchestrators sharing a store runs it.

registrar = Registrar(store, tracking_uri, holder="orchestrator-3f9c")
registrar.run()             # every scheduling pass; does something every REGISTRATION_EVERY_S at most
"""

from __future__ import annotations

import logging
import time

from orchestrator.errors import first_line
from orchestrator.store import JobStore

log = logging.getLogger("prefixd.orchestrator")
REGISTRATION_EVERY_S = 2.0
REGISTRAR_LEASE = "registrar"
REGISTRAR_LEASE_S = 120.0  # longer than one job's registration takes (renewed before each); a crashed
# registrar's lease runs out after this
CLOSE_RUNS_EVERY_S = 30.0  # how often the registrar looks for runs of failed/cancelled jobs to end


class Registrar:
    """Registers succeeded jobs and ends the MLflow runs that ended jobs left open (see `run`)."""

    def __init__(self, store: JobStore, tracking_uri: str, holder: str):
        self.store, self.tracking_uri, self.holder = store, tracking_uri, holder
        self._next_registration = 0.0
        self._next_run_closing = 0.0
        self.runs_ended: set[str] = set()  # failed/cancelled jobs whose MLflow run is known ended

    def run(self, *, now: bool = False) -> None:
        """Log and register succeeded jobs in MLflow, and end the runs their groups left open of jobs that
        failed or were cancelled (`registry.close_ended_runs`, every CLOSE_RUNS_EVERY_S). Of the
        orchestrators sharing the store, only the holder of its "registrar" lease does (taken for this pass,
        renewed before each job, given back after), so each job is registered once. While MLflow is
        unreachable a job stays succeeded-but-unregistered and is retried with backoff."""
        if not now and time.monotonic() < self._next_registration:
            return
        self._next_registration = time.monotonic() + REGISTRATION_EVERY_S
        ended = []  # failed and cancelled jobs whose run may be open still
        if now or time.monotonic() >= self._next_run_closing:
            self._next_run_closing = time.monotonic() + CLOSE_RUNS_EVERY_S
            ended = [j for s in ("failed", "cancelled") for j in self.store.list(state=s) if j.run_id]
            ended = [j for j in ended if j.id not in self.runs_ended]
        if not ended and not self.store.pending_registrations():
            return

        def keep_lease() -> bool:
            return self.store.acquire_lease(REGISTRAR_LEASE, self.holder, REGISTRAR_LEASE_S)

        if not keep_lease():
            return  # another orchestrator registers
        try:
            from orchestrator import registry  # MLflow: imported only once there is something to register

            try:
                for job_id in registry.close_ended_runs(ended, self.tracking_uri, self.runs_ended):
                    log.info("job %s: its MLflow run ended as the job did", job_id)
            except Exception as e:  # noqa: BLE001 - MLflow unreachable: the next look tries again
                log.warning("could not end the MLflow runs of ended jobs: %s", first_line(e))
            for job_id in registry.register_pending(self.store, self.tracking_uri, keep_lease=keep_lease):
                job = self.store.get(job_id)
                log.info("job %s: registered as %s version %s", job_id, job.registry_model, job.registry_version)
        finally:
            self.store.release_lease(REGISTRAR_LEASE, self.holder)
