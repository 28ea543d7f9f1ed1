"""Job events in the store (shape, ids, paging, metrics, the migration of an older store) and the waiting
reason of jobs held back by their tenant's max_running quota, on a real sqlite file and a real PostgreSQL.

Run: python -m pytest -q tests/test_store_events.py
"""

import pytest
from sqlalchemy import create_engine, text

from orchestrator.store import MAX_EVENTS, JobStore, Quota, UnknownJob
from tests.test_store import SPEC, Clock, clock, store, submit, url  # noqa: F401 - fixtures
from tests.test_store_tenants import make_old_store


def test_events_shape_ids_and_paging(store, clock):
    job_id = submit(store)
    other = submit(store, base_key="base-b")
    [claimed] = store.claim("orch-1", base_key="base-a")
    clock.now += 1
    store.log(job_id, "checkpoint at step 2 not written: disk full", "warning")
    store.log(other, "an event of another job")
    store.update_progress(
        job_id, step=2, total_steps=4, loss=1.25, tokens_per_s=512.0, examples_per_s=8.0, eval={"eval_loss": 1.5}
    )
    store.update_progress(job_id, step=3, total_steps=4, loss=float("nan"))
    store.finish(job_id, "failed", error="out of memory")

    events, more = store.events(job_id)
    assert not more
    assert [(e.type, e.level, e.message) for e in events] == [
        ("message", "info", "submitted: task t, base base-a, priority 0"),
        ("message", "info", "claimed by orch-1 (attempt 1 of 3)"),
        ("message", "warning", "checkpoint at step 2 not written: disk full"),
        ("metrics", "info", "step 2/4: loss 1.25, 512 tokens/s, eval_loss 1.5"),
        ("metrics", "info", "step 3/4"),
        ("message", "error", "failed: out of memory"),
    ]
    assert [e.data for e in events if e.type == "metrics"] == [
        dict(step=2, total_steps=4, loss=1.25, tokens_per_s=512.0, examples_per_s=8.0, eval={"eval_loss": 1.5}),
        dict(step=3, total_steps=4, loss=None, tokens_per_s=None, examples_per_s=None),  # NaN is not JSON
    ]
    assert all(e.data is None for e in events if e.type == "message")
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    assert events[0].created_at == clock.now - 1 and events[-1].created_at == clock.now
    assert set(events[0].to_dict()) == {"id", "created_at", "level", "message", "type", "data"}
    # The other job's event took an id between this job's: ids are the store's, not the job's.
    [foreign] = store.events(other)[0][1:]
    assert ids[2] < foreign.id < ids[3]

    first, more = store.events(job_id, limit=4)
    assert more and first == events[:4]
    rest, more = store.events(job_id, after=first[-1].id, limit=4)
    assert not more and rest == events[4:]
    assert store.events(job_id, after=events[-1].id) == ([], False)
    assert store.events(job_id, types=("metrics",))[0] == events[3:5]
    # `logs` keeps its view: the message events only.
    assert [m for _, _, m in store.logs(job_id)] == [e.message for e in events if e.type == "message"]


def test_events_refuse_bad_arguments(store):
    job_id = submit(store)
    with pytest.raises(UnknownJob):
        store.events("j-nope")
    for bad in (0, MAX_EVENTS + 1, True):
        with pytest.raises(ValueError, match="limit: expected an int from 1"):
            store.events(job_id, limit=bad)
    with pytest.raises(ValueError, match="after: expected an event id"):
        store.events(job_id, after="3")
    with pytest.raises(ValueError, match="level: 'loud' is not one of"):
        store.log(job_id, "x", "loud")


def test_an_old_store_gains_event_types_and_data(url):
    make_old_store(url)
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(
            text("INSERT INTO prefixd_job_events (job_id, time, level, message) VALUES ('j-old', 1, 'info', 'x')")
        )
    engine.dispose()
    with JobStore(url) as store, JobStore(url) as again:  # create_schema twice: idempotent
        [old], more = store.events("j-old")
        assert (old.message, old.type, old.data, more) == ("x", "message", None, False)
        store.claim("o")
        store.update_progress("j-old", step=1, total_steps=2, loss=0.5)
        events, _ = again.events("j-old", after=old.id)
        assert [(e.type, e.data and e.data["loss"]) for e in events] == [("message", None), ("metrics", 0.5)]


def test_jobs_held_by_max_running_say_why(store):
    store.set_quotas({"alice": Quota(max_running=2), "*": Quota(max_running=1)})
    alice = [store.submit(SPEC, task="t", base_key="b", tenant="alice") for _ in range(3)]
    bob = [store.submit(SPEC, task="t", base_key="b", tenant="bob") for _ in range(2)]
    nobody = store.submit(SPEC, task="t", base_key="b")
    store.set_waiting("b", "waiting for 8 GPUs")
    assert {store.get(j).waiting for j in alice + bob + [nobody]} == {"waiting for 8 GPUs"}  # nothing runs yet

    assert len(store.claim("o", limit=10)) == 4  # alice 2, bob 1, the job without a tenant 1
    held = {j.id: j.waiting for j in store.list(state="queued")}
    assert held == {
        alice[2]: "waiting for a running slot: tenant 'alice' runs 2 of 2 allowed jobs (max_running)",
        bob[1]: "waiting for a running slot: tenant 'bob' runs 1 of 1 allowed jobs (max_running)",
    }
    assert store.get(alice[2]).waiting == held[alice[2]]
    assert all(j.waiting is None for j in store.list(state="running"))

    store.finish(alice[0], "succeeded")  # a slot frees: the placement reason shows again
    assert store.get(alice[2]).waiting == "waiting for 8 GPUs"
    store.set_quotas({})
    assert store.get(bob[1]).waiting == "waiting for 8 GPUs"
