"""One registrar, and registry ownership, for real: a tiny Llama trained once (its result folder copied
per job), a real PostgreSQL job store shared by two Orchestrator objects registering at the same time
into one sqlite MLflow store, and other tenants' attempts on a model or an experiment they do not own.

Run: python -m pytest -q tests/test_registrar.py
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from sqlalchemy import select

from jobs.spec import JobSpec, parse_spec
from orchestrator import registry
from orchestrator.api import ApiSettings, create_app
from orchestrator.config import OrchestratorConfig, default_tracking_uri
from orchestrator.plan import base_model_ref, task_config
from orchestrator.scheduler import Orchestrator
from orchestrator.store import JobStore, leases_table
from orchestrator.tenants import parse_entries
from tests.tiny import save_tiny_base, write_task
from workers.models import load_base_model
from workers.trainer import MultiTaskTrainer


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def make_spec(root: Path, **over):
    raw = {
        "name": "rev",
        "base_model": {"path": "base"},
        "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "prefix": {"num_virtual_tokens": 4},
        "training": {"steps": 2, "examples_per_step": 4, "eval_every": 2, "checkpoint_every": 100},
    } | over
    return parse_spec(raw, base_dir=root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data root with a tiny Llama and a task, and one result folder of a 2-step job on them."""
    root = tmp_path_factory.mktemp("registrar")
    save_tiny_base(root / "base")
    write_task(root / "rev.jsonl", "reverse", n=20)
    spec = make_spec(root)
    model, tokenizer = load_base_model(base_model_ref(spec))
    trainer = MultiTaskTrainer(model, tokenizer, micro_batch_size=8)
    trainer.add_task(task_config(spec, "train-rev", root / "result"))
    while trainer.active:
        trainer.step()
    return root


def finished(store: JobStore, spec, result: Path, dst: Path, tenant: str | None, **metrics) -> str:
    """A succeeded job whose result folder is a copy of `result` (with these final metrics, if given)."""
    shutil.copytree(result, dst)
    if metrics:
        (dst / "metrics.json").write_text(json.dumps(metrics))
    job_id = store.submit(spec.to_dict(), task=spec.name, base_key=spec.base_model.base_key, tenant=tenant)
    [claimed] = store.claim("trainer", base_key=spec.base_model.base_key)
    store.finish(claimed.id, "succeeded", result_dir=str(dst))
    return job_id


BODY = {  # a spec of task rev on the tiny base, as a client sends it
    "name": "rev",
    "base_model": {"path": "base"},
    "training": {"steps": 2},
    "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
}


def api_of(store: JobStore, data_root: Path, uri: str) -> TestClient:
    """The HTTP API over this store and MLflow, with tenants alice (token 'ta') and bob ('tb')."""
    callers = parse_entries(["alice=ta", "bob=tb"])
    return TestClient(
        create_app(ApiSettings(store_url=store.url, callers=callers, data_root=data_root, tracking_uri=uri))
    )


def test_two_orchestrators_on_one_postgres_store_register_each_job_once(trained, fresh_postgres_url, tmp_path):
    uri = default_tracking_uri(tmp_path / "mlflow-home")
    spec = make_spec(trained)
    store = JobStore(fresh_postgres_url)
    ids = [finished(store, spec, trained / "result", tmp_path / f"job{i}", "alice") for i in range(20)]
    configs = [
        OrchestratorConfig.from_env(home=tmp_path / f"orch{i}", store_url=fresh_postgres_url, mlflow_uri=uri)
        for i in range(2)
    ]
    orchestrators = [Orchestrator(c) for c in configs]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def register(o: Orchestrator) -> None:
        barrier.wait()
        try:
            while store.pending_registrations():
                o._register_finished(now=True)  # the scheduler's own registration step, lease and all
                time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(o,)) for o in orchestrators]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for o in orchestrators:
        o.close()
    assert not errors, errors
    versions = MlflowClient(uri, uri).search_model_versions("name = 'prefixd-rev'")
    assert sorted(v.tags["prefixd.job_id"] for v in versions) == sorted(ids)  # 20 versions, none twice
    # Not even one made and deleted again (what two registrars racing on one job leave: a gap).
    assert sorted(int(v.version) for v in versions) == list(range(1, 21))
    rows = [store.get(j) for j in ids]
    assert all(r.registered for r in rows)
    assert sorted(int(r.registry_version) for r in rows) == list(range(1, 21))
    with store._engine.connect() as c:  # each pass gave the registrar's lease back
        assert c.execute(select(leases_table.c.holder).where(leases_table.c.name == "registrar")).all() == []
    assert MlflowClient(uri, uri).get_registered_model("prefixd-rev").tags["prefixd.owner"] == "alice"
    store.close()


