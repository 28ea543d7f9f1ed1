"""Tenants over real HTTP: a `start_api` server in its own process (so its memory can be read from /proc),
tokens and quotas from the environment as an operator sets them. Isolation on every route both ways, the
admin, quotas (429), reserved tags, the data-root leak, and hostile bodies (deep nesting, a 64 MiB
chunked body) against the server's resident memory.

Run: python -m pytest -q tests/test_tenants.py
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.api_server import api_server, auth, send_chunked

ALICE, BOB, BARE, OPS = "tok-alice-1", "tok-bob-1", "bare-token-77", "tok-ops-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, pid, data root) of an API whose tokens, admin token and quotas come from the environment."""
    home = tmp_path_factory.mktemp("tenants")
    data = home / "data"
    data.mkdir()
    (data / "ok.jsonl").write_text('{"input": "x", "target": "y"}\n')
    (data / "other.csv").write_text("a,b\n1,2\n")
    (data / "link.csv").symlink_to("/etc/passwd")
    (data / "rootlink").symlink_to("/root")
    (home / "tokens").write_text(f"# operator's token file\nbob={BOB}\n{BARE}\n")
    (home / "quotas.yaml").write_text("bob: {max_queued: 2, max_priority: 5}\n")
    with api_server(
        home,
        {
            "PREFIXD_API_TOKENS": f"alice={ALICE}",
            "PREFIXD_API_TOKENS_FILE": str(home / "tokens"),
            "PREFIXD_ADMIN_TOKENS": f"ops={OPS}",
            "PREFIXD_QUOTAS": str(home / "quotas.yaml"),
        },
    ) as (url, pid):
        yield url, pid, data


def spec(name="rev", **over):
    return {
        "name": name,
        "base_model": {"builtin": "smollm2-135m"},
        "data": {"train": "ok.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "training": {"steps": 5},
    } | over


def submit(url, token, **over) -> httpx.Response:
    return httpx.post(url + "/v1/jobs", json=spec(**over), headers=auth(token))


def test_every_job_route_is_scoped_to_its_tenant_both_ways(server):
    url, _, _ = server
    mine = {token: submit(url, token, name=f"t-{i}").json()["job_id"] for i, token in enumerate((ALICE, BOB, BARE))}
    for token, job_id in mine.items():
        listed = httpx.get(url + "/v1/jobs", headers=auth(token)).json()
        assert [j["id"] for j in listed] == [job_id]
        assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(token)).json()["tenant"] == listed[0]["tenant"]
        own = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=auth(token)).json()
        assert not own["has_more"] and [e["message"].split(":")[0] for e in own["data"]] == ["submitted"]
        for other, foreign in mine.items():
            if other == token:
                continue
            for method, path in (("get", ""), ("post", "/cancel"), ("get", "/logs"), ("get", "/events")):
                r = httpx.request(method, f"{url}/v1/jobs/{foreign}{path}", headers=auth(token))
                unknown = httpx.request(method, f"{url}/v1/jobs/j-nope{path}", headers=auth(token))
                assert r.status_code == unknown.status_code == 404, (method, path)
                assert r.json()["detail"] == unknown.json()["detail"].replace("j-nope", foreign)  # nothing told
    assert {j["tenant"] for j in httpx.get(url + "/v1/jobs", headers=auth(ALICE)).json()} == {"alice"}
    assert all(httpx.get(f"{url}/v1/jobs/{j}", headers=auth(OPS)).json()["state"] == "queued" for j in mine.values())


def test_the_admin_sees_and_controls_all(server):
    url, _, _ = server
    job_id = submit(url, ALICE, name="for-admin").json()["job_id"]
    listed = {j["id"]: j["tenant"] for j in httpx.get(url + "/v1/jobs", headers=auth(OPS)).json()}
    assert listed[job_id] == "alice" and {"alice", "bob"} <= set(listed.values())
    assert any(t.startswith("token-") for t in listed.values())  # the bare token's tenant
    assert httpx.get(f"{url}/v1/jobs/{job_id}/logs", headers=auth(OPS)).status_code == 200
    [submitted] = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=auth(OPS)).json()["data"]
    assert submitted["message"].startswith("submitted: task for-admin")
    assert httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=auth(OPS)).json()["state"] == "cancelled"
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(ALICE)).json()["state"] == "cancelled"


def test_quotas_refuse_with_429_and_say_why(server):
    url, _, _ = server
    assert submit(url, BOB, priority=9).status_code == 429
    r = submit(url, BOB, priority=9)
    assert r.json()["detail"] == "priority 9 is over tenant 'bob''s highest priority, 5 (its max_priority quota)"
    queued = len(httpx.get(url + "/v1/jobs?state=queued", headers=auth(BOB)).json())
    for _ in range(2 - queued):
        assert submit(url, BOB).status_code == 201
    r = submit(url, BOB)
    assert r.status_code == 429 and r.json()["detail"].startswith(
        "tenant 'bob' has 2 job(s) queued and its quota is 2 (max_queued)"
    )
    assert submit(url, ALICE, priority=9).status_code == 201  # alice has no quota; the admin is exempt too
    assert submit(url, OPS, priority=1000).status_code == 201


