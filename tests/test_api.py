"""The HTTP API over real HTTP on 127.0.0.1 (start_api): auth on every route, submit/status/cancel/logs,
refusals, the client's errors, a bounded fuzz run from the OpenAPI description, and one job end to end
(submitted over HTTP, trained by the orchestrator on a local Ray, looked up over HTTP)."""

import dataclasses

import httpx
import pytest
import yaml

from orchestrator.api_server import ApiStartError, start_api
from orchestrator.client import ApiClient, ApiError
from orchestrator.config import OrchestratorConfig, default_tracking_uri
from orchestrator.store import Job, JobStore
from tests.tiny import save_tiny_base, write_task

TOKEN = "test-token-7c1f"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(API URL, store URL, home): start_api over a fresh home; data root <home>/data (the default)."""
    root = tmp_path_factory.mktemp("api")
    (root / "data").mkdir()
    write_task(root / "data" / "rev.jsonl", "reverse")
    (root / "secret.jsonl").write_text('{"input": "x", "target": "y"}\n')
    config = OrchestratorConfig.from_env(
        home=root, store_url=f"sqlite:///{root / 'jobs.db'}", mlflow_uri=default_tracking_uri(root)
    )
    api = start_api(config, port=0, tokens=frozenset({TOKEN}))
    assert api.data_root == root / "data"
    yield api.url, config.store_url, root
    api.stop()


def spec(**over):
    base = {
        "name": "rev",
        "base_model": {"builtin": "smollm2-135m"},
        "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "training": {"steps": 5},
    }
    return base | over


AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/j-x"),
    ("post", "/v1/jobs/j-x/cancel"),
    ("get", "/v1/jobs/j-x/logs"),
    ("get", "/v1/jobs/j-x/events"),
    ("get", "/v1/models"),
    ("get", "/v1/models/rev"),
    ("post", "/v1/specs/validate"),
]


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
        (
            spec(data={"train": str(root / "secret.jsonl"), "input_column": "input", "target_column": "target"}),
            "data.train",
        ),
        (spec(unknown_key=1), "unknown_key"),
        (spec(base_model={"path": "/etc"}), "base_model.path"),
    ]
    for body, field in cases:
        r = httpx.post(base + "/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 422, (field, r.text)
        assert field in r.text
    for raw, ctype in [
        (b"\xff\xfe\x00garbage", "application/yaml"),
        (b"{not json", "application/json"),
        (b"just a scalar", "application/yaml"),
    ]:
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
    assert set(doc["paths"]) >= {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/events",
        "/v1/models",
        "/v1/models/{task}",
        "/v1/specs/validate",
    }


def test_fuzz_from_openapi_no_server_errors(server):
    """schemathesis generates requests from the OpenAPI description (bounded); no 5xx, no crash."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    base, _, _ = server
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    failures = []

    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            for headers in (AUTH, {}):
                response = case.call(headers=headers, timeout=10)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    assert not failures, failures


# ---- start_api ------------------------------------------------------------------------------------------


def test_start_api_refuses_without_tokens(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXD_API_TOKENS", raising=False)
    config = OrchestratorConfig.from_env(home=tmp_path)
    with pytest.raises(ApiStartError, match="no API token configured: set PREFIXD_API_TOKENS"):
        start_api(config, port=0)
    monkeypatch.setenv("PREFIXD_API_TOKENS", " , ")  # blanks are no tokens either
    with pytest.raises(ApiStartError, match="PREFIXD_API_TOKENS"):
        start_api(config, port=0, tokens=frozenset())


def test_start_api_port_taken_and_non_loopback_warning(server, tmp_path, monkeypatch, capsys):
    base, _, _ = server
    monkeypatch.setenv("PREFIXD_API_TOKENS", f"other,{TOKEN}")  # from the environment this time
    config = OrchestratorConfig.from_env(home=tmp_path, mlflow_uri=default_tracking_uri(tmp_path))
    taken = int(base.rsplit(":", 1)[1])
    with pytest.raises(ApiStartError, match=f"cannot listen on 127.0.0.1:{taken}: Address already in use"):
        start_api(config, port=taken)

    api = start_api(config, host="0.0.0.0", port=0, data_root=tmp_path / "elsewhere")
    port = api.url.rsplit(":", 1)[1]
    try:
        err = capsys.readouterr().err  # MLflow's own start-up lines may come first
        assert f"\nwarning: the HTTP API listens on 0.0.0.0:{port}, reachable from other machines" in "\n" + err
        assert api.data_root == tmp_path / "elsewhere" and api.data_root.is_dir()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers=AUTH).json() == []
    finally:
        api.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
    api = start_api(config, host="127.0.0.1", port=int(port))  # the port is free again; loopback: no warning
    api.stop()
    assert capsys.readouterr().err == ""


