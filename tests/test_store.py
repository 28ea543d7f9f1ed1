"""The job store against a real sqlite file and a real PostgreSQL server, including from several processes."""

import multiprocessing
import random
import time

import pytest

from orchestrator.store import InvalidTransition, JobStore, NewJob, UnknownJob

SPEC = {"task": "sum", "prefix": {"num_virtual_tokens": 8}, "train": {"steps": 10}}


class Clock:
    """A settable clock, so heartbeat and retry deadlines can be tested without sleeping."""

    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(url, clock):
    with JobStore(url, clock=clock) as s:
        yield s


def submit(store, task="t", base_key="base-a", priority=0, max_attempts=3):
    return store.submit(SPEC, task=task, base_key=base_key, priority=priority, max_attempts=max_attempts)


def test_lifecycle(store, clock):
    job_id = submit(store, task="sum")
    job = store.get(job_id)
    assert (job.state, job.task, job.base_key, job.spec, job.attempts, job.max_attempts) == (
        "queued",
        "sum",
        "base-a",
        SPEC,
        0,
        3,
    )
    assert job.created_at == job.updated_at == clock.now and job.started_at is None

    clock.now += 5
    [claimed] = store.claim("orch-1")
    assert (claimed.id, claimed.state, claimed.owner, claimed.attempts) == (job_id, "running", "orch-1", 1)
    assert claimed.started_at == claimed.heartbeat_at == clock.now

    assert (
        store.update_progress(job_id, step=3, total_steps=10, loss=1.25, tokens_per_s=900.0, examples_per_s=12.5)
        is False
    )
    clock.now += 1
    assert store.heartbeat("orch-1", [job_id, "j-not-mine"]) == [job_id]
    assert store.get(job_id).heartbeat_at == clock.now

    clock.now += 1
    done = store.finish(job_id, "succeeded", result_dir="/runs/sum")
    assert (done.state, done.result_dir, done.finished_at, done.step, done.total_steps, done.loss) == (
        "succeeded",
        "/runs/sum",
        clock.now,
        3,
        10,
        1.25,
    )
    assert store.get(job_id) == done
    assert store.claim("orch-1") == []
    assert [m for _, _, m in store.logs(job_id)] == [
        "submitted: task sum, base base-a, priority 0",
        "claimed by orch-1 (attempt 1 of 3)",
        "succeeded; result in /runs/sum",
    ]


@pytest.mark.parametrize(
    "start, action, message",
    [
        ("queued", lambda s, j: s.finish(j, "succeeded"), "cannot finish as succeeded job {j}: it is queued"),
        ("queued", lambda s, j: s.release(j, "boom"), "cannot release job {j}: it is queued"),
        ("queued", lambda s, j: s.update_progress(j, step=1, total_steps=2), "it is queued"),
        ("queued", lambda s, j: s.mark_registered(j, "m", 1), "only a succeeded job can"),
        ("succeeded", lambda s, j: s.finish(j, "failed"), "cannot finish as failed job {j}: it is succeeded"),
        ("succeeded", lambda s, j: s.request_cancel(j), "cannot cancel job {j}: it is succeeded"),
        ("succeeded", lambda s, j: s.release(j, "boom"), "it is succeeded, and only a running job can"),
        ("cancelled", lambda s, j: s.finish(j, "cancelled"), "it is cancelled"),
    ],
)
def test_illegal_transitions_raise_and_change_nothing(store, start, action, message):
    job_id = submit(store)
    if start == "succeeded":
        store.claim("o")
        store.finish(job_id, "succeeded")
    elif start == "cancelled":
        store.request_cancel(job_id)
    before = store.get(job_id)
    with pytest.raises(InvalidTransition, match=message.format(j=job_id)):
        action(store, job_id)
    assert store.get(job_id) == before


def test_bad_arguments(store):
    with pytest.raises(ValueError, match="'done' is not a final state"):
        store.finish(submit(store), "done")
    with pytest.raises(UnknownJob, match="no job with id 'j-nope'") as e:
        store.get("j-nope")
    assert isinstance(e.value, KeyError)
    with pytest.raises(UnknownJob):
        store.log("j-nope", "x")
    with pytest.raises(ValueError, match="'loud' is not one of debug, info, warning, error"):
        store.log(submit(store), "x", level="loud")


def test_claim_order_is_priority_then_first_come(store):
    low, high_1, mid, high_2 = (submit(store, priority=p) for p in (0, 5, 1, 5))
    assert [j.id for j in store.claim("o", limit=3)] == [high_1, high_2, mid]
    assert [j.id for j in store.claim("o", limit=3)] == [low]


