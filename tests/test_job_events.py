"""Job events and held jobs' waiting reason through the CLI and the HTTP API (real HTTP on 127.0.0.1): the
events route's shape and paging, `prefixd logs -f` locally and with --server while another thread moves the
job along as a worker group would, and the max_running reason in `prefixd status` and the API's job.

Run: python -m pytest -q tests/test_job_events.py
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from orchestrator import logs
from orchestrator.client import ApiClient
from orchestrator.store import JobStore, Quota
from tests.test_cli import PAST_TENSE, TOKEN, api, home, remote, run  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXPECTED = [  # what `drive` makes of a job, after its submission
    ("info", "claimed by orch-t (attempt 1 of 3)"),
    ("warning", "checkpoint at step 1 not written: disk full"),
    ("info", "step 1/2: loss 1, 100 tokens/s"),
    ("info", "step 2/2: loss 0.5, 100 tokens/s, eval_loss 0.25"),
    ("info", "succeeded; result in /results/x"),
]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(logs, "POLL_S", 0.05)


def submit(capsys, *where) -> str:
    code, out, err = run(capsys, *where, "submit", PAST_TENSE)
    assert code == 0, err
    return out.split("\t")[0]


def drive(store_url: str, job_id: str) -> None:
    """Take `job_id` from queued to succeeded, slowly, as a worker group records it."""
    with JobStore(store_url) as store:
        time.sleep(0.3)  # the follower is polling by now
        for other in store.list(state="queued"):
            if other.id != job_id:
                store.request_cancel(other.id)
        [job] = store.claim("orch-t")
        assert job.id == job_id
        store.log(job_id, "checkpoint at step 1 not written: disk full", "warning")
        for step in (1, 2):
            time.sleep(0.2)
            evaluation = {"eval_loss": 0.25} if step == 2 else None
            store.update_progress(job_id, step=step, total_steps=2, loss=1 / step, tokens_per_s=100.0, eval=evaluation)
        store.finish(job_id, "succeeded", result_dir="/results/x")


def follow(capsys, store_url: str, job_id: str, *where: str, flags: tuple[str, ...] = ()) -> tuple[int, str]:
    """`prefixd WHERE logs -f JOB FLAGS` while `drive` runs in a thread; (exit code, stdout)."""
    with ThreadPoolExecutor(1) as pool:
        driving = pool.submit(drive, store_url, job_id)
        code, out, err = run(capsys, *where, "logs", "-f", job_id, *flags)
        driving.result()
    assert err == ""
    return code, out


def levels_and_messages(out: str) -> list[tuple[str, str]]:
    return [tuple(line.split(None, 3)[2:]) for line in out.splitlines()]


def test_logs_follow_locally_until_the_job_ends(home, capsys):
    where = ("--home", str(home))
    job_id = submit(capsys, *where)
    code, out = follow(capsys, f"sqlite:///{home / 'jobs.db'}", job_id, *where)
    assert code == 0
    printed = levels_and_messages(out)
    assert printed[0][1].startswith("submitted: task past-tense") and printed[1:] == EXPECTED
    # Without -f: the same events, once.
    code, again, _ = run(capsys, *where, "logs", job_id)
    assert code == 0 and again == out


def test_logs_follow_through_the_server_as_json_lines(remote, capsys):
    url, store_url = remote
    job_id = submit(capsys, "--server", url)
    code, out = follow(capsys, store_url, job_id, "--server", url, flags=("--json",))
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(e["level"], e["message"]) for e in events[1:]] == EXPECTED
    assert [e["type"] for e in events] == ["message"] * 3 + ["metrics"] * 2 + ["message"]
    assert events[4]["data"] == dict(
        step=2, total_steps=2, loss=0.5, tokens_per_s=100.0, examples_per_s=None, eval={"eval_loss": 0.25}
    )
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    for argv in (["logs", job_id], ["logs", job_id, "--json"]):  # the server prints what the store does
        remote_out = run(capsys, "--server", url, *argv)
        assert remote_out == run(capsys, "--store-url", store_url, *argv) and remote_out[0] == 0, argv
    assert json.loads(remote_out[1]) == events


def test_events_route_pages_with_after_and_limit(remote, capsys):
    url, store_url = remote
    job_id = submit(capsys, "--server", url)
    with JobStore(store_url) as store:
        for i in range(4):
            store.log(job_id, f"line {i}", "error" if i == 3 else "info")
        expected, _ = store.events(job_id)
    route = f"{url}/v1/jobs/{job_id}/events"
    page = httpx.get(route, params={"limit": 2}, headers=AUTH).json()
    assert page["has_more"] is True and [e["id"] for e in page["data"]] == [e.id for e in expected[:2]]
    assert set(page["data"][0]) == {"id", "created_at", "level", "message", "type", "data"}
    rest = httpx.get(route, params={"after": page["data"][-1]["id"]}, headers=AUTH).json()
    assert rest["has_more"] is False and [e["message"] for e in rest["data"]] == [f"line {i}" for i in range(1, 4)]
    assert rest["data"][-1]["level"] == "error"
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"after": "x"}):
        assert httpx.get(route, params=bad, headers=AUTH).status_code == 422, bad
    assert httpx.get(f"{url}/v1/jobs/j-nope/events", headers=AUTH).status_code == 404
    client = ApiClient(url, TOKEN)
    assert client.events(job_id) == (expected, False)
    assert client.events(job_id, after=expected[1].id, limit=1) == (expected[2:3], True)


def test_jobs_held_by_max_running_say_why_in_status_and_the_api(home, remote, capsys):
    where = ("--home", str(home))
    first, second = submit(capsys, *where), submit(capsys, *where)
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        store.set_quotas({"local": Quota(max_running=1)})
        assert [j.id for j in store.claim("o", limit=2)] == [first]
    reason = "waiting for a running slot: tenant 'local' runs 1 of 1 allowed jobs (max_running)"
    code, out, _ = run(capsys, *where, "status", second)
    assert code == 0 and f"waiting:     {reason}" in out.splitlines()
    code, out, _ = run(capsys, *where, "status")
    assert f"queued jobs of builtin:smollm2-135m:float32: {reason}" in out

    url, store_url = remote
    jobs = [submit(capsys, "--server", url) for _ in range(2)]
    with JobStore(store_url) as store:
        tenant = store.get(jobs[0]).tenant
        store.set_quotas({"*": Quota(max_running=0)})
        try:
            waiting = [httpx.get(f"{url}/v1/jobs/{j}", headers=AUTH).json()["waiting"] for j in jobs]
        finally:
            store.set_quotas({})
    assert waiting == [f"waiting for a running slot: tenant {tenant!r} runs 0 of 0 allowed jobs (max_running)"] * 2
    assert httpx.get(f"{url}/v1/jobs/{jobs[0]}", headers=AUTH).json()["waiting"] is None
