"""Tracking: one MLflow run per job, opened when it starts training and completed when it succeeds.

    run = open_job_run(client, uri, job_id, spec, tenant)    # the job's run, created or reused
    run_id = log_job(uri, job, spec, result_dir)              # a succeeded job: its run completed, FINISHED
    end_run(client, run_id, "FAILED", error)                  # a failed (or KILLED: cancelled) job's run

The run lives in the experiment `spec.registry.experiment`, else `prefixd/<base model>` (the spec's base_key
with characters outside [A-Za-z0-9._:@-] made '_'), and is found again by its tag prefixd.job_id: a job has
one run, whoever opens it first (its worker group while it trains: `orchestrator.live_runs`; else the
registrar). Params: the flattened spec. Tags: prefixd.job_id, prefixd.task, prefixd.base_model
('kind:location@revision:dtype'), prefixd.base_model_sha256 (sha256 of the local safetensors weights, when
the folder is on this machine, added by the registrar; a built-in model counts only once it is converted),
prefixd.model_id, and the spec's own tags; a failed run gets prefixd.error.

`log_job` completes the run: metrics, every numeric field of history.jsonl at its step (loss,
learning_rate, tokens, tokens_per_s, task_tokens_per_s, epoch, and the eval metrics at eval steps),
timestamped by the record's `time`, then metrics.json (the final evaluation) at the last step, in
`log_batch` calls, each (metric, step) the run has already (streamed while it trained) left out. Artifacts:
adapter/, prefix/, spec.json, metrics.json, history.jsonl, data_report.txt, result.json, plus the logged
pyfunc model (`orchestrator.pyfunc_model`). The run is marked FINISHED last, so a FINISHED run is complete:
a retry returns it; an unfinished one (a live run, or a crash mid-log) is completed.

Ownership. The default experiments (names under 'prefixd/', one per base model) are shared by every tenant.
Any other experiment belongs to the tenant whose job created it (experiment tag prefixd.owner): a job of
another tenant naming it in registry.experiment is refused with a RegistryError naming the experiment and
its owner, and nothing is logged. The local admin (tenant 'local': `prefixd submit` on the store's machine)
may log anywhere; an experiment made before owners existed is adopted by the first job that logs into it.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from jobs.spec import REGISTERED_NAME_PREFIX, JobSpec
from orchestrator.plan import base_model_ref
from orchestrator.pyfunc_model import ADAPTER, BASE_MODEL, BASE_MODEL_FILE, PREFIX, base_model_record, describe_base
from orchestrator.registry.client import (
    BASE_TAG,
    ERROR_TAG,
    JOB_TAG,
    LOCAL_TENANT,
    MODEL_ID_TAG,
    MODEL_NAME,
    OWNER_TAG,
    SHA_TAG,
    TAG,
    TASK_TAG,
    RegistryError,
    already_exists,
    mlflow_client,
    quote,
    sqlite_db,
    tenant_of,
)
from workers.models import BaseModelRef, default_model_cache
from workers.results import ResultFolder, finite, load_result

_HISTORY_SKIP = ("step", "time")
SHARED_EXPERIMENTS = "prefixd/"  # the default experiments' names: shared by every tenant


def load_job_result(result_dir: str | Path | None, job_id: str = "?") -> ResultFolder:
    """The job's result folder, read (`workers.results.load_result`); RegistryError names what is missing or
    unreadable."""
    try:
        return load_result(result_dir, job_id)
    except ValueError as e:  # ResultError, or a StorageError naming the storage and what failed
        raise RegistryError(str(e)) from None


def experiment_name(spec: JobSpec) -> str:
    """spec.registry.experiment, else 'prefixd/<base_key>' with odd characters made '_'."""
    if spec.registry.experiment:
        return spec.registry.experiment
    key = re.sub(r"[^A-Za-z0-9._:@-]+", "_", spec.base_model.base_key).strip("_")
    return f"{SHARED_EXPERIMENTS}{key[-200:]}"


def experiment_owner(tracking_uri: str, name: str) -> str | None:
    """The tenant owning experiment `name` (its prefixd.owner tag); None if there is no such experiment, it
    is a shared one (under prefixd/), or it predates owners."""
    if name.startswith(SHARED_EXPERIMENTS):
        return None
    with mlflow_client(tracking_uri) as client:
        exp = client.get_experiment_by_name(name)
    return None if exp is None else (exp.tags or {}).get(OWNER_TAG)


def check_experiment(client, name: str, tenant: str, job_id: str, exp=None) -> None:
    """RegistryError when experiment `name` (`exp`, if already fetched) belongs to a tenant other than
    `tenant`; shared experiments and the local admin pass."""
    if name.startswith(SHARED_EXPERIMENTS) or tenant == LOCAL_TENANT:
        return
    exp = client.get_experiment_by_name(name) if exp is None else exp
    owner = None if exp is None else (exp.tags or {}).get(OWNER_TAG)
    if owner is not None and owner != tenant:
        raise RegistryError(
            f"job {job_id}: experiment {name!r} belongs to tenant {owner!r}; tenant {tenant!r} cannot log runs "
            "into it (set registry.experiment to an experiment of your own, or leave it unset for the shared "
            f"{SHARED_EXPERIMENTS}<base model> one)"
        )


def base_model_sha256(ref: BaseModelRef) -> str | None:
    """sha256 of the base weights when they are on this machine already; never converts or downloads."""
    from workers.models import weights_fingerprint

    if ref.kind == "path":
        folder = Path(ref.location)
    elif ref.kind == "builtin":
        folder = default_model_cache() / ref.location
    else:
        return None
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return weights_fingerprint(folder)
    return None


def _experiment_id(client, name: str, uri: str, tenant: str, job_id: str) -> str:
    """The experiment's id, created owned by `tenant` if needed (shared ones own no tag); RegistryError
    when it belongs to another tenant."""
    shared = name.startswith(SHARED_EXPERIMENTS)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        check_experiment(client, name, tenant, job_id, exp)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if not shared and OWNER_TAG not in (exp.tags or {}):  # made before owners: adopted
            client.set_experiment_tag(exp.experiment_id, OWNER_TAG, tenant)
        return exp.experiment_id
    db = sqlite_db(uri)
    # A sqlite store would put artifacts under the current directory; keep them next to the database.
    location = None
    if db is not None:
        location = str(db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", name))
    try:
        return client.create_experiment(name, artifact_location=location, tags=None if shared else {OWNER_TAG: tenant})
    except Exception as e:
        if already_exists(e):  # created meanwhile by another process: whose is it?
            return _experiment_id(client, name, uri, tenant, job_id)
        raise


def _find_run(client, experiment_id: str, job_id: str):
    """The job's active runs, newest first."""
    return list(
        client.search_runs(
            [experiment_id], f"tags.`{JOB_TAG}` = {quote(job_id)}", order_by=["attributes.start_time DESC"]
        )
    )