def test_claim_filters_by_base_key(store):
    a1 = submit(store, base_key="a")
    b1 = submit(store, base_key="b", priority=9)
    a2 = submit(store, base_key="a")
    b2 = submit(store, base_key="b")
    assert store.queued_base_keys() == [("b", 2), ("a", 2)]
    assert [j.id for j in store.claim("o", base_key="a", limit=5)] == [a1, a2]
    assert store.queued_base_keys() == [("b", 2)]
    assert store.claim("o", base_key="a") == []
    assert [j.id for j in store.claim("o", limit=5)] == [b1, b2]
    assert store.queued_base_keys() == []


def test_cancel_queued_and_running(store):
    running, queued = submit(store), submit(store)
    assert [j.id for j in store.claim("o")] == [running]

    job = store.request_cancel(queued)
    assert (job.state, job.cancel_requested) == ("cancelled", True) and job.finished_at is not None
    assert store.request_cancel(queued) == job  # asking again changes nothing

    job = store.request_cancel(running)
    assert (job.state, job.cancel_requested) == ("running", True)
    # The worker learns it at its next step boundary, stops, and reports.
    assert store.update_progress(running, step=4, total_steps=10) is True
    assert store.finish(running, "cancelled").state == "cancelled"


def test_release_retries_until_max_attempts_then_fails(store):
    job_id = submit(store, max_attempts=2)
    store.claim("o")
    job = store.release(job_id, "CUDA OOM")
    assert (job.state, job.attempts, job.error, job.owner, job.heartbeat_at) == ("queued", 1, "CUDA OOM", None, None)
    store.claim("o")
    job = store.release(job_id, "CUDA OOM again")
    assert (job.state, job.attempts, job.error) == ("failed", 2, "CUDA OOM again")
    assert job.finished_at is not None
    assert store.claim("o") == []
    assert store.logs(job_id)[-1][1:] == ("error", "failed after 2 of 2 attempts: CUDA OOM again")


def test_release_of_a_cancel_requested_job_cancels_it(store):
    job_id = submit(store)
    store.claim("o")
    store.request_cancel(job_id)
    assert store.release(job_id, "worker died").state == "cancelled"


def test_requeue_stale_and_owner(store, clock):
    dead, alive, last_try, other = (submit(store, max_attempts=m) for m in (3, 3, 1, 3))
    store.claim("dead-orch", limit=3)  # dead, alive, last_try
    clock.now += 100
    store.claim("other-orch")  # other, with a fresh heartbeat
    store.heartbeat("dead-orch", [alive])  # only this one is still looked after
    assert store.requeue_stale(older_than_s=60) == [dead, last_try]
    assert store.get(dead).state == "queued"
    assert "orchestrator dead-orch stopped sending heartbeats (100 s since the last)" in store.get(dead).error
    assert (store.get(last_try).state, store.get(alive).state) == ("failed", "running")
    # The dead orchestrator's heartbeat no longer covers the job it lost.
    assert store.heartbeat("dead-orch", [dead, alive]) == [alive]

    assert store.requeue_owner("dead-orch") == [alive]
    assert store.get(alive).state == "queued"
    clock.now += 100
    assert store.requeue_stale(older_than_s=60) == [other]
    assert {j.id for j in store.claim("new-orch", limit=10)} == {dead, alive, other}


def test_registration_bookkeeping(store, clock):
    job_id = submit(store)
    submit(store)  # never finishes: never pending
    store.claim("o")
    store.finish(job_id, "succeeded", result_dir="/r")
    assert [j.id for j in store.pending_registrations(clock.now)] == [job_id]

    job = store.mark_registration_failed(job_id, "MLflow unreachable", retry_at=clock.now + 60)
    assert (job.registration_attempts, job.registration_error, job.next_registration_at) == (
        1,
        "MLflow unreachable",
        clock.now + 60,
    )
    assert store.pending_registrations(clock.now + 59) == []
    assert [j.id for j in store.pending_registrations(clock.now + 60)] == [job_id]

    job = store.mark_registered(job_id, "prefix-sum", 7)
    assert (
        job.registered,
        job.registry_model,
        job.registry_version,
        job.registration_attempts,
        job.registration_error,
    ) == (True, "prefix-sum", "7", 2, None)
    assert store.pending_registrations(clock.now + 3600) == []