# ---- more routes, and the client -------------------------------------------------------------------------


def test_validate_checks_without_queueing_and_jobs_carry_every_field(server):
    base, url, _ = server
    before = len(JobStore(url).list())
    r = httpx.post(base + "/v1/specs/validate", json=spec(priority=4), headers=AUTH)
    assert r.status_code == 200 and r.json() == {
        "task": "rev",
        "base_key": "builtin:smollm2-135m:float32",
        "priority": 4,
        "variants": 1,
    }
    r = httpx.post(base + "/v1/specs/validate", json=spec(training={"steps": 0}), headers=AUTH)
    assert r.status_code == 422 and [p["path"] for p in r.json()["problems"]] == ["training.steps"]
    assert len(JobStore(url).list()) == before

    job_id = httpx.post(base + "/v1/jobs?max_attempts=7", json=spec(), headers=AUTH).json()["job_id"]
    row = httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()
    assert set(row) == {f.name for f in dataclasses.fields(Job)}  # `prefixd status --json` prints all of them
    assert row["max_attempts"] == 7 and row["spec"] == JobStore(url).get(job_id).spec
    assert httpx.post(base + "/v1/jobs?max_attempts=0", json=spec(), headers=AUTH).status_code == 422


def test_client(server, tmp_path):
    base, url, _ = server
    client = ApiClient(base + "/", TOKEN)
    job_id = client.submit(yaml.safe_dump(spec(name="rev-client", priority=2)), max_attempts=2)
    assert client.submit(spec(name="rev-client")) != job_id  # a dict goes as JSON
    job = client.status(job_id)
    assert job == JobStore(url).get(job_id) and isinstance(job, Job)
    assert job.priority == 2 and job.max_attempts == 2
    assert [j.id for j in client.list(task="rev-client", limit=1)] == [JobStore(url).list(task="rev-client")[-1].id]
    assert client.cancel(job_id).state == "cancelled"
    assert client.logs(job_id) == JobStore(url).logs(job_id)
    assert client.validate(spec()) == {
        "task": "rev",
        "base_key": "builtin:smollm2-135m:float32",
        "priority": 0,
        "variants": 1,
    }
    assert client.search_models(base="builtin:smollm2-135m", tags={"a": "b"}) == []

    with pytest.raises(ApiError) as e:
        client.submit("name: Bad\ntraining: {steps: 0}\n")
    assert e.value.status_code == 422 and ("training.steps", "must be >= 1 and <= 100000, got 0") in e.value.problems
    assert "\n  training.steps: must be >= 1 and <= 100000, got 0\n" in str(e.value) + "\n"  # one problem per line
    with pytest.raises(ApiError) as e:
        client.status("j-nope")
    assert (e.value.status_code, str(e.value)) == (404, "no job with id 'j-nope' (`prefixd list` shows the known ones)")
    with pytest.raises(ApiError) as e:
        client.cancel("j-nope/../../models")  # quoted into one path segment: matches no route
    assert e.value.status_code == 404

    done_id = client.submit(spec(name="rev-done", base_model={"builtin": "smollm2-135m", "dtype": "bfloat16"}))
    with JobStore(url) as store:
        [claimed] = store.claim("test", base_key="builtin:smollm2-135m:bfloat16")
        store.finish(claimed.id, "succeeded")
    assert claimed.id == done_id
    with pytest.raises(ApiError, match=f"cannot cancel job {done_id}: it is succeeded") as e:
        client.cancel(done_id)
    assert e.value.status_code == 409
    with pytest.raises(ApiError) as e:
        client.lookup("rev", version="x")
    assert e.value.status_code == 422 and e.value.problems[0][0] == "version"
    with pytest.raises(ApiError) as e:
        ApiClient(base, "wrong").list()
    assert e.value.status_code == 403 and str(e.value) == f"{base} refused the token (HTTP 403: token not accepted)"
    with pytest.raises(ApiError) as e:
        ApiClient("http://127.0.0.1:9", TOKEN).list()
    assert e.value.status_code is None and "cannot reach the prefixd server at http://127.0.0.1:9" in str(e.value)
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        ApiClient("127.0.0.1:8000", TOKEN)


