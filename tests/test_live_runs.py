"""A job's MLflow run while it trains, against a real `mlflow server` on 127.0.0.1: one orchestrator serving
on a real local Ray (tests/test_orchestrator.py's `Served`, a tiny Llama) for the module.

- a training job's run is RUNNING with its step metrics, evaluations, system metrics and checkpoints (each
  a PEFT adapter artifact, the prefix exactly); a cancel ends it KILLED;
- a job failing in its group (a non-finite loss; a spec over the bounds after an earlier attempt opened its
  run) ends it FAILED with the error;
- a succeeded job's live run is the one the registrar completes: FINISHED, one run and one version per job,
  every step once;
- runs of jobs that failed or were cancelled with no group alive are ended by the registrar's pass;
- while MLflow is down the job's writes wait (of its checkpoints only the newest), it gets one warning
  event, and the run catches up after.

Run: python -m pytest -q tests/test_live_runs.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from jobs.spec import JobSpec, load_spec
from orchestrator import registry
from orchestrator.config import OrchestratorConfig
from orchestrator.live_runs import CHECKPOINT_ARTIFACTS, CHECKPOINT_TAG, LiveRuns
from orchestrator.plan import base_model_ref, task_config
from orchestrator.registry.client import mlflow_client
from orchestrator.registry.tracking import open_job_run
from orchestrator.scheduler import Orchestrator
from orchestrator.store import JobStore, Quota
from tests.test_orchestrator import Served, ray_local, tiny_base, wait_for, write_spec  # noqa: F401 - fixtures
from tests.tiny import tiny_model
from workers.formats import load_peft_adapter, save_prefix
from workers.models import load_base_model
from workers.prefix import PrefixEncoder, PrefixTuningConfig, configure_for_model
from workers.trainer import MultiTaskTrainer

pytestmark = pytest.mark.slow  # starts Ray and an MLflow server


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def live(ray_local, tiny_base, mlflow_server, tmp_path_factory):  # noqa: F811 - fixtures imported above
    root = tmp_path_factory.mktemp("live")
    s = Served(root / "home", tiny_base, root / "specs", mlflow_uri=mlflow_server.uri, tracking_every_s=0.3)
    yield s
    s.close()


def job_runs(client: MlflowClient, run_id: str, job_id: str) -> list:
    """Every active run tagged with the job's id, in the experiment of run `run_id`."""
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.`prefixd.job_id` = '{job_id}'")


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def checkpoint_steps(client: MlflowClient, run_id: str) -> list[int]:
    """Steps of the checkpoint adapters in the run's artifacts."""
    return sorted(int(a.path.rsplit("step-", 1)[1]) for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS))


def staged_checkpoint(folder: Path, seed: int) -> tuple[Path, PrefixEncoder]:
    """A checkpoint folder as the trainer stages it (its prefix/ is what a live run reads), of a random
    prefix with a projection for a tiny Llama."""
    torch.manual_seed(seed)
    config = configure_for_model(
        PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
        tiny_model("llama").config,
    )
    encoder = PrefixEncoder(config)
    save_prefix(folder / "prefix", encoder, config)
    return folder, encoder


def spec_dict(folder: Path, base: Path, name: str, **training) -> dict:
    """A spec of a tiny task on `base`, as `prefixd submit` stores it."""
    return load_spec(write_spec(folder, name, "reverse", base, **training)).to_dict()