def test_list_and_logs(store):
    a, b, c = submit(store, task="x"), submit(store, task="y"), submit(store, task="x")
    store.claim("o")
    assert [j.id for j in store.list()] == [a, b, c]
    assert [j.id for j in store.list(task="x")] == [a, c]
    assert [j.id for j in store.list(state="queued")] == [b, c]
    assert [j.id for j in store.list(limit=2)] == [b, c]
    with pytest.raises(ValueError, match="'done' is not one of queued, running"):
        store.list(state="done")
    store.log(a, "loss spiked", level="warning")
    assert store.logs(a)[-1][1:] == ("warning", "loss spiked")


def test_submit_many_is_all_or_nothing(store):
    ids = store.submit_many(
        [NewJob(spec=SPEC, task="a", base_key="k"), {"spec": SPEC, "task": "b", "base_key": "k", "priority": 2}]
    )
    assert [store.get(i).task for i in ids] == ["a", "b"]
    with pytest.raises(ValueError) as e:
        store.submit_many(
            [
                {"spec": SPEC, "task": "ok", "base_key": "k"},
                {"spec": {"x": object()}, "task": "", "base_key": "k", "max_attempts": 0},
                {"spec": SPEC, "task": "t", "base_key": "k", "prio": 1},
            ]
        )
    message = str(e.value)
    for part in (
        "items[1].task: expected a non-empty string, got ''",
        "items[1].max_attempts: expected an int >= 1",
        "items[1].spec: not storable as JSON",
        "items[2].prio: unknown field",
    ):
        assert part in message
    assert len(store.list()) == 2


def test_reopened_store_keeps_everything(url, clock):
    with JobStore(url, clock=clock) as first:
        job_id = submit(first, priority=4)
        first.claim("o")
        first.update_progress(job_id, step=2, total_steps=8, loss=0.5)
        first.log(job_id, "hello")
        before, logs = first.get(job_id), first.logs(job_id)
    with JobStore(url, clock=clock) as again:  # create_schema again: must not disturb the rows
        assert again.get(job_id) == before
        assert again.logs(job_id) == logs


# ---- several processes ----------------------------------------------------------------------------

_stores: dict[str, JobStore] = {}


def _store_in_process(url: str) -> JobStore:
    if url not in _stores:
        _stores[url] = JobStore(url)
    return _stores[url]


def _submit_worker(url: str, worker: int, n: int, start_at: float) -> list[str]:
    store = _store_in_process(url)
    time.sleep(max(0.0, start_at - time.time()))  # all workers start together
    return [store.submit({"worker": worker, "i": i}, task=f"w{worker}", base_key="k") for i in range(n)]


def _claim_worker(url: str, owner: str, start_at: float) -> list[str]:
    store = _store_in_process(url)
    rng = random.Random(owner)
    time.sleep(max(0.0, start_at - time.time()))
    claimed = []
    while batch := store.claim(owner, limit=rng.randint(1, 3)):
        claimed += [j.id for j in batch]
    return claimed


@pytest.fixture(scope="module")
def pool():
    # One pool for the module: spawning (importing SQLAlchemy in each child) is the slow part.
    with multiprocessing.get_context("spawn").Pool(4) as p:
        yield p


def test_concurrent_submits_from_4_processes(url, pool):
    JobStore(url).close()  # the schema exists before the race, as it would in a deployment
    start_at = time.time() + 0.3
    per_worker = pool.starmap(_submit_worker, [(url, w, 50, start_at) for w in range(4)])
    ids = [i for ids in per_worker for i in ids]
    assert len(ids) == len(set(ids)) == 200
    with JobStore(url) as store:
        jobs = store.list()
    assert sorted(j.id for j in jobs) == sorted(ids)
    assert sorted((j.spec["worker"], j.spec["i"]) for j in jobs) == [(w, i) for w in range(4) for i in range(50)]


def test_competing_claimers_claim_each_job_once(url, pool):
    with JobStore(url) as store:
        ids = store.submit_many([NewJob(spec={"i": i}, task="t", base_key="k") for i in range(100)])
    start_at = time.time() + 0.3
    first, second = pool.starmap(_claim_worker, [(url, "orch-a", start_at), (url, "orch-b", start_at)])
    assert len(first) + len(second) == 100
    assert set(first) | set(second) == set(ids)
    with JobStore(url) as store:
        jobs = {j.id: j for j in store.list()}
    assert all(jobs[i].owner == "orch-a" and jobs[i].attempts == 1 for i in first)
    assert all(jobs[i].owner == "orch-b" and jobs[i].attempts == 1 for i in second)
