"""The job store's tenant column (added to stores made before it), quotas and leases, on a real sqlite file
and a real PostgreSQL server.

Run: python -m pytest -q tests/test_store_tenants.py
"""

import math
import threading

import pytest
from sqlalchemy import MetaData, Table, create_engine

from orchestrator.store import JobStore, NewJob, Quota, QuotaExceeded, UnknownJob, events_table, jobs_table
from tests.test_store import Clock, url  # noqa: F401 - url is a fixture

SPEC = {"task": "sum"}


def make_old_store(url: str) -> None:
    """The schema as the first release created it (no tenant column, no quotas or leases, events without
    type and data), with one job."""
    old = MetaData()
    jobs = Table("prefixd_jobs", old, *[c._copy() for c in jobs_table.columns if c.name != "tenant"])
    Table("prefixd_job_events", old, *[c._copy() for c in events_table.columns if c.name not in ("type", "data")])
    engine = create_engine(url)
    old.create_all(engine)
    with engine.begin() as c:
        c.execute(
            jobs.insert(),
            {
                "id": "j-old",
                "task": "t",
                "base_key": "b",
                "priority": 0,
                "state": "queued",
                "spec": "{}",
                "attempts": 0,
                "max_attempts": 3,
                "created_at": 1.0,
                "updated_at": 1.0,
                "cancel_requested": False,
                "registered": False,
                "registration_attempts": 0,
            },
        )
    engine.dispose()


def test_an_old_store_gains_the_tenant_column(url):
    make_old_store(url)
    with JobStore(url) as store, JobStore(url) as again:  # create_schema twice: idempotent
        assert store.get("j-old").tenant is None
        new = store.submit(SPEC, task="t", base_key="b", tenant="alice")
        assert [j.id for j in again.list(tenant="alice")] == [new]
        assert [j.id for j in again.list()] == ["j-old", new]
        [claimed] = store.claim("o")  # the old job, first come
        assert claimed.id == "j-old"
        assert (claimed.sweep_id, claimed.sweep_variant, claimed.run_id) == (None, None, None)


def test_a_running_job_says_when_it_should_finish(url):
    clock = Clock()
    with JobStore(url, clock=clock) as store:
        job_id = store.submit({"training": {"examples_per_step": 4}}, task="t", base_key="b")
        assert store.get(job_id).estimated_finish is None  # queued
        store.claim("o")
        store.update_progress(job_id, step=0, total_steps=30)
        assert store.get(job_id).estimated_finish is None  # no step timed yet
        clock.now += 50
        store.update_progress(job_id, step=10, total_steps=30, examples_per_s=2.0)  # 2 s a step
        assert store.get(job_id).estimated_finish == clock.now + 20 * 2.0
        assert store.get(job_id).last_eval is None
        store.update_progress(job_id, step=20, total_steps=30, eval={"eval_loss": 1.5, "eval_perplexity": math.inf})
        store.update_progress(job_id, step=21, total_steps=30)
        assert store.get(job_id).last_eval == {"step": 20, "eval_loss": 1.5, "eval_perplexity": None}
        store.finish(job_id, "succeeded")
        assert store.get(job_id).estimated_finish is None


def test_sweep_variants_and_runs_are_kept_with_their_jobs(url):
    with JobStore(url) as store:
        variants = [
            NewJob(spec=SPEC, task="t", base_key="b", sweep_id="sweep-1", sweep_variant=f"training.seed={i}")
            for i in range(3)
        ]
        ids = store.submit_many(variants)
        alone = store.submit(SPEC, task="t", base_key="b")
        assert [j.id for j in store.list(sweep="sweep-1")] == ids
        assert [j.sweep_variant for j in store.list(sweep="sweep-1")] == [f"training.seed={i}" for i in range(3)]
        assert store.get(alone).sweep_id is None
        store.set_run_id(ids[0], "run-abc")
        assert store.get(ids[0]).run_id == "run-abc"
        with pytest.raises(UnknownJob):
            store.set_run_id("j-none", "run-x")
        with pytest.raises(ValueError, match="sweep_id: expected a string of 1 to 64 characters"):
            store.submit_many([NewJob(spec=SPEC, task="t", base_key="b", sweep_id="x" * 65)])


