"""Uploads over real HTTP (orchestrator/files.py): POST/GET/DELETE /v1/files, tenant isolation, a spec naming
`file-...` ids (unknown and deleted ones refused naming the field), an over-limit chunked upload refused with
413 in bounded server memory (the server runs in its own process so /proc shows its RSS), and one job end to
end: `prefixd --server URL submit` of a spec whose data file exists only on the client side trains.

Run: python -m pytest -q tests/test_uploads.py
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api_server import api_server, auth, send_chunked
from tests.test_tenants import read_rss_kib
from tests.tiny import save_tiny_base, write_task

ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB, OPS = "tok-up-alice", "tok-up-bob", "tok-up-ops"
LIMIT = 16 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, pid, home) of an API with tenants alice and bob, admin ops, and a 16 MiB upload limit."""
    home = tmp_path_factory.mktemp("uploads")
    (home / "data").mkdir()
    with api_server(
        home,
        {
            "PREFIXD_API_TOKENS": f"alice={ALICE},bob={BOB}",
            "PREFIXD_ADMIN_TOKENS": f"ops={OPS}",
            "PREFIXD_MAX_UPLOAD_BYTES": str(LIMIT),
        },
    ) as (url, pid):
        yield url, pid, home


def rows(n: int = 3) -> bytes:
    return b"".join(b'{"input": "q%d", "target": "a%d"}\n' % (i, i) for i in range(n))


def upload(url: str, token: str, body: bytes, name: str = "train.jsonl") -> httpx.Response:
    return httpx.post(
        url + "/v1/files",
        params={"name": name},
        content=body,
        headers=auth(token) | {"Content-Type": "application/octet-stream"},
    )


def spec(train: str, **over) -> dict:
    return {
        "name": "up",
        "base_model": {"builtin": "smollm2-135m"},
        "data": {"train": train, "input_column": "input", "target_column": "target", "max_length": 40},
        "training": {"steps": 5},
    } | over


def test_upload_list_get_delete_and_tenants(server):
    url, _, home = server
    body = rows()
    r = upload(url, ALICE, body)
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["id"].startswith("file-") and len(meta["id"]) == 37
    assert (meta["name"], meta["size"], meta["sha256"], meta["tenant"]) == (
        "train.jsonl",
        len(body),
        hashlib.sha256(body).hexdigest(),
        "alice",
    )
    stored = home / "files" / "alice" / meta["id"] / "data.jsonl"
    assert stored.read_bytes() == body  # under the storage URI (the home folder by default), suffix kept
    fid = meta["id"]
    assert [m["id"] for m in httpx.get(url + "/v1/files", headers=auth(ALICE)).json()] == [fid]
    assert httpx.get(f"{url}/v1/files/{fid}", headers=auth(ALICE)).json() == meta

    # Bob sees nothing of it: 404 as for a missing file, empty list, cannot delete it, cannot train on it.
    assert httpx.get(url + "/v1/files", headers=auth(BOB)).json() == []
    for method in ("get", "delete"):
        theirs = httpx.request(method, f"{url}/v1/files/{fid}", headers=auth(BOB))
        missing = httpx.request(method, f"{url}/v1/files/file-{'0' * 32}", headers=auth(BOB))
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["detail"] == f"no such file: {fid}"  # the same words as for a missing one
    refused = httpx.post(url + "/v1/specs/validate", json=spec(fid), headers=auth(BOB))
    assert refused.status_code == 422 and refused.json()["problems"][0]["path"] == "data.train"
    assert str(home) not in refused.text

    # The admin sees every tenant's files.
    assert fid in {m["id"] for m in httpx.get(url + "/v1/files", headers=auth(OPS)).json()}
    assert httpx.get(f"{url}/v1/files/{fid}", headers=auth(OPS)).json()["tenant"] == "alice"

    ok = httpx.post(url + "/v1/specs/validate", json=spec(fid), headers=auth(ALICE))
    assert ok.status_code == 200, ok.text
    assert httpx.delete(f"{url}/v1/files/{fid}", headers=auth(ALICE)).status_code == 204
    assert not stored.parent.exists()
    assert httpx.get(f"{url}/v1/files/{fid}", headers=auth(ALICE)).status_code == 404


def test_specs_naming_unknown_or_deleted_ids_are_refused_naming_the_field(server):
    url, _, _ = server
    fid = upload(url, ALICE, rows(), name="val.jsonl").json()["id"]
    assert httpx.delete(f"{url}/v1/files/{fid}", headers=auth(ALICE)).status_code == 204
    cases = [(spec(fid), "data.train"), (spec(f"file-{'a' * 32}"), "data.train"), (spec("file-xyz"), "data.train")]
    good = upload(url, ALICE, rows()).json()["id"]
    cases.append(
        (
            spec(good, data={"train": good, "validation": fid, "input_column": "input", "target_column": "target"}),
            "data.validation",
        )
    )
    for body, field in cases:
        r = httpx.post(url + "/v1/jobs", json=body, headers=auth(ALICE))
        assert r.status_code == 422, r.text
        assert [p["path"] for p in r.json()["problems"]] == [field], r.text
    assert httpx.get(url + "/v1/jobs", headers=auth(ALICE)).json() == []
    r = httpx.post(url + "/v1/jobs", json=spec(good), headers=auth(ALICE))
    assert r.status_code == 201, r.text


