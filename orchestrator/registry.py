"""Finished jobs into MLflow: one run and one registered-model version per job; lookups and CLI verbs.

    run_id = log_job(uri, job, spec, result_dir)               # tracking only
    name, version = register_job(uri, job, spec, result_dir)   # run + pyfunc model + version + aliases
    registered = register_pending(store, uri)                  # the orchestrator's loop, with backoff

Tracking. One run per job, in the experiment `spec.registry.experiment`, else `prefixd/<base model>`
(the spec's base_key with characters outside [A-Za-z0-9._:@-] made '_'). Params: the flattened spec.
Metrics: every numeric field of history.jsonl at its step (loss, learning_rate, tokens, tokens_per_s,
task_tokens_per_s, epoch, and the eval metrics at eval steps), timestamped by the record's `time`, then
metrics.json (the final evaluation) at the last step, in `log_batch` calls. Tags: prefixd.job_id,
prefixd.task, prefixd.base_model ('kind:location@revision:dtype'), prefixd.base_model_sha256 (sha256 of
the local safetensors weights, when the folder is on this machine; a built-in model counts only once it
is converted), prefixd.model_id, and the spec's own tags. Artifacts: adapter/, prefix/, spec.json,
metrics.json, history.jsonl, data_report.txt, result.json, plus the logged pyfunc model
(`orchestrator.pyfunc_model`). The run is marked FINISHED last, so a FINISHED run is complete: a retry
reuses it; an unfinished run of the job (a crash mid-log) is deleted and logged again.

Registry. Registered model `spec.registry.model_name` (default 'prefixd-<task>'), one version per job,
created with `create_model_version(source="models:/<logged model id>")` so that
`mlflow.pyfunc.load_model("models:/<name>@champion")` works. A version is found again by its tag
prefixd.job_id before anything is created: a job never gets two versions. Version tags: prefixd.job_id,
prefixd.task, prefixd.base_model, prefixd.base_model_sha256, prefixd.metric.<name> for each final metric,
prefixd.registry_metric / prefixd.direction, prefixd.num_virtual_tokens, prefixd.champion_reason and
prefixd.champion_decision (promote | keep), and the spec's tags (prefixd.* keys are ours: a spec's own
are dropped, and specs refuse them at the entry).

Ownership. A registered model belongs to the tenant whose job created it (model tag prefixd.owner; a job
without a tenant counts as the local tenant, 'local'). A job of another tenant cannot add a version to it
or move its aliases: its registration fails with a RegistryError naming the model, and nothing is written.
A model made before owners existed (no prefixd.owner tag) is adopted by the first tenant that registers a
version to it.

Aliases. `latest` is MLflow's own: it is reserved (`set_registered_model_alias(..., "latest", ...)` is
refused) and always resolves to the highest version (`models:/<name>@latest`), so nothing is set for it;
lookups list it. `champion` moves to a new version only when it beats the current champion on
`spec.registry.metric` in `spec.registry.direction` (strictly; the new job's spec decides); the first
version becomes champion; a version without that metric never displaces one. The decision is recorded on
the version (tag prefixd.champion_reason) and, when the champion moves, on the registered model
(tags prefixd.champion_version, prefixd.champion_reason).

Names. A lookup takes a registered-model name or a task name: an existing registered model of exactly
that name; else the one registered model tagged prefixd.task=<task> (a spec may set its own
registry.model_name); else 'prefixd-<task>'. With neither alias nor version, a lookup means the champion.

CLI verbs (functions; the `prefixd` command table wires them):
    prefixd lookup TASK [--alias A | --version N] [--json] [--download DIR]
    prefixd models [--base BASE] [--tag k=v ...] [--json]
    prefixd generate --task A [--task B ...] [--alias A | --version N] [--max-new-tokens N] PROMPT...
`generate` runs every prompt with every task's prefix, all rows in one mixed-prefix batch, and prints
them per task. The tracking URI is --mlflow-uri, else $MLFLOW_TRACKING_URI, else
`default_tracking_uri(home)`. Bad input (unknown task, alias or version, an invalid alias, a base model
missing on this machine) raises RegistryError; the verbs print it and return 2 (an MLflow error: 1).

Outages. `register_pending` marks a job's failed attempt in the store with an exponential backoff; on a
connection failure it stops and marks every remaining due job the same way, so a down MLflow costs one
timeout per call. MLflow's HTTP client itself retries for minutes by default: an orchestrator should
set MLFLOW_HTTP_REQUEST_MAX_RETRIES (e.g. 0-2) and MLFLOW_HTTP_REQUEST_TIMEOUT and let this backoff work.
Jobs whose spec says registry.register: false are logged (a run, no version) and then marked done in
the store with registry_model 'runs:/<run id>' and registry_version '-'.

One process registers at a time: the orchestrators sharing a job store take the store's "registrar" lease
before registering (`register_pending(..., keep_lease=)` renews it before each job and stops when it is
lost). As a last guard, two versions found for one job after a create are reduced to the oldest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.spec import REGISTERED_NAME_PREFIX, JobSpec
from orchestrator.config import default_tracking_uri  # noqa: F401 - part of this module's API
from orchestrator.plan import base_model_ref
from orchestrator.pyfunc_model import (
    ADAPTER,
    BASE_MODEL,
    BASE_MODEL_FILE,
    PREFIX,
    base_model_record,
    describe_base,
    read_base_model_record,
)
from orchestrator.registry_text import parse_tag_filters, print_models, print_version
from orchestrator.results import fetch_result
from workers.models import BaseModelRef, ModelLoadError, default_model_cache

TAG = "prefixd."
JOB_TAG = "prefixd.job_id"
TASK_TAG = "prefixd.task"
BASE_TAG = "prefixd.base_model"
SHA_TAG = "prefixd.base_model_sha256"
MODEL_ID_TAG = "prefixd.model_id"
METRIC_TAG = "prefixd.metric."
REASON_TAG = "prefixd.champion_reason"
DECISION_TAG = "prefixd.champion_decision"  # "promote" | "keep": written before the alias moves
OWNER_TAG = "prefixd.owner"  # on a registered model: the tenant that created it
LOCAL_TENANT = "local"  # orchestrator.tenants.LOCAL_TENANT: jobs without a tenant
CHAMPION = "champion"
LATEST = "latest"
MODEL_NAME = "model"  # the logged pyfunc model's name within the run
ALIAS_PATTERN = r"^[A-Za-z0-9_-]{1,255}$"  # MLflow's rule; 'latest' is built in, 'v<digits>' is reserved
_HISTORY_SKIP = ("step", "time")
_RESULT_FILES = ("metrics.json", "history.jsonl", "data_report.txt", "result.json")


class RegistryError(ValueError):
    """Bad input to a lookup or registration: names the task, model, alias, version or file."""


# ---------------------------------------------------------------------------------------------------
# Tracking URIs and the MLflow client


def tracking_uri_from_args(args: argparse.Namespace) -> str:
    """`--mlflow-uri`, else $MLFLOW_TRACKING_URI, else the embedded default under `--home` /
    $PREFIXD_HOME / ~/.prefixd (the CLI's home)."""
    uri = getattr(args, "mlflow_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from orchestrator.config import DEFAULT_HOME, HOME_ENV

    home = getattr(args, "home", None) or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return default_tracking_uri(home)


def _sqlite_db(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


@contextmanager
def _mlflow(uri: str) -> Iterator[Any]:
    """An MlflowClient for `uri`, with MLflow's process-wide tracking and registry URIs pointed at it
    meanwhile: the fluent calls (pyfunc.log_model, the models:/ resolver, and the sqlite registry's own
    lookup of a logged model) read those globals. Both globals and their environment variables are put
    back exactly as they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    db = _sqlite_db(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    saved = (
        tracking_utils._tracking_uri,
        registry_utils._registry_uri,
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("MLFLOW_REGISTRY_URI"),
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in (("MLFLOW_TRACKING_URI", saved[2]), ("MLFLOW_REGISTRY_URI", saved[3])):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _already_exists(e: Exception) -> bool:
    return getattr(e, "error_code", None) in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


# ---------------------------------------------------------------------------------------------------
# A finished job's result folder


@dataclass(frozen=True)
class ResultFolder:
    root: Path
    """The folder's files on this machine (a temporary copy when the job's folder is in remote storage)."""
    history: list[dict[str, Any]]
    """history.jsonl, one record per step."""
    metrics: dict[str, float]
    """metrics.json: the final evaluation (finite numbers only)."""
    keep: Any = field(default=None, repr=False, compare=False)
    """The temporary copy's TemporaryDirectory: removed once this folder is no longer referenced."""

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def prefix(self) -> Path:
        return self.root / "prefix"


def read_result(result_dir: str | Path | None, job_id: str = "?") -> ResultFolder:
    """Check and read a job's result folder, a local path or a storage URI (`orchestrator/results.py`
    fetches it to this machine); RegistryError names what is missing or unreadable."""
    if not result_dir:
        raise RegistryError(f"job {job_id}: it has no result_dir")
    try:
        root, keep = fetch_result(result_dir, job_id)
    except ValueError as e:  # ResultError, or a StorageError naming the storage and what failed
        raise RegistryError(str(e)) from None
    try:
        metrics = json.loads((root / "metrics.json").read_text(encoding="utf-8"))
        history = [
            json.loads(line)
            for line in (root / "history.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"job {job_id}: {root}: metrics.json or history.jsonl is not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise RegistryError(f"job {job_id}: {root / 'metrics.json'}: expected a JSON object")
    return ResultFolder(
        root=root, history=history, metrics={k: float(v) for k, v in metrics.items() if _finite(v)}, keep=keep
    )


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------
# Tracking: one run per job


def experiment_name(spec: JobSpec) -> str:
    """spec.registry.experiment, else 'prefixd/<base_key>' with odd characters made '_'."""
    if spec.registry.experiment:
        return spec.registry.experiment
    key = re.sub(r"[^A-Za-z0-9._:@-]+", "_", spec.base_model.base_key).strip("_")
    return f"prefixd/{key[-200:]}"


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


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    db = _sqlite_db(uri)
    # A sqlite store would put artifacts under the current directory; keep them next to the database.
    location = None
    if db is not None:
        location = str(db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", name))
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception as e:
        if _already_exists(e):  # created meanwhile by another process
            return client.get_experiment_by_name(name).experiment_id
        raise


def _find_run(client, experiment_id: str, job_id: str):
    """The job's active runs, newest first."""
    return list(
        client.search_runs(
            [experiment_id], f"tags.`{JOB_TAG}` = {_quote(job_id)}", order_by=["attributes.start_time DESC"]
        )
    )


def _own_tags(spec: JobSpec) -> dict[str, str]:
    """The spec's tags without any under prefixd.* (ours; a spec stored before they were refused may hold some)."""
    return {k: v for k, v in spec.tags.items() if not k.lower().startswith(TAG)}


def _run_tags(job_id: str, spec: JobSpec, ref: BaseModelRef, sha256: str | None) -> dict[str, str]:
    tags = _own_tags(spec)
    tags.update(
        {
            JOB_TAG: job_id,
            TASK_TAG: spec.name,
            BASE_TAG: describe_base(ref),
            "prefixd.registered_model": spec.registry.model_name or REGISTERED_NAME_PREFIX + spec.name,
        }
    )
    if sha256:
        tags[SHA_TAG] = sha256
    return tags


def _metrics_from(result: ResultFolder) -> list[Any]:
    """History metrics at their steps, then the final metrics at the last step (replacing the
    history's value of the same key there)."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    points: dict[tuple[str, int], Metric] = {}
    last_step, last_ms = 0, now_ms
    for record in result.history:
        step = int(record.get("step", 0))
        ms = int(record["time"] * 1000) if _finite(record.get("time")) else now_ms
        if step >= last_step:
            last_step, last_ms = step, ms
        for key, value in record.items():
            if key not in _HISTORY_SKIP and _finite(value):
                points[(key, step)] = Metric(key=key, value=float(value), timestamp=ms, step=step)
    for key, value in result.metrics.items():
        points[(key, last_step)] = Metric(key=key, value=value, timestamp=last_ms, step=last_step)
    return list(points.values())


def log_job(tracking_uri: str, job, spec: JobSpec, result_dir: str | Path) -> str:
    """Log a finished job as one MLflow run (see the module docstring); returns its run id.

    Idempotent: a FINISHED run tagged with the job's id is returned as is.
    """
    result = read_result(result_dir, job.id)
    ref = base_model_ref(spec)
    with _mlflow(tracking_uri) as client:
        return _log_job(client, tracking_uri, job.id, spec, ref, result).info.run_id


def _log_job(client, uri: str, job_id: str, spec: JobSpec, ref: BaseModelRef, result: ResultFolder):
    import mlflow
    from mlflow.entities import Param, RunTag

    from orchestrator.pyfunc_model import PYFUNC_ENTRY, signature

    experiment_id = _experiment_id(client, experiment_name(spec), uri)
    for run in _find_run(client, experiment_id, job_id):
        if run.info.status == "FINISHED" and run.data.tags.get(MODEL_ID_TAG):
            return run
        client.delete_run(run.info.run_id)  # a half-logged earlier attempt: start over

    sha256 = base_model_sha256(ref)
    run = client.create_run(experiment_id, tags=_run_tags(job_id, spec, ref, sha256), run_name=f"{spec.name}-{job_id}")
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in spec.flat_params().items()]
    for lo in range(0, len(params), 100):  # MLflow: at most 100 params per batch
        client.log_batch(run_id, params=params[lo : lo + 100])
    metrics = _metrics_from(result)
    for lo in range(0, len(metrics), 1000):  # and at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[lo : lo + 1000])
    client.log_artifacts(run_id, str(result.adapter), ADAPTER)
    client.log_artifacts(run_id, str(result.prefix), PREFIX)
    client.log_text(run_id, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n", "spec.json")
    for name in _RESULT_FILES:
        if (result.root / name).is_file():
            client.log_artifact(run_id, str(result.root / name))

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


# ---------------------------------------------------------------------------------------------------
# Registry: one version per job


def _job_version(client, name: str, job_id: str):
    """The version registered for this job, or None."""
    try:
        found = client.search_model_versions(f"name = {_quote(name)} and tags.`{JOB_TAG}` = {_quote(job_id)}")
    except Exception as e:
        if _not_found(e):
            return None
        raise
    found = sorted(found, key=lambda v: int(v.version))
    return found[0] if found else None


def _tenant_of(job) -> str:
    return getattr(job, "tenant", None) or LOCAL_TENANT


def model_owner(tracking_uri: str, name: str) -> str | None:
    """The tenant owning registered model `name` (its prefixd.owner tag); None if there is no such model
    or it predates owners."""
    with _mlflow(tracking_uri) as client:
        try:
            return (client.get_registered_model(name).tags or {}).get(OWNER_TAG)
        except Exception as e:
            if _not_found(e) or getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE":
                return None
            raise


def _ensure_registered_model(client, name: str, spec: JobSpec, job) -> None:
    """Create the model owned by the job's tenant, or check that the tenant owns it (RegistryError if not;
    a model without an owner is adopted)."""
    tenant = _tenant_of(job)
    try:
        model = client.get_registered_model(name)
    except Exception as e:
        if not _not_found(e):
            raise
        model = None
    if model is not None:
        owner = (model.tags or {}).get(OWNER_TAG)
        if owner is None:
            client.set_registered_model_tag(name, OWNER_TAG, tenant)
        elif owner != tenant:
            raise RegistryError(
                f"job {job.id}: registered model {name!r} belongs to tenant {owner!r}; tenant "
                f"{tenant!r} cannot add versions to it or move its aliases (set "
                "registry.model_name to a model of your own)"
            )
        return
    try:
        client.create_registered_model(
            name,
            tags={TASK_TAG: spec.name, OWNER_TAG: tenant},
            description=f"Prefixes for task '{spec.name}' trained by prefixd, one version per job. Aliases: "
            f"'champion' (best {spec.registry.metric}), '@latest' (MLflow's: the newest version).",
        )
    except Exception as e:
        if not _already_exists(e):
            raise
        _ensure_registered_model(client, name, spec, job)  # created meanwhile: by whom?


def register_job(tracking_uri: str, job, spec: JobSpec, result_dir: str | Path) -> tuple[str, str]:
    """Log the job (if not yet) and register it as a new version of spec.registry.model_name;
    returns (model name, version as a string). Idempotent: a job's existing version is returned.
    RegistryError if the spec says registry.register: false."""
    if not spec.registry.register:
        raise RegistryError(f"job {job.id}: its spec says registry.register: false (log it with log_job)")
    name = spec.registry.model_name or REGISTERED_NAME_PREFIX + spec.name
    result = read_result(result_dir, job.id)
    ref = base_model_ref(spec)
    with _mlflow(tracking_uri) as client:
        _ensure_registered_model(client, name, spec, job)  # ownership first: nothing is written otherwise
        mv = _job_version(client, name, job.id)
        if mv is None:
            run = _log_job(client, tracking_uri, job.id, spec, ref, result)
            model_id = run.data.tags[MODEL_ID_TAG]
            mv = client.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=run.info.run_id,
                model_id=model_id,
                tags=_version_tags(job.id, spec, ref, run.data.tags.get(SHA_TAG), result.metrics),
                description=_description(job.id, spec, ref, result.metrics),
            )
            mv = _one_version_per_job(client, name, job.id, str(mv.version))
        _decide_champion(client, name, mv, spec)
        return name, str(mv.version)


def _one_version_per_job(client, name: str, job_id: str, created: str):
    """The job's oldest version; a newer one (a second registrar that raced this one) is deleted. Both
    racers reach the same answer, so exactly one version stays."""
    keep = _job_version(client, name, job_id)
    if keep is not None and str(keep.version) != created:
        client.delete_model_version(name, created)
        return client.get_model_version(name, str(keep.version))
    return client.get_model_version(name, created)


def _version_tags(
    job_id: str, spec: JobSpec, ref: BaseModelRef, sha256: str | None, metrics: Mapping[str, float]
) -> dict[str, str]:
    tags = _own_tags(spec)
    tags.update(
        {
            JOB_TAG: job_id,
            TASK_TAG: spec.name,
            BASE_TAG: describe_base(ref),
            "prefixd.registry_metric": spec.registry.metric,
            "prefixd.direction": spec.registry.direction,
            "prefixd.num_virtual_tokens": str(spec.prefix.num_virtual_tokens),
        }
    )
    if sha256:
        tags[SHA_TAG] = sha256
    for key, value in metrics.items():
        tags[METRIC_TAG + key] = repr(value)
    return tags


def _description(job_id: str, spec: JobSpec, ref: BaseModelRef, metrics: Mapping[str, float]) -> str:
    metric = spec.registry.metric
    value = f"{metrics[metric]:.6g}" if metric in metrics else "not measured"
    return (
        f"Prefix for task '{spec.name}' from job {job_id}: {spec.prefix.num_virtual_tokens} virtual tokens "
        f"over base model {describe_base(ref)}. {metric} = {value} ({spec.registry.direction})."
    )


def _metric_of(mv, metric: str) -> float | None:
    raw = (mv.tags or {}).get(METRIC_TAG + metric)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _decide_champion(client, name: str, mv, spec: JobSpec) -> None:
    """Move `champion` to mv if it beats the current champion (see the module docstring).

    The decision is written on the version first (prefixd.champion_decision), then the alias moves: a
    retry after a crash in between re-applies a 'promote' unless a newer version holds the alias by now.
    """
    version = str(mv.version)
    decided = (mv.tags or {}).get(DECISION_TAG)
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    champion = str(champion) if champion is not None else None
    if decided is not None:
        if decided == "promote" and champion != version and (champion is None or int(champion) < int(version)):
            _promote(client, name, version, mv.tags.get(REASON_TAG, ""))
        return
    metric, direction = spec.registry.metric, spec.registry.direction
    new = _metric_of(mv, metric)
    if champion is None:
        promote, reason = True, "first version of the model" + (f" ({metric} {new:.6g})" if new is not None else "")
    elif champion == version:
        promote, reason = True, "already champion"
    else:
        old = _metric_of(client.get_model_version(name, champion), metric)
        if new is None:
            promote, reason = False, f"no {metric} recorded for this version; champion stays v{champion}"
        elif old is None:
            promote, reason = True, f"{metric} {new:.6g}; champion v{champion} had no {metric}"
        else:
            better = new < old if direction == "minimize" else new > old
            sign = ("<" if new < old else ">=") if direction == "minimize" else (">" if new > old else "<=")
            if better:
                promote, reason = True, f"{metric} {new:.6g} {sign} {old:.6g} of v{champion} ({direction})"
            else:
                promote, reason = (
                    False,
                    (
                        f"{metric} {new:.6g} {sign} {old:.6g} of v{champion} ({direction}): "
                        f"no improvement, champion stays v{champion}"
                    ),
                )
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    client.set_model_version_tag(name, version, DECISION_TAG, "promote" if promote else "keep")
    if promote:
        _promote(client, name, version, reason)


def _promote(client, name: str, version: str, reason: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, "prefixd.champion_version", version)
    client.set_registered_model_tag(name, REASON_TAG, f"v{version}: {reason}")


# ---------------------------------------------------------------------------------------------------
# The orchestrator's registration loop


def exponential_backoff(attempt: int, *, base_s: float = 30.0, cap_s: float = 3600.0) -> float:
    """Seconds to wait after the `attempt`-th failed attempt (1, 2, ...): 30, 60, 120, ... capped at 1 h."""
    return min(cap_s, base_s * 2 ** max(attempt - 1, 0))


def is_unreachable(e: BaseException) -> bool:
    """Whether an error means MLflow could not be reached (rather than refused the request)."""
    import requests
    import urllib3

    transport = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
    )
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, transport):
            return True
        response = getattr(e, "response", None)
        if isinstance(e, requests.exceptions.HTTPError) and response is not None and response.status_code >= 500:
            return True
        message = str(e)
        if message.startswith("API request to ") and " failed with " in message:
            return True
        if getattr(e, "error_code", None) in ("TEMPORARILY_UNAVAILABLE",) or "database is locked" in message:
            return True
        e = e.__cause__ or e.__context__
    return False


def register_pending(
    store,
    tracking_uri: str,
    *,
    now: float | None = None,
    backoff: Callable[[int], float] = exponential_backoff,
    keep_lease: Callable[[], bool] | None = None,
) -> list[str]:
    """Log and register every succeeded, unregistered job that is due at `now` (default: time.time()).

    Returns the ids of the jobs recorded as done in this call. A failed attempt is marked in the store
    (mark_registration_failed), due again at now + backoff(attempts so far, this one included); on a
    connection failure the rest of the due jobs are marked the same way without being tried.
    keep_lease() is called before each job (to renew the registrar's lease); False stops at once.
    """
    now = time.time() if now is None else now
    due = store.pending_registrations(now)
    done: list[str] = []
    for i, job in enumerate(due):
        if keep_lease is not None and not keep_lease():
            break
        if store.get(job.id).registered:  # registered meanwhile by a registrar whose lease ran out
            continue
        try:
            spec = JobSpec.from_dict(job.spec)
            if spec.registry.register:
                model, version = register_job(tracking_uri, job, spec, job.result_dir)
            else:
                model, version = f"runs:/{log_job(tracking_uri, job, spec, job.result_dir)}", "-"
        except Exception as e:  # the loop must go on; the error is kept on the job
            unreachable = is_unreachable(e)
            error = f"{'MLflow unreachable: ' if unreachable else ''}{type(e).__name__}: {e}"[:2000]
            for other in due[i:] if unreachable else [job]:
                store.mark_registration_failed(other.id, error, now + backoff(other.registration_attempts + 1))
            if unreachable:
                break
            continue
        store.mark_registered(job.id, model, version)
        done.append(job.id)
    return done


# ---------------------------------------------------------------------------------------------------
# Lookups


def _resolve_name(client, task_or_model: str) -> str:
    """A registered-model name from a model or task name (rule in the module docstring)."""
    if not isinstance(task_or_model, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}", task_or_model):
        raise RegistryError(
            f"{task_or_model!r} is not a task or model name (letters, digits, '_', '.' and '-', "
            "starting with a letter or digit)"
        )
    try:
        client.get_registered_model(task_or_model)
        return task_or_model
    except Exception as e:
        if not _not_found(e) and getattr(e, "error_code", None) != "INVALID_PARAMETER_VALUE":
            raise
    tagged = [m.name for m in _all_models(client, f"tags.`{TASK_TAG}` = {_quote(task_or_model)}")]
    if len(tagged) == 1:
        return tagged[0]
    if len(tagged) > 1:
        raise RegistryError(
            f"task {task_or_model!r} has several registered models ({', '.join(sorted(tagged))}); give the model name"
        )
    default = REGISTERED_NAME_PREFIX + task_or_model
    try:
        client.get_registered_model(default)
        return default
    except Exception as e:
        if not _not_found(e) and getattr(e, "error_code", None) != "INVALID_PARAMETER_VALUE":
            raise
    known = sorted(m.name for m in _all_models(client) if TASK_TAG in (m.tags or {}))
    raise RegistryError(
        f"no registered model for task or model {task_or_model!r} (looked for a model of that "
        f"name, one tagged {TASK_TAG}={task_or_model}, and {default!r}); known: "
        f"{', '.join(known) or 'none'}"
    )


def _all_models(client, filter_string: str | None = None) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_registered_models(filter_string=filter_string, max_results=100, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _versions(client, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name = {_quote(name)}"), key=lambda v: int(v.version))


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not re.fullmatch(ALIAS_PATTERN, alias) or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(
            f"alias {alias!r} is not a valid alias name: use letters, digits, '_' and '-' "
            "(at most 255; 'v<number>' is reserved), e.g. champion or latest"
        )
    return alias


def _check_selector(alias: str | None, version: str | int | None) -> None:
    """Refuse a bad alias/version before asking MLflow anything."""
    if alias is not None and version is not None:
        raise RegistryError(f"give an alias or a version, not both (got @{alias} and version {version})")
    if alias is not None:
        check_alias(alias)
    if version is not None and (not str(version).isdigit() or int(str(version)) < 1):
        raise RegistryError(f"version {version!r}: a version is a positive integer")


def _resolve_version(client, name: str, alias: str | None, version: str | int | None):
    """(ModelVersion, how it was asked for: '@alias' or 'v<N>')."""
    if alias is not None and version is not None:
        raise RegistryError(f"{name}: give an alias or a version, not both (got @{alias} and version {version})")
    versions = [str(v.version) for v in _versions(client, name)]
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions")
    if version is not None:
        text = str(version)
        if not text.isdigit() or int(text) < 1:
            raise RegistryError(
                f"version {version!r} of {name}: a version is a positive integer; its versions: {', '.join(versions)}"
            )
        if str(int(text)) not in versions:
            raise RegistryError(f"{name} has no version {text}; its versions: {', '.join(versions)}")
        return client.get_model_version(name, str(int(text))), f"v{int(text)}"
    alias = check_alias(CHAMPION if alias is None else alias)
    aliases = client.get_registered_model(name).aliases
    if alias.lower() != LATEST and alias not in aliases:
        shown = ", ".join(sorted(aliases) + [LATEST])
        raise RegistryError(f"{name} has no alias {alias!r}; its aliases: {shown}")
    return client.get_model_version_by_alias(name, alias), f"@{alias}"


def _version_dict(client, name: str, mv) -> dict[str, Any]:
    model = client.get_registered_model(name)
    newest = max(int(v.version) for v in _versions(client, name))
    version = str(mv.version)
    aliases = sorted(a for a, v in model.aliases.items() if str(v) == version)
    if int(version) == newest:
        aliases.append(LATEST)
    tags = dict(mv.tags or {})
    return {
        "name": name,
        "version": version,
        "aliases": aliases,
        "task": tags.get(TASK_TAG),
        "job_id": tags.get(JOB_TAG),
        "base_model": tags.get(BASE_TAG),
        "base_model_sha256": tags.get(SHA_TAG),
        "metrics": {
            k[len(METRIC_TAG) :]: m
            for k in tags
            if k.startswith(METRIC_TAG) and (m := _metric_of(mv, k[len(METRIC_TAG) :])) is not None
        },
        "tags": tags,
        "run_id": mv.run_id,
        "source": mv.source,
        "description": mv.description,
        "created": mv.creation_timestamp,
    }


def lookup(
    tracking_uri: str, task_or_model: str, alias: str | None = None, version: str | int | None = None
) -> dict[str, Any]:
    """One registered version as a dict: name, version, aliases (with 'latest' on the newest), task,
    job_id, base_model, base_model_sha256, metrics (final), tags, run_id, source, description, created.
    Neither alias nor version: the champion."""
    _check_selector(alias, version)
    with _mlflow(tracking_uri) as client:
        name = _resolve_name(client, task_or_model)
        mv, _ = _resolve_version(client, name, alias, version)
        return _version_dict(client, name, mv)


def _base_matches(base: str, described: str | None) -> bool:
    """BASE matches 'kind:location@revision:dtype' when equal to it, to a leading part of it
    ('builtin:smollm2-135m', 'path:/models/x'), or to its location alone."""
    if not described:
        return False
    if described == base or described.startswith(base + ":") or described.startswith(base + "@"):
        return True
    kind, _, rest = described.partition(":")
    location = rest.rsplit(":", 1)[0].split("@", 1)[0]
    return base == location


def search_models(
    tracking_uri: str, base: str | None = None, tags: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """prefixd's registered models (those tagged prefixd.task), by name, each with: name, task,
    description, tags, aliases ({alias: version}, 'latest' included), latest_version, champion_version,
    versions (those matching the filters) and base_models (theirs). `base` (see _base_matches) and
    `tags` (all must match; the version's tags, so the spec's own tags work) filter versions; a model
    without a matching version is left out."""
    tags = dict(tags or {})
    out = []
    with _mlflow(tracking_uri) as client:
        for model in sorted(_all_models(client), key=lambda m: m.name):
            if TASK_TAG not in (model.tags or {}):
                continue
            versions = _versions(client, model.name)
            if not versions:
                continue
            matching = [
                v
                for v in versions
                if (base is None or _base_matches(base, (v.tags or {}).get(BASE_TAG)))
                and all((v.tags or {}).get(k) == val for k, val in tags.items())
            ]
            if not matching:
                continue
            latest = str(versions[-1].version)
            aliases = {a: str(v) for a, v in model.aliases.items()} | {LATEST: latest}
            out.append(
                {
                    "name": model.name,
                    "task": model.tags.get(TASK_TAG),
                    "description": model.description,
                    "tags": dict(model.tags),
                    "aliases": aliases,
                    "latest_version": latest,
                    "champion_version": aliases.get(CHAMPION),
                    "versions": [str(v.version) for v in matching],
                    "base_models": sorted({(v.tags or {}).get(BASE_TAG, "?") for v in matching}),
                }
            )
    return out


def _download_model(client, tracking_uri: str, name: str, mv, dst: Path) -> Path:
    """The version's logged model files into dst; returns dst/artifacts."""
    import mlflow

    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}",
            dst_path=str(dst),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
    except Exception as e:
        if is_unreachable(e):
            raise
        raise RegistryError(f"{name} v{mv.version}: cannot download its model from {mv.source}: {e}") from None
    artifacts = dst / "artifacts"
    if not (artifacts / ADAPTER).is_dir() or not (artifacts / BASE_MODEL_FILE).is_file():
        raise RegistryError(
            f"{name} v{mv.version}: its model at {mv.source} is not a prefixd prefix "
            f"(no artifacts/{ADAPTER}/ or artifacts/{BASE_MODEL_FILE})"
        )
    return artifacts


def download(
    tracking_uri: str,
    task_or_model: str,
    alias: str | None = None,
    version: str | int | None = None,
    dst: str | Path = ".",
) -> Path:
    """Put the version's PEFT adapter files (adapter_config.json, adapter_model.safetensors) and its
    base_model.json into folder `dst` (created if needed; those files overwritten); returns dst, ready
    for `peft.PeftModel.from_pretrained(base_model, dst)`."""
    _check_selector(alias, version)
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise RegistryError(f"download folder {dst}: exists and is not a folder")
    with _mlflow(tracking_uri) as client:
        name = _resolve_name(client, task_or_model)
        mv, _ = _resolve_version(client, name, alias, version)
        with tempfile.TemporaryDirectory(prefix="prefixd-download-") as tmp:
            artifacts = _download_model(client, tracking_uri, name, mv, Path(tmp))
            dst.mkdir(parents=True, exist_ok=True)
            for f in (artifacts / ADAPTER).iterdir():
                if f.is_file():
                    shutil.copy2(f, dst / f.name)
            shutil.copy2(artifacts / BASE_MODEL_FILE, dst / BASE_MODEL_FILE)
    return dst


@dataclass
class GenerationSet:
    """Everything `generate_texts` needs for several tasks' registered prefixes over one base model."""

    prefixed: Any
    """workers.inject.PrefixedModel over the loaded base model."""
    tokenizer: Any
    prefixes: list[Any]
    """One tensor [P_j, num_layers * 2 * token_dim] per task, in the order asked."""
    versions: list[dict[str, Any]]
    """lookup() of each task's version, same order."""
    base_model: str


def load_prefixes_for_generation(
    tracking_uri: str,
    tasks: Sequence[str],
    alias: str | None = None,
    version: str | int | None = None,
    device: str = "auto",
) -> GenerationSet:
    """Resolve each task's version (alias, default champion; a version only with one task), download
    the prefixes, load their common base model once, on `device` ('auto': the GPU when there is one,
    `workers.devices.resolve_device`). RegistryError when the tasks' base models differ, the base model is
    not on this machine (naming it), or the device is not available."""
    from orchestrator.pyfunc_model import load_recorded_base
    from workers.devices import resolve_device
    from workers.formats import PrefixFormatError, load_peft_adapter
    from workers.inject import PrefixedModel

    tasks = list(tasks)
    if not tasks:
        raise RegistryError("give at least one task")
    try:
        where = resolve_device(device)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    _check_selector(alias, version)
    if version is not None and len(tasks) > 1:
        raise RegistryError(
            f"a version number names one model's version; got {len(tasks)} tasks "
            "(use an alias such as champion for several)"
        )
    with _mlflow(tracking_uri) as client, tempfile.TemporaryDirectory(prefix="prefixd-gen-") as tmp:
        picked = []
        for i, task in enumerate(tasks):
            name = _resolve_name(client, task)
            mv, _ = _resolve_version(client, name, alias, version)
            artifacts = _download_model(client, tracking_uri, name, mv, Path(tmp) / str(i))
            ref, sha256 = read_base_model_record(artifacts / BASE_MODEL_FILE)
            picked.append((name, mv, artifacts, ref, sha256))
        bases = {describe_base(ref) for *_, ref, _ in picked}
        if len(bases) > 1:
            which = "; ".join(f"{name} v{mv.version}: {describe_base(ref)}" for name, mv, _, ref, _ in picked)
            raise RegistryError(
                f"the tasks' prefixes belong to different base models ({which}); generate for one base model at a time"
            )
        name, mv, _, ref, sha256 = picked[0]
        try:
            model, tokenizer = load_recorded_base(ref, sha256)
        except ModelLoadError as e:
            raise RegistryError(f"{name} v{mv.version}: {e}") from None
        prefixes = []
        for name, mv, artifacts, _, _ in picked:
            try:
                _, encoder = load_peft_adapter(artifacts / ADAPTER, model.config)
            except PrefixFormatError as e:
                raise RegistryError(f"{name} v{mv.version}: {e}") from None
            prefixes.append(encoder.prompt_embeddings().detach().to(where))
        versions = [_version_dict(client, name, mv) for name, mv, *_ in picked]
    return GenerationSet(
        prefixed=PrefixedModel(model.to(where)),
        tokenizer=tokenizer,
        prefixes=prefixes,
        versions=versions,
        base_model=describe_base(ref),
    )


def generate(
    tracking_uri: str,
    tasks: Sequence[str],
    prompts: Sequence[str],
    *,
    alias: str | None = None,
    version: str | int | None = None,
    max_new_tokens: int = 32,
    with_base: bool = False,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Every prompt with every task's prefix, all rows in ONE mixed-prefix batch; per task (in the order
    given): {task, name, version, outputs: [text per prompt]}. with_base adds a last entry (task None)
    with the base model's own outputs, for comparison."""
    from workers.generate import generate_texts

    prompts = list(prompts)
    if not prompts:
        raise RegistryError("give at least one prompt")
    gs = load_prefixes_for_generation(tracking_uri, tasks, alias, version, device)
    owners = [j for j in range(len(tasks)) for _ in prompts]  # row order: task-major
    texts = generate_texts(
        gs.prefixed,
        gs.tokenizer,
        gs.prefixes,
        owners,
        prompts * len(tasks),
        max_new_tokens=max_new_tokens,
        batch_size=len(owners),
    )
    n = len(prompts)
    results = [
        {"task": task, "name": v["name"], "version": v["version"], "outputs": texts[j * n : (j + 1) * n]}
        for j, (task, v) in enumerate(zip(tasks, gs.versions))
    ]
    if with_base:
        bare = generate_texts(
            gs.prefixed, gs.tokenizer, None, None, prompts, max_new_tokens=max_new_tokens, batch_size=n
        )
        results.append({"task": None, "name": "base model, no prefix", "version": None, "outputs": bare})
    return results


def load_pyfunc(tracking_uri: str, task_or_model: str, alias: str | None = None, version: str | int | None = None):
    """mlflow.pyfunc.load_model of a task's version (default: the champion) from this tracking URI."""
    import mlflow

    _check_selector(alias, version)
    with _mlflow(tracking_uri) as client:
        name = _resolve_name(client, task_or_model)
        mv, asked = _resolve_version(client, name, alias, version)
        uri = f"models:/{name}@{asked[1:]}" if asked.startswith("@") else f"models:/{name}/{mv.version}"
        try:
            return mlflow.pyfunc.load_model(uri)
        except ModelLoadError as e:
            raise RegistryError(f"{name} v{mv.version}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# CLI verbs (wired into the `prefixd` command table elsewhere). Each returns an exit code.


def _add_uri_argument(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given to the main parser is not overwritten by this subparser's default.
    p.add_argument(
        "--mlflow-uri",
        default=argparse.SUPPRESS,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under the prefixd home)",
    )


def _add_version_arguments(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alias", help=f"an alias of the registered model (default: {default}; 'latest' is the newest)")
    g.add_argument("--version", help="a version number")


def add_lookup_arguments(p: argparse.ArgumentParser) -> None:
    """prefixd lookup TASK [--alias A | --version N] [--json] [--download DIR]"""
    p.add_argument("task", help="task name (or registered model name)")
    _add_version_arguments(p, CHAMPION)
    p.add_argument("--json", action="store_true", help="print the version as JSON")
    p.add_argument("--download", metavar="DIR", help="also put its PEFT adapter files into DIR")
    _add_uri_argument(p)


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    """prefixd models [--base BASE] [--tag k=v ...] [--json]"""
    p.add_argument(
        "--base",
        help="only versions of this base model: 'builtin:smollm2-135m', a folder, "
        "or the full 'kind:location@revision:dtype'",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only versions with this tag (repeatable; all must match)",
    )
    p.add_argument("--json", action="store_true", help="print the models as JSON")
    _add_uri_argument(p)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """prefixd generate --task A [--task B ...] [--alias champion] [--max-new-tokens N] PROMPT..."""
    p.add_argument(
        "--task",
        action="append",
        required=True,
        dest="tasks",
        metavar="TASK",
        help="task (or registered model) whose prefix to use; repeat for several, all in one batch",
    )
    _add_version_arguments(p, CHAMPION)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")
    p.add_argument("--with-base", action="store_true", help="also show the base model's outputs without a prefix")
    p.add_argument(
        "--device",
        default="auto",
        help="where to generate: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="each prompt is run with every task")
    _add_uri_argument(p)


def _fail(verb: str, e: Exception) -> int:
    """Bad input (RegistryError): exit 2; MLflow refusing or unreachable: exit 1."""
    print(f"prefixd {verb}: error: {e}", file=sys.stderr)
    return 2 if isinstance(e, RegistryError) else 1


def _errors() -> tuple[type[Exception], ...]:
    from mlflow.exceptions import MlflowException

    return RegistryError, MlflowException


def cmd_lookup(args: argparse.Namespace) -> int:
    try:
        uri = tracking_uri_from_args(args)
        info = lookup(uri, args.task, alias=args.alias, version=args.version)
        if args.download:
            download(uri, info["name"], version=info["version"], dst=args.download)
    except _errors() as e:
        return _fail("lookup", e)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print_version(info)
    if args.download:
        print(f"adapter written to {args.download}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    try:
        tags = parse_tag_filters(args.tag)
    except ValueError as e:
        return _fail("models", RegistryError(str(e)))
    try:
        models = search_models(tracking_uri_from_args(args), base=args.base, tags=tags)
    except _errors() as e:
        return _fail("models", e)
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
    else:
        print_models(models, filtered=bool(args.base or tags))
    return 0


def _one_line(text: str) -> str:
    """Keep one prompt and its output on one line: newlines written as \\n."""
    return text.replace("\n", "\\n")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        return _fail("generate", RegistryError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1"))
    try:
        results = generate(
            tracking_uri_from_args(args),
            args.tasks,
            args.prompts,
            alias=args.alias,
            version=args.version,
            max_new_tokens=args.max_new_tokens,
            with_base=getattr(args, "with_base", False),
            device=getattr(args, "device", "auto"),
        )
    except _errors() as e:
        return _fail("generate", e)
    if args.json:
        print(json.dumps([{**r, "prompts": args.prompts} for r in results], indent=2))
        return 0
    for r in results:
        print(f"== {r['task']} ({r['name']} v{r['version']})" if r["task"] else f"== ({r['name']})")
        for prompt, output in zip(args.prompts, r["outputs"]):
            print(f"{_one_line(prompt)}\t{_one_line(output)}")
    return 0