def test_quotas_at_submit_and_claim(url):
    with JobStore(url, clock=Clock()) as store:
        store.set_quotas(
            {"*": Quota(max_queued=3, max_running=1), "bob": Quota(max_priority=5, max_running=2), "ops": Quota()}
        )
        assert store.quotas()["bob"] == Quota(max_priority=5, max_running=2)
        items = [NewJob(spec=SPEC, task="t", base_key="b", tenant="alice") for _ in range(3)]
        store.submit_many(items, enforce_quota=True)
        with pytest.raises(QuotaExceeded, match=r"tenant 'alice' has 3 job\(s\) queued and its quota is 3"):
            store.submit(SPEC, task="t", base_key="b", tenant="alice", enforce_quota=True)
        store.submit(SPEC, task="t", base_key="b", tenant="alice")  # not enforced: the local admin's way
        with pytest.raises(QuotaExceeded, match="priority 6 is over tenant 'bob''s highest priority, 5"):
            store.submit(SPEC, task="t", base_key="b", tenant="bob", priority=6, enforce_quota=True)
        for _ in range(3):
            store.submit(SPEC, task="t", base_key="b", tenant="bob", priority=5, enforce_quota=True)
            store.submit(SPEC, task="t", base_key="b", tenant="ops", priority=9, enforce_quota=True)
        store.submit(SPEC, task="t", base_key="b")  # no tenant: the '*' default applies

        claimed = store.claim("o", limit=20)  # ops: unlimited; bob: 2 at once; alice and no tenant: 1 each
        tenants = sorted(j.tenant or "-" for j in claimed)
        assert tenants == ["-", "alice", "bob", "bob", "ops", "ops", "ops"]
        assert store.claim("o", limit=20) == []  # everyone else is at the limit
        assert store.queued_base_keys() == []  # so no group should start for them
        store.finish(next(j.id for j in claimed if j.tenant == "alice"), "succeeded")
        assert [j.tenant for j in store.claim("o", limit=20)] == ["alice"]
        store.set_quotas({})
        assert len(store.claim("o", limit=20)) == 3  # no limits any more: the rest


def test_a_lease_has_one_holder_at_a_time(url):
    clock = Clock()
    with JobStore(url, clock=clock) as a, JobStore(url, clock=clock) as b:
        assert a.acquire_lease("registrar", "A", 60) and a.acquire_lease("registrar", "A", 60)  # renewal
        assert not b.acquire_lease("registrar", "B", 60)
        clock.now += 61  # A stopped renewing: its lease ran out
        assert b.acquire_lease("registrar", "B", 60) and not a.acquire_lease("registrar", "A", 60)
        b.release_lease("registrar", "B")
        assert a.acquire_lease("registrar", "A", 60)

    # Many processes' worth of connections racing for a fresh lease: exactly one wins.
    stores = [JobStore(url, clock=clock) for _ in range(8)]
    wins, barrier = [], threading.Barrier(len(stores))

    def race(i: int) -> None:
        barrier.wait()
        if stores[i].acquire_lease("race", f"h{i}", 60):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(wins) == 1


def test_the_cli_on_the_store_is_the_local_admin(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    for name in ("PREFIXD_HOME", "PREFIXD_STORE_URL", "PREFIXD_SERVER", "PREFIXD_SPEC_BOUNDS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "t.jsonl").write_text('{"input": "x", "target": "y"}\n')
    (tmp_path / "t.yaml").write_text(
        "name: t\nbase_model: {builtin: smollm2-135m}\ntraining: {steps: 30}\n"
        "data: {train: t.jsonl, input_column: input, target_column: target}\n"
    )
    home = tmp_path / "home"
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        other = store.submit(SPEC, task="x", base_key="b", tenant="alice")
    assert main(["--home", str(home), "submit", str(tmp_path / "t.yaml")]) == 0
    job_id = capsys.readouterr().out.split("\t")[0]
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        assert store.get(job_id).tenant == "local"
    assert main(["--home", str(home), "list", "--json"]) == 0
    assert {other, job_id} <= set(capsys.readouterr().out.split('"'))  # it sees every tenant's jobs
    (tmp_path / "bounds.yaml").write_text("training.steps: 20\n")
    monkeypatch.setenv("PREFIXD_SPEC_BOUNDS", str(tmp_path / "bounds.yaml"))
    assert main(["--home", str(home), "validate", str(tmp_path / "t.yaml")]) == 1
    assert "training.steps: must be >= 1 and <= 20, got 30" in capsys.readouterr().err
