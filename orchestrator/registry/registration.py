"""Registration: one registered-model version per job, its owner, the champion, and the orchestrator's loop.

    name, version = register_job(uri, job, spec, result_dir)   # run + pyfunc model + version + aliases
    registered = register_pending(store, uri)                  # every due job, with backoff
    ended = close_ended_runs(store.list(state="failed"), uri, handled)   # runs left open by dead groups

A job never gets two versions (found again by its prefixd.job_id tag before anything is created); a model
belongs to the tenant whose job created it; `champion` moves only to a version that beats it on the spec's
registry metric. The tags, ownership, alias and outage rules are in docs/design.md ("The registry's contract").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from jobs.spec import REGISTERED_NAME_PREFIX, JobSpec
from orchestrator.plan import base_model_ref
from orchestrator.pyfunc_model import describe_base
from orchestrator.registry.client import (
    BASE_TAG,
    CHAMPION,
    DECISION_TAG,
    JOB_TAG,
    METRIC_TAG,
    MODEL_ID_TAG,
    OWNER_TAG,
    REASON_TAG,
    SHA_TAG,
    TASK_TAG,
    RegistryError,
    already_exists,
    exponential_backoff,
    is_unreachable,
    metric_of,
    mlflow_client,
    not_found,
    quote,
    registered_model,
    tenant_of,
)
from orchestrator.registry.tracking import (
    check_experiment,
    end_run,
    experiment_name,
    load_job_result,
    log_job,
    log_job_run,
    own_tags,
)
from workers.models import BaseModelRef

log = logging.getLogger("prefixd.registry")


def _job_version(client, name: str, job_id: str):
    """The version registered for this job, or None."""
    try:
        found = client.search_model_versions(f"name = {quote(name)} and tags.`{JOB_TAG}` = {quote(job_id)}")
    except Exception as e:
        if not_found(e):
            return None
        raise
    found = sorted(found, key=lambda v: int(v.version))
    return found[0] if found else None


def model_owner(tracking_uri: str, name: str) -> str | None:
    """The tenant owning registered model `name` (its prefixd.owner tag); None if there is no such model
    or it predates owners."""
    with mlflow_client(tracking_uri) as client:
        model = registered_model(client, name)
    return None if model is None else (model.tags or {}).get(OWNER_TAG)


def _ensure_registered_model(client, name: str, spec: JobSpec, job) -> None:
    """Create the model owned by the job's tenant, or check that the tenant owns it (RegistryError if not;
    a model without an owner is adopted)."""
    tenant = tenant_of(job)
    try:
        model = client.get_registered_model(name)
    except Exception as e:
        if not not_found(e):
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
        if not already_exists(e):
            raise
        _ensure_registered_model(client, name, spec, job)  # created meanwhile: by whom?


def register_job(tracking_uri: str, job, spec: JobSpec, result_dir: str | Path) -> tuple[str, str]:
    """Complete the job's run (if not yet) and register it as a new version of spec.registry.model_name;
    returns (model name, version as a string). Idempotent: a job's existing version is returned.
    RegistryError if the spec says registry.register: false."""
    return _register(tracking_uri, job, spec, result_dir)[:2]


def _register(tracking_uri: str, job, spec: JobSpec, result_dir: str | Path) -> tuple[str, str, str]:
    """`register_job`, and the id of the version's run."""
    if not spec.registry.register:
        raise RegistryError(f"job {job.id}: its spec says registry.register: false (log it with log_job)")
    name = spec.registry.model_name or REGISTERED_NAME_PREFIX + spec.name
    result = load_job_result(result_dir, job.id)
    ref = base_model_ref(spec)
    with mlflow_client(tracking_uri) as client:
        # Ownership first: nothing is written when the experiment or the model belongs to another tenant.
        check_experiment(client, experiment_name(spec), tenant_of(job), job.id)
        _ensure_registered_model(client, name, spec, job)
        mv = _job_version(client, name, job.id)
        if mv is None:
            run = log_job_run(client, tracking_uri, job.id, spec, ref, result, tenant_of(job))
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
        return name, str(mv.version), mv.run_id


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
    tags = own_tags(spec)
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
    new = metric_of(mv, metric)
    if champion is None:
        promote, reason = True, "first version of the model" + (f" ({metric} {new:.6g})" if new is not None else "")
    elif champion == version:
        promote, reason = True, "already champion"
    else:
        old = metric_of(client.get_model_version(name, champion), metric)
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
                model, version, run_id = _register(tracking_uri, job, spec, job.result_dir)
            else:
                run_id = log_job(tracking_uri, job, spec, job.result_dir)
                model, version = f"runs:/{run_id}", "-"
        except Exception as e:  # the loop must go on; the error is kept on the job
            unreachable = is_unreachable(e)
            error = f"{'MLflow unreachable: ' if unreachable else ''}{type(e).__name__}: {e}"[:2000]
            for other in due[i:] if unreachable else [job]:
                store.mark_registration_failed(other.id, error, now + backoff(other.registration_attempts + 1))
            if unreachable:
                break
            continue
        if job.run_id != run_id:  # opened here: MLflow was out of reach while the job trained
            store.set_run_id(job.id, run_id)
        store.mark_registered(job.id, model, version)
        done.append(job.id)
    return done


def close_ended_runs(jobs, tracking_uri: str, handled: set[str]) -> list[str]:
    """End the runs still RUNNING of `jobs` (store rows) that failed (FAILED, with the job's error) or were
    cancelled (KILLED): those whose worker group could not, because it died and the job then ran out of
    attempts, or the job was cancelled while queued again after an attempt had trained. Returns the ids of
    the jobs whose run was ended now.

    Idempotent: a run already ended is left as is; jobs without a run, in another state, or in `handled`
    (the caller's memory, updated here) are skipped. Raises when MLflow is unreachable (the next call tries
    again); a run that cannot be ended for another reason is logged and left.
    """
    jobs = [j for j in jobs if j.run_id and j.state in ("failed", "cancelled") and j.id not in handled]
    ended: list[str] = []
    if not jobs:
        return ended
    with mlflow_client(tracking_uri) as client:
        for job in jobs:
            try:
                run = client.get_run(job.run_id)
                if run.info.status in ("RUNNING", "SCHEDULED"):
                    failed = job.state == "failed"
                    end_run(client, job.run_id, "FAILED" if failed else "KILLED", job.error if failed else None)
                    ended.append(job.id)
            except Exception as e:
                if is_unreachable(e):
                    raise
                if not not_found(e):
                    log.warning("job %s: could not end its MLflow run %s: %s", job.id, job.run_id, e)
            handled.add(job.id)
    return ended