def test_bad_upload_requests(server):
    url, _, _ = server
    assert httpx.post(url + "/v1/files", content=b"x", params={"name": "a.csv"}).status_code == 401
    assert httpx.post(url + "/v1/files", content=b"x", headers=auth(ALICE)).status_code == 422  # no name
    for name in ("../x.csv", "a/b.csv", "x" * 300):
        r = upload(url, ALICE, b"x", name=name)
        assert r.status_code == 422 and "name" in r.text, (name, r.text)
    multi = httpx.post(
        url + "/v1/files", params={"name": "a.csv"}, files={"f": ("a.csv", b"a,b\n")}, headers=auth(ALICE)
    )
    assert multi.status_code == 415 and "raw body" in multi.json()["detail"]
    assert upload(url, ALICE, b"x" * (LIMIT + 1)).status_code == 413  # by Content-Length
    assert httpx.get(url + "/v1/files/nope", headers=auth(ALICE)).status_code == 404


def test_over_limit_chunked_upload_413_in_bounded_memory(server):
    url, pid, home = server
    for _ in range(3):  # warm up the upload path
        fid = upload(url, ALICE, rows()).json()["id"]
        httpx.delete(f"{url}/v1/files/{fid}", headers=auth(ALICE))
    before = read_rss_kib(pid)
    near = upload(url, ALICE, b"y" * (LIMIT - 10), name="near.csv")  # just under the limit: stored, streamed
    assert near.status_code == 201 and near.json()["size"] == LIMIT - 10
    started = time.monotonic()
    response, sent = send_chunked(url, "/v1/files?name=big.csv", ALICE, "application/octet-stream", 6 * LIMIT)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 4 * LIMIT and time.monotonic() - started < 30
    grown = read_rss_kib(pid) - before
    assert grown * 1024 < LIMIT // 2, f"the server's RSS grew by {grown} KiB"
    names = {m["name"] for m in httpx.get(url + "/v1/files", headers=auth(ALICE)).json()}
    assert "big.csv" not in names and "near.csv" in names  # nothing kept of the refused upload
    leftovers = [p for p in (home / "files").rglob("*") if p.is_file() and p.stat().st_size > LIMIT]
    assert leftovers == []


# ---- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow  # starts Ray, trains
def test_server_submit_uploads_client_side_data_and_trains(tmp_path, monkeypatch, capsys):
    """The spec's data file exists only next to the spec on the client; `prefixd --server URL submit`
    uploads it, the stored spec names the upload, and the orchestrator trains the job to success."""
    from orchestrator.api_server import start_api
    from orchestrator.cli import main
    from orchestrator.config import OrchestratorConfig
    from orchestrator.scheduler import Orchestrator
    from orchestrator.store import JobStore

    for name in (
        "PREFIXD_HOME",
        "PREFIXD_STORE_URL",
        "PREFIXD_RAY_ADDRESS",
        "PREFIXD_SERVER",
        "PREFIXD_DATA_ROOT",
        "MLFLOW_TRACKING_URI",
        "PREFIXD_STORAGE",
        "PREFIXD_MAX_UPLOAD_BYTES",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "server"
    save_tiny_base(home / "data" / "tiny-llama")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    write_task(client_dir / "rev.jsonl", "reverse")
    spec_file = client_dir / "rev.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "rev",
                "base_model": {"path": "tiny-llama"},
                "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
                "prefix": {"num_virtual_tokens": 5},
                "registry": {"register": False},
                "training": {
                    "steps": 6,
                    "examples_per_step": 4,
                    "eval_every": 3,
                    "checkpoint_every": 3,
                    "learning_rate": 0.02,
                },
            }
        )
    )
    config = OrchestratorConfig.from_env(
        home=home, num_cpus=2, zero_stage=0, max_groups=1, poll_s=0.2, heartbeat_s=0.5, stale_after_s=5
    )
    api = start_api(config, port=0, tokens=["alice=tok-e2e"])
    monkeypatch.setenv("PREFIXD_TOKEN", "tok-e2e")
    capsys.readouterr()
    try:
        assert main(["--server", api.url, "submit", str(spec_file)]) == 0
        job_id, name, path = capsys.readouterr().out.strip().split("\t")
        assert (name, path) == ("rev", str(spec_file))
        stored = JobStore(config.store_url).get(job_id)
        train = Path(stored.spec["data"]["train"])
        assert train.parent.parent == home / "files" / "alice" and train.name == "data.jsonl"
        assert train.read_bytes() == (client_dir / "rev.jsonl").read_bytes()
        with Orchestrator(config) as orchestrator:
            summary = orchestrator.run_until_empty()
        assert summary.jobs[job_id].state == "succeeded", summary.jobs[job_id].error
    finally:
        api.stop()