def test_a_model_belongs_to_its_tenant(trained, tmp_path):
    uri = default_tracking_uri(tmp_path / "mlflow-home")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    client = MlflowClient(uri, uri)
    spec = make_spec(trained)
    alice_job = finished(store, spec, trained / "result", tmp_path / "a1", "alice", eval_loss=2.0)
    assert registry.register_pending(store, uri) == [alice_job]

    # bob names alice's model, with a far better metric and the decision tag a spec stored before the
    # reserved-tag rule could carry: his registration is refused, and nothing moves.
    hijack = spec.to_dict() | {"tags": {"prefixd.champion_decision": "promote"}}
    bob_job = store.submit(hijack, task="rev", base_key=spec.base_model.base_key, tenant="bob")
    shutil.copytree(trained / "result", tmp_path / "b1")
    (tmp_path / "b1" / "metrics.json").write_text(json.dumps({"eval_loss": 0.001}))
    store.claim("trainer")
    store.finish(bob_job, "succeeded", result_dir=str(tmp_path / "b1"))
    assert registry.register_pending(store, uri) == []
    row = store.get(bob_job)
    assert (
        not row.registered and "belongs to tenant 'alice'; tenant 'bob' cannot add versions" in row.registration_error
    )
    assert [str(v.version) for v in client.search_model_versions("name = 'prefixd-rev'")] == ["1"]
    assert str(client.get_registered_model("prefixd-rev").aliases["champion"]) == "1"

    # alice's own worse version with the same tag: registered, but the tag is dropped and the champion stays.
    worse = finished(store, JobSpec.from_dict(hijack), trained / "result", tmp_path / "a2", "alice", eval_loss=3.0)
    assert registry.register_pending(store, uri) == [worse]
    v2 = client.get_model_version("prefixd-rev", "2")
    assert v2.tags["prefixd.champion_decision"] == "keep"
    assert str(client.get_registered_model("prefixd-rev").aliases["champion"]) == "1"

    # Over HTTP, bob's spec naming alice's model is refused before anything is queued.
    with api_of(store, trained, uri) as http:
        r = http.post("/v1/jobs", json=BODY, headers={"Authorization": "Bearer tb"})
        assert r.status_code == 422 and r.json()["problems"][0]["path"] == "registry.model_name"
        r = http.post(
            "/v1/jobs", json=BODY | {"registry": {"model_name": "bobs-rev"}}, headers={"Authorization": "Bearer tb"}
        )
        assert r.status_code == 201
        assert http.post("/v1/jobs", json=BODY, headers={"Authorization": "Bearer ta"}).status_code == 201
    store.close()


def test_an_experiment_belongs_to_its_tenant(trained, tmp_path):
    uri = default_tracking_uri(tmp_path / "mlflow-home")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    client = MlflowClient(uri, uri)

    def spec_of(tenant: str, **registry_fields):
        return make_spec(trained, registry={"model_name": f"{tenant}-rev", **registry_fields})

    def runs_in(experiment: str) -> list[str]:
        exp = client.get_experiment_by_name(experiment)
        return sorted(r.data.tags["prefixd.job_id"] for r in client.search_runs([exp.experiment_id]))

    # alice creates her experiment and may use it again; it records her as its owner.
    alice = [
        finished(store, spec_of("alice", experiment="alice-lab"), trained / "result", tmp_path / f"a{i}", "alice")
        for i in range(2)
    ]
    assert registry.register_pending(store, uri) == alice
    assert client.get_experiment_by_name("alice-lab").tags["prefixd.owner"] == "alice"
    assert registry.experiment_owner(uri, "alice-lab") == "alice"

    # bob names it, to register and to log only: both refused, nothing written (not even his model).
    bob = finished(store, spec_of("bob", experiment="alice-lab"), trained / "result", tmp_path / "b1", "bob")
    bob_log = finished(
        store, spec_of("bob", experiment="alice-lab", register=False), trained / "result", tmp_path / "b2", "bob"
    )
    assert registry.register_pending(store, uri) == []
    for job_id in (bob, bob_log):
        row = store.get(job_id)
        assert not row.registered, job_id
        assert (
            "experiment 'alice-lab' belongs to tenant 'alice'; tenant 'bob' cannot log runs" in row.registration_error
        )
    assert runs_in("alice-lab") == sorted(alice)
    assert client.search_registered_models("name = 'bob-rev'") == []

    # The local admin may log into it; the shared default experiment (prefixd/<base>) takes every tenant.
    local = finished(store, spec_of("local", experiment="alice-lab"), trained / "result", tmp_path / "l1", None)
    shared = [finished(store, spec_of(t), trained / "result", tmp_path / f"s-{t}", t) for t in ("alice", "bob")]
    assert registry.register_pending(store, uri) == [local, *shared]
    assert runs_in("alice-lab") == sorted([*alice, local])
    default = registry.experiment_name(spec_of("bob"))
    assert default.startswith("prefixd/") and runs_in(default) == sorted(shared)
    assert "prefixd.owner" not in client.get_experiment_by_name(default).tags
    assert client.get_experiment_by_name("alice-lab").tags["prefixd.owner"] == "alice"

    # Over HTTP, bob's spec naming alice's experiment is refused before anything is queued; alice's is taken.
    with api_of(store, trained, uri) as http:
        for token, model in (("tb", "bob-rev"), ("ta", "alice-rev")):
            spec = BODY | {"registry": {"experiment": "alice-lab", "model_name": model}}
            r = http.post("/v1/jobs", json=spec, headers={"Authorization": f"Bearer {token}"})
            if token == "tb":
                assert r.status_code == 422, r.text
                [problem] = r.json()["problems"]
                assert problem["path"] == "registry.experiment" and "another tenant" in problem["message"]
            else:
                assert r.status_code == 201, r.text
    store.close()