def test_reserved_tags_are_refused_naming_the_field(server):
    url, _, _ = server
    r = submit(url, ALICE, tags={"prefixd.champion_decision": "promote"})
    assert r.status_code == 422
    assert [p["path"] for p in r.json()["problems"]] == ["tags.prefixd.champion_decision"]


def test_paths_outside_the_data_root_all_get_one_answer_without_a_byte_of_them(server):
    url, _, data = server
    outside = [
        "/etc/passwd",
        "../../../../../etc/passwd",
        "/root",
        "/root/.bashrc",
        "/nonexistent/x.csv",
        "missing.csv",
        "link.csv",
        "rootlink",
        "rootlink/x",
        str(data / ".." / "tokens"),
    ]
    answers = set()
    for path in outside:
        for fmt in ("csv", "auto"):
            body = spec(data={"train": path, "format": fmt, "input_column": "root", "target_column": "x"})
            r = httpx.post(url + "/v1/specs/validate", json=body, headers=auth(ALICE))
            assert r.status_code == 422
            answers.add(r.text)
    [answer] = answers  # the same bytes for every one of them
    first_line = Path("/etc/passwd").read_text().splitlines()[0]
    for piece in (first_line, "root:", ":0:0:", "/bin/", "passwd", "bashrc", "tokens", str(data), "No such"):
        assert piece not in answer
    # Inside the data root, a column that is missing is named, but the file's header is not quoted.
    r = httpx.post(
        url + "/v1/specs/validate",
        headers=auth(ALICE),
        json=spec(data={"train": "other.csv", "input_column": "input", "target_column": "target"}),
    )
    assert r.status_code == 422 and "'input' is not in data.train 'other.csv'" in r.text and "a, b" not in r.text


def read_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_hostile_bodies_are_refused_in_bounded_memory(server):
    url, pid, _ = server
    for _ in range(3):  # warm up: first requests import and allocate what every request needs
        httpx.post(url + "/v1/specs/validate", json=spec(), headers=auth(ALICE))
        httpx.post(url + "/v1/specs/validate", content=b"[[1]]", headers=auth(ALICE))
    before = read_rss_kib(pid)
    deep = b"[" * 100_000 + b"]" * 100_000
    for ctype in ("application/json", "application/yaml"):
        r = httpx.post(url + "/v1/specs/validate", content=deep, headers=auth(ALICE) | {"Content-Type": ctype})
        assert r.status_code == 422 and "nested more than 32 levels deep" in r.text
    deep_map = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    assert httpx.post(url + "/v1/specs/validate", content=deep_map, headers=auth(ALICE)).status_code == 422
    started = time.monotonic()
    response, sent = send_chunked(url, "/v1/specs/validate", ALICE, "application/json", 64 << 20)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 32 << 20 and time.monotonic() - started < 30  # it stopped reading: most was never sent
    grown = read_rss_kib(pid) - before
    assert grown < 16 * 1024, f"the server's RSS grew by {grown} KiB"
    assert httpx.get(url + "/healthz").json() == {"ok": True}
    assert submit(url, ALICE, name="after").status_code == 201


def test_bodies_are_read_like_spec_files(server):
    url, _, _ = server
    yaml_body = (
        "name: lr\nbase_model: {builtin: smollm2-135m}\ntraining: {steps: 5, learning_rate: 1e-3}\n"
        "data: {train: ok.jsonl, input_column: input, target_column: target}\n"
    )
    as_yaml = auth(ALICE) | {"Content-Type": "application/yaml"}
    r = httpx.post(url + "/v1/specs/validate", content=yaml_body, headers=as_yaml)
    assert r.status_code == 200, r.text  # YAML 1.2: 1e-3 is a number, as in a spec file
    r = httpx.post(url + "/v1/specs/validate", content=yaml_body + "name: again\n", headers=as_yaml)
    assert r.status_code == 422
    assert r.json()["problems"][0] == {"path": "name", "message": "duplicate key (lines 1 and 5)"}
    r = httpx.post(
        url + "/v1/specs/validate",
        content=b'{"name": "a", "training": {"steps": 1, "steps": 2}}',
        headers=auth(ALICE) | {"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["problems"] == [{"path": "training.steps", "message": "duplicate key"}]


def test_token_entries():
    from orchestrator.tenants import Caller, callers_from_env, parse_entries

    assert parse_entries(["alice=a1", " alice=a2 ", "YWJj=", "b64==x"]) == {
        "a1": Caller("alice"),
        "a2": Caller("alice"),
        "YWJj=": Caller(parse_entries(["YWJj="])["YWJj="].tenant),
        "=x": Caller("b64"),
    }  # the text before the first '=' names a tenant when it can
    assert parse_entries(["YWJj="])["YWJj="].tenant.startswith("token-")
    for bad, message in (
        (["alice=t", "bob=t"], "already given to tenant 'alice'"),
        (["local=t"], "'local' is reserved"),
        (["a=b c"], "white space"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_entries(bad)
    with pytest.raises(ValueError, match="one token is given to tenant 'alice' and to admin 'ops'"):
        callers_from_env({"PREFIXD_API_TOKENS": "alice=t", "PREFIXD_ADMIN_TOKENS": "ops=t"})