# ---- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow  # starts Ray, trains, logs to MLflow
def test_submit_over_http_train_and_look_up(tmp_path, monkeypatch, capsys):
    """`prefixd --server URL submit` of a spec whose paths are the server's (a tiny Llama folder and a task
    file under its data root); the orchestrator trains and registers it; status and the registered version
    come back over HTTP, and the CLI prints lookup/models through the server as it does locally."""
    from orchestrator.cli import main
    from orchestrator.scheduler import Orchestrator

    for name in (
        "PREFIXD_HOME",
        "PREFIXD_STORE_URL",
        "PREFIXD_RAY_ADDRESS",
        "PREFIXD_SERVER",
        "PREFIXD_DATA_ROOT",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "server"
    data = home / "data"
    save_tiny_base(data / "tiny-llama")
    write_task(data / "rev.jsonl", "reverse")
    spec_file = tmp_path / "client" / "rev.yaml"  # not next to the data: its relative paths are the server's
    spec_file.parent.mkdir()
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "rev",
                "base_model": {"path": "tiny-llama"},
                "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
                "prefix": {"num_virtual_tokens": 5},
                "training": {
                    "steps": 10,
                    "examples_per_step": 4,
                    "eval_every": 5,
                    "checkpoint_every": 5,
                    "learning_rate": 0.02,
                },
            }
        )
    )
    config = OrchestratorConfig.from_env(
        home=home, num_cpus=2, zero_stage=0, max_groups=1, poll_s=0.2, heartbeat_s=0.5, stale_after_s=5
    )
    api = start_api(config, port=0, tokens=frozenset({TOKEN}))
    monkeypatch.setenv("PREFIXD_TOKEN", TOKEN)
    capsys.readouterr()  # (DeepSpeed's import prints its accelerator on stdout)
    try:
        assert main(["--server", api.url, "submit", str(spec_file)]) == 0
        job_id, name, path = capsys.readouterr().out.strip().split("\t")
        assert (name, path) == ("rev", str(spec_file))

        with Orchestrator(config) as orchestrator:
            summary = orchestrator.run_until_empty()
        assert summary.jobs[job_id].state == "succeeded", summary.jobs[job_id].error

        # The orchestrator itself registered it in MLflow at config.tracking_uri, which the API reads.
        status = httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=AUTH, timeout=60).json()
        assert (status["state"], status["step"], status["total_steps"]) == ("succeeded", 10, 10)
        assert (status["registered"], status["registry_model"], status["registry_version"]) == (
            True,
            "prefixd-rev",
            "1",
        )
        version = httpx.get(f"{api.url}/v1/models/rev", headers=AUTH, timeout=60).json()
        assert (version["name"], version["version"], version["job_id"], version["task"]) == (
            "prefixd-rev",
            "1",
            job_id,
            "rev",
        )
        assert version["aliases"] == ["champion", "latest"] and "eval_loss" in version["metrics"]
        assert version["base_model"].startswith(f"path:{data / 'tiny-llama'}")

        capsys.readouterr()
        for argv in (
            ["lookup", "rev"],
            ["lookup", "rev", "--json"],
            ["models"],
            ["models", "--json"],
            ["status", job_id],
        ):
            assert main(["--server", api.url, *argv]) == 0
            remote = capsys.readouterr().out
            assert main(["--home", str(home), *argv]) == 0
            assert remote == capsys.readouterr().out, argv
    finally:
        api.stop()


def test_tenants_may_each_read_only_their_own_data_folder(tmp_path, monkeypatch):
    """PREFIXD_TENANT_DATA_DIRS=1: a tenant's spec paths are read under <data_root>/<tenant>/ only; a sibling's
    file, the shared root and a missing file get one answer; an admin reads the whole root."""
    monkeypatch.setenv("PREFIXD_TENANT_DATA_DIRS", "1")
    data = tmp_path / "data"
    for folder in ("alice", "bob"):
        (data / folder).mkdir(parents=True)
        write_task(data / folder / "rev.jsonl", "reverse")
    write_task(data / "shared.jsonl", "reverse")
    config = OrchestratorConfig.from_env(home=tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    api = start_api(config, port=0, tokens=["alice=tok-a", "bob=tok-b"], admin_tokens=["ops=tok-o"])
    try:

        def validate(token: str, train: str) -> httpx.Response:
            body = spec(data={"train": train, "input_column": "input", "target_column": "target", "max_length": 40})
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.post(api.url + "/v1/specs/validate", json=body, headers=headers, timeout=120)

        assert validate("tok-a", "rev.jsonl").status_code == 200
        refusals = {validate("tok-a", p).text for p in ("../bob/rev.jsonl", "../shared.jsonl", "missing.jsonl")}
        assert len(refusals) == 1 and validate("tok-a", "../bob/rev.jsonl").status_code == 422
        assert "bob" not in refusals.pop()
        assert validate("tok-o", "bob/rev.jsonl").status_code == 200
        assert validate("tok-o", "shared.jsonl").status_code == 200
    finally:
        api.stop()