def test_a_training_job_streams_into_a_running_run_and_a_cancel_kills_it(live, mlflow_server):
    job_id = live.submit("live-long", "reverse", steps=100_000, eval_every=4, checkpoint_every=3)
    run_id = wait_for(lambda: live.store.get(job_id).run_id, 300, "the job's run id in the store")
    client = MlflowClient(mlflow_server.uri)
    wanted = {"loss", "learning_rate", "tokens_per_s", "eval_loss", "system/cpu_percent", "system/rss_mib"}
    run = wait_for(
        lambda: wanted <= set((r := client.get_run(run_id)).data.metrics) and CHECKPOINT_TAG in r.data.tags and r,
        180,
        "step, evaluation and system metrics in the live run",
    )
    job = live.store.get(job_id)
    assert run.info.status == "RUNNING" and job.state == "running"
    assert run.data.tags["prefixd.job_id"] == job_id and run.data.tags["prefixd.task"] == "live-long"
    assert run.data.params == JobSpec.from_dict(job.spec).flat_params()
    newest = int(run.data.tags[CHECKPOINT_TAG])
    assert newest % 3 == 0 and newest in checkpoint_steps(client, run_id)
    assert all(step % 3 == 0 for step in checkpoint_steps(client, run_id))
    adapter = client.download_artifacts(
        run_id, f"{CHECKPOINT_ARTIFACTS}/step-{newest:09d}", str(live.home.parent / "dl")
    )
    model, _ = load_base_model(base_model_ref(JobSpec.from_dict(job.spec)))
    config, _ = load_peft_adapter(adapter, model.config)  # a PEFT adapter that fits the job's base
    assert config.num_virtual_tokens == JobSpec.from_dict(job.spec).prefix.num_virtual_tokens
    assert all(step % 4 == 0 for step in steps_of(client, run_id, "eval_loss"))

    live.store.request_cancel(job_id)
    cancelled = live.wait_state(job_id, {"cancelled"}, timeout=90)
    run = wait_for(lambda: (r := client.get_run(run_id)).info.status == "KILLED" and r, 90, "the run KILLED")
    assert "prefixd.error" not in run.data.tags
    losses = steps_of(client, run_id, "loss")
    assert losses == sorted(set(losses)) and losses[-1] <= cancelled.step
    assert [r.info.run_id for r in job_runs(client, run_id, job_id)] == [run_id]


def test_jobs_failing_in_their_group_end_their_runs_failed_with_the_error(live, mlflow_server, tmp_path):
    """A job whose loss is not finite from its first step (its folder holds a NaN checkpoint), and a job
    over the bounds in force whose run an earlier attempt opened; both held back by their tenant's quota
    until they are set up."""
    client = MlflowClient(mlflow_server.uri)
    spec = spec_dict(live.specs, live.base, "live-fail", steps=20)
    base_key = JobSpec.from_dict(spec).base_model.base_key
    live.store.set_quotas({"held": Quota(max_running=0)})
    try:
        nan = live.store.submit(spec, task="live-fail", base_key=base_key, tenant="held")
        model, tokenizer = load_base_model(base_model_ref(JobSpec.from_dict(spec)))
        writer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(tmp_path / "cache"))
        writer.add_task(task_config(JobSpec.from_dict(spec), nan, live.config.jobs_dir / nan))
        with torch.no_grad():
            for p in writer.tasks[nan].encoder.parameters():
                p.fill_(float("nan"))
        writer.checkpoint(nan)

        over_spec = spec | {"name": "live-over", "training": spec["training"] | {"steps": 10**12}}
        over = live.store.submit(over_spec, task="live-over", base_key=base_key, tenant="held")
        with mlflow_client(mlflow_server.uri) as c:  # as the group of an earlier attempt opens it
            earlier = open_job_run(c, mlflow_server.uri, over, JobSpec.from_dict(over_spec), "held").info.run_id
        live.store.set_run_id(over, earlier)
        assert {live.store.get(j).state for j in (nan, over)} == {"queued"}
    finally:
        live.store.set_quotas({})

    for job_id, says in ((nan, "not finite"), (over, "is over the bound")):
        job = live.wait_state(job_id, {"failed", "succeeded"})
        assert job.state == "failed" and says in job.error, job.error
        run_id = wait_for(lambda j=job_id: live.store.get(j).run_id, 90, f"{job_id}'s run id")
        run = wait_for(lambda r=run_id: (x := client.get_run(r)).info.status == "FAILED" and x, 90, "a FAILED run")
        assert run.data.tags["prefixd.error"] == job.error
        assert job.error in run.data.tags["mlflow.note.content"]
        assert len(job_runs(client, run_id, job_id)) == 1
    assert live.store.get(over).run_id == earlier


