"""The HTTP API over real HTTP on 127.0.0.1: auth on every route, submit/status/cancel/logs, refusals,
and a bounded fuzz run from the OpenAPI description."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
import yaml

from orchestrator.api import ApiSettings, create_app
from orchestrator.store import JobStore
from tests.tiny import write_task

TOKEN = "test-token-7c1f"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = root / "data"
    data.mkdir()
    write_task(data / "rev.jsonl", "reverse")
    (root / "secret.jsonl").write_text('{"input": "x", "target": "y"}\n')
    url = f"sqlite:///{root / 'jobs.db'}"
    from orchestrator.registry import default_tracking_uri

    settings = ApiSettings(store_url=url, tokens=frozenset({TOKEN}), data_root=data,
                           tracking_uri=default_tracking_uri(root))
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", url, root
    srv.should_exit = True
    thread.join(10)


def spec(**over):
    base = {"name": "rev", "base_model": {"builtin": "smollm2-135m"},
            "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
            "training": {"steps": 5}}
    return base | over


AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/v1/jobs/j-x"), ("post", "/v1/jobs/j-x/cancel"),
          ("get", "/v1/jobs/j-x/logs"), ("get", "/v1/models"), ("get", "/v1/models/rev")]


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_needs_the_token(server, method, path):
    base, _, _ = server
    assert httpx.request(method, base + path, json={}).status_code == 401
    assert httpx.request(method, base + path, json={}, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert httpx.request(method, base + path, json={}, headers={"Authorization": "Basic abc"}).status_code in (401, 403)


def test_submit_status_cancel_logs(server):
    base, url, _ = server
    r = httpx.post(base + "/v1/jobs", json=spec(priority=3), headers=AUTH)
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    status = httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()
    assert status["state"] == "queued" and status["priority"] == 3 and status["task"] == "rev"
    yaml_body = yaml.safe_dump(spec(name="rev-yaml"))
    r2 = httpx.post(base + "/v1/jobs", content=yaml_body, headers=AUTH | {"Content-Type": "application/yaml"})
    assert r2.status_code == 201, r2.text
    listed = httpx.get(base + "/v1/jobs", headers=AUTH).json()
    assert {j["id"] for j in listed} >= {job_id, r2.json()["job_id"]}
    assert httpx.post(f"{base}/v1/jobs/{job_id}/cancel", headers=AUTH).json()["state"] == "cancelled"
    logs = httpx.get(f"{base}/v1/jobs/{job_id}/logs", headers=AUTH).json()
    assert any("cancel" in line["message"] for line in logs)
    stored = JobStore(url).get(job_id)
    assert stored.spec["data"]["train"].endswith("data/rev.jsonl")


def test_bad_specs_are_refused_and_nothing_is_stored(server):
    base, url, root = server
    before = len(JobStore(url).list())
    cases = [
        (spec(training={"steps": 0}), "training.steps"),
        (spec(name="../evil"), "name"),
        (spec(data={"train": "../secret.jsonl", "input_column": "input", "target_column": "target"}), "data.train"),
        (spec(data={"train": str(root / "secret.jsonl"), "input_column": "input", "target_column": "target"}),
         "data.train"),
        (spec(unknown_key=1), "unknown_key"),
        (spec(base_model={"path": "/etc"}), "base_model.path"),
    ]
    for body, field in cases:
        r = httpx.post(base + "/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 422, (field, r.text)
        assert field in r.text
    for raw, ctype in [(b"\xff\xfe\x00garbage", "application/yaml"), (b"{not json", "application/json"),
                       (b"just a scalar", "application/yaml")]:
        r = httpx.post(base + "/v1/jobs", content=raw, headers=AUTH | {"Content-Type": ctype})
        assert r.status_code == 422, r.text
    big = httpx.post(base + "/v1/jobs", content=b"x" * (2 << 20), headers=AUTH | {"Content-Type": "application/yaml"})
    assert big.status_code == 413
    assert len(JobStore(url).list()) == before


def test_unknown_job_and_bad_query(server):
    base, _, _ = server
    assert httpx.get(base + "/v1/jobs/j-nope", headers=AUTH).status_code == 404
    assert httpx.get(base + "/v1/jobs?state=dancing", headers=AUTH).status_code == 422
    assert httpx.get(base + "/v1/models", headers=AUTH, timeout=60).json() == []
    missing = httpx.get(base + "/v1/models/rev", headers=AUTH, timeout=60)
    assert missing.status_code == 404 and "rev" in missing.json()["detail"]


def test_openapi_describes_every_route(server):
    base, _, _ = server
    doc = httpx.get(base + "/openapi.json").json()
    assert set(doc["paths"]) >= {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                                 "/v1/jobs/{job_id}/logs", "/v1/models", "/v1/models/{task}"}


def test_fuzz_from_openapi_no_server_errors(server):
    """schemathesis generates requests from the OpenAPI description (bounded); no 5xx, no crash."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    base, _, _ = server
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    failures = []

    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            for headers in (AUTH, {}):
                response = case.call(headers=headers, timeout=10)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    assert not failures, failures