def own_tags(spec: JobSpec) -> dict[str, str]:
    """The spec's tags without any under prefixd.* (ours; a spec stored before they were refused may hold some)."""
    return {k: v for k, v in spec.tags.items() if not k.lower().startswith(TAG)}


def _run_tags(job_id: str, spec: JobSpec, ref: BaseModelRef) -> dict[str, str]:
    tags = own_tags(spec)
    tags.update(
        {
            JOB_TAG: job_id,
            TASK_TAG: spec.name,
            BASE_TAG: describe_base(ref),
            "prefixd.registered_model": spec.registry.model_name or REGISTERED_NAME_PREFIX + spec.name,
        }
    )
    return tags


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The metrics of one history.jsonl record: its finite numbers but `step` and `time`."""
    return {
        key: number
        for key, value in record.items()
        if key not in _HISTORY_SKIP and (number := finite(value)) is not None
    }


def _metrics_from(result: ResultFolder) -> list[Any]:
    """History metrics at their steps, then the final metrics at the last step (replacing the
    history's value of the same key there)."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    points: dict[tuple[str, int], Metric] = {}
    last_step, last_ms = 0, now_ms
    for record in result.history:
        step = int(record.get("step", 0))
        ms = int(record["time"] * 1000) if finite(record.get("time")) is not None else now_ms
        if step >= last_step:
            last_step, last_ms = step, ms
        for key, number in record_metrics(record).items():
            points[(key, step)] = Metric(key=key, value=number, timestamp=ms, step=step)
    for key, value in result.metrics.items():
        points[(key, last_step)] = Metric(key=key, value=value, timestamp=last_ms, step=last_step)
    return list(points.values())


def logged_steps(client, run, key: str) -> set[int]:
    """The steps at which `run` has metric `key` (none when it has no such metric)."""
    if key not in run.data.metrics:
        return set()
    return {m.step for m in client.get_metric_history(run.info.run_id, key)}


def _new_points(client, run, points: list[Any]) -> list[Any]:
    """`points` less those whose (key, step) the run has already: streamed while the job trained, or logged
    by an earlier try."""
    have = {(key, step) for key in {p.key for p in points} for step in logged_steps(client, run, key)}
    return [p for p in points if (p.key, p.step) not in have]


def open_job_run(client, uri: str, job_id: str, spec: JobSpec, tenant: str):
    """The job's one run in its experiment, with its tags and params (see the module docstring).

    A FINISHED run holding the logged model is returned as is. Else the job's oldest run (the live run of
    its worker group, or one a crashed registration left) is reused, RUNNING again if it was ended, and a
    newer duplicate is deleted; else a run is created. Only what the run lacks is written. RegistryError
    when the experiment belongs to another tenant.
    """
    from mlflow.entities import Param, RunTag

    experiment_id = _experiment_id(client, experiment_name(spec), uri, tenant, job_id)
    runs = _find_run(client, experiment_id, job_id)  # newest first
    for run in runs:
        if run.info.status == "FINISHED" and run.data.tags.get(MODEL_ID_TAG):
            return run
    tags = _run_tags(job_id, spec, base_model_ref(spec))
    if not runs:
        run = client.create_run(experiment_id, tags=tags, run_name=f"{spec.name}-{job_id}")
    else:
        run = runs[-1]
        for duplicate in runs[:-1]:  # two openers raced: one run per job
            client.delete_run(duplicate.info.run_id)
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
    run_id = run.info.run_id
    missing = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
    if missing:
        client.log_batch(run_id, tags=missing)
    params = [Param(k, v) for k, v in spec.flat_params().items() if k not in run.data.params]
    for lo in range(0, len(params), 100):  # MLflow: at most 100 params per batch
        client.log_batch(run_id, params=params[lo : lo + 100])
    return run


def end_run(client, run_id: str, status: str, error: str | None = None) -> None:
    """End a run FAILED or KILLED; an error goes into tag prefixd.error and the run's description."""
    from mlflow.entities import RunTag

    if error:
        text = error[:5000]
        client.log_batch(run_id, tags=[RunTag(ERROR_TAG, text), RunTag("mlflow.note.content", f"{status}: {text}")])
    client.set_terminated(run_id, status)


def log_job(tracking_uri: str, job, spec: JobSpec, result_dir: str | Path) -> str:
    """Complete a succeeded job's run (see the module docstring); returns its run id.

    Idempotent: a FINISHED run tagged with the job's id is returned as is.
    """
    result = load_job_result(result_dir, job.id)
    ref = base_model_ref(spec)
    with mlflow_client(tracking_uri) as client:
        return log_job_run(client, tracking_uri, job.id, spec, ref, result, tenant_of(job)).info.run_id


def log_job_run(client, uri: str, job_id: str, spec: JobSpec, ref: BaseModelRef, result: ResultFolder, tenant: str):
    """The job's FINISHED run in its experiment: its run (`open_job_run`) completed now, unless an earlier
    attempt did."""
    import mlflow
    from mlflow.entities import RunTag

    from orchestrator.pyfunc_model import PYFUNC_ENTRY, signature

    run = open_job_run(client, uri, job_id, spec, tenant)
    if run.info.status == "FINISHED" and run.data.tags.get(MODEL_ID_TAG):
        return run
    run_id = run.info.run_id
    sha256 = base_model_sha256(ref)
    if sha256:
        client.set_tag(run_id, SHA_TAG, sha256)
    metrics = _new_points(client, run, _metrics_from(result))
    for lo in range(0, len(metrics), 1000):  # MLflow: at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[lo : lo + 1000])
    client.log_artifacts(run_id, str(result.adapter), ADAPTER)
    client.log_artifacts(run_id, str(result.prefix), PREFIX)
    client.log_text(run_id, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n", "spec.json")
    for path in result.files():
        client.log_artifact(run_id, str(path))

    with tempfile.TemporaryDirectory(prefix="prefixd-model-") as tmp:
        record = Path(tmp) / BASE_MODEL_FILE
        record.write_text(json.dumps(base_model_record(ref, sha256), indent=2) + "\n", encoding="utf-8")
        code = Path(tmp) / "prefixd_model.py"
        code.write_text(PYFUNC_ENTRY, encoding="utf-8")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():  # the run ends FINISHED, last
            # MLflow advises an input example; giving one would make it load the base model (see below).
            warnings.filterwarnings("ignore", message="An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(code),  # MLflow's models-from-code: nothing is pickled
                artifacts={ADAPTER: str(result.adapter), PREFIX: str(result.prefix), BASE_MODEL: str(record)},
                signature=signature(),
                # Given, not inferred, and no input_example: either would make MLflow load the model, base
                # model included, at logging time.
                pip_requirements=_requirements(),
                metadata={"prefixd_base_model": describe_base(ref), "prefixd_job_id": job_id},
                tags={JOB_TAG: job_id, TASK_TAG: spec.name},
            )
            client.log_batch(run_id, tags=[RunTag(MODEL_ID_TAG, info.model_id)])
    return client.get_run(run_id)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "transformers", "safetensors", "prefixd"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out
