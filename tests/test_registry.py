"""Jobs into MLflow for real: a tiny Llama trained for a few steps, logged and registered against a
sqlite store and against a real `mlflow server` on 127.0.0.1 (stopped mid-batch and started again).

Run: python -m pytest -q tests/test_registry.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from jobs.spec import parse_spec
from orchestrator import registry
from orchestrator.cli import main
from orchestrator.generation import load_pyfunc
from orchestrator.plan import base_model_ref, task_config
from orchestrator.pyfunc_model import PrefixPyfuncModel
from orchestrator.registry import (
    RegistryError,
    default_tracking_uri,
    download,
    log_job,
    lookup,
    register_job,
    register_pending,
    search_models,
)
from orchestrator.store import JobStore
from tests.tiny import peft_reference, save_tiny_base, write_task
from workers.formats import load_prefix
from workers.generate import generate_texts
from workers.inject import PrefixedModel
from workers.models import ModelLoadError, load_base_model, weights_fingerprint
from workers.trainer import MultiTaskTrainer

PROMPTS = ["rev abcd=", "dbl 1234=", "rev hgfe="]  # equal lengths: no padding in the logits comparison


class Clock:
    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Fail fast when the server is down: register_pending's own backoff does the retrying.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def make_spec(root: Path, name: str, base: Path, **registry_fields):
    raw = {
        "name": name,
        "base_model": {"path": str(base)},
        "data": {"train": f"{name}.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "prefix": {"num_virtual_tokens": {"rev": 4, "dbl": 6}.get(name, 4)},
        "training": {
            "steps": 6,
            "examples_per_step": 4,
            "learning_rate": 3e-2,
            "eval_every": 3,
            "checkpoint_every": 100,
            "seed": 1,
        },
        "registry": registry_fields,
        "tags": {"team": "nlp", "kind": name},
    }
    return parse_spec(raw, base_dir=root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama base folder and two tasks trained on it together for 6 steps."""
    root = tmp_path_factory.mktemp("trained")
    base = root / "base"
    save_tiny_base(base)
    write_task(root / "rev.jsonl", "reverse", n=40, seed=1)
    write_task(root / "dbl.jsonl", "double", n=40, seed=2)
    specs = {name: make_spec(root, name, base) for name in ("rev", "dbl")}
    model, tokenizer = load_base_model(base_model_ref(specs["rev"]))
    trainer = MultiTaskTrainer(model, tokenizer, micro_batch_size=8)
    for name, spec in specs.items():
        trainer.add_task(task_config(spec, f"train-{name}", root / "out" / name))
    while trainer.active:
        trainer.step()
    return {"root": root, "base": base, "specs": specs, "results": {n: root / "out" / n for n in specs}}


def finished_job(store, spec, source: Path, dst: Path, **metrics) -> str:
    """Submit, claim and finish a job whose result folder is a copy of `source` with these final metrics
    (crafted, so the champion rule can be tested both ways)."""
    shutil.copytree(source, dst)
    if metrics:
        (dst / "metrics.json").write_text(json.dumps(metrics))
    job_id = store.submit(spec.to_dict(), task=spec.name, base_key=spec.base_model.base_key)
    [claimed] = store.claim("orch-test")
    assert claimed.id == job_id
    store.finish(job_id, "succeeded", result_dir=str(dst))
    return job_id