def test_a_succeeded_job_completes_its_live_run_registered_once(live, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    job_id = live.submit("live-ok", "double", steps=150, eval_every=50, checkpoint_every=50)
    run_id = wait_for(lambda: live.store.get(job_id).run_id, 300, "the job's run id in the store")
    wait_for(lambda: steps_of(client, run_id, "loss"), 180, "loss points streamed while it trains")
    assert live.store.get(job_id).state == "running", "the job ended before its run had a streamed point"

    job = live.wait_state(job_id, {"succeeded", "failed"})
    assert job.state == "succeeded", job.error
    job = wait_for(lambda: (j := live.store.get(job_id)).registered and j, 300, "the job registered")
    assert job.registry_model == "prefixd-live-ok" and job.run_id == run_id
    [version] = client.search_model_versions(f"name = 'prefixd-live-ok' and tags.`prefixd.job_id` = '{job_id}'")
    assert (str(version.version), version.run_id) == (job.registry_version, run_id)

    [run] = job_runs(client, run_id, job_id)  # the live run, reused: one run per job
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["prefixd.model_id"] and "prefixd.base_model_sha256" in run.data.tags
    history = [json.loads(line) for line in (Path(job.result_dir) / "history.jsonl").read_text().splitlines()]
    losses = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(h["step"], h["loss"]) for h in history]
    for key in run.data.metrics:  # every metric at most once per step, streamed and completed alike
        steps = steps_of(client, run_id, key)
        assert len(steps) == len(set(steps)), (key, steps)
    assert steps_of(client, run_id, "eval_loss") == [50, 100, 150]
    # Checkpoints at 50 and 100; one still waiting when the job succeeded is dropped (the result is logged).
    steps = checkpoint_steps(client, run_id)
    assert set(steps) <= {50, 100} and run.data.tags.get(CHECKPOINT_TAG) == (str(max(steps)) if steps else None)
    assert {"adapter", "prefix", "history.jsonl"} <= {a.path for a in client.list_artifacts(run_id)}

    # A job whose first attempt streamed steps 1-5 before its group died, and which trained them again (other
    # times, here other values too): the registrar logs each step once, keeping the run's own points.
    uri = mlflow_server.uri
    with JobStore(f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        again = store.submit(job.spec, task="live-ok", base_key=job.base_key)
        [claimed] = store.claim("g-1")
        first = LiveRuns(uri, on_run=store.set_run_id, warn=lambda *a: None, every_s=0.1)
        first.open(claimed, JobSpec.from_dict(job.spec))
        for h in history[:5]:
            first.record(again, h | {"time": h["time"] - 100, "loss": h["loss"] + 1})
        first.close()
        store.finish(again, "succeeded", result_dir=job.result_dir)
        assert registry.register_pending(store, uri) == [again]
        row = store.get(again)
    [run] = job_runs(client, row.run_id, again)
    losses = client.get_metric_history(row.run_id, "loss")
    assert [m.step for m in losses] == [h["step"] for h in history]
    assert [m.value for m in losses] == [h["loss"] + 1 for h in history[:5]] + [h["loss"] for h in history[5:]]


def test_runs_of_jobs_that_ended_without_their_group_are_ended_by_the_registrar(mlflow_server, tiny_base, tmp_path):
    """A job out of attempts after its groups died, and one cancelled while queued again: their runs were
    left RUNNING; the registrar's pass ends them FAILED (with the job's error) and KILLED, once. A job
    cancelled before it trained has no run."""
    uri = mlflow_server.uri
    client = MlflowClient(uri)
    config = OrchestratorConfig.from_env(home=tmp_path / "home", mlflow_uri=uri)
    spec = JobSpec.from_dict(spec_dict(tmp_path / "specs", tiny_base, "orphan"))
    with Orchestrator(config) as orchestrator, JobStore(config.store_url) as store:
        ids, runs = {}, {}
        for name in ("dies", "cancelled", "never"):
            ids[name] = store.submit(spec.to_dict(), task=name, base_key=spec.base_model.base_key, max_attempts=2)
            if name != "never":  # an attempt trained, opened its run, and its group died
                [job] = store.claim("g-1")
                with mlflow_client(uri) as c:
                    runs[name] = open_job_run(c, uri, job.id, spec, "local").info.run_id
                store.set_run_id(job.id, runs[name])
                store.release(job.id, "its worker group died (SIGKILL)")
            if name == "dies":  # so did the next one's
                store.claim("g-2")
                store.release(ids[name], "its worker group died (SIGKILL)")
            else:
                store.request_cancel(ids[name])
        jobs = {j.task: j for j in store.list()}
        assert [jobs[n].state for n in ("dies", "cancelled", "never")] == ["failed", "cancelled", "cancelled"]
        assert all(client.get_run(r).info.status == "RUNNING" for r in runs.values())

        orchestrator._register_finished(now=True)
        failed, killed = client.get_run(runs["dies"]), client.get_run(runs["cancelled"])
        assert failed.info.status == "FAILED" and failed.data.tags["prefixd.error"] == jobs["dies"].error
        assert killed.info.status == "KILLED" and "prefixd.error" not in killed.data.tags
        assert jobs["never"].run_id is None
        experiment = failed.info.experiment_id
        assert client.search_runs([experiment], f"tags.`prefixd.job_id` = '{ids['never']}'") == []
        assert orchestrator.registrar.runs_ended == {ids["dies"], ids["cancelled"]}
        assert registry.close_ended_runs(store.list(), uri, set()) == []  # idempotent: nothing left to end
        assert client.get_run(runs["dies"]).info.end_time == failed.info.end_time


def test_live_writes_wait_out_an_outage_with_one_warning(mlflow_server, tiny_base, tmp_path):
    uri = mlflow_server.uri
    spec = JobSpec.from_dict(spec_dict(tmp_path / "specs", tiny_base, "outage"))
    with JobStore(f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        store.submit(spec.to_dict(), task="outage", base_key=spec.base_model.base_key)
        [job] = store.claim("g-1")
        live = LiveRuns(
            uri,
            on_run=store.set_run_id,
            warn=lambda job_id, text: store.log(job_id, text, "warning"),
            every_s=0.2,
            warn_every_s=600,
        )
        scratch, encoders = tmp_path / "scratch", {}
        mlflow_server.stop()
        try:
            live.open(job, spec)
            started = time.monotonic()
            for step in range(1, 6):
                live.record(job.id, {"step": step, "time": time.time(), "loss": 1.0 / step, "epoch": 0})
                if step in (2, 4):  # two checkpoints staged by the trainer: only the newer waits
                    folder, encoders[step] = staged_checkpoint(scratch / f"checkpoint-{step}", seed=step)
                    live.checkpoint(job.id, step, folder)
            assert time.monotonic() - started < 0.5  # the training loop only appends to a buffer

            def warnings() -> list[str]:
                return [e.message for e in store.events(job.id)[0] if e.level == "warning"]

            wait_for(warnings, 180, "a warning event of the job")
            time.sleep(1.5)  # several more failed rounds
            [warning] = warnings()
            assert warning.startswith(f"MLflow tracking at {uri} failed") and "training goes on" in warning
            assert store.get(job.id).run_id is None
        finally:
            mlflow_server.start()
        run_id = wait_for(lambda: store.get(job.id).run_id, 180, "the run opened once MLflow is back")
        client = MlflowClient(uri)
        wait_for(lambda: steps_of(client, run_id, "loss") == [1, 2, 3, 4, 5], 90, "the waiting points written")
        wait_for(lambda: checkpoint_steps(client, run_id) == [4], 90, "the newer checkpoint written")
        folder, encoders[6] = staged_checkpoint(scratch / "checkpoint-6", seed=6)
        live.checkpoint(job.id, 6, folder)
        live.end(job.id, "FAILED", "boom")  # what waits is written first
        live.close()
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["prefixd.error"] == "boom"
        assert checkpoint_steps(client, run_id) == [4, 6] and run.data.tags[CHECKPOINT_TAG] == "6"
        for step in (4, 6):  # the adapter is the staged prefix exactly (its projection applied)
            adapter = client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/step-{step:09d}", str(tmp_path))
            _, logged = load_peft_adapter(adapter, tiny_model("llama").config)
            assert torch.equal(logged.prompt_embeddings(), encoders[step].prompt_embeddings())
        assert sorted(p.name for p in scratch.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_without_mlflow_a_group_trains_with_no_live_runs(tiny_base, tmp_path, monkeypatch):  # noqa: F811
    """Where MLflow cannot be imported (a machine that only trains), the live runs turn themselves off."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    spec = JobSpec.from_dict(spec_dict(tmp_path / "specs", tiny_base, "bare"))
    with JobStore(f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        store.submit(spec.to_dict(), task="bare", base_key=spec.base_model.base_key)
        [job] = store.claim("g-1")
        live = LiveRuns("http://127.0.0.1:9", on_run=store.set_run_id, warn=lambda *a: None, every_s=0.1)
        live.open(job, spec)
        wait_for(lambda: not live.enabled, 30, "the live runs to turn off")
        live.record(job.id, {"step": 1, "time": time.time(), "loss": 1.0})
        live.end(job.id, "FAILED", "boom")
        live.close()
        assert store.get(job.id).run_id is None
