"""A worker group's store calls wait out a database outage (a real PostgreSQL stopped and started again on
its port) instead of failing the group and charging every job an attempt; past the patience they fail."""

import threading
import time

import pytest
from pg import start_postgres
from sqlalchemy.exc import OperationalError

from orchestrator.patient_store import PatientStore
from orchestrator.store import InvalidTransition, JobStore


def _pg_ctl(server, action: str) -> None:
    data = str(server.root / "data")
    if action == "stop":
        server._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    else:
        options = f"-h {server.host} -p {server.port} -k {server.root} -F -c synchronous_commit=off"
        server._run("pg_ctl", "-D", data, "-l", str(server.root / "log"), "-o", options, "-w", "-t", "60", "start")


@pytest.fixture
def outage_store():
    server = start_postgres()
    url = server.create_database("outage")
    store = JobStore(url)
    store.create_schema()
    yield server, store
    store.close()
    server.stop()


def test_group_store_waits_out_a_database_restart(outage_store):
    server, store = outage_store
    job_id = store.submit({"name": "t"}, task="t", base_key="b")
    [job] = store.claim("group-1", base_key="b")
    patient = PatientStore(store, patience_s=60)

    _pg_ctl(server, "stop")
    with pytest.raises(OperationalError):  # the bare store fails at once
        store.update_progress(job_id, step=1, total_steps=5, loss=1.0, tokens_per_s=1.0, examples_per_s=1.0)
    restart = threading.Timer(3.0, _pg_ctl, args=(server, "start"))
    restart.start()
    start = time.monotonic()
    patient.update_progress(job_id, step=2, total_steps=5, loss=0.5, tokens_per_s=1.0, examples_per_s=1.0)
    restart.join()
    assert time.monotonic() - start >= 2.5  # it really waited for the server
    job = store.get(job_id)
    assert (job.state, job.step, job.attempts) == ("running", 2, 1)  # nothing charged, progress kept

    patient.finish(job_id, "succeeded")
    start = time.monotonic()
    with pytest.raises(InvalidTransition):  # the store's own answers are not retried
        patient.finish(job_id, "succeeded")
    assert time.monotonic() - start < 1.0


def test_group_store_gives_up_after_its_patience(outage_store):
    server, store = outage_store
    job_id = store.submit({"name": "t"}, task="t", base_key="b")
    store.claim("group-1", base_key="b")
    _pg_ctl(server, "stop")
    try:
        start = time.monotonic()
        with pytest.raises(OperationalError):
            PatientStore(store, patience_s=2).log(job_id, "never written")
        assert 1.0 <= time.monotonic() - start < 15
    finally:
        _pg_ctl(server, "start")
    assert "never written" not in [m for _, _, m in store.logs(job_id)]