def versions_of(uri: str, name: str):
    return sorted(MlflowClient(uri, uri).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def aliases(model) -> dict[str, str]:
    """A registered model's aliases; sqlite gives int versions, HTTP strings."""
    return {a: str(v) for a, v in model.aliases.items()}


def args(**kw):
    return argparse.Namespace(**kw)


# ---------------------------------------------------------------------------------------------------


def test_sqlite_store_flow_runs_versions_aliases_champion(trained, tmp_path, capsys):
    home = tmp_path / "home"
    uri = default_tracking_uri(home)
    assert uri == f"sqlite:///{home.resolve()}/mlflow/mlflow.db"
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    rev = trained["specs"]["rev"]
    dbl_em = make_spec(trained["root"], "dbl", trained["base"], metric="exact_match")  # maximize
    assert dbl_em.registry.direction == "maximize"
    # (spec, eval_loss or exact_match, champion after it)
    plan = [
        (rev, dict(eval_loss=2.0, eval_perplexity=7.39), "1"),
        (rev, dict(eval_loss=2.5, eval_perplexity=12.2), "1"),  # worse: champion stays
        (rev, dict(eval_loss=1.5, eval_perplexity=4.48), "3"),  # better: champion moves
        (dbl_em, dict(eval_loss=3.0, exact_match=0.25), "1"),
        (dbl_em, dict(eval_loss=1.0, exact_match=0.125), "1"),  # lower loss, but exact_match decides
        (dbl_em, dict(eval_loss=2.0, exact_match=0.5), "3"),
    ]
    job_ids = []
    for i, (spec, metrics, champion) in enumerate(plan):
        job_ids.append(finished_job(store, spec, trained["results"][spec.name], tmp_path / f"job{i}", **metrics))
        assert register_pending(store, uri) == [job_ids[-1]]
        name = spec.registry.model_name
        assert str(MlflowClient(uri, uri).get_model_version_by_alias(name, "champion").version) == champion
    assert register_pending(store, uri) == []

    client = MlflowClient(uri, uri)
    # -- registered models, versions, tags, aliases
    for name, task, ids in (("prefixd-rev", "rev", job_ids[:3]), ("prefixd-dbl", "dbl", job_ids[3:])):
        model = client.get_registered_model(name)
        assert model.tags["prefixd.task"] == task
        assert aliases(model) == {"champion": "3"}
        assert model.tags["prefixd.champion_version"] == "3"
        versions = versions_of(uri, name)
        assert [str(v.version) for v in versions] == ["1", "2", "3"]
        assert [v.tags["prefixd.job_id"] for v in versions] == ids
        assert [store.get(j).registry_version for j in ids] == ["1", "2", "3"]
        assert all(store.get(j).registered and store.get(j).registry_model == name for j in ids)
        # 'latest' is MLflow's reserved alias: always the newest version
        assert str(client.get_model_version_by_alias(name, "latest").version) == "3"
    sha = weights_fingerprint(trained["base"])
    v1, v2, v3 = versions_of(uri, "prefixd-rev")
    assert v1.tags["prefixd.base_model"] == f"path:{trained['base']}:float32"
    assert v1.tags["prefixd.base_model_sha256"] == sha
    assert float(v1.tags["prefixd.metric.eval_loss"]) == 2.0
    assert float(v2.tags["prefixd.metric.eval_perplexity"]) == 12.2
    assert v1.tags["team"] == "nlp" and v1.tags["prefixd.registry_metric"] == "eval_loss"
    assert v1.tags["prefixd.champion_reason"] == "first version of the model (eval_loss 2)"
    assert v2.tags["prefixd.champion_reason"] == (
        "eval_loss 2.5 >= 2 of v1 (minimize): no improvement, champion stays v1"
    )
    assert v3.tags["prefixd.champion_reason"] == "eval_loss 1.5 < 2 of v1 (minimize)"
    assert [v.tags["prefixd.champion_decision"] for v in (v1, v2, v3)] == ["promote", "keep", "promote"]
    assert client.get_registered_model("prefixd-rev").tags["prefixd.champion_reason"] == (
        "v3: eval_loss 1.5 < 2 of v1 (minimize)"
    )
    d2 = versions_of(uri, "prefixd-dbl")[1]
    assert d2.tags["prefixd.champion_reason"].startswith("exact_match 0.125 <= 0.25 of v1 (maximize)")
    assert "job " + job_ids[0] in v1.description and "eval_loss = 2" in v1.description
    assert v1.source.startswith("models:/m-") and v1.run_id

    # -- the run behind a version
    run = client.get_run(v1.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "prefixd/path:" + str(trained["base"]).replace("/", "_") + ":float32"
    assert exp.artifact_location.startswith(str(home.resolve() / "mlflow" / "artifacts"))
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefixd.job_id"] == job_ids[0] and run.data.tags["prefixd.task"] == "rev"
    assert run.data.tags["prefixd.base_model_sha256"] == sha and run.data.tags["team"] == "nlp"
    assert run.data.params["training.steps"] == "6" and run.data.params["name"] == "rev"
    assert run.data.params == rev.flat_params()
    history = [json.loads(line) for line in (trained["results"]["rev"] / "history.jsonl").read_text().splitlines()]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(h["step"], h["loss"]) for h in history]
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in evals] == [3, 6]  # eval steps; the final value is metrics.json's (crafted)
    assert evals[0].value == history[2]["eval_loss"] and evals[1].value == 2.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_s")] == list(range(1, 7))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "prefix", "spec.json", "metrics.json", "history.jsonl", "data_report.txt"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    }
    spec_json = json.loads(Path(client.download_artifacts(run.info.run_id, "spec.json", str(tmp_path))).read_text())
    assert spec_json == rev.to_dict()

    # -- idempotent: registering or logging a job again changes nothing
    job0 = store.get(job_ids[0])
    assert register_job(uri, job0, rev, job0.result_dir) == ("prefixd-rev", "1")
    assert log_job(uri, job0, rev, job0.result_dir) == v1.run_id
    assert len(versions_of(uri, "prefixd-rev")) == 3
    runs = client.search_runs([exp.experiment_id], f"tags.`prefixd.job_id` = '{job_ids[0]}'")
    assert [r.info.run_id for r in runs] == [v1.run_id]
    assert aliases(client.get_registered_model("prefixd-rev")) == {"champion": "3"}

    # -- a spec with registry.register: false is logged, not registered
    quiet = make_spec(trained["root"], "rev", trained["base"], register=False, model_name="prefixd-rev-quiet")
    job_q = finished_job(store, quiet, trained["results"]["rev"], tmp_path / "jobq")
    assert register_pending(store, uri) == [job_q]
    stored = store.get(job_q)
    assert stored.registered and stored.registry_model.startswith("runs:/") and stored.registry_version == "-"
    assert client.get_run(stored.registry_model[len("runs:/") :]).data.tags["prefixd.job_id"] == job_q
    assert not client.search_registered_models("name = 'prefixd-rev-quiet'")

    # -- lookups by task and by model name; model search with filters; the CLI verbs
    info = lookup(uri, "rev")
    assert (info["name"], info["version"], info["aliases"], info["job_id"]) == (
        "prefixd-rev",
        "3",
        ["champion", "latest"],
        job_ids[2],
    )
    assert info["metrics"] == {"eval_loss": 1.5, "eval_perplexity": 4.48} and info["run_id"] == v3.run_id
    assert info["source"] == v3.source and info["base_model_sha256"] == sha
    assert lookup(uri, "prefixd-rev", version=2)["aliases"] == []
    assert lookup(uri, "dbl", alias="latest")["version"] == "3"
    found = search_models(uri)
    assert [(m["name"], m["champion_version"], m["latest_version"], m["versions"]) for m in found] == [
        ("prefixd-dbl", "3", "3", ["1", "2", "3"]),
        ("prefixd-rev", "3", "3", ["1", "2", "3"]),
    ]
    assert [m["name"] for m in search_models(uri, base=str(trained["base"]), tags={"kind": "rev"})] == ["prefixd-rev"]
    assert [m["name"] for m in search_models(uri, base=f"path:{trained['base']}")] == ["prefixd-dbl", "prefixd-rev"]
    assert search_models(uri, base="builtin:smollm2-135m") == []
    capsys.readouterr()
    assert main(["models", "--mlflow-uri", uri, "--tag", "kind=dbl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["MODEL", "TASK", "CHAMPION", "LATEST", "VERSIONS"]
    assert lines[1].split()[:5] == ["prefixd-dbl", "dbl", "3", "3", "1,2,3"] and len(lines) == 2
    assert main(["lookup", "rev", "--version", "1", "--json", "--mlflow-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == job_ids[0]
    assert (
        main(["lookup", "prefixd-rev", "--alias", "champion", "--download", str(tmp_path / "dl"), "--mlflow-uri", uri])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("prefixd-rev v3 (champion, latest)\n") and f"adapter written to {tmp_path / 'dl'}" in out
    assert "  eval_loss      1.5\n" in out and "  tag team       nlp\n" in out
    adapter = tmp_path / "job2" / "adapter"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "dl" / f).read_bytes() == (adapter / f).read_bytes()
    assert json.loads((tmp_path / "dl" / "base_model.json").read_text())["sha256"] == sha


@peft_reference
def test_mlflow_server_flow_peft_download_pyfunc_and_generate(trained, mlflow_server_uri, tmp_path, capsys):
    uri = mlflow_server_uri
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    rev, dbl = trained["specs"]["rev"], trained["specs"]["dbl"]
    ids = [finished_job(store, spec, trained["results"][spec.name], tmp_path / spec.name) for spec in (rev, dbl)]
    assert register_pending(store, uri) == ids
    assert [store.get(j).registry_version for j in ids] == ["1", "1"]
    client = MlflowClient(uri, uri)
    mv = client.get_model_version_by_alias("prefixd-rev", "champion")
    assert mv.version == "1" and mv.tags["prefixd.job_id"] == ids[0]  # versions are strings over HTTP
    assert mv.tags["prefixd.champion_reason"].startswith("first version of the model")
    assert register_job(uri, store.get(ids[0]), rev, store.get(ids[0]).result_dir) == ("prefixd-rev", "1")
    assert len(versions_of(uri, "prefixd-rev")) == 1
    info = lookup(uri, "rev")
    assert (info["version"], info["aliases"], info["job_id"]) == ("1", ["champion", "latest"], ids[0])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.params == rev.flat_params()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))

    # -- download: a PEFT adapter folder giving the same logits as prefixd's own loading
    import peft

    dl = download(uri, "rev", alias="champion", dst=tmp_path / "dl")
    assert {"adapter_config.json", "adapter_model.safetensors", "base_model.json"} <= {p.name for p in dl.iterdir()}
    ref = base_model_ref(rev)
    base_a, tokenizer = load_base_model(ref)
    base_b, _ = load_base_model(ref)
    peft_model = peft.PeftModel.from_pretrained(base_a, dl).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        _, encoder = load_prefix(trained["results"]["rev"] / "prefix", base_b.config)
        prefix = encoder.prompt_embeddings().detach()
        ours = (
            PrefixedModel(base_b)
            .forward([prefix], torch.zeros(len(PROMPTS), dtype=torch.long), batch["input_ids"], batch["attention_mask"])
            .logits
        )
    assert theirs.shape == ours.shape == (len(PROMPTS), len(PROMPTS[0]), 96)
    assert torch.equal(theirs, ours)

    # -- generation: prefixd's own path, the CLI's mixed batch and the pyfunc model agree
    expected = generate_texts(PrefixedModel(base_b), tokenizer, [prefix], [0] * len(PROMPTS), PROMPTS, max_new_tokens=8)
    capsys.readouterr()
    code = main(["generate", "--mlflow-uri", uri, "--task", "rev", "--task", "dbl", "--max-new-tokens", "8", *PROMPTS])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "== rev (prefixd-rev v1)" and out[len(PROMPTS) + 1] == "== dbl (prefixd-dbl v1)"
    by_task = {"rev": out[1 : len(PROMPTS) + 1], "dbl": out[len(PROMPTS) + 2 :]}
    assert by_task["rev"] == [f"{p}\t{t}" for p, t in zip(PROMPTS, expected)]

    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/prefixd-rev@champion")
        dbl_model = mlflow.pyfunc.load_model("models:/prefixd-dbl@latest")
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(model.unwrap_python_model(), PrefixPyfuncModel)
    assert model.predict(PROMPTS, params={"max_new_tokens": 8}) == expected
    frame = pd.DataFrame({"prompt": PROMPTS})
    assert dbl_model.predict(frame, params={"max_new_tokens": 8}) == [line.split("\t")[1] for line in by_task["dbl"]]
    assert model.predict(PROMPTS[:1]) == generate_texts(
        PrefixedModel(base_b), tokenizer, [prefix], [0], PROMPTS[:1], max_new_tokens=32
    )


def test_server_stopped_mid_batch_every_job_registered_exactly_once(trained, mlflow_server, tmp_path):
    mlflow_server.start()
    uri = mlflow_server.uri
    clock = Clock()
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", clock=clock)
    spec = make_spec(trained["root"], "rev", trained["base"], model_name="outage-rev")
    ids = [
        finished_job(store, spec, trained["results"]["rev"], tmp_path / f"job{i}", eval_loss=2.0 - i / 10)
        for i in range(4)
    ]

    def stop_after_first_registration():
        deadline = time.monotonic() + 120
        while not store.get(ids[0]).registered and time.monotonic() < deadline:
            time.sleep(0.02)
        mlflow_server.stop(kill=True)  # a crash: whatever request is in flight is cut off

    t0 = clock.now
    killer = threading.Thread(target=stop_after_first_registration)
    killer.start()
    first = register_pending(store, uri, now=t0)
    killer.join()
    assert first[0] == ids[0] and len(first) < len(ids), first
    left = [store.get(j) for j in ids if j not in first]
    for job in left:  # the rest stays succeeded-but-unregistered, due again after the backoff
        assert job.state == "succeeded" and not job.registered
        assert job.registration_attempts == 1 and job.next_registration_at == t0 + 30
        assert job.registration_error.startswith("MLflow unreachable")

    clock.now = t0 + 10
    assert register_pending(store, uri, now=clock.now) == []  # nothing due yet: MLflow not even tried
    # Still down when due: each is marked again, the backoff doubles.
    clock.now = t0 + 40
    assert register_pending(store, uri, now=clock.now) == []
    for job in (store.get(j.id) for j in left):
        assert job.registration_attempts == 2 and job.next_registration_at == t0 + 40 + 60

    mlflow_server.start()  # same port, same store
    clock.now = t0 + 200
    assert register_pending(store, uri, now=clock.now) == [j.id for j in left]
    clock.now = t0 + 10_000
    assert register_pending(store, uri, now=clock.now) == []
    versions = versions_of(uri, "outage-rev")
    assert sorted(v.tags["prefixd.job_id"] for v in versions) == sorted(ids)  # one version per job
    assert {store.get(j).registry_version for j in ids} == {str(v.version) for v in versions}
    assert all(store.get(j).registered for j in ids)
    client = MlflowClient(uri, uri)
    runs = client.search_runs(
        [client.get_run(versions[0].run_id).info.experiment_id], "tags.`prefixd.registered_model` = 'outage-rev'"
    )
    assert sorted(r.data.tags["prefixd.job_id"] for r in runs) == sorted(ids)  # one live run per job
    # eval_loss falls with each job: the champion is the last job's version
    last = next(v for v in versions if v.tags["prefixd.job_id"] == ids[-1])
    assert client.get_model_version_by_alias("outage-rev", "champion").version == last.version


def test_bad_input_names_the_problem(trained, tmp_path, capsys):
    uri = default_tracking_uri(tmp_path / "home")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    moved = tmp_path / "base-elsewhere"
    shutil.copytree(trained["base"], moved)
    spec = make_spec(trained["root"], "rev", moved)
    job_id = finished_job(store, spec, trained["results"]["rev"], tmp_path / "job")
    assert register_pending(store, uri) == [job_id]

    def fails(call, *message):
        with pytest.raises(RegistryError) as e:
            call()
        for m in message:
            assert m in str(e.value), str(e.value)

    fails(lambda: lookup(uri, "nope"), "no registered model for task or model 'nope'", "known: prefixd-rev")
    fails(lambda: lookup(uri, "it's"), '"it\'s" is not a task or model name')
    fails(lambda: lookup(uri, "rev", alias="staging"), "prefixd-rev has no alias 'staging'", "champion, latest")
    fails(lambda: lookup(uri, "rev", version=7), "prefixd-rev has no version 7; its versions: 1")
    fails(lambda: lookup(uri, "rev", version="two"), "version 'two'", "positive integer")
    fails(lambda: lookup(uri, "rev", alias="bad alias!"), "alias 'bad alias!' is not a valid alias name")
    fails(lambda: lookup(uri, "rev", alias="champion", version=1), "not both")
    fails(lambda: download(uri, "rev", dst=tmp_path / "job" / "metrics.json"), "is not a folder")

    cases = [
        (["lookup", "nope"], "'nope'"),
        (["lookup", "rev", "--alias", "gone"], "no alias 'gone'"),
        (["lookup", "rev", "--version", "9"], "no version 9"),
        (["lookup", "rev", "--alias=-x y"], "not a valid alias"),
        (["lookup", "rev", "--version", "two"], "expected an integer >= 1, got 'two'"),
        (["models", "--tag", "novalue"], "expected KEY=VALUE"),
        (["generate", "--task", "nope", "--max-new-tokens", "4", "a"], "'nope'"),
        (["generate", "--task", "rev", "--max-new-tokens", "0", "a"], "--max-new-tokens 0: must be >= 1"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main([*argv, "--mlflow-uri", uri]) == 2, argv
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"prefixd {argv[0]}: ") and message in err, err

    # The registered version's base model is gone from this machine: every loading path names it.
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["generate", "--mlflow-uri", uri, "--task", "rev", "--max-new-tokens", "4", "rev ab="]) == 2
    err = capsys.readouterr().err
    assert f"prefixd-rev v1: base model path:{moved}:float32" in err and "no such folder" in err, err
    fails(lambda: load_pyfunc(uri, "rev"), f"base model path:{moved}:float32")
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(ModelLoadError, match=f"base model path:{moved}:float32"):
            mlflow.pyfunc.load_model("models:/prefixd-rev@champion")
    finally:
        mlflow.set_tracking_uri(None)
    # A lookup needs no base model.
    assert lookup(uri, "rev")["base_model"] == f"path:{moved}:float32"


def test_tracking_uri_from_args(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXD_HOME", raising=False)
    assert registry.tracking_uri_from_args(args(mlflow_uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert registry.tracking_uri_from_args(args(mlflow_uri=None, home=str(tmp_path))) == "http://127.0.0.1:5001"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert registry.tracking_uri_from_args(args(home=str(tmp_path))) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert (tmp_path / "mlflow").is_dir()
    monkeypatch.setenv("PREFIXD_HOME", str(tmp_path / "h2"))
    assert registry.tracking_uri_from_args(args()) == f"sqlite:///{tmp_path}/h2/mlflow/mlflow.db"


def test_mlflow_clients_of_two_uris_in_one_process_never_share_the_globals(tmp_path):
    """Threads of one process (an API server beside an orchestrator) using two stores: the fluent calls of
    each see its own URI; one for the other URI waits until the first is done; the globals come back."""
    from orchestrator.registry.client import mlflow_client

    first, second = default_tracking_uri(tmp_path / "a"), default_tracking_uri(tmp_path / "b")
    before = mlflow.get_tracking_uri()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def hold_first():
        with mlflow_client(first):
            with mlflow_client(first):  # the same URI nests (and other threads with it may share)
                inside.set()
                release.wait(10)
                seen["first"] = mlflow.get_tracking_uri()

    def use_second():
        with mlflow_client(second):
            seen["second"] = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())

    holder, other = threading.Thread(target=hold_first), threading.Thread(target=use_second)
    holder.start()
    assert inside.wait(10)
    other.start()
    time.sleep(0.3)
    assert "second" not in seen and other.is_alive()  # waits for the other URI's user
    release.set()
    holder.join(10)
    other.join(10)
    assert seen == {"first": first, "second": (second, second)}
    assert mlflow.get_tracking_uri() == before
